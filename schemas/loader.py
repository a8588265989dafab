"""Load YAML specs safely, with every error located as `file:line:col: field.path: message`.

The loader is the edge where files are read. It:
1. composes YAML with ruamel (no construction of arbitrary tags), rejects non-standard
   tags (`!!python/...`), duplicate keys and alias bombs before building any data;
2. builds plain data plus a map from field path to source location;
3. merges `include:` files (relative paths, cycle detection, never outside the root)
   and `-s key=value` overrides;
4. rewrites every path field relative to the project root, refusing escapes and
   missing files;
5. validates with pydantic and turns its errors into located, teaching messages;
6. checks cross references (names, templates, job count) in `schemas.checks`.
All errors found are reported together.
"""

from __future__ import annotations

import difflib
import glob
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from core.errors import CastbookError

Loc = tuple[Union[str, int], ...]

MAX_FILE_BYTES = 2_000_000
MAX_EXPANDED_NODES = 100_000  # after alias expansion; a real spec has a few thousand
ALLOWED_TAGS = {
    "tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null", "map", "seq")
}
MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True, order=True)
class SpecError:
    file: str
    line: int
    col: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}:{self.col}: {where}{self.message}"


class SpecErrors(CastbookError):
    """All errors found in a spec, each located."""

    def __init__(self, errors: list[SpecError]):
        self.errors = sorted(set(errors))
        super().__init__("\n".join(str(e) for e in self.errors))


@dataclass(frozen=True)
class Source:
    file: str  # as shown to the user (relative to the root when inside it)
    line: int
    col: int


@dataclass
class SourceMap:
    """Field path → where it was written. Used to locate every error."""

    locations: dict[Loc, Source] = field(default_factory=dict)
    files: dict[Loc, Path] = field(default_factory=dict)  # loc → absolute file that declared it

    def locate(self, loc: Loc) -> Source:
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.locations:
                return self.locations[loc[:n]]
        return Source("<unknown>", 1, 1)

    def file_of(self, loc: Loc) -> Path | None:
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.files:
                return self.files[loc[:n]]
        return None


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class ErrorSink:
    def __init__(self, sources: SourceMap):
        self.sources = sources
        self.errors: list[SpecError] = []

    def add(self, loc: Loc, message: str) -> None:
        src = self.sources.locate(loc)
        self.errors.append(SpecError(src.file, src.line, src.col, format_loc(loc), message))

    def raise_if_any(self) -> None:
        if self.errors:
            raise SpecErrors(self.errors)


# --- 1+2: safe YAML to plain data with locations ------------------------------------------


def display_path(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return str(path)


def parse_yaml(text: str, shown_as: str, base_loc: Loc = ()) -> tuple[Any, dict[Loc, Source]]:
    """Parse YAML text into plain Python data and a location per field path.

    Raises SpecErrors for syntax errors, unsafe tags, duplicate keys and alias bombs.
    """
    yaml = YAML(typ="safe", pure=True)
    try:
        root_node = yaml.compose(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = (exc.problem or exc.context or "invalid YAML").strip()
        raise SpecErrors([SpecError(shown_as, line, col, "", f"invalid YAML: {problem}")]) from None
    if root_node is None:
        return {}, {base_loc: Source(shown_as, 1, 1)}

    errors: list[SpecError] = []
    _check_nodes(root_node, shown_as, errors)
    if errors:
        raise SpecErrors(errors)

    locations: dict[Loc, Source] = {base_loc: Source(shown_as, 1, 1)}

    def mark_of(node: Node) -> Source:
        return Source(shown_as, node.start_mark.line + 1, node.start_mark.column + 1)

    def build(node: Node, loc: Loc) -> Any:
        if isinstance(node, ScalarNode):
            value = yaml.constructor.construct_object(node, deep=True)
            return value
        if isinstance(node, SequenceNode):
            out = []
            for i, item in enumerate(node.value):
                locations[loc + (i,)] = mark_of(item)
                out.append(build(item, loc + (i,)))
            return out
        assert isinstance(node, MappingNode)
        result: dict[str, Any] = {}
        merged: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                for src in sources:
                    value = build(src, loc)
                    if not isinstance(value, dict):
                        errors.append(SpecError(shown_as, *_line_col(src), format_loc(loc), "`<<` merges mappings only"))
                        continue
                    for k, v in value.items():
                        merged.setdefault(k, v)
                continue
            key = yaml.constructor.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                key = str(key)
            locations[loc + (key,)] = mark_of(key_node)
            result[key] = build(value_node, loc + (key,))
        for k, v in merged.items():
            result.setdefault(k, v)
        return result

    data = build(root_node, base_loc)
    if errors:
        raise SpecErrors(errors)
    return data, locations


def _line_col(node: Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _check_nodes(root: Node, shown_as: str, errors: list[SpecError]) -> None:
    """Reject unsafe tags, duplicate keys and alias bombs on the composed graph.

    The node graph shares aliased nodes, so it is small even for a billion-laughs
    document; its expanded size is computed with memoization, without expanding.
    """
    expanded: dict[int, int] = {}
    visiting: set[int] = set()

    def size(node: Node) -> int:
        nid = id(node)
        if nid in expanded:
            return expanded[nid]
        if nid in visiting:  # recursive alias
            errors.append(SpecError(shown_as, *_line_col(node), "", "recursive YAML alias is not allowed"))
            return MAX_EXPANDED_NODES + 1
        visiting.add(nid)
        if node.tag not in ALLOWED_TAGS and node.tag != MERGE_TAG:
            errors.append(
                SpecError(
                    shown_as, *_line_col(node), "",
                    f"YAML tag `{node.tag.replace('tag:yaml.org,2002:', '!!')}` is not allowed; "
                    "specs hold plain data only (strings, numbers, booleans, lists, mappings)",
                )
            )
        total = 1
        if isinstance(node, SequenceNode):
            for item in node.value:
                total += size(item)
                if total > MAX_EXPANDED_NODES:
                    break
        elif isinstance(node, MappingNode):
            seen: dict[Any, Node] = {}
            for key_node, value_node in node.value:
                if isinstance(key_node, ScalarNode) and key_node.tag != MERGE_TAG:
                    if key_node.value in seen:
                        first = seen[key_node.value]
                        errors.append(
                            SpecError(
                                shown_as, *_line_col(key_node), "",
                                f"duplicate key `{key_node.value}` (first defined at line {first.start_mark.line + 1})",
                            )
                        )
                    seen[key_node.value] = key_node
                total += size(key_node) + size(value_node)
                if total > MAX_EXPANDED_NODES:
                    break
        visiting.discard(nid)
        expanded[nid] = total
        return total

    if size(root) > MAX_EXPANDED_NODES:
        errors.append(
            SpecError(
                shown_as, *_line_col(root), "",
                f"document expands to more than {MAX_EXPANDED_NODES:,} nodes through YAML aliases "
                "(an alias bomb?); write the data out or use fewer aliases",
            )
        )


def read_yaml_file(path: Path, root: Path | None, base_loc: Loc = ()) -> tuple[Any, dict[Loc, Source]]:
    shown = display_path(path, root)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise SpecErrors([SpecError(shown, 1, 1, "", f"file is {size:,} bytes; specs are limited to {MAX_FILE_BYTES:,}")])
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecErrors([SpecError(shown, 1, 1, "", "file not found")]) from None
    except UnicodeDecodeError as exc:
        raise SpecErrors([SpecError(shown, 1, 1, "", f"not UTF-8 text: {exc.reason}")]) from None
    except IsADirectoryError:
        raise SpecErrors([SpecError(shown, 1, 1, "", "is a directory, expected a YAML file")]) from None
    return parse_yaml(text, shown, base_loc)


# --- project root and paths --------------------------------------------------------------


def find_project_root(start: Path) -> Path:
    """The nearest ancestor holding `.git` or `pyproject.toml`, else the spec's folder."""
    start = start.resolve()
    folder = start if start.is_dir() else start.parent
    for candidate in (folder, *folder.parents):
        if (candidate / ".git").exists() or (candidate / "pyproject.toml").exists():
            return candidate
    return folder


def resolve_inside_root(value: str, base_dir: Path, root: Path) -> tuple[Path | None, str | None]:
    """Join `value` to `base_dir`; return (absolute resolved path, None) or (None, error).

    Symlinks are resolved first, so a link inside the root that points outside is refused.
    """
    candidate = Path(os.path.normpath(base_dir / value))
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError) as exc:
        return None, f"cannot resolve path {value!r}: {exc}"
    root = root.resolve()
    if not resolved.is_relative_to(root):
        how = "through a symlink " if candidate.is_relative_to(root) else ""
        return None, f"path {value!r} points {how}outside the project root {root}; keep specs' files inside it"
    return resolved, None


# --- 5: pydantic errors to located messages ---------------------------------------------------


def _unwrap(tp: Any) -> list[Any]:
    """Annotated/Optional/Union → the concrete member types."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin is Union or (origin is not None and str(origin) == "types.UnionType"):
        out = []
        for arg in typing.get_args(tp):
            if arg is not type(None):
                out.extend(_unwrap(arg))
        return out
    import types

    if isinstance(tp, types.UnionType):
        return [m for a in tp.__args__ if a is not type(None) for m in _unwrap(a)]
    return [tp]


def fields_at(model_cls: type[BaseModel], loc: Loc) -> list[str]:
    """Field names allowed at `loc` (a path into data validated by `model_cls`)."""
    current: list[Any] = [model_cls]
    for part in loc:
        nxt: list[Any] = []
        for tp in current:
            for member in _unwrap(tp):
                origin = typing.get_origin(member)
                if isinstance(member, type) and issubclass(member, BaseModel):
                    if isinstance(part, str) and part in member.model_fields:
                        nxt.append(member.model_fields[part].annotation)
                    elif isinstance(part, str):
                        # a discriminator tag inside a union: stay on the member that owns it
                        tag = member.model_fields.get("type")
                        if tag is not None and part in (typing.get_args(tag.annotation) or ()):
                            nxt.append(member)
                elif origin is dict:
                    nxt.append(typing.get_args(member)[1])
                elif origin is list or origin is tuple:
                    if isinstance(part, int):
                        nxt.append(typing.get_args(member)[0])
        current = nxt
    names: list[str] = []
    for tp in current:
        for member in _unwrap(tp):
            if isinstance(member, type) and issubclass(member, BaseModel):
                names.extend(n for n in member.model_fields if n not in names)
    return names


def _data_loc(data: Any, loc: Loc) -> Loc:
    """Drop the parts of a pydantic loc that are not in the data (union tags, validator names)."""
    out: list[Union[str, int]] = []
    current = data
    for part in loc:
        if isinstance(current, dict) and part in current:
            out.append(part)
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            out.append(part)
            current = current[part]
    return tuple(out)


def validation_errors(exc: ValidationError, data: Any, model_cls: type[BaseModel], sink: ErrorSink) -> None:
    for err in exc.errors(include_url=False):
        raw_loc = tuple(err["loc"])
        loc = _data_loc(data, raw_loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            parent, key = loc[:-1], loc[-1] if loc else ""
            allowed = fields_at(model_cls, parent)
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f"did you mean `{close[0]}`?" if close else f"allowed: {', '.join(allowed)}"
            sink.add(loc, f"unknown key `{key}`; {hint}")
        elif kind == "missing":
            missing = raw_loc[-1] if raw_loc else "?"
            sink.add(loc, f"missing required key `{missing}`")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            value = err.get("input")
            if isinstance(value, (str, int, float, bool)) and kind != "value_error" and repr(value) not in msg:
                msg += f" (got {value!r})"
            if kind != "value_error" and msg:  # pydantic's own sentences; ours are already lower-case where they should be
                msg = msg[0].lower() + msg[1:]
            sink.add(loc, msg or kind)


def validate_model(model_cls: type[BaseModel], data: Any, sink: ErrorSink) -> BaseModel | None:
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        validation_errors(exc, data, model_cls, sink)
        return None


def load_yaml_model(path: Path, model_cls: type[BaseModel], root: Path | None = None) -> BaseModel:
    """Read one YAML file into `model_cls`, with located errors (used by training specs)."""
    path = Path(path).absolute()
    root = (root or find_project_root(path)).resolve()
    data, locations = read_yaml_file(path, root)
    sink = ErrorSink(SourceMap(locations, {(): path}))
    if not isinstance(data, dict):
        sink.add((), "the document must be a mapping of keys to values")
        sink.raise_if_any()
    model = validate_model(model_cls, data, sink)
    sink.raise_if_any()
    return model


def glob_matches(pattern_abs: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(pattern_abs, recursive=True) if Path(p).is_file())
