"""Toy world: deterministic generator, hold-outs, captions and the pixel checker's accuracy."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from castbook.commands import toyworld as toyworld_cmd
from toyworld import checker as ev
from toyworld import world as tw


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a = tw.generate_dataset(tmp_path / "a", 12, seed=3)
    tw.generate_dataset(tmp_path / "b", 12, seed=3)
    c = tw.generate_dataset(tmp_path / "c", 12, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    da, dc = _digest(tmp_path / "a"), _digest(tmp_path / "c")
    assert sum(da[k] != dc[k] for k in da if k.endswith(".png")) >= 11
    assert [l.caption for l in a] != [l.caption for l in c]
    # Image i depends only on (seed, i): a shorter run is a prefix of a longer one.
    assert tw.png_bytes(tw.generate_one(3, 5)[0]) == (tmp_path / "a" / "toy-000005.png").read_bytes()


def test_captions_match_labels_and_dataset_layout(tmp_path):
    out = tmp_path / "ds"
    labels = tw.generate_dataset(out, 40, seed=11)
    rows = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == [l.name for l in labels]
    seen = set()
    for r in rows:
        png, txt = out / f"{r['name']}.png", out / f"{r['name']}.txt"
        with Image.open(png) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
        caption = txt.read_text().strip()
        assert caption == r["caption"]
        assert caption == tw.caption_for(r["colour"], r["shape"], r["eyes"], r["expression"], r["background"])
        parsed = tw.parse_attributes(caption)
        assert parsed == {k: r[k] for k in ("colour", "shape", "eyes", "expression", "background")}
        seen.add(r["expression"])
    assert seen == set(tw.EXPRESSIONS)
    assert tw.caption_for("red", "star", "green", "happy", "beach") == (
        "a red star character with green eyes and a happy face on the beach")


def test_holdouts_never_in_base_set_but_available_on_request(tmp_path):
    base = [tw.sample_label(5, i)[0] for i in range(1500)]
    assert not any(tw.is_held_out(l.colour, l.shape, l.eyes, tw.HOLDOUT) for l in base)
    # Both halves of each hold-out still appear, just not together.
    assert any(l.colour == "brown" for l in base) and any(l.shape == "heart" for l in base)
    assert tw.HOLDOUT[0].matches(*tw.CHARACTERS["luca"])
    luca = tw.generate_dataset(tmp_path / "luca", 12, seed=1, only=tw.character_filter("luca"), trigger="luca")
    assert {(l.colour, l.shape, l.eyes) for l in luca} == {("brown", "heart", "green")}
    assert len({l.background for l in luca}) > 1 and len({l.expression for l in luca}) > 1
    assert all(l.caption.startswith("luca, a brown heart character with green eyes") for l in luca)
    only = tw.parse_filter("brown heart green eyes")
    assert tw.character_filter("luca") == only
    with pytest.raises(ValueError, match="unknown word"):
        tw.parse_filter("brown hart")


def _degrade(img: Image.Image, i: int) -> Image.Image:
    rng = np.random.default_rng([1234, i])
    a = np.asarray(img.filter(ImageFilter.GaussianBlur(0.7)), dtype=float) + rng.normal(0, 6, (64, 64, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("degraded", [False, True], ids=["clean", "blur+noise"])
def test_checker_reads_fresh_ground_truth(degraded):
    n = 240
    pairs = []
    for i in range(n):
        img, label = tw.generate_one(987654, i)  # a seed the checker was never tuned on
        pairs.append((_degrade(img, i) if degraded else img, {k: getattr(label, k) for k in ev.ATTRIBUTES}))
    result = ev.evaluate(pairs)
    assert result["count"] == n
    for attr in ("colour", "shape", "expression", "background", "all_three"):
        stats = result["attributes"][attr]
        assert stats["total"] == n
        assert stats["accuracy"] >= 0.98, (attr, stats, result["errors"][:5])
    assert result["attributes"]["eyes"]["accuracy"] >= 0.95


def test_checker_notices_wrong_attributes():
    img, label = tw.generate_one(2, 0)
    truth = {k: getattr(label, k) for k in ev.ATTRIBUTES}
    wrong_colour = next(c for c in tw.COLOURS if c != label.colour)
    wrong_shape = next(s for s in tw.SHAPES if s != label.shape)
    result = ev.evaluate([(img, truth), (img, truth | {"colour": wrong_colour, "shape": wrong_shape})])
    assert result["attributes"]["colour"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert result["attributes"]["all_three"]["correct"] == 1
    assert result["errors"][0]["wrong"]["shape"] == {"expected": wrong_shape, "predicted": label.shape}


def _cli(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="castbook")
    toyworld_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_generate_and_eval_folder_and_run_dir(tmp_path, capsys):
    out = tmp_path / "ds"
    assert _cli(["toyworld", "generate", "--out", str(out), "--count", "8", "--seed", "2"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == [f"toy-{i:06d}.png" for i in range(8)]
    assert all((out / f"toy-{i:06d}.txt").exists() for i in range(8))
    capsys.readouterr()
    assert _cli(["toyworld", "eval", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["count"] == 8 and result["attributes"]["all_three"]["accuracy"] == 1.0

    # Captions only (no labels.jsonl): the attributes come from the .txt files.
    (out / "labels.jsonl").unlink()
    assert _cli(["toyworld", "eval", str(out)]) == 0
    table = capsys.readouterr().out
    assert "all_three" in table and "100.0%" in table

    # A run directory: prompts in plan.jsonl, images through manifest.jsonl (docs/INTERFACES.md).
    run = tmp_path / "run"
    (run / "images").mkdir(parents=True)
    plan, manifest = [], []
    for i in range(3):
        img, label = tw.generate_one(9, i, only=tw.character_filter("luca") if i == 2 else None)
        rel = f"images/seed-{i}.png"
        img.save(run / rel)
        prompt = "luca " + tw.BACKGROUND_PHRASES[label.background] if i == 2 else label.caption
        plan.append({"key": f"k{i}", "name": f"main/x/y/draft/seed-{i}", "prompt": prompt,
                     "character": "luca" if i == 2 else None})
        manifest.append({"key": f"k{i}", "status": "rendered", "image": rel})
    plan.append({"key": "k9", "name": "failed", "prompt": "a red star", "character": None})
    manifest.append({"key": "k9", "status": "failed", "image": None})
    (run / "plan.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plan))
    (run / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in manifest))
    items = ev.load_items(run)
    assert [it.expected.get("shape") for it in items] == [
        tw.generate_one(9, 0)[1].shape, tw.generate_one(9, 1)[1].shape, "heart"]
    assert "expression" not in items[2].expected  # "luca at night" says nothing about the face
    capsys.readouterr()
    assert _cli(["toyworld", "eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["count"] == 3 and result["attributes"]["colour"]["accuracy"] == 1.0
    assert result["attributes"]["identity"] == {"correct": 3, "total": 3, "accuracy": 1.0}
    # --by-job: one result per job matrix (the first part of the image name)
    plan[0]["name"] = "baseline/x/y/draft/seed-0"
    (run / "plan.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plan))
    assert _cli(["toyworld", "eval", str(run), "--json", "--by-job"]) == 0
    by_job = json.loads(capsys.readouterr().out)["by_job"]
    assert {k: v["count"] for k, v in by_job.items()} == {"baseline": 1, "main": 2}
    assert _cli(["toyworld", "eval", str(run), "--by-job"]) == 0
    assert "job baseline:" in capsys.readouterr().out


def test_cli_errors_are_clear(tmp_path, capsys):
    assert _cli(["toyworld", "generate", "--out", str(tmp_path / "x"), "--count", "2", "--character", "nemo"]) == 2
    assert "nemo" in capsys.readouterr().err
    assert _cli(["toyworld", "eval", str(tmp_path)]) == 2
    assert "no plan.jsonl" in capsys.readouterr().err
