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

The other detector is a local folder holding a transformers object-detection model (YOLOS, DETR,
RT-DETR, ... saved with `save_pretrained`: config.json, model.safetensors,
preprocessor_config.json), the kind of face or person detector ADetailer uses, in the format
castbook can load safely (Ultralytics `.pt` detectors are pickles). It runs through
`AutoModelForObjectDetection` and the processor's own `post_process_object_detection`; the best
box of the asked label above `confidence` becomes the mask (a box detector has no outline).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.errors import JobError

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


def detect(detail, image, root: Path | None = None) -> np.ndarray | None:
    """Mask of what the detail pass re-renders (a `schemas.passes.ResolvedDetail`), or None."""
    if detail.detector == "toy":
        return toy_character_mask(image)
    return model_box_mask(Path(root or ".") / detail.detector, image, detail.label, detail.confidence)


_DETECTORS: dict[str, tuple] = {}  # folder -> (model, processor): loaded once per process


def _load_detector(folder: Path):
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    from renderer.models import check_diffusers_folder

    key = str(folder.resolve())
    if key not in _DETECTORS:
        check_diffusers_folder(folder, "detector")  # exists, has config.json, safetensors weights only
        try:
            model = AutoModelForObjectDetection.from_pretrained(folder, local_files_only=True, use_safetensors=True)
            processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise JobError(f"detector folder {folder} is not a transformers object-detection model ({e}); it needs "
                           "config.json, model.safetensors and preprocessor_config.json") from e
        _DETECTORS[key] = (model.eval(), processor)
    return _DETECTORS[key]


def model_box_mask(folder: Path, image, label: str | None, confidence: float) -> np.ndarray | None:
    """Boolean mask of the best box of `label` (any label when None) scored at least `confidence`."""
    import torch

    model, processor = _load_detector(Path(folder))
    names = {int(i): str(n) for i, n in model.config.id2label.items()}
    if label is not None and label not in names.values():
        raise JobError(f"detector {folder} has no class {label!r}; its classes: {', '.join(sorted(names.values()))}")
    rgb = image.convert("RGB")
    with torch.no_grad():
        outputs = model(**processor(images=rgb, return_tensors="pt"))
    found = processor.post_process_object_detection(outputs, threshold=confidence,
                                                    target_sizes=[(rgb.height, rgb.width)])[0]
    best = None
    for score, class_id, box in zip(found["scores"].tolist(), found["labels"].tolist(), found["boxes"].tolist()):
        if (label is None or names.get(int(class_id)) == label) and (best is None or score > best[0]):
            best = (score, box)
    if best is None:
        return None
    left, top, right, bottom = (int(round(v)) for v in best[1])
    mask = np.zeros((rgb.height, rgb.width), dtype=bool)
    mask[max(0, top):max(0, bottom), max(0, left):max(0, right)] = True
    return mask if mask.any() else None


def box_with_padding(mask: np.ndarray, padding: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the mask's bounding box grown by `padding`, inside the image."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return (max(0, int(xs.min()) - padding), max(0, int(ys.min()) - padding),
            min(w, int(xs.max()) + 1 + padding), min(h, int(ys.max()) + 1 + padding))
