"""Expansion: counts, key stability and key sensitivity, purity."""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
from pathlib import Path

import pytest

from schemas.expand import derive_seed, expand
from schemas.plan import compute_digests, load_plan
from schemas.spec_loader import load_spec

SPEC = """\
loras:
  hero_lora: {path: hero.safetensors, kind: character, trigger_words: [herotok], weight: 0.7}
  bg_lora: {path: bg.safetensors, kind: background, trigger_words: [parkstyle]}
defaults:
  preset: draft
  style: watercolour
presets:
  draft: {width: 64, height: 64, num_inference_steps: 4}
characters:
  hero:
    description: a hero with a red cape
    trigger_words: [hero]
    loras: [hero_lora]
  sidekick:
    description: a small dog
scenes:
  park:
    prompt: "{{ character }} in a park"
    loras: [{name: bg_lora, weight: 0.3}]
  moon:
    prompt: "{{ character }} on the moon"
    controls: [{type: canny, image: pose.png, scale: 0.5}]
jobs:
  main:
    characters: [hero, sidekick]
    scenes: [park, moon]
    presets: [draft, high]
    seeds: {count: 3, start: 10}
  sweep:
    characters: [hero]
    scenes: [moon]
    seeds: [1]
    images_per_seed: 2
    sweep:
      loras.hero_lora.weight: [0.0, 0.5, 1.0]
      guidance_scale: [3, 7]
      controls.canny.scale: [0.2, 0.9]
  base:
    characters: [hero]
    scenes: [park]
    use_loras: false
"""


@pytest.fixture()
def proj(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    (root / ".git").mkdir(parents=True)
    (root / "hero.safetensors").write_bytes(b"hero-v1")
    (root / "bg.safetensors").write_bytes(b"bg-v1")
    (root / "pose.png").write_bytes(b"pose")
    (root / "spec.yaml").write_text(SPEC)
    return root


def keys_by_name(root: Path, text: str | None = None) -> dict[str, str]:
    if text is not None:
        (root / "spec.yaml").write_text(text)
    return {job.name: job.key for job in load_plan([root / "spec.yaml"]).jobs}


def test_job_counts(proj):
    jobs = load_plan([proj / "spec.yaml"]).jobs
    by_matrix = {}
    for job in jobs:
        by_matrix[job.job] = by_matrix.get(job.job, 0) + 1
    assert by_matrix == {"main": 2 * 2 * 2 * 3, "sweep": 1 * 1 * 1 * 2 * 3 * 2 * 2, "base": 1}
    assert len({job.name for job in jobs}) == len(jobs), "output names must be unique"


def test_resolution_rules(proj):
    jobs = {job.name: job for job in load_plan([proj / "spec.yaml"]).jobs}
    job = jobs["main/hero/park/draft/seed-10"]
    # character LoRA (registry weight), then the scene's; trigger words prepended (by LoRA name), style appended
    assert [(l.name, l.weight) for l in job.loras] == [("hero_lora", 0.7), ("bg_lora", 0.3)]
    assert job.prompt == "parkstyle, herotok, hero, a hero with a red cape in a park, watercolour"
    assert (job.width, job.height, job.num_inference_steps, job.scheduler) == (64, 64, 4, "euler_a")
    high = jobs["main/hero/park/high/seed-10"]
    assert (high.width, high.num_inference_steps, high.scheduler) == (1024, 40, "dpmpp_2m_karras")
    base = jobs["base/hero/park/draft/seed-0"]
    assert base.loras == () and base.prompt == "hero, a hero with a red cape in a park, watercolour"
    swept = jobs["sweep/hero/moon/draft/seed-1-i1-canny=0.9-cfg=7-hero_lora=0.5"]
    assert [(l.name, l.weight) for l in swept.loras] == [("hero_lora", 0.5)]
    assert swept.guidance_scale == 7.0 and swept.controls[0].scale == 0.9
    assert swept.seed == derive_seed(1, 1, 0) != 1
    assert swept.sweep == {"loras.hero_lora.weight": 0.5, "guidance_scale": 7, "controls.canny.scale": 0.9}


def _reverse_mappings(data):
    if isinstance(data, dict):
        return {k: _reverse_mappings(data[k]) for k in reversed(list(data))}
    if isinstance(data, list):
        return [_reverse_mappings(v) for v in data]
    return data


def test_reordering_changes_no_key(proj):
    from io import StringIO

    from ruamel.yaml import YAML

    before = keys_by_name(proj)
    yaml = YAML(typ="safe", pure=True)
    out = StringIO()
    YAML().dump(_reverse_mappings(yaml.load(SPEC)), out)  # round-trip dumper keeps our order
    assert out.getvalue().index("jobs:") < out.getvalue().index("loras:")
    after = keys_by_name(proj, out.getvalue())
    assert after == before


def test_editing_one_scene_changes_only_its_keys(proj):
    before = keys_by_name(proj)
    after = keys_by_name(proj, SPEC.replace("on the moon", "on the moon at night"))
    changed = {n for n in before if before[n] != after[n]}
    assert changed == {n for n in before if "/moon/" in n}
    assert changed


def test_touching_a_lora_file_changes_only_its_jobs(proj):
    before = {j.name: j for j in load_plan([proj / "spec.yaml"]).jobs}
    (proj / "bg.safetensors").write_bytes(b"bg-v2")
    after = keys_by_name(proj)
    changed = {n for n in before if before[n].key != after[n]}
    assert changed == {n for n, j in before.items() if any(l.name == "bg_lora" for l in j.loras)}
    assert changed


def test_stack_order_does_not_change_the_key(proj):
    a = keys_by_name(proj, SPEC.replace("    loras: [hero_lora]\n", "    loras: [hero_lora, bg_lora:0.3]\n")
                     .replace("    loras: [{name: bg_lora, weight: 0.3}]\n", ""))
    b = keys_by_name(proj, SPEC.replace("    loras: [hero_lora]\n", "    loras: [bg_lora:0.3, hero_lora]\n")
                     .replace("    loras: [{name: bg_lora, weight: 0.3}]\n", ""))
    assert a == b


def test_expand_is_pure(proj, monkeypatch):
    loaded = load_spec([proj / "spec.yaml"])
    digests = compute_digests(loaded.spec, loaded.root)

    def no_io(*args, **kwargs):
        raise AssertionError("expand must not read files")

    monkeypatch.setattr(builtins, "open", no_io)
    first = expand(loaded.spec, digests)
    second = expand(loaded.spec, digests)
    assert [j.model_dump() for j in first] == [j.model_dump() for j in second]


def test_every_file_under_specs_validates(repo_root):
    files = sorted((repo_root / "specs").rglob("*.yaml"))
    assert files
    result = subprocess.run([sys.executable, "-m", "castbook", "validate", *map(str, files)],
                            capture_output=True, text=True, cwd=repo_root)
    assert result.returncode == 0, result.stderr


def test_cli_validate_points_at_the_line(tmp_path, proj):
    (proj / "spec.yaml").write_text(SPEC.replace("    seeds: [1]\n", "    seeds: [1]\n    guidance: 2\n"))
    result = subprocess.run([sys.executable, "-m", "castbook", "validate", str(proj / "spec.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    line = SPEC.split("\n").index("    seeds: [1]") + 2
    assert f"spec.yaml:{line}:5: jobs.sweep.guidance: unknown key `guidance`; did you mean `guidance_scale`?" in result.stderr


def test_cli_plan_json_and_only(proj):
    result = subprocess.run([sys.executable, "-m", "castbook", "plan", str(proj / "spec.yaml"), "--json",
                             "--only", "base", "-s", "defaults.style=ink"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    jobs = json.loads(result.stdout)
    assert len(jobs) == 1 and jobs[0]["prompt"].endswith(", ink") and len(jobs[0]["key"]) == 64


def test_committed_json_schema_is_current(repo_root):
    from castbook.commands.schema import spec_json_schema

    committed = json.loads((repo_root / "castbook.schema.json").read_text())
    assert committed == spec_json_schema(), "run: castbook schema > castbook.schema.json"


def test_a_vae_override_is_in_every_key_and_its_bytes_matter(proj):
    from schemas.loader import SpecErrors

    before = keys_by_name(proj)
    vae = proj / "vae-fp16-fix"
    vae.mkdir()
    (vae / "config.json").write_text("{}")
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"vae-v1")
    with_vae = keys_by_name(proj, SPEC + "performance: {vae: vae-fp16-fix}\n")
    assert set(with_vae) == set(before) and all(with_vae[n] != before[n] for n in before)
    job = load_plan([proj / "spec.yaml"]).jobs[0]
    assert job.vae.ref == "vae-fp16-fix" and job.vae.kind == "diffusers"
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"vae-v2")
    assert all(v != with_vae[n] for n, v in keys_by_name(proj).items())
    # without the field, keys are exactly what they were before the field existed
    assert keys_by_name(proj, SPEC) == before
    for bad, message in (("../outside", "outside the project root"), ("vae.safetensors", "single file"),
                         ("builtin:tiny-sdxl", "already has its own VAE"), ("missing", "not found")):
        (proj / "spec.yaml").write_text(SPEC + f"performance: {{vae: '{bad}'}}\n")
        with pytest.raises(SpecErrors) as err:
            load_plan([proj / "spec.yaml"])
        assert "performance.vae" in str(err.value) and message in str(err.value), (bad, str(err.value))


# --- few-step samplers: the fast preset, registry recommendations, keys over scheduler configs ---

FAST = SPEC.replace(
    "  bg_lora: {path: bg.safetensors, kind: background, trigger_words: [parkstyle]}",
    "  bg_lora: {path: bg.safetensors, kind: background, trigger_words: [parkstyle]}\n"
    "  lightning: {path: bg.safetensors, kind: style, recommended: {scheduler: euler_trailing, "
    "num_inference_steps: 4, guidance_scale: 1.0}}\n"
    "  lcm_lora: {path: hero.safetensors, kind: style, recommended: {scheduler: lcm, num_inference_steps: 6}}",
).replace("""  base:
    characters: [hero]
    scenes: [park]
    use_loras: false
""", """  base:
    characters: [hero]
    scenes: [park]
    use_loras: false
  quick:
    characters: [sidekick]
    scenes: [park]
    presets: [fast]
  distilled:
    characters: [sidekick]
    scenes: [park]
    loras: [lightning]
    use_recommended: true
  distilled_own_steps:
    characters: [sidekick]
    scenes: [park]
    loras: [lightning]
    use_recommended: true
    num_inference_steps: 8
  ignores_recommendation:
    characters: [sidekick]
    scenes: [park]
    loras: [lightning]
""")


def _jobs(root: Path, text: str) -> dict:
    (root / "spec.yaml").write_text(text)
    return {j.job: j for j in load_plan([root / "spec.yaml"]).jobs}


def test_fast_preset_and_recommended_settings_layer_as_documented(proj):
    jobs = _jobs(proj, FAST)
    quick = jobs["quick"]
    assert (quick.scheduler, quick.num_inference_steps, quick.guidance_scale) == ("euler_trailing", 4, 1.0)
    distilled = jobs["distilled"]
    assert (distilled.scheduler, distilled.num_inference_steps, distilled.guidance_scale) == ("euler_trailing", 4, 1.0)
    assert jobs["distilled_own_steps"].num_inference_steps == 8  # the job's own value wins
    assert jobs["distilled_own_steps"].scheduler == "euler_trailing"
    plain = jobs["ignores_recommendation"]  # without use_recommended the preset's settings stay
    assert (plain.scheduler, plain.num_inference_steps) == ("euler_a", 4)


def test_conflicting_recommendations_are_an_error_naming_both_loras(proj):
    from core.errors import CastbookError

    text = FAST.replace("loras: [lightning]\n    use_recommended: true\n    num_inference_steps: 8",
                        "loras: [lightning, lcm_lora]\n    use_recommended: true\n    num_inference_steps: 8")
    with pytest.raises(CastbookError, match="`lcm_lora` and `lightning` recommend different scheduler"):
        _jobs(proj, text)


def test_keys_cover_the_scheduler_config_not_only_its_name(proj, monkeypatch):
    from schemas import schedulers

    before = _jobs(proj, FAST)
    recipe = schedulers.SCHEDULERS["euler_trailing"]
    monkeypatch.setitem(schedulers.SCHEDULERS, "euler_trailing",
                        recipe.model_copy(update={"config": {"timestep_spacing": "leading"}}))
    after = _jobs(proj, FAST)
    assert before["quick"].key != after["quick"].key
    assert before["base"].key == after["base"].key  # other schedulers' keys stay


# --- prompts longer than the text encoders take ------------------------------------------------

def test_a_prompt_past_77_tokens_is_a_located_error_in_validate_and_plan(proj):
    from castbook.cli import main
    from schemas.loader import SpecErrors

    long_style = ", ".join(f"detail{i}" for i in range(40))  # ~80 tokens after the prompt
    text = SPEC.replace("  style: watercolour", f"  style: {long_style}")
    (proj / "spec.yaml").write_text(text)
    with pytest.raises(SpecErrors) as info:
        load_plan([proj / "spec.yaml"])
    messages = [str(e) for e in info.value.errors]
    park = next(m for m in messages if "scenes.park.prompt" in m)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if l.startswith("  park:")) + 1
    assert park.startswith(f"spec.yaml:{line}:")
    assert "tokens; the text encoders take 77" in park and "detail39" in park
    # validate finds it too, without hashing any file
    assert main(["validate", str(proj / "spec.yaml")]) == 2
    # the same spec with a short style is fine
    (proj / "spec.yaml").write_text(SPEC)
    assert load_plan([proj / "spec.yaml"]).jobs


def test_the_count_is_the_shipped_clip_tokenizer_s():
    from schemas.prompt_length import SHIPPED_CLIP_TOKENIZER, _load, _overflow

    tokenizer, limit = _load(str(SHIPPED_CLIP_TOKENIZER))
    assert limit == 77
    words = " ".join(["cat"] * 75)  # 75 words + start + end = 77: fits exactly
    assert _overflow(tokenizer, limit, words) is None
    count, lost = _overflow(tokenizer, limit, words + " dog")
    assert (count, lost) == (78, "dog")
