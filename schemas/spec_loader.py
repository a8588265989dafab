"""`load_spec`: files → validated `Spec`, with includes, overrides and path checks."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from schemas.checks import check_references
from schemas.loader import (
    ErrorSink,
    Loc,
    Source,
    SourceMap,
    SpecError,
    SpecErrors,
    display_path,
    format_loc,
    parse_yaml,
    read_yaml_file,
)
from schemas.located_validation import validate_model
from schemas.model_checks import check_model_files
from schemas.paths import find_project_root, glob_matches, is_kind, path_problem, resolve_inside_root, shown_value
from schemas.spec import MERGEABLE_SECTIONS, PICKLE_SUFFIXES, Spec

OVERRIDE_FILE = "<command line>"


@dataclass(frozen=True)
class LoadedSpec:
    spec: Spec
    root: Path  # absolute, resolved
    files: tuple[Path, ...]  # every file read (main files and includes), absolute
    sources: SourceMap


def load_spec(paths: list[Path] | Path, overrides: list[str] = (), root: Path | None = None) -> LoadedSpec:
    """Load, merge, check and validate spec files. Raises SpecErrors with every error found.

    The first file is the main spec; further files are merged like includes.
    """
    paths = [Path(p).absolute() for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if not paths:
        raise SpecErrors([SpecError("<command line>", 1, 1, "", "no spec file given")])
    root = (root or find_project_root(paths[0])).resolve()
    sources = SourceMap()
    sink = ErrorSink(sources)
    files: list[Path] = []

    # 1. read the main file and merge its includes (and extra files) into it
    data = _read_tree(paths[0], root, sources, sink, files, stack=())
    for extra in paths[1:]:
        _merge_file(data, extra, (), root, sources, sink, files, stack=(paths[0].resolve(),))

    # 2. command-line overrides, applied after the files, validated like them
    for override in overrides:
        _apply_override(data, override, sources, sink)

    # 3. path fields: relative to their file, inside the root, existing
    refused: set[Loc] = set()
    for loc, kind in list(_path_fields(data)):
        errors_before = len(sink.errors)
        _check_path(data, loc, kind, root, sources, sink)
        if len(sink.errors) > errors_before:
            refused.add(loc)
    # 3b. prompt variables given as `{file: values.txt}` become their list of values
    for loc, _ in list(_var_files(data)):
        if loc in refused:  # the path's own error says why; stand in a value so nothing else cascades
            _set(data, loc[:-1], ["(unread)"])
        else:
            _read_var_file(data, loc, root, sink)

    # 4. schema
    spec = validate_model(Spec, data, sink)
    # 5. cross references, templates, job-count guard (needs a valid model)
    if spec is not None and not sink.errors:
        check_references(spec, sink)
    # 5b. a single-file base model must be an SDXL base checkpoint (its header only; schemas/model_checks.py)
    if spec is not None and not sink.errors:
        check_model_files(spec, root, sink)
    sink.raise_if_any()
    return LoadedSpec(spec=spec, root=root, files=tuple(files), sources=sources)


# --- includes ------------------------------------------------------------------------------


def _read_tree(path: Path, root: Path, sources: SourceMap, sink: ErrorSink, files: list[Path], stack: tuple[Path, ...]) -> dict:
    data, locations = read_yaml_file(path, root)
    files.append(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecErrors([SpecError(display_path(path, root), 1, 1, "", "a spec must be a mapping of sections (defaults, loras, characters, scenes, jobs, ...)")])
    sources.locations.update(locations)
    sources.files[()] = path
    for key in data:
        sources.files[(key,)] = path
    includes = data.get("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list):
        return data  # the schema reports the wrong type
    for i, inc in enumerate(includes):
        if not isinstance(inc, str):
            continue
        _merge_file(data, inc, ("include", i), root, sources, sink, files, stack + (path.resolve(),), base=path.parent)
    return data


def _merge_file(data: dict, value: str | Path, at: Loc, root: Path, sources: SourceMap, sink: ErrorSink,
                files: list[Path], stack: tuple[Path, ...], base: Path | None = None) -> None:
    def error_here(message: str) -> None:  # located in the including file, not the main one
        src = sources.locate(at)
        sink.errors.append(SpecError(src.file, src.line, src.col, format_loc(at), message))

    target, error = resolve_inside_root(str(value), base or Path.cwd(), root)
    if error:
        error_here(error)
        return
    if target in stack:
        chain = " -> ".join(display_path(p, root) for p in (*stack, target))
        error_here(f"include cycle: {chain}")
        return
    if not is_kind(target, "file"):
        error_here(f"included file {shown_value(str(value))} not found")
        return
    sub_sources = SourceMap()
    try:
        sub = _read_tree(target, root, sub_sources, sink, files, stack)
    except SpecErrors as exc:
        sink.errors.extend(exc.errors)
        return
    shown = display_path(target, root)
    for key, section in sub.items():
        if key == "include":
            continue
        if key not in MERGEABLE_SECTIONS:
            src = sub_sources.locate((key,))
            sink.errors.append(SpecError(src.file, src.line, src.col, key,
                                         f"an included file may only declare {', '.join(MERGEABLE_SECTIONS)}; "
                                         f"move `{key}` into the main spec"))
            continue
        if not isinstance(section, dict):
            src = sub_sources.locate((key,))
            sink.errors.append(SpecError(src.file, src.line, src.col, key, f"`{key}` must be a mapping of names"))
            continue
        into = data.setdefault(key, {})
        if not isinstance(into, dict):
            continue
        for name, entry in section.items():
            if name in into:
                first = sources.locate((key, name))
                src = sub_sources.locate((key, name))
                sink.errors.append(SpecError(src.file, src.line, src.col, f"{key}.{name}",
                                             f"`{name}` is already defined at {first.file}:{first.line}; names must be unique across included files"))
                continue
            into[name] = entry
    for loc, src in sub_sources.locations.items():
        if loc and loc[0] in MERGEABLE_SECTIONS and len(loc) >= 2:
            sources.locations.setdefault(loc, src)
    for loc, path in sub_sources.files.items():
        if loc and loc[0] in MERGEABLE_SECTIONS:
            for name in sub.get(loc[0], {}) if isinstance(sub.get(loc[0]), dict) else ():
                sources.files.setdefault((loc[0], name), path)
    del shown


# --- overrides --------------------------------------------------------------------------------


def _apply_override(data: dict, override: str, sources: SourceMap, sink: ErrorSink) -> None:
    shown = f"{OVERRIDE_FILE} -s {override}"
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        sink.errors.append(SpecError(shown, 1, 1, "", "overrides are written key.path=value, e.g. defaults.preset=draft"))
        return
    # ASCII digits only: "²".isdigit() is true but int("²") fails
    parts: list[str | int] = [int(p) if p.isascii() and p.isdigit() and len(p) < 10 else p
                              for p in key.strip().split(".")]
    try:
        value, _ = parse_yaml(raw, shown)
    except SpecErrors as exc:
        sink.errors.extend(exc.errors)
        return
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, dict):
            if part not in node:  # a section the override creates: its errors point at the override
                sources.locations[tuple(parts[:i + 1])] = Source(shown, 1, 1)
            node = node.setdefault(part, [] if isinstance(nxt, int) else {})
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            sink.errors.append(SpecError(shown, 1, 1, key, f"cannot set `{key}`: `{'.'.join(map(str, parts[:i + 1]))}` is not a mapping"))
            return
    last = parts[-1]
    if isinstance(node, dict):
        node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value
    else:
        sink.errors.append(SpecError(shown, 1, 1, key, f"cannot set `{key}`"))
        return
    loc = tuple(parts)
    for existing in [l for l in sources.locations if l[: len(loc)] == loc]:
        del sources.locations[existing]
    sources.locations[loc] = Source(shown, 1, 1)
    sources.files[loc] = Path.cwd() / "<override>"


# --- path fields ------------------------------------------------------------------------------

# kinds: file (must exist), dir, model (builtin:/folder/.safetensors), glob (≥1 match)


def _path_fields(data: dict) -> Iterator[tuple[Loc, str]]:
    def get(d: Any, key: str) -> Any:
        return d.get(key) if isinstance(d, dict) else None

    defaults = get(data, "defaults")
    if get(defaults, "base_model") is not None:
        yield from _model_fields(("defaults", "base_model"), get(defaults, "base_model"))
    if isinstance(get(defaults, "controlnets"), dict):
        for ctype, model in defaults["controlnets"].items():
            yield from _model_fields(("defaults", "controlnets", ctype), model)
    if isinstance(get(defaults, "annotators"), str):
        yield ("defaults", "annotators"), "dir"
    for name, lora in (get(data, "loras") or {}).items() if isinstance(get(data, "loras"), dict) else ():
        if isinstance(get(lora, "path"), str):
            yield ("loras", name, "path"), "file"
    for name, char in (get(data, "characters") or {}).items() if isinstance(get(data, "characters"), dict) else ():
        refs = get(char, "references")
        if isinstance(refs, list):
            for i, ref in enumerate(refs):
                if isinstance(ref, str):
                    yield ("characters", name, "references", i), "glob"
        ip = get(char, "ip_adapter")
        if isinstance(get(ip, "model"), str) and not ip["model"].startswith("builtin:"):
            yield ("characters", name, "ip_adapter", "model"), "file"
        if isinstance(get(ip, "image_encoder"), str):
            yield ("characters", name, "ip_adapter", "image_encoder"), "dir"
        if isinstance(get(ip, "images"), list):
            for i, ref in enumerate(ip["images"]):
                if isinstance(ref, str):
                    yield ("characters", name, "ip_adapter", "images", i), "glob"
    for name, scene in (get(data, "scenes") or {}).items() if isinstance(get(data, "scenes"), dict) else ():
        controls = get(scene, "controls")
        if isinstance(controls, list):
            for i, control in enumerate(controls):
                base = ("scenes", name, "controls", i)
                if isinstance(get(control, "image"), str):
                    yield base + ("image",), "file"
                if isinstance(get(control, "annotator"), str):
                    yield base + ("annotator",), "dir"
                if get(control, "model") is not None:
                    yield from _model_fields(base + ("model",), control["model"])
    yield from _pass_path_fields(data)
    yield from _var_files(data)
    if isinstance(get(get(data, "performance"), "vae"), str):
        yield ("performance", "vae"), "dir"
    scoring = get(data, "scoring")
    if isinstance(get(scoring, "weights"), str):
        yield ("scoring", "weights"), "file"
    if isinstance(get(scoring, "dino"), str):
        yield ("scoring", "dino"), "dir"


def _pass_path_fields(data: dict) -> Iterator[tuple[Loc, str]]:
    """Finishing passes (schemas/passes.py): init images, plates, masks (`auto` is no path), refiner models,
    detail-pass detector folders (`toy` is no path)."""
    for section, keys in (("scenes", ("init_image", "background_plate", "mask")), ("jobs", ("init_image",))):
        owners = data.get(section) if isinstance(data, dict) else None
        for name, owner in owners.items() if isinstance(owners, dict) else ():
            for key in keys:
                value = owner.get(key) if isinstance(owner, dict) else None
                if isinstance(value, str) and not (key == "mask" and value == "auto"):
                    yield (section, name, key), "file"
    for section in ("presets", "jobs"):
        owners = data.get(section) if isinstance(data, dict) else None
        for name, owner in owners.items() if isinstance(owners, dict) else ():
            refiner = owner.get("refiner") if isinstance(owner, dict) else None
            if isinstance(refiner, dict):
                yield from _model_fields((section, name, "refiner", "model"), refiner.get("model"))
            detail = owner.get("detail") if isinstance(owner, dict) else None
            detector = detail.get("detector") if isinstance(detail, dict) else None
            if isinstance(detector, str) and detector != "toy":
                yield (section, name, "detail", "detector"), "dir"


VAR_FILE_MAX_BYTES = 1 << 20


def _var_files(data: dict) -> Iterator[tuple[Loc, str]]:
    """`vars: {NAME: {file: PATH}}` on characters, scenes and jobs: the PATH fields."""
    for section in ("characters", "scenes", "jobs"):
        owners = data.get(section) if isinstance(data, dict) else None
        for name, owner in owners.items() if isinstance(owners, dict) else ():
            variables = owner.get("vars") if isinstance(owner, dict) else None
            for var, value in variables.items() if isinstance(variables, dict) else ():
                if isinstance(value, dict) and set(value) == {"file"} and isinstance(value["file"], str):
                    yield (section, name, "vars", var, "file"), "file"


def _read_var_file(data: dict, loc: Loc, root: Path, sink: ErrorSink) -> None:
    """Replace `{file: PATH}` (already checked and root-relative) with the file's values: one per
    line, blank lines and `#` comments left out."""
    path = root / _get(data, loc)
    try:
        if path.stat().st_size > VAR_FILE_MAX_BYTES:
            sink.add(loc, f"values file {display_path(path, root)} is over {VAR_FILE_MAX_BYTES // 1024} KiB; "
                          "a prompt variable needs a few lines")
            _set(data, loc[:-1], ["(unread)"])
            return
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        sink.add(loc, f"values file {display_path(path, root)} is not UTF-8 text")
        _set(data, loc[:-1], ["(unread)"])
        return
    except OSError as exc:
        sink.add(loc, f"values file {display_path(path, root)} cannot be read: {exc.strerror}")
        _set(data, loc[:-1], ["(unread)"])
        return
    values = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not values:
        sink.add(loc, f"values file {display_path(path, root)} has no values (one per line; # starts a comment)")
    _set(data, loc[:-1], values or ["(unread)"])


def _model_fields(loc: Loc, value: Any) -> Iterator[tuple[Loc, str]]:
    if isinstance(value, str) and not value.startswith("builtin:"):
        yield loc, "model"
    elif isinstance(value, dict):
        if isinstance(value.get("path"), str):
            yield loc + ("path",), "dir" if value.get("type") == "diffusers" else "file"
        if isinstance(value.get("config"), str):
            yield loc + ("config",), "dir"


def _get(data: Any, loc: Loc) -> Any:
    for part in loc:
        data = data[part]
    return data


def _set(data: Any, loc: Loc, value: Any) -> None:
    for part in loc[:-1]:
        data = data[part]
    data[loc[-1]] = value


def _check_path(data: dict, loc: Loc, kind: str, root: Path, sources: SourceMap, sink: ErrorSink) -> None:
    value: str = _get(data, loc)
    declared_in = sources.file_of(loc)
    base = declared_in.parent if declared_in and declared_in.name != "<override>" else Path.cwd()
    if kind == "model" and value.lower().endswith(PICKLE_SUFFIXES):
        return  # the schema explains the pickle refusal
    problem = path_problem(value)
    if problem:
        sink.add(loc, problem)
        return
    if kind == "glob":
        pattern = os.path.normpath(base / value)
        if not Path(pattern).is_relative_to(root):
            sink.add(loc, f"reference glob {shown_value(value)} points outside the project root {root}")
            return
        matches = glob_matches(pattern)
        if not matches:
            sink.add(loc, f"reference glob {shown_value(value)} matches no file (looked in {display_path(Path(pattern).parent, root)})")
            return
        for match in matches:
            _, error = resolve_inside_root(str(match), base, root)
            if error:
                sink.add(loc, error)
                return
        _set(data, loc, Path(pattern).relative_to(root).as_posix())
        return
    resolved, error = resolve_inside_root(value, base, root)
    if error:
        sink.add(loc, error)
        return
    if kind == "model":
        kind = "file" if value.endswith(".safetensors") else "dir"
    if kind == "file" and not is_kind(resolved, "file"):
        sink.add(loc, f"file {shown_value(value)} not found (resolved to {display_path(resolved, root)})")
        return
    if kind == "dir" and not is_kind(resolved, "dir"):
        sink.add(loc, f"folder {shown_value(value)} not found (resolved to {display_path(resolved, root)})")
        return
    rel = resolved.relative_to(root).as_posix() or "."
    _set(data, loc, rel)


def deep_copy(data: Any) -> Any:
    return copy.deepcopy(data)
