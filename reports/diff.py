"""Compare a run with the previous run of the same spec (jobs matched by name)."""

from __future__ import annotations

from reports.metrics import ClipScorer, clip_i
from reports.rundir import Run
from reports.scoring import OK_STATUSES

_IGNORED_FIELDS = {"key", "name"}


def build_diff(run: Run, prev: Run | None, records: list[dict], refs: dict[str, dict],
               clip: ClipScorer) -> dict:
    """new / removed / changed / unchanged jobs; CLIP-I drift for changed jobs (both images
    scored against the *current* references, so the yardstick is the same); and unchanged
    keys whose image bytes differ (non-determinism)."""
    if prev is None:
        return {"previous_run": None, "new": [], "removed": [], "changed": [], "unchanged": [],
                "nondeterministic": [], "counts": {"new": 0, "removed": 0, "changed": 0, "unchanged": 0,
                                                   "nondeterministic": 0}}
    cur_by_name = {r["name"]: r for r in records}
    cur_jobs = {e.name: e.job for e in run.entries}
    prev_by_name = {e.name: e for e in prev.entries}
    new = [n for n in cur_by_name if n not in prev_by_name]
    removed = [n for n in prev_by_name if n not in cur_by_name]
    changed, unchanged, nondet = [], [], []
    for name, r in cur_by_name.items():
        pe = prev_by_name.get(name)
        if pe is None:
            continue
        prev_img = prev.path / pe.image if pe.image and pe.status in OK_STATUSES else None
        if prev_img is not None and not prev_img.is_file():
            prev_img = None
        prev_rel = f"../{prev.path.name}/{pe.image}" if prev_img is not None else None
        if pe.key == r["key"]:
            unchanged.append(name)
            if prev_img is not None and r["image"] is not None:
                before = clip.image_digest(prev_img)
                if before != r["image_digest"]:
                    nondet.append({"name": name, "key": r["key"], "previous_digest": before,
                                   "current_digest": r["image_digest"], "previous_image": prev_rel,
                                   "previous_abs": str(prev_img), "current_image": r["image"]})
            continue
        job = cur_jobs[name]
        fields = sorted(k for k in set(pe.job) | set(job) if k not in _IGNORED_FIELDS
                        and pe.job.get(k) != job.get(k))
        prev_score = None
        char = refs.get(r["character"]) if r["character"] else None
        if prev_img is not None and char is not None and char["clip"] is not None:
            prev_score = round(clip_i(clip.embed_images([prev_img])[0], char["clip"])[0], 6)
        drift = (round(r["clip_i_mean"] - prev_score, 6)
                 if prev_score is not None and r["clip_i_mean"] is not None else None)
        changed.append({"name": name, "previous_key": pe.key, "current_key": r["key"],
                        "changed_fields": fields, "previous_image": prev_rel,
                        "previous_abs": str(prev_img) if prev_img else None,
                        "current_image": r["image"], "previous_clip_i": prev_score,
                        "current_clip_i": r["clip_i_mean"], "clip_i_drift": drift,
                        "previous_prompt": pe.job.get("prompt"), "current_prompt": r["prompt"]})
    return {"previous_run": prev.run_id, "new": sorted(new), "removed": sorted(removed),
            "changed": changed, "unchanged": sorted(unchanged), "nondeterministic": nondet,
            "counts": {"new": len(new), "removed": len(removed), "changed": len(changed),
                       "unchanged": len(unchanged), "nondeterministic": len(nondet)}}

