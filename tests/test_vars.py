"""Prompt variables: `vars:` on characters, scenes and jobs, inline or from a file, as sweep axes.
Expansion is combinatorial and deterministic; the job-count guard counts them."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.loader import SpecErrors
from schemas.plan import load_plan

SPEC = """\
defaults: {preset: tiny}
presets: {tiny: {extends: draft, width: 64, height: 64, num_inference_steps: 2}}
characters:
  hero:
    description: a hero
    vars: {outfit: [red coat, blue dress]}
  sidekick:
    description: a dog
    vars: {outfit: plain clothes}
scenes:
  park:
    prompt: "{{ character }} wearing {{ outfit }} with {{ vars.prop }} in the {{ place }}"
    vars: {place: park, prop: umbrella}
jobs:
  main:
    characters: [hero, sidekick]
    scenes: [park]
    seeds: [1]
"""


def _project(tmp_path: Path, text: str, files: dict[str, str] | None = None) -> Path:
    root = tmp_path / "proj"
    (root / ".git").mkdir(parents=True)
    (root / "spec.yaml").write_text(text)
    for name, content in (files or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    return root


def _prompts(root: Path) -> dict[str, str]:
    return {j.name: j.prompt for j in load_plan([root / "spec.yaml"]).jobs}


def test_vars_layer_character_scene_job_and_lists_are_axes(tmp_path):
    root = _project(tmp_path, SPEC)
    prompts = _prompts(root)
    # Each character's own outfits; the scene's place and prop for both.
    assert prompts == {
        "main/hero/park/tiny/seed-1-outfit=blue_dress": "a hero wearing blue dress with umbrella in the park",
        "main/hero/park/tiny/seed-1-outfit=red_coat": "a hero wearing red coat with umbrella in the park",
        "main/sidekick/park/tiny/seed-1": "a dog wearing plain clothes with umbrella in the park",
    }
    jobs = {j.name: j for j in load_plan([root / "spec.yaml"]).jobs}
    assert jobs["main/hero/park/tiny/seed-1-outfit=red_coat"].sweep == {"vars.outfit": "red coat"}


def test_job_vars_override_and_a_sweep_axis_over_vars(tmp_path):
    text = SPEC.replace("    seeds: [1]\n", "    seeds: [1]\n    vars: {place: beach}\n    sweep: {vars.prop: [kite, ball]}\n")
    text = text.replace("vars: {outfit: plain clothes}", "vars: {outfit: plain clothes, prop: stick}")
    prompts = _prompts(_project(tmp_path, text))
    assert len(prompts) == 2 * 2 + 2  # hero: outfit × prop; sidekick: prop
    assert all(" in the beach" in p for p in prompts.values())  # the job's place wins over the scene's
    assert "main/sidekick/park/tiny/seed-1-prop=kite" in prompts
    assert "with ball" in prompts["main/hero/park/tiny/seed-1-outfit=red_coat-prop=ball"]


def test_expansion_is_deterministic_and_keys_follow_the_text(tmp_path):
    root = _project(tmp_path, SPEC)
    first = {j.name: j.key for j in load_plan([root / "spec.yaml"]).jobs}
    (root / "spec.yaml").write_text(SPEC.replace("vars: {place: park, prop: umbrella}",
                                                 "vars: {prop: umbrella, place: park}"))
    assert {j.name: j.key for j in load_plan([root / "spec.yaml"]).jobs} == first  # order-free
    (root / "spec.yaml").write_text(SPEC.replace("[red coat, blue dress]", "[red coat, green dress]"))
    second = {j.name: j.key for j in load_plan([root / "spec.yaml"]).jobs}
    assert second["main/hero/park/tiny/seed-1-outfit=red_coat"] == first["main/hero/park/tiny/seed-1-outfit=red_coat"]
    assert "main/hero/park/tiny/seed-1-outfit=green_dress" in second


def test_values_from_a_file(tmp_path):
    text = SPEC.replace("vars: {outfit: [red coat, blue dress]}",
                        "vars: {outfit: {file: vars/outfits.txt}}")
    root = _project(tmp_path, text, {"vars/outfits.txt": "# wardrobe\nred coat\n\n  yellow raincoat  \n"})
    prompts = _prompts(root)
    assert "main/hero/park/tiny/seed-1-outfit=yellow_raincoat" in prompts
    assert len([n for n in prompts if n.startswith("main/hero/")]) == 2


@pytest.mark.parametrize("files, fragment", [
    ({}, "'vars/outfits.txt' not found"),
    ({"vars/outfits.txt": "# only a comment\n"}, "has no values"),
])
def test_bad_values_files_are_located_errors(tmp_path, files, fragment):
    text = SPEC.replace("vars: {outfit: [red coat, blue dress]}",
                        "vars: {outfit: {file: vars/outfits.txt}}")
    root = _project(tmp_path, text, files)
    with pytest.raises(SpecErrors) as info:
        load_plan([root / "spec.yaml"])
    messages = [str(e) for e in info.value.errors]
    assert any("spec.yaml:6:" in m and "characters.hero.vars.outfit.file" in m and fragment in m
               for m in messages), messages


def test_undefined_variable_builtin_name_and_the_job_count_guard(tmp_path):
    undefined = SPEC.replace("with {{ vars.prop }}", "with {{ hat }}")
    with pytest.raises(SpecErrors, match="'hat' is undefined"):
        load_plan([_project(tmp_path / "a", undefined) / "spec.yaml"])
    builtin = SPEC.replace("vars: {place: park, prop: umbrella}", "vars: {place: park, prop: umbrella, scene: x}")
    with pytest.raises(SpecErrors, match="`scene` is a built-in prompt variable"):
        load_plan([_project(tmp_path / "b", builtin) / "spec.yaml"])
    many = SPEC.replace("    seeds: [1]\n", "    seeds: [1]\n    sweep: {vars.prop: [a, b, c, d, e, f]}\n")
    many = many.replace("defaults: {preset: tiny}", "max_jobs: 10\ndefaults: {preset: tiny}")
    with pytest.raises(SpecErrors) as info:  # hero 2 outfits × 6 props + dog 6 props = 18 > 10
        load_plan([_project(tmp_path / "c", many) / "spec.yaml"])
    assert "expands to 18 jobs, over max_jobs 10" in str(info.value.errors[0])


def test_values_that_name_the_same_image_are_refused_by_validation(tmp_path):
    clash = SPEC.replace("[red coat, blue dress]", "[red coat, red-coat]")
    with pytest.raises(SpecErrors) as info:
        load_plan([_project(tmp_path, clash) / "spec.yaml"])
    assert "spec.yaml:6:" in str(info.value.errors[0])
    assert "values 'red coat' and 'red-coat' would name the same images (`red_coat`)" in str(info.value.errors[0])
