"""Everything the reports and `castbook check` know about a run, as one JSON-ready dict.

`analyze(run_dir)` scores the run (cached embeddings), picks best-of winners, applies
the gate, and gathers benchmark numbers, trends and the diff against the previous run.
The dict is written as results.json (schema: reports/RESULTS_SCHEMA.md).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reports import benchmark
from reports.diff import build_diff
from reports.metrics import ClipScorer, DinoScorer
from reports.rundir import Run, load_run, previous_runs
from reports.scoring import gate, make_scorers, reference_embeddings, score_images, select_best_of, summarize_characters

RESULTS_SCHEMA_VERSION = 1
_RUN_FIELDS = ("run_id", "castbook_version", "spec_files", "spec_digest", "git_commit", "started", "finished",
               "status", "counts", "environment", "executor", "actors", "startup")


@dataclass
class Analysis:
    run: Run
    results: dict
    refs: dict[str, dict]  # per character: embeddings and reference paths (not JSON)
    previous: Run | None
    clip: ClipScorer
    dino: DinoScorer | None


def embedding_cache_dir(run_dir: Path) -> Path:
    """`DIR/.cache/embeddings` of the output root that holds the run."""
    return Path(run_dir).resolve().parent / ".cache" / "embeddings"


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 6) if values else None


def analyze(run_dir: Path, history: bool = True, cache_dir: Path | None = None) -> Analysis:
    """Score a run and gather every number. With `history=False` skip trends and diff
    (what `castbook check` needs)."""
    # 1. read the run and set up scorers (models load lazily, on the first cache miss)
    run = load_run(Path(run_dir).resolve())
    clip, dino = make_scorers(run, cache_dir or embedding_cache_dir(run.path))
    # 2. references once per run, then every image
    refs = reference_embeddings(run, clip, dino)
    records = score_images(run, refs, clip, dino)
    # 3. best-of selection before any summary: only winners count
    selection = select_best_of(records)
    characters = summarize_characters(records, refs)
    verdict = gate(characters, records)
    # 4. benchmark, trends and diff against earlier runs of the same spec
    bench = benchmark.summarize(run)
    previous = None
    # What the gates count: selected, scored images of gated jobs (baselines with `gate: false`
    # and best-of losers are left out), so the summary agrees with every character's own mean.
    ungated = {(name, job) for name, c in characters.items() for job in c.get("ungated_jobs", [])}
    selected = [r for r in records if r["selected"]]
    gated = [r for r in selected if r["character"] and (r["character"], r["job"]) not in ungated]
    clip_i_mean = _mean([r["clip_i_mean"] for r in gated if r["clip_i_mean"] is not None])
    clip_i_mean_all = _mean([r["clip_i_mean"] for r in selected if r["clip_i_mean"] is not None])
    if history:
        prev_dirs = previous_runs(run)
        bench["history"] = benchmark.history(run, prev_dirs, clip_i_mean)
        if prev_dirs:
            previous = load_run(prev_dirs[-1])
        bench["regressions"] = benchmark.regressions(bench, benchmark.summarize(previous) if previous else None)
        diff = build_diff(run, previous, records, refs, clip)
    else:
        bench["history"], bench["regressions"], diff = [], [], None
    # 5. assemble
    clip_t = [r["clip_t"] for r in selected if r["clip_t"] is not None]
    # The run's pass rate counts what the gates count: not baselines marked `gate: false`.
    judged = [r for r in gated if r["pass"] is not None]
    results = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "generated_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run": {k: run.info.get(k) for k in _RUN_FIELDS} | {"run_id": run.run_id},
        "scoring": {"model": clip.model_name, "identity": clip.identity,
                    "weights": (run.info.get("scoring") or {}).get("weights"),
                    "dino": dino.identity if dino else None},
        "summary": {
            "jobs": len(records),
            "rendered": sum(r["status"] == "rendered" for r in records),
            "cached": sum(r["status"] == "cached" for r in records),
            "failed": sum(r["status"] == "failed" for r in records),
            "missing": sum(r["status"] == "missing" for r in records),
            "scored": sum(r["clip_t"] is not None for r in records),
            "selected": len(selected),
            "clip_i_mean": clip_i_mean,  # gated, selected images: what the gates count
            "clip_i_mean_all": clip_i_mean_all,  # every selected, scored image, baselines included
            "clip_t_mean": round(float(np.mean(clip_t)), 6) if clip_t else None,
            "pass_rate": round(sum(bool(r["pass"]) for r in judged) / len(judged), 6) if judged else None,
        },
        "gate": verdict,
        "characters": characters,
        "images": records,
        "selection": selection,
        "failed_jobs": [{"name": r["name"], "key": r["key"], "status": r["status"], "error": r["error"]}
                        for r in records if r["status"] in ("failed", "missing") or r["error"]],
        "benchmark": bench,
        "diff": diff,
    }
    return Analysis(run=run, results=results, refs=refs, previous=previous, clip=clip, dino=dino)
