"""best_of: scoring keeps the highest CLIP-I candidate; only winners count for the gate."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest

from reports import write_reports
from reports.scoring import select_best_of
from tests.reports_fixtures import build_run, castbook_home, draw, make_job, make_refs  # noqa: F401


def _rec(key, cand, clip_i, clip_t, image=True, group="g"):
    return {"key": key, "name": key, "best_of_group": group, "candidate": cand, "clip_i_mean": clip_i,
            "clip_t": clip_t, "image": "x.png" if image else None, "status": "rendered" if image else "failed",
            "selected": True}


def test_highest_clip_i_wins_ties_by_clip_t_then_candidate():
    recs = [_rec("a", 0, 0.70, 0.30), _rec("b", 1, 0.80, 0.10), _rec("c", 2, 0.80, 0.20),
            _rec("d", 0, 0.5, 0.2, group="h"), _rec("e", 1, 0.5, 0.2, group="h"),
            _rec("f", 0, None, None, image=False, group="k")]
    sel = select_best_of(recs)
    assert sel["g"]["selected_key"] == "c"  # 0.80 tie broken by CLIP-T 0.20 > 0.10
    assert sel["h"]["selected_key"] == "d"  # full tie: lowest candidate index
    assert sel["k"]["selected_key"] is None  # no candidate has an image
    assert [r["key"] for r in recs if r["selected"]] == ["c", "d"]
    assert [c["candidate"] for c in sel["g"]["candidates"]] == [0, 1, 2]


def test_failed_candidate_is_never_selected():
    recs = [_rec("a", 0, None, None, image=False), _rec("b", 1, 0.1, 0.0)]
    assert select_best_of(recs)["g"]["selected_key"] == "b"


@pytest.mark.usefixtures("castbook_home")
def test_best_of_end_to_end(tmp_path):
    root = tmp_path / "proj"
    chars = {"luca": {"references": make_refs(root, "luca", "circle"), "threshold": 0.97}}
    kinds = ["stripes", "checker", "circle", "stripes"]  # candidate 2 is luca's own reference picture
    items = [{"job": make_job("luca", "beach", seed=20 + c, best_of_group="luca-beach", candidate=c),
              "picture": draw(k, 0)} for c, k in enumerate(kinds)]
    run_dir = build_run(tmp_path / "runs", "20261130T000000Z-bo", root, items, chars)
    paths = write_reports(run_dir)
    res = json.loads(paths["results"].read_text())
    winner = items[2]["job"]

    sel = res["selection"]["luca-beach"]
    assert sel["selected_key"] == winner.key
    scores = {c["key"]: c["clip_i_mean"] for c in sel["candidates"]}
    assert scores[winner.key] == max(scores.values())
    assert json.loads((run_dir / "selection.json").read_text())["groups"]["luca-beach"]["selected_key"] == winner.key

    # Gate counts only the winner: three off-model losers do not drag the pass rate down.
    luca = res["characters"]["luca"]
    assert (luca["selected"], luca["passed"], luca["pass_rate"]) == (1, 1, 1.0)
    assert res["gate"]["passed"] is True
    assert sum(not r["pass"] for r in res["images"]) == 3  # the losers would have failed

    # The consistency page greys out the losers.
    states: dict[str, set] = {}

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "div" and "data-key" in a:
                states.setdefault(a["data-key"], set()).update(a["class"].split())

    P().feed(paths["consistency"].read_text())
    assert "pass" in states[winner.key] and "loser" not in states[winner.key]
    for it in items:
        if it["job"].key != winner.key:
            assert "loser" in states[it["job"].key]
