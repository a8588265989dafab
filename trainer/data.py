"""Training data: scan folders, check them before any model loads, bucket and crop images,
and the seeded data order.

Pure where possible: scanning returns plain records and a list of problems; image
preparation is a function of (file, target size). No torch at import time.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.digests import file_digest
from schemas.training import TrainingSpec
from trainer.errors import TrainingError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class DataItem:
    path: Path  # absolute
    caption: str  # raw caption text (prefix not applied yet)
    digest: str  # sha256 of the image file bytes
    width: int
    height: int
    is_class: bool = False  # prior-preservation image


def scan_folder(
    folder: Path, *, class_prompt: str | None = None, is_class: bool = False
) -> tuple[list[DataItem], list[str]]:
    """Images with same-name `.txt` captions in `folder` (not recursive), plus problems found.

    Problems: missing folder, unreadable images, images without a caption (unless
    `class_prompt` is given), captions without an image.
    """
    problems: list[str] = []
    if not folder.is_dir():
        return [], [f"dataset folder {folder} does not exist or is not a folder"]
    files = sorted(p for p in folder.iterdir() if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    stems = {p.stem for p in images}
    for txt in (p for p in files if p.suffix.lower() == ".txt"):
        if txt.stem not in stems:
            problems.append(f"caption {txt} has no image with the same name; add the image or delete the caption")
    items: list[DataItem] = []
    for img in images:
        try:
            with Image.open(img) as im:
                im.load()  # decode fully: a truncated file fails here, not mid-training
                width, height = im.size
        except (UnidentifiedImageError, OSError, ValueError) as err:
            problems.append(f"image {img} cannot be read ({err}); fix or remove it")
            continue
        txt = img.with_suffix(".txt")
        if txt.exists():
            try:
                caption = txt.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError as err:
                problems.append(f"caption {txt} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8")
                continue
        elif class_prompt is not None:
            caption = class_prompt
        else:
            problems.append(f"image {img} has no caption file {txt.name}; write one (castbook dataset prepare lists them)")
            continue
        items.append(DataItem(img, caption, file_digest(img), width, height, is_class))
    return items, problems


def full_caption(raw: str, prefix: str) -> str:
    return f"{prefix}{raw}" if prefix else raw


def check_triggers(items: list[DataItem], prefix: str, trigger: str | None) -> list[str]:
    if not trigger:
        return []
    return [
        f"caption of {it.path} does not contain the trigger word {trigger!r} "
        f"(caption: {full_caption(it.caption, prefix)!r}); add it, set dataset.caption_prefix, "
        "or set dataset.require_trigger: false"
        for it in items
        if trigger not in full_caption(it.caption, prefix)
    ]


def dataset_digest(items: list[DataItem]) -> str:
    """Identity of the training data: image bytes and captions, independent of scan order."""
    h = hashlib.sha256()
    for it in sorted(items, key=lambda i: (i.is_class, i.digest, i.caption)):
        h.update(f"{int(it.is_class)}:{it.digest}:{it.caption}\n".encode())
    return h.hexdigest()


def spec_hash(spec: TrainingSpec) -> str:
    """Identity of a training spec; a checkpoint resumes only under the spec that made it."""
    # Not core.digests.canonical_json: its separators differ, and every existing checkpoint
    # would stop resuming.
    return hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


@dataclass
class Prepared:
    items: list[DataItem]
    class_items: list[DataItem]
    dataset_digest: str
    spec_hash: str


def check_inputs(spec: TrainingSpec, root: Path) -> Prepared:
    """Step 1 of training: every data/path problem, gathered into one TrainingError, before torch
    or a model is touched."""
    problems: list[str] = []
    items: list[DataItem] = []
    for folder in spec.dataset.folders:
        found, probs = scan_folder(root / folder.path)
        problems += probs
        items += found * folder.repeats
        if not found and not probs:
            problems.append(f"dataset folder {root / folder.path} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    if spec.dataset.require_trigger:
        problems += check_triggers(list({i.path: i for i in items}.values()), spec.dataset.caption_prefix,
                                   spec.dataset.trigger)
    class_items: list[DataItem] = []
    pp = spec.prior_preservation
    if pp is not None:
        class_items, probs = scan_folder(root / pp.folder, class_prompt=pp.class_prompt, is_class=True)
        problems += probs
        if not class_items and not probs:
            problems.append(f"prior_preservation.folder {root / pp.folder} has no images")
    if not items and not problems:
        problems.append("the dataset is empty: dataset.folders contain no images")
    for ref in spec.evaluation.references:
        if not (root / ref).is_file():
            problems.append(f"evaluation reference image {root / ref} does not exist")
    if spec.samples is not None and not spec.samples.seeds:
        problems.append("samples.seeds is empty; give at least one seed (each prompt is rendered once per seed)")
    if spec.samples is None and spec.evaluation.select_best == "clip_i":
        problems.append("evaluation.select_best: clip_i needs `samples` (prompts to render at each checkpoint)")
    if spec.output.registry:
        problems += check_registry(root / spec.output.registry)
    if problems:
        raise TrainingError(problems)
    return Prepared(items, class_items, dataset_digest(items + class_items), spec_hash(spec))


def check_registry(registry: Path) -> list[str]:
    """Problems that would stop `output.registry` from taking the trained LoRA's entry at the end."""
    if not registry.parent.is_dir():
        return [f"output.registry {registry}: its folder does not exist"]
    if not registry.exists():
        return []
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        doc = YAML(typ="safe").load(registry.read_text(encoding="utf-8"))
    except (YAMLError, UnicodeDecodeError) as e:
        return [f"output.registry {registry} is not valid YAML ({e}); fix it or point output.registry elsewhere"]
    if doc is not None and not isinstance(doc, dict):
        return [f"output.registry {registry} is not a YAML mapping; expected a top-level `loras:` section"]
    if doc and doc.get("loras") is not None and not isinstance(doc["loras"], dict):
        return [f"output.registry {registry}: `loras:` is not a mapping of name -> entry"]
    return []


# ---------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------


def augment_caption(
    raw: str, *, prefix: str, dropout: float, shuffle: bool, keep_tokens: int, rng: random.Random
) -> str:
    """The caption actually trained on for one sample: dropout and tag shuffling, seeded."""
    # Draw both numbers every time so the random stream does not depend on the settings' branches.
    drop = rng.random() < dropout
    tags = [t.strip() for t in raw.split(",")]
    if shuffle and len(tags) > keep_tokens + 1:
        head, tail = tags[:keep_tokens], tags[keep_tokens:]
        rng.shuffle(tail)
        tags = head + tail
    if drop:
        return ""
    return full_caption(", ".join(t for t in tags if t), prefix)


# ---------------------------------------------------------------------------
# Buckets and crops
# ---------------------------------------------------------------------------


def make_buckets(resolution: int, step: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `step`, with about resolution² pixels or fewer."""
    area = resolution * resolution
    buckets: set[tuple[int, int]] = set()
    w = step
    while w <= resolution * max_ratio:
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            buckets.add((w, h))
        w += step
    buckets.add((resolution // step * step, resolution // step * step))
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def crop_to(image: Image.Image, target: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover `target` (w, h), then centre-crop. Returns the crop and its (top, left)."""
    tw, th = target
    w, h = image.size
    scale = max(tw / w, th / h)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    resized = image.convert("RGB").resize((rw, rh), Image.Resampling.LANCZOS)
    top, left = (rh - th) // 2, (rw - tw) // 2
    return resized.crop((left, top, left + tw, top + th)), (top, left)


# ---------------------------------------------------------------------------
# Data order: seeded per epoch, so a resumed run draws what the straight run drew
# ---------------------------------------------------------------------------


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
