"""The edge of planning: spec files → validated spec → file digests → jobs (`load_plan`).

Reads files (the spec, the digests of every file that changes pixels) but imports no torch, so
`castbook plan` and `castbook validate` stay fast. Expansion itself is `schemas.expand.expand`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

from core.digests import path_digest
from schemas import annotators
from schemas.builtins import DEFAULT_SCORER
from schemas.expand import expand
from schemas.job import RenderJob
from schemas.loader import ErrorSink, glob_matches
from schemas.passes import pass_files
from schemas.prompt_length import check_prompt_lengths
from schemas.spec import BuiltinModel, DiffusersFolder, SingleFile, Spec
from schemas.spec_loader import load_spec


def referenced_files(spec: Spec) -> set[str]:
    """Every root-relative path whose bytes change pixels."""
    paths: set[str] = {lora.path for lora in spec.loras.values()}
    models = [spec.defaults.base_model, *spec.defaults.controlnets.values()]
    if spec.performance.vae:
        paths.add(spec.performance.vae)
    for scene in spec.scenes.values():
        for control in scene.controls:
            paths.add(control.image)
            if control.model is not None:
                models.append(control.model)
    for model in models:
        if isinstance(model, (DiffusersFolder, SingleFile)):
            paths.add(model.path)
    paths |= pass_files(spec)  # init images, plates, masks, refiner models (schemas/passes.py)
    return paths


def annotator_uses(spec: Spec) -> list[tuple[tuple, str, str]]:
    """(spec location, folder, detector) of each preprocessed control whose detector loads weights."""
    uses = []
    for sname, scene in spec.scenes.items():
        for i, control in enumerate(scene.controls):
            detector = getattr(control, "detector", "canny")
            if control.preprocess and annotators.needs_weights(detector):
                loc = ("scenes", sname, "controls", i)
                if control.annotator:
                    uses.append((loc + ("annotator",), control.annotator, detector))
                else:
                    uses.append((loc + ("detector",) if "detector" in control.model_fields_set else loc,
                                 spec.defaults.annotators, detector))
    return uses


def compute_digests(spec: Spec, root: Path) -> dict[str, str]:
    digests = {rel: path_digest(root / rel) for rel in sorted(referenced_files(spec))}
    # Annotator folders: only the files each detector loads (a folder may hold every annotator).
    for _, folder, detector in annotator_uses(spec):
        key = annotators.digest_key(folder, detector)
        if folder is not None and key not in digests:
            digest = annotators.weights_digest(detector, root / folder)
            if digest is not None:
                digests[key] = digest
    digests.update(ip_adapter_digests(spec, root))
    return digests


def check_annotators(loaded) -> None:
    """Raise SpecErrors, located at the control, when a detector's annotator files are missing."""
    sink = ErrorSink(loaded.sources)
    for loc, folder, detector in annotator_uses(loaded.spec):
        path = loaded.root / folder if folder is not None else None
        if annotators.find_weights(detector, path) is None:
            shown = folder if folder is not None else None
            sink.add(loc, annotators.missing_message(detector, shown, f"detector {detector}"))
    sink.raise_if_any()


def ip_adapter_digests(spec: Spec, root: Path) -> dict[str, str]:
    """The characters' IP-Adapter files and image globs: each glob's matches (one per line, under
    `glob:PATTERN`, so `expand` stays pure) and each matched file's digest."""
    from schemas.ip_adapter import GLOB_PREFIX, ip_adapter_files

    out: dict[str, str] = {}
    for character in spec.characters.values():
        if character.ip_adapter is None:
            continue
        files, globs = ip_adapter_files(character.ip_adapter, character)
        for pattern in globs:
            matches = [p.relative_to(root).as_posix() for p in glob_matches(str(root / pattern))]
            out[GLOB_PREFIX + pattern] = "\n".join(matches)
            files += matches
        for rel in files:
            if rel not in out:
                out[rel] = path_digest(root / rel)
    return out


@dataclass(frozen=True)
class Plan:
    spec: Spec
    jobs: list[RenderJob]
    root: Path
    spec_files: list[Path]  # relative to root (main file first, then includes)
    characters: dict[str, dict] = field(default_factory=dict)
    performance: dict = field(default_factory=dict)
    scoring: dict = field(default_factory=dict)

    def model_refs(self, scorer: bool = True) -> set[str]:
        """Every model the plan loads: base models, VAEs, ControlNets and (with `scorer`) the scorer."""
        refs = {str((self.scoring or {}).get("model") or "builtin:tiny-clip")} if scorer else set()
        for job in self.jobs:
            refs.add(job.base_model.ref)
            refs.update(c.model.ref for c in job.controls)
            if job.vae is not None:
                refs.add(job.vae.ref)
            if job.passes is not None and job.passes.refiner is not None:
                refs.add(job.passes.refiner.model_ref)
        return refs

    @property
    def max_lora_rank(self) -> int | None:
        ranks = [lora.rank for lora in self.spec.loras.values() if lora.rank]
        return max(ranks) if ranks else None


def character_info(spec: Spec, root: Path) -> dict[str, dict]:
    """Per character, what the reports need from the spec (stored as run.json `characters`)."""
    info = {}
    for name, character in spec.characters.items():
        references = [p.relative_to(root).as_posix() for pattern in character.references
                      for p in glob_matches(str(root / pattern))]
        info[name] = {
            "description": character.description,
            "trigger_words": list(character.trigger_words),
            "references": list(dict.fromkeys(references)),
            "threshold": character.threshold,
            "min_pass_rate": character.min_pass_rate,
            # Job matrices with `gate: false`: shown in the report, left out of this character's gate.
            "ungated_jobs": sorted(jname for jname, job in spec.jobs.items()
                                   if not job.gate and name in job.characters),
        }
    return info


def _scoring(spec: Spec) -> dict:
    """The spec's scorer; a built-in base model with its own scorer gets it unless the spec names one."""
    scoring = spec.scoring.model_dump()
    base = spec.defaults.base_model
    if "model" not in spec.scoring.model_fields_set and isinstance(base, BuiltinModel) and base.name in DEFAULT_SCORER:
        scoring["model"] = f"builtin:{DEFAULT_SCORER[base.name]}"
    return scoring


def load_plan(spec_paths: list[Path] | Path, overrides: list[str] = (), root: Path | None = None,
              only: str | None = None) -> Plan:
    """Files → validated spec → digests → jobs. Raises SpecErrors."""
    loaded = load_spec(spec_paths, overrides, root)
    check_annotators(loaded)
    digests = compute_digests(loaded.spec, loaded.root)
    jobs = expand(loaded.spec, digests)
    check_prompt_lengths(loaded, jobs)
    if only:
        jobs = [j for j in jobs if fnmatch.fnmatchcase(j.name, only) or fnmatch.fnmatchcase(j.job, only)]
    return Plan(
        spec=loaded.spec,
        jobs=jobs,
        root=loaded.root,
        spec_files=[p.resolve().relative_to(loaded.root) if p.resolve().is_relative_to(loaded.root) else p
                    for p in loaded.files],
        characters=character_info(loaded.spec, loaded.root),
        performance=loaded.spec.performance.model_dump(),
        scoring=_scoring(loaded.spec),
    )


__all__ = ["Plan", "compute_digests", "load_plan"]
