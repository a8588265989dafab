"""The procedural toy world: tiny captioned character images, generated from a seed.

Characters are flat shapes (circle, square, triangle, star, heart, diamond) in one of
eight named colours, with two eyes (a nameable iris colour), an optional mouth
(happy / sad / surprised) and a pose (position, scale, tilt), on one of three scenes
(beach, town, night). Every image has a caption such as
``a red star character with green eyes and a happy face on the beach`` and a row of
ground-truth attributes, so a model trained on it can be judged from pixels
(``toyworld.checker``).

Pure numpy + PIL, no unseeded randomness: image ``i`` of seed ``S`` depends only on
``(S, i)``, so the same seed gives identical PNG bytes and ``--count 10`` is a prefix of
``--count 100``.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from core.files import atomic_write_bytes
from toyworld.geometry import FACE, SHAPES, SUPERSAMPLE, Pose, arc_band, body_outline, ellipse_points, to_pixels

# --- the vocabulary ---------------------------------------------------------------

# Saturated body colours, chosen to be far apart in CIELAB and far from every scene
# colour below (scenes use pastel, grey, pale or very dark colours only).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "orange": (250, 135, 20),
    "yellow": (245, 210, 20),
    "green": (35, 160, 55),
    "blue": (35, 70, 215),
    "purple": (135, 45, 175),
    "pink": (245, 110, 185),
    "brown": (120, 70, 30),
}
# SHAPES, their outlines and the face layout (FACE) are in toyworld.geometry.
EYE_COLOURS: dict[str, tuple[int, int, int]] = {
    "green": (20, 170, 60),
    "blue": (30, 90, 230),
    "black": (15, 15, 20),
    "brown": (115, 65, 25),
}
EXPRESSIONS: tuple[str, ...] = ("neutral", "happy", "sad", "surprised")  # neutral = no mouth
BACKGROUNDS: tuple[str, ...] = ("beach", "town", "night")
BACKGROUND_PHRASES: dict[str, str] = {"beach": "on the beach", "town": "in the town", "night": "at night"}

SCLERA = (250, 250, 250)
MOUTH = (35, 10, 15)

# Scene palettes: the colours each background is painted with (before shading). The
# checker uses them as its background model.
SCENE_PALETTES: dict[str, dict[str, tuple[int, int, int]]] = {
    "beach": {
        "sky": (160, 210, 240),
        "sky_high": (120, 185, 235),
        "sea": (40, 160, 170),
        "foam": (215, 240, 240),
        "sand": (235, 212, 165),
        "sun": (255, 248, 215),
    },
    "town": {
        "sky": (170, 215, 240),
        "cream": (245, 232, 195),
        "peach": (242, 208, 182),
        "mint": (195, 225, 205),
        "lavender": (210, 202, 228),
        "stone": (205, 200, 190),
        "roof": (150, 138, 132),
        "window": (70, 95, 105),
        "street": (160, 156, 148),
    },
    "night": {
        "sky": (12, 16, 45),
        "sky_low": (28, 34, 78),
        "star": (235, 235, 245),
        "moon": (240, 236, 205),
        "hill": (14, 20, 28),
    },
}
HOUSE_COLOURS = ("cream", "peach", "mint", "lavender", "stone")


@dataclass(frozen=True)
class Holdout:
    """A combination that never appears in the base set. ``None`` matches anything."""

    colour: str | None = None
    shape: str | None = None
    eyes: str | None = None

    def matches(self, colour: str, shape: str, eyes: str) -> bool:
        return (
            (self.colour is None or self.colour == colour)
            and (self.shape is None or self.shape == shape)
            and (self.eyes is None or self.eyes == eyes)
        )


# Colour+shape pairs held out of base training with any eye colour, so each example
# character below is genuinely new to the base model and a LoRA has something to teach.
HOLDOUT: tuple[Holdout, ...] = (
    Holdout("brown", "heart"),
    Holdout("orange", "star"),
    Holdout("pink", "diamond"),
)
# Example characters (one per hold-out): name -> (colour, shape, eyes).
CHARACTERS: dict[str, tuple[str, str, str]] = {
    "luca": ("brown", "heart", "green"),
    "alberto": ("orange", "star", "brown"),
    "giulia": ("pink", "diamond", "blue"),
}


@dataclass(frozen=True)
class ToyLabel:
    name: str
    colour: str
    shape: str
    eyes: str
    expression: str
    background: str
    pose: Pose
    caption: str
    seed: int
    index: int
    size: int

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Filter:
    """Allowed values per attribute; empty = any. Parsed from text like ``brown heart green eyes``."""

    colours: frozenset[str] = field(default_factory=frozenset)
    shapes: frozenset[str] = field(default_factory=frozenset)
    eyes: frozenset[str] = field(default_factory=frozenset)
    expressions: frozenset[str] = field(default_factory=frozenset)
    backgrounds: frozenset[str] = field(default_factory=frozenset)

    @property
    def empty(self) -> bool:
        return not (self.colours or self.shapes or self.eyes or self.expressions or self.backgrounds)


# --- text <-> attributes ------------------------------------------------------------

_EXPRESSION_WORDS = {
    "happy": "happy", "smiling": "happy", "smile": "happy",
    "sad": "sad", "frowning": "sad",
    "surprised": "surprised", "shocked": "surprised",
    "neutral": "neutral",
}
_BACKGROUND_WORDS = {"beach": "beach", "sea": "beach", "town": "town", "village": "town", "night": "night"}
_SHAPE_WORDS = {s: s for s in SHAPES} | {s + "s": s for s in SHAPES}


def caption_for(colour: str, shape: str, eyes: str, expression: str, background: str) -> str:
    """The caption format the base model is trained on."""
    face = "" if expression == "neutral" else f" and a {expression} face"
    return f"a {colour} {shape} character with {eyes} eyes{face} {BACKGROUND_PHRASES[background]}"


def parse_attributes(text: str) -> dict[str, str]:
    """Attributes named in a prompt or caption: colour, shape, eyes, expression, background.

    Keys are present only when the text names them. A colour word directly followed by
    ``eyes``/``eye`` is the eye colour; the first other colour word is the body colour.
    A known character name (``luca``) stands for its colour, shape and eyes.
    """
    words = re.findall(r"[a-z]+", text.lower())
    out: dict[str, str] = {}
    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if w in CHARACTERS:
            c, s, e = CHARACTERS[w]
            out.setdefault("colour", c)
            out.setdefault("shape", s)
            out.setdefault("eyes", e)
        elif w in EYE_COLOURS and nxt in ("eyes", "eye", "eyed"):
            out.setdefault("eyes", w)
        elif w in COLOURS:
            out.setdefault("colour", w)
        elif w in _SHAPE_WORDS:
            out.setdefault("shape", _SHAPE_WORDS[w])
        elif w in _EXPRESSION_WORDS:
            out.setdefault("expression", _EXPRESSION_WORDS[w])
        elif w in _BACKGROUND_WORDS:
            out.setdefault("background", _BACKGROUND_WORDS[w])
    if "character" in words and "expression" not in out and "face" not in words:
        # Captions in our template ("a red star character with ...") omit the face phrase
        # exactly when there is no mouth. Free-form prompts ("luca on the beach") say nothing.
        out["expression"] = "neutral"
    return out


def parse_filter(text: str) -> Filter:
    """``"brown heart green eyes"`` -> Filter. Raises ValueError naming unknown words."""
    words = re.findall(r"[a-z]+", text.lower())
    known = set(COLOURS) | set(EYE_COLOURS) | set(_SHAPE_WORDS) | set(_EXPRESSION_WORDS) | set(_BACKGROUND_WORDS)
    known |= set(CHARACTERS) | {"eyes", "eye", "eyed", "a", "an", "the", "with", "and", "on", "in", "at", "character", "face"}
    unknown = [w for w in words if w not in known]
    if unknown:
        raise ValueError(
            f"--only {text!r}: unknown word(s) {unknown}. Use colours {sorted(COLOURS)}, shapes {list(SHAPES)}, "
            f"'<colour> eyes' with {sorted(EYE_COLOURS)}, expressions {list(EXPRESSIONS)}, "
            f"backgrounds {list(BACKGROUNDS)} or a character name {sorted(CHARACTERS)}."
        )
    a = parse_attributes(text)
    # parse_attributes infers 'neutral' from captions; a filter only constrains what was said.
    said_expression = any(w in _EXPRESSION_WORDS for w in words)
    return Filter(
        colours=frozenset([a["colour"]] if "colour" in a else []),
        shapes=frozenset([a["shape"]] if "shape" in a else []),
        eyes=frozenset([a["eyes"]] if "eyes" in a else []),
        expressions=frozenset([a["expression"]] if said_expression and "expression" in a else []),
        backgrounds=frozenset([a["background"]] if "background" in a else []),
    )


def character_filter(name: str) -> Filter:
    if name not in CHARACTERS:
        raise ValueError(f"--character {name!r} is not a toy-world character; choose one of {sorted(CHARACTERS)}.")
    c, s, e = CHARACTERS[name]
    return Filter(colours=frozenset([c]), shapes=frozenset([s]), eyes=frozenset([e]))


# --- drawing -------------------------------------------------------------------------


def _draw_background(draw: ImageDraw.ImageDraw, scene: str, size: int, rng: np.random.Generator) -> None:
    k = SUPERSAMPLE
    W = size * k
    pal = SCENE_PALETTES[scene]

    def jit(c: tuple[int, int, int], amount: int = 6) -> tuple[int, int, int]:
        return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in c)  # type: ignore[return-value]

    if scene == "beach":
        horizon = size * rng.uniform(0.36, 0.46)
        shore = horizon + size * rng.uniform(0.14, 0.2)
        top, low = np.array(pal["sky_high"]), np.array(pal["sky"])
        for y in range(int(horizon * k) + 1):  # sky gradient
            c = top + (low - top) * (y / max(horizon * k, 1))
            draw.line([(0, y), (W, y)], fill=tuple(int(v) for v in c))
        draw.rectangle([0, horizon * k, W, shore * k], fill=jit(pal["sea"]))
        for _ in range(int(rng.integers(2, 5))):  # foam lines on the sea
            wy = rng.uniform(horizon + 2, shore - 1) * k
            wx = rng.uniform(0, size * 0.8) * k
            draw.line([(wx, wy), (wx + rng.uniform(6, 16) * k, wy)], fill=pal["foam"], width=k)
        draw.rectangle([0, shore * k, W, W], fill=jit(pal["sand"]))
        if rng.random() < 0.5:  # a pale sun in an upper corner
            sx = (size * 0.1 if rng.random() < 0.5 else size * 0.9) * k
            r = size * 0.07 * k
            draw.ellipse([sx - r, size * 0.1 * k - r, sx + r, size * 0.1 * k + r], fill=pal["sun"])
    elif scene == "town":
        street = size * rng.uniform(0.8, 0.88)
        draw.rectangle([0, 0, W, W], fill=jit(pal["sky"]))
        x = -rng.uniform(0, size * 0.1)
        while x < size:  # a row of narrow Portorosso houses
            w = rng.uniform(size * 0.14, size * 0.24)
            top = rng.uniform(size * 0.08, size * 0.3)
            colour = jit(pal[HOUSE_COLOURS[int(rng.integers(len(HOUSE_COLOURS)))]])
            draw.rectangle([x * k, top * k, (x + w) * k, street * k], fill=colour)
            draw.rectangle([x * k, (top - 1.5) * k, (x + w) * k, top * k], fill=pal["roof"])
            wy = top + 3
            while wy < street - 4:
                for wx in (x + w * 0.25, x + w * 0.62):
                    draw.rectangle([wx * k, wy * k, (wx + 2) * k, (wy + 3) * k], fill=pal["window"])
                wy += 7
            x += w
        draw.rectangle([0, street * k, W, W], fill=jit(pal["street"]))
    elif scene == "night":
        top, low = np.array(pal["sky"]), np.array(pal["sky_low"])
        for y in range(W):
            c = top + (low - top) * (y / W)
            draw.line([(0, y), (W, y)], fill=tuple(int(v) for v in c))
        for _ in range(int(rng.integers(8, 16))):  # stars
            sx, sy = rng.uniform(0, size) * k, rng.uniform(0, size * 0.7) * k
            r = rng.uniform(0.4, 0.8) * k
            draw.ellipse([sx - r, sy - r, sx + r, sy + r], fill=pal["star"])
        mx = (size * rng.uniform(0.08, 0.2) if rng.random() < 0.5 else size * rng.uniform(0.8, 0.92)) * k
        my, r = size * rng.uniform(0.08, 0.16) * k, size * 0.075 * k
        draw.ellipse([mx - r, my - r, mx + r, my + r], fill=pal["moon"])
        hill = size * rng.uniform(0.85, 0.92)
        draw.rectangle([0, hill * k, W, W], fill=pal["hill"])
    else:
        raise ValueError(f"unknown background {scene!r}; choose one of {BACKGROUNDS}")


def render(colour: str, shape: str, eyes: str, expression: str, background: str, pose: Pose,
           size: int = 64, rng: np.random.Generator | None = None,
           body_rgb: tuple[int, int, int] | None = None) -> Image.Image:
    """Draw one character on one scene. ``rng`` only varies background details; ``body_rgb``
    paints the body in a colour outside the vocabulary (augmentation only)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    k = SUPERSAMPLE
    img = Image.new("RGB", (size * k, size * k))
    draw = ImageDraw.Draw(img)
    # 1. the scene
    _draw_background(draw, background, size, rng)
    # 2. the body
    draw.polygon(body_outline(shape, pose, k), fill=body_rgb or COLOURS[colour])
    # 3. eyes: white sclera, coloured iris, in the face frame (tilts with the body)
    edx, ey, er, my, mw = FACE[shape]
    for sx in (-edx, edx):
        draw.polygon(to_pixels(ellipse_points(sx, ey, er, er * 1.1), pose, k), fill=SCLERA)
        draw.polygon(to_pixels(ellipse_points(sx, ey + er * 0.1, er * 0.58, er * 0.64), pose, k), fill=EYE_COLOURS[eyes])
    # 4. mouth
    if expression == "happy":
        draw.polygon(to_pixels(arc_band(0, my - mw * 0.35, mw, mw * 0.7, 0.11, lower=True), pose, k), fill=MOUTH)
    elif expression == "sad":
        draw.polygon(to_pixels(arc_band(0, my + mw * 0.45, mw, mw * 0.7, 0.11, lower=False), pose, k), fill=MOUTH)
    elif expression == "surprised":
        draw.polygon(to_pixels(ellipse_points(0, my, mw * 0.5, mw * 0.6), pose, k), fill=MOUTH)
    elif expression != "neutral":
        raise ValueError(f"unknown expression {expression!r}; choose one of {EXPRESSIONS}")
    return img.resize((size, size), Image.Resampling.BOX)


def pose_map(shape: str, pose: Pose, size: int = 64) -> Image.Image:
    """The character's outline as a white line (~1.5 px) on black: a drawn pose map.

    Same geometry as ``render``'s body (``geometry.body_outline``), drawn at ``SUPERSAMPLE``x
    and box-downsampled like it, so the line lies on the border of the rendered body. This is
    what ``builtin:toy-controlnet`` is trained on (through a canny control); a user can draw
    the same thing by hand.
    """
    k = SUPERSAMPLE
    img = Image.new("RGB", (size * k, size * k), (0, 0, 0))
    pts = body_outline(shape, pose, k)
    # A closed line centred on the border (polygon(outline=..., width=...) would draw inside it).
    ImageDraw.Draw(img).line(pts + pts[:1], fill=(255, 255, 255), width=round(1.5 * k), joint="curve")
    return img.resize((size, size), Image.Resampling.BOX)


# --- sampling -------------------------------------------------------------------------


def is_held_out(colour: str, shape: str, eyes: str, holdout: tuple[Holdout, ...] = HOLDOUT) -> bool:
    """True when any hold-out matches this colour, shape and eye colour."""
    return any(h.matches(colour, shape, eyes) for h in holdout)


def sample_label(seed: int, index: int, size: int = 64, holdout: tuple[Holdout, ...] = HOLDOUT,
                 only: Filter | None = None, prefix: str = "toy") -> tuple[ToyLabel, np.random.Generator]:
    """Attributes + pose of image ``index``. Hold-outs are skipped unless ``only`` asks for them.

    Returns the label and the generator to draw the background details with.
    """
    rng = np.random.default_rng([seed, index])
    only = only or Filter()

    def pick(allowed: frozenset[str], universe) -> str:
        options = sorted(allowed) if allowed else list(universe)
        return options[int(rng.integers(len(options)))]

    # A filter asks for something explicitly: then hold-outs do not apply.
    active_holdout = holdout if only.empty else ()
    for _ in range(1000):
        colour = pick(only.colours, COLOURS)
        shape = pick(only.shapes, SHAPES)
        eyes = pick(only.eyes, EYE_COLOURS)
        if not is_held_out(colour, shape, eyes, active_holdout):
            break
    else:  # pragma: no cover - only reachable with a hold-out list that covers everything
        raise ValueError("every colour/shape/eyes combination is held out; shorten the hold-out list")
    expression = pick(only.expressions, EXPRESSIONS)
    background = pick(only.backgrounds, BACKGROUNDS)
    radius = float(rng.uniform(0.22, 0.3)) * size
    extent = radius * 1.2 + 2  # keep the whole body (star tips, tilt) inside the frame
    x = float(rng.uniform(extent, size - extent))
    y = float(rng.uniform(extent, size - extent))
    tilt = float(rng.uniform(-15, 15))
    pose = Pose(x=round(x, 3), y=round(y, 3), radius=round(radius, 3), tilt=round(tilt, 2))
    label = ToyLabel(
        name=f"{prefix}-{index:06d}", colour=colour, shape=shape, eyes=eyes, expression=expression,
        background=background, pose=pose, caption=caption_for(colour, shape, eyes, expression, background),
        seed=seed, index=index, size=size,
    )
    return label, rng


def generate_one(seed: int, index: int, size: int = 64, holdout: tuple[Holdout, ...] = HOLDOUT,
                 only: Filter | None = None, prefix: str = "toy") -> tuple[Image.Image, ToyLabel]:
    label, rng = sample_label(seed, index, size, holdout, only, prefix)
    img = render(label.colour, label.shape, label.eyes, label.expression, label.background, label.pose, size, rng)
    return img, label


def png_bytes(img: Image.Image) -> bytes:
    """PNG without metadata chunks, so bytes depend only on pixels."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def generate_dataset(out: Path, count: int, seed: int, size: int = 64, holdout: tuple[Holdout, ...] = HOLDOUT,
                     only: Filter | None = None, prefix: str = "toy", trigger: str | None = None) -> list[ToyLabel]:
    """Write ``name.png`` + ``name.txt`` (caption) per image and ``labels.jsonl`` into ``out``.

    ``trigger`` (e.g. a character name) starts every caption: ``luca, a brown heart character ...``.
    """
    if count < 1:
        raise ValueError(f"--count must be at least 1, got {count}")
    if size < 32:
        raise ValueError(f"--size must be at least 32 pixels (faces need room), got {size}")
    out.mkdir(parents=True, exist_ok=True)
    labels = []
    for i in range(count):
        img, label = generate_one(seed, i, size, holdout, only, prefix)
        if trigger:
            label = replace(label, caption=f"{trigger}, {label.caption}")
        atomic_write_bytes(out / f"{label.name}.png", png_bytes(img))
        atomic_write_bytes(out / f"{label.name}.txt", (label.caption + "\n").encode())
        labels.append(label)
    lines = "".join(json.dumps(l.to_json(), sort_keys=True) + "\n" for l in labels)
    atomic_write_bytes(out / "labels.jsonl", lines.encode())
    return labels


def holdout_by_name(name: str) -> tuple[Holdout, ...]:
    if name == "default":
        return HOLDOUT
    if name == "none":
        return ()
    raise ValueError(f"--holdout {name!r}: choose 'default' (the documented HOLDOUT list) or 'none'.")
