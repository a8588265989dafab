"""PNG metadata: the A1111-style `parameters` text chunk (infotext) and the `castbook` JSON chunk.

Torch-free. The actor embeds both in every PNG it returns (`encode_png`); `castbook reproduce`
reads the `castbook` chunk back (`read_castbook_chunk`), and A1111-compatible tools read
`parameters` (`parse_parameters` parses it as A1111 does).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from renderer.outputs import castbook_version
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


def format_parameters(job: RenderJob) -> str:
    """The A1111-style infotext of a job (what A1111 stores in the PNG `parameters` chunk)."""
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
        ("Model", job.base_model.ref),
    ]
    if job.vae is not None:  # A1111 writes these two for a non-default VAE
        fields += [("VAE hash", short_hash(job.vae.digest)), ("VAE", job.vae.ref)]
    if job.loras:
        fields.append(("Lora hashes", ", ".join(f"{l.name}: {short_hash(l.digest)}" for l in job.loras)))
    if job.controls:
        fields.append(("ControlNet", ", ".join(f"{c.type}: {_fmt_weight(c.scale)}" for c in job.controls)))
    if job.ip_adapter is not None:  # identity from reference images (renderer/ip_adapter.py)
        ip = job.ip_adapter
        fields += [("IP-Adapter", Path(ip.model).stem if not ip.model.startswith("builtin:") else ip.model),
                   ("IP-Adapter hash", short_hash(ip.digest)), ("IP-Adapter scale", _fmt_weight(ip.scale))]
    fields.append(("castbook", castbook_version()))
    params = ", ".join(f"{k}: {_quote(v)}" for k, v in fields)
    return f"{prompt}\nNegative prompt: {job.negative_prompt}\n{params}"


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


def encode_png(image: Image.Image, job: RenderJob, environment: dict, performance: dict | None = None) -> bytes:
    """PNG bytes of `image` with the `parameters` and `castbook` text chunks.

    Deterministic: the same pixels, job and environment give the same bytes
    (no timestamps), so `castbook reproduce` can compare bytes.
    """
    info = PngImagePlugin.PngInfo()
    # add_text writes tEXt when latin-1 encodable, else iTXt (UTF-8): both are what parsers read.
    info.add_text("parameters", format_parameters(job))
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
