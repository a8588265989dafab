"""The pixel checker's shape step: which outline, tilt and size does a filled silhouette have?

The silhouette's radial signature r(theta) around its centroid gives rotation-invariant Fourier
magnitudes and a solidity; the nearest template (drawn from the generator's own outlines,
`toyworld.geometry.polygon_mask`) names the shape, and the phase of the shape's symmetry
harmonic gives the tilt.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage
from skimage import measure

from toyworld.geometry import SHAPES, Pose, polygon_mask

# --- shape templates --------------------------------------------------------------------------

_N_ANGLES = 90
_N_HARMONICS = 8
SYMMETRY = {"circle": 0, "square": 4, "triangle": 3, "star": 5, "heart": 1, "diamond": 2}


def _centred_mask(shape: str, radius: float, tilt: float, size: int = 64) -> np.ndarray:
    return polygon_mask(shape, Pose(x=size / 2, y=size / 2, radius=radius, tilt=tilt), size)


def _signature(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(r(theta) normalised to mean 1, complex harmonics 0..N, solidity) of a filled mask."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 12:
        return None
    cy, cx = ys.mean(), xs.mean()
    padded = np.pad(ndimage.gaussian_filter(mask.astype(float), 0.5), 2)
    contours = measure.find_contours(padded, 0.5)
    if not contours:
        return None
    pts = max(contours, key=len) - 2  # subpixel outline, (row, col)
    # Resample the outline densely so every angle bin sees it.
    seg = np.diff(pts, axis=0)
    lengths = np.hypot(seg[:, 0], seg[:, 1])
    t = np.concatenate([[0], np.cumsum(lengths)])
    if t[-1] <= 0:
        return None
    s = np.linspace(0, t[-1], max(int(t[-1] * 8), 64))
    py, px = np.interp(s, t, pts[:, 0]), np.interp(s, t, pts[:, 1])
    ang = np.arctan2(py - cy, px - cx)
    dist = np.hypot(py - cy, px - cx)
    bins = (((ang + np.pi) / (2 * np.pi)) * _N_ANGLES).astype(int) % _N_ANGLES
    r = np.zeros(_N_ANGLES)
    np.maximum.at(r, bins, dist)
    empty = r == 0
    if empty.all():
        return None
    if empty.any():  # circular interpolation over bins the outline never reached
        idx = np.arange(_N_ANGLES)
        good = idx[~empty]
        r[empty] = np.interp(idx[empty], np.concatenate([good - _N_ANGLES, good, good + _N_ANGLES]), np.tile(r[good], 3))
    r = r / r.mean()
    spec = np.fft.rfft(r) / _N_ANGLES
    hull_area = _hull_area(np.stack([py, px], 1))
    solidity = float(mask.sum() / hull_area) if hull_area > 0 else 1.0
    return r, spec, min(solidity, 1.0)


def _hull_area(pts: np.ndarray) -> float:
    from scipy.spatial import ConvexHull

    try:
        return float(ConvexHull(pts).volume)
    except Exception:  # degenerate (collinear) outlines
        return 0.0


def _features(spec: np.ndarray, solidity: float) -> np.ndarray:
    mags = np.abs(spec[1 : _N_HARMONICS + 1]) * 2
    return np.concatenate([mags * 4.0, [solidity * 2.0]])


@dataclass(frozen=True)
class _Template:
    shape: str
    features: np.ndarray
    phase: complex  # the symmetry harmonic at tilt 0, for tilt estimates
    unit_area: float  # pixels per radius^2 (mask area / radius^2)


@lru_cache(maxsize=1)
def _templates() -> tuple[_Template, ...]:
    out = []
    for shape in SHAPES:
        k = SYMMETRY[shape]
        for radius in (14.0, 19.0):
            base = _signature(_centred_mask(shape, radius, 0.0))[1]  # type: ignore[index]
            for tilt in (-12.0, 0.0, 12.0):
                mask = _centred_mask(shape, radius, tilt)
                r, spec, sol = _signature(mask)  # type: ignore[misc]
                out.append(_Template(shape, _features(spec, sol), complex(base[k]) if k else 0j,
                                     float(mask.sum()) / radius**2))
    return tuple(out)


def classify_shape(mask: np.ndarray) -> tuple[str, float, float] | None:
    """(shape, tilt degrees, radius px) of a filled silhouette, or None when there is no outline."""
    sig = _signature(mask)
    if sig is None:
        return None
    _, spec, sol = sig
    f = _features(spec, sol)
    best = min(_templates(), key=lambda t: float(((t.features - f) ** 2).sum()))
    k = SYMMETRY[best.shape]
    tilt = 0.0
    if k:
        # r'(theta) = r(theta - tilt): the k-th harmonic's phase turns by -k*tilt.
        d = np.angle(best.phase) - np.angle(spec[k])
        d = (d + np.pi) % (2 * np.pi) - np.pi
        tilt = float(np.degrees(d / k))
    radius = float(np.sqrt(mask.sum() / best.unit_area))
    return best.shape, tilt, radius
