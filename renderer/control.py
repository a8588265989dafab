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

CONTROL_TYPES = ("pose", "depth", "canny", "seg", "normal")

# detector -> (controlnet_aux class, annotator files needed in annotator_dir, types it serves)
DETECTORS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "canny": ("CannyDetector", (), ("canny",)),
    "openpose": ("OpenposeDetector", ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"), ("pose",)),
    "midas": ("MidasDetector", ("dpt_hybrid-midas-501f0c75.pt",), ("depth",)),
    "zoe": ("ZoeDetector", ("ZoeD_M12_N.pt",), ("depth",)),
    "normalbae": ("NormalBaeDetector", ("scannet.pt",), ("normal",)),
    "sam": ("SamDetector", ("sam_vit_h_4b8939.pth",), ("seg",)),
}
ANNOTATOR_SOURCE = "https://huggingface.co/lllyasviel/Annotators (files at the top level of that repository)"


def control_map_name(image_digest: str, detector: str, params: dict, width: int, height: int) -> str:
    """A stable file name for a preprocessed map: `<digest16>-<detector>-<params8>-<W>x<H>.png`."""
    p = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    return f"{image_digest[:16]}-{detector}-{p}-{width}x{height}.png"


class ControlPreparer:
    """Turns a job's controls into PIL control maps; caches detectors and maps in memory."""

    def __init__(self, root: Path, max_cached_maps: int = 64):
        self.root = Path(root)
        self.maps: OrderedDict[tuple, object] = OrderedDict()
        self.detectors: dict[tuple, object] = {}
        self.max_cached_maps = max_cached_maps
        self.stats = {"preprocess_runs": 0, "map_cache_hits": 0}

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
        key = (control.image_digest, control.detector, json.dumps(params, sort_keys=True), width, height)
        name = control_map_name(control.image_digest, control.detector, params, width, height)
        if key in self.maps:
            self.maps.move_to_end(key)
            self.stats["map_cache_hits"] += 1
            return self.maps[key], name
        detector = self._detector(control)
        try:
            out = detector(self._open(path), output_type="pil", **params)
        except TypeError as e:
            raise JobError(f"{control.type} control: detector {control.detector!r} rejected detector_params {params}: {e}") from e
        out = out.convert("RGB").resize((width, height), Image.BICUBIC)
        self.stats["preprocess_runs"] += 1
        self.maps[key] = out
        while len(self.maps) > self.max_cached_maps:
            self.maps.popitem(last=False)
        return out, name

    @staticmethod
    def _open(path: Path):
        from PIL import Image

        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except Exception as e:
            raise JobError(f"control image {path} cannot be read as an image: {e}") from e

    def _detector(self, control):
        name = control.detector
        if name not in DETECTORS:
            raise JobError(
                f"{control.type} control: unknown detector {name!r}; known detectors: {', '.join(DETECTORS)}"
            )
        cls_name, files, _types = DETECTORS[name]
        ann = None
        if files:
            if not control.annotator_dir:
                raise JobError(self._missing_message(control, files, None))
            ann = self.root / control.annotator_dir
            missing = [f for f in files if not (ann / f).is_file()]
            if missing:
                raise JobError(self._missing_message(control, missing, ann))
        key = (name, str(ann))
        if key not in self.detectors:
            import controlnet_aux  # lazy: seconds to import

            cls = getattr(controlnet_aux, cls_name)
            try:
                # Only ever a local folder (never a hub id): these are pickles, trusted because the user chose the folder.
                self.detectors[key] = cls() if not files else cls.from_pretrained(str(ann))
            except Exception as e:
                raise JobError(f"{control.type} control: could not load detector {name!r} from {ann}: {type(e).__name__}: {e}") from e
        return self.detectors[key]

    @staticmethod
    def _missing_message(control, files, ann) -> str:
        where = f"in {ann}" if ann else "in an annotator folder (none is configured)"
        return (
            f"{control.type} control needs annotator weights {', '.join(files)} {where}; "
            f"download them from {ANNOTATOR_SOURCE}, put them in a local folder and set `annotator: DIR` "
            f"on the control (or use `preprocess: false` with a ready-made {control.type} map). "
            f"These are pickle files: castbook loads them only from the folder you configure"
        )
