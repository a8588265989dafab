"""Train `builtin:toy-clip`: a small open_clip model, contrastively, on toy-world image-caption pairs.

The architecture is an open_clip JSON config (`TOY_CLIP_CONFIG`, registered under the name
`toy-clip`): a 64x64 ViT (patch 8) and a small text transformer over the real CLIP BPE
vocabulary, so `open_clip.get_tokenizer("toy-clip")` tokenizes prompts as usual.

Loss: symmetric InfoNCE with soft targets. Identical captions are common in the toy world
(~1,100 distinct captions), so two images with the same caption in one batch are both
positives for it instead of one being a false negative.

Saved as `<folder>/toy-clip.json` + `<folder>/open_clip_model.safetensors` (fp16);
`load_toy_clip(folder)` gives `(model, preprocess, tokenizer)` in fp32.
"""

from __future__ import annotations

import json
import math
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

from core.files import atomic_write_text
from schemas.toy import ClipTrainSpec, ToyClipSpec
from toyworld.data import toy_images
from toyworld.export import atomic_save_safetensors, resolve, write_record
from toyworld.loop import deterministic, seeded, train_loop

MODEL_NAME = "toy-clip"
CONFIG_FILE = "toy-clip.json"
WEIGHTS_FILE = "open_clip_model.safetensors"

TOY_CLIP_CONFIG: dict = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 96, "head_width": 32, "patch_size": 8},
    # vocab_size is the real CLIP BPE's, so open_clip's tokenizer works unchanged; width 32 keeps the
    # 49,408-row token table at 3 MB in fp16.
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
}


# ----------------------------------------------------------------------------- model


def register_config(folder: Path | None = None) -> None:
    """Make `toy-clip` known to open_clip (from a saved folder's JSON, or the built-in dict)."""
    import open_clip

    if folder is not None and (Path(folder) / CONFIG_FILE).exists():
        open_clip.add_model_config(Path(folder) / CONFIG_FILE)
        return
    open_clip.add_model_config(_builtin_config_file())


@lru_cache(maxsize=1)
def _builtin_config_file() -> Path:
    """`TOY_CLIP_CONFIG` as a file (open_clip registers configs from files): one per process."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="toy-clip-cfg-")) / CONFIG_FILE
    path.write_text(json.dumps(TOY_CLIP_CONFIG))
    return path


def build_model(seed: int = 0):
    import open_clip

    register_config()
    with seeded(seed):
        return open_clip.create_model(MODEL_NAME, pretrained=None)


def tokenizer():
    import open_clip

    register_config()
    return open_clip.get_tokenizer(MODEL_NAME)


def normalize(images_u8):
    """uint8 N x 3 x 64 x 64 -> open_clip's normalised float input (64 px needs no resize)."""
    import torch
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (images_u8.float() / 255.0 - mean) / std


def contrastive_loss(model, images, tokens, caption_ids):
    """Symmetric InfoNCE; images with the same caption are all positives (soft targets)."""
    import torch.nn.functional as F

    img, txt, scale = model(images, tokens)[:3]
    logits = scale * img @ txt.T
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    loss_i = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    loss_t = -(target * F.log_softmax(logits.T, 1)).sum(1).mean()
    return (loss_i + loss_t) / 2


def clip_lr(spec: ClipTrainSpec, total: int):
    """Linear warm-up times cosine decay to zero over `total` steps."""

    def lr_at(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, spec.warmup_steps))
        return spec.learning_rate * warm * 0.5 * (1 + math.cos(math.pi * step / total))

    return lr_at


def train_clip(images_u8, captions: list[str], spec: ClipTrainSpec, seed: int,
               log: Callable[[str], None] = print, steps: int | None = None):
    """Returns (model, losses, steps_done, seconds)."""
    import torch

    model = build_model(seed)
    model.train()
    tok = tokenizer()
    unique = sorted(set(captions))
    pos = {c: i for i, c in enumerate(unique)}
    all_tokens = tok(unique)
    cap_ids = torch.tensor([pos[c] for c in captions])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    # lr: train_loop sets it from clip_lr
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=1.0)
    g = torch.Generator().manual_seed(seed + 3)
    total = spec.steps if steps is None else steps

    def step_loss(step: int):
        idx = torch.randint(0, len(images_u8), (spec.batch_size,), generator=g)
        ids = cap_ids[idx]
        return contrastive_loss(model, normalize(images_u8[idx]), all_tokens[ids], ids)

    def clamp_temperature() -> None:
        with torch.no_grad():  # CLIP's clamp of the learnt temperature
            model.logit_scale.clamp_(0, math.log(100))

    # Gradient clipping over model.parameters() in that order: the norm's sum order changes its bits.
    run = train_loop(step_loss, opt, clip_lr(spec, total), total, clip_params=list(model.parameters()),
                     name="clip", log=log, log_every=50, batch_size=spec.batch_size, after_step=clamp_temperature,
                     max_minutes=spec.max_minutes)
    model.eval()
    return model, run.losses, run.done, run.seconds


def retrieval_accuracy(model, images_u8, captions: list[str], batch: int = 256) -> dict:
    """Caption->image and image->caption top-1 over a set of images.

    Caption->image: for each image's caption, is the best-scoring image one with that caption?
    Image->caption: for each image, is the best-scoring distinct caption its own?
    """
    import torch

    tok = tokenizer()
    unique = sorted(set(captions))
    with torch.no_grad():
        feats = torch.cat([model.encode_image(normalize(images_u8[i : i + batch]), normalize=True)
                           for i in range(0, len(images_u8), batch)])
        tfeats = model.encode_text(tok(unique), normalize=True)
    sim = tfeats @ feats.T  # U x N
    cap_of = [unique.index(c) for c in captions]
    best_img = sim.argmax(1)  # per unique caption
    c2i = sum(captions[int(best_img[cap_of[i]])] == captions[i] for i in range(len(captions))) / len(captions)
    best_cap = sim.argmax(0)
    i2c = sum(int(best_cap[i]) == cap_of[i] for i in range(len(captions))) / len(captions)
    return {"caption_to_image_top1": c2i, "image_to_caption_top1": i2c, "images": len(captions),
            "distinct_captions": len(unique)}


# ----------------------------------------------------------------------------- save / load


def save_clip(model, folder: Path) -> None:
    """`toy-clip.json` + fp16 `open_clip_model.safetensors`, each written atomically."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.to(torch.float16) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    atomic_save_safetensors(sd, folder / WEIGHTS_FILE)
    atomic_write_text(folder / CONFIG_FILE, json.dumps(TOY_CLIP_CONFIG, indent=2, sort_keys=True) + "\n")


def load_toy_clip(folder: Path):
    """(model fp32 eval, preprocess, tokenizer) from a saved folder. Safetensors only."""
    import open_clip

    folder = Path(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.exists():
        raise FileNotFoundError(f"toy CLIP weights {weights} are missing; train them with "
                                "`castbook toymodel train-clip specs/toy/toy-clip.yaml`")
    register_config(folder)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=str(weights))
    model = model.float().eval()
    return model, preprocess, open_clip.get_tokenizer(MODEL_NAME)


def run_clip(spec: ToyClipSpec, root: Path, log: Callable[[str], None] = print) -> dict:
    """Generate data, train, save to `root/spec.output`, measure retrieval. Returns the record."""
    with deterministic(spec.seed, spec.threads):
        return _run_clip(spec, root, log)


def _run_clip(spec: ToyClipSpec, root: Path, log: Callable[[str], None]) -> dict:
    import torch

    t_start = time.time()
    images, captions = toy_images(spec.data.count, spec.data.seed, 64, spec.data.holdout)
    ev_images, ev_captions = toy_images(spec.data.eval_count, spec.data.eval_seed, 64, spec.data.holdout)
    t_data = time.time() - t_start
    model, losses, done, secs = train_clip(images, captions, spec.train, spec.seed, log)
    out = resolve(root, spec.output)
    save_clip(model, out)
    loaded, _, _ = load_toy_clip(out)  # measure what was saved (fp16 weights)
    acc = retrieval_accuracy(loaded, ev_images, ev_captions)
    record = {
        "spec": spec.model_dump(mode="json"),
        "steps_done": done,
        "seconds": {"data": round(t_data, 1), "train": round(secs, 1), "total": round(time.time() - t_start, 1)},
        "images_per_second": round(done * spec.train.batch_size / max(secs, 1e-9), 1),
        "final_loss_avg50": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "retrieval_held_out": acc,
        "threads": spec.threads,
        "torch": torch.__version__,
    }
    log("clip retrieval: " + json.dumps(acc))
    write_record(out, record)
    return record
