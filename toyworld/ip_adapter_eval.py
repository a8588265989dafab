"""Evaluation of the toy IP-Adapter (toyworld/ip_adapter.py): held-out characters drawn from their
own reference images, with and without the adapter, read by `toyworld.checker`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from schemas.toy import IpEvalSpec, ToyIpAdapterSpec
from toyworld.export import load_pipeline, resolve, write_record
from toyworld.ip_adapter import ADAPTER_FILE
from toyworld.loop import deterministic


def encoder_accuracy(encoder, processor, names, count: int, seed: int) -> dict:
    """How often an `attributes` encoder reads colour and shape of held-out characters' images right."""
    import torch

    from renderer.ip_adapter import encode_images
    from toyworld import world as tw

    colours, shapes = list(tw.COLOURS), list(tw.SHAPES)
    out = {}
    with torch.no_grad():
        for name in names:
            c, s, _ = tw.CHARACTERS[name]
            z = encode_images(encoder, processor, reference_images(name, count, seed), plus=False)
            out[name] = {"colour": float(np.mean([colours[int(r[:8].argmax())] == c for r in z])),
                         "shape": float(np.mean([shapes[int(r[8:14].argmax())] == s for r in z]))}
    return out



def reference_images(name: str, count: int, seed: int, size: int = 64):
    from toyworld import world as tw

    only = tw.character_filter(name)
    return [tw.generate_one(seed, i, size, only=only, prefix=name)[0] for i in range(count)]



def character_prompt(name: str, background: str, kind: str = "full") -> str:
    """What a spec renders for an example character that has no LoRA (so no trigger word): its
    description and the scene; `no_identity` leaves colour and shape to the references."""
    from toyworld import world as tw

    c, s, e = tw.CHARACTERS[name]
    what = f"a {c} {s} character" if kind == "full" else "a character"
    return f"{what} with {e} eyes {tw.BACKGROUND_PHRASES[background]}"



def evaluate_adapter(pipe, encoder, processor, spec: IpEvalSpec, size: int = 64, with_baseline: bool = True) -> dict:
    """Held-out characters from their references, with the adapter (scale `spec.scale`) and without it."""
    import torch

    from renderer.ip_adapter import encode_images, pipeline_embeds
    from toyworld import checker as ev
    from toyworld import world as tw

    bgs = list(tw.BACKGROUNDS)
    out: dict = {}
    for name in spec.characters:
        c, s, e = tw.CHARACTERS[name]
        refs = reference_images(name, spec.references, spec.seed, size)
        mean = encode_images(encoder, processor, refs, plus=False).mean(dim=0)
        embeds = pipeline_embeds(mean, torch.zeros_like(mean), guidance=spec.guidance_scale > 1)
        cases = [(character_prompt(name, bgs[i % 3], spec.prompt), bgs[i % 3], spec.seed + i) for i in range(spec.per_character)]
        res = {}
        for mode in (("adapter", "baseline") if with_baseline else ("adapter",)):
            pipe.set_ip_adapter_scale(spec.scale if mode == "adapter" else 0.0)
            items = []
            for prompt, bg, seed in cases:
                with torch.no_grad():
                    img = pipe(prompt=prompt, negative_prompt="", num_inference_steps=spec.steps,
                               guidance_scale=spec.guidance_scale, width=size, height=size,
                               generator=torch.Generator("cpu").manual_seed(seed), ip_adapter_image_embeds=embeds).images[0]
                items.append((img, {"colour": c, "shape": s, "background": bg}))
            acc = ev.evaluate(items)["attributes"]
            res[mode] = {k: acc[k]["accuracy"] for k in ("identity", "colour", "shape", "background")}
        out[name] = res
    pipe.set_ip_adapter_scale(1.0)
    return out


# ----------------------------------------------------------------------------- the whole run



def eval_shipped(spec: ToyIpAdapterSpec, root: Path, scales: list[float], log: Callable[[str], None] = print) -> dict:
    """Re-run the held-out eval on the exported adapter at several scales (each with the baseline);
    stored in `<output>.training.json` under `eval_by_scale`."""
    from renderer.ip_adapter import load_image_encoder

    out = resolve(root, spec.output)
    with deterministic(spec.seed, spec.threads):
        pipe = load_pipeline(resolve(root, spec.base))
        pipe.set_progress_bar_config(disable=True)
        pipe.load_ip_adapter(str(out), subfolder="", weight_name=ADAPTER_FILE, image_encoder_folder=None,
                             local_files_only=True)
        enc, proc = load_image_encoder(out / "image_encoder")
        results = {}
        for scale in scales:
            t0 = time.time()
            results[str(scale)] = evaluate_adapter(pipe, enc, proc, spec.eval.model_copy(update={"scale": scale}),
                                                   spec.data.size)
            log(f"scale {scale} ({time.time() - t0:.0f}s): " + json.dumps(results[str(scale)]))
    record_path = out.parent / f"{out.name}.training.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record["eval_by_scale"] = {"prompt": spec.eval.prompt, "per_character": spec.eval.per_character,
                               "references": spec.eval.references, "results": results}
    write_record(out, record)
    return results
