"""Expansion + keying cost: 10,000 jobs vs 1,000 jobs, measured in the same process.

Prints the time of each and the 10k÷1k ratio (linear scaling ≈ 10). Target: 10k jobs
expand and key in under a second on the 2-core CI machine.
    python benchmarks/plan_scaling.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.expand import expand  # noqa: E402
from schemas.plan import compute_digests
from schemas.spec_loader import load_spec  # noqa: E402

SPEC = """\
loras:
  hero_lora: {{path: hero.safetensors, kind: character, trigger_words: [herotok]}}
  bg_lora: {{path: bg.safetensors, kind: background}}
presets:
  draft: {{width: 64, height: 64, num_inference_steps: 4}}
characters:
  hero: {{description: a hero, loras: [hero_lora]}}
  sidekick: {{description: a dog}}
scenes:
  park: {{prompt: "{{{{ character }}}} in a park", loras: [bg_lora]}}
  moon: {{prompt: "{{{{ character }}}} on the moon", controls: [{{type: canny, image: pose.png}}]}}
jobs:
  big:
    characters: [hero, sidekick]
    scenes: [park, moon]
    presets: [draft]
    seeds: {{count: {seeds}}}
    sweep:
      loras.hero_lora.weight: [0.2, 0.4, 0.6, 0.8, 1.0]
      guidance_scale: [3, 7]
max_jobs: 100000
"""


def measure(root: Path, seeds: int, repeats: int = 5) -> tuple[int, float]:
    (root / "spec.yaml").write_text(SPEC.format(seeds=seeds))
    loaded = load_spec([root / "spec.yaml"])
    digests = compute_digests(loaded.spec, loaded.root)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jobs = expand(loaded.spec, digests)
        times.append(time.perf_counter() - started)
    return len(jobs), statistics.median(times)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / ".git").mkdir()
        for name in ("hero.safetensors", "bg.safetensors", "pose.png"):
            (root / name).write_bytes(name.encode())
        measure(root, 25, repeats=1)  # warm caches (template compile, imports)
        n_small, t_small = measure(root, 25)   # 2×2×25×5×2 = 1,000 jobs
        n_big, t_big = measure(root, 250)      # 10,000 jobs
    print(f"expand+key {n_small:>6,} jobs: {t_small:.3f} s ({t_small / n_small * 1e6:.0f} µs/job)")
    print(f"expand+key {n_big:>6,} jobs: {t_big:.3f} s ({t_big / n_big * 1e6:.0f} µs/job)")
    print(f"ratio 10k/1k: {t_big / t_small:.2f} (linear = 10.0); 10k under 1 s: {'yes' if t_big < 1 else 'NO'}")


if __name__ == "__main__":
    main()
