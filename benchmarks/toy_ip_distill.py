"""Issue #13 pilots: a toy IP-Adapter trained by *distillation from the text path* (what recipe 2 became).

    PYTHONPATH=. python benchmarks/toy_ip_distill.py --steps 600 --weight eps --diag             # b
    PYTHONPATH=. python benchmarks/toy_ip_distill.py --steps 1000 --blocks 0:8,8:14,8:14,14:18 \
        --slice-mix 0.5 --encoder DIR --scales 1,1.3,1.6                                           # g
    PYTHONPATH=. python benchmarks/toy_ip_distill.py --load STATE.safetensors --scales 1 --diag  # eval only

Student: the frozen toy UNet + adapter, prompted WITHOUT colour and shape ("a character with green eyes
on the beach") and given the mean embedding of other pictures of the same character. Teacher: the same
frozen UNet, adapter off (scale 0), prompted WITH them ("a brown heart character ..."). Loss: MSE between
the two noise predictions on the same noisy latent (`--weight x0clip` / `v` weight high noise more).
`--diag` also reads six training characters and the teacher. 3,000 pictures; the recipe's own code is
`toyworld.ip_adapter.train_adapter`. Figures: benchmarks/RESULTS.md "toy IP-Adapter by distillation".
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from toyworld.ip_adapter import set_ip_scale

HERE = Path(__file__).resolve().parents[1]
ENCODER = HERE / "renderer" / "weights" / "toy" / "ip-adapter" / "image_encoder"
SPEC = HERE / "specs" / "toy" / "toy-ip-adapter.yaml"


def distill(pipe, enc, proc, spec, steps: int, count: int, lr: float, weight: str, mix: dict, b: int,
            eval_every: int, scales, per_character: int, slice_mix: float = 0.0) -> None:
    import torch

    from toyworld.ip_adapter import adapter_modules, build_data, toy_examples
    from toyworld.loop import noise_scheduler
    from toyworld.unet import time_ids

    t0 = time.time()
    images, labels = toy_examples(count, spec.data.seed, spec.data.size)
    data = build_data(pipe, proc, images, labels, spec.seed)
    with torch.no_grad():
        cached = torch.cat([enc(data.pixels[i:i + 256]).image_embeds for i in range(0, len(data.pixels), 256)])
    print(f"data {time.time() - t0:.0f}s", flush=True)
    d = cached.shape[1]
    unet = pipe.unet
    params = [q for m in adapter_modules(unet) for q in m.parameters()]
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = noise_scheduler(pipe.scheduler.config)
    abar = sched.alphas_cumprod
    g = torch.Generator().manual_seed(3)
    eligible = torch.tensor([i for i, grp in enumerate(data.groups) if grp])
    k = 2
    by_attr = [{int(v): torch.nonzero(data.attrs[:, a] == v).view(-1) for v in data.attrs[:, a].unique()} for a in range(3)]
    kinds = list(mix)
    probs = torch.tensor([mix[x] for x in kinds])
    losses, t0 = [], time.time()
    tid = time_ids(64, b)

    def run(latents_noisy, t, e, p, img):
        return unet(latents_noisy, t, encoder_hidden_states=e,
                    added_cond_kwargs={"text_embeds": p, "time_ids": tid, "image_embeds": [img[:, None, :]]}).sample

    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr * min(1.0, (step + 1) / 50)
        idx = eligible[torch.randint(0, len(eligible), (b,), generator=g)]
        refs = torch.tensor([data.groups[int(i)][int(j)] for i in idx
                             for j in torch.randint(0, len(data.groups[int(i)]), (k,), generator=g)])
        img = cached[refs].view(b, k, d).mean(1)
        if slice_mix:  # colour, shape and eye slices from three different pictures sharing that attribute only
            mixed = torch.rand(b, generator=g) < slice_mix
            for n in torch.nonzero(mixed).view(-1).tolist():
                parts = []
                for a, (lo, hi) in enumerate(((0, 8), (8, 14), (14, d))):
                    pool = by_attr[a][int(data.attrs[idx[n], a])]
                    pick = pool[torch.randint(0, len(pool), (k,), generator=g)]
                    parts.append(cached[pick, lo:hi].mean(0))
                img[n] = torch.cat(parts)
        kind = torch.multinomial(probs, b, replacement=True, generator=g)
        full = data.caption_index[idx, 0]
        noid = data.caption_index[idx, 1]
        s_e, s_p = data.embeds[noid].clone(), data.pooled[noid].clone()
        t_e, t_p = data.embeds[full].clone(), data.pooled[full].clone()
        s_img = img.clone()
        for n, name in enumerate(kinds):
            m = kind == n
            if name == "full":  # text agrees with the picture: the adapter must not overdo it
                s_e[m], s_p[m] = t_e[m], t_p[m]
            elif name == "empty_image":  # "" prompt + picture -> the full caption
                s_e[m], s_p[m] = data.empty_embeds, data.empty_pooled
            elif name == "negative":  # "" prompt, zero picture -> "" (the guidance negative stays the base's)
                s_e[m], s_p[m] = data.empty_embeds, data.empty_pooled
                t_e[m], t_p[m] = data.empty_embeds, data.empty_pooled
                s_img[m] = 0
        noise = torch.randn(data.latents[idx].shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=g)
        noisy = sched.add_noise(data.latents[idx], noise, t)
        with torch.no_grad():
            set_ip_scale(unet, 0.0)
            target = run(noisy, t, t_e, t_p, torch.zeros_like(img))
            set_ip_scale(unet, 1.0)
        pred = run(noisy, t, s_e, s_p, s_img)
        per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        if weight == "x0clip":
            a = abar[t]
            per = per * torch.clamp((1 - a) / a, max=20.0).clamp(min=1.0)
        elif weight == "v":
            per = per / abar[t]
        loss = per.mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: loss {sum(losses[-100:]) / 100:.5f} ({time.time() - t0:.0f}s)", flush=True)
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            evaluate(pipe, enc, proc, spec, scales, per_character, f"step {step + 1}")
    for q in params:
        q.requires_grad_(False)


def evaluate(pipe, enc, proc, spec, scales, per_character: int, label: str) -> None:
    from toyworld.ip_adapter_eval import evaluate_adapter

    for sc in scales:
        t0 = time.time()
        ev = spec.eval.model_copy(update={"scale": sc, "per_character": per_character})
        res = evaluate_adapter(pipe, enc, proc, ev, spec.data.size, with_baseline=False)
        print(f"{label} scale {sc} ({time.time() - t0:.0f}s): "
              + json.dumps({n: r["adapter"] for n, r in res.items()}), flush=True)


def diagnose(pipe, enc, proc, chars, n: int = 6, seed: int = 3000) -> None:
    """Per (colour, shape, eyes): no-identity prompt + adapter (mean of 4 references), and the full
    caption with the adapter off (the teacher), read by the checker."""
    import torch

    from renderer.ip_adapter import encode_images, pipeline_embeds
    from toyworld import checker as ev
    from toyworld import world as tw

    bgs = list(tw.BACKGROUNDS)
    for c, s, e in chars:
        only = tw.Filter(colours=frozenset([c]), shapes=frozenset([s]), eyes=frozenset([e]))
        refs = [tw.generate_one(seed, i, 64, only=only, prefix="r")[0] for i in range(4)]
        mean = encode_images(enc, proc, refs, plus=False).mean(dim=0)
        z = mean.tolist()
        read = (list(tw.COLOURS)[max(range(8), key=lambda i: z[i])], list(tw.SHAPES)[max(range(6), key=lambda i: z[8 + i])])
        embeds = pipeline_embeds(mean, torch.zeros_like(mean), guidance=True)
        out = {}
        for mode, scale, what in (("adapter", 1.0, "a character"), ("teacher", 0.0, f"a {c} {s} character")):
            set_ip_scale(pipe.unet, scale)
            items = []
            for i in range(n):
                bg = bgs[i % 3]
                with torch.no_grad():
                    img = pipe(prompt=f"{what} with {e} eyes {tw.BACKGROUND_PHRASES[bg]}", negative_prompt="",
                               num_inference_steps=20, guidance_scale=5.0, width=64, height=64,
                               generator=torch.Generator("cpu").manual_seed(seed + i),
                               ip_adapter_image_embeds=embeds).images[0]
                items.append((img, {"colour": c, "shape": s, "background": bg}))
            acc = ev.evaluate(items)["attributes"]
            out[mode] = {k: round(acc[k]["accuracy"], 2) for k in ("colour", "shape", "background")}
        set_ip_scale(pipe.unet, 1.0)
        held = " (held out)" if tw.is_held_out(c, s, e) else ""
        print(f"diag {c} {s}{held}: encoder reads {read}; {json.dumps(out)}", flush=True)


DIAG = [("brown", "heart", "green"), ("orange", "star", "brown"), ("pink", "diamond", "blue"),
        ("orange", "circle", "brown"), ("green", "star", "black"), ("brown", "square", "blue"),
        ("red", "heart", "green"), ("blue", "diamond", "brown"), ("yellow", "triangle", "green")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--weight", choices=["eps", "x0clip", "v"], default="eps")
    ap.add_argument("--mix", default="noid=0.6,full=0.15,empty_image=0.1,negative=0.15")
    ap.add_argument("--scales", default="1")
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--per-character", type=int, default=12)
    ap.add_argument("--encoder", default=str(ENCODER))
    ap.add_argument("--save", help="write the adapter state (safetensors) here")
    ap.add_argument("--blocks", default="", help="token -> embedding slice, e.g. 0:8,8:14,8:14,14:18 "
                    "(each token sees only its slice: a colour token, shape tokens, an eye token)")
    ap.add_argument("--slice-mix", type=float, default=0.0, help="share of samples whose colour / shape / eye "
                    "slices come from different pictures")
    ap.add_argument("--load", help="skip training: load this adapter state (give --blocks only when training)")
    ap.add_argument("--diag", action="store_true", help="also read training and held-out characters (diagnose)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    from renderer.ip_adapter import adapter_state_from_unet, load_image_encoder, new_adapter_state
    from schemas.toy import load_ip_adapter_spec
    from toyworld.export import load_frozen_base
    from toyworld.ip_adapter import attach_adapter, restrict_tokens

    spec = load_ip_adapter_spec(SPEC)
    enc, proc = load_image_encoder(Path(args.encoder))
    pipe = load_frozen_base(HERE, spec.base)
    pipe.set_progress_bar_config(disable=True)
    if args.load:
        from safetensors.torch import load_file

        state = load_file(args.load)
    else:
        state = new_adapter_state(pipe.unet, enc.config.projection_dim, 1, tokens=args.tokens)
    attach_adapter(pipe, enc.config.projection_dim, 0, state)
    if args.blocks:
        restrict_tokens(pipe.unet, [tuple(int(x) for x in sl.split(":")) for sl in args.blocks.split(",")])
    mix = {kv.split("=")[0]: float(kv.split("=")[1]) for kv in args.mix.split(",")}
    scales = [float(x) for x in args.scales.split(",")]
    if not args.load:
        distill(pipe, enc, proc, spec, args.steps, args.count, args.lr, args.weight, mix, args.batch,
                args.eval_every, scales, args.per_character, args.slice_mix)
    if args.diag:
        diagnose(pipe, enc, proc, DIAG)
    if args.save:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in adapter_state_from_unet(pipe.unet).items()}, args.save)
    evaluate(pipe, enc, proc, spec, scales, args.per_character, "final")


if __name__ == "__main__":
    main()
