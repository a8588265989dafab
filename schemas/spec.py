"""Pydantic v2 models of the render spec (one model per concept).

Every model is frozen and forbids unknown keys, so a typo is an error, never a
silently ignored setting. Kinds are tagged unions on `type`. Paths in a validated
spec are already relative to the project root (the loader rewrites and checks them).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, Field, field_validator, model_validator

from schemas.annotators import loadable_detector
from schemas.base import Strict
from schemas.builtins import BASE_MODELS, CLIP_MODELS, CONTROLNET_MODELS
from schemas.ip_adapter import IpAdapter
from schemas.job import ControlType, Dtype, SchedulerName
from schemas.passes import JobPassFields, PresetPassFields, ScenePassFields

NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=80)]
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")




# --- model sources -------------------------------------------------------------------


class BuiltinModel(Strict):
    type: Literal["builtin"] = "builtin"
    name: str

    @property
    def ref(self) -> str:
        return f"builtin:{self.name}"


class DiffusersFolder(Strict):
    """A local folder written by `save_pretrained` (model_index.json or config.json)."""

    type: Literal["diffusers"] = "diffusers"
    path: str

    @property
    def ref(self) -> str:
        return self.path


class SingleFile(Strict):
    """A single-file `.safetensors` checkpoint, loaded with `from_single_file` offline."""

    type: Literal["single_file"] = "single_file"
    path: str
    config: str | None = Field(
        default=None, description="Local diffusers folder with the model's configs (offline loading)."
    )

    @field_validator("path")
    @classmethod
    def _safetensors_only(cls, path: str) -> str:
        if not path.endswith(".safetensors"):
            raise ValueError(f"single-file checkpoints must be .safetensors, got {path!r}")
        return path

    @property
    def ref(self) -> str:
        return self.path


def parse_model_shorthand(value: object) -> object:
    """`builtin:NAME`, `path/model.safetensors` or `path/folder` → the tagged form."""
    if not isinstance(value, str):
        return value
    if value.startswith("builtin:"):
        return {"type": "builtin", "name": value.removeprefix("builtin:")}
    if value.lower().endswith(PICKLE_SUFFIXES):
        raise ValueError(
            f"{value!r} is a pickle checkpoint; castbook never unpickles model files. "
            "Convert it to .safetensors (e.g. with diffusers' conversion scripts) and point at that."
        )
    if value.endswith(".safetensors"):
        return {"type": "single_file", "path": value}
    return {"type": "diffusers", "path": value}


ModelRef = Annotated[
    Union[BuiltinModel, DiffusersFolder, SingleFile],
    Field(discriminator="type"),
    BeforeValidator(parse_model_shorthand),
]


def _check_builtin(model: BaseModel, allowed: tuple[str, ...], what: str) -> None:
    if isinstance(model, BuiltinModel) and model.name not in allowed:
        known = ", ".join(f"builtin:{n}" for n in allowed)
        raise ValueError(f"unknown built-in {what} `builtin:{model.name}`; known: {known}")


# --- presets ---------------------------------------------------------------------------


class Preset(PresetPassFields):  # + hires, refiner, detail (schemas/passes.py)
    """Quality preset. In a spec, every field is optional: a preset named like a built-in
    overrides only what it sets; a new preset inherits from `extends`."""

    extends: str | None = None
    num_inference_steps: int | None = Field(default=None, ge=1, le=500)
    width: int | None = Field(default=None, ge=16, le=4096, multiple_of=8)
    height: int | None = Field(default=None, ge=16, le=4096, multiple_of=8)
    guidance_scale: float | None = Field(default=None, ge=0, le=50)
    scheduler: SchedulerName | None = None


# Built-in presets for SDXL-base at its native resolution. Documented in README.md.
BUILTIN_PRESETS: dict[str, dict] = {
    "draft": {"num_inference_steps": 12, "width": 768, "height": 768, "guidance_scale": 5.0, "scheduler": "euler_a"},
    "standard": {"num_inference_steps": 25, "width": 1024, "height": 1024, "guidance_scale": 6.0, "scheduler": "dpmpp_2m_karras"},
    "high": {"num_inference_steps": 40, "width": 1024, "height": 1024, "guidance_scale": 6.5, "scheduler": "dpmpp_2m_karras"},
    "ultra": {"num_inference_steps": 60, "width": 1024, "height": 1024, "guidance_scale": 7.0, "scheduler": "dpmpp_2m_karras"},
    # For few-step distilled LoRAs (Lightning, DMD2, Hyper, LCM, TCD): 4 steps, no CFG (guidance 1
    # skips the unconditional pass, halving the UNet work per step).
    "fast": {"num_inference_steps": 4, "width": 1024, "height": 1024, "guidance_scale": 1.0, "scheduler": "euler_trailing"},
}
# Finishing passes of the built-in presets (schemas/passes.py; README "Presets and finishing passes").
BUILTIN_PRESETS["high"]["hires"] = {"scale": 1.5, "upscaler": "lanczos", "strength": 0.35, "steps": 15}
BUILTIN_PRESETS["ultra"]["hires"] = {"scale": 1.5, "upscaler": "latent", "strength": 0.55, "steps": 30}

# --- LoRA registry ------------------------------------------------------------------

LoraKind = Literal["character", "background", "pose", "expression", "style", "other"]


class Recommended(Strict):
    """Settings a LoRA is made for (a distilled few-step LoRA needs its scheduler and step count);
    a job adopts them with `use_recommended: true`."""

    scheduler: SchedulerName | None = None
    num_inference_steps: int | None = Field(default=None, ge=1, le=500)
    guidance_scale: float | None = Field(default=None, ge=0, le=50)


class LoraEntry(Strict):
    path: str = Field(description="A .safetensors LoRA (diffusers/peft or kohya format).")
    kind: LoraKind
    trigger_words: list[str] = []
    weight: float = Field(default=1.0, ge=-4, le=4, description="Default weight in a stack.")
    rank: int | None = Field(default=None, ge=1, description="Optional; lets the GPU path pre-size LoRA hotswap.")
    notes: str | None = None
    recommended: Recommended | None = Field(
        default=None, description="Scheduler, steps and guidance the LoRA is made for (jobs with use_recommended).")

    @field_validator("path")
    @classmethod
    def _safetensors_only(cls, path: str) -> str:
        if not path.endswith(".safetensors"):
            raise ValueError(f"LoRA files must be .safetensors (castbook never unpickles), got {path!r}")
        return path


def parse_lora_use(value: object) -> object:
    """`name` or `name:0.8` shorthand → `{name, weight}`."""
    if isinstance(value, str):
        name, sep, weight = value.partition(":")
        if sep:
            try:
                return {"name": name, "weight": float(weight)}
            except ValueError:
                raise ValueError(f"LoRA shorthand must be `name` or `name:weight`, got {value!r}") from None
        return {"name": name}
    return value


class LoraUse(Strict):
    name: str
    weight: float | None = Field(default=None, ge=-4, le=4, description="Defaults to the registry weight.")


LoraUseItem = Annotated[LoraUse, BeforeValidator(parse_lora_use)]

# --- prompt variables ---------------------------------------------------------------------

VAR_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
VarName = Annotated[str, Field(pattern=VAR_NAME_PATTERN, max_length=40)]
# One value, or a list (an axis: every value is rendered). `{file: PATH}` (one value per line) is
# read by the loader into a list before validation.
VarValues = Union[Annotated[str, Field(max_length=2000)], Annotated[list[Annotated[str, Field(max_length=2000)]], Field(min_length=1, max_length=1000)]]
VARS_DESCRIPTION = ("Prompt variables (outfits, props, places): NAME: value, NAME: [values] (an axis, crossed with "
                    "the rest) or NAME: {file: values.txt} (one value per line). Used as {{ NAME }} or "
                    "{{ vars.NAME }}; the job's override the scene's, which override the character's.")


# --- characters ------------------------------------------------------------------------


class Character(Strict):
    description: str
    trigger_words: list[str] = []
    loras: list[LoraUseItem] = []
    references: list[str] = Field(default=[], description="Glob patterns of reference images (consistency scoring).")
    threshold: float = Field(default=0.65, ge=-1, le=1, description="CLIP-I gate for one image.")
    min_pass_rate: float = Field(default=0.8, ge=0, le=1, description="Fraction of images that must pass the gate.")
    vars: dict[VarName, VarValues] = Field(default={}, description=VARS_DESCRIPTION)
    ip_adapter: IpAdapter | None = Field(default=None, description="Identity from reference images (IP-Adapter).")

    @model_validator(mode="after")
    def _ip_adapter_has_images(self) -> "Character":
        if self.ip_adapter is not None and not (self.ip_adapter.images or self.references):
            raise ValueError("`ip_adapter` needs images: set `ip_adapter.images` or the character's `references`")
        return self


# --- controls (tagged union on `type`) ------------------------------------------------


class _Control(Strict):
    image: str
    scale: float = Field(default=1.0, ge=0, le=4, description="controlnet_conditioning_scale")
    preprocess: bool = Field(default=True, description="Run the controlnet-aux detector; false = image already is a map.")
    model: ModelRef | None = Field(default=None, description="ControlNet; default: defaults.controlnets[type].")
    annotator: str | None = Field(default=None, description="Trusted folder with annotator weights (pickles!).")


class CannyControl(_Control):
    type: Literal["canny"]
    low_threshold: int = Field(default=100, ge=0, le=255)
    high_threshold: int = Field(default=200, ge=0, le=255)


class PoseControl(_Control):
    type: Literal["pose"]
    detector: Literal["openpose", "dwpose"] = "openpose"

    _check_detector = field_validator("detector")(loadable_detector)


class DepthControl(_Control):
    type: Literal["depth"]
    detector: Literal["midas", "zoe", "leres"] = "midas"

    _check_detector = field_validator("detector")(loadable_detector)


class SegControl(_Control):
    type: Literal["seg"]
    detector: Literal["sam"] = "sam"
    points_per_side: int | None = Field(default=None, ge=1, le=64, description="SAM's mask grid (default 32).")


class NormalControl(_Control):
    type: Literal["normal"]
    detector: Literal["normalbae"] = "normalbae"


Control = Annotated[
    Union[CannyControl, PoseControl, DepthControl, SegControl, NormalControl], Field(discriminator="type")
]

# --- scenes and jobs ---------------------------------------------------------------


class Scene(ScenePassFields):  # + init_image, strength, background_plate, mask (schemas/passes.py)
    prompt: str = Field(description="Jinja2 template (sandboxed): {{ character }}, {{ name }}, {{ description }}, {{ trigger }}, {{ scene }}.")
    negative_prompt: str | None = None
    loras: list[LoraUseItem] = []
    controls: list[Control] = []
    preset: str | None = None
    width: int | None = Field(default=None, ge=16, le=4096, multiple_of=8)
    height: int | None = Field(default=None, ge=16, le=4096, multiple_of=8)
    vars: dict[VarName, VarValues] = Field(default={}, description=VARS_DESCRIPTION)
    use_ip_adapter: bool = Field(default=True, description="false: the characters' IP-Adapters are off in this scene.")


class SeedRange(Strict):
    count: int = Field(ge=1)
    start: int = Field(default=0, ge=0, lt=2**32)


SweepValue = Union[float, int, str, dict[str, Any]]  # a dict: a per-block ip_adapter.scale
SWEEP_FIXED_AXES = ("guidance_scale", "num_inference_steps", "scheduler", "width", "height")
SWEEP_AXIS_PATTERN = re.compile(r"^(guidance_scale|num_inference_steps|scheduler|width|height|loras\.([A-Za-z0-9_][A-Za-z0-9_.-]*)\.weight|controls\.(pose|depth|canny|seg|normal)\.scale|vars\.[A-Za-z_][A-Za-z0-9_]*|ip_adapter\.scale)$")


class JobMatrix(JobPassFields):  # + hires, refiner, detail, init_image, strength (schemas/passes.py)
    """A named matrix: characters × scenes × presets × seeds × images × sweep axes."""

    characters: list[str] = Field(default=[], description="Empty: scenes without a character.")
    scenes: list[str] = Field(min_length=1)
    presets: list[str] = Field(default=[], description="Default: the scene's preset, else defaults.preset.")
    seeds: list[Annotated[int, Field(ge=0, lt=2**32)]] | SeedRange = [0]
    images_per_seed: int = Field(default=1, ge=1, le=64)
    best_of: int = Field(default=1, ge=1, le=64, description="Render N candidates; scoring keeps the best by CLIP-I.")
    use_loras: bool = Field(default=True, description="false: no LoRA at all (baseline look of the base model).")
    use_controls: bool = True
    use_ip_adapter: bool = Field(default=True, description="false: no IP-Adapter (baseline without the references).")
    use_recommended: bool = Field(
        default=False,
        description="Adopt the `recommended` scheduler, steps and guidance of the stack's LoRAs (after the preset, "
        "before the job's own values).")
    # Not a pixel field: it only changes how reports count the images, so it stays out of
    # RenderJob and the job key (flipping it re-renders nothing).
    gate: bool = Field(
        default=True,
        description="false: the images are scored and shown, but do not count toward their characters' gate "
        "(baselines, sweeps that go to weight 0).",
    )
    loras: list[LoraUseItem] = []
    negative_prompt: str | None = None
    guidance_scale: float | None = Field(default=None, ge=0, le=50)
    num_inference_steps: int | None = Field(default=None, ge=1, le=500)
    scheduler: SchedulerName | None = None
    vars: dict[VarName, VarValues] = Field(default={}, description=VARS_DESCRIPTION)
    sweep: dict[str, list[SweepValue]] = Field(
        default={},
        description="Axis → values, crossed with the rest. Axes: guidance_scale, num_inference_steps, scheduler, "
        "width, height, loras.NAME.weight, controls.TYPE.scale, vars.NAME, ip_adapter.scale.",
    )

    @field_validator("sweep")
    @classmethod
    def _known_axes(cls, sweep: dict[str, list]) -> dict[str, list]:
        for axis, values in sweep.items():
            if not SWEEP_AXIS_PATTERN.match(axis):
                raise ValueError(
                    f"unknown sweep axis `{axis}`; use one of {', '.join(SWEEP_FIXED_AXES)}, "
                    "loras.NAME.weight, controls.TYPE.scale, vars.NAME or ip_adapter.scale"
                )
            if not values:
                raise ValueError(f"sweep axis `{axis}` has no values")
        return sweep


# --- top level -------------------------------------------------------------------------


class Defaults(Strict):
    base_model: ModelRef = BuiltinModel(name="tiny-sdxl")
    preset: str = "standard"
    style: str = Field(default="", description="Appended to every prompt.")
    negative_prompt: str = ""
    scheduler: SchedulerName | None = Field(default=None, description="Overrides the preset's scheduler.")
    controlnets: dict[ControlType, ModelRef] = Field(default={}, description="ControlNet model per control type.")
    annotators: str | None = Field(default=None, description="Trusted folder with controlnet-aux annotator weights.")

    @model_validator(mode="after")
    def _builtins_exist(self) -> "Defaults":
        _check_builtin(self.base_model, BASE_MODELS, "base model")
        for model in self.controlnets.values():
            _check_builtin(model, CONTROLNET_MODELS, "ControlNet")
        return self


class Performance(Strict):
    """GPU speed and memory options. Off by default where they change pixels."""

    dtype: Dtype = Field(default="auto", description="auto = bf16 on CUDA, fp32 on CPU.")
    cpu_offload: bool = False
    vae_tiling: bool = False
    vae_slicing: bool = False
    channels_last: bool = False
    fuse_qkv: bool = False
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "max-autotune-no-cudagraphs"
    lora_hotswap: bool = False
    max_loaded_loras: int = Field(default=8, ge=1, le=64)
    vae: str | None = Field(
        default=None,
        description="A local diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors) used instead "
        "of the base model's, e.g. an fp16-fixed SDXL VAE for dtype fp16 (the stock one overflows). Changes pixels, "
        "so it is part of every job key.",
    )

    @field_validator("vae")
    @classmethod
    def _vae_is_a_local_folder(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value.startswith("builtin:"):
            raise ValueError("`vae` is a local VAE folder; a built-in model already has its own VAE")
        if value.lower().endswith((".safetensors", *PICKLE_SUFFIXES)):
            # A single-file VAE needs its config from the hub, which castbook never calls.
            raise ValueError(f"`vae` {value!r} is a single file; give the diffusers VAE folder that contains "
                             "config.json and diffusion_pytorch_model.safetensors")
        return value


class Scoring(Strict):
    model: str = Field(default="builtin:tiny-clip", description="builtin:tiny-clip or an open_clip model name.")
    weights: str | None = Field(default=None, description="Local .safetensors weights for `model`.")
    dino: str | None = Field(default=None, description="Local DINOv2 folder (config.json + model.safetensors): adds a DINO identity score.")

    @model_validator(mode="after")
    def _weights_for_named_models(self) -> "Scoring":
        if self.model.startswith("builtin:"):
            if self.model.removeprefix("builtin:") not in CLIP_MODELS:
                known = ", ".join(f"builtin:{n}" for n in CLIP_MODELS)
                raise ValueError(f"unknown built-in scorer `{self.model}`; known: {known}")
        elif self.weights is None:
            raise ValueError(f"scoring model `{self.model}` needs `weights:` (a local .safetensors); castbook never downloads")
        return self


class Spec(Strict):
    version: Literal[1] = 1
    include: list[str] = Field(default=[], description="Other YAML files (registries) merged into this spec.")
    max_jobs: int = Field(default=10_000, ge=1, description="Expansion guard.")
    defaults: Defaults = Defaults()
    presets: dict[Name, Preset] = {}
    loras: dict[Name, LoraEntry] = {}
    characters: dict[Name, Character] = {}
    scenes: dict[Name, Scene] = {}
    jobs: dict[Name, JobMatrix] = {}
    performance: Performance = Performance()
    scoring: Scoring = Scoring()


# Sections an included file may contribute (merged by name; a clash is an error).
MERGEABLE_SECTIONS = ("presets", "loras", "characters", "scenes", "jobs")
