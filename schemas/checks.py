"""Cross-reference checks on a schema-valid spec: names, presets, templates, job count."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import get_args

from jinja2 import TemplateError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import ValidationError

from schemas.builtins import CONTROLNET_MODELS
from schemas.ip_adapter import IpBlockScales, canonical_ip_scale, ip_scale_label
from schemas.job import SchedulerName
from schemas.loader import ErrorSink
from schemas.located_validation import data_loc
from schemas.presets import PresetError, resolve_presets
from schemas.spec import (
    BuiltinModel,
    JobMatrix,
    SeedRange,
    Spec,
)
from schemas.templates import TEMPLATE_VARIABLES, PromptTemplateError, prompt_variables, render_prompt
from schemas.vars import merged_vars, var_label, var_label_clash, var_values

SCHEDULERS = get_args(SchedulerName)

# A prompt is one line of text: variables, filters that keep it about that size, if/else. Loops,
# macros, calls and the `*`, `**`, `%` operators could make validation itself run for hours or
# build gigabytes (`{{ 'x' * 10**10 }}`); the sandbox alone allows them, so they are refused here.
PROMPT_FILTERS = frozenset({
    "lower", "upper", "title", "capitalize", "trim", "striptags", "default", "d", "join", "replace", "first",
    "last", "length", "count", "string", "escape", "e", "safe", "sort", "unique", "reverse", "list",
    "wordcount", "round", "int", "float", "abs",
})
REFUSED_NODES = {
    nodes.For: "`for` loops", nodes.Macro: "macros", nodes.CallBlock: "call blocks", nodes.Call: "calls",
    nodes.Pow: "the `**` operator", nodes.Mul: "the `*` operator", nodes.Mod: "the `%` operator",
}


def seed_list(seeds: list[int] | SeedRange) -> list[int]:
    if isinstance(seeds, SeedRange):
        return list(range(seeds.start, seeds.start + seeds.count))
    return list(seeds)


def job_axes(job: JobMatrix, default_presets: int = 1) -> dict[str, int]:
    """Size of every axis of a job matrix, computed without enumerating it."""
    seeds = job.seeds.count if isinstance(job.seeds, SeedRange) else len(job.seeds)
    axes = {
        "characters": max(1, len(job.characters)),
        "scenes": len(job.scenes),
        "presets": len(job.presets) or default_presets,
        "seeds": seeds,
        "images_per_seed": job.images_per_seed,
        "best_of": job.best_of,
    }
    for axis, values in job.sweep.items():
        axes[f"sweep {axis}"] = len(values)
    return axes


def count_jobs(spec: Spec) -> dict[str, tuple[int, dict[str, int]]]:
    """Per job matrix: (job count, axis sizes). `vars` axes can differ per character and scene, so
    their combinations are summed over the matrix's (character, scene) pairs."""
    out = {}
    for name, job in spec.jobs.items():
        axes = {k: v for k, v in job_axes(job).items() if not k.startswith("sweep vars.")}
        others = math.prod(v for k, v in axes.items() if k not in ("characters", "scenes"))
        pairs = [(spec.characters.get(c) if c else None, spec.scenes.get(s))
                 for c in job.characters or [None] for s in job.scenes]
        combos = [math.prod(len(v) for v in merged_vars(c, s, job).values()) for c, s in pairs if s is not None]
        if max(combos, default=1) > 1:
            axes["vars (largest)"] = max(combos)
        out[name] = (others * (sum(combos) if combos else len(pairs)), axes)
    return out


def job_count_error(spec: Spec) -> tuple[str, str] | None:
    """(job name, message) when expansion would exceed max_jobs; checked before enumerating."""
    counts = count_jobs(spec)
    total = sum(c for c, _ in counts.values())
    if total <= spec.max_jobs:
        return None
    name, (count, axes) = max(counts.items(), key=lambda kv: kv[1][0])
    sizes = " × ".join(f"{axis} {size}" for axis, size in axes.items() if size != 1 or axis in ("scenes", "seeds"))
    return name, (
        f"the spec expands to {total:,} jobs, over max_jobs {spec.max_jobs:,}; "
        f"job `{name}` alone has {count:,} ({sizes}). Shrink an axis or raise `max_jobs`"
    )


def check_references(spec: Spec, sink: ErrorSink) -> None:
    def unknown(kind: str, name: str, known) -> str:
        known = sorted(known)
        return f"{kind} `{name}` is not defined; known: {', '.join(known) if known else '(none)'}"

    def lora_missing(name: str) -> str:
        known = ", ".join(sorted(spec.loras)) or "(the registry is empty)"
        return f"LoRA `{name}` is not in the registry; known: {known}"

    # 1. presets
    try:
        presets = resolve_presets(spec)
    except PresetError as exc:
        own = spec.presets.get(exc.name)
        sink.add(("presets", exc.name, "extends") if own and own.extends else ("presets", exc.name), str(exc))
        presets = {}
    if presets and spec.defaults.preset not in presets:
        sink.add(("defaults", "preset"), unknown("preset", spec.defaults.preset, presets))

    # 2. LoRA references
    for cname, character in spec.characters.items():
        for i, use in enumerate(character.loras):
            if use.name not in spec.loras:
                sink.add(("characters", cname, "loras", i), lora_missing(use.name))

    base_is_builtin = isinstance(spec.defaults.base_model, BuiltinModel)
    for sname, scene in spec.scenes.items():
        for i, use in enumerate(scene.loras):
            if use.name not in spec.loras:
                sink.add(("scenes", sname, "loras", i), lora_missing(use.name))
        if scene.preset is not None and presets and scene.preset not in presets:
            sink.add(("scenes", sname, "preset"), unknown("preset", scene.preset, presets))
        for i, control in enumerate(scene.controls):
            model = control.model or spec.defaults.controlnets.get(control.type)
            if isinstance(model, BuiltinModel) and model.name not in CONTROLNET_MODELS:
                sink.add(("scenes", sname, "controls", i, "model"),
                         f"unknown built-in ControlNet `builtin:{model.name}`; known: builtin:tiny-controlnet")
            if model is None and not base_is_builtin:
                sink.add(("scenes", sname, "controls", i),
                         f"no ControlNet model for `{control.type}` controls; set `model:` here or `defaults.controlnets.{control.type}`")

    # 3. jobs
    for jname, job in spec.jobs.items():
        for i, cname in enumerate(job.characters):
            if cname not in spec.characters:
                sink.add(("jobs", jname, "characters", i), unknown("character", cname, spec.characters))
        for i, sname in enumerate(job.scenes):
            if sname not in spec.scenes:
                sink.add(("jobs", jname, "scenes", i), unknown("scene", sname, spec.scenes))
        for i, pname in enumerate(job.presets):
            if presets and pname not in presets:
                sink.add(("jobs", jname, "presets", i), unknown("preset", pname, presets))
        for i, use in enumerate(job.loras):
            if use.name not in spec.loras:
                sink.add(("jobs", jname, "loras", i), lora_missing(use.name))
        for axis, values in job.sweep.items():
            loc = ("jobs", jname, "sweep", axis)
            parts = axis.split(".")
            if parts[0] == "loras" and parts[1] not in spec.loras:
                sink.add(loc, lora_missing(parts[1]))
            elif parts[0] == "ip_adapter" and not any(
                    spec.characters[c].ip_adapter for c in job.characters if c in spec.characters):
                sink.add(loc, f"no character of job `{jname}` has an `ip_adapter` to sweep")
            elif parts[0] == "controls":
                types = {c.type for s in job.scenes if s in spec.scenes for c in spec.scenes[s].controls}
                if parts[1] not in types:
                    sink.add(loc, f"no scene of job `{jname}` has a `{parts[1]}` control to sweep")
            problems = [(j, _sweep_value_problem(parts[0] if parts[0] in ("loras", "controls", "vars") else axis, v))
                        for j, v in enumerate(values)]
            for j, problem in problems:
                if problem:
                    sink.add(loc + (j,), problem)
            if axis == "ip_adapter.scale" and not any(p for _, p in problems):
                seen = [ip_scale_label(canonical_ip_scale(v)) for v in values]  # the label names the images
                dup = next((j for j, v in enumerate(seen) if v in seen[:j]), None)
                if dup is not None:
                    sink.add(loc + (dup,), f"the same scale as value {seen.index(seen[dup])} (`ip={seen[dup]}`; "
                                           "blocks not named are 0)")

    # 4. prompt variables: a name of its own (never a built-in template variable's)
    owners = [(("characters", n), c) for n, c in spec.characters.items()] + \
             [(("scenes", n), s) for n, s in spec.scenes.items()] + [(("jobs", n), j) for n, j in spec.jobs.items()]
    def clash(values: list, loc) -> None:
        pair = var_label_clash([str(v) for v in values])
        if pair:
            sink.add(loc, f"values {pair[0]!r} and {pair[1]!r} would name the same images "
                          f"(`{var_label(pair[0])}`): image names keep only letters, digits, `_` and `.`; "
                          "make them differ there, or drop the duplicate")

    for loc, owner in owners:
        for var, value in owner.vars.items():
            clash(var_values(value), loc + ("vars", var))
            if var in TEMPLATE_VARIABLES:
                sink.add(loc + ("vars", var), f"`{var}` is a built-in prompt variable ({', '.join(TEMPLATE_VARIABLES)}); "
                                              "give the variable another name")
    for jname, job in spec.jobs.items():
        for axis, values in job.sweep.items():
            if axis.startswith("vars."):
                clash(values, ("jobs", jname, "sweep", axis))
            if axis.startswith("vars.") and axis.removeprefix("vars.") in TEMPLATE_VARIABLES:
                sink.add(("jobs", jname, "sweep", axis), f"`{axis.removeprefix('vars.')}` is a built-in prompt "
                                                         "variable; sweep a variable of your own")

    # 5. job-count guard, before anything enumerates
    too_many = job_count_error(spec)
    if too_many:
        sink.add(("jobs", too_many[0]), too_many[1])
        return

    # 6. templates: render each scene with each character it is used with
    # (scene, character, variable names): a scene is rendered again when a job gives it other variables.
    rendered: set[tuple[str, str | None, tuple[str, ...]]] = set()
    for jname, job in spec.jobs.items():
        for sname in job.scenes:
            for cname in job.characters or [None]:
                if sname not in spec.scenes or (cname and cname not in spec.characters):
                    continue
                character = spec.characters.get(cname) if cname else None
                # The first value of every variable: templates are the same for all of them.
                first = {k: v[0] for k, v in merged_vars(character, spec.scenes[sname], job).items()}
                if (sname, cname, tuple(first)) in rendered:
                    continue
                rendered.add((sname, cname, tuple(first)))
                variables = prompt_variables(cname, character.description if character else "",
                                             character.trigger_words if character else [], sname, first)
                problem = template_problem(spec.scenes[sname].prompt)
                if problem:
                    sink.add(("scenes", sname, "prompt"), problem)
                    continue
                try:
                    render_prompt(spec.scenes[sname].prompt, variables)
                except PromptTemplateError as exc:
                    used = f"character `{cname}`, job `{jname}`" if cname else f"job `{jname}`"
                    sink.add(("scenes", sname, "prompt"), f"{exc} (with {used})")
    for sname, scene in spec.scenes.items():
        if not any(sname == s for s, _, _ in rendered):
            problem = template_problem(scene.prompt)
            if problem:
                sink.add(("scenes", sname, "prompt"), problem)
                continue
            try:  # unused scenes still get a syntax and sandbox check
                render_prompt(scene.prompt, prompt_variables("", "", [], sname,
                                                             {k: var_values(v)[0] for k, v in scene.vars.items()}))
            except PromptTemplateError as exc:
                sink.add(("scenes", sname, "prompt"), str(exc))


@lru_cache(maxsize=4096)
def template_problem(template: str) -> str | None:
    """Why a prompt template is refused before it is rendered, or None (syntax errors are left to
    `render_prompt`, which names them)."""
    try:
        tree = ImmutableSandboxedEnvironment().parse(template)
    except TemplateError:
        return None
    except RecursionError:
        return "prompt template error: expressions nested too deeply; write the prompt out"
    for node in tree.find_all(tuple(REFUSED_NODES)):
        return (f"prompt template error: {REFUSED_NODES[type(node)]} are not allowed in prompts "
                f"(line {node.lineno}); use variables like {{{{ character }}}}, filters and if/else")
    for node in tree.find_all(nodes.Filter):
        if node.name not in PROMPT_FILTERS:
            return (f"prompt template error: filter `{node.name}` is not allowed in prompts; "
                    f"allowed: {', '.join(sorted(PROMPT_FILTERS))}")
    return None


def _sweep_value_problem(axis: str, value) -> str | None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if axis == "scheduler":
        return None if value in SCHEDULERS else f"unknown scheduler {value!r}; known: {', '.join(SCHEDULERS)}"
    if axis in ("num_inference_steps",):
        return None if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 500 else f"steps must be an integer 1..500, got {value!r}"
    if axis in ("width", "height"):
        ok = isinstance(value, int) and not isinstance(value, bool) and 16 <= value <= 4096 and value % 8 == 0
        return None if ok else f"{axis} must be a multiple of 8 in 16..4096, got {value!r}"
    if axis == "guidance_scale":
        return None if number and 0 <= value <= 50 else f"guidance_scale must be a number 0..50, got {value!r}"
    if axis == "loras":
        return None if number and -4 <= value <= 4 else f"LoRA weight must be a number -4..4, got {value!r}"
    if axis == "controls":
        return None if number and 0 <= value <= 4 else f"control scale must be a number 0..4, got {value!r}"
    if axis == "ip_adapter.scale":
        if isinstance(value, dict):  # per block, as diffusers takes it (schemas/ip_adapter.py)
            try:
                IpBlockScales.model_validate(value)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in data_loc(value, tuple(first["loc"]))) or "scale"
                return f"per-block IP-Adapter scale: {where}: {first['msg']}"
            return None
        return None if number and 0 <= value <= 4 else (
            f"IP-Adapter scale must be a number 0..4 or a per-block mapping (down / mid / up), got {value!r}")
    if axis == "vars":
        return None if isinstance(value, str) or number else f"a prompt variable's value is text, got {value!r}"
    return None
