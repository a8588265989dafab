"""Durable outputs: PNG metadata, the run ledger, the lock and the image cache.

This module must not import torch, diffusers or ray: a fully cached run uses only it.

Run-directory format: docs/INTERFACES.md. The ledger (`manifest.jsonl`) is the run's
truth; the content-addressed cache (`.cache/images/<key>.png`) is what makes a re-run
(or the re-run of a killed run) render only what is missing.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import re
import socket
import subprocess
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image, PngImagePlugin

from core.errors import CastbookError
from core.files import atomic_write_bytes, atomic_write_json, atomic_write_text, fsync_dir
from schemas.job import RenderJob

CACHE_DIR = ".cache"
LOCK_NAME = ".lock"

# castbook scheduler name -> the sampler name A1111 writes in its infotext.
A1111_SAMPLERS = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "ddim": "DDIM",
    "unipc": "UniPC",
}


def castbook_version() -> str:
    try:
        return importlib.metadata.version("castbook")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


def package_version(name: str) -> str | None:
    """A package's installed version, read from metadata (never imports it: no torch here)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------
# PNG metadata: A1111 `parameters` text and a `castbook` JSON chunk
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# plan.jsonl (the ledger's JSONL rule is core.jsonl)
# ---------------------------------------------------------------------------


def write_plan_jsonl(path: Path, jobs: Iterable[RenderJob]) -> None:
    atomic_write_text(path, "".join(j.model_dump_json() + "\n" for j in jobs))


# ---------------------------------------------------------------------------
# Lock on the output root
# ---------------------------------------------------------------------------


class RunLocked(CastbookError):
    """Another castbook render holds the output root."""

    def __init__(self, root: Path, pid: str | None):
        self.root, self.pid = root, pid
        holder = f"process {pid}" if pid else "another process"
        super().__init__(
            f"output directory {root} is in use by {holder} (another `castbook render`); "
            f"wait for it to finish, or use a different --out"
        )


class RootLock:
    """fcntl.flock on DIR/.lock, non-blocking. Released on close or when the process dies."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.fd: int | None = None

    def acquire(self) -> RootLock:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 64, 0).decode("utf-8", "replace").strip() or None
            os.close(fd)
            raise RunLocked(self.root, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RootLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------
# Content-addressed image cache
# ---------------------------------------------------------------------------


class ImageCache:
    """`DIR/.cache/images/<key>.png`, plus `<key>.json` with the job's control-map names.

    The sidecar is written before the PNG, so a PNG present means a complete entry.
    """

    def __init__(self, root: Path):
        self.dir = Path(root) / CACHE_DIR / "images"
        self.control_dir = Path(root) / CACHE_DIR / "control"

    def png(self, key: str) -> Path:
        return self.dir / f"{key}.png"

    def has(self, key: str) -> bool:
        return self.png(key).is_file()

    def put(self, key: str, png: bytes, control_maps: list[str]) -> Path:
        atomic_write_json(self.dir / f"{key}.json", {"control_maps": control_maps})
        atomic_write_bytes(self.png(key), png)
        return self.png(key)

    def control_maps(self, key: str) -> list[str]:
        try:
            return json.loads((self.dir / f"{key}.json").read_text())["control_maps"]
        except (OSError, ValueError, KeyError):
            return []

    def put_control(self, name: str, png: bytes) -> Path:
        path = self.control_dir / safe_name(name)
        if not path.exists():
            atomic_write_bytes(path, png)
        return path


def safe_name(name: str) -> str:
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"control map name {name!r} must be a plain file name")
    return name


def image_relpath(job: RenderJob) -> str:
    """Where a job's image goes inside the run directory: images/<job name>.png."""
    parts = job.name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"job name {job.name!r} is not a safe relative path (empty, '.' or '..' part)")
    return f"images/{job.name}.png"


# ---------------------------------------------------------------------------
# run.json
# ---------------------------------------------------------------------------


def new_run_dir(out_dir: Path, stem: str) -> Path:
    """Create `<out>/<UTC timestamp>-<stem>/`, adding -2, -3... if that second is taken."""
    ts = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-") or "run"
    base = f"{ts}-{stem}"
    for i in range(1, 1000):
        run_dir = Path(out_dir) / (base if i == 1 else f"{base}-{i}")
        try:
            run_dir.mkdir(parents=True)
            fsync_dir(run_dir.parent)
            return run_dir
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run directory under {out_dir}")


def spec_digest(root: Path, spec_files: Iterable[Path | str]) -> str | None:
    h = hashlib.sha256()
    any_file = False
    for rel in sorted(str(p) for p in spec_files):
        p = Path(root) / rel
        if p.is_file():
            any_file = True
            h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest() if any_file else None


def git_commit(root: Path) -> str | None:
    try:
        r = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def base_environment() -> dict:
    """Environment facts known without importing torch (device/dtype come from the actor)."""
    return {
        "python": platform.python_version(),
        "castbook": castbook_version(),
        "torch": package_version("torch"),
        "diffusers": package_version("diffusers"),
        "ray": package_version("ray"),
        "device": None,
        "dtype": None,
        "gpu": None,
        "hostname": socket.gethostname(),
    }
