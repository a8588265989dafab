"""A table of broken specs: each must fail with the exact file:line and field path."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from schemas.loader import SpecErrors
from schemas.spec_loader import load_spec

BASE = """\
loras:
  hero_lora: {path: hero.safetensors, kind: character}
characters:
  hero:
    description: a hero
scenes:
  park:
    prompt: "{{ character }} in a park"
jobs:
  main:
    characters: [hero]
    scenes: [park]
"""  # 12 lines; appended text starts at line 13

BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    + "".join(f"{n}: &{n} [{','.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
)


def project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    (root / ".git").mkdir(parents=True)
    (root / "hero.safetensors").write_bytes(b"not really weights; only existence is checked here")
    (root / "pose.png").write_bytes(b"\x89PNG")
    return root


# (name, {file: text}, expected file, line, field path, message fragment)
CASES = [
    ("typo_key", {"spec.yaml": BASE + "    guidance: 5\n"}, "spec.yaml", 13, "jobs.main.guidance",
     "unknown key `guidance`; did you mean `guidance_scale`?"),
    ("a1111_cfg", {"spec.yaml": BASE + "    cfg: 5\n"}, "spec.yaml", 13, "jobs.main.cfg",
     "unknown key `cfg`; castbook calls it `guidance_scale`"),
    ("comfy_sampler_name", {"spec.yaml": BASE + "    sampler_name: euler\n"}, "spec.yaml", 13, "jobs.main.sampler_name",
     "unknown key `sampler_name`; castbook calls it `scheduler`"),
    ("kohya_steps", {"spec.yaml": BASE + "    steps: 30\n"}, "spec.yaml", 13, "jobs.main.steps",
     "unknown key `steps`; castbook calls it `num_inference_steps`"),
    ("wrong_type", {"spec.yaml": BASE + "    images_per_seed: many\n"}, "spec.yaml", 13, "jobs.main.images_per_seed",
     "valid integer"),
    ("unknown_lora", {"spec.yaml": BASE.replace("    description: a hero\n", "    description: a hero\n    loras: [luca_v2]\n")},
     "spec.yaml", 6, "characters.hero.loras[0]", "LoRA `luca_v2` is not in the registry; known: hero_lora"),
    ("missing_file", {"spec.yaml": BASE.replace("hero.safetensors", "gone.safetensors")}, "spec.yaml", 2,
     "loras.hero_lora.path", "not found"),
    ("path_escape", {"spec.yaml": BASE.replace('prompt: "{{ character }} in a park"\n',
                                               'prompt: "{{ character }} in a park"\n    controls: [{type: canny, image: ../../etc/passwd}]\n')},
     "spec.yaml", 9, "scenes.park.controls[0].image", "outside the project root"),
    ("absolute_escape", {"spec.yaml": BASE.replace("hero.safetensors", "/etc/hosts.safetensors")}, "spec.yaml", 2,
     "loras.hero_lora.path", "outside the project root"),
    ("symlink_escape", {"spec.yaml": BASE.replace("hero.safetensors", "link.safetensors"), "@symlink": "link.safetensors"},
     "spec.yaml", 2, "loras.hero_lora.path", "through a symlink outside"),
    ("include_cycle", {"spec.yaml": "include: [a.yaml]\n" + BASE, "a.yaml": "include: [b.yaml]\n", "b.yaml": "include: [a.yaml]\n"},
     "b.yaml", 1, "include[0]", "include cycle: spec.yaml -> a.yaml -> b.yaml -> a.yaml"),
    ("include_escape", {"spec.yaml": "include: [../../outside.yaml]\n" + BASE}, "spec.yaml", 1, "include[0]",
     "outside the project root"),
    ("python_tag", {"spec.yaml": BASE + "    negative_prompt: !!python/object/apply:os.system ['touch pwned']\n"},
     "spec.yaml", 13, "", "YAML tag `!!python/object/apply:os.system` is not allowed"),
    ("alias_bomb", {"spec.yaml": BOMB}, "spec.yaml", 1, "", "alias bomb"),
    ("duplicate_key", {"spec.yaml": BASE + "    scenes: [park]\n"}, "spec.yaml", 13, "",
     "duplicate key `scenes` (first defined at line 12)"),
    ("job_count", {"spec.yaml": BASE + "    seeds: {count: 20000}\n"}, "spec.yaml", 10, "jobs.main",
     "expands to 20,000 jobs, over max_jobs 10,000; job `main` alone has 20,000 (scenes 1 × seeds 20000)"),
    ("template_undefined", {"spec.yaml": BASE.replace("{{ character }} in a park", "{{ charcter }} in a park")},
     "spec.yaml", 8, "scenes.park.prompt", "'charcter' is undefined"),
    ("template_sandbox", {"spec.yaml": BASE.replace("{{ character }} in a park", "{{ ''.__class__.__mro__ }}")},
     "spec.yaml", 8, "scenes.park.prompt", "sandbox"),
    ("template_syntax", {"spec.yaml": BASE.replace("{{ character }} in a park", "{{ character in a park")},
     "spec.yaml", 8, "scenes.park.prompt", "TemplateSyntaxError"),
    ("unknown_character", {"spec.yaml": BASE.replace("characters: [hero]", "characters: [villain]")}, "spec.yaml", 11,
     "jobs.main.characters[0]", "character `villain` is not defined; known: hero"),
    ("unknown_scene", {"spec.yaml": BASE.replace("scenes: [park]", "scenes: [park, moon]")}, "spec.yaml", 12,
     "jobs.main.scenes[1]", "scene `moon` is not defined; known: park"),
    ("unknown_preset", {"spec.yaml": BASE + "    presets: [turbo]\n"}, "spec.yaml", 13, "jobs.main.presets[0]",
     "preset `turbo` is not defined; known: draft, fast, high, standard, ultra"),
    ("unknown_control_type", {"spec.yaml": BASE.replace('prompt: "{{ character }} in a park"\n',
                                                        'prompt: "{{ character }} in a park"\n    controls:\n      - {type: sketch, image: pose.png}\n')},
     "spec.yaml", 10, "scenes.park.controls[0]", "'sketch'"),
    ("pickle_model", {"spec.yaml": "defaults:\n  base_model: models/sdxl.ckpt\n" + BASE}, "spec.yaml", 2,
     "defaults.base_model", "pickle checkpoint; castbook never unpickles"),
    ("unknown_sweep_axis", {"spec.yaml": BASE + "    sweep:\n      cfg: [3, 7]\n"}, "spec.yaml", 13, "jobs.main.sweep",
     "unknown sweep axis `cfg`"),
    ("sweep_unknown_lora", {"spec.yaml": BASE + "    sweep:\n      loras.luca.weight: [0.5]\n"}, "spec.yaml", 14,
     "jobs.main.sweep.loras.luca.weight", "LoRA `luca` is not in the registry"),
    ("references_match_nothing", {"spec.yaml": BASE.replace("    description: a hero\n", "    description: a hero\n    references: [refs/*.png]\n")},
     "spec.yaml", 6, "characters.hero.references[0]", "matches no file"),
    ("incomplete_preset", {"spec.yaml": "presets:\n  tiny: {width: 64}\n" + BASE}, "spec.yaml", 2, "presets.tiny",
     "preset `tiny` does not set num_inference_steps, height, guidance_scale, scheduler"),
    ("yaml_syntax", {"spec.yaml": BASE + "    seeds: [1, 2\n"}, "spec.yaml", 14, "", "invalid YAML"),
    ("lora_not_safetensors", {"spec.yaml": BASE.replace("hero.safetensors", "pose.png")}, "spec.yaml", 2,
     "loras.hero_lora.path", "LoRA files must be .safetensors"),
    ("error_in_included_file", {"spec.yaml": "include: [reg.yaml]\n" + BASE.replace("loras:\n  hero_lora: {path: hero.safetensors, kind: character}\n", ""),
                                "reg.yaml": "# registry\nloras:\n  hero_lora: {path: hero.safetensors, kind: hero}\n"},
     "reg.yaml", 3, "loras.hero_lora.kind", "'character'"),
    # Input that used to end in a traceback or run for minutes (found by tests/test_spec_fuzz.py and the issue).
    ("deep_nesting", {"spec.yaml": BASE + "    negative_prompt: " + "[" * 5000 + "]" * 5000 + "\n"}, "spec.yaml", 13, "",
     "data nested more than 100 levels deep"),
    ("deep_through_aliases", {"spec.yaml": BASE + "x0: &x0 " + "[" * 60 + "1" + "]" * 60 + "\nx1: " + "[" * 60 + "*x0"
                              + "]" * 60 + "\n"}, "spec.yaml", 13, "", "nested more than 100 levels deep (counting aliases)"),
    ("control_character", {"spec.yaml": BASE + "    negative_prompt: a\x00b\n"}, "spec.yaml", 13, "",
     "control character U+0000 is not allowed"),
    ("huge_integer", {"spec.yaml": BASE + "    images_per_seed: " + "9" * 5000 + "\n"}, "spec.yaml", 13,
     "jobs.main.images_per_seed", "(5,000 characters) is too large"),
    ("mapping_as_key", {"spec.yaml": BASE + "    ? {{a: 1}: 2}\n    : 1\n"}, "spec.yaml", 13, "jobs.main",
     "a key must be a name (text), not a list or a mapping"),
    ("tag_does_not_fit", {"spec.yaml": BASE + "    negative_prompt: !!seq text\n"}, "spec.yaml", 13,
     "jobs.main.negative_prompt", "invalid YAML: expected a sequence node, but found scalar"),
    ("lone_surrogate_in_text", {"spec.yaml": BASE.replace("description: a hero", 'description: "a \\ud800 hero"')},
     "spec.yaml", 5, "characters.hero.description", "lone UTF-16 surrogate"),
    ("huge_yaml_directive", {"spec.yaml": "%YAML " + "9" * 5000 + ".1\n---\n" + BASE}, "spec.yaml", 1, "",
     "invalid YAML directive"),
    ("path_nul", {"spec.yaml": BASE.replace("hero.safetensors", '"he\\0ro.safetensors"')}, "spec.yaml", 2,
     "loras.hero_lora.path", "contains a NUL character"),
    ("path_surrogate", {"spec.yaml": BASE.replace("hero.safetensors", '"\\ud800.safetensors"')}, "spec.yaml", 2,
     "loras.hero_lora.path", "a lone UTF-16 surrogate"),
    ("path_too_long", {"spec.yaml": BASE.replace("hero.safetensors", "a" * 300 + ".safetensors")}, "spec.yaml", 2,
     "loras.hero_lora.path", "is too long: file names hold at most 255 bytes"),
    ("include_nul", {"spec.yaml": 'include: ["a\\0.yaml"]\n' + BASE}, "spec.yaml", 1, "include[0]", "contains a NUL character"),
    ("template_loop", {"spec.yaml": BASE.replace("{{ character }} in a park",
                                                 "{% for a in range(99999) %}{% for b in range(99999) %}x{% endfor %}{% endfor %}")},
     "spec.yaml", 8, "scenes.park.prompt", "`for` loops are not allowed in prompts"),
    ("template_power", {"spec.yaml": BASE.replace("{{ character }} in a park", "{{ 9**9**9 }}")}, "spec.yaml", 8,
     "scenes.park.prompt", "the `**` operator"),
    ("template_size_filter", {"spec.yaml": BASE.replace("{{ character }} in a park", "{{ character|center(1000000000) }}")},
     "spec.yaml", 8, "scenes.park.prompt", "filter `center` is not allowed"),
    ("template_recursion", {"spec.yaml": BASE.replace("{{ character }} in a park",
                                                      "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}")},
     "spec.yaml", 8, "scenes.park.prompt", "macros are not allowed"),
    ("template_nested", {"spec.yaml": BASE.replace("{{ character }} in a park", "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}")},
     "spec.yaml", 8, "scenes.park.prompt", "nested too deeply"),
    ("name_clash_across_includes", {"spec.yaml": "include: [reg.yaml]\n" + BASE,
                                    "reg.yaml": "loras:\n  hero_lora: {path: hero.safetensors, kind: character}\n"},
     "reg.yaml", 2, "loras.hero_lora", "already defined at spec.yaml:3"),
]


@pytest.mark.parametrize("name,files,file,line,field,message", CASES, ids=[c[0] for c in CASES])
def test_broken_spec_is_located(tmp_path, name, files, file, line, field, message):
    root = project(tmp_path)
    for fname, text in files.items():
        if fname == "@symlink":
            outside = tmp_path / "outside.safetensors"
            outside.write_bytes(b"x")
            os.symlink(outside, root / text)
        else:
            (root / fname).write_text(text)
    started = time.perf_counter()
    with pytest.raises(SpecErrors) as caught:
        load_spec([root / "spec.yaml"])
    elapsed = time.perf_counter() - started
    assert elapsed < 5, f"{name}: validation took {elapsed:.1f}s"
    matching = [e for e in caught.value.errors if e.file == file and e.line == line and e.path == field]
    assert matching, f"no error at {file}:{line} {field!r}; got:\n{caught.value}"
    assert any(message in e.message for e in matching), f"message lacks {message!r}; got:\n{caught.value}"


def test_python_tag_executes_nothing(tmp_path):
    root = project(tmp_path)
    sentinel = root / "pwned"
    (root / "spec.yaml").write_text(BASE + f"    negative_prompt: !!python/object/apply:os.system ['touch {sentinel}']\n")
    with pytest.raises(SpecErrors):
        load_spec([root / "spec.yaml"])
    assert not sentinel.exists()


def test_alias_bomb_fails_fast(tmp_path):
    root = project(tmp_path)
    (root / "spec.yaml").write_text(BOMB)
    assert len(BOMB) < 400
    started = time.perf_counter()
    with pytest.raises(SpecErrors, match="alias bomb"):
        load_spec([root / "spec.yaml"])
    assert time.perf_counter() - started < 1.0


def test_all_errors_of_a_file_reported_at_once(tmp_path):
    root = project(tmp_path)
    text = BASE.replace("characters: [hero]", "characters: [villain]").replace("scenes: [park]", "scenes: [moon]")
    (root / "spec.yaml").write_text(text + "    guidance: 3\n")
    with pytest.raises(SpecErrors) as caught:
        load_spec([root / "spec.yaml"])
    # the schema error is reported; cross-references need a valid schema first
    assert [e.line for e in caught.value.errors] == [13]
    (root / "spec.yaml").write_text(text)
    with pytest.raises(SpecErrors) as caught:
        load_spec([root / "spec.yaml"])
    assert [(e.line, e.path) for e in caught.value.errors] == [(11, "jobs.main.characters[0]"), (12, "jobs.main.scenes[0]")]


def test_override_errors_name_the_override(tmp_path):
    root = project(tmp_path)
    (root / "spec.yaml").write_text(BASE)
    with pytest.raises(SpecErrors) as caught:
        load_spec([root / "spec.yaml"], overrides=["jobs.main.images_per_seed=lots"])
    (error,) = caught.value.errors
    assert error.file == "<command line> -s jobs.main.images_per_seed=lots"
    assert error.path == "jobs.main.images_per_seed"


def test_override_applies(tmp_path):
    root = project(tmp_path)
    (root / "spec.yaml").write_text(BASE)
    loaded = load_spec([root / "spec.yaml"], overrides=["defaults.preset=draft", "jobs.main.seeds=[3, 4]"])
    assert loaded.spec.defaults.preset == "draft"
    assert loaded.spec.jobs["main"].seeds == [3, 4]


def test_training_spec_with_a_list_as_kind(tmp_path):
    from schemas.kinds import validate_file

    root = project(tmp_path)
    (root / "train.yaml").write_text("kind: []\ndataset: null\n")
    with pytest.raises(SpecErrors) as caught:
        validate_file(root / "train.yaml")
    assert any(e.path == "kind" and e.line == 1 for e in caught.value.errors), str(caught.value)


def test_depth_limit_allows_a_realistic_spec(tmp_path):
    root = project(tmp_path)
    (root / "spec.yaml").write_text(BASE + "    negative_prompt: " + "[" * 50 + "]" * 50 + "\n")
    with pytest.raises(SpecErrors) as caught:  # 50 levels parse; the schema then refuses the list
        load_spec([root / "spec.yaml"])
    assert "nested" not in str(caught.value)
