"""controlnet-aux annotators: the one table of detectors and the weight files each one loads.

The renderer (renderer/control.py), `castbook dataset prepare --poses` (trainer/poses.py) and
the plan (schemas/plan.py: digests and the missing-file check) all read this table, so a file
name lives in one place. It names controlnet-aux 0.0.10's detector classes and the file names
their `from_pretrained(local_dir)` opens; torch-free, so planning stays fast.

The annotator files are PICKLES (`.pth`/`.pt`). castbook loads them only from the folder the
user configured (`defaults.annotators` or a control's `annotator:`), a folder the user
trusts, and never downloads them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from core.digests import file_digest

ANNOTATOR_SOURCE = "https://huggingface.co/lllyasviel/Annotators (files at the top level of that repository)"


@dataclass(frozen=True)
class Weights:
    """One set of files a detector can load, and the `from_pretrained` arguments that pick it."""

    files: tuple[str, ...]
    kwargs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Detector:
    cls: str  # class name in controlnet_aux
    types: tuple[str, ...]  # control types it serves
    weights: tuple[Weights, ...] = ()  # alternatives, first complete set wins; () = no weights
    source: str = ANNOTATOR_SOURCE


DETECTORS: dict[str, Detector] = {
    "canny": Detector("CannyDetector", ("canny",)),
    # from_pretrained(dir) loads all three (body, hand, face) even when only the body is drawn.
    "openpose": Detector("OpenposeDetector", ("pose",),
                         (Weights(("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")),)),
    "midas": Detector("MidasDetector", ("depth",), (Weights(("dpt_hybrid-midas-501f0c75.pt",)),)),
    "normalbae": Detector("NormalBaeDetector", ("normal",), (Weights(("scannet.pt",)),)),
    # SAM ViT-H (2.4 GB) or MobileSAM (40 MB, the same automatic mask generator with a TinyViT encoder).
    "sam": Detector("SamDetector", ("seg",), (
        Weights(("sam_vit_h_4b8939.pth",), {"model_type": "vit_h", "filename": "sam_vit_h_4b8939.pth"}),
        Weights(("mobile_sam.pt",), {"model_type": "vit_t", "filename": "mobile_sam.pt"}),
    ), source="https://huggingface.co/ybelkada/segment-anything (checkpoints/sam_vit_h_4b8939.pth) "
              "or https://huggingface.co/dhkim2810/MobileSAM (mobile_sam.pt)"),
}

# Detector names the spec once allowed that castbook cannot load from a local folder.
UNSUPPORTED: dict[str, str] = {
    "dwpose": "controlnet-aux's DWposeDetector needs the mmpose/mmdet/mmcv packages, which castbook does not "
              "install; use detector: openpose",
    "zoe": "castbook does not test controlnet-aux's ZoeDetector yet (its BEiT-L network, 1.4 GB of weights, is "
           "too large for castbook's offline tests); use detector: midas",
    "leres": "controlnet-aux's LeresDetector parses the process's command line while loading (pix2pix "
             "TestOptions); use detector: midas",
}


def loadable_detector(value: str) -> str:
    """Spec validator: refuse the detector names castbook cannot load from a local folder, saying why."""
    if value in UNSUPPORTED:
        raise ValueError(f"detector {value!r} is not supported: {UNSUPPORTED[value]}")
    return value


def find_weights(detector: str, folder: Path | None) -> Weights | None:
    """The first complete set of the detector's files in `folder` (None if none is complete)."""
    if folder is None:
        return None
    for weights in DETECTORS[detector].weights:
        if all((Path(folder) / f).is_file() for f in weights.files):
            return weights
    return None


def missing_files(detector: str, folder: Path | None) -> list[str]:
    """Files to add so the detector loads: those missing from the nearest-complete set."""
    sets = DETECTORS[detector].weights
    if not sets or find_weights(detector, folder) is not None:
        return []
    if folder is None:
        return list(sets[0].files)
    return min(([f for f in w.files if not (Path(folder) / f).is_file()] for w in sets), key=len)


def needs_weights(detector: str) -> bool:
    return detector in DETECTORS and bool(DETECTORS[detector].weights)


def digest_key(folder: str, detector: str) -> str:
    """Key of an annotator digest in the plan's digest table (next to file paths)."""
    return f"annotators:{folder}:{detector}"


def weights_digest(detector: str, folder: Path) -> str | None:
    """sha256 over the names and sha256 of the files the detector loads (None if incomplete)."""
    weights = find_weights(detector, folder)
    if weights is None:
        return None
    sha = hashlib.sha256(detector.encode() + b"\n")
    for name in weights.files:
        sha.update(name.encode() + b"\0" + file_digest(Path(folder) / name).encode() + b"\n")
    return sha.hexdigest()


def missing_message(detector: str, folder: Path | None, what: str) -> str:
    """The error for missing annotator files: which files, where, from where, and that they are pickles."""
    det = DETECTORS[detector]
    files = missing_files(detector, folder)
    where = f"in {folder}" if folder else "in an annotator folder (none is configured)"
    others = [", ".join(w.files) for w in det.weights if not set(files) <= set(w.files)]
    alternatives = f" (or instead: {'; '.join(others)})" if others else ""
    return (f"{what} needs annotator weights {', '.join(files)}{alternatives} {where}; download them from "
            f"{det.source}, put them in a local folder and set `annotator: DIR` on the control or "
            f"`defaults.annotators` (or use `preprocess: false` with a ready-made map). These are pickle "
            f"files: castbook loads them only from the folder you configure")
