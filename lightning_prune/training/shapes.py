"""Procedural shape images: the renderer behind :class:`~lightning_prune.training.data.ShapesDataModule`.

Every image is drawn from a seed with NumPy on one thread, using only operations whose results do not depend
on the machine's thread count (``+ - * / sqrt abs min max`` per pixel; sines only of per-image parameters and
of pixel coordinates, element by element), and stored as ``uint8``: the same seed gives the same bytes on
every run, rank and thread count.

An image is one *main* shape, whose kind is the label, on a background; what varies at random, independently
of the label: the colours of shape and background (a minimum contrast), the position, scale and rotation of
the shape, a stripe texture on the shape, a grating and a gradient in the background, smaller *distractor*
shapes of every kind (before or after the main shape, so they may occlude it), thin line segments and pixel
noise. Colour, position and size carry no information on the label; the kind of the largest shape does.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SHAPES_CHUNK", "SHAPE_CLASSES", "render_shapes"]

#: the label of each kind of shape (the index in this tuple)
SHAPE_CLASSES = ("disk", "ring", "square", "frame", "triangle", "plus", "star", "pair", "crescent", "bars")

_SQRT3 = float(np.sqrt(3.0))
_K1 = (0.809016994375, -0.587785252292)  # (cos 36°, -sin 36°): the star's mirror axes


def _length(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.sqrt(x * x + y * y)


def _box(x: np.ndarray, y: np.ndarray, bx: float, by: float) -> np.ndarray:
    qx, qy = np.abs(x) - bx, np.abs(y) - by
    return _length(np.maximum(qx, 0.0), np.maximum(qy, 0.0)) + np.minimum(np.maximum(qx, qy), 0.0)


def _triangle(x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Equilateral triangle of circumradius-ish ``r`` centred on the origin (exact signed distance)."""
    x = np.abs(x) - r
    y = y + r / _SQRT3
    fold = x + _SQRT3 * y > 0.0
    x, y = np.where(fold, (x - _SQRT3 * y) / 2.0, x), np.where(fold, (-_SQRT3 * x - y) / 2.0, y)
    x = x - np.clip(x, -2.0 * r, 0.0)
    return -_length(x, y) * np.sign(y)


def _star(x: np.ndarray, y: np.ndarray, r: float, rf: float) -> np.ndarray:
    """Five-pointed star, outer radius ``r``, inner radius ``rf * r`` (exact signed distance)."""
    k1x, k1y = _K1
    k2x, k2y = -k1x, k1y
    x = np.abs(x)
    d = 2.0 * np.maximum(k1x * x + k1y * y, 0.0)
    x, y = x - d * k1x, y - d * k1y
    d = 2.0 * np.maximum(k2x * x + k2y * y, 0.0)
    x, y = x - d * k2x, y - d * k2y
    x = np.abs(x)
    y = y - r
    bax, bay = rf * -k1y, rf * k1x - 1.0
    h = np.clip((x * bax + y * bay) / (bax * bax + bay * bay), 0.0, r)
    return _length(x - bax * h, y - bay * h) * np.sign(y * bax - x * bay)


def _sdf(kind: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) to shape ``kind`` of radius about 1, in the shape's own units."""
    name = SHAPE_CLASSES[kind]
    if name == "disk":
        return _length(x, y) - 0.95
    if name == "ring":
        return np.abs(_length(x, y) - 0.75) - 0.25
    if name == "square":
        return _box(x, y, 0.75, 0.75)
    if name == "frame":
        return np.abs(_box(x, y, 0.78, 0.78)) - 0.2
    if name == "triangle":
        return _triangle(x, y + 0.15, 1.0)
    if name == "plus":
        return np.minimum(_box(x, y, 0.95, 0.26), _box(x, y, 0.26, 0.95))
    if name == "star":
        return _star(x, y, 1.05, 0.45)
    if name == "pair":
        return np.minimum(_length(x - 0.5, y) - 0.42, _length(x + 0.5, y) - 0.42)
    if name == "crescent":
        return np.maximum(_length(x, y) - 0.95, 0.72 - _length(x - 0.5, y))
    if name == "bars":
        return np.minimum(np.minimum(_box(x, y - 0.6, 0.9, 0.17), _box(x, y, 0.9, 0.17)),
                          _box(x, y + 0.6, 0.9, 0.17))
    raise ValueError(kind)


def _coverage(kinds: np.ndarray, cx: np.ndarray, cy: np.ndarray, radius: np.ndarray, angle: np.ndarray,
              size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], shape ``(n, size, size)``, of one shape per image."""
    n = len(kinds)
    grid = np.arange(size, dtype=np.float64) + 0.5
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    dx = grid[None, None, :] - cx[:, None, None]
    dy = grid[None, :, None] - cy[:, None, None]
    scale = radius[:, None, None]
    lx, ly = (cos * dx + sin * dy) / scale, (-sin * dx + cos * dy) / scale
    out = np.empty((n, size, size))
    for kind in np.unique(kinds):
        rows = np.nonzero(kinds == kind)[0]
        distance = _sdf(int(kind), lx[rows], ly[rows]) * scale[rows]  # in pixels
        out[rows] = np.clip(0.5 - distance, 0.0, 1.0)
    return out


def _colours(rng: np.random.Generator, n: int, away_from: np.ndarray | None,
             min_distance: float) -> np.ndarray:
    """``n`` RGB colours in [0, 1]; with ``away_from``, each at least ``min_distance`` (RMS over channels)
    from its row there when one of 16 candidates allows it (else the farthest candidate)."""
    candidates = rng.random((n, 16, 3))
    if away_from is None:
        return candidates[:, 0]
    distance = np.sqrt(((candidates - away_from[:, None, :]) ** 2).mean(-1))
    ok = distance >= min_distance
    pick = np.where(ok.any(1), ok.argmax(1), distance.argmax(1))
    return candidates[np.arange(n), pick]


def _paint(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """Alpha-blend ``colour`` (n, 3) or (n, 3, s, s) over ``canvas`` (n, 3, s, s) in place."""
    if colour.ndim == 2:
        colour = colour[:, :, None, None]
    canvas += alpha[:, None] * (colour - canvas)


#: images drawn from one random stream (part of the definition of the data: never change it)
SHAPES_CHUNK = 512


def render_shapes(labels: np.ndarray, seed: int | tuple[int, ...], difficulty: float = 0.0,
                  size: int = 32) -> np.ndarray:
    """Images of the shapes ``labels`` (indices into :data:`SHAPE_CLASSES`), ``uint8`` of shape
    ``(n, 3, size, size)``, a deterministic function of ``(labels, seed, difficulty, size)``. ``seed`` is
    an int or a tuple of ints (NumPy's ``SeedSequence`` entropy): ``(data_seed, split)`` gives independent
    streams.

    ``difficulty`` in [0, 1] scales every nuisance together: 0 is a large, high-contrast, untextured shape
    alone on a plain background; 1 has smaller shapes with lower contrast, textures, up to five distractor
    shapes and four lines, and more noise.
    """
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"`difficulty` must be in [0, 1], got {difficulty}.")
    labels = np.asarray(labels, dtype=np.int64)
    out = np.empty((len(labels), 3, size, size), dtype=np.uint8)
    for chunk, start in enumerate(range(0, len(labels), SHAPES_CHUNK)):
        entropy = [*seed, chunk] if isinstance(seed, tuple) else [seed, chunk]
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
        stop = start + SHAPES_CHUNK
        out[start:stop] = _render(labels[start:stop], rng, float(difficulty), size)
    return out


def _render(labels: np.ndarray, rng: np.random.Generator, t: float, size: int) -> np.ndarray:
    n = len(labels)
    grid = np.arange(size, dtype=np.float64) + 0.5

    # background: a colour, a gradient and a grating (a texture that is not a shape)
    bg = _colours(rng, n, None, 0.0)
    canvas = np.broadcast_to(bg[:, :, None, None], (n, 3, size, size)).copy()
    theta = rng.uniform(0, 2 * np.pi, n)
    ramp = (np.cos(theta)[:, None, None] * (grid[None, None, :] - size / 2)
            + np.sin(theta)[:, None, None] * (grid[None, :, None] - size / 2)) / size
    canvas += (0.35 * t * rng.uniform(-1, 1, (n, 3)))[:, :, None, None] * ramp[:, None]
    phi, freq = rng.uniform(0, 2 * np.pi, n), rng.uniform(0.15, 0.6, n)
    wave_x = (np.cos(phi) * freq)[:, None, None] * grid[None, None, :]
    wave_y = (np.sin(phi) * freq)[:, None, None] * grid[None, :, None]
    grating = np.sin(wave_x + wave_y + rng.uniform(0, 2 * np.pi, n)[:, None, None])
    canvas += (0.25 * t * rng.uniform(-1, 1, (n, 3)))[:, :, None, None] * grating[:, None]

    # the main shape's geometry and colour
    radius = rng.uniform(9.0 - 4.0 * t, 13.0 - 1.0 * t, n)
    margin = radius * (0.85 - 0.3 * t)
    cx, cy = rng.uniform(margin, size - margin), rng.uniform(margin, size - margin)
    angle = rng.uniform(0, 2 * np.pi, n)
    fg = _colours(rng, n, bg, 0.45 - 0.25 * t)
    textured = rng.random(n) < 0.6 * t
    stripe_angle, stripe_freq = rng.uniform(0, 2 * np.pi, n), rng.uniform(0.8, 1.6, n)
    stripes = np.sin((np.cos(stripe_angle) * stripe_freq)[:, None, None] * grid[None, None, :]
                     + (np.sin(stripe_angle) * stripe_freq)[:, None, None] * grid[None, :, None])
    shade = np.where(textured, 0.3, 0.0)[:, None, None, None] * stripes[:, None]
    fg_image = np.clip(fg[:, :, None, None] * (1.0 + shade), 0.0, 1.0)

    # distractors: smaller shapes of any kind, some drawn after the main shape (occluding it)
    max_distractors = int(round(5 * t))
    count = rng.integers(0, max_distractors + 1, n) if max_distractors else np.zeros(n, dtype=np.int64)
    after = []
    for slot in range(max_distractors):
        kinds = rng.integers(0, len(SHAPE_CLASSES), n)
        r = rng.uniform(2.5, 4.5, n)
        dx, dy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        rot = rng.uniform(0, 2 * np.pi, n)
        colour = _colours(rng, n, bg, 0.3)
        on_top = rng.random(n) < 0.5
        alpha = _coverage(kinds, dx, dy, r, rot, size) * (slot < count)[:, None, None]
        if alpha.any():
            after.append((alpha * on_top[:, None, None], colour))
            _paint(canvas, alpha * ~on_top[:, None, None], colour)

    _paint(canvas, _coverage(labels, cx, cy, radius, angle, size), fg_image)
    for alpha, colour in after:
        _paint(canvas, alpha, colour)

    # thin line segments across the image
    max_lines = int(round(4 * t))
    lines = rng.integers(0, max_lines + 1, n) if max_lines else np.zeros(n, dtype=np.int64)
    for slot in range(max_lines):
        ax, ay, bx, by = (rng.uniform(0, size, n)[:, None, None] for _ in range(4))
        colour = _colours(rng, n, bg, 0.25)
        px, py = grid[None, None, :] - ax, grid[None, :, None] - ay
        ex, ey = bx - ax, by - ay
        h = np.clip((px * ex + py * ey) / np.maximum(ex * ex + ey * ey, 1e-9), 0.0, 1.0)
        distance = _length(px - ex * h, py - ey * h) - 0.5
        alpha = np.clip(0.5 - distance, 0.0, 1.0) * (slot < lines)[:, None, None]
        _paint(canvas, alpha, colour)

    canvas += rng.normal(0.0, 0.12 * t, canvas.shape) if t > 0 else 0.0
    return np.clip(np.floor(canvas * 255.0 + 0.5), 0, 255).astype(np.uint8)
