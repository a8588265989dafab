"""Issue #13: where in the UNet the toy IP-Adapter helps or spoils luca, block by block and prompt by prompt.

    PYTHONPATH=. python benchmarks/toy_ip_blocks.py --lora specs/examples/loras/luca.safetensors \
        --scales '[0, 1.0, {"mid": 1}, {"down": {"block_1": 1}}, {"up": {"block_0": [1, 0, 0]}}]'
    PYTHONPATH=. python benchmarks/toy_ip_blocks.py --scales '[1.0]' \
        --prompt "luca, a character with green eyes {bg}" --prompt "a character with green eyes {bg}, luca"

Renders luca (the committed builtin:toy-sdxl + builtin:toy-ip-adapter, optionally luca's LoRA) on the
mean embedding of 4 toy-world pictures of luca (generator seed 99, as the proof test), `-n` renders per
prompt and scale (seeds 1, 1, 1, 2, 2, 2, ...; beach / town / night in turn), and prints what the pixel
checker reads: identity (colour AND shape), colour, shape, background and the colours drawn. A scale is a
number or diffusers' per-block dict (blocks not named are 0). No timing: figures in benchmarks/RESULTS.md
"LoRA + toy adapter, block by block".
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
ADAPTER = HERE / "renderer" / "weights" / "toy" / "ip-adapter"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lora", help="a LoRA file to load (e.g. luca's)")
    ap.add_argument("--scales", default='[0, 1.0, {"mid": 1.0}]', help="JSON list of scales")
    ap.add_argument("--prompt", action="append", help="template with {bg}; repeatable")
    ap.add_argument("-n", type=int, default=12, help="renders per prompt and scale")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)  # fixed: the thread count changes float results
    from renderer.ip_adapter import encode_images, load_image_encoder, pipeline_embeds
    from toyworld import checker
    from toyworld import world as tw
    from toyworld.export import load_pipeline
    from toyworld.ip_adapter import ADAPTER_FILE

    pipe = load_pipeline(HERE / "renderer" / "weights" / "toy" / "sdxl")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(ADAPTER), subfolder="", weight_name=ADAPTER_FILE, image_encoder_folder=None,
                         local_files_only=True)
    encoder, processor = load_image_encoder(ADAPTER / "image_encoder")
    refs = [tw.generate_one(99, i, 64, only=tw.character_filter("luca"), prefix="luca")[0] for i in range(4)]
    mean = encode_images(encoder, processor, refs, plus=False).mean(0)
    embeds = pipeline_embeds(mean, torch.zeros_like(mean), guidance=True)
    if args.lora:
        pipe.load_lora_weights(args.lora, adapter_name="luca")
    for template in args.prompt or ["luca, a character with green eyes {bg}"]:
        for scale in json.loads(args.scales):
            pipe.set_ip_adapter_scale(scale)
            pictures = []
            for i in range(args.n):
                bg = tw.BACKGROUNDS[i % 3]
                image = pipe(prompt=template.format(bg=tw.BACKGROUND_PHRASES[bg]), negative_prompt="",
                             num_inference_steps=20, guidance_scale=5.0, width=64, height=64,
                             generator=torch.Generator("cpu").manual_seed(1 + i // 3),
                             ip_adapter_image_embeds=embeds).images[0]
                pictures.append((image, {"colour": "brown", "shape": "heart", "background": bg}))
            read = checker.evaluate(pictures, keep_items=True)
            colours = collections.Counter(item["predicted"]["colour"] for item in read["items"])
            rates = {k: round(read["attributes"][k]["accuracy"], 2) for k in ("identity", "colour", "shape", "background")}
            print(json.dumps({"prompt": template, "scale": scale, "lora": bool(args.lora), **rates,
                              "colours": dict(colours)}), flush=True)


if __name__ == "__main__":
    main()
