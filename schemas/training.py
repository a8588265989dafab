"""The training spec: one YAML file describes one LoRA training run.

`castbook train specs/training/luca.yaml` reads it. Defaults are layered in one
place (`_apply_kind_preset`): the `kind` preset fills `lora.rank`, `lora.alpha`,
`train.learning_rate` and `train.steps` when the spec leaves them out; anything the
spec sets wins. Paths are relative to the project root.

This module must not import torch, diffusers or ray.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from schemas.base import Strict

LoraKind = Literal["character", "background", "pose", "expression"]

# Hyperparameter presets per LoRA kind. Why these values:
# - character: identity needs capacity and a gentle lr over many steps.
# - background: places/styles generalise faster; smaller rank, higher lr, fewer steps.
# - pose: a body configuration is low-rank structure; a small rank avoids baking in identity.
# - expression: subtle face changes on top of an identity; small rank, low lr, few steps.
KIND_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "character": {"lora": {"rank": 64, "alpha": 64}, "train": {"learning_rate": 5e-5, "steps": 2500}},
    "background": {"lora": {"rank": 32, "alpha": 32}, "train": {"learning_rate": 1e-4, "steps": 1500}},
    "pose": {"lora": {"rank": 16, "alpha": 16}, "train": {"learning_rate": 1e-4, "steps": 1000}},
    "expression": {"lora": {"rank": 16, "alpha": 8}, "train": {"learning_rate": 5e-5, "steps": 800}},
}

DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")




class DatasetFolder(Strict):
    path: str  # folder of images with same-name .txt captions, relative to the root
    repeats: int = Field(1, ge=1)  # how many times each image appears per epoch


class DatasetSpec(Strict):
    folders: tuple[DatasetFolder, ...] = Field(min_length=1)
    trigger: str | None = None  # trigger word; checked against captions, added by `caption_prefix`
    caption_prefix: str = ""  # prepended to every caption, e.g. "photo of lucaxyz, "
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0)  # probability of training on an empty caption
    shuffle_captions: bool = False  # shuffle comma-separated tags after the first `keep_tokens`
    keep_tokens: int = Field(1, ge=0)
    require_trigger: bool = True  # error when a caption (with prefix) lacks the trigger word

    @field_validator("folders", mode="before")
    @classmethod
    def _folders_from_strings(cls, value: Any) -> Any:
        # `folders: [data/luca]` is the common case; a mapping adds repeats.
        if isinstance(value, (list, tuple)):
            return [{"path": v} if isinstance(v, str) else v for v in value]
        return value


class LoraSpec(Strict):
    rank: int = Field(ge=1, le=1024)
    alpha: float = Field(gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    train_text_encoder: bool = False
    text_encoder_rank: int | None = Field(None, ge=1)  # defaults to `rank`
    text_encoder_target_modules: tuple[str, ...] = DEFAULT_TEXT_ENCODER_TARGETS
    use_dora: bool = False


class TrainSpec(Strict):
    steps: int = Field(ge=1)  # optimizer steps
    learning_rate: float = Field(gt=0)
    text_encoder_learning_rate: float | None = Field(None, gt=0)  # defaults to learning_rate
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    optimizer: Literal["adamw"] = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    # CPU threads for torch. The thread count changes float sums, so a fixed value is what makes
    # two runs of one spec on one machine give the same file; null = torch's default.
    threads: int | None = Field(None, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    resolution: int = Field(1024, ge=8)
    buckets: bool = False  # aspect-ratio buckets around resolution² pixels
    bucket_step: int = Field(64, ge=4)  # bucket sides are multiples of this
    snr_gamma: float | None = Field(None, gt=0)  # Min-SNR weighting (5.0 is the paper's value)
    noise_offset: float = Field(0.0, ge=0.0)
    cache_dir: str | None = None  # latents/text-embedding cache; default <output.folder>/.cache

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainSpec:
        if self.lr_warmup_steps > self.steps:
            raise ValueError(
                f"lr_warmup_steps ({self.lr_warmup_steps}) is larger than steps ({self.steps}); "
                "lower lr_warmup_steps or raise steps"
            )
        return self


class CheckpointSpec(Strict):
    every: int = Field(500, ge=1)  # optimizer steps between checkpoints
    keep_last: int = Field(3, ge=1)


class SamplePreset(Strict):
    width: int = Field(1024, ge=8)
    height: int = Field(1024, ge=8)
    num_inference_steps: int = Field(25, ge=1)
    guidance_scale: float = Field(5.0, ge=0)
    scheduler: Literal["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc"] = "euler"
    negative_prompt: str = ""


class SamplesSpec(Strict):
    every: int = Field(500, ge=1)  # rendered at every checkpoint step that is a multiple of this
    prompts: tuple[str, ...] = Field(min_length=1)
    seeds: tuple[int, ...] = (1,)
    preset: SamplePreset = SamplePreset()


class PriorPreservationSpec(Strict):
    folder: str  # class images (with .txt captions, or `class_prompt` for all)
    class_prompt: str | None = None
    fraction: float = Field(0.25, gt=0.0, lt=1.0)  # share of each batch drawn from class images
    weight: float = Field(1.0, ge=0.0)  # loss weight of class images


class EvaluationSpec(Strict):
    references: tuple[str, ...] = ()  # reference images of the subject, for CLIP-I per checkpoint
    select_best: Literal["last", "clip_i"] = "last"
    scoring_model: str = "builtin:tiny-clip"  # open_clip architecture name, or the built-in
    scoring_weights: str | None = None  # local .safetensors for a real open_clip model

    @model_validator(mode="after")
    def _clip_needs_refs(self) -> EvaluationSpec:
        if self.select_best == "clip_i" and not self.references:
            raise ValueError("select_best: clip_i needs `references` (reference images of the subject)")
        return self


class OutputSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # registry name and file stem
    folder: str = "loras"
    registry: str | None = None  # LoRA registry YAML to add the result to (comments are kept)
    format: Literal["diffusers", "kohya", "both"] = "diffusers"


class TrainingSpec(Strict):
    """A whole training run. See specs/training/*.yaml for examples."""

    base_model: str  # builtin:NAME, a local diffusers folder, or a local .safetensors
    base_model_config: str | None = None  # diffusers config folder for a single .safetensors
    kind: LoraKind
    dataset: DatasetSpec
    lora: LoraSpec
    train: TrainSpec
    checkpoints: CheckpointSpec = CheckpointSpec()
    samples: SamplesSpec | None = None
    prior_preservation: PriorPreservationSpec | None = None
    evaluation: EvaluationSpec = EvaluationSpec()
    output: OutputSpec
    # Pivotal tuning (new token embeddings) is not implemented; the field is reserved so a
    # spec that asks for it fails loudly instead of training something else.
    pivotal_tuning: Literal[False] = False

    @model_validator(mode="before")
    @classmethod
    def _apply_kind_preset(cls, data: Any) -> Any:
        """The one place defaults are layered: kind preset, then the spec's own values."""
        if not isinstance(data, dict) or not isinstance(data.get("kind"), str) or data["kind"] not in KIND_PRESETS:
            return data
        preset = KIND_PRESETS[data["kind"]]
        out = dict(data)
        for section, values in preset.items():
            given = out.get(section, {})
            if given is None:
                given = {}
            if not isinstance(given, dict):
                return data  # let field validation report the wrong type
            merged = dict(values)
            if section == "lora" and "rank" in given and "alpha" not in given:
                merged["alpha"] = given["rank"]  # alpha follows a user-set rank (scale 1.0)
            merged.update(given)
            out[section] = merged
        return out
