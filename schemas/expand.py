"""Expansion of a validated spec into fully resolved render jobs, and their keys.

`expand` is pure: no file reads, no randomness. The file digests it needs are computed once at
the edge (`schemas.plan.compute_digests`) and passed in. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import itertools
import re

from core.errors import CastbookError
from schemas.annotators import digest_key as annotator_digest_key
from schemas.builtins import DEFAULT_CONTROLNET, builtin_digest
from schemas.checks import job_count_error, seed_list
from schemas.ip_adapter import canonical_ip_scale, ip_scale_label, resolve_ip_adapter
from schemas.job import RenderJob, ResolvedControl, ResolvedLora, ResolvedModel, job_key
from schemas.passes import resolve_passes
from schemas.presets import resolve_presets
from schemas.spec import BuiltinModel, DiffusersFolder, SingleFile, Spec
from schemas.templates import prompt_variables, render_prompt
from schemas.vars import merged_vars, var_label

NO_CHARACTER = "nocharacter"
SWEEP_SHORT = {"guidance_scale": "cfg", "num_inference_steps": "steps", "scheduler": "sched", "width": "w", "height": "h"}


class PlanError(CastbookError):
    """Raised by `expand` for a spec that cannot be expanded (normally caught by validation)."""


# --- keys -------------------------------------------------------------------------------------


def derive_seed(seed: int, image_index: int, candidate: int) -> int:
    """The generator seed of image `image_index`, candidate `candidate` of a base seed.

    The first image of a seed uses the seed itself (so `seed: 42` means what users
    expect); others get a stable 32-bit hash, so seeds 1 and 2 never collide.
    """
    if image_index == 0 and candidate == 0:
        return seed
    digest = hashlib.sha256(f"castbook-seed:{seed}:{image_index}:{candidate}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


# --- expansion ------------------------------------------------------------------------------


def _model(model, digests: dict[str, str]) -> ResolvedModel:
    if isinstance(model, BuiltinModel):
        return ResolvedModel(ref=model.ref, kind="builtin", digest=builtin_digest(model.name))
    if isinstance(model, SingleFile):
        return ResolvedModel(ref=model.path, kind="single_file", digest=digests[model.path], config=model.config)
    assert isinstance(model, DiffusersFolder)
    return ResolvedModel(ref=model.path, kind="diffusers", digest=digests[model.path])


def _vae(path: str | None, digests: dict[str, str]) -> ResolvedModel | None:
    if path is None:
        return None
    return ResolvedModel(ref=path, kind="diffusers", digest=digests[path])


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _sweep_suffix(combo: dict) -> str:
    parts = []
    for axis, value in sorted(combo.items()):  # sorted: reordering sweep keys keeps names
        pieces = axis.split(".")
        if pieces[0] == "vars":  # free text: only what is safe in a file name
            parts.append(f"{pieces[1]}={var_label(value)}")
            continue
        short = pieces[1] if pieces[0] in ("loras", "controls") else SWEEP_SHORT.get(axis, "ip")
        text = ip_scale_label(canonical_ip_scale(value)) if pieces[0] == "ip_adapter" else _format_value(value)
        parts.append(f"{short}={text}")
    return ("-" + "-".join(parts)) if parts else ""


def sweep_labels(combo: dict) -> dict:
    """A job's sweep values as grids show them: a per-block IP-Adapter scale as its label."""
    return {axis: ip_scale_label(canonical_ip_scale(v)) if isinstance(v, dict) else v for axis, v in combo.items()}


def _has_word(prompt: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", prompt, flags=re.IGNORECASE) is not None


def recommended_settings(spec: Spec, stack) -> dict:
    """The `recommended` settings of a LoRA stack's registry entries (by LoRA name); two LoRAs that
    recommend different values for the same setting are an error (the job must choose)."""
    out: dict = {}
    source: dict[str, str] = {}
    for name in sorted(stack):
        recommended = spec.loras[name].recommended
        if recommended is None:
            continue
        for field, value in recommended.model_dump(exclude_none=True).items():
            if field in out and out[field] != value:
                raise PlanError(f"LoRAs `{source[field]}` and `{name}` recommend different {field} "
                                f"({out[field]} and {value}); set {field} on the job, or drop use_recommended")
            out[field], source[field] = value, name
    return out


def expand(spec: Spec, digests: dict[str, str]) -> list[RenderJob]:
    """All render jobs of a spec, fully resolved and keyed. Pure.

    Layering, in exactly this order: preset (the job's `presets` axis, else the scene's
    `preset`, else `defaults.preset`) → `defaults.scheduler` → the scene's size → the
    `recommended` settings of the stack's LoRAs (`use_recommended: true`) → the job's own values →
    sweep values.
    LoRA stack: the character's LoRAs, then the scene's, then the job's, in that order;
    a later mention of the same LoRA replaces its weight; a weight left out is the
    registry's default. `use_loras: false` starts from an empty stack.
    """
    too_many = job_count_error(spec)
    if too_many:
        raise PlanError(too_many[1])
    presets = resolve_presets(spec)
    base_model = _model(spec.defaults.base_model, digests)
    dtype = spec.performance.dtype
    vae = _vae(spec.performance.vae, digests)
    jobs: list[RenderJob] = []

    for jname, job in spec.jobs.items():
        axes = [(a, v) for a, v in job.sweep.items() if not a.startswith("vars.")]
        combos = [dict(zip([a for a, _ in axes], values)) for values in itertools.product(*[v for _, v in axes])]
        for cname in job.characters or [None]:
            character = spec.characters[cname] if cname else None
            for sname in job.scenes:
                scene = spec.scenes[sname]
                for var_combo in var_combinations(character, scene, job):
                    jobs.extend(_scene_jobs(spec, digests, presets, base_model, vae, dtype, jname, job, cname,
                                            character, sname, scene, combos, var_combo))
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise PlanError(f"two jobs would write the same image {dup!r}: give the values of a `vars` axis "
                        "distinct letters or digits (punctuation and spaces are dropped from image names)")
    return jobs


def var_combinations(character, scene, job) -> list[dict[str, str]]:
    """Every combination of a (character, scene, job)'s prompt variables (`merged_vars`), in name
    order. Pure and deterministic: no sampling, so keys stay content-derived."""
    merged = merged_vars(character, scene, job)
    return [dict(zip(merged, values)) for values in itertools.product(*merged.values())]


def _scene_jobs(spec: Spec, digests: dict[str, str], presets: dict, base_model, vae, dtype, jname: str, job,
                cname: str | None, character, sname: str, scene, combos: list[dict], var_combo: dict[str, str]
                ) -> list[RenderJob]:
    """The jobs of one (job matrix, character, scene, prompt-variable combination)."""
    jobs: list[RenderJob] = []
    # Variables with several values are axes: they name the image and are recorded like sweeps.
    axes = merged_vars(character, scene, job)
    var_axes = {f"vars.{name}": value for name, value in var_combo.items() if len(axes[name]) > 1}
    variables = prompt_variables(cname, character.description if character else "",
                                 character.trigger_words if character else [], sname, var_combo)
    body = render_prompt(scene.prompt, variables)
    negative = job.negative_prompt if job.negative_prompt is not None else (
        scene.negative_prompt if scene.negative_prompt is not None else spec.defaults.negative_prompt)

    stack: dict[str, float | None] = {}
    if job.use_loras:
        for use in [*(character.loras if character else []), *scene.loras, *job.loras]:
            # first mention fixes the order; a later explicit weight replaces the earlier one
            if use.weight is not None or use.name not in stack:
                stack[use.name] = use.weight
    controls = list(scene.controls) if job.use_controls else []
    ip_use = character.ip_adapter if (character and job.use_ip_adapter and scene.use_ip_adapter) else None

    for pname in job.presets or [scene.preset or spec.defaults.preset]:
        settings = dict(presets[pname])
        if spec.defaults.scheduler:
            settings["scheduler"] = spec.defaults.scheduler
        if scene.width:
            settings["width"] = scene.width
        if scene.height:
            settings["height"] = scene.height
        if job.use_recommended:
            settings.update(recommended_settings(spec, stack))
        for key in ("guidance_scale", "num_inference_steps", "scheduler"):
            if getattr(job, key) is not None:
                settings[key] = getattr(job, key)

        for combo in combos:
            values = dict(settings)
            weights = dict(stack)
            control_scales: dict[str, float] = {}
            for axis, value in combo.items():
                parts = axis.split(".")
                if parts[0] == "loras":
                    weights[parts[1]] = value
                elif parts[0] == "controls":
                    control_scales[parts[1]] = value
                elif parts[0] == "ip_adapter":
                    values["ip_adapter_scale"] = canonical_ip_scale(value)
                else:
                    values[axis] = value
            loras = tuple(
                ResolvedLora(name=name, path=spec.loras[name].path, digest=digests[spec.loras[name].path],
                             weight=float(spec.loras[name].weight if w is None else w),
                             kind=spec.loras[name].kind)
                for name, w in weights.items()
            )
            resolved_controls = tuple(
                _control(c, control_scales.get(c.type), spec, digests) for c in controls
            )
            # sorted by LoRA name: stack order must not change the prompt (nor the pixels)
            missing = [w for lora in sorted(loras, key=lambda l: l.name)
                       for w in spec.loras[lora.name].trigger_words if not _has_word(body, w)]
            prompt = ", ".join(dict.fromkeys([*missing, body]))
            if spec.defaults.style:
                prompt = f"{prompt}, {spec.defaults.style}"
            prompt = " ".join(prompt.split())
            # finishing passes (schemas/passes.py): the preset's, the job's, the scene's init image or plate
            passes = resolve_passes(values, scene, job, digests, int(values["width"]), int(values["height"]))

            for seed in seed_list(job.seeds):
                for image_index in range(job.images_per_seed):
                    stem = f"{jname}/{cname or NO_CHARACTER}/{sname}/{pname}/seed-{seed}"
                    if job.images_per_seed > 1:
                        stem += f"-i{image_index}"
                    suffix = _sweep_suffix({**combo, **var_axes})
                    for candidate in range(job.best_of):
                        name = stem + (f"-c{candidate}" if job.best_of > 1 else "") + suffix
                        draft = RenderJob.model_construct(
                            key="", name=name, job=jname, character=cname, scene=sname, preset=pname,
                            prompt=prompt, negative_prompt=" ".join(negative.split()),
                            seed=derive_seed(seed, image_index, candidate),
                            width=int(values["width"]), height=int(values["height"]),
                            num_inference_steps=int(values["num_inference_steps"]),
                            guidance_scale=float(values["guidance_scale"]),
                            scheduler=values["scheduler"], dtype=dtype, base_model=base_model, vae=vae,
                            loras=loras, controls=resolved_controls,
                            sweep={**sweep_labels(combo), **var_axes},
                            best_of_group=(stem + suffix) if job.best_of > 1 else None,
                            candidate=candidate, passes=passes,
                            ip_adapter=resolve_ip_adapter(ip_use, character, values.get("ip_adapter_scale"), digests),
                        )
                        jobs.append(draft.model_copy(update={"key": job_key(draft)}))
    return jobs



def _control(control, scale: float | None, spec: Spec, digests: dict[str, str]) -> ResolvedControl:
    base = spec.defaults.base_model
    default = DEFAULT_CONTROLNET.get(base.name, "tiny-controlnet") if isinstance(base, BuiltinModel) else "tiny-controlnet"
    model = control.model or spec.defaults.controlnets.get(control.type) or BuiltinModel(name=default)
    params: dict = {}
    if control.type == "canny":
        params = {"low_threshold": control.low_threshold, "high_threshold": control.high_threshold}
    if control.type == "seg" and control.points_per_side is not None:  # only when set: keys stay
        params = {"points_per_side": control.points_per_side}
    return ResolvedControl(
        type=control.type,
        image=control.image,
        image_digest=digests[control.image],
        scale=float(control.scale if scale is None else scale),
        preprocess=control.preprocess,
        model=_model(model, digests),
        detector=(getattr(control, "detector", "canny") if control.preprocess else "none"),
        detector_params=params if control.preprocess else {},
        annotator_dir=control.annotator or spec.defaults.annotators,
        annotator_digest=_annotator_digest(control, spec, digests),
    )


def _annotator_digest(control, spec: Spec, digests: dict[str, str]) -> str | None:
    """The digest of the annotator files a preprocessed control loads (computed at the edge)."""
    folder = control.annotator or spec.defaults.annotators
    detector = getattr(control, "detector", "canny")
    if not control.preprocess or folder is None:
        return None
    return digests.get(annotator_digest_key(folder, detector))


__all__ = ["NO_CHARACTER", "PlanError", "derive_seed", "expand", "job_key"]
