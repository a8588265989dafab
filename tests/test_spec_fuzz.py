"""Property: whatever YAML a user writes, `castbook validate` and `castbook plan` end with exit 0
or 2 and a message, never a traceback, and quickly.

Two generators: random YAML texts (random nesting, types, unicode, anchors and aliases, tags,
control characters, huge numbers, deep nesting, syntax damage), and the demo spec
(specs/examples/luca.yaml) with one field replaced, removed or added, so that the documents
reach the deep checks (paths, references, templates, job counts), not only the top-level type
check. The CLI runs in-process; `tests/test_cli_errors.py` checks real processes.

What it found, each now a case in `tests/test_spec_errors.py`: NUL and other control characters
(ruamel's ReaderError), integers past 4,300 digits (and in a `%YAML` directive), a mapping used as a
key, `!!seq` on a scalar, a list as a training spec's `kind`, NUL / lone-surrogate / over-long path
values (ValueError, UnicodeEncodeError, ENAMETOOLONG from the OS), a lone surrogate in a prompt
(the job key could not be hashed).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from castbook.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "specs" / "examples"

# Reproducible in CI (derandomize), bounded per document (deadline) and in total (max_examples).
# About 10 s for both tests here; capfd is read after every call, so a function-scoped fixture is fine.
FUZZ = settings(max_examples=150, deadline=5000, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.large_base_example])

KEYS = ["version", "include", "max_jobs", "defaults", "presets", "loras", "characters", "scenes", "jobs",
        "performance", "scoring", "base_model", "preset", "path", "kind", "prompt", "controls", "image", "type",
        "seeds", "count", "start", "sweep", "references", "extends", "width", "height", "model", "weights",
        "<<", "dataset", "unet", "vae", "base", "steps", "data", "train", "output", "luca", "main", "vars", "file",
        "recommended", "use_recommended"]
NASTY = ["../../etc/passwd", "/etc/passwd", "/etc/hosts.safetensors", "../outside.yaml", "loras/luca.safetensors",
         "builtin:tiny-sdxl", "builtin:nope", "model.ckpt", "assets/toy/*.png", "**/*", "/", ".", "..", "",
         "a\x00b", "\x00", "nul\x00.safetensors", "\ud800", "\udcff.png", "~", "null", "yes", "NaN", "-.inf",
         "{{ character }}", "{{ charcter }}", "{{ ''.__class__.__mro__ }}", "{% if %}", "{{", "}}{%",
         "C:\\Windows\\system32", "\\\\server\\share", "registry.yaml", "luca.yaml", "x" * 300, "😀" * 20, "\u202e",
         "canny", "euler", "draft", "loras.luca.weight", "file:///etc/passwd"]

PATH_KEYS = {"path", "image", "base_model", "include", "references", "annotator", "annotators", "vae", "config",
             "weights", "dino", "file"}
paths = st.one_of(
    st.sampled_from(NASTY[:24]),
    st.text(alphabet=st.sampled_from("ab./*?[]\\\x00~:\ud800\udcff😀 "), max_size=16),
    st.builds(lambda n, sep: sep.join(["a" * n] * (5000 // (n + 1))), st.sampled_from([1, 100, 255, 256, 4000]),
              st.sampled_from(["/", "x"])),
)
TEMPLATES = [
    "{{ character }} on the beach", "{% if character %}{{ character|upper }}{% endif %}", "{{ name }}, {{ trigger }}",
    "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
    "{% for a in character %}{% for b in character %}{% for c in character %}{% for d in character %}x"
    "{% endfor %}{% endfor %}{% endfor %}{% endfor %}",
    "{{ 'x' * 10**10 }}", "{{ 9**9**9 }}", "{{ '%0999999999d' % 1 }}", "{{ character|center(1000000000) }}",
    "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "{{ range(10**9)|list }}", "{{ lipsum(10**6) }}",
    "{{ character.__class__.__mro__ }}", "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}", "{{ " + "[" * 3000 + "]" * 3000 + " }}",
    "{{ character|map('center', 10**9)|list }}", "{% set x = character ~ character %}{{ x }}", "{{ }}", "{% %}",
]
templates = st.one_of(st.sampled_from(TEMPLATES), st.text(alphabet=st.sampled_from("{}%#() *a|"), max_size=30))

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2 ** 140), max_value=2 ** 140),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(NASTY),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), inner, max_size=4)),
    max_leaves=25,
)

PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_./*-]*")
TAGS = ["!!python/object/apply:os.system", "!!python/name:os.system", "!foo", "!!binary", "!!set",
        "!!omap", "!!timestamp", "!!str", "!!int", "!!float", "!<tag:yaml.org,2002:str>", "!!map", "!!seq"]
HUGE = ["9" * 5000, "-" + "9" * 4400, "0x" + "f" * 5000, "0o" + "7" * 200, "1" + "0" * 39, "1e99999", "0b" + "1" * 300]


class Emitter:
    """Flow-style YAML written by hand, so the text can also hold what a dumper would refuse:
    tags, anchors and aliases, duplicate keys, numbers past any limit. `rnd` is hypothesis'."""

    def __init__(self, rnd, odd: float):
        self.rnd, self.odd, self.anchors = rnd, odd, []

    def maybe(self) -> bool:
        return self.rnd.random() < self.odd

    def __call__(self, value) -> str:
        if self.anchors and self.maybe():
            return "*" + self.rnd.choice(self.anchors) + " "  # the space ends the alias name before a `:`
        text = self.plain(value)
        if self.rnd.random() < self.odd / 3:  # rarer: a tag ends the check before the schema sees anything
            text = f"{self.rnd.choice(TAGS)} {text}"
        if isinstance(value, (list, dict)) and self.maybe():
            self.anchors.append(f"a{len(self.anchors)}")
            text = f"&{self.anchors[-1]} {text}"
        return text

    def plain(self, value) -> str:
        if value is None:
            return self.rnd.choice(["null", "~", "Null"])
        if isinstance(value, bool):
            return self.rnd.choice(["true", "True"] if value else ["false", "FALSE"])
        if isinstance(value, int):
            return self.rnd.choice(HUGE) if self.maybe() else str(value)
        if isinstance(value, float):
            if math.isnan(value):
                return ".nan"
            return (".inf" if value > 0 else "-.inf") if math.isinf(value) else repr(value)
        if isinstance(value, str):
            if PLAIN.fullmatch(value) and value.lower() not in ("null", "yes", "no", "true", "false", "on", "off", "y", "n"):
                return value
            return json.dumps(value)  # a JSON string is a valid double-quoted YAML scalar, escapes and all
        if isinstance(value, list):
            return "[" + ", ".join(self(v) for v in value) + "]"
        items = [f"{self(k)}: {self(v)}" for k, v in value.items()]
        if items and self.maybe():
            items.append(self.rnd.choice(items))  # a duplicate key
        if items and self.anchors and self.maybe():
            items.append(f"<<: *{self.rnd.choice(self.anchors)}")
        return "{" + ", ".join(items) + "}"

    def document(self, data: dict) -> str:
        return "\n".join(f"{self(k)}: {self(v)}" for k, v in data.items()) + "\n"


FRAGMENTS = ["\x00", "\x07", "\x1b", "\ufeff", "\ufffe", "\t", "\r", "\u2028", "!!python/object/apply:os.system ['true'] ",
             "!!python/name:os.system ", "!foo ", "!!binary aGk= ", "!!set ", "!!timestamp 2001-12-14 ", "!!str ",
             "&x ", "*x", "*a0", "<<: *a0", "<<: [*a0, *a1]", "\n---\n", "%YAML 1.1\n---\n", "%TAG ! tag:x,1:\n---\n",
             "{", "}", "[", "]", ":", ": ", "- ", "? ", "'", '"', "#", "|\n", ">-\n", "9" * 5000, "0x" + "f" * 5000,
             "1e99999", "\n  - \n", "include: [../../etc/passwd]\n", "include: [/etc/hosts]\n",
             "\nr: &r [*r]\n", "\nm: &m {a: *m}\n", "\n<<: [1, 2]\n", "\n<<: *a0\n"]


@st.composite
def yaml_documents(draw) -> str:
    emit = Emitter(draw(st.randoms(use_true_random=False)), odd=draw(st.sampled_from([0.0, 0.03, 0.15])))
    data = draw(st.dictionaries(st.sampled_from(KEYS), values, max_size=6))
    text = emit.document(data)
    if emit.anchors and draw(st.booleans()):
        text += "".join(f"ref{i}: *{name}\n" for i, name in enumerate(emit.anchors))
    shape = draw(st.sampled_from(["plain", "damaged", "damaged", "deep", "deep_alias", "bomb", "top_level"]))
    if shape == "damaged":
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(st.sampled_from(FRAGMENTS)) + text[at:]
    elif shape == "deep":
        depth = draw(st.sampled_from([50, 99, 100, 101, 200, 1000, 3000]))
        inner = draw(st.sampled_from(["[", "{a: ", "- "]))
        if inner == "- ":
            text += "deep:\n" + "".join("  " * i + "- \n" for i in range(depth))
        else:
            text += "deep: " + inner * depth + "1" + ("]" if inner == "[" else "}") * depth + "\n"
    elif shape == "deep_alias":  # each anchor nests the previous one: deep only once aliases are expanded
        levels, links = draw(st.integers(5, 60)), draw(st.integers(2, 40))
        text += f"d0: &d0 {'[' * levels}1{']' * levels}\n"
        text += "".join(f"d{i}: &d{i} {'[' * levels}*d{i - 1}{']' * levels}\n" for i in range(1, links))
    elif shape == "bomb":
        width, depth = draw(st.integers(2, 12)), draw(st.integers(2, 10))
        text = f"b0: &b0 [{', '.join(['lol'] * width)}]\n" + "".join(
            f"b{i}: &b{i} [{', '.join([f'*b{i - 1}'] * width)}]\n" for i in range(1, depth))
    elif shape == "top_level":
        text = emit(draw(values)) + "\n"
    return text


def _luca() -> dict:
    data = YAML(typ="safe", pure=True).load((EXAMPLES / "luca.yaml").read_text(encoding="utf-8"))
    # Prompt variables, so mutations reach their checks too: lists, a values file, a sweep axis.
    data["characters"]["luca"]["vars"] = {"outfit": ["red scarf", "blue hat"]}
    first_scene = next(iter(data["scenes"].values()))
    first_scene["vars"] = {"accessory": {"file": "vars/outfits.txt"}}
    first_scene["prompt"] += " wearing {{ outfit }} and {{ vars.accessory }}"
    next(iter(data["jobs"].values())).setdefault("sweep", {})["vars.outfit"] = ["green cap", "no hat"]
    return data


def _paths(data, prefix=()):
    yield prefix
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _paths(v, prefix + (i,))


LUCA = _luca()
LUCA_PATHS = [p for p in _paths(LUCA) if p]


def _last_key(path: tuple) -> str:
    return next((p for p in reversed(path) if isinstance(p, str)), "")


# Half the mutations hit a path or a prompt field: few of them, but they lead to the deepest checks.
TARGETS = [p for p in LUCA_PATHS if _last_key(p) in PATH_KEYS | {"prompt"}]


@st.composite
def mutated_luca(draw) -> tuple[str, list[str]]:
    data = json.loads(json.dumps(LUCA))
    for _ in range(draw(st.sampled_from([1, 1, 1, 2]))):
        path = draw(st.one_of(st.sampled_from(LUCA_PATHS), st.sampled_from(TARGETS)))
        parent = data
        try:
            for part in path[:-1]:
                parent = parent[part]
            action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
            last = _last_key(path)
            if action == "replace" and last in PATH_KEYS and draw(st.integers(0, 3)):
                parent[path[-1]] = draw(paths)  # reach the path checks: NUL, surrogates, long names, escapes
            elif action == "replace" and last == "prompt" and draw(st.integers(0, 3)):
                parent[path[-1]] = draw(templates)  # reach the template checks: loops, bombs, recursion
            elif action == "replace" and draw(st.booleans()):
                parent[path[-1]] = draw(_like(parent[path[-1]]))  # same type: passes the schema, reaches the checks
            elif action == "replace":
                parent[path[-1]] = draw(values)
            elif action == "delete":
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[draw(st.sampled_from(KEYS))] = draw(values)
        except (KeyError, IndexError, TypeError):  # an earlier mutation removed or reshaped the path
            pass
    emit = Emitter(draw(st.randoms(use_true_random=False)), odd=draw(st.sampled_from([0.0, 0.0, 0.0, 0.02])))
    if draw(st.booleans()) or _has_nonfinite(data):
        text = emit.document(data)
    else:  # JSON is YAML too
        text = json.dumps(data, ensure_ascii=draw(st.booleans()))
    overrides: list[str] = []
    if draw(st.integers(0, 5)) == 0:
        key = draw(st.one_of(st.sampled_from(LUCA_PATHS), st.sampled_from(TARGETS)).map(lambda p: ".".join(map(str, p)))
                   | st.text(max_size=20))
        overrides = ["-s", f"{key}={Emitter(emit.rnd, 0.0)(draw(values))}"]
    if draw(st.integers(0, 4)) == 0:  # a second file, merged like an include: clashes, wrong sections
        extra = draw(st.dictionaries(st.sampled_from(["loras", "characters", "scenes", "presets", "jobs", "defaults",
                                                      "include"]), st.one_of(values, st.just(data.get("scenes"))),
                                     max_size=3))
        overrides += ["@" + Emitter(emit.rnd, 0.0).document(extra)]
    return text, overrides


def _like(original) -> st.SearchStrategy:
    """Values of the original's type, often ones the schema accepts but a later check refuses."""
    if isinstance(original, bool):
        return st.booleans()
    if isinstance(original, int):
        return st.one_of(st.integers(-3, 70), st.integers(-(2 ** 40), 2 ** 40))
    if isinstance(original, float):
        return st.floats(-100, 100) | st.sampled_from([math.inf, -math.inf, math.nan, 0.0, 1e308])
    if isinstance(original, str):
        return st.one_of(st.sampled_from(NASTY), st.text(max_size=10), st.sampled_from(["luca", "beach", "toy", "main"]))
    if isinstance(original, list):
        return st.lists(_like(original[0]) if original else scalars, max_size=5)
    return st.dictionaries(st.sampled_from(KEYS), values, max_size=3)


def _has_nonfinite(data) -> bool:
    if isinstance(data, float):
        return not math.isfinite(data)
    if isinstance(data, dict):
        return any(_has_nonfinite(v) for v in data.values())
    if isinstance(data, list):
        return any(_has_nonfinite(v) for v in data)
    return False


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of specs/examples in a project of its own (the registry, the LoRAs, the assets)."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / ".git").mkdir()
    shutil.copytree(EXAMPLES, root / "specs" / "examples")
    main(["validate", str(root / "specs" / "examples" / "luca.yaml")])  # imports warm before deadlines
    return root


def run_cli(capfd, argv: list[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse: a usage error is exit 2 too
        code = exit_.code
    out, err = capfd.readouterr()
    return code, err


def check_both(capfd, spec: Path, extra: list[str] = ()) -> None:
    """`extra`: `-s KEY=VALUE` arguments, and `@TEXT` for a second spec file (plan merges it in)."""
    overrides = [a for a in extra if not a.startswith("@")]
    more = []
    for i, text in enumerate(a[1:] for a in extra if a.startswith("@")):
        more.append(str(spec.with_name(f"more{i}.yaml")))
        write(Path(more[-1]), text)
    for argv in (["validate", str(spec), *overrides], ["plan", str(spec), *more, "--json", *overrides]):
        code, err = run_cli(capfd, argv)
        assert "Traceback" not in err, f"castbook {argv[0]} printed a traceback:\n{err}"
        assert code in (0, 2), f"castbook {argv[0]} exited {code}:\n{err}"
        if code == 2:
            assert err.strip(), f"castbook {argv[0]} exited 2 without saying why"


def write(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8", "surrogatepass"))  # lone surrogates reach the file as bad UTF-8


@FUZZ
@given(text=yaml_documents())
def test_random_yaml_never_crashes(project, capfd, text):
    spec = project / "specs" / "examples" / "fuzz.yaml"
    write(spec, text)
    check_both(capfd, spec)


@settings(FUZZ, max_examples=150)
@given(case=mutated_luca())
def test_mutated_demo_spec_never_crashes(project, capfd, case):
    text, overrides = case
    spec = project / "specs" / "examples" / "fuzz.yaml"
    write(spec, text)
    check_both(capfd, spec, overrides)
