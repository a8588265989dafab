"""LoRA training on the SDXL UNet (and optionally the text encoders), from a `TrainingSpec`.

The recipe (`train_lora`) reads like a table of contents:
  1. check inputs (data, paths) before any model loads
  2. load the base model through the renderer's loader
  3. check the LoRA config against the layers, add adapters
  4. optimizer, lr scheduler, optional resume from the last checkpoint
  5. training loop: cached latents/text embeddings, SDXL time ids, noise-prediction loss
  6. checkpoints (safetensors + JSON, atomic), samples rendered by the renderer
  7. final LoRA (diffusers/peft, kohya on request), registry entry, train.html

Determinism: every random draw of optimizer step `s` comes from a generator seeded by
(seed, s, micro-batch), and the data order of epoch `e` from (seed, e). A resumed run
therefore draws exactly what the uninterrupted run drew; checkpoints still save the
torch RNG states (LoRA dropout uses the global generator).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.digests import file_digest
from core.errors import CastbookError
from schemas.job import ResolvedModel
from schemas.training import TrainingSpec
from trainer import data as tdata

CHECKPOINT_PREFIX = "step-"


class TrainingError(CastbookError):
    """Bad input found before training starts; `problems` lists every one."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("cannot train:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass
class TrainPaths:
    run_dir: Path  # <output.folder>/<name>.train
    checkpoints: Path
    samples: Path
    cache: Path
    lora_file: Path  # <output.folder>/<name>.safetensors
    kohya_file: Path
    report: Path

    @classmethod
    def for_spec(cls, spec: TrainingSpec, root: Path) -> TrainPaths:
        out = root / spec.output.folder
        run = out / f"{spec.output.name}.train"
        cache = root / spec.train.cache_dir if spec.train.cache_dir else out / ".cache" / "train"
        return cls(
            run_dir=run,
            checkpoints=run / "checkpoints",
            samples=run / "samples",
            cache=cache,
            lora_file=out / f"{spec.output.name}.safetensors",
            kohya_file=out / f"{spec.output.name}.kohya.safetensors",
            report=run / "train.html",
        )


@dataclass
class TrainResult:
    steps: int  # optimizer steps completed
    losses: list[float]  # one per optimizer step, from step 1
    lora_file: Path | None  # None when stopped early (stop_after)
    kohya_file: Path | None
    report: Path | None
    checkpoints: list[Path]
    samples: dict[int, list[str]]  # step -> sample image paths (relative to the run dir)
    clip_i: dict[int, float]
    best_step: int | None
    step_seconds: list[float]  # wall time per optimizer step
    spec_hash: str
    dataset_digest: str
    device: str
    mixed_precision: str
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------


def spec_hash(spec: TrainingSpec) -> str:
    return hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def resolve_base_model(spec: TrainingSpec, root: Path) -> ResolvedModel:
    """`base_model` string -> the `ResolvedModel` the renderer loads (same sources as rendering)."""
    from renderer.models import builtin_digest, builtin_name

    ref = spec.base_model
    if ref.startswith("builtin:"):
        builtin_name(ref)  # raises a clear error for unknown names
        return ResolvedModel(ref=ref, kind="builtin", digest=builtin_digest(ref))
    path = root / ref
    if path.is_dir():
        from core.digests import folder_digest

        return ResolvedModel(ref=ref, kind="diffusers", digest=folder_digest(path))
    if path.suffix.lower() == ".safetensors" and path.is_file():
        return ResolvedModel(ref=ref, kind="single_file", digest=file_digest(path), config=spec.base_model_config)
    raise TrainingError(
        f"base_model {ref!r} is neither builtin:NAME, a diffusers folder nor a .safetensors file "
        f"under the project root {root}; fix the path (it is relative to the root)"
    )


def step_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed for one (step, micro-batch, ...) draw, independent of the others."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, *parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def epoch_batches(n_items_by_bucket: dict[Any, list[int]], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of item indices for one epoch; every batch holds one bucket's items."""
    rng = random.Random(step_seed(seed, 1_000_003, epoch))
    batches: list[list[int]] = []
    for bucket in sorted(n_items_by_bucket):
        idx = list(n_items_by_bucket[bucket])
        rng.shuffle(idx)
        # The last short batch is padded by wrapping around, so every batch is full.
        for start in range(0, len(idx), batch_size):
            b = idx[start : start + batch_size]
            while len(b) < batch_size:
                b.append(idx[(len(b) + start) % len(idx)])
            batches.append(b)
    rng.shuffle(batches)
    return batches


# ---------------------------------------------------------------------------
# Caches: latents and text embeddings keyed by digests (safetensors on disk)
# ---------------------------------------------------------------------------


class TensorCache:
    """Small tensor bundles on disk (safetensors, atomic) with a bounded in-memory LRU."""

    def __init__(self, folder: Path, max_memory_items: int = 512):
        self.folder = folder
        self.max = max_memory_items
        self.mem: OrderedDict[str, dict] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str):
        if key in self.mem:
            self.mem.move_to_end(key)
            self.hits += 1
            return self.mem[key]
        path = self.folder / key[:2] / f"{key}.safetensors"
        if path.exists():
            from safetensors.torch import load_file

            value = load_file(path)
            self._remember(key, value)
            self.hits += 1
            return value
        self.misses += 1
        return None

    def put(self, key: str, value: dict) -> dict:
        from safetensors.torch import save

        from core.files import atomic_write_bytes

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


# ---------------------------------------------------------------------------
# Model set-up
# ---------------------------------------------------------------------------


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def check_lora_targets(model, targets: tuple[str, ...], rank: int, what: str) -> list[str]:
    """Problems with the LoRA config on `model`: targets matching nothing, rank above a layer's size."""
    import torch

    problems = []
    matched: dict[str, int] = {t: 0 for t in targets}
    for name, module in model.named_modules():
        for t in targets:
            if name == t or name.endswith("." + t):
                matched[t] += 1
                if isinstance(module, torch.nn.Linear):
                    dims = (module.in_features, module.out_features)
                elif isinstance(module, torch.nn.Conv2d):
                    dims = (module.in_channels, module.out_channels)
                else:
                    problems.append(f"{what} target {t!r} matches {name} ({type(module).__name__}), "
                                    "which LoRA cannot adapt; target Linear or Conv2d layers")
                    continue
                if rank > min(dims):
                    problems.append(
                        f"lora rank {rank} is larger than {what} layer {name} ({dims[0]} in, {dims[1]} out); "
                        f"a rank above min(in, out) = {min(dims)} adds nothing. Lower lora.rank to at most "
                        f"{min(dims)} or drop this target"
                    )
                    break
    for t, n in matched.items():
        if n == 0:
            examples = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            problems.append(f"{what} target module {t!r} matches no layer; Linear layer names include: {', '.join(examples[:12])}")
    # Report each distinct message once (many layers share a size).
    seen, unique = set(), []
    for p in problems:
        key = p.split(" layer ")[0] + p.split(")")[-1] if "larger than" in p else p
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


@dataclass
class Models:
    pipe: Any
    unet: Any
    vae: Any
    noise_scheduler: Any
    text_encoders: list  # [te1, te2]
    device: str
    weight_dtype: Any
    autocast_dtype: Any  # None = no autocast
    mixed_precision: str


def load_models(spec: TrainingSpec, root: Path, device: str | None, notes: list[str]) -> tuple[Models, ResolvedModel]:
    import torch
    from diffusers import DDPMScheduler

    from core.errors import JobError
    from renderer.models import load_base_pipeline, resolve_device

    device = resolve_device(device)
    resolved = resolve_base_model(spec, root)
    try:
        pipe = load_base_pipeline(resolved, root, device, "fp32")
    except JobError as e:
        raise TrainingError(str(e)) from e
    mp = spec.train.mixed_precision
    if mp != "no" and not device.startswith("cuda"):
        notes.append(f"mixed_precision {mp} needs CUDA; training in fp32 on {device}")
        mp = "no"
    if mp == "bf16" and not torch.cuda.is_bf16_supported():
        raise TrainingError("mixed_precision bf16 is not supported by this GPU; use fp16 or no")
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mp]
    # Frozen weights in the low-precision dtype save memory; the VAE stays fp32 (SDXL's VAE
    # overflows in fp16) and LoRA parameters are cast back to fp32 after they are added.
    pipe.unet.to(device, dtype=weight_dtype)
    pipe.text_encoder.to(device, dtype=weight_dtype)
    pipe.text_encoder_2.to(device, dtype=weight_dtype)
    pipe.vae.to(device, dtype=torch.float32)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    models = Models(
        pipe=pipe, unet=pipe.unet, vae=pipe.vae, noise_scheduler=noise_scheduler,
        text_encoders=[pipe.text_encoder, pipe.text_encoder_2], device=device, weight_dtype=weight_dtype,
        autocast_dtype=None if mp == "no" else weight_dtype, mixed_precision=mp,
    )
    return models, resolved


def add_adapters(spec: TrainingSpec, models: Models) -> list:
    """Add peft LoRA adapters; returns the trainable parameter groups."""
    import torch
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig, inject_adapter_in_model

    lo = spec.lora
    problems = check_lora_targets(models.unet, lo.target_modules, lo.rank, "UNet")
    te_rank = lo.text_encoder_rank or lo.rank
    if lo.train_text_encoder:
        for i, te in enumerate(models.text_encoders, 1):
            problems += check_lora_targets(te, lo.text_encoder_target_modules, te_rank, f"text encoder {i}")
    if problems:
        raise TrainingError(problems)
    unet_cfg = LoraConfig(r=lo.rank, lora_alpha=lo.alpha, lora_dropout=lo.dropout, init_lora_weights="gaussian",
                          target_modules=list(lo.target_modules), use_dora=lo.use_dora)
    models.unet.add_adapter(unet_cfg)
    trainable = [models.unet]
    if lo.train_text_encoder:
        te_alpha = lo.alpha * te_rank / lo.rank  # same scale (alpha / rank) as the UNet
        te_cfg = LoraConfig(r=te_rank, lora_alpha=te_alpha, lora_dropout=lo.dropout, init_lora_weights="gaussian",
                            target_modules=list(lo.text_encoder_target_modules), use_dora=lo.use_dora)
        for te in models.text_encoders:
            # transformers 5's `add_adapter` demands peft >= 0.22 (the stack pins 0.21.2): inject
            # directly; `peft_config` is what `get_peft_model_state_dict` and the file header read.
            inject_adapter_in_model(te_cfg, te, adapter_name="default")
            te.peft_config = {"default": te_cfg}
            trainable.append(te)
    if models.mixed_precision != "no":
        cast_training_params(trainable, dtype=torch.float32)
    if spec.train.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if lo.train_text_encoder:
            for te in models.text_encoders:
                te.gradient_checkpointing_enable()
    groups = [{"params": [p for p in models.unet.parameters() if p.requires_grad], "lr": spec.train.learning_rate}]
    if lo.train_text_encoder:
        te_lr = spec.train.text_encoder_learning_rate or spec.train.learning_rate
        groups.append({"params": [p for te in models.text_encoders for p in te.parameters() if p.requires_grad],
                       "lr": te_lr})
    return groups


def adapter_config(model) -> dict:
    """A model's peft LoraConfig as diffusers stores it in the file header, sets as sorted lists.

    peft keeps `target_modules` as a set; its order, and so the header's bytes, would follow
    PYTHONHASHSEED, and two trainings of one spec would write different files.
    """
    config = model.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}


def trainable_state(models: Models, spec: TrainingSpec) -> dict:
    """Every trainable tensor by a stable name: the exact weights a checkpoint resumes from."""
    named = [("unet", models.unet)]
    if spec.lora.train_text_encoder:
        named += [("text_encoder", models.text_encoders[0]), ("text_encoder_2", models.text_encoders[1])]
    return {f"{prefix}.{n}": p for prefix, m in named for n, p in m.named_parameters() if p.requires_grad}


def lora_state_dicts(models: Models, spec: TrainingSpec) -> dict[str, dict]:
    """LoRA layers per component in peft naming (`lora_A`/`lora_B`), which `load_lora_weights` reads.

    Not `convert_state_dict_to_diffusers`: it renames only attention layers (`lora.down`), and a
    file mixing both namings loads with the attention LoRA silently dropped.
    """
    from peft.utils import get_peft_model_state_dict

    out = {"unet": get_peft_model_state_dict(models.unet)}
    if spec.lora.train_text_encoder:
        out["text_encoder"] = get_peft_model_state_dict(models.text_encoders[0])
        out["text_encoder_2"] = get_peft_model_state_dict(models.text_encoders[1])
    return out


# ---------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------


@dataclass
class Prepared:
    items: list[tdata.DataItem]
    class_items: list[tdata.DataItem]
    dataset_digest: str
    spec_hash: str
    paths: TrainPaths


def check_inputs(spec: TrainingSpec, root: Path) -> Prepared:
    """Step 1: every data/path problem, gathered, before torch or a model is touched."""
    problems: list[str] = []
    items: list[tdata.DataItem] = []
    for folder in spec.dataset.folders:
        found, probs = tdata.scan_folder(root / folder.path)
        problems += probs
        items += found * folder.repeats
        if not found and not probs:
            problems.append(f"dataset folder {root / folder.path} has no images ({', '.join(tdata.IMAGE_EXTENSIONS)})")
    if spec.dataset.require_trigger:
        problems += tdata.check_triggers(list({i.path: i for i in items}.values()), spec.dataset.caption_prefix,
                                         spec.dataset.trigger)
    class_items: list[tdata.DataItem] = []
    pp = spec.prior_preservation
    if pp is not None:
        class_items, probs = tdata.scan_folder(root / pp.folder, class_prompt=pp.class_prompt, is_class=True)
        problems += probs
        if not class_items and not probs:
            problems.append(f"prior_preservation.folder {root / pp.folder} has no images")
    if not items and not problems:
        problems.append("the dataset is empty: dataset.folders contain no images")
    for ref in spec.evaluation.references:
        if not (root / ref).is_file():
            problems.append(f"evaluation reference image {root / ref} does not exist")
    if spec.samples is None and spec.evaluation.select_best == "clip_i":
        problems.append("evaluation.select_best: clip_i needs `samples` (prompts to render at each checkpoint)")
    if spec.output.registry and not (root / spec.output.registry).parent.is_dir():
        problems.append(f"output.registry {root / spec.output.registry}: its folder does not exist")
    if problems:
        raise TrainingError(problems)
    return Prepared(items, class_items, tdata.dataset_digest(items + class_items), spec_hash(spec),
                    TrainPaths.for_spec(spec, root))


class Trainer:
    """One training run. `train_lora` is the usual entry point."""

    def __init__(self, spec: TrainingSpec, root: Path, *, device: str | None = None, progress: bool = True,
                 render: bool = True):
        self.spec = spec
        self.root = Path(root).resolve()
        self.notes: list[str] = []
        self.prep = check_inputs(spec, self.root)  # 1. before any model loads
        self.models, self.resolved = load_models(spec, self.root, device, self.notes)  # 2.
        # peft's gaussian LoRA init and LoRA dropout draw from the global generator: seed it,
        # as training scripts do, so two runs of one spec start from the same weights.
        import torch

        if spec.train.threads:
            torch.set_num_threads(spec.train.threads)
        torch.manual_seed(spec.train.seed)
        self.param_groups = add_adapters(spec, self.models)  # 3.
        self._setup_optimizer()  # 4.
        self.progress = progress
        self.render_samples = render
        self.paths = self.prep.paths
        self.latent_cache = TensorCache(self.paths.cache / "latents")
        self.text_cache = TensorCache(self.paths.cache / "text")
        self.step = 0
        self.losses: list[float] = []
        self.step_seconds: list[float] = []
        self.samples: dict[int, list[str]] = {}
        self.clip_i: dict[int, float] = {}
        self._renderer = None
        self._bucketize()

    # -- set-up -------------------------------------------------------------------------
    def _setup_optimizer(self) -> None:
        import torch
        from diffusers.optimization import get_scheduler

        t = self.spec.train
        self.optimizer = torch.optim.AdamW(self.param_groups, betas=(t.adam_beta1, t.adam_beta2),
                                           eps=t.adam_epsilon, weight_decay=t.weight_decay)
        self.lr_scheduler = get_scheduler(t.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=t.lr_warmup_steps, num_training_steps=t.steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.models.mixed_precision == "fp16")
        self.trainable = trainable_state(self.models, self.spec)

    def _bucketize(self) -> None:
        t = self.spec.train
        if t.buckets:
            buckets = tdata.make_buckets(t.resolution, t.bucket_step)
            self.targets = [tdata.nearest_bucket(i.width, i.height, buckets) for i in self.prep.items]
        else:
            self.targets = [(t.resolution, t.resolution)] * len(self.prep.items)
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, target in enumerate(self.targets):
            by_bucket.setdefault(target, []).append(i)
        self.by_bucket = by_bucket
        self.batches_per_epoch = len(epoch_batches(by_bucket, t.batch_size, t.seed, 0))
        self._epoch_cache: dict[int, list[list[int]]] = {}

    def batch_indices(self, global_batch: int) -> list[int]:
        epoch, pos = divmod(global_batch, self.batches_per_epoch)
        if epoch not in self._epoch_cache:
            self._epoch_cache = {epoch: epoch_batches(self.by_bucket, self.spec.train.batch_size, self.spec.train.seed, epoch)}
        return self._epoch_cache[epoch][pos]

    # -- encoders (cached) --------------------------------------------------------------
    def latent_dist(self, item: tdata.DataItem, target: tuple[int, int]) -> dict:
        """VAE posterior (mean, std) of one image at one target size, cached by file digest."""
        import torch

        key = hashlib.sha256(f"{item.digest}:{target[0]}x{target[1]}:{self.resolved.digest}".encode()).hexdigest()
        hit = self.latent_cache.get(key)
        if hit is not None:
            return hit
        from PIL import Image

        with Image.open(item.path) as im:
            crop, (top, left) = tdata.crop_to(im, target)
        arr = np.asarray(crop, dtype=np.float32) / 127.5 - 1.0
        pixels = torch.from_numpy(arr).permute(2, 0, 1)[None].to(self.models.device)
        with torch.no_grad():
            dist = self.models.vae.encode(pixels).latent_dist
        return self.latent_cache.put(key, {
            "mean": dist.mean[0], "std": dist.std[0],
            "time_ids": torch.tensor([item.height, item.width, top, left, target[1], target[0]], dtype=torch.float32),
        })

    def encode_text(self, caption: str) -> tuple:
        """(prompt_embeds [seq, dim], pooled [dim]) for a caption; cached unless text encoders train."""
        import torch

        pipe = self.models.pipe
        if self.spec.lora.train_text_encoder:
            embeds, _, pooled, _ = pipe.encode_prompt(caption, device=self.models.device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            return embeds[0], pooled[0]
        key = hashlib.sha256(f"{caption}\0{self.resolved.digest}".encode()).hexdigest()
        hit = self.text_cache.get(key)
        if hit is None:
            with torch.no_grad():
                embeds, _, pooled, _ = pipe.encode_prompt(caption, device=self.models.device, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=False)
            hit = self.text_cache.put(key, {"embeds": embeds[0], "pooled": pooled[0]})
        return hit["embeds"], hit["pooled"]

    # -- one optimizer step ---------------------------------------------------------------
    def micro_batch(self, step: int, micro: int) -> dict:
        """Everything random about one micro-batch, drawn from its own seeded generators."""
        import torch

        t, ds = self.spec.train, self.spec.dataset
        seed = step_seed(t.seed, step, micro)
        gen = torch.Generator("cpu").manual_seed(seed)
        rng = random.Random(seed)
        global_batch = step * t.gradient_accumulation_steps + micro
        idx = self.batch_indices(global_batch)
        target = self.targets[idx[0]]
        chosen: list[tuple[tdata.DataItem, float]] = []
        pp = self.spec.prior_preservation
        for i in idx:
            use_class = pp is not None and rng.random() < pp.fraction
            if use_class:
                chosen.append((self.prep.class_items[rng.randrange(len(self.prep.class_items))], pp.weight))
            else:
                chosen.append((self.prep.items[i], 1.0))
        latents, time_ids, embeds, pooled = [], [], [], []
        for item, _w in chosen:
            d = self.latent_dist(item, target)
            latents.append(d["mean"] + d["std"] * torch.randn(d["mean"].shape, generator=gen))
            time_ids.append(d["time_ids"])
            if item.is_class:
                caption = item.caption
            else:
                caption = tdata.augment_caption(item.caption, prefix=ds.caption_prefix, dropout=ds.caption_dropout,
                                                shuffle=ds.shuffle_captions, keep_tokens=ds.keep_tokens, rng=rng)
            e, p = self.encode_text(caption)
            embeds.append(e)
            pooled.append(p)
        latents = torch.stack(latents) * self.models.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        if t.noise_offset:
            noise = noise + t.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=gen)
        n_train = self.models.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, n_train, (latents.shape[0],), generator=gen)
        return {
            "latents": latents, "noise": noise, "timesteps": timesteps, "time_ids": torch.stack(time_ids),
            "embeds": torch.stack(embeds), "pooled": torch.stack(pooled),
            "weights": torch.tensor([w for _, w in chosen], dtype=torch.float32),
        }

    def loss_of(self, mb: dict):
        import torch
        import torch.nn.functional as F

        m = self.models
        dev = m.device
        latents, noise, timesteps = mb["latents"].to(dev), mb["noise"].to(dev), mb["timesteps"].to(dev)
        noisy = m.noise_scheduler.add_noise(latents, noise, timesteps)
        pred_type = m.noise_scheduler.config.prediction_type
        target = noise if pred_type == "epsilon" else m.noise_scheduler.get_velocity(latents, noise, timesteps)
        with torch.autocast(device_type=dev.split(":")[0], dtype=m.autocast_dtype or torch.float32,
                            enabled=m.autocast_dtype is not None):
            pred = m.unet(
                noisy.to(m.weight_dtype), timesteps, mb["embeds"].to(dev, m.weight_dtype),
                added_cond_kwargs={"text_embeds": mb["pooled"].to(dev, m.weight_dtype),
                                   "time_ids": mb["time_ids"].to(dev, m.weight_dtype)},
                return_dict=False,
            )[0]
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        weights = mb["weights"].to(dev)
        if self.spec.train.snr_gamma is not None:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(m.noise_scheduler, timesteps)
            w = torch.clamp(snr, max=self.spec.train.snr_gamma)
            weights = weights * (w / snr if pred_type == "epsilon" else w / (snr + 1))
        return (per_sample * weights).mean()

    def train_step(self) -> float:
        """One optimizer step (all micro-batches); returns its mean loss."""
        import torch

        t = self.spec.train
        total = 0.0
        for micro in range(t.gradient_accumulation_steps):
            mb = self.micro_batch(self.step, micro)
            loss = self.loss_of(mb) / t.gradient_accumulation_steps
            self.scaler.scale(loss).backward()
            total += float(loss.detach())
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), t.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total

    # -- the loop -----------------------------------------------------------------------
    def run(self, *, resume: bool = False, stop_after: int | None = None,
            on_step: Callable[[int, float], None] | None = None) -> TrainResult:
        from trainer import checkpoint, export, report

        if resume:
            checkpoint.resume_latest(self)
        elif self.paths.checkpoints.exists() and any(self.paths.checkpoints.glob(CHECKPOINT_PREFIX + "*")):
            raise TrainingError(
                f"{self.paths.checkpoints} already holds checkpoints of an earlier run; pass --resume to continue it, "
                f"or delete {self.paths.run_dir} to start over"
            )
        self.models.unet.train()
        t, ck, sm = self.spec.train, self.spec.checkpoints, self.spec.samples
        end = t.steps if stop_after is None else min(t.steps, stop_after)
        with _progress(self.progress, t.steps, self.step) as bar:
            while self.step < end:
                t0 = time.perf_counter()
                loss = self.train_step()
                self.step_seconds.append(time.perf_counter() - t0)
                self.losses.append(loss)
                bar(self.step, loss)
                if on_step:
                    on_step(self.step, loss)
                last = self.step == t.steps
                if sm is not None and self.render_samples and (self.step % sm.every == 0 or last):
                    self.sample()
                if self.step % ck.every == 0 or last or self.step == end:
                    checkpoint.save(self)
        done = self.step >= t.steps
        result = TrainResult(
            steps=self.step, losses=list(self.losses), lora_file=None, kohya_file=None, report=None,
            checkpoints=checkpoint.list_checkpoints(self.paths.checkpoints), samples=dict(self.samples),
            clip_i=dict(self.clip_i), best_step=None, step_seconds=list(self.step_seconds),
            spec_hash=self.prep.spec_hash, dataset_digest=self.prep.dataset_digest, device=self.models.device,
            mixed_precision=self.models.mixed_precision, notes=self.notes,
        )
        if done:
            export.finish(self, result)  # 7. final LoRA, kohya, registry
            result.report = report.write_report(self, result)
        return result

    # -- what gets written ---------------------------------------------------------------
    def lora_layers(self) -> dict[str, dict]:
        return lora_state_dicts(self.models, self.spec)

    def adapter_configs(self) -> dict[str, dict]:
        """peft LoraConfig of each adapted component (diffusers stores it in the file header)."""
        comps = {"unet": self.models.unet}
        if self.spec.lora.train_text_encoder:
            comps.update(text_encoder=self.models.text_encoders[0], text_encoder_2=self.models.text_encoders[1])
        return {k: adapter_config(m) for k, m in comps.items()}

    def header_metadata(self) -> dict[str, str]:
        """Training metadata stored in the safetensors header (strings only)."""
        from renderer.outputs import castbook_version

        s = self.spec
        return {
            "castbook.version": castbook_version(),
            "castbook.spec_hash": self.prep.spec_hash,
            "castbook.dataset_digest": self.prep.dataset_digest,
            "castbook.steps": str(self.step),
            "castbook.rank": str(s.lora.rank),
            "castbook.alpha": str(s.lora.alpha),
            "castbook.kind": s.kind,
            "castbook.base_model": self.resolved.ref,
            "castbook.base_model_digest": self.resolved.digest,
            "castbook.trigger": s.dataset.trigger or "",
            "castbook.name": s.output.name,
        }

    # -- samples through the renderer ----------------------------------------------------
    def sample(self) -> None:
        from trainer import samples

        self.samples[self.step], score = samples.render_step(self)
        if score is not None:
            self.clip_i[self.step] = score


class _progress:
    """A rich progress bar with loss and it/s; a no-op when disabled."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.enabled, self.total, self.start = enabled, total, start

    def __enter__(self):
        if not self.enabled:
            return lambda step, loss: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.2f} it/s"),
                          TimeRemainingColumn())
        self.p.__enter__()
        self.task = self.p.add_task("train", total=self.total, completed=self.start, loss=float("nan"), rate=0.0)
        self.t0, self.s0 = time.perf_counter(), self.start

        def update(step: int, loss: float) -> None:
            rate = (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)
            self.p.update(self.task, completed=step, loss=loss, rate=rate)

        return update

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)
        return False


def train_lora(spec: TrainingSpec, root: Path, *, resume: bool = False, device: str | None = None,
               progress: bool = True, stop_after: int | None = None, render: bool = True) -> TrainResult:
    """Train the LoRA a spec describes; see the module docstring for the steps."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    trainer = Trainer(spec, root, device=device, progress=progress, render=render)
    return trainer.run(resume=resume, stop_after=stop_after)


def rng_state_tensors() -> dict:
    import torch

    out = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.torch_cuda.{i}"] = s
    return out


def restore_rng(tensors: dict) -> None:
    import torch

    if "rng.torch_cpu" in tensors:
        torch.set_rng_state(tensors["rng.torch_cpu"].to(torch.uint8))
    cuda = sorted(k for k in tensors if k.startswith("rng.torch_cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k].to(torch.uint8) for k in cuda])


def load_training_spec(path: Path, root: Path) -> TrainingSpec:
    """Read a training spec YAML with located errors (`schemas.loader.SpecErrors`)."""
    from schemas.loader import load_yaml_model

    return load_yaml_model(Path(path), TrainingSpec, root)


def _train_remote(spec: TrainingSpec, root: Path, kwargs: dict) -> tuple[str, object]:
    """Body of the Ray task: the same `train_lora` call, in a worker process.

    Input errors come back as ("TrainingError"|"DatasetError", problems): these exceptions do
    not survive pickling (their __init__ rebuilds the message from `problems`)."""
    from trainer.data import DatasetError

    try:
        return "ok", train_lora(spec, root, **kwargs)
    except (TrainingError, DatasetError) as exc:
        return type(exc).__name__, list(exc.problems)


def train_lora_ray(spec: TrainingSpec, root: Path, *, ray_address: str | None = None, resume: bool = False,
                   device: str | None = None, progress: bool = False, stop_after: int | None = None,
                   render: bool = True) -> TrainResult:
    """`train_lora` inside a Ray task (one GPU when the cluster has one, else one CPU).

    Starts a private local Ray like the renderer (address="local", no dashboard, 127.0.0.1)
    unless `ray_address` names a cluster; shuts down only a Ray it started. Input errors are
    raised here as TrainingError/DatasetError, like `train_lora` raises them."""
    import ray

    from renderer.runner import worker_env
    from trainer.data import DatasetError

    we_started = False
    if not ray.is_initialized():
        # log_to_driver: the worker's prints (progress, notes) show on the driver's terminal.
        common = dict(log_to_driver=True, runtime_env={"env_vars": worker_env()})
        if ray_address:
            ray.init(address=ray_address, **common)
        else:
            ray.init(address="local", num_cpus=max(1, os.cpu_count() or 1), include_dashboard=False,
                     object_store_memory=256 * 1024 * 1024, _node_ip_address="127.0.0.1", **common)
        we_started = True
    try:
        # A task asking for a GPU on a cluster without one stays PENDING forever (STACK.md).
        opts: dict = {"num_cpus": 1, "max_retries": 0, "runtime_env": {"env_vars": worker_env()}}
        if ray.cluster_resources().get("GPU"):
            opts["num_gpus"] = 1
        task = ray.remote(**opts)(_train_remote)
        kwargs = dict(resume=resume, device=device, progress=progress, stop_after=stop_after, render=render)
        kind, value = ray.get(task.remote(spec, Path(root).resolve(), kwargs))
        if kind == "ok":
            return value
        raise (DatasetError if kind == "DatasetError" else TrainingError)(value)
    finally:
        if we_started:
            ray.shutdown()
