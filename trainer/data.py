"""Training data: scan folders, check them before any model loads, bucket and crop images.

Pure where possible: scanning returns plain records and a list of problems; image
preparation is a function of (file, target size). No torch at import time.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from core.digests import file_digest
from core.errors import CastbookError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class DataItem:
    path: Path  # absolute
    caption: str  # raw caption text (prefix not applied yet)
    digest: str  # sha256 of the image file bytes
    width: int
    height: int
    is_class: bool = False  # prior-preservation image


class DatasetError(CastbookError):
    """Every problem found in the training data, reported together before training starts."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("training data has problems:\n" + "\n".join(f"  - {p}" for p in problems))


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
            caption = txt.read_text(encoding="utf-8").strip()
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
