"""The frozen encoders' outputs, cached: VAE latents and text embeddings of the training data.

Keys are digests (image bytes + target size + base model; caption + base model), so a second
run of a spec, or a resumed one, encodes nothing again. Bundles are safetensors files written
atomically, with a bounded in-memory LRU in front.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from core.files import atomic_write_bytes
from trainer.data import DataItem, crop_to
from trainer.models import Models


class TensorCache:
    """Small tensor bundles on disk (safetensors, atomic) with a bounded in-memory LRU."""

    def __init__(self, folder: Path, max_memory_items: int = 512):
        self.folder = folder
        self.max = max_memory_items
        self.mem: OrderedDict[str, dict] = OrderedDict()

    def get(self, key: str):
        if key in self.mem:
            self.mem.move_to_end(key)
            return self.mem[key]
        path = self.folder / key[:2] / f"{key}.safetensors"
        if path.exists():
            from safetensors.torch import load_file

            value = load_file(path)
            self._remember(key, value)
            return value
        return None

    def put(self, key: str, value: dict) -> dict:
        from safetensors.torch import save

        value = {k: v.detach().to("cpu", copy=True).float().contiguous() for k, v in value.items()}
        path = self.folder / key[:2] / f"{key}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save(value))
        self._remember(key, value)
        return value

    def _remember(self, key: str, value: dict) -> None:
        self.mem[key] = value
        if len(self.mem) > self.max:
            self.mem.popitem(last=False)


class Encoders:
    """VAE posteriors and prompt embeddings for training, through the two caches in `folder`."""

    def __init__(self, models: Models, base_digest: str, folder: Path, *, train_text_encoder: bool):
        self.models = models
        self.base_digest = base_digest
        self.train_text_encoder = train_text_encoder
        self.latents = TensorCache(folder / "latents")
        self.text = TensorCache(folder / "text")

    def latent_dist(self, item: DataItem, target: tuple[int, int]) -> dict:
        """VAE posterior (mean, std) of one image at one target size, and its SDXL time ids."""
        import torch

        key = hashlib.sha256(f"{item.digest}:{target[0]}x{target[1]}:{self.base_digest}".encode()).hexdigest()
        hit = self.latents.get(key)
        if hit is not None:
            return hit
        from PIL import Image

        with Image.open(item.path) as im:
            crop, (top, left) = crop_to(im, target)
        arr = np.asarray(crop, dtype=np.float32) / 127.5 - 1.0
        pixels = torch.from_numpy(arr).permute(2, 0, 1)[None].to(self.models.device)
        with torch.no_grad():
            dist = self.models.vae.encode(pixels).latent_dist
        return self.latents.put(key, {
            "mean": dist.mean[0], "std": dist.std[0],
            "time_ids": torch.tensor([item.height, item.width, top, left, target[1], target[0]], dtype=torch.float32),
        })

    def encode_text(self, caption: str) -> tuple:
        """(prompt_embeds [seq, dim], pooled [dim]) for a caption; cached unless the text encoders train."""
        import torch

        pipe = self.models.pipe
        if self.train_text_encoder:
            embeds, _, pooled, _ = pipe.encode_prompt(caption, device=self.models.device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            return embeds[0], pooled[0]
        key = hashlib.sha256(f"{caption}\0{self.base_digest}".encode()).hexdigest()
        hit = self.text.get(key)
        if hit is None:
            with torch.no_grad():
                embeds, _, pooled, _ = pipe.encode_prompt(caption, device=self.models.device, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=False)
            hit = self.text.put(key, {"embeds": embeds[0], "pooled": pooled[0]})
        return hit["embeds"], hit["pooled"]
