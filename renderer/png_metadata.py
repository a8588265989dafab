"""PNG metadata: the A1111-style `parameters` text chunk (infotext) and the `castbook` JSON chunk.

Torch-free. The actor embeds both in every PNG it returns (`encode_png`); `castbook reproduce`
reads the `castbook` chunk back (`read_castbook_chunk`), and A1111-compatible tools read
`parameters` (`parse_parameters` parses it as A1111 does).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
import struct
from pathlib import Path

from PIL import Image, PngImagePlugin

from core.model_hashes import A1111_LORA_HASH_LENGTH, a1111_lora_hash
from renderer.outputs import castbook_version
from schemas.ip_adapter import ip_scale_text
from schemas.job import RenderJob
from schemas.schedulers import SCHEDULERS

# castbook scheduler name -> the sampler name A1111 writes in its infotext.
A1111_SAMPLERS = {name: recipe.a1111 for name, recipe in SCHEDULERS.items()}



def short_hash(digest: str, n: int = 10) -> str:
    """The first `n` hex digits of a sha256 digest, as A1111 writes model hashes.

    Built-in models have digests like `builtin:tiny-sdxl@1`, which are not hex: hash them.
    """
    d = digest.removeprefix("sha256:")
    if re.fullmatch(r"[0-9a-f]{%d,}" % n, d):
        return d[:n]
    return hashlib.sha256(digest.encode("utf-8")).hexdigest()[:n]


def _quote(value: str) -> str:
    # A1111's infotext quoting: values with a comma, colon or newline are JSON strings.
    if "," not in value and "\n" not in value and ":" not in value:
        return value
    return json.dumps(value)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _fmt_weight(w: float) -> str:
    return f"{w:g}"


def model_name(model) -> str:
    """The checkpoint's name as A1111 writes it in `Model:`: a single file's stem, a folder's name,
    a built-in's name (`tiny-sdxl` for `builtin:tiny-sdxl`)."""
    if model.kind == "builtin":
        return model.ref.removeprefix("builtin:")
    path = Path(model.ref)
    return path.stem if model.kind == "single_file" else path.name


@functools.lru_cache(maxsize=256)
def _lora_file_hash(path: str, digest: str) -> str | None:
    # `digest` (the file's sha256, from the plan) is part of the cache key: a changed file is hashed again.
    try:
        return a1111_lora_hash(Path(path))
    except (OSError, struct.error):
        return None


def a1111_lora_hashes(job: RenderJob, root: Path | None) -> dict[str, str]:
    """A1111's LoRA hash (addnet: sha256 of the tensor data after the header, 12 hex digits) per
    LoRA of the job, hashed once per file and process (cached by path and digest)."""
    out = {}
    for lora in job.loras:
        h = _lora_file_hash(str(Path(root) / lora.path), lora.digest) if root is not None else None
        if h is not None:
            out[lora.name] = h
    return out


def format_parameters(job: RenderJob, lora_hashes: dict[str, str] | None = None) -> str:
    """The A1111-style infotext of a job (what A1111 1.10 stores in the PNG `parameters` chunk).

    `Model` is the checkpoint's name (`model_name`). `Model hash` is A1111's short hash (sha256
    of the file, 10 hex digits) for a single file; a diffusers folder has no A1111 hash (A1111
    loads single files only): it gets the first 10 digits of castbook's folder digest, and a
    built-in those of sha256("builtin:NAME@RECIPE"). `Lora hashes` uses A1111's LoRA hash from
    `lora_hashes` (`a1111_lora_hashes`); a LoRA whose file is not at hand falls back to the
    first 12 digits of its sha256. `Version: castbook-X.Y.Z` names the writer."""
    prompt = job.prompt
    if job.loras:
        # A1111 keeps LoRAs in the prompt as <lora:name:weight> tags.
        tags = " ".join(f"<lora:{l.name}:{_fmt_weight(l.weight)}>" for l in job.loras)
        prompt = f"{prompt} {tags}" if prompt else tags
    fields: list[tuple[str, str]] = [
        ("Steps", str(job.num_inference_steps)),
        ("Sampler", A1111_SAMPLERS.get(job.scheduler, job.scheduler)),
        *([("Schedule type", SCHEDULERS[job.scheduler].a1111_schedule)]
          if job.scheduler in SCHEDULERS and SCHEDULERS[job.scheduler].a1111_schedule else []),
        ("CFG scale", str(float(job.guidance_scale))),
        ("Seed", str(job.seed)),
        ("Size", f"{job.width}x{job.height}"),
        ("Model hash", short_hash(job.base_model.digest)),
        ("Model", model_name(job.base_model)),
    ]
    if job.vae is not None:  # A1111 writes these two for a non-default VAE
        fields += [("VAE hash", short_hash(job.vae.digest)), ("VAE", job.vae.ref)]
    if job.loras:
        hashes = lora_hashes or {}
        fields.append(("Lora hashes", ", ".join(
            f"{l.name}: {hashes.get(l.name) or short_hash(l.digest, A1111_LORA_HASH_LENGTH)}" for l in job.loras)))
    if job.controls:
        fields.append(("ControlNet", ", ".join(f"{c.type}: {_fmt_weight(c.scale)}" for c in job.controls)))
    fields += pass_parameters(job)
    if job.ip_adapter is not None:  # identity from reference images (renderer/ip_adapter.py)
        ip = job.ip_adapter
        fields += [("IP-Adapter", Path(ip.model).stem if not ip.model.startswith("builtin:") else ip.model),
                   ("IP-Adapter hash", short_hash(ip.digest)), ("IP-Adapter scale", ip_scale_text(ip.scale))]
    fields.append(("Version", f"castbook-{castbook_version()}"))
    params = ", ".join(f"{k}: {_quote(v)}" for k, v in fields)
    return f"{prompt}\nNegative prompt: {job.negative_prompt}\n{params}"


def pass_parameters(job: RenderJob) -> list[tuple[str, str]]:
    """Infotext fields of the finishing passes (schemas/passes.py), named as A1111 writes them:
    Denoising strength, Hires upscale/steps/upscaler, Refiner, Refiner switch at, and the
    ADetailer extension's fields for the detail pass."""
    p = job.passes
    if p is None:
        return []
    fields: list[tuple[str, str]] = []
    if p.init is not None:
        fields.append(("Denoising strength", _fmt_weight(p.init.strength)))
        if p.init.mask is not None:
            fields += [("Init image hash", short_hash(p.init.image_digest)),
                       ("Mask", "auto" if p.init.mask == "auto" else short_hash(p.init.mask_digest or ""))]
        else:
            fields.append(("Init image hash", short_hash(p.init.image_digest)))
    if p.hires is not None:
        h = p.hires
        fields += [("Hires strength" if p.init is not None else "Denoising strength", _fmt_weight(h.strength)),
                   ("Hires upscale", _fmt_weight(h.scale)), ("Hires steps", str(h.steps)),
                   ("Hires upscaler", {"latent": "Latent", "lanczos": "Lanczos"}[h.upscaler])]
    if p.refiner is not None:
        name = p.refiner.model_ref.removeprefix("builtin:").rsplit("/", 1)[-1].removesuffix(".safetensors")
        fields += [("Refiner", f"{name} [{short_hash(p.refiner.model_digest)}]"),
                   ("Refiner switch at", _fmt_weight(p.refiner.switch_at))]
    if p.detail is not None:
        d = p.detail
        # ADetailer writes the detector's file name; a detector folder's name stands in for it.
        fields += [("ADetailer model", Path(d.detector).name), ("ADetailer confidence", _fmt_weight(d.confidence)),
                   ("ADetailer denoising strength", _fmt_weight(d.strength)),
                   ("ADetailer inpaint padding", str(d.padding)), ("ADetailer use separate steps", "True"),
                   ("ADetailer steps", str(d.steps))]
        if d.prompt:
            fields.append(("ADetailer prompt", d.prompt))
    return fields


# A1111's own pattern for "Key: value" pairs in the last infotext line.
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_LORA_TAG = re.compile(r"<lora:([^:>]+):([^>]+)>")


def parse_parameters(text: str) -> dict[str, str]:
    """Parse A1111 infotext back into a dict, as A1111 does.

    Keys: "Prompt", "Negative prompt", then each "Key: value" of the last line, values
    unquoted strings ("Steps": "4", "Size": "64x64"). LoRA tags stay in "Prompt"; see
    `split_lora_tags`.
    """
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    params = _RE_PARAM.findall(last)
    if len(params) < 3:  # no parameter line: everything is prompt
        params, body = [], lines
    else:
        body = lines[:-1]
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].lstrip(" ")
        (negative_lines if in_negative else prompt_lines).append(line)
    out = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}
    for key, value in params:
        out[key.strip()] = _unquote(value.strip())
    return out


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Remove `<lora:name:weight>` tags from a prompt: (clean prompt, [(name, weight)])."""
    loras = [(m.group(1), float(m.group(2))) for m in _RE_LORA_TAG.finditer(prompt)]
    clean = re.sub(r"\s*<lora:[^>]+>", "", prompt).strip()
    return clean, loras


def castbook_metadata(job: RenderJob, environment: dict, performance: dict | None = None) -> dict:
    """The `castbook` PNG chunk: everything needed to reproduce the image."""
    return {
        "performance": dict(performance or {}),  # vae tiling etc. can change pixels
        "job": job.model_dump(mode="json"),
        "key": job.key,
        "model_digest": job.base_model.digest,
        "lora_digests": {l.name: l.digest for l in job.loras},
        "control_model_digests": {c.type: c.model.digest for c in job.controls},
        **({"ip_adapter": {"model": job.ip_adapter.model, "digest": job.ip_adapter.digest,
                           "encoder_digest": job.ip_adapter.encoder_digest, "scale": job.ip_adapter.scale}}
           if job.ip_adapter is not None else {}),
        "environment": environment,
    }


def encode_png(image: Image.Image, job: RenderJob, environment: dict, performance: dict | None = None,
               root: Path | None = None) -> bytes:
    """PNG bytes of `image` with the `parameters` and `castbook` text chunks.

    Deterministic: the same pixels, job and environment give the same bytes
    (no timestamps), so `castbook reproduce` can compare bytes.
    """
    info = PngImagePlugin.PngInfo()
    # add_text writes tEXt when latin-1 encodable, else iTXt (UTF-8): both are what parsers read.
    info.add_text("parameters", format_parameters(job, a1111_lora_hashes(job, root)))
    info.add_text("castbook", json.dumps(castbook_metadata(job, environment, performance), sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_png_text(path_or_bytes: Path | bytes) -> dict[str, str]:
    """The PNG's text chunks (tEXt/zTXt/iTXt) as a dict."""
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes | bytearray) else path_or_bytes
    with Image.open(src) as im:
        im.load()
        return dict(getattr(im, "text", {}) or im.info)


def read_castbook_chunk(path_or_bytes: Path | bytes) -> dict:
    """The parsed `castbook` chunk of a castbook PNG; ValueError when there is none."""
    text = read_png_text(path_or_bytes)
    if "castbook" not in text:
        raise ValueError(
            f"{path_or_bytes if isinstance(path_or_bytes, Path) else 'image'} has no 'castbook' metadata chunk; "
            "only PNGs written by `castbook render` can be reproduced"
        )
    return json.loads(text["castbook"])
