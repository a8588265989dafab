"""Toy-world geometry: body outlines, face layout, poses, and the one filled-body mask.

The generator (`toyworld.world.render`, `pose_map`), the pixel checker's shape templates and the
ControlNet eval's pose masks all draw a body from the same outline through the same transform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "diamond")

# Face layout per shape in unit coordinates: (eye dx, eye y, eye radius, mouth y, mouth half-width).
# Chosen so eyes and mouth sit well inside each outline (stars and triangles are narrow).
FACE: dict[str, tuple[float, float, float, float, float]] = {
    "circle": (0.32, -0.22, 0.2, 0.33, 0.26),
    "square": (0.32, -0.22, 0.2, 0.33, 0.26),
    "triangle": (0.22, -0.1, 0.17, 0.3, 0.2),
    "star": (0.2, -0.15, 0.15, 0.25, 0.18),
    "heart": (0.3, -0.2, 0.19, 0.3, 0.22),
    "diamond": (0.2, -0.15, 0.17, 0.3, 0.18),
}

SUPERSAMPLE = 4  # draw large, downsample with a box filter for anti-aliasing


@dataclass(frozen=True)
class Pose:
    x: float  # centre, pixels
    y: float
    radius: float  # pixels (the shape's nominal radius)
    tilt: float  # degrees, positive = clockwise on screen


def shape_polygon(shape: str) -> np.ndarray:
    """Unit-radius outline (N,2), y down, area centroid at the origin."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "square":
        h = 0.85
        pts = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    elif shape == "triangle":
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        pts = 1.15 * np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.15, 0.58)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 120, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], 1) / 15.0
    elif shape == "diamond":
        pts = np.array([[0, -1.15], [0.72, 0], [0, 1.15], [-0.72, 0]])
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    return pts - polygon_centroid(pts)


def polygon_centroid(pts: np.ndarray) -> np.ndarray:
    """Area centroid (x, y) of a closed polygon (N,2)."""
    x, y = pts[:, 0], pts[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    a = cross.sum() / 2
    return np.array([((x + xn) * cross).sum() / (6 * a), ((y + yn) * cross).sum() / (6 * a)])


def to_pixels(pts: np.ndarray, pose: Pose, k: float) -> list[tuple[float, float]]:
    """Unit coords -> supersampled pixel coords (scale, rotate by tilt, translate, times `k`)."""
    a = math.radians(pose.tilt)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    p = (pts @ rot.T) * pose.radius + np.array([pose.x, pose.y])
    return [(float(x) * k, float(y) * k) for x, y in p]


def body_outline(shape: str, pose: Pose, k: float = SUPERSAMPLE) -> list[tuple[float, float]]:
    """The body's outline in pixel coords at `k`x: what `render` fills and `pose_map` traces."""
    return to_pixels(shape_polygon(shape), pose, k)


def polygon_mask(shape: str, pose: Pose, size: int = 64) -> np.ndarray:
    """The filled body (size x size booleans), drawn and box-downsampled like `render` draws it."""
    k = SUPERSAMPLE
    img = Image.new("L", (size * k, size * k), 0)
    ImageDraw.Draw(img).polygon(body_outline(shape, pose, k), fill=255)
    return np.asarray(img.resize((size, size), Image.Resampling.BOX)) >= 128


def ellipse_points(cx: float, cy: float, rx: float, ry: float, n: int = 40) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def arc_band(cx: float, cy: float, rx: float, ry: float, thick: float, lower: bool) -> np.ndarray:
    """A thick arc polygon: the lower (smile) or upper (frown) half of an ellipse."""
    t = np.linspace(0, np.pi, 24) if lower else np.linspace(np.pi, 2 * np.pi, 24)
    outer = np.stack([cx + (rx + thick / 2) * np.cos(t), cy + (ry + thick / 2) * np.sin(t)], 1)
    inner = np.stack([cx + (rx - thick / 2) * np.cos(t), cy + (ry - thick / 2) * np.sin(t)], 1)
    return np.concatenate([outer, inner[::-1]], 0)
