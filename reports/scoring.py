"""Consistency scores of one run: per image, per character, best-of selection, gate.

Pure data in, plain JSON-ready dicts out; the embedding models come in as scorers.
See reports/RESULTS_SCHEMA.md for every field.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reports.identity import by_source, identity_source
from reports.metrics import ClipScorer, DinoScorer, ceiling, clip_i, cosine
from reports.rundir import Entry, Run

DEFAULT_THRESHOLD = 0.65
# Gate rule: a character passes when at least this fraction of its selected images
# has CLIP-I mean >= its threshold. A spec (run.json characters.<name>.min_pass_rate)
# may set its own; 0.8 tolerates the odd bad seed but not a drifting character.
# Images of job matrices with `gate: false` (run.json characters.<name>.ungated_jobs)
# are scored and shown but left out of this fraction.
DEFAULT_MIN_PASS_RATE = 0.8
OK_STATUSES = ("rendered", "cached")


def make_scorers(run: Run, cache_dir: Path | None) -> tuple[ClipScorer, DinoScorer | None]:
    """Scorers from run.json `scoring` (`model`, `weights`, optional `dino`); paths relative to the root."""
    cfg = run.info.get("scoring") or {}
    model = cfg.get("model") or "builtin:tiny-clip"
    weights = cfg.get("weights")
    clip = ClipScorer(model, _under(run.root, weights) if weights else None, cache_dir=cache_dir)
    dino_cfg = cfg.get("dino")
    if isinstance(dino_cfg, dict):
        dino_cfg = dino_cfg.get("weights")
    dino = DinoScorer(_under(run.root, dino_cfg), cache_dir=cache_dir) if dino_cfg else None
    return clip, dino


def _under(root: Path, p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else root / path


def reference_embeddings(run: Run, clip: ClipScorer, dino: DinoScorer | None) -> dict[str, dict]:
    """Per character: reference paths, digests, embeddings (embedded once per run), ceiling."""
    out: dict[str, dict] = {}
    for name, char in sorted((run.info.get("characters") or {}).items()):
        refs = [str(r) for r in char.get("references") or []]
        paths = [_under(run.root, r) for r in refs]
        missing = [r for r, p in zip(refs, paths) if not p.is_file()]
        entry = {
            "description": char.get("description") or "",
            "threshold": float(char["threshold"]) if char.get("threshold") is not None else DEFAULT_THRESHOLD,
            "min_pass_rate": float(char["min_pass_rate"]) if char.get("min_pass_rate") is not None
            else DEFAULT_MIN_PASS_RATE,
            "references": [{"path": r, "abs_path": str(p), "digest": None} for r, p in zip(refs, paths)],
            # Job matrices with `gate: false` (schemas.plan.character_info); runs written before
            # the field existed have none, so every job counts, as it did then.
            "ungated_jobs": sorted(str(j) for j in char.get("ungated_jobs") or []),
            "clip": None, "dino": None, "ceiling": None, "dino_ceiling": None, "error": None,
        }
        if missing:
            entry["error"] = (f"reference image(s) not found: {', '.join(missing)} "
                              f"(relative to the project root {run.root})")
        elif not refs:
            entry["error"] = f"character {name!r} has no reference images; add `references:` to the spec"
        else:
            for ref, p in zip(entry["references"], paths):
                ref["digest"] = clip.image_digest(p)
            entry["clip"] = clip.embed_images(paths)
            entry["ceiling"] = ceiling(entry["clip"])
            if dino is not None:
                entry["dino"] = dino.embed_images(paths)
                entry["dino_ceiling"] = ceiling(entry["dino"])
        out[name] = entry
    return out


def score_images(run: Run, refs: dict[str, dict], clip: ClipScorer, dino: DinoScorer | None) -> list[dict]:
    """One record per planned job, with scores for every job that has an image."""
    records = [_base_record(run, e) for e in run.entries]
    scorable = [(r, run.path / r["image"]) for r in records if r["image_ok"]]
    if scorable:
        img = clip.embed_images([p for _, p in scorable])
        txt = clip.embed_texts([r["prompt"] for r, _ in scorable])
        dvecs = dino.embed_images([p for _, p in scorable]) if dino is not None else None
        for i, (r, p) in enumerate(scorable):
            r["image_digest"] = clip.image_digest(p)
            r["clip_t"] = _round(cosine(img[i], txt[i]))
            char = refs.get(r["character"]) if r["character"] else None
            if char is None or char["clip"] is None:
                continue
            mean, best = clip_i(img[i], char["clip"])
            r["clip_i_mean"], r["clip_i_best"] = _round(mean), _round(best)
            if char["ceiling"]:
                r["clip_i_ratio"] = _round(mean / char["ceiling"])
            if dvecs is not None and char["dino"] is not None:
                r["dino_mean"] = _round(clip_i(dvecs[i], char["dino"])[0])
            r["pass"] = mean >= char["threshold"]
    for r in records:
        del r["image_ok"]
    return records


def _base_record(run: Run, e: Entry) -> dict:
    j, led = e.job, e.ledger or {}
    image = e.image if e.status in OK_STATUSES else None
    image_ok = image is not None and (run.path / image).is_file()
    error = led.get("error")
    if image is not None and not image_ok:
        error = f"image file missing: {image}"
    elif e.status in OK_STATUSES and image is None:
        error = "ledger line has no image"
    return {
        "key": j["key"], "name": j["name"], "job": j.get("job"), "character": j.get("character"),
        "scene": j.get("scene"), "preset": j.get("preset"), "seed": j.get("seed"),
        "prompt": j.get("prompt", ""), "sweep": j.get("sweep") or {},
        "best_of_group": j.get("best_of_group"), "candidate": j.get("candidate", 0),
        "status": e.status, "error": error, "image": image if image_ok else None,
        "image_digest": None, "image_ok": image_ok,
        "clip_i_mean": None, "clip_i_best": None, "clip_i_ratio": None, "clip_t": None, "dino_mean": None,
        "pass": None, "selected": True,
        "identity_source": identity_source(j),
    }


def select_best_of(records: list[dict]) -> dict[str, dict]:
    """Keep one candidate per best_of_group: highest CLIP-I mean, ties by CLIP-T, then lowest
    candidate index. Marks `selected` on every record; returns the selection per group."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        if r["best_of_group"]:
            groups.setdefault(r["best_of_group"], []).append(r)
    selection: dict[str, dict] = {}
    for group, cands in sorted(groups.items()):
        scored = [c for c in cands if c["image"] is not None]
        winner = None
        if scored:
            winner = min(scored, key=lambda c: (-_num(c["clip_i_mean"]), -_num(c["clip_t"]), c["candidate"]))
        for c in cands:
            c["selected"] = c is winner
        selection[group] = {
            "selected_key": winner["key"] if winner else None,
            "selected_name": winner["name"] if winner else None,
            "candidates": [{"key": c["key"], "name": c["name"], "candidate": c["candidate"],
                            "clip_i_mean": c["clip_i_mean"], "clip_t": c["clip_t"], "status": c["status"]}
                           for c in sorted(cands, key=lambda c: c["candidate"])],
        }
    return selection


def summarize_characters(records: list[dict], refs: dict[str, dict]) -> dict[str, dict]:
    """Per character: counts, means, min, pass rate over *selected* images of gated jobs only;
    gate verdict; and the same counts per job matrix (`by_job`), ungated ones included."""
    out: dict[str, dict] = {}
    names = sorted(set(refs) | {r["character"] for r in records if r["character"]})
    for name in names:
        ref = refs.get(name)
        ungated = set(ref["ungated_jobs"]) if ref else set()
        everything = [r for r in records if r["character"] == name]
        # Ungated jobs (baselines, sweeps to weight 0) are expected to look less like the
        # character: they are reported per job below, but never move the gate.
        mine = [r for r in everything if r["job"] not in ungated]
        sel = [r for r in mine if r["selected"] and r["clip_i_mean"] is not None]
        passed = sum(1 for r in sel if r["pass"])
        pass_rate = passed / len(sel) if sel else None
        min_rate = ref["min_pass_rate"] if ref else DEFAULT_MIN_PASS_RATE
        error = ref["error"] if ref else (f"character {name!r} is used by jobs but has no entry in run.json "
                                          "`characters`; it cannot be scored")
        vals = [r["clip_i_mean"] for r in sel]
        out[name] = {
            "description": ref["description"] if ref else "",
            "threshold": ref["threshold"] if ref else DEFAULT_THRESHOLD,
            "min_pass_rate": min_rate,
            "references": [{"path": x["path"], "digest": x["digest"]} for x in (ref["references"] if ref else [])],
            "ceiling": _round(ref["ceiling"]) if ref and ref["ceiling"] is not None else None,
            "dino_ceiling": _round(ref["dino_ceiling"]) if ref and ref["dino_ceiling"] is not None else None,
            "jobs": len(mine),
            "selected": len(sel),
            "passed": passed,
            "failed": len(sel) - passed,
            "pass_rate": _round(pass_rate) if pass_rate is not None else None,
            "clip_i_mean": _stats(vals),
            "clip_i_best_mean": _mean([r["clip_i_best"] for r in sel]),
            "clip_i_ratio_mean": _mean([r["clip_i_ratio"] for r in sel if r["clip_i_ratio"] is not None]),
            "clip_t_mean": _mean([r["clip_t"] for r in sel if r["clip_t"] is not None]),
            "dino_mean": _mean([r["dino_mean"] for r in sel if r["dino_mean"] is not None]),
            "gate_passed": (pass_rate >= min_rate) if pass_rate is not None else (error is None),
            "error": error,
            "ungated_jobs": sorted(ungated),
            "by_job": _by_job(everything, ungated, min_rate),
            "by_source": by_source(everything),  # LoRA only / adapter only / both (reports/identity.py)
        }
    return out


def _by_job(records: list[dict], ungated: set[str], min_rate: float) -> dict[str, dict]:
    """One character's selected, scored images per job matrix, by job name. `would_pass` is
    the verdict the job would get on its own (what a baseline *would* score against the gate)."""
    out: dict[str, dict] = {}
    # Sorted, not plan order: results.json is written with sorted keys, and the page should agree.
    for job in sorted({r["job"] for r in records}):
        sel = [r for r in records if r["job"] == job and r["selected"] and r["clip_i_mean"] is not None]
        passed = sum(1 for r in sel if r["pass"])
        rate = passed / len(sel) if sel else None
        out[job] = {
            "selected": len(sel),
            "passed": passed,
            "pass_rate": _round(rate),
            "clip_i_mean": _mean([r["clip_i_mean"] for r in sel]),
            "gated": job not in ungated,
            "would_pass": (rate >= min_rate) if rate is not None else None,
        }
    return out


def gate(characters: dict[str, dict], records: list[dict]) -> dict:
    """The `castbook check` verdict: fails on any failed/unfinished job, any character below
    its min pass rate, or any character that could not be scored."""
    failures: list[str] = []
    for r in records:
        if r["status"] == "failed":
            failures.append(f"job {r['name']} failed: {r['error'] or 'no error message'}")
        elif r["status"] == "missing":
            failures.append(f"job {r['name']} never finished (no ledger line); re-run the render to resume")
        elif r["error"]:
            failures.append(f"job {r['name']}: {r['error']}")
    for name, c in characters.items():
        if c["error"] and c["jobs"]:
            failures.append(f"character {name}: {c['error']}")
        elif c["pass_rate"] is not None and c["pass_rate"] < c["min_pass_rate"]:
            failures.append(f"character {name}: pass rate {c['pass_rate']:.2f} ({c['passed']}/{c['selected']} "
                            f"images with CLIP-I >= {c['threshold']:.2f}) is below the gate {c['min_pass_rate']:.2f}")
    return {"passed": not failures, "failures": failures}


def _num(v: float | None) -> float:
    return float("-inf") if v is None else float(v)


def _round(v: float | None) -> float | None:
    return None if v is None else round(float(v), 6)


def _mean(vals: list[float]) -> float | None:
    return _round(float(np.mean(vals))) if vals else None


def _stats(vals: list[float]) -> dict:
    if not vals:
        return {"mean": None, "min": None, "max": None}
    return {"mean": _round(float(np.mean(vals))), "min": _round(min(vals)), "max": _round(max(vals))}
