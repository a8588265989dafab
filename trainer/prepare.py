"""`castbook dataset prepare`: clean a folder of training images into a new folder.

Never touches the input folder. Steps, each recorded per file in `prepare.json` and
`prepare.html` (what was kept, what was dropped and why):
  1. exact duplicates (sha256 of the bytes)
  2. perceptual duplicates (64-bit dHash, Hamming distance <= `phash_distance`)
  3. quality: minimum size, blur (variance of the Laplacian), extreme aspect ratio
  4. caption audit: missing/empty captions, captions without the trigger word, captions without images
  5. resize + centre-crop each kept image to its aspect-ratio bucket; copy its caption
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from jinja2 import Environment
from PIL import Image, UnidentifiedImageError
from scipy.ndimage import laplace

from core.digests import file_digest
from core.files import atomic_write_bytes, atomic_write_text
from trainer.data import IMAGE_EXTENSIONS, crop_to, make_buckets, nearest_bucket
from trainer.errors import PrepareError


@dataclass(frozen=True)
class PrepareOptions:
    trigger: str | None = None
    min_size: int = 256  # shorter side, pixels
    blur_threshold: float = 100.0  # Laplacian variance below this = blurred (OpenCV's usual rule of thumb)
    max_aspect: float = 3.0
    phash_distance: int = 6  # of 64 bits
    resolution: int = 1024
    bucket_step: int = 64


@dataclass
class FileRecord:
    name: str
    status: str  # kept | dropped
    reasons: list[str] = field(default_factory=list)  # why dropped
    warnings: list[str] = field(default_factory=list)  # caption audit (kept anyway)
    size: tuple[int, int] | None = None
    bucket: tuple[int, int] | None = None
    blur: float | None = None
    sha256: str | None = None
    dhash: str | None = None
    caption: str | None = None


def dhash(image: Image.Image) -> int:
    """64-bit difference hash: robust to re-encoding and resizing, not to content changes."""
    g = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def laplacian_variance(image: Image.Image) -> float:
    """Variance of the 4-neighbour Laplacian of the grey image (0-255) over the interior pixels
    (the border's value would depend on a padding rule): low means blurred."""
    g = np.asarray(image.convert("L"), dtype=np.float64)
    if g.shape[0] < 3 or g.shape[1] < 3:
        return 0.0
    return float(laplace(g)[1:-1, 1:-1].var())


def prepare_dataset(src: Path, out: Path, options: PrepareOptions = PrepareOptions()) -> dict:
    """Write the cleaned dataset to `out` and return the summary (also written as JSON + HTML)."""
    src, out = Path(src).resolve(), Path(out).resolve()
    if not src.is_dir():
        raise PrepareError(f"input folder {src} does not exist")
    if out == src or out.is_relative_to(src) or src.is_relative_to(out):
        raise PrepareError(f"--out {out} must be outside the input folder {src} (the input is never modified)")
    if out.exists() and any(out.iterdir()):
        raise PrepareError(f"--out {out} exists and is not empty; choose a new folder")
    files = sorted(p for p in src.iterdir() if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    stems = {p.stem for p in images}
    orphans = [p.name for p in files if p.suffix.lower() == ".txt" and p.stem not in stems]
    buckets = make_buckets(options.resolution, options.bucket_step)
    records: list[FileRecord] = []
    seen_sha: dict[str, str] = {}
    kept_hashes: list[tuple[int, str]] = []
    out.mkdir(parents=True, exist_ok=True)
    for path in images:
        rec = FileRecord(name=path.name, status="kept")
        records.append(rec)
        rec.sha256 = file_digest(path)
        # 1. exact duplicate
        if rec.sha256 in seen_sha:
            rec.status, rec.reasons = "dropped", [f"exact duplicate of {seen_sha[rec.sha256]}"]
            continue
        seen_sha[rec.sha256] = path.name
        try:
            with Image.open(path) as im:
                im.load()
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as err:
            rec.status, rec.reasons = "dropped", [f"unreadable image ({err})"]
            continue
        w, h = image.size
        rec.size = (w, h)
        # 2. perceptual duplicate
        hsh = dhash(image)
        rec.dhash = f"{hsh:016x}"
        near = next(((n, bin(hsh ^ other).count("1")) for other, n in kept_hashes
                     if bin(hsh ^ other).count("1") <= options.phash_distance), None)
        if near:
            rec.status = "dropped"
            rec.reasons.append(f"near duplicate of {near[0]} (dHash distance {near[1]} <= {options.phash_distance})")
            continue
        # 3. quality
        if min(w, h) < options.min_size:
            rec.reasons.append(f"too small: {w}x{h}, shorter side < {options.min_size}")
        if max(w / h, h / w) > options.max_aspect:
            rec.reasons.append(f"extreme aspect ratio {max(w / h, h / w):.2f} > {options.max_aspect}")
        rec.blur = laplacian_variance(image)
        if rec.blur < options.blur_threshold:
            rec.reasons.append(f"blurred: Laplacian variance {rec.blur:.1f} < {options.blur_threshold}")
        # 4. caption audit (kept with a warning: the user decides)
        txt = path.with_suffix(".txt")
        if not txt.exists():
            rec.warnings.append("no caption file")
        else:
            try:
                rec.caption = txt.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError as err:
                rec.warnings.append(f"caption is not UTF-8 text ({err.reason} at byte {err.start}); not copied")
            else:
                if not rec.caption:
                    rec.warnings.append("empty caption")
                elif options.trigger and options.trigger not in rec.caption:
                    rec.warnings.append(f"caption lacks the trigger word {options.trigger!r}")
        if rec.reasons:
            rec.status = "dropped"
            continue
        kept_hashes.append((hsh, path.name))
        # 5. bucket crop
        rec.bucket = nearest_bucket(w, h, buckets)
        crop, _ = crop_to(image, rec.bucket)
        buf = io.BytesIO()
        crop.save(buf, format="PNG")
        atomic_write_bytes(out / f"{path.stem}.png", buf.getvalue())
        if rec.caption is not None:
            atomic_write_text(out / f"{path.stem}.txt", rec.caption + "\n")
    summary = {
        "input": str(src), "output": str(out), "options": asdict(options),
        "counts": {"images": len(records), "kept": sum(r.status == "kept" for r in records),
                   "dropped": sum(r.status == "dropped" for r in records),
                   "caption_warnings": sum(bool(r.warnings) for r in records if r.status == "kept")},
        "orphan_captions": orphans,
        "files": [asdict(r) for r in records],
    }
    atomic_write_text(out / "prepare.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "prepare.html", Environment(autoescape=True).from_string(HTML).render(s=summary))
    return summary


HTML = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Dataset preparation</title>
<style>body{font-family:system-ui,sans-serif;margin:2rem}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:left}.dropped{background:#fbeaea}.warn{color:#a60}</style>
</head><body><h1>Dataset preparation</h1>
<p>{{ s.input }} → {{ s.output }}: {{ s.counts.kept }} kept, {{ s.counts.dropped }} dropped of {{ s.counts.images }} images;
{{ s.counts.caption_warnings }} kept images have caption warnings.</p>
{% if s.orphan_captions %}<p class="warn">Captions without an image: {{ s.orphan_captions|join(", ") }}</p>{% endif %}
<table><tr><th>file</th><th>status</th><th>why</th><th>caption audit</th><th>size</th><th>bucket</th><th>blur</th><th>caption</th></tr>
{% for f in s.files %}<tr class="{{ f.status }}"><td>{{ f.name }}</td><td>{{ f.status }}</td><td>{{ f.reasons|join("; ") }}</td>
<td class="warn">{{ f.warnings|join("; ") }}</td><td>{{ f.size|join("x") if f.size else "" }}</td>
<td>{{ f.bucket|join("x") if f.bucket else "" }}</td><td>{{ "%.1f"|format(f.blur) if f.blur is not none else "" }}</td>
<td>{{ f.caption or "" }}</td></tr>
{% endfor %}</table></body></html>
"""
