"""Image and text embeddings for consistency scores (open_clip, optional DINOv2).

CLIP-I: cosine of a generated image to each reference image of its character
(mean over references, and the best match). CLIP-T: cosine of an image to its
prompt. The ceiling of a character is the mean pairwise similarity of its own
references: a generated image rarely scores above what the references score
against each other, so scores are also shown divided by it.

Models load from local files only (never a hub). Embeddings are cached on disk by
file digest + model identity, so re-scoring a run costs neither a model load nor
a forward pass. torch and open_clip are imported lazily, on the first cache miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from core.digests import file_digest
from core.errors import InputError
from core.files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    new_temp_folder,
    publish_folder,
)
from core.home import builtins_dir
from schemas.builtins import BUILTIN_RECIPES

BUILTIN_TINY_CLIP = "builtin:tiny-clip"
BUILTIN_TOY_CLIP = "builtin:toy-clip"
# The tiny-clip recipe (config or seed) is part of the built-in's folder name and of
# every cached embedding's identity; it is bumped in schemas/builtins.py.
TINY_CLIP_RECIPE = BUILTIN_RECIPES["tiny-clip"]
# Trained by castbook on the toy world (toyworld/clip.py); shipped with the renderer's weights.
TOY_CLIP_DIR = Path(__file__).resolve().parents[1] / "renderer" / "weights" / "toy" / "clip"
TOY_CLIP_NAME = "toy-clip"
TINY_CLIP_NAME = "castbook-tiny-clip"
TINY_CLIP_SEED = 0
# ≈1.7 M parameters (most of it the 49,408-token embedding); encodes in milliseconds.
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
_BATCH = 16


class ScoringError(InputError):
    """The spec's or the run's `scoring` settings cannot be used (a model, weights or DINO folder)."""


def _tiny_clip_dir() -> Path:
    return builtins_dir() / f"tiny-clip-r{TINY_CLIP_RECIPE}"  # same naming as renderer.models


def ensure_tiny_clip() -> tuple[Path, Path]:
    """Build `builtin:tiny-clip` once (fixed seed) and return (config json, weights file).

    It is always loaded back from the file, never used from memory: reloaded
    weights are what every later run sees, so scores match across processes.
    """
    folder = _tiny_clip_dir()
    config = folder / f"{TINY_CLIP_NAME}.json"
    weights = folder / "open_clip_model.safetensors"
    if config.is_file() and weights.is_file():
        return config, weights
    import open_clip  # noqa: PLC0415 - heavy, only on the first build
    import torch  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    tmp = new_temp_folder(folder)
    try:
        (tmp / config.name).write_text(json.dumps(TINY_CLIP_CONFIG, indent=2, sort_keys=True))
        open_clip.add_model_config(tmp / config.name)
        # open_clip warns "no pretrained weights" on the root logger; random init is the point.
        # The level is put back: a library function leaves the caller's logging alone.
        open_clip_logger = logging.getLogger()
        level = open_clip_logger.level
        open_clip_logger.setLevel(logging.ERROR)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(TINY_CLIP_SEED)
                model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
        finally:
            open_clip_logger.setLevel(level)
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / weights.name))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_folder(tmp, folder)  # atomic: a concurrent builder either wins or finds it done
    return config, weights




def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (they need not be normalised)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    if denom == 0.0:
        return 0.0
    return float(np.dot(a, b) / denom)


def clip_i(image: np.ndarray, refs: np.ndarray) -> tuple[float, float]:
    """(mean, best) cosine of one image embedding to each reference embedding."""
    sims = [cosine(image, r) for r in refs]
    return float(np.mean(sims)), float(np.max(sims))


def ceiling(refs: np.ndarray) -> float | None:
    """Mean pairwise cosine among a character's references; None with fewer than two."""
    n = len(refs)
    if n < 2:
        return None
    sims = [cosine(refs[i], refs[j]) for i in range(n) for j in range(i + 1, n)]
    return float(np.mean(sims))


@dataclass
class ScorerStats:
    model_loads: int = 0
    image_model_calls: int = 0  # images sent through the model
    text_model_calls: int = 0
    image_cache_hits: int = 0
    text_cache_hits: int = 0


class _EmbeddingCache:
    """One safetensors file per embedding: `<root>/<identity16>/<kind>/<digest>.safetensors`."""

    def __init__(self, root: Path | None, identity: str):
        self.root = None if root is None else Path(root) / hashlib.sha256(identity.encode()).hexdigest()[:16]
        self.identity = identity
        self.memory: dict[tuple[str, str], np.ndarray] = {}

    def get(self, kind: str, digest: str) -> np.ndarray | None:
        hit = self.memory.get((kind, digest))
        if hit is not None or self.root is None:
            return hit
        path = self.root / kind / f"{digest}.safetensors"
        if not path.is_file():
            return None
        from safetensors.numpy import load_file  # noqa: PLC0415

        try:
            vec = load_file(str(path))["e"]
        except Exception:  # a damaged entry is a miss, never a crash
            return None
        self.memory[(kind, digest)] = vec
        return vec

    def put(self, kind: str, digest: str, vec: np.ndarray) -> None:
        vec = np.ascontiguousarray(vec, dtype=np.float32)
        self.memory[(kind, digest)] = vec
        if self.root is None:
            return
        from safetensors.numpy import save  # noqa: PLC0415

        if not (self.root / "identity.txt").exists():  # written with the first entry: a scorer that
            atomic_write_text(self.root / "identity.txt", self.identity + "\n")  # embeds nothing writes nothing
        atomic_write_bytes(self.root / kind / f"{digest}.safetensors", save({"e": vec}))


class _DigestMemo:
    """sha256 of files, remembered by (path, size, mtime) so big weights are hashed once."""

    def __init__(self, cache_root: Path | None):
        self.path = None if cache_root is None else Path(cache_root) / "file-digests.json"
        self.data: dict[str, dict] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.data = {}

    def digest(self, path: Path) -> str:
        path = Path(path).resolve()
        st = path.stat()
        entry = self.data.get(str(path))
        if entry and entry["size"] == st.st_size and entry["mtime_ns"] == st.st_mtime_ns:
            return entry["sha256"]
        d = file_digest(path)
        self.data[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": d}
        if self.path is not None and st.st_size > (8 << 20):  # only worth remembering for big files
            atomic_write_json(self.path, self.data, sort_keys=True)
        return d


@dataclass
class _Loaded:
    model: object
    preprocess: object
    tokenizer: object
    device: str


class ClipScorer:
    """open_clip image/text embeddings with an on-disk cache.

    `model` is `builtin:tiny-clip` or an open_clip architecture name (e.g. `ViT-L-14`);
    `weights` is a local `.safetensors` file for real models. The model is loaded on
    the first cache miss only.
    """

    def __init__(self, model: str, weights: Path | None = None, cache_dir: Path | None = None,
                 device: str | None = None):
        self.model_name = model
        self.device = device or os.environ.get("CASTBOOK_SCORING_DEVICE", "cpu")
        self.stats = ScorerStats()
        self._loaded: _Loaded | None = None
        self._digests = _DigestMemo(cache_dir)
        if model == BUILTIN_TINY_CLIP:
            if weights is not None:
                raise ScoringError(f"scoring.weights={str(weights)!r} was given with model {model!r}; "
                                 "built-ins need no weights: remove scoring.weights")
            self._config, self.weights = ensure_tiny_clip()
            self._arch = TINY_CLIP_NAME
        elif model == BUILTIN_TOY_CLIP:
            if weights is not None:
                raise ScoringError(f"scoring.weights={str(weights)!r} was given with model {model!r}; "
                                 "built-ins need no weights: remove scoring.weights")
            self._config = TOY_CLIP_DIR / f"{TOY_CLIP_NAME}.json"
            self.weights = TOY_CLIP_DIR / "open_clip_model.safetensors"
            if not self.weights.is_file():
                raise ScoringError(f"{model} weights {self.weights} are missing; retrain them with "
                                        "`castbook toymodel train-clip specs/toy/toy-clip.yaml`")
            self._arch = TOY_CLIP_NAME
        else:
            if model.startswith(("hf-hub:", "local-dir:")) or model.startswith("builtin:"):
                raise ScoringError(f"scoring.model={model!r} is not supported: use {BUILTIN_TINY_CLIP!r} or an "
                                 "open_clip architecture name such as 'ViT-L-14' with scoring.weights "
                                 "set to a local .safetensors file")
            if weights is None:
                raise ScoringError(f"scoring.model={model!r} needs scoring.weights: a local .safetensors file "
                                 "(castbook never downloads models)")
            weights = Path(weights)
            if weights.suffix != ".safetensors":
                raise ScoringError(f"scoring.weights={str(weights)!r} is not a .safetensors file; convert it "
                                 "(castbook does not unpickle checkpoints)")
            if not weights.is_file():
                raise ScoringError(f"scoring.weights={str(weights)!r} does not exist")
            self._config = None
            self.weights = weights
            self._arch = model
        self.weights_digest = self._digests.digest(self.weights)
        self.identity = f"open_clip:{model}@{self.weights_digest[:16]}"
        if model in (BUILTIN_TINY_CLIP, BUILTIN_TOY_CLIP):
            name = model.removeprefix("builtin:")
            self.identity = f"{model}@{BUILTIN_RECIPES[name]}:{self.weights_digest[:16]}"
        self._cache = _EmbeddingCache(cache_dir, self.identity)

    # --- model -------------------------------------------------------------------------
    def _load(self) -> _Loaded:
        if self._loaded is not None:
            return self._loaded
        import open_clip  # noqa: PLC0415
        import torch  # noqa: PLC0415

        if self._config is not None:
            open_clip.add_model_config(self._config)
        if self._arch not in open_clip.list_models():
            raise ScoringError(f"scoring.model={self._arch!r} is not an open_clip architecture; "
                             f"known names include ViT-B-32, ViT-L-14, ViT-H-14")
        model, _, preprocess = open_clip.create_model_and_transforms(
            self._arch, pretrained=str(self.weights), device=self.device)
        model.eval()
        tokenizer = open_clip.get_tokenizer(self._arch)
        self.stats.model_loads += 1
        self._loaded = _Loaded(model, preprocess, tokenizer, self.device)
        del torch
        return self._loaded

    # --- embeddings --------------------------------------------------------------------
    def image_digest(self, path: Path) -> str:
        return self._digests.digest(path)

    def embed_images(self, paths: Sequence[Path]) -> np.ndarray:
        """L2-normalised embeddings, one row per path (shape N×D)."""
        digests = [self.image_digest(p) for p in paths]
        return _embed_cached(self._cache, "img", [Path(p) for p in paths], digests, self._encode_images,
                             self.stats, "image_cache_hits")

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        digests = [text_digest(t) for t in texts]
        return _embed_cached(self._cache, "txt", list(texts), digests, self._encode_texts, self.stats,
                             "text_cache_hits")

    def _encode_images(self, paths: list[Path]) -> list[np.ndarray]:
        import torch  # noqa: PLC0415
        from PIL import Image  # noqa: PLC0415

        m = self._load()
        vecs: list[np.ndarray] = []
        for batch in _batches(paths, _BATCH):
            tensors = []
            for p in batch:
                with Image.open(p) as im:
                    tensors.append(m.preprocess(im.convert("RGB")))
            with torch.inference_mode():
                feats = m.model.encode_image(torch.stack(tensors).to(m.device), normalize=True)
            self.stats.image_model_calls += len(batch)
            vecs.extend(feats.float().cpu().numpy())
        return vecs

    def _encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        import torch  # noqa: PLC0415

        m = self._load()
        vecs: list[np.ndarray] = []
        for batch in _batches(texts, _BATCH):
            with torch.inference_mode():
                feats = m.model.encode_text(m.tokenizer(batch).to(m.device), normalize=True)
            self.stats.text_model_calls += len(batch)
            vecs.extend(feats.float().cpu().numpy())
        return vecs


class DinoScorer:
    """Optional identity embeddings from a local DINOv2 folder (transformers format,
    `config.json` + `model.safetensors`). Same cache rules as ClipScorer."""

    def __init__(self, folder: Path, cache_dir: Path | None = None, device: str | None = None):
        folder = Path(folder)
        weights = folder / "model.safetensors"
        if not (folder / "config.json").is_file() or not weights.is_file():
            raise ScoringError(f"scoring.dino={str(folder)!r} must be a local folder with config.json and "
                                    "model.safetensors (a transformers DINOv2 checkpoint)")
        self.folder = folder
        self.device = device or os.environ.get("CASTBOOK_SCORING_DEVICE", "cpu")
        self.stats = ScorerStats()
        self._digests = _DigestMemo(cache_dir)
        self.identity = "dinov2@" + hashlib.sha256(
            (self._digests.digest(weights) + file_digest(folder / "config.json")).encode()).hexdigest()[:16]
        self._cache = _EmbeddingCache(cache_dir, self.identity)
        self._model = None

    def _load(self):
        if self._model is None:
            from transformers import Dinov2Model  # noqa: PLC0415

            self._model = Dinov2Model.from_pretrained(self.folder, local_files_only=True,
                                                      use_safetensors=True).to(self.device).eval()
            self.stats.model_loads += 1
        return self._model

    def embed_images(self, paths: Sequence[Path]) -> np.ndarray:
        digests = [self._digests.digest(p) for p in paths]
        return _embed_cached(self._cache, "img", [Path(p) for p in paths], digests, self._encode_images,
                             self.stats, "image_cache_hits")

    def _encode_images(self, paths: list[Path]) -> list[np.ndarray]:
        import torch  # noqa: PLC0415
        from PIL import Image  # noqa: PLC0415
        from torchvision.transforms import v2 as T  # noqa: PLC0415

        model = self._load()
        size = int(model.config.image_size)
        tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToImage(), T.ToDtype(torch.float32, scale=True),
                        T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])
        vecs: list[np.ndarray] = []
        for batch in _batches(paths, _BATCH):
            xs = []
            for p in batch:
                with Image.open(p) as im:
                    xs.append(tf(im.convert("RGB")))
            with torch.inference_mode():
                cls = model(pixel_values=torch.stack(xs).to(self.device)).pooler_output
                vecs.extend(torch.nn.functional.normalize(cls.float(), dim=-1).cpu().numpy())
            self.stats.image_model_calls += len(batch)
        return vecs


def _embed_cached(cache: "_EmbeddingCache", kind: str, inputs: list, digests: list[str],
                  encode: Callable[[list], list[np.ndarray]], stats: ScorerStats, hits_field: str) -> np.ndarray:
    """One row per input: cached vectors by content digest; `encode` runs once, on the distinct misses."""
    out: dict[str, np.ndarray] = {}
    missing: dict[str, object] = {}
    for item, d in zip(inputs, digests):
        if d in out or d in missing:
            continue
        hit = cache.get(kind, d)
        if hit is not None:
            setattr(stats, hits_field, getattr(stats, hits_field) + 1)
            out[d] = hit
        else:
            missing[d] = item
    if missing:
        for d, vec in zip(missing, encode(list(missing.values()))):
            cache.put(kind, d, vec)
            out[d] = vec
    return _stack([out[d] for d in digests])


def _batches(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _stack(vecs: list[np.ndarray]) -> np.ndarray:
    if not vecs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(vecs).astype(np.float32)
