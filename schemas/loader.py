"""Load YAML specs safely, with every error located as `file:line:col: field.path: message`.

The loader is the edge where files are read. It:
1. composes YAML with ruamel (no construction of arbitrary tags), rejects non-standard
   tags (`!!python/...`), duplicate keys and alias bombs before building any data;
2. builds plain data plus a map from field path to source location;
3. merges `include:` files (relative paths, cycle detection, never outside the root)
   and `-s key=value` overrides;
4. rewrites every path field relative to the project root, refusing escapes and
   missing files;
5. validates with pydantic and turns its errors into located, teaching messages
   (`schemas.located_validation`);
6. checks cross references (names, templates, job count) in `schemas.checks`.
All errors found are reported together.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel
from ruamel.yaml import YAML
from ruamel.yaml.composer import MaxDepthExceededError
from ruamel.yaml.error import MarkedYAMLError, ReusedAnchorWarning, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.reader import ReaderError

from core.errors import CastbookError
from schemas.paths import find_project_root, glob_matches, resolve_inside_root  # noqa: F401 - older import path

Loc = tuple[Union[str, int], ...]

MAX_FILE_BYTES = 2_000_000
MAX_EXPANDED_NODES = 100_000  # after alias expansion; a real spec has a few thousand
# Nesting depth, counted through aliases. A real spec nests under 10 levels; the limit keeps every
# recursive walk (ruamel's composer, ours, pydantic's) far from Python's recursion limit.
MAX_DEPTH = 100
TOO_DEEP = f"data nested more than {MAX_DEPTH} levels deep (counting aliases); specs need only a few levels"
MAX_INT_BITS = 128  # seeds and sizes need 64; a longer integer is a typo (and slow to print)
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
            shown = path.relative_to(root).as_posix()
        except ValueError:
            shown = "."
        if shown != ".":  # the root itself is shown whole
            return shown
    return str(path)


def parse_yaml(text: str, shown_as: str, base_loc: Loc = ()) -> tuple[Any, dict[Loc, Source]]:
    """Parse YAML text into plain Python data and a location per field path.

    Raises SpecErrors for syntax errors, unsafe tags, duplicate keys and alias bombs.
    """
    yaml = YAML(typ="safe", pure=True)
    yaml.max_depth = MAX_DEPTH  # ruamel's composer recurses per level; stop before Python's limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ReusedAnchorWarning)  # a redefined anchor is valid YAML
            root_node = yaml.compose(text)
    except MaxDepthExceededError as exc:
        raise SpecErrors([SpecError(shown_as, *_mark_line_col(exc.problem_mark), "", TOO_DEEP)]) from None
    except MarkedYAMLError as exc:
        line, col = _mark_line_col(exc.problem_mark or exc.context_mark)
        problem = (exc.problem or exc.context or "invalid YAML").strip()
        raise SpecErrors([SpecError(shown_as, line, col, "", f"invalid YAML: {problem}")]) from None
    except ReaderError as exc:  # a control character (NUL, BEL, U+FFFE...) anywhere in the text
        line, col = _position_line_col(text, exc.position)
        char = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "\0")
        raise SpecErrors([SpecError(shown_as, line, col, "",
                                    f"invalid YAML: control character U+{char:04X} is not allowed in a spec; "
                                    "remove it (write it as an escape like \"\\x00\" inside a double-quoted string)")]) from None
    except ValueError as exc:  # `%YAML 99...9`: ruamel converts directive numbers with int()
        raise SpecErrors([SpecError(shown_as, 1, 1, "", f"invalid YAML directive: {str(exc)[:120]}")]) from None
    except YAMLError as exc:  # any other ruamel error: still the user's text, never a traceback
        raise SpecErrors([SpecError(shown_as, 1, 1, "", f"invalid YAML: {str(exc).strip() or type(exc).__name__}")]) from None
    if root_node is None:
        return {}, {base_loc: Source(shown_as, 1, 1)}

    errors: list[SpecError] = []
    _check_nodes(root_node, shown_as, errors)
    if errors:
        raise SpecErrors(errors)

    locations: dict[Loc, Source] = {base_loc: Source(shown_as, 1, 1)}

    def mark_of(node: Node) -> Source:
        return Source(shown_as, node.start_mark.line + 1, node.start_mark.column + 1)

    def scalar(node: Node, loc: Loc) -> Any:
        try:
            value = yaml.constructor.construct_object(node, deep=True)
            too_big = isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS
        except (ValueError, OverflowError):  # an integer past Python's 4,300-digit conversion limit
            value, too_big = None, True
        except MarkedYAMLError as exc:  # e.g. `!!seq text`: a tag that does not fit the value
            errors.append(SpecError(shown_as, *_line_col(node), format_loc(loc),
                                    f"invalid YAML: {(exc.problem or 'cannot read this value').strip()}"))
            return None
        if isinstance(value, str) and not value.isascii():
            try:  # `"\ud800"` is valid YAML escaping but not text: it cannot be written, hashed or printed
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                errors.append(SpecError(shown_as, *_line_col(node), format_loc(loc),
                                        f"text holds a lone UTF-16 surrogate {value[exc.start]!r}; "
                                        "write the character itself (or a \\U00XXXXXX escape)"))
                return None
        if too_big:
            shown = node.value if len(node.value) <= 24 else node.value[:20] + "..."
            errors.append(SpecError(shown_as, *_line_col(node), format_loc(loc),
                                    f"number {shown} ({len(node.value):,} characters) is too large; "
                                    f"castbook's numbers fit in {MAX_INT_BITS} bits"))
            return None
        return value

    def build(node: Node, loc: Loc) -> Any:
        if isinstance(node, ScalarNode):
            return scalar(node, loc)
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
            if not isinstance(key_node, ScalarNode):  # `? [a, b]: ...` is YAML, but no spec key is a list
                errors.append(SpecError(shown_as, *_line_col(key_node), format_loc(loc),
                                        "a key must be a name (text), not a list or a mapping"))
                continue
            key = scalar(key_node, loc)
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


def _mark_line_col(mark: Any) -> tuple[int, int]:
    return (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)


def _position_line_col(text: str, position: Any) -> tuple[int, int]:
    if not isinstance(position, int) or not 0 <= position <= len(text):
        return 1, 1
    line = text.count("\n", 0, position) + 1
    return line, position - (text.rfind("\n", 0, position) + 1) + 1


def _check_nodes(root: Node, shown_as: str, errors: list[SpecError]) -> None:
    """Reject unsafe tags, duplicate keys, alias bombs and too-deep nesting on the composed graph.

    The node graph shares aliased nodes, so it is small even for a billion-laughs
    document; its expanded size and depth are computed with memoization, without expanding.
    The composer already stopped at MAX_DEPTH levels of text, so this walk's recursion is bounded.
    """
    expanded: dict[int, int] = {}
    depths: dict[int, int] = {}  # id → levels below and including the node, aliases expanded
    children: dict[int, list[Node]] = {}
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
        kids: list[Node] = []
        if isinstance(node, SequenceNode):
            for item in node.value:
                kids.append(item)
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
                kids += (key_node, value_node)
                total += size(key_node) + size(value_node)
                if total > MAX_EXPANDED_NODES:
                    break
        visiting.discard(nid)
        expanded[nid] = total
        depths[nid] = 1 + max((depths.get(id(k), 0) for k in kids), default=0)
        children[nid] = kids
        return total

    if size(root) > MAX_EXPANDED_NODES:
        errors.append(
            SpecError(
                shown_as, *_line_col(root), "",
                f"document expands to more than {MAX_EXPANDED_NODES:,} nodes through YAML aliases "
                "(an alias bomb?); write the data out or use fewer aliases",
            )
        )
    elif depths.get(id(root), 0) > MAX_DEPTH:
        # Aliases nest a deep value inside another; point at the level that crosses the limit.
        node = root
        for _ in range(MAX_DEPTH):
            node = max(children.get(id(node)) or [node], key=lambda n: depths.get(id(n), 0))
        errors.append(SpecError(shown_as, *_line_col(node), "", TOO_DEEP))


def read_yaml_file(path: Path, root: Path | None, base_loc: Loc = ()) -> tuple[Any, dict[Loc, Source]]:
    shown = display_path(path, root)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise SpecErrors([SpecError(shown, 1, 1, "", f"file is {size:,} bytes; specs are limited to {MAX_FILE_BYTES:,}")])
        with path.open(encoding="utf-8") as f:  # bounded: a pipe or /dev/zero has no size to check first
            text = f.read(MAX_FILE_BYTES + 1)
        if len(text) > MAX_FILE_BYTES:
            raise SpecErrors([SpecError(shown, 1, 1, "", f"more than {MAX_FILE_BYTES:,} characters; that is not a spec")])
    except FileNotFoundError:
        raise SpecErrors([SpecError(shown, 1, 1, "", "file not found")]) from None
    except UnicodeDecodeError as exc:
        raise SpecErrors([SpecError(shown, 1, 1, "", f"not UTF-8 text: {exc.reason}")]) from None
    except IsADirectoryError:
        raise SpecErrors([SpecError(shown, 1, 1, "", "is a directory, expected a YAML file")]) from None
    except OSError as exc:  # unreadable (permissions), a broken link, a name too long...
        raise SpecErrors([SpecError(shown, 1, 1, "", f"cannot read the file: {exc.strerror or exc}")]) from None
    return parse_yaml(text, shown, base_loc)


def load_yaml_model(path: Path, model_cls: type[BaseModel], root: Path | None = None) -> BaseModel:
    """Read one YAML file into `model_cls`, with located errors (used by training specs)."""
    path = Path(path).absolute()
    root = (root or find_project_root(path)).resolve()
    data, locations = read_yaml_file(path, root)
    sink = ErrorSink(SourceMap(locations, {(): path}))
    if not isinstance(data, dict):
        sink.add((), "the document must be a mapping of keys to values")
        sink.raise_if_any()
    from schemas.located_validation import validate_model  # it imports this module's ErrorSink

    model = validate_model(model_cls, data, sink)
    sink.raise_if_any()
    return model
