"""Prompts longer than the text encoders take are errors, located at the scene's prompt.

SDXL's CLIP text encoders see 77 tokens (the start and end tokens included); diffusers cuts the
rest off silently, so a long prompt renders as if its end were not there. The check counts each
job's final prompt (triggers and style included) with the tokenizer the base model ships, through
the `tokenizers` library (Rust, no torch): `castbook validate` and `castbook plan` stay light.

Tokenizer of each base model: a diffusers folder's own `tokenizer/` and `tokenizer_2/`
(`tokenizer.json`); built-ins, single-file checkpoints and folders without a `tokenizer.json` use
the CLIP BPE tokenizer castbook ships with its toy model, which is SDXL's (same vocabulary and
merges as `openai/clip-vit-large-patch14`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from schemas.job import RenderJob
from schemas.spec import DiffusersFolder, Spec

SHIPPED_CLIP_TOKENIZER = Path(__file__).resolve().parents[1] / "renderer" / "weights" / "toy" / "sdxl" / "tokenizer"
DEFAULT_MAX_TOKENS = 77


@lru_cache(maxsize=8)
def _load(folder: str) -> tuple[object, int]:
    from tokenizers import Tokenizer

    folder_path = Path(folder)
    tokenizer = Tokenizer.from_file(str(folder_path / "tokenizer.json"))
    try:
        config = json.loads((folder_path / "tokenizer_config.json").read_text(encoding="utf-8"))
        limit = int(config.get("model_max_length", DEFAULT_MAX_TOKENS))
    except (OSError, ValueError, TypeError):
        limit = DEFAULT_MAX_TOKENS
    return tokenizer, limit if limit <= 10_000 else DEFAULT_MAX_TOKENS  # transformers' "no limit" sentinel


def tokenizer_folders(spec: Spec, root: Path) -> list[Path]:
    """The tokenizer folders of the spec's base model (one per text encoder that has its own)."""
    model = spec.defaults.base_model
    if isinstance(model, DiffusersFolder):
        own = [root / model.path / name for name in ("tokenizer", "tokenizer_2")]
        own = [f for f in own if (f / "tokenizer.json").is_file()]
        if own:
            return own
    return [SHIPPED_CLIP_TOKENIZER]


def _overflow(tokenizer, limit: int, text: str) -> tuple[int, str] | None:
    encoding = tokenizer.encode(text)
    if len(encoding.ids) <= limit:
        return None
    # What the encoders never see: everything after the first limit-1 tokens (the last slot is the end token).
    cut = encoding.offsets[limit - 1][0] if len(encoding.offsets) >= limit else len(text)
    return len(encoding.ids), text[cut:].strip()


def prompt_length_problems(spec: Spec, jobs: list[RenderJob], root: Path) -> list[tuple[tuple, str]]:
    """(field path, message) for every scene prompt or negative prompt that some job renders past the
    text encoders' limit; one message per field, naming one job and how many share the problem."""
    folders = tokenizer_folders(spec, root)
    found: dict[tuple, list] = {}
    seen: set[tuple[str, str]] = set()
    for job in jobs:
        for field, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt)):
            if not text or (field, text) in seen:
                continue
            seen.add((field, text))
            for folder in folders:
                tokenizer, limit = _load(str(folder))
                over = _overflow(tokenizer, limit, text)
                if over:
                    loc = _field_loc(spec, job, field)
                    found.setdefault(loc, []).append((job, over, limit, field))
                    break
    problems = []
    for loc, hits in found.items():
        job, (count, lost), limit, field = hits[0]
        others = f" (and {len(hits) - 1} more prompt{'s' if len(hits) > 2 else ''} from this field)" if len(hits) > 1 else ""
        problems.append((loc, f"the {field.replace('_', ' ')} of job `{job.name}` is {count} tokens; the text "
                              f"encoders take {limit} (start and end tokens included) and diffusers silently drops "
                              f"the rest: {lost!r}{others}. Shorten the template, the trigger words or `style`"))
    return problems


def _field_loc(spec: Spec, job: RenderJob, field: str) -> tuple:
    if field == "prompt":
        return ("scenes", job.scene, "prompt")
    if spec.jobs[job.job].negative_prompt is not None:
        return ("jobs", job.job, "negative_prompt")
    if spec.scenes[job.scene].negative_prompt is not None:
        return ("scenes", job.scene, "negative_prompt")
    return ("defaults", "negative_prompt")


def check_prompt_lengths(loaded, jobs: list[RenderJob]) -> None:
    """Raise SpecErrors, located at the prompt fields, when a job's prompt is too long."""
    from schemas.loader import ErrorSink

    sink = ErrorSink(loaded.sources)
    for loc, message in prompt_length_problems(loaded.spec, jobs, loaded.root):
        sink.add(loc, message)
    sink.raise_if_any()
