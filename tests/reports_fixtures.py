"""Build run directories in the docs/INTERFACES.md format for the reports tests.

Real PNGs (PIL), real plan lines (`RenderJob(...).model_dump(mode="json")`), real
ledger lines. No renderer needed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from PIL import Image, ImageDraw

from schemas.job import RenderJob, ResolvedModel

BASE = ResolvedModel(ref="builtin:tiny-sdxl", kind="builtin", digest="builtin:tiny-sdxl@1")


def draw(kind: str, variant: int = 0, size: int = 64) -> Image.Image:
    """Distinct, structured test pictures: 'circle' (a red disc), 'stripes' (blue bars),
    'checker' (green squares). `variant` shifts the shape a little."""
    im = Image.new("RGB", (size, size), (245, 245, 240))
    d = ImageDraw.Draw(im)
    if kind == "circle":
        o = 8 + 2 * variant
        d.ellipse([o, o, size - 12 + variant, size - 12 + variant], fill=(200, 30, 40))
    elif kind == "stripes":
        for x in range(variant % 4, size, 12):
            d.rectangle([x, 0, x + 5, size], fill=(20, 60, 200))
    elif kind == "checker":
        step = 8 + variant
        for y in range(0, size, step):
            for x in range((y // step) % 2 * step, size, 2 * step):
                d.rectangle([x, y, x + step - 1, y + step - 1], fill=(30, 160, 60))
    else:
        raise ValueError(f"unknown test picture kind {kind!r}")
    return im


def save_png(im: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="PNG")
    return path


def make_job(character: str | None, scene: str, preset: str = "draft", seed: int = 1, prompt: str | None = None,
             job: str = "main", sweep: dict | None = None, best_of_group: str | None = None,
             candidate: int = 0, steps: int = 4) -> RenderJob:
    sweep = sweep or {}
    suffix = "".join(f"-{k}-{v}" for k, v in sorted(sweep.items()))
    if best_of_group:
        suffix += f"-c{candidate}"
    name = f"{job}/{character or '_'}/{scene}/{preset}/seed-{seed}{suffix}"
    j = RenderJob(key="0" * 64, name=name, job=job, character=character, scene=scene, preset=preset,
                  prompt=prompt if prompt is not None else f"{character} at the {scene}", negative_prompt="",
                  seed=seed, width=64, height=64, num_inference_steps=steps, guidance_scale=5.0,
                  scheduler="euler", dtype="fp32", base_model=BASE, sweep=sweep,
                  best_of_group=best_of_group, candidate=candidate)
    # The real key hashes pixel fields only; the name is added here so that test jobs
    # that differ only in their labels (scene, sweep value) still get distinct keys.
    key = hashlib.sha256(json.dumps([j.pixel_fields(), name], sort_keys=True).encode()).hexdigest()
    return j.model_copy(update={"key": key})


def build_run(out_root: Path, run_id: str, root: Path, items: list[dict], characters: dict,
              spec_files: tuple[str, ...] = ("specs/test.yaml",), scoring: dict | None = None,
              status: str = "finished") -> Path:
    """Write DIR/<run_id>/ with run.json, plan.jsonl, manifest.jsonl and images.

    Each item: {"job": RenderJob, "picture": PIL image or None, "status": "rendered"|"cached"|"failed"|None
    (None: no ledger line), "error": str, "seconds": float, "peak": int, "lora_switched": bool}.
    """
    run_dir = Path(out_root) / run_id
    run_dir.mkdir(parents=True)
    counts = {"total": len(items), "rendered": 0, "cached": 0, "failed": 0}
    plan_lines, ledger_lines = [], []
    for it in items:
        job: RenderJob = it["job"]
        plan_lines.append(json.dumps(job.model_dump(mode="json"), sort_keys=True))
        st = it.get("status", "rendered")
        if st is None:
            continue
        counts[st] += 1
        image = None
        if st != "failed":
            image = f"images/{job.name}.png"
            save_png(it["picture"], run_dir / image)
        seconds = it.get("seconds", 0.5)
        ledger_lines.append(json.dumps({
            "key": job.key, "name": job.name, "status": st, "image": image, "seconds": seconds,
            "steps": job.num_inference_steps, "peak_memory_bytes": it.get("peak", 400 * 2**20),
            "timings": {"denoise_s": seconds * 0.8, "total_s": seconds, "lora_load_s": 0.01},
            "lora_switched": it.get("lora_switched", False), "fallback": None,
            "error": it.get("error") if st == "failed" else None, "control_maps": [], "actor": 0,
            "finished_at": "2026-11-30T03:15:10Z"}))
    (run_dir / "plan.jsonl").write_text("\n".join(plan_lines) + "\n")
    (run_dir / "manifest.jsonl").write_text("\n".join(ledger_lines) + ("\n" if ledger_lines else ""))
    info = {"run_id": run_id, "castbook_version": "0.1.0", "root": str(root), "spec_files": list(spec_files),
            "spec_digest": "ab" * 32, "git_commit": "abc1234", "started": "2026-11-30T03:15:00Z",
            "finished": "2026-11-30T03:16:00Z", "status": status, "counts": counts,
            "environment": {"python": "3.11.7", "castbook": "0.1.0", "torch": "2.14.1", "diffusers": "0.42.1",
                            "device": "cpu", "dtype": "fp32", "gpu": None, "hostname": "test"},
            "executor": "local", "actors": 1, "startup": {"ray_init_s": 0.0, "actor_start_s": 0.1,
                                                           "model_load_s": 0.4},
            "characters": characters, "scoring": scoring or {"model": "builtin:tiny-clip", "weights": None}}
    (run_dir / "run.json").write_text(json.dumps(info, indent=2))
    return run_dir


def make_refs(root: Path, name: str, kind: str, n: int = 2) -> list[str]:
    """Save n reference pictures under root/refs/<name>/ and return their root-relative paths."""
    rels = []
    for i in range(n):
        rel = f"refs/{name}/{name}_{i}.png"
        save_png(draw(kind, i), root / rel)
        rels.append(rel)
    return rels


# --- shared pytest fixtures (import them into a test module to use them) ------------------
import os  # noqa: E402

import pytest  # noqa: E402

XSS_SCRIPT = "<script>alert(1)</script>"
XSS_ATTR = '"><img src=x onerror=alert(1)>'


@pytest.fixture(scope="session")
def castbook_home(tmp_path_factory):
    """A private CASTBOOK_HOME so the built-in tiny-clip is built fresh for this session."""
    home = tmp_path_factory.mktemp("castbook-home")
    old = os.environ.get("CASTBOOK_HOME")
    os.environ["CASTBOOK_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("CASTBOOK_HOME", None)
    else:
        os.environ["CASTBOOK_HOME"] = old


def standard_items(slow: float = 0.5, xss: bool = True) -> list[dict]:
    """Two characters (luca: red disc, mia: blue stripes), a failed job, a best-of group,
    a 2-axis sweep and a job without a character."""
    p1 = f"luca {XSS_SCRIPT}" if xss else "luca at the beach"
    p2 = f"mia {XSS_ATTR}" if xss else "mia in the park"
    items = [
        {"job": make_job("luca", "beach", seed=1, prompt=p1), "picture": draw("circle", 0)},
        {"job": make_job("luca", "beach", seed=2, prompt=p1), "picture": draw("circle", 2)},
        {"job": make_job("luca", "city", seed=1), "picture": draw("circle", 1)},
        {"job": make_job("luca", "city", seed=2), "picture": draw("stripes", 1)},  # off-model: should fail
        {"job": make_job("mia", "park", seed=1, prompt=p2), "picture": draw("stripes", 0)},
        {"job": make_job("mia", "park", seed=2), "status": "failed",
         "error": f"out of memory {XSS_SCRIPT} {XSS_ATTR}"},
        {"job": make_job(None, "backdrop", seed=1), "picture": draw("checker", 0)},
    ]
    for c, kind in enumerate(["checker", "stripes", "circle"]):  # candidate 1 is mia's own reference
        items.append({"job": make_job("mia", "bestof", seed=10 + c, best_of_group="mia-bestof", candidate=c),
                      "picture": draw(kind, 0 if kind == "stripes" else 3)})
    for g in (4.0, 7.0):
        for st in (2, 4):
            items.append({"job": make_job("luca", "sweep", seed=3, sweep={"guidance_scale": g, "steps": st}),
                          "picture": draw("circle", int(g) % 3 + st // 2)})
    return [dict(i, seconds=slow) for i in items]


def standard_characters(root: Path, threshold: float = 0.97, description: str = "") -> dict:
    return {
        "luca": {"description": description or "red disc", "references": make_refs(root, "luca", "circle"),
                 "threshold": threshold},
        "mia": {"description": f"blue stripes {XSS_SCRIPT}", "references": make_refs(root, "mia", "stripes"),
                "threshold": threshold},
    }
