"""Where a character's identity comes from in each image: its LoRA, its IP-Adapter, both or neither.

The consistency page compares them per character (`by_source` in results.json) when a spec renders
adapter images, so "LoRA only / adapter only / both" sit side by side with the same measures as "By job".
"""

from __future__ import annotations

from schemas.ip_adapter import ip_scale_is_zero

SOURCES = ("LoRA only", "adapter only", "both", "neither")


def identity_source(job: dict) -> str:
    """A plan job's identity source: a character-kind LoRA at a non-zero weight and/or an IP-Adapter
    at a non-zero scale."""
    lora = any(l.get("kind") == "character" and l.get("weight") for l in job.get("loras") or [])
    ip = job.get("ip_adapter") or None
    adapter = bool(ip) and not ip_scale_is_zero(ip.get("scale") or 0)
    return {(True, False): "LoRA only", (False, True): "adapter only", (True, True): "both"}.get((lora, adapter),
                                                                                                  "neither")


def by_source(records: list[dict]) -> dict[str, dict]:
    """One character's selected, scored images per identity source (in SOURCES order); empty unless
    some image used an IP-Adapter."""
    if not any(r.get("identity_source") in ("adapter only", "both") for r in records):
        return {}
    out: dict[str, dict] = {}
    for source in SOURCES:
        sel = [r for r in records if r.get("identity_source") == source and r["selected"]
               and r["clip_i_mean"] is not None]
        if not sel:
            continue
        passed = sum(1 for r in sel if r["pass"])
        out[source] = {"selected": len(sel), "passed": passed, "pass_rate": round(passed / len(sel), 6),
                       "clip_i_mean": round(sum(r["clip_i_mean"] for r in sel) / len(sel), 6),
                       "jobs": sorted({r["job"] for r in sel})}
    return out
