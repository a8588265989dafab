"""`castbook dataset prepare --poses`: OpenPose keypoints -> normalized poses -> k-means clusters.

Pure parts (testable with synthetic keypoints, no annotator weights): confidence filter,
normalization, k-means, silhouette choice of k, pose-map drawing, contact sheets.
I/O edge: `prepare_poses` loads controlnet-aux's OpenposeDetector lazily from a local folder.

Keypoints are OpenPose's 18 body points (COCO order) as an (18, 3) array of x, y, score;
a missing point is NaN.
"""

from __future__ import annotations

import io
import json
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from jinja2 import Environment
from PIL import Image, ImageDraw
from scipy.cluster.vq import kmeans2

from core.files import atomic_write_bytes, atomic_write_text
from schemas.annotators import DETECTORS
from trainer.data import IMAGE_EXTENSIONS
from trainer.errors import PrepareError

NECK, R_HIP, L_HIP = 1, 8, 11
N_POINTS = 18
# OpenPose body limbs (1-based pairs in the original code, 0-based here) and their colours.
LIMBS = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
         (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17)]
COLOURS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
           (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
           (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]
# from_pretrained(dir) loads all three (body, hand, face) even when only the body is used; the
# file names come from the detector table the renderer uses too (schemas/annotators.py).
ANNOTATOR_FILES = DETECTORS["openpose"].weights[0].files

Detector = Callable[[Image.Image], list[np.ndarray]]


@dataclass(frozen=True)
class PoseOptions:
    annotator: Path | None = None
    clusters: int | None = None  # None: choose k by silhouette over k_range
    min_confidence: float = 0.7
    k_range: tuple[int, int] = (2, 8)
    seed: int = 0


# --- pure ----------------------------------------------------------------------------------

def detection_confidence(kp: np.ndarray) -> float:
    """Mean score of the detected points (0 when none)."""
    scores = kp[:, 2][~np.isnan(kp[:, 0])]
    return float(scores.mean()) if scores.size else 0.0


def best_detection(detections: list[np.ndarray], min_confidence: float) -> tuple[np.ndarray | None, float]:
    """The most confident detection at or above `min_confidence` (None if all are below), and its score."""
    scored = [(detection_confidence(d), d) for d in detections]
    scored = [s for s in scored if s[0] >= min_confidence]
    if not scored:
        return None, max((detection_confidence(d) for d in detections), default=0.0)
    conf, det = max(scored, key=lambda s: s[0])
    return det, conf


def normalize_keypoints(kp: np.ndarray) -> np.ndarray | None:
    """(18, 2) points centred on the neck/hip midpoint, scaled by torso length (neck to mid-hip).

    None when the neck or both hips are missing (no torso to normalise by)."""
    xy = kp[:, :2].astype(np.float64)
    hips = xy[[R_HIP, L_HIP]]
    hips = hips[~np.isnan(hips[:, 0])]
    if np.isnan(xy[NECK, 0]) or not len(hips):
        return None
    mid_hip = hips.mean(axis=0)
    torso = float(np.linalg.norm(xy[NECK] - mid_hip))
    if torso < 1e-9:
        return None
    centre = (xy[NECK] + mid_hip) / 2
    return (xy - centre) / torso


def features(normalized: list[np.ndarray]) -> np.ndarray:
    """(n, 36) matrix; missing points sit at the centre (0, 0) so they pull no cluster far."""
    return np.stack([np.nan_to_num(n, nan=0.0).reshape(-1) for n in normalized])


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, n_init: int = 8, iters: int = 100) -> tuple[np.ndarray, float]:
    """Labels and inertia of the best of `n_init` k-means++ runs (scipy's `kmeans2`; deterministic for a seed)."""
    if not 1 <= k <= len(x):
        raise PrepareError(f"cannot make {k} pose clusters from {len(x)} poses; use --clusters between 1 and {len(x)}")
    rng = np.random.default_rng(seed)
    best: tuple[np.ndarray, float] | None = None
    for _ in range(n_init):
        # Duplicate poses can leave k-means++ nothing to choose from (0/0 weights) or a cluster
        # empty; scipy warns and keeps that centre, and the inertia comparison below decides.
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore")
            centres, labels = kmeans2(x, k, iter=iters, minit="++", seed=rng)
        inertia = float(((x - centres[labels]) ** 2).sum())
        if best is None or inertia < best[1]:
            best = (labels, inertia)
    return best


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette coefficient (Euclidean); 0 for points alone in their cluster."""
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    ks = np.unique(labels)
    if len(ks) < 2:
        return 0.0
    s = np.zeros(len(x))
    for i in range(len(x)):
        own = labels == labels[i]
        if own.sum() <= 1:
            continue
        a = d[i, own].sum() / (own.sum() - 1)
        b = min(d[i, labels == k].mean() for k in ks if k != labels[i])
        s[i] = (b - a) / max(a, b) if max(a, b) > 0 else 0.0
    return float(s.mean())


def cluster_poses(x: np.ndarray, k: int | None = None, *, k_range: tuple[int, int] = (2, 8),
                  seed: int = 0) -> tuple[np.ndarray, int, dict[int, float]]:
    """Labels, the k used, and the silhouette score per k tried (empty when k was given)."""
    if k is not None:
        return kmeans(x, k, seed=seed)[0], k, {}
    hi = min(k_range[1], len(x) - 1)
    if hi < k_range[0]:
        return np.zeros(len(x), dtype=int), 1, {}  # too few poses to compare clusterings
    scores: dict[int, float] = {}
    runs = {}
    for kk in range(k_range[0], hi + 1):
        runs[kk] = kmeans(x, kk, seed=seed)[0]
        scores[kk] = silhouette(x, runs[kk])
    best = max(scores, key=lambda kk: (scores[kk], -kk))
    return runs[best], best, scores


def draw_pose_map(kp: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """OpenPose-style skeleton on black; `kp` (18, >=2) in pixels of an image of `size`, NaN = missing."""
    w, h = size
    im = Image.new("RGB", (w, h), (0, 0, 0))
    draw = ImageDraw.Draw(im)
    width = max(1, round(min(w, h) / 100))
    for i, (a, b) in enumerate(LIMBS):
        if not (np.isnan(kp[a, 0]) or np.isnan(kp[b, 0])):
            draw.line([tuple(kp[a, :2]), tuple(kp[b, :2])], fill=COLOURS[i % len(COLOURS)], width=width * 2)
    for i in range(N_POINTS):
        if not np.isnan(kp[i, 0]):
            x, y = kp[i, :2]
            draw.ellipse((x - width * 2, y - width * 2, x + width * 2, y + width * 2), fill=COLOURS[i])
    return im


def contact_sheet(images: list[Image.Image], *, thumb: int = 128, cols: int = 6) -> Image.Image:
    """Thumbnails in a grid (row-major), each letterboxed into a `thumb` square."""
    cols = max(1, min(cols, len(images)))
    rows = max(1, -(-len(images) // cols))
    sheet = Image.new("RGB", (cols * thumb, rows * thumb), (32, 32, 32))
    for i, im in enumerate(images):
        t = im.copy()
        t.thumbnail((thumb, thumb))
        sheet.paste(t, ((i % cols) * thumb + (thumb - t.width) // 2, (i // cols) * thumb + (thumb - t.height) // 2))
    return sheet


# --- I/O edge ------------------------------------------------------------------------------

def check_annotator(annotator: Path | None) -> Path:
    """The annotator folder, or a PrepareError naming the files needed and where to put them."""
    need = ", ".join(ANNOTATOR_FILES)
    if annotator is None:
        raise PrepareError(f"--poses needs the OpenPose annotator files ({need}); put them in a folder and pass "
                           "--annotator FOLDER (they are pickles: use only files from a source you trust)")
    folder = Path(annotator).expanduser().resolve()
    if not folder.is_dir():
        raise PrepareError(f"--annotator {folder} does not exist; create it and put {need} in it "
                           "(from lllyasviel/Annotators)")
    missing = [f for f in ANNOTATOR_FILES if not (folder / f).is_file()]
    if missing:
        raise PrepareError(f"annotator file(s) {', '.join(missing)} missing from --annotator {folder}; "
                           f"put {', '.join(missing)} there (from lllyasviel/Annotators)")
    return folder


def openpose_detector(folder: Path) -> Detector:
    """Detector from controlnet-aux (imported lazily: heavy, and only --poses needs it)."""
    from controlnet_aux import OpenposeDetector

    try:
        model = OpenposeDetector.from_pretrained(str(folder))  # local trusted folder only (checked above)
    except (OSError, RuntimeError, ValueError, EOFError, KeyError, pickle.UnpicklingError) as e:  # damaged or wrong files
        raise PrepareError(f"the annotator files in --annotator {folder} cannot be loaded ({e}); replace "
                           f"{', '.join(ANNOTATOR_FILES)} with intact copies (from lllyasviel/Annotators)") from e

    def detect(image: Image.Image) -> list[np.ndarray]:
        arr = np.asarray(image.convert("RGB"))
        h, w = arr.shape[:2]
        out = []
        for pose in model.detect_poses(arr):
            kp = np.full((N_POINTS, 3), np.nan)
            for i, p in enumerate(pose.body.keypoints[:N_POINTS]):
                if p is not None:
                    kp[i] = (p.x * w, p.y * h, p.score)  # controlnet-aux gives x, y in 0..1
            out.append(kp)
        return out

    return detect


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def prepare_poses(out: Path, options: PoseOptions, detector: Detector | None = None) -> dict:
    """Detect, filter, normalise and cluster the poses of the images in `out` (a prepared dataset).

    Writes poses/<stem>.png (pose map), poses/<stem>.txt (`pose cluster N`), poses/cluster_N.png
    (contact sheet), poses.json and poses.html. Images without a confident pose get none."""
    out = Path(out)
    if detector is None:
        detector = openpose_detector(check_annotator(options.annotator))
    if options.clusters is not None and options.clusters < 1:
        raise PrepareError(f"--clusters {options.clusters} must be at least 1")
    images = sorted(p for p in out.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    records, kept, maps = [], [], []
    for path in images:
        with Image.open(path) as im:
            image = im.convert("RGB")
        det, conf = best_detection(detector(image), options.min_confidence)
        rec = {"name": path.name, "confidence": round(conf, 4), "cluster": None, "reason": None}
        records.append(rec)
        norm = normalize_keypoints(det) if det is not None else None
        if det is None:
            rec["reason"] = f"no pose with confidence >= {options.min_confidence} (best {conf:.2f})"
        elif norm is None:
            rec["reason"] = "pose lacks the neck or both hips (cannot normalise)"
        else:
            kept.append((rec, path, norm))
            maps.append(draw_pose_map(det, image.size))
    k, scores = 0, {}
    if kept:
        labels, k, scores = cluster_poses(features([n for _, _, n in kept]), options.clusters,
                                          k_range=options.k_range, seed=options.seed)
        pdir = out / "poses"
        pdir.mkdir(exist_ok=True)
        for (rec, path, _), label, pose_map in zip(kept, labels, maps):
            rec["cluster"] = int(label)
            atomic_write_bytes(pdir / f"{path.stem}.png", _png(pose_map))
            atomic_write_text(pdir / f"{path.stem}.txt", f"pose cluster {int(label)}\n")
        for c in range(k):
            members = [m for (_, _, _), m, lab in zip(kept, maps, labels) if lab == c]
            if members:
                atomic_write_bytes(pdir / f"cluster_{c}.png", _png(contact_sheet(members)))
    clusters = [{"id": c, "sheet": f"poses/cluster_{c}.png",
                 "members": [r["name"] for r in records if r["cluster"] == c]} for c in range(k)]
    summary = {"options": {"annotator": str(options.annotator) if options.annotator else None,
                           "clusters": options.clusters, "min_confidence": options.min_confidence},
               "k": k, "silhouette": {str(kk): round(v, 4) for kk, v in scores.items()},
               "counts": {"images": len(records), "posed": len(kept), "no_pose": len(records) - len(kept)},
               "clusters": clusters, "files": records}
    atomic_write_text(out / "poses.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "poses.html", Environment(autoescape=True).from_string(HTML).render(s=summary))
    return summary


HTML = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Pose clusters</title>
<style>body{font-family:system-ui,sans-serif;margin:2rem}img{max-width:100%;background:#222}.warn{color:#a60}</style>
</head><body><h1>Pose clusters</h1>
<p>{{ s.counts.posed }} of {{ s.counts.images }} images have a confident pose; k = {{ s.k }}
{% if s.silhouette %}(silhouette: {% for k, v in s.silhouette.items() %}k={{ k }}: {{ v }}{% if not loop.last %}, {% endif %}{% endfor %}){% endif %}</p>
{% for c in s.clusters %}<h2>pose cluster {{ c.id }} ({{ c.members|length }})</h2>
<p>{{ c.members|join(", ") }}</p><img src="{{ c.sheet }}" alt="contact sheet of pose cluster {{ c.id }}">
{% endfor %}
{% set unposed = s.files|selectattr("cluster", "none")|list %}{% if unposed %}<h2>No pose</h2><ul>
{% for f in unposed %}<li class="warn">{{ f.name }}: {{ f.reason }}</li>{% endfor %}</ul>{% endif %}
</body></html>
"""
