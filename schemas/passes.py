"""Finishing passes in the spec and in resolved jobs: hires fix, refiner hand-off, img2img from an
init image, inpainting into a background plate, and the detail pass (renderer/passes.py runs them).

Spec side (`Hires`, `Refiner`, `Detail` on presets and job matrices; `init_image`, `strength`,
`background_plate` and `mask` on scenes and jobs) and resolved side (`ResolvedHires`, ...) live
here, next to each other, so `schemas/spec.py` and `schemas/job.py` only gain one field each.
Every resolved pass is part of the job key, and only when set (`pass_pixel_fields`), so the keys
of jobs without passes never change. Torch-free.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from schemas.base import Strict
from schemas.builtins import BASE_MODELS

PICKLES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")  # as schemas.spec.PICKLE_SUFFIXES
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Preset fields that switch a pass on (a preset or job setting one to null switches it off).
PASS_FIELDS = ("hires", "refiner", "detail")
# Bump when castbook changes how a pass turns a job into pixels; part of the key of jobs with passes only.
PASSES_RECIPE = 1
DEFAULT_INIT_STRENGTH = 0.75  # A1111's img2img default
DEFAULT_PLATE_STRENGTH = 1.0  # inpainting a character into an empty plate starts from noise inside the mask

# --- spec side ------------------------------------------------------------------------------------


class Hires(Strict):
    """A1111's Hires. fix: render, upscale by `scale`, then img2img at the larger size."""

    scale: float = Field(default=1.5, gt=1, le=4, description="Upscale factor; the size is rounded to a multiple of 8.")
    upscaler: Literal["latent", "lanczos"] = Field(
        default="lanczos", description="latent: bilinear in latent space (needs strength >= 0.5 to look sharp); "
        "lanczos: PIL Lanczos on the decoded image.")
    strength: float = Field(default=0.35, ge=0, le=1, description="img2img denoising strength; 0 = the upscale only.")
    steps: int = Field(default=15, ge=1, le=500, description="num_inference_steps of the img2img call "
                       "(diffusers runs about strength x steps of them).")


class Refiner(Strict):
    """The SDXL base/refiner hand-off: the base denoises until `switch_at`, the refiner finishes."""

    model: str = Field(description="builtin:NAME, a diffusers folder or a .safetensors checkpoint.")
    switch_at: float = Field(default=0.8, gt=0, lt=1, description="denoising_end of the base = denoising_start of the refiner.")

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value.startswith("builtin:") and value.removeprefix("builtin:") not in BASE_MODELS:
            known = ", ".join(f"builtin:{n}" for n in BASE_MODELS)
            raise ValueError(f"unknown built-in refiner `{value}`; known: {known}")
        if value.lower().endswith(PICKLES):
            raise ValueError(f"refiner {value!r} is a pickle checkpoint; castbook never unpickles model files. "
                             "Convert it to .safetensors and point at that")
        return value


class Detail(Strict):
    """ADetailer-style pass: find the character, crop with padding, re-render the crop larger with the
    same LoRA stack (img2img), paste it back with a feathered mask."""

    target: Literal["character"] = "character"
    detector: str = Field(default="toy", description="toy: the toy world's segmentation rule (saturated body "
                          "colours no scene uses); or a local folder with a transformers object-detection model "
                          "(config.json, model.safetensors, preprocessor_config.json; e.g. a YOLOS or DETR face or "
                          "person detector saved with save_pretrained).")
    label: str | None = Field(default=None, max_length=80, description="Detector folders: the class to look for "
                              "(a name in the model's id2label, e.g. face or person); default: any class.")
    confidence: float = Field(default=0.3, ge=0, le=1, description="Detector folders: the lowest score of a "
                              "detection (ADetailer's confidence); none above it: the image is kept.")
    padding: int = Field(default=8, ge=0, le=512, description="Pixels added around the detected box.")
    strength: float = Field(default=0.4, ge=0, le=1)
    steps: int = Field(default=15, ge=1, le=500)
    prompt: str | None = Field(default=None, max_length=2000, description="Prompt of the crop; default: the job's.")

    @field_validator("detector")
    @classmethod
    def _toy_or_folder(cls, value: str) -> str:
        if value.lower().endswith(PICKLES + (".safetensors", ".onnx")):
            raise ValueError(f"detector {value!r} is a single file; give `toy` or the folder of a transformers "
                             "object-detection model (config.json, model.safetensors, preprocessor_config.json). "
                             "Ultralytics .pt detectors are pickles and are not loaded")
        return value


def check_image_path(value: str | None) -> str | None:
    if value is not None and value != "auto" and not value.lower().endswith(IMAGE_SUFFIXES):
        raise ValueError(f"{value!r} is not an image; give a .png, .jpg or .webp file")
    return value


INIT_IMAGE_DESCRIPTION = ("img2img from this image (resized to the job size with Lanczos when its size differs; "
                          "a different aspect ratio is refused).")
STRENGTH_DESCRIPTION = ("Denoising strength of init_image (default 0.75) or background_plate (default 1.0); "
                        "near 0 keeps the image.")


class PresetPassFields(Strict):
    """The pass fields of a preset (schemas/spec.py `Preset`)."""

    hires: Hires | None = Field(default=None, description="Hires fix: upscale + img2img at the larger size.")
    refiner: Refiner | None = Field(default=None, description="SDXL refiner hand-off.")
    detail: Detail | None = Field(default=None, description="Detail pass on the character (ADetailer-style).")


class ScenePassFields(Strict):
    """The pass fields of a scene (schemas/spec.py `Scene`)."""

    init_image: str | None = Field(default=None, description=INIT_IMAGE_DESCRIPTION)
    strength: float | None = Field(default=None, ge=0, le=1, description=STRENGTH_DESCRIPTION)
    background_plate: str | None = Field(
        default=None, description="Inpaint the character into this background image; outside the mask the plate "
        "is kept exactly (its pixels are pasted back).")
    mask: str | None = Field(default=None, description="With background_plate: a mask image (white = repaint) "
                             "or auto (default): a centred ellipse over the middle 72 % of width and height.")

    @field_validator("init_image", "background_plate", "mask")
    @classmethod
    def _images(cls, value: str | None) -> str | None:
        return check_image_path(value)

    @model_validator(mode="after")
    def _one_source(self):
        if self.init_image is not None and self.background_plate is not None:
            raise ValueError("a scene takes init_image or background_plate, not both")
        if self.mask is not None and self.background_plate is None:
            raise ValueError("`mask` needs `background_plate` (the image the mask applies to)")
        if (self.init_image or self.background_plate) and getattr(self, "controls", None):
            raise ValueError("init_image/background_plate cannot be combined with controls yet "
                             "(a ControlNet img2img/inpaint pipeline is not wired); drop one of them")
        return self


class JobPassFields(PresetPassFields):
    """The pass fields of a job matrix (schemas/spec.py `JobMatrix`): they override the preset's and
    the scene's."""

    init_image: str | None = Field(default=None, description=INIT_IMAGE_DESCRIPTION)
    strength: float | None = Field(default=None, ge=0, le=1, description=STRENGTH_DESCRIPTION)

    @field_validator("init_image")
    @classmethod
    def _image(cls, value: str | None) -> str | None:
        return check_image_path(value)


# --- resolved side (in RenderJob) ------------------------------------------------------------


class ResolvedHires(Strict):
    scale: float
    upscaler: Literal["latent", "lanczos"]
    strength: float
    steps: int
    width: int  # the final size: job size x scale, rounded to a multiple of 8
    height: int


class ResolvedRefiner(Strict):
    model_ref: str  # builtin:NAME or a root-relative path
    model_kind: Literal["builtin", "diffusers", "single_file"]
    model_digest: str
    switch_at: float


class ResolvedInit(Strict):
    """img2img from a given image (scene or job `init_image`), or inpainting into a plate (`mask` set)."""

    image: str  # root-relative
    image_digest: str
    strength: float
    mask: str | None = None  # a root-relative mask image, "auto" (centred ellipse), None: img2img
    mask_digest: str | None = None


class ResolvedDetail(Strict):
    target: Literal["character"]
    detector: str  # "toy" or the detector folder, relative to the project root
    detector_digest: str | None = None  # folder digest of a detector model (None for toy)
    label: str | None = None
    confidence: float = 0.3
    padding: int
    strength: float
    steps: int
    prompt: str | None


class ResolvedPasses(Strict):
    """Every finishing pass of one job; None where the pass is off."""

    init: ResolvedInit | None = None
    refiner: ResolvedRefiner | None = None
    hires: ResolvedHires | None = None
    detail: ResolvedDetail | None = None

    @property
    def empty(self) -> bool:
        return self.init is None and self.refiner is None and self.hires is None and self.detail is None


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The hires size: the job size times `scale`, rounded to the nearest multiple of 8."""
    return max(8, int(round(width * scale / 8)) * 8), max(8, int(round(height * scale / 8)) * 8)


def pass_pixel_fields(passes: ResolvedPasses | None) -> dict:
    """The passes' share of the job key: only the passes that are on, so keys of jobs without
    passes never change."""
    if passes is None or passes.empty:
        return {}
    out: dict = {"recipe": PASSES_RECIPE}
    if passes.init is not None:
        i = passes.init
        out["init"] = {"image": i.image_digest, "strength": i.strength, "mask": i.mask_digest or i.mask}
    if passes.refiner is not None:
        out["refiner"] = {"model": passes.refiner.model_digest, "switch_at": passes.refiner.switch_at}
    if passes.hires is not None:
        out["hires"] = passes.hires.model_dump()
    if passes.detail is not None:
        out["detail"] = passes.detail.model_dump()
    return {"passes": out}


# --- expansion (called by schemas/expand.py; pure) -------------------------------------------


def _refiner(value: dict, digests: dict[str, str]) -> ResolvedRefiner:
    from schemas.builtins import builtin_digest

    model = value["model"]
    if model.startswith("builtin:"):
        kind, digest = "builtin", builtin_digest(model.removeprefix("builtin:"))
    else:
        kind, digest = ("single_file" if model.endswith(".safetensors") else "diffusers"), digests[model]
    return ResolvedRefiner(model_ref=model, model_kind=kind, model_digest=digest, switch_at=float(value["switch_at"]))


def resolve_passes(settings: dict, scene, job, digests: dict[str, str], width: int, height: int) -> ResolvedPasses | None:
    """The passes of one job: the preset's `hires`/`refiner`/`detail` (in `settings`), replaced by
    the job matrix's where it sets them (null: off); the scene's init image or plate, replaced by
    the job's `init_image`. None when no pass is on (the job key stays as before)."""
    values = {name: settings.get(name) for name in PASS_FIELDS}
    for name in PASS_FIELDS:
        if name in job.model_fields_set:
            own = getattr(job, name)
            values[name] = own.model_dump() if own is not None else None
    init = None
    strength = job.strength if job.strength is not None else scene.strength
    if job.init_image is not None or (scene.init_image is not None and scene.background_plate is None):
        image = job.init_image or scene.init_image
        init = ResolvedInit(image=image, image_digest=digests[image],
                            strength=DEFAULT_INIT_STRENGTH if strength is None else strength)
    elif scene.background_plate is not None:
        mask = scene.mask or "auto"
        init = ResolvedInit(image=scene.background_plate, image_digest=digests[scene.background_plate],
                            strength=DEFAULT_PLATE_STRENGTH if strength is None else strength,
                            mask=mask, mask_digest=None if mask == "auto" else digests[mask])
    hires = None
    if values["hires"] is not None:
        h = Hires.model_validate(values["hires"])
        w, hh = hires_size(width, height, h.scale)
        hires = ResolvedHires(scale=h.scale, upscaler=h.upscaler, strength=h.strength, steps=h.steps, width=w, height=hh)
    refiner = _refiner(Refiner.model_validate(values["refiner"]).model_dump(), digests) if values["refiner"] else None
    detail = None
    if values["detail"]:
        spec_detail = Detail.model_validate(values["detail"])
        detector_digest = digests[spec_detail.detector] if spec_detail.detector != "toy" else None
        detail = ResolvedDetail(**spec_detail.model_dump(), detector_digest=detector_digest)
    passes = ResolvedPasses(init=init, refiner=refiner, hires=hires, detail=detail)
    return None if passes.empty else passes


def pass_files(spec) -> set[str]:
    """Root-relative paths of every file a pass reads (their digests enter the job keys)."""
    paths: set[str] = set()
    for scene in spec.scenes.values():
        paths.update(p for p in (scene.init_image, scene.background_plate, scene.mask) if p and p != "auto")
    for job in spec.jobs.values():
        if job.init_image:
            paths.add(job.init_image)
    refiners = [job.refiner for job in spec.jobs.values()] + [p.refiner for p in spec.presets.values()]
    paths.update(r.model for r in refiners if r is not None and not r.model.startswith("builtin:"))
    details = [job.detail for job in spec.jobs.values()] + [p.detail for p in spec.presets.values()]
    paths.update(d.detector for d in details if d is not None and d.detector != "toy")
    return paths
