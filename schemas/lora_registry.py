"""`castbook loras add`: write a registry entry for a LoRA file, keeping the registry's comments.

The file is classified from its safetensors header (core/safetensors_info.py): only LoRAs for
SDXL in kohya or diffusers/peft form are added (an SD 1.x/2.x LoRA, a LyCORIS file or a
checkpoint is refused with what it is). The entry gets the rank, trigger words from the file's
metadata (`modelspec.trigger_phrase`, the most frequent `ss_tag_frequency` tags), a weight and
notes; its `path` is relative to the registry file, as the spec loader resolves it
(schemas/spec_loader.py). The YAML is edited with ruamel's round-trip mode, so comments and key
order stay, and written atomically (core/files.py). The entry is validated with `LoraEntry`.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

from core.errors import InputError
from core.files import atomic_write_text
from core.safetensors_info import classify, lora_rank_and_targets, read_header, suggested_trigger_words
from schemas.paths import find_project_root
from schemas.spec import NAME_PATTERN, LoraEntry


def _default_name(path: Path, metadata: dict[str, str]) -> str:
    raw = metadata.get("ss_output_name") or metadata.get("modelspec.title") or path.stem
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", raw.strip()).strip("._-") or "lora"
    return name[:80] if re.match(NAME_PATTERN, name) else "lora_" + name[:75]


def lora_entry_for(file: Path, registry: Path, kind: str = "other", weight: float = 1.0,
                   notes: str | None = None) -> tuple[str, dict]:
    """(suggested name, entry dict) for `file`, refusing what castbook cannot use as an SDXL LoRA."""
    file, registry = Path(file), Path(registry)
    try:
        header = read_header(file)
    except Exception as e:
        raise InputError(str(e)) from e
    what = classify(header)
    if what.kind != "lora":
        raise InputError(f"{file} is {what.label}, not a LoRA; `loras add` registers LoRA files only")
    if what.architecture not in ("SDXL", "unknown"):
        raise InputError(f"{file} is a LoRA for {what.architecture}; this registry is for SDXL (castbook renders "
                         f"SDXL only), so an {what.architecture} LoRA cannot be used. Find the SDXL version of it")
    if what.form == "LyCORIS":
        raise InputError(f"{file} is a LyCORIS (LoHa/LoKr) file; castbook loads LoRAs through diffusers/peft, "
                         f"which read kohya and diffusers LoRA files only")
    root = find_project_root(registry.resolve().parent)
    if not file.resolve().is_relative_to(root):
        raise InputError(f"{file} is outside the project {root}; spec paths stay inside the project root. "
                         f"Copy it in first (e.g. next to the registry, under loras/) and add that copy")
    rel = Path(os.path.relpath(file.resolve(), registry.resolve().parent)).as_posix()
    rank, targets = lora_rank_and_targets(header)
    md = header.metadata
    described = [f"{what.form} LoRA for {what.architecture}", "targets " + ", ".join(targets)]
    if md.get("modelspec.title") or md.get("ss_output_name"):
        described.append(f"title {md.get('modelspec.title') or md.get('ss_output_name')}")
    entry: dict = {"path": rel, "kind": kind, "trigger_words": suggested_trigger_words(md), "weight": weight}
    if rank:
        entry["rank"] = rank
    entry["notes"] = notes or "; ".join(described)
    LoraEntry.model_validate(entry)  # the same rules `castbook validate` applies
    return _default_name(file, md), entry


def add_lora(file: Path, registry: Path, name: str | None = None, kind: str = "other", weight: float = 1.0,
             notes: str | None = None) -> tuple[str, dict]:
    """Add `file` to `registry` (a YAML file with a `loras:` mapping; created if missing)."""
    from pydantic import ValidationError
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    registry = Path(registry)
    try:
        suggested, entry = lora_entry_for(file, registry, kind, weight, notes)
    except ValidationError as e:
        raise InputError(f"the entry for {file} is not valid: {e.errors()[0]['msg']} (check --kind and --weight)") from e
    name = name or suggested
    if not re.match(NAME_PATTERN, name) or len(name) > 80:
        raise InputError(f"LoRA name {name!r} must match {NAME_PATTERN} (letters, digits, _ . -); choose another with --name")
    yaml = YAML()  # round-trip: comments and order stay
    yaml.indent(mapping=2, sequence=2, offset=0)
    data = yaml.load(registry.read_text(encoding="utf-8")) if registry.is_file() else None
    if data is None:
        data = CommentedMap()
    if not isinstance(data, dict):
        raise InputError(f"{registry} is not a mapping of sections; it cannot hold a `loras:` registry")
    loras = data.get("loras")
    if loras is None:
        loras = data["loras"] = CommentedMap()
    if not isinstance(loras, dict):
        raise InputError(f"`loras` in {registry} is not a mapping of name -> entry")
    if name in loras:
        raise InputError(f"{registry} already has a LoRA named {name!r} (path {loras[name].get('path')}); "
                         f"choose another with --name")
    node = CommentedMap()
    for k, v in entry.items():
        if k == "trigger_words":
            seq = CommentedSeq(v)
            seq.fa.set_flow_style()
            node[k] = seq
        else:
            node[k] = v
    loras[name] = node
    buf = io.StringIO()
    yaml.dump(data, buf)
    atomic_write_text(registry, buf.getvalue())
    return name, entry
