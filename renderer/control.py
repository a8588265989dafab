"""Control images: load, optionally preprocess with a controlnet-aux detector, resize to the job.

`preprocess: false` uses the image as the control map as it is. `preprocess: true` runs a
detector. Canny needs no weights. The others need annotator checkpoints, which are
PICKLE files (`.pth`/`.pt`): castbook loads them only from the folder the user configured
(`annotator: DIR`, a trusted local folder) and never downloads them. If a file is missing,
the error says which file and where to put it.

controlnet_aux is imported lazily: importing it loads every detector (seconds).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

from core.errors import JobError
from schemas import annotators

CONTROL_TYPES = ("pose", "depth", "canny", "seg", "normal")

# The detector table (class, files, types) lives in schemas/annotators.py, shared with the plan
# (digests, missing-file check) and with `dataset prepare --poses`.
DETECTORS = annotators.DETECTORS
ANNOTATOR_SOURCE = annotators.ANNOTATOR_SOURCE
# Neural detectors run at the job's size (rounded up to 64), capped at controlnet-aux's default
# 512: the map is resized to the job anyway, and a tiny job need not pay for a 512 px detection.
# The size follows from the job's width and height, which are in the job key.
MAX_DETECT_RESOLUTION = 512


def control_map_name(image_digest: str, detector: str, params: dict, width: int, height: int,
                     weights_digest: str | None = None) -> str:
    """A stable file name for a preprocessed map: `<digest16>-<detector>-<params8>-<W>x<H>.png`.

    `params8` also covers the annotator weights' digest when the detector has weights (only then,
    so the names of weight-free maps such as canny never change)."""
    text = json.dumps(params, sort_keys=True) + (f"\n{weights_digest}" if weights_digest else "")
    p = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{image_digest[:16]}-{detector}-{p}-{width}x{height}.png"


def detect_resolution(width: int, height: int) -> int:
    """Input size for neural detectors: the job's longer side rounded up to 64, at most 512."""
    return min(MAX_DETECT_RESOLUTION, -(-max(width, height) // 64) * 64)


class ControlPreparer:
    """Turns a job's controls into PIL control maps; caches detectors and maps in memory.

    Maps are cached by (image digest, detector, annotator weights digest, params, size); loaded
    detectors by (detector, folder, weights digest), so replacing a weight file reloads it."""

    def __init__(self, root: Path, max_cached_maps: int = 64):
        self.root = Path(root)
        self.maps: OrderedDict[tuple, object] = OrderedDict()
        self.detectors: dict[tuple, object] = {}
        self.max_cached_maps = max_cached_maps
        self.stats = {"preprocess_runs": 0, "map_cache_hits": 0, "detector_loads": 0}

    def prepare(self, control, width: int, height: int):
        """Return (map image, file name or None). The name is set only for preprocessed maps."""
        from PIL import Image

        if control.type not in CONTROL_TYPES:
            raise JobError(f"control type {control.type!r} is not one of {', '.join(CONTROL_TYPES)}")
        path = self.root / control.image
        if not path.is_file():
            raise JobError(f"{control.type} control image {control.image} does not exist (paths are relative to the project root)")
        if not control.preprocess:
            return self._open(path).resize((width, height), Image.BICUBIC), None
        params = dict(control.detector_params)
        weights = self._weights_digest(control)
        key = (control.image_digest, control.detector, weights, json.dumps(params, sort_keys=True), width, height)
        name = control_map_name(control.image_digest, control.detector, params, width, height, weights)
        if key in self.maps:
            self.maps.move_to_end(key)
            self.stats["map_cache_hits"] += 1
            return self.maps[key], name
        detector = self._detector(control, weights)
        call = dict(params)
        if annotators.needs_weights(control.detector):
            res = detect_resolution(width, height)
            call = {"detect_resolution": res, "image_resolution": res, **call}
        try:
            out = self._run(detector, control, self._open(path), call)
        except TypeError as e:
            raise JobError(f"{control.type} control: detector {control.detector!r} rejected detector_params {params}: {e}") from e
        out = out.convert("RGB").resize((width, height), Image.BICUBIC)
        self.stats["preprocess_runs"] += 1
        self.maps[key] = out
        while len(self.maps) > self.max_cached_maps:
            self.maps.popitem(last=False)
        return out, name

    @staticmethod
    def _run(detector, control, image, call: dict):
        import numpy as np

        if control.detector != "sam":
            return detector(image, output_type="pil", **call)
        generator = detector.mask_generator
        if "points_per_side" in call:  # SAM's own generator class, on the same loaded network
            from controlnet_aux.segment_anything import SamAutomaticMaskGenerator

            generator = SamAutomaticMaskGenerator(generator.predictor.model, points_per_side=call["points_per_side"])
        # SamDetector colours each mask with np.random: seed it from the image so a map (and the
        # pixels rendered from it) is reproducible, and restore the global state afterwards.
        state = np.random.get_state()
        np.random.seed(int(control.image_digest[:8], 16))
        try:
            # SamDetector.__call__ = generate + show_anns + resize; called in two steps here because
            # show_anns returns None when no mask passes the thresholds, and __call__ then crashes.
            from PIL import Image

            masks = generator.generate(_resized(image, call["detect_resolution"]))
            return Image.fromarray(detector.show_anns(masks)) if masks else Image.new("RGB", image.size)
        finally:
            np.random.set_state(state)

    def _weights_digest(self, control) -> str | None:
        """The annotator digest computed at the edge (the plan), else computed here once per folder."""
        if getattr(control, "annotator_digest", None):
            return control.annotator_digest
        if not annotators.needs_weights(control.detector) or not control.annotator_dir:
            return None
        folder = self.root / control.annotator_dir
        key = ("digest", control.detector, str(folder))
        if key not in self.detectors:
            self.detectors[key] = annotators.weights_digest(control.detector, folder)
        return self.detectors[key]

    @staticmethod
    def _open(path: Path):
        from PIL import Image

        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except Exception as e:
            raise JobError(f"control image {path} cannot be read as an image: {e}") from e

    def _detector(self, control, weights_digest: str | None):
        name = control.detector
        if name not in DETECTORS:
            why = f" ({annotators.UNSUPPORTED[name]})" if name in annotators.UNSUPPORTED else ""
            raise JobError(f"{control.type} control: unknown detector {name!r}{why}; known detectors: {', '.join(DETECTORS)}")
        det = DETECTORS[name]
        ann = self.root / control.annotator_dir if control.annotator_dir else None
        weights = None
        if det.weights:
            weights = annotators.find_weights(name, ann)
            if weights is None:
                raise JobError(annotators.missing_message(name, ann, f"{control.type} control"))
        key = (name, str(ann), weights_digest)
        if key not in self.detectors:
            import controlnet_aux  # lazy: seconds to import

            cls = getattr(controlnet_aux, det.cls)
            try:
                # Only ever a local folder (never a hub id): these are pickles, trusted because the user chose the folder.
                self.detectors[key] = cls() if weights is None else cls.from_pretrained(str(ann), **weights.kwargs)
            except Exception as e:
                files = ", ".join(weights.files) if weights else ""
                raise JobError(
                    f"{control.type} control: could not load detector {name!r} from {ann} ({type(e).__name__}: {e}); "
                    f"{files} must be the original annotator file(s) from {det.source}"
                ) from e
            self.stats["detector_loads"] += 1
        return self.detectors[key]


def _resized(image, resolution: int):
    """The image as controlnet-aux's SamDetector feeds it to the mask generator."""
    import numpy as np
    from controlnet_aux.util import HWC3, resize_image

    return resize_image(HWC3(np.asarray(image, dtype=np.uint8)), resolution)
