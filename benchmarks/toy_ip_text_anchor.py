"""Issue #13 experiment: a *text-anchored* toy IP-Adapter. Does it make held-out characters appear?

    PYTHONPATH=. python benchmarks/toy_ip_text_anchor.py frozen   --positions 2,3,4,1 --scales 0.5,1,1.5,2
    PYTHONPATH=. python benchmarks/toy_ip_text_anchor.py oracle   --positions 2,3,4,1 --scales 0.5,1,1.5
    PYTHONPATH=. python benchmarks/toy_ip_text_anchor.py finetune --positions 2,3,4,1 --steps 800 --scales 1,1.5
    PYTHONPATH=. python benchmarks/toy_ip_text_anchor.py encoder  --steps 1200   # the probe + tower, shape-jittered

Idea: the frozen base model draws held-out characters from text ("a brown heart character ...": 83-100 %),
and an IP-Adapter's tokens are attended with `to_k_ip` / `to_v_ip` initialised from `to_k` / `to_v`.
So fit the image projection (Linear + LayerNorm, the plain adapter's) by MSE so that its tokens reproduce
the text encoder's states of the identity words: positions in "<bos> a {colour} {shape} character with ..."
(2 = colour, 3 = shape, 4 = "character", 1 = "a", 0 = <bos>), from the mean attribute embedding of 2
references of the same character (2,000 toy images of seed 0, hold-outs excluded; held-out pairs' text
is used only for the printed diagnostic). Modes:

- `frozen`: that projection, `to_k_ip` / `to_v_ip` = `to_k` / `to_v` (no diffusion training).
- `oracle`: the held-out character's own text states as the tokens (no encoder): the upper bound of `frozen`.
- `finetune`: then `to_k_ip` / `to_v_ip` trained on the recipe's diffusion loss and caption mix
  (projection frozen, so the linear map to text states is kept), AdamW 2e-3, batch 16.
- `encoder`: the toy CLIP tower + attribute projection fine-tuned on colour / shape / eye-colour labels,
  shape also on hue-rotated images (`toyworld.ip_encoder.encoder_loss`); prints held-out reads.

Eval: `toyworld.ip_adapter_eval.evaluate_adapter` as in the recipe (12 per character, 4 references of
seed 3000, prompt "a character with green eyes ...", 20 Euler steps, guidance 5). One thread.
Measured figures: benchmarks/RESULTS.md "Toy IP-Adapter, text-anchored tokens".
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parents[1]
ENCODER = HERE / "renderer" / "weights" / "toy" / "ip-adapter" / "image_encoder"
SPEC = HERE / "specs" / "toy" / "toy-ip-adapter.yaml"


# The first recipe's denoising-loss settings (the recipe itself now distils: toyworld/ip_adapter.py).
FIRST_RECIPE = SimpleNamespace(noise_offset=0.1, snr_gamma=5.0, image_dropout=0.1,
                               captions=SimpleNamespace(full=0.3, no_identity=0.3, wrong_identity=0.3))


def sample_captions(data, idx, mix, g):
    """Caption embeddings of the targets `idx`: full / no identity / wrong identity / dropped (half
    zeros, half the encoded ""), drawn with `mix`'s probabilities from generator `g`."""
    import torch

    b = len(idx)
    r = torch.rand(b, generator=g)
    kind = (r >= mix.full).long() + (r >= mix.full + mix.no_identity).long() \
        + (r >= mix.full + mix.no_identity + mix.wrong_identity).long()
    rows = data.caption_index[idx, kind.clamp(max=2)]
    e, p = data.embeds[rows].clone(), data.pooled[rows].clone()
    dropped = kind == 3
    zero = dropped & (torch.rand(b, generator=g) < 0.5)
    e[zero], p[zero] = 0, 0
    e[dropped & ~zero], p[dropped & ~zero] = data.empty_embeds, data.empty_pooled
    return e, p



def text_states(pipe, pairs, positions):
    import torch

    caps = [f"a {c} {s} character with green eyes on the beach" for c, s in pairs]
    with torch.no_grad():
        e, _, _, _ = pipe.encode_prompt(caps, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    return e[:, positions, :]


def fit_projection(pipe, enc, proc, spec, positions, refs_k: int = 2, count: int = 2000, steps: int = 3000):
    """Linear + LayerNorm from the mean attribute embedding to the identity words' text states (MSE)."""
    import torch

    from renderer.ip_adapter import encode_images, new_adapter_state
    from toyworld import world as tw
    from toyworld.ip_adapter import toy_examples
    from toyworld.ip_adapter_eval import reference_images

    images, labels = toy_examples(count, spec.data.seed, spec.data.size)
    with torch.no_grad():
        z = torch.cat([encode_images(enc, proc, images[i:i + 256], plus=False) for i in range(0, len(images), 256)])
    pairs = sorted({(lb.colour, lb.shape) for lb in labels})
    assert not any(tw.is_held_out(c, s, "green") for c, s in pairs)
    targets = text_states(pipe, pairs, positions)
    pidx = {p: i for i, p in enumerate(pairs)}
    by_char: dict[tuple, list[int]] = {}
    for i, lb in enumerate(labels):
        by_char.setdefault((lb.colour, lb.shape, lb.eyes), []).append(i)
    g = torch.Generator().manual_seed(1)
    xs, ys = [], []
    for key, idx in by_char.items():
        for _ in range(60):
            pick = torch.tensor(idx)[torch.randint(0, len(idx), (refs_k,), generator=g)]
            xs.append(z[pick].mean(0))
            ys.append(targets[pidx[key[:2]]])
    x, y = torch.stack(xs), torch.stack(ys)
    t, cross = len(positions), pipe.unet.config.cross_attention_dim
    proj, norm = torch.nn.Linear(x.shape[1], cross * t), torch.nn.LayerNorm(cross)
    opt = torch.optim.Adam(list(proj.parameters()) + list(norm.parameters()), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(norm(proj(x).view(-1, t, cross)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"fit mse {loss.item():.4f} (target variance {y.var().item():.3f})", flush=True)
    with torch.no_grad():  # diagnostic only: how close the tokens from held-out references come to their text
        for name in spec.eval.characters:
            c, s, _ = tw.CHARACTERS[name]
            m = encode_images(enc, proc, reference_images(name, 4, spec.eval.seed), plus=False).mean(0)
            pred = norm(proj(m[None]).view(1, t, cross))[0]
            print(f"{name}: mse to its own text states {((pred - text_states(pipe, [(c, s)], positions)[0]) ** 2).mean():.4f}",
                  flush=True)
    state = new_adapter_state(pipe.unet, x.shape[1], 0, tokens=t)
    state.update({"image_proj.proj.weight": proj.weight.detach().clone(), "image_proj.proj.bias": proj.bias.detach().clone(),
                  "image_proj.norm.weight": norm.weight.detach().clone(), "image_proj.norm.bias": norm.bias.detach().clone()})
    return state


def finetune_kv(pipe, enc, proc, spec, steps: int, count: int = 2000) -> None:
    """`to_k_ip` / `to_v_ip` on the recipe's diffusion loss and caption mix; the image projection stays."""
    import torch

    from toyworld.ip_adapter import adapter_modules, build_data, toy_examples, with_image
    from toyworld.loop import noise_scheduler
    from toyworld.unet import unet_loss

    images, labels = toy_examples(count, spec.data.seed, spec.data.size)
    data = build_data(pipe, proc, images, labels, spec.seed)
    with torch.no_grad():
        cached = torch.cat([enc(data.pixels[i:i + 256]).image_embeds for i in range(0, len(data.pixels), 256)])
    d = cached.shape[1]
    params = [q for m in adapter_modules(pipe.unet)[1:] for q in m.parameters()]
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=0.0)
    sched = noise_scheduler(pipe.scheduler.config)
    g = torch.Generator().manual_seed(3)
    eligible = torch.tensor([i for i, grp in enumerate(data.groups) if grp])
    k, mix, b = 2, FIRST_RECIPE.captions, spec.batch_size
    losses, t0 = [], time.time()
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = spec.learning_rate * min(1.0, (step + 1) / 50)
        idx = eligible[torch.randint(0, len(eligible), (b,), generator=g)]
        refs = torch.tensor([data.groups[int(i)][int(j)] for i in idx
                             for j in torch.randint(0, len(data.groups[int(i)]), (k,), generator=g)])
        img = cached[refs].view(b, k, d).mean(1)
        img = img * (torch.rand(b, generator=g) >= FIRST_RECIPE.image_dropout).to(img.dtype)[:, None]
        e, p = sample_captions(data, idx, mix, g)
        loss = unet_loss(with_image(pipe.unet, img), data.latents[idx], e, p, sched, FIRST_RECIPE, 64, g)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: loss {sum(losses[-100:]) / 100:.4f} ({time.time() - t0:.0f}s)", flush=True)
    for q in params:
        q.requires_grad_(False)


def finetune_encoder(enc, proc, spec, steps: int, lr: float = 3e-4) -> None:
    """The whole encoder on attribute labels, shape also on hue-rotated images; held-out reads every 200 steps."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from renderer.ip_adapter import encode_images
    from toyworld import world as tw
    from toyworld.ip_adapter import toy_examples
    from toyworld.ip_adapter_eval import encoder_accuracy, reference_images
    from toyworld.ip_encoder import encoder_loss, hue_rotated

    images, labels = toy_examples(spec.data.count, spec.data.seed, spec.data.size)
    colours, shapes, eyes = list(tw.COLOURS), list(tw.SHAPES), list(tw.EYE_COLOURS)
    data = SimpleNamespace(
        pixels=proc(images, return_tensors="pt").pixel_values,
        hue_pixels=proc(hue_rotated(images, 0), return_tensors="pt").pixel_values,
        attrs=torch.tensor([[colours.index(lb.colour), shapes.index(lb.shape), eyes.index(lb.eyes)] for lb in labels]))
    bounds = np.cumsum((0, len(colours), len(shapes), len(eyes)))
    enc.requires_grad_(True)
    opt = torch.optim.AdamW(enc.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(5)
    for step in range(steps + 1):
        if step % 200 == 0:
            enc.eval()
            reads = encoder_accuracy(enc, proc, spec.eval.characters, 16, spec.eval.seed)
            with torch.no_grad():
                mean4 = {n: [round(float(torch.softmax(encode_images(enc, proc, reference_images(n, 4, sd), plus=False)
                                                       .mean(0)[bounds[1]:bounds[2]], 0)[shapes.index(tw.CHARACTERS[n][1])]), 2)
                             for sd in (spec.eval.seed, 99)] for n in spec.eval.characters}
            print(f"step {step}: per-picture reads {json.dumps(reads)}; p(own shape | mean of 4, seeds "
                  f"{spec.eval.seed} / 99) {mean4}", flush=True)
            enc.train()
        if step < steps:
            loss = encoder_loss(enc, data, 64, 0.0, bounds, g)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(enc.parameters(), 1.0)
            opt.step()
    enc.eval().requires_grad_(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["frozen", "oracle", "finetune", "encoder"])
    ap.add_argument("--positions", default="2,3,4,1")
    ap.add_argument("--scales", default="0.5,1,1.5,2")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--encoder", default=str(ENCODER), help="image encoder folder (default: the committed one)")
    ap.add_argument("--per-character", type=int, default=12)
    ap.add_argument("--save", help="encoder mode: write the fine-tuned encoder (and its preprocessing) here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    from renderer.ip_adapter import load_image_encoder
    from schemas.toy import load_ip_adapter_spec
    from toyworld import world as tw
    from toyworld.export import load_frozen_base
    from toyworld.ip_adapter import attach_adapter
    from toyworld.ip_adapter_eval import evaluate_adapter

    spec = load_ip_adapter_spec(SPEC)
    enc, proc = load_image_encoder(Path(args.encoder))
    if args.mode == "encoder":
        finetune_encoder(enc, proc, spec, args.steps)
        if args.save:
            enc.save_pretrained(args.save)
            proc.save_pretrained(args.save)
        return
    positions = [int(x) for x in args.positions.split(",")]
    pipe = load_frozen_base(HERE, spec.base)
    pipe.set_progress_bar_config(disable=True)
    state = fit_projection(pipe, enc, proc, spec, positions)
    attach_adapter(pipe, enc.config.projection_dim, 0, state)
    if args.mode == "finetune":
        finetune_kv(pipe, enc, proc, spec, args.steps)
    names = list(spec.eval.characters)
    layer = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    plain = layer.forward
    for sc in [float(x) for x in args.scales.split(",")]:
        res = {}
        for name in names:
            if args.mode == "oracle":  # the character's own text states for every non-zero (positive) embedding
                c, s, _ = tw.CHARACTERS[name]
                tok = text_states(pipe, [(c, s)], positions)[0]

                def forward(x, tok=tok):
                    out = plain(x)
                    out[(x.abs().sum(dim=-1) > 0).view(-1)] = tok
                    return out
                layer.forward = forward
            ev = spec.eval.model_copy(update={"scale": sc, "per_character": args.per_character, "characters": [name]})
            res[name] = evaluate_adapter(pipe, enc, proc, ev, spec.data.size, with_baseline=False)[name]["adapter"]
        print(f"{args.mode} scale {sc}: {json.dumps(res)}", flush=True)


if __name__ == "__main__":
    main()
