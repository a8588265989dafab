"""Detectors of the detail pass (renderer/passes.py): where is the character in an image?

Only one detector exists: `toy`, for the toy world's images (docs/TOYWORLD.md). The toy world's
rule is that a character's body is painted in a saturated colour that no scene uses: scenes are
pastel, grey, pale or very dark, except the turquoise sea and the light-blue sky (see `COLOURS` and
`SCENE_PALETTES` in toyworld/world.py; toyworld/checker.py finds the body by the nearest named
colour). The renderer may not import toyworld (the import layers forbid it), so the rule is
restated here in HSV terms, with scikit-image and scipy.ndimage:

- saturation >= 0.45 and value >= 0.35 (pastels, greys, the pale sun and sand, and the dark
  night sky fail this);
- hue outside 170-215 degrees (the sea at 185 and the high sky at 206 are saturated but cyan;
  the blue body colour sits at 228, the nearest body colours to cyan are green at 130 and blue);
- the largest connected component, holes filled (the white sclera and the dark mouth sit inside).

`tests/test_passes.py` checks this mask against the checker's body on generated toy images.
A detector model file (e.g. a face or person segmentation model) is refused in the spec
(schemas/passes.py `Detail`), not silently ignored.
"""

from __future__ import annotations

import numpy as np

MIN_SATURATION = 0.45
MIN_VALUE = 0.35
CYAN_HUES = (170 / 360, 215 / 360)
MIN_PIXELS_FRACTION = 0.005  # a component smaller than 0.5 % of the image is no character


def toy_character_mask(image) -> np.ndarray | None:
    """Boolean mask (H, W) of the toy character's filled body in a PIL image, or None if none is found."""
    from scipy import ndimage
    from skimage.color import rgb2hsv

    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    hsv = rgb2hsv(rgb)
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    body = (sat >= MIN_SATURATION) & (val >= MIN_VALUE) & ~((hue >= CYAN_HUES[0]) & (hue <= CYAN_HUES[1]))
    labels, n = ndimage.label(body)
    if n == 0:
        return None
    sizes = ndimage.sum(body, labels, index=np.arange(1, n + 1))
    best = int(np.argmax(sizes))
    if sizes[best] < MIN_PIXELS_FRACTION * body.size:
        return None
    return ndimage.binary_fill_holes(labels == best + 1)


def detect(detector: str, image) -> np.ndarray | None:
    if detector != "toy":  # the spec refuses other detectors; this guards direct callers
        raise ValueError(f"detector {detector!r} is not supported; only `toy`")
    return toy_character_mask(image)


def box_with_padding(mask: np.ndarray, padding: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the mask's bounding box grown by `padding`, inside the image."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return (max(0, int(xs.min()) - padding), max(0, int(ys.min()) - padding),
            min(w, int(xs.max()) + 1 + padding), min(h, int(ys.max()) + 1 + padding))
