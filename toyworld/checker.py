"""Pixel checker for toy-world images: which character, face and scene does an image show?

Purely procedural (numpy/scipy/scikit-image, no learned model), so it can judge a neural
model's 64x64 outputs against the prompt that asked for them:

1. background: each border pixel votes for the scene whose palette holds its nearest colour (CIELAB);
2. body: pixels nearest a body colour (vs. that scene's palette, sclera and mouth colours), largest
   connected component; colour = named colour nearest the component's median core colour;
3. shape (`toyworld.shapes`): the filled silhouette's radial signature r(theta) around its centroid;
   rotation-invariant Fourier magnitudes + solidity, nearest to templates drawn from the generator's
   own outlines; the phase of the shape's symmetry harmonic gives the tilt;
4. face: in the body's own frame (centroid, scale, tilt), pixels are unmixed linearly in RGB into
   body colour + mouth colour (expression: none / arc curving up or down / round "O") and into
   body + sclera + iris colour (eye colour: the iris that explains the eye pixels best).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import color

from core.jsonl import read_jsonl
from toyworld import world as tw
from toyworld.geometry import FACE
from toyworld.shapes import SYMMETRY, classify_shape

ATTRIBUTES = ("colour", "shape", "expression", "background", "eyes")
ALL_THREE = ("colour", "shape", "background")
# A toy character's identity is its body colour and shape (the eyes are a few pixels at 64x64
# and are read less reliably): the "hit rate" of a character LoRA.
IDENTITY = ("colour", "shape")


# --- colour space -----------------------------------------------------------------------------


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0..255, any leading shape, last axis 3) -> CIELAB (D65), by scikit-image."""
    return color.rgb2lab(np.asarray(rgb, dtype=np.float64) / 255.0)


def _nearest(lab: np.ndarray, palette_lab: np.ndarray) -> np.ndarray:
    d = ((lab[..., None, :] - palette_lab) ** 2).sum(-1)
    return d.argmin(-1)


# --- the classifier -----------------------------------------------------------------------------

_BODY_NAMES = list(tw.COLOURS)
_BODY_LAB = rgb_to_lab(np.array([tw.COLOURS[c] for c in _BODY_NAMES]))
_SCENE_ENTRIES = [(scene, name, rgb) for scene, pal in tw.SCENE_PALETTES.items() for name, rgb in pal.items()]
_SCENE_LAB = rgb_to_lab(np.array([rgb for _, _, rgb in _SCENE_ENTRIES]))
_BORDER = 3


@dataclass(frozen=True)
class Prediction:
    background: str
    colour: str | None
    shape: str | None
    expression: str | None
    eyes: str | None
    tilt: float | None = None
    radius: float | None = None

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("colour", "shape", "expression", "background", "eyes", "tilt", "radius")}


def _classify_background(lab: np.ndarray) -> str:
    b = _BORDER
    border = np.concatenate([lab[:b].reshape(-1, 3), lab[-b:].reshape(-1, 3),
                             lab[b:-b, :b].reshape(-1, 3), lab[b:-b, -b:].reshape(-1, 3)])
    # Body colours join the vote as "none of the scenes", so a character near the edge abstains.
    pal = np.concatenate([_SCENE_LAB, _BODY_LAB])
    idx = _nearest(border, pal)
    votes = {s: 0 for s in tw.BACKGROUNDS}
    for i in idx[idx < len(_SCENE_ENTRIES)]:
        votes[_SCENE_ENTRIES[i][0]] += 1
    return max(tw.BACKGROUNDS, key=lambda s: votes[s])


def _segment_fit(pixels: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best mix t*b + (1-t)*a, t in [0, 1], per pixel: (t, residual norm)."""
    d = b - a
    t = np.clip(((pixels - a) @ d) / max(float(d @ d), 1e-9), 0, 1)
    return t, np.linalg.norm(pixels - a - t[:, None] * d, axis=1)


def _unmix(pixels: np.ndarray, endmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel convex weights over 2 or 3 endmembers (exact projection onto the simplex) and residuals.

    Mixing is linear in sRGB values because the generator box-filters and blur averages them.
    """
    m = len(endmembers)
    if m == 2:
        t, resid = _segment_fit(pixels, endmembers[0], endmembers[1])
        return np.stack([1 - t, t], 1), resid
    assert m == 3, "unmixing supports 2 or 3 endmembers"
    # Interior solution (affine least squares), then the three edges; keep the best valid one.
    e0 = endmembers[0]
    basis = (endmembers[1:] - e0).T
    coef, *_ = np.linalg.lstsq(basis, (pixels - e0).T, rcond=None)
    coef = coef.T
    w_in = np.concatenate([1 - coef.sum(1, keepdims=True), coef], 1)
    valid = (w_in >= 0).all(1)
    r_in = np.where(valid, np.linalg.norm(pixels - w_in @ endmembers, axis=1), np.inf)
    best_w, best_r = w_in, r_in
    for i, j in ((0, 1), (0, 2), (1, 2)):
        t, r = _segment_fit(pixels, endmembers[i], endmembers[j])
        w = np.zeros((len(pixels), 3))
        w[:, i], w[:, j] = 1 - t, t
        better = r < best_r
        best_w = np.where(better[:, None], w, best_w)
        best_r = np.where(better, r, best_r)
    return best_w, best_r


def classify(image: Image.Image | np.ndarray) -> Prediction:
    """Attributes of one toy-world image read from its pixels."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    lab = rgb_to_lab(rgb)
    # 1. scene from the border
    background = _classify_background(lab)
    # 2. body: pixels nearer a body colour than this scene's colours, sclera or mouth
    scene_lab = rgb_to_lab(np.array(list(tw.SCENE_PALETTES[background].values())))
    extra_lab = rgb_to_lab(np.array([tw.SCLERA, tw.MOUTH]))
    idx = _nearest(lab, np.concatenate([_BODY_LAB, scene_lab, extra_lab]))
    candidate = idx < len(_BODY_NAMES)
    labels, n = ndimage.label(candidate)
    if n == 0:
        return Prediction(background, None, None, None, None)
    sizes = ndimage.sum(candidate, labels, index=np.arange(1, n + 1))
    body = labels == (int(np.argmax(sizes)) + 1)
    if body.sum() < 20:
        return Prediction(background, None, None, None, None)
    core = ndimage.binary_erosion(body, iterations=1)
    core = core if core.sum() >= 8 else body
    body_rgb = np.median(rgb[core], axis=0)
    colour = _BODY_NAMES[int(_nearest(rgb_to_lab(body_rgb), _BODY_LAB))]
    filled = ndimage.binary_fill_holes(ndimage.binary_closing(body, iterations=1)) | body
    # 3. shape, tilt and scale from the silhouette
    sh = classify_shape(filled)
    if sh is None:
        return Prediction(background, colour, None, None, None)
    shape, tilt, radius = sh
    if SYMMETRY[shape] == 0:
        tilt = _tilt_from_eyes(rgb, filled, radius)
    # 4. face, in the body's own unit frame
    ys, xs = np.nonzero(filled)
    cy, cx = ys.mean(), xs.mean()
    a = np.radians(tilt)
    dx, dy = xs - cx, ys - cy
    u = (dx * np.cos(a) + dy * np.sin(a)) / radius
    v = (-dx * np.sin(a) + dy * np.cos(a)) / radius
    pix = rgb[ys, xs]
    # Face features sit well inside the outline; pixels near it mix body and scene (which, for a
    # light body on a dark scene, looks like a dark mouth), so they are left out of the mouth.
    inner = ndimage.distance_transform_edt(filled)[ys, xs] > 1.5
    expression = _classify_mouth(pix, u, v, body_rgb, shape, radius, inner)
    eyes = _classify_eyes(pix, u, v, body_rgb, shape)
    return Prediction(background, colour, shape, expression, eyes, round(tilt, 1), round(radius, 2))


def _tilt_from_eyes(rgb: np.ndarray, filled: np.ndarray, radius: float) -> float:
    """Tilt of a round body from the line through its two sclera (white) blobs; 0 if unclear."""
    ys, xs = np.nonzero(filled)
    cy, cx = ys.mean(), xs.mean()
    white = filled & (rgb.min(-1) > 200)
    wy, wx = np.nonzero(white & (np.arange(rgb.shape[0])[:, None] < cy))
    if len(wy) < 4:
        return 0.0
    left, right = wx < cx, wx >= cx
    if left.sum() < 2 or right.sum() < 2:
        return 0.0
    ddx = wx[right].mean() - wx[left].mean()
    ddy = wy[right].mean() - wy[left].mean()
    return float(np.clip(np.degrees(np.arctan2(ddy, ddx)), -20, 20))


def _classify_mouth(pix, u, v, body_rgb, shape, radius, inner) -> str:
    edx, ey, er, my, mw = FACE[shape]
    region = inner & (v > ey + er * 1.1 + 0.04) & (v < my + mw * 1.3) & (np.abs(u) < mw * 1.6)
    if region.sum() < 3:
        return "neutral"
    w, _ = _unmix(pix[region], np.array([body_rgb, tw.MOUTH], dtype=float))
    m = np.clip((w[:, 1] - 0.2) / 0.8, 0, 1)  # mouth weight; the offset ignores noise
    total = m.sum()
    # Smallest real mouth is the round "O" (area 0.94 mw^2 in unit coordinates).
    if total < 0.3 * 0.94 * mw**2 * radius**2:
        return "neutral"
    uu, vv = u[region], v[region]
    mu, mv = (m * uu).sum() / total, (m * vv).sum() / total
    su = np.sqrt((m * (uu - mu) ** 2).sum() / total)
    sv = np.sqrt((m * (vv - mv) ** 2).sum() / total)
    if su < 1.4 * sv:  # a round "O"
        return "surprised"
    # Arc curvature: is the middle of the mouth below (smile) or above (frown) its ends?
    centre = np.abs(uu - mu) < su * 0.8
    if m[centre].sum() == 0 or m[~centre].sum() == 0:
        return "neutral"
    mid = (m[centre] * vv[centre]).sum() / m[centre].sum()
    ends = (m[~centre] * vv[~centre]).sum() / m[~centre].sum()
    return "happy" if mid > ends else "sad"


def _classify_eyes(pix, u, v, body_rgb, shape) -> str | None:
    edx, ey, er, my, mw = FACE[shape]
    centre = np.zeros(len(u), bool)
    ring = np.zeros(len(u), bool)
    for sx in (-edx, edx):
        d_iris = np.hypot(u - sx, v - (ey + er * 0.1))
        centre |= d_iris < er * 0.45
        ring |= np.hypot(u - sx, v - ey) < er * 1.3
    ring &= ~centre
    if centre.sum() < 2:
        return None
    sclera = np.array(tw.SCLERA, dtype=float)

    def score(c: np.ndarray) -> float:
        # The iris centre is ringed by sclera, so no body colour belongs there; the ring may mix all three.
        _, rc = _unmix(pix[centre], np.stack([sclera, c]))
        _, rr = _unmix(pix[ring], np.stack([body_rgb, sclera, c])) if ring.any() else (None, np.zeros(0))
        return float((rc**2).sum() + (rr**2).sum()) / (centre.sum() + ring.sum())

    scores = {name: score(np.array(c, dtype=float)) for name, c in tw.EYE_COLOURS.items()}
    best = min(scores, key=scores.get)
    if score(np.asarray(body_rgb, dtype=float)) < scores[best] - _IRIS_GAIN_MIN:
        # The body colour itself explains the eyes better than any named iris: a body-coloured iris.
        names = list(tw.EYE_COLOURS)
        eye_lab = rgb_to_lab(np.array([tw.EYE_COLOURS[n] for n in names]))
        return names[int(_nearest(rgb_to_lab(body_rgb), eye_lab))]
    return best


# How much better (mean squared RGB residual) the body colour must explain the eyes than the best
# named iris before the iris counts as body-coloured.
_IRIS_GAIN_MIN = 50.0


# --- datasets and scoring ---------------------------------------------------------------------

_CHECK_SIZE = 64  # the checker's thresholds are set at the toy model's resolution


@dataclass(frozen=True)
class Item:
    name: str
    image: Path
    expected: dict  # attribute -> value, only the attributes the prompt/caption/label names


def classify_file(path: Path) -> Prediction:
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (_CHECK_SIZE, _CHECK_SIZE):
            im = im.resize((_CHECK_SIZE, _CHECK_SIZE), Image.Resampling.BOX)
        return classify(im)


def _expected_for_job(job: dict) -> dict:
    exp = tw.parse_attributes(job.get("prompt", ""))
    char = job.get("character")
    if char in tw.CHARACTERS:
        c, s, e = tw.CHARACTERS[char]
        exp = {"colour": c, "shape": s, "eyes": e} | exp
    return exp


def load_items(path: Path) -> list[Item]:
    """Images with the attributes they were meant to show.

    ``path`` is a run directory (``plan.jsonl`` + ``manifest.jsonl``: the prompt names the
    attributes), a generated dataset (``labels.jsonl``) or a folder of ``name.png`` + ``name.txt``.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"toyworld eval: {path} is not a directory; pass a run directory or an image folder.")
    if (path / "plan.jsonl").exists():
        if not (path / "manifest.jsonl").exists():
            raise ValueError(f"{path} has plan.jsonl but no manifest.jsonl: the run never finished a job.")
        plan = {row["key"]: row for row in read_jsonl(path / "plan.jsonl")}
        finished = {}
        for row in read_jsonl(path / "manifest.jsonl"):  # later lines win (a resumed run)
            if row.get("status") in ("rendered", "cached") and row.get("image"):
                finished[row["key"]] = row
        items = []
        for key, job in plan.items():
            if key in finished:
                items.append(Item(job.get("name", key), path / finished[key]["image"], _expected_for_job(job)))
        return items
    if (path / "labels.jsonl").exists():
        return [
            Item(r["name"], path / f"{r['name']}.png", {k: r[k] for k in ATTRIBUTES if k in r})
            for r in read_jsonl(path / "labels.jsonl")
        ]
    items = []
    for png in sorted(path.glob("*.png")):
        txt = png.with_suffix(".txt")
        if txt.exists():
            items.append(Item(png.stem, png, tw.parse_attributes(txt.read_text())))
    if not items:
        raise ValueError(
            f"toyworld eval: {path} has no plan.jsonl, no labels.jsonl and no name.png + name.txt pairs; "
            "pass a run directory, a `castbook toyworld generate` folder or a captioned image folder."
        )
    return items


def evaluate(images_with_labels: Iterable[tuple[Image.Image | np.ndarray | Path, dict]], keep_items: bool = False) -> dict:
    """Per-attribute accuracy of the checker's reading against the expected attributes.

    Each element is ``(image or image path, expected)`` where ``expected`` holds any of
    colour, shape, expression, background, eyes. An attribute is scored only on images whose
    expectation names it; ``identity`` needs colour and shape, ``all_three`` colour, shape and
    background, all named and right.
    Returns ``{"count", "attributes": {name: {"correct", "total", "accuracy"}}, "errors", ["items"]}``.
    """
    names = (*ATTRIBUTES, "identity", "all_three")
    correct = {k: 0 for k in names}
    total = {k: 0 for k in names}
    errors, items = [], []
    count = 0
    for i, (image, expected) in enumerate(images_with_labels):
        count += 1
        name = str(expected.get("name", image if isinstance(image, Path) else i))
        pred = classify_file(image) if isinstance(image, (str, Path)) else classify(
            image.convert("RGB").resize((_CHECK_SIZE, _CHECK_SIZE), Image.Resampling.BOX)
            if isinstance(image, Image.Image) and image.size != (_CHECK_SIZE, _CHECK_SIZE) else image)
        got = pred.as_dict()
        wrong = {}
        for k in ATTRIBUTES:
            if expected.get(k) is not None:
                total[k] += 1
                if got[k] == expected[k]:
                    correct[k] += 1
                else:
                    wrong[k] = {"expected": expected[k], "predicted": got[k]}
        for combined, parts in (("identity", IDENTITY), ("all_three", ALL_THREE)):
            if all(expected.get(k) is not None for k in parts):
                total[combined] += 1
                correct[combined] += all(got[k] == expected[k] for k in parts)
        if wrong:
            errors.append({"name": name, "wrong": wrong})
        if keep_items:
            items.append({"name": name, "expected": {k: expected.get(k) for k in ATTRIBUTES}, "predicted": got})
    out = {
        "count": count,
        "attributes": {
            k: {"correct": correct[k], "total": total[k], "accuracy": (correct[k] / total[k]) if total[k] else None}
            for k in names
        },
        "errors": errors,
    }
    if keep_items:
        out["items"] = items
    return out


def evaluate_path(path: Path, keep_items: bool = False, by_job: bool = False) -> dict:
    """``evaluate`` over ``load_items(path)``. ``by_job``: also one result per job matrix of a
    run directory (the first part of each image name), under ``"by_job"``."""
    items = load_items(path)
    missing = [it.image for it in items if not it.image.exists()]
    if missing:
        raise ValueError(f"toyworld eval: {len(missing)} image(s) listed but missing, e.g. {missing[0]}.")
    out = evaluate(((it.image, {"name": it.name, **it.expected}) for it in items), keep_items=keep_items)
    if by_job:
        groups: dict[str, list[Item]] = {}
        for it in items:
            groups.setdefault(it.name.split("/", 1)[0], []).append(it)
        out["by_job"] = {job: evaluate((it.image, {"name": it.name, **it.expected}) for it in group)
                         for job, group in sorted(groups.items())}
    return out


def accuracy_row(result: dict) -> dict:
    """`{attribute: accuracy}` of an `evaluate` result."""
    return {k: v["accuracy"] for k, v in result["attributes"].items()}


def format_table(result: dict) -> str:
    """Plain-text accuracy table, one row per attribute."""
    lines = [f"{'attribute':<12} {'accuracy':>9} {'correct':>8} {'total':>6}"]
    for k, v in result["attributes"].items():
        acc = "-" if v["accuracy"] is None else f"{100 * v['accuracy']:.1f}%"
        lines.append(f"{k:<12} {acc:>9} {v['correct']:>8} {v['total']:>6}")
    lines.append(f"{result['count']} image(s); {len(result['errors'])} with at least one wrong attribute")
    return "\n".join(lines)
