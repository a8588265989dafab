"""Eval of `builtin:toy-controlnet`: does the rendered body follow the pose it was given?

Held-out poses and prompts are rendered with and without the control (same seeds); the body is
segmented in each output and compared with the pose: mask IoU with the filled pose polygon
(`toyworld.geometry.polygon_mask`) and the share of bodies whose centroid lands within half a
radius of the pose centre. The checker's colour/shape accuracy shows whether the control breaks
the character.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from schemas.toy import ControlEvalSpec
from toyworld import checker as ev
from toyworld import world as tw
from toyworld.checker import rgb_to_lab
from toyworld.controlnet import control_image
from toyworld.geometry import polygon_mask


def body_mask(image, background: str) -> np.ndarray:
    """The character's filled silhouette in an image of the prompted scene (empty if none).

    The checker's body step (`toyworld.checker.classify`, 2.) with the scene known from the
    prompt: pixels nearer (CIELAB) to any body colour than to the scene's palette, the sclera or
    the mouth colour; the largest connected component, holes (eyes, mouth) filled.
    """
    from scipy import ndimage

    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    lab = rgb_to_lab(rgb)
    bodies = rgb_to_lab(np.array(list(tw.COLOURS.values()), dtype=float))
    others = rgb_to_lab(np.array([*tw.SCENE_PALETTES[background].values(), tw.SCLERA, tw.MOUTH], dtype=float))
    d = ((lab[..., None, :] - np.concatenate([bodies, others])) ** 2).sum(-1)
    candidate = d.argmin(-1) < len(bodies)
    labels, n = ndimage.label(candidate)
    if n == 0:
        return np.zeros(candidate.shape, bool)
    sizes = ndimage.sum(candidate, labels, index=np.arange(1, n + 1))
    body = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(ndimage.binary_closing(body, iterations=1)) | body


def pose_agreement(image, label) -> dict:
    """How well the body in `image` matches `label.pose`: IoU, centroid distance (px), hit."""
    body = body_mask(image, label.background)
    target = polygon_mask(label.shape, label.pose, image.size[0])
    union = (body | target).sum()
    iou = float((body & target).sum() / union) if union else 0.0
    if body.sum() == 0:
        return {"iou": 0.0, "centroid_distance": None, "hit": False}
    ys, xs = np.nonzero(body)
    # Pixel (i, j) covers [j, j+1) x [i, i+1) in the generator's continuous coordinates.
    dist = float(np.hypot(xs.mean() + 0.5 - label.pose.x, ys.mean() + 0.5 - label.pose.y))
    return {"iou": iou, "centroid_distance": dist, "hit": dist <= 0.5 * label.pose.radius}


def _summary(scores: list[dict]) -> dict:
    dists = [s["centroid_distance"] for s in scores if s["centroid_distance"] is not None]
    return {
        "mean_iou": sum(s["iou"] for s in scores) / len(scores),
        "position_hit_rate": sum(s["hit"] for s in scores) / len(scores),
        "mean_centroid_distance_px": (sum(dists) / len(dists)) if dists else None,
        "bodies_found": len(dists),
    }


def eval_cases(spec: ControlEvalSpec, size: int = 64):
    """The held-out labels (poses + prompts) and their control images."""
    labels = [tw.sample_label(spec.seed, i, size)[0] for i in range(spec.count)]
    return labels, [control_image(tw.pose_map(l.shape, l.pose, size), size) for l in labels]


def evaluate_controlnet(base_pipe, controlnet, spec: ControlEvalSpec, size: int = 64,
                        save_dir: Path | None = None) -> dict:
    """Render held-out prompts with and without the pose control (same seeds) and compare with the poses.

    Returns `{"count", "with_control": {...}, "without_control": {...}, ...}`; each side has
    mean_iou, position_hit_rate (centroid within 0.5 radius of the pose centre),
    mean_centroid_distance_px, bodies_found and `checker` (toyworld.checker accuracy).
    """
    import torch
    from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

    # 1. the held-out cases
    labels, maps = eval_cases(spec, size)
    # 2. two pipelines over the same components
    comps = {k: v for k, v in base_pipe.components.items()}
    plain = StableDiffusionXLPipeline(**comps)
    control = StableDiffusionXLControlNetPipeline(**comps, controlnet=controlnet)
    for p in (plain, control):
        p.set_progress_bar_config(disable=True)
    # 3. render, batch by batch, the same seed per case on both sides
    with_c, without_c = [], []
    for i in range(0, len(labels), spec.batch_size):
        chunk = labels[i : i + spec.batch_size]
        prompts = [l.caption for l in chunk]
        common = dict(prompt=prompts, negative_prompt=[""] * len(chunk), num_inference_steps=spec.steps,
                      guidance_scale=spec.guidance_scale, width=size, height=size)

        def gens():
            return [torch.Generator("cpu").manual_seed(spec.seed + i + j) for j in range(len(chunk))]

        with torch.no_grad():
            without_c.extend(plain(generator=gens(), **common).images)
            with_c.extend(control(image=maps[i : i + spec.batch_size], generator=gens(),
                                  controlnet_conditioning_scale=spec.conditioning_scale, **common).images)
    if save_dir:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        for k, (a, b, m) in enumerate(zip(with_c, without_c, maps)):
            a.save(save_dir / f"{k:03d}-with.png")
            b.save(save_dir / f"{k:03d}-without.png")
            m.save(save_dir / f"{k:03d}-control.png")
    # 4. pose agreement and the checker, per side
    out = {"count": len(labels), "steps": spec.steps, "guidance_scale": spec.guidance_scale,
           "conditioning_scale": spec.conditioning_scale, "seed": spec.seed}
    for name, images in (("with_control", with_c), ("without_control", without_c)):
        side = _summary([pose_agreement(img, l) for img, l in zip(images, labels)])
        checked = ev.evaluate([(img, {"name": f"{k:03d}", "colour": l.colour, "shape": l.shape, "eyes": l.eyes,
                                      "expression": l.expression, "background": l.background})
                               for k, (img, l) in enumerate(zip(images, labels))])
        side["checker"] = ev.accuracy_row(checked)
        out[name] = side
    return out
