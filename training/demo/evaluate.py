"""Does an image show what its prompt asks for? A reader of demo scenes made of plain colour and geometry
statistics (numpy and pillow, no learned model), and accuracies over a folder of generated images.

    background  median colour of the image's border -> nearest BACKGROUNDS colour
    foreground  pixels closer to some object colour than to that measured background colour
    objects     8-connected components of the foreground (run-length union-find), largest first; specks under
                MIN_AREA of the image are ignored; a component whose core holds two object colours is split
    colour      median of the component's core (pixels much nearer an object colour than the background)
                -> nearest COLOURS colour
    size        longest side of the bounding box against the midpoint between the small and large ranges
    position    centre of the bounding box -> nearest POSITIONS anchor
    shape       nearest prototype in FEATURES (fill of the bounding box, solidity, centroid height, rotational
                symmetry from the radius profile); prototypes are the exact values of the outlines shapes.py draws

A prompt asking for N objects is judged on the N largest components, matched to the prompt's objects in the way
that agrees best; only the attributes a prompt names are scored. Noise gives a huge component at the centre and
blank images give none, so neither scores above chance (tests/test_demo_shapes.py checks both).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mmditx.checkpoint import written_whole

from .shapes import (BACKGROUNDS, COLOURS, OUTLINES, POSITIONS, SHAPES, SIZES, CaptionError, Scene,
                     held_out_reasons, parse_caption, random_scene, render)

MIN_AREA = 0.004    # of the image: smaller components are specks (a small triangle covers ~0.022)
BORDER = 0.03       # of the side: the ring whose median colour is the background
SIZE_SPLIT = (SIZES["small"][1] + SIZES["large"][0]) / 2  # box side / image side
ATTRIBUTES = ("background", "colour", "shape", "size", "position")

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)   # (8, 3)
_BACKGROUNDS = np.array(list(BACKGROUNDS.values()), dtype=np.float32)


# ---- shape features and prototypes, from the outlines ----------------------------------------------------
# fill = area / bounding box; solidity = area / convex hull; drop = height of the centroid in the box (0 top,
# 1 bottom); a3, a4, a5 = amplitudes of the 3rd, 4th, 5th harmonics of the outline's radius around the centroid
# (max radius per angle sector), over its mean: the shape's rotational symmetry, which blur weakens but keeps.
#              fill  solidity  drop  a3    a4    a5
# circle       .785  1         .5    0     0     0
# square       1     1         .5    0     .16   0
# triangle     .5    1         .667  .31   .01   .05
# diamond      .5    1         .5    0     .16   0
# star         .38   .56       .55   0     0     .35
# cross        .62   .76       .5    0     .21   0
# heart        .61   .92       .38   .20   .01   .07   (NEW_SHAPES: only when asked for)
FEATURES = ("fill", "solidity", "drop", "a3", "a4", "a5")
FEATURE_SCALE = (0.08, 0.08, 0.04, 0.05, 0.05, 0.05)  # a difference this large counts 1 in the distance
ANGLE_SECTORS = 48


def convex_hull(points):
    """Andrew's monotone chain: the hull's vertices in order (collinear points dropped)."""
    pts = sorted(set(map(tuple, points)))
    if len(pts) < 3:
        return pts
    cross = lambda o, a, b: (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])  # noqa: E731
    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def radial_harmonics(xs: np.ndarray, ys: np.ndarray, cx: float, cy: float) -> tuple[float, float, float]:
    """(a3, a4, a5) of the points' outline: the largest radius in each of ANGLE_SECTORS sectors around (cx, cy),
    Fourier amplitudes of that profile over its mean."""
    sector = ((np.arctan2(ys - cy, xs - cx) + np.pi) / (2 * np.pi) * ANGLE_SECTORS).astype(int) % ANGLE_SECTORS
    profile = np.zeros(ANGLE_SECTORS)
    np.maximum.at(profile, sector, np.hypot(xs - cx, ys - cy))
    f = np.abs(np.fft.rfft(profile))
    return tuple(float(2 * f[k] / f[0]) for k in (3, 4, 5))


def _polygon_features(pts: list[tuple[float, float]]) -> tuple[float, ...]:
    """The features of an outline, exactly: shoelace area and centroid, its hull, its densely sampled edges."""
    p = np.array(pts, float)
    x, y, x1, y1 = p[:, 0], p[:, 1], np.roll(p[:, 0], -1), np.roll(p[:, 1], -1)
    c = x * y1 - x1 * y
    area, cx, cy = c.sum() / 2, ((x + x1) * c).sum() / (3 * c.sum()), ((y + y1) * c).sum() / (3 * c.sum())
    h = np.array(convex_hull(pts), float)
    hull = abs((h[:, 0] * np.roll(h[:, 1], -1) - np.roll(h[:, 0], -1) * h[:, 1]).sum()) / 2
    t = np.linspace(0, 1, 200, endpoint=False)[:, None, None]
    edge = (p + (np.roll(p, -1, axis=0) - p) * t).reshape(-1, 2)
    w, hh = x.max() - x.min(), y.max() - y.min()
    return (float(abs(area) / (w * hh)), float(abs(area) / hull), float((cy - y.min()) / hh),
            *radial_harmonics(edge[:, 0], edge[:, 1], cx, cy))


PROTOTYPES = {"circle": (math.pi / 4, 1.0, 0.5, 0.0, 0.0, 0.0)} | {s: _polygon_features(o) for s, o in OUTLINES.items()}


# ---- segmentation --------------------------------------------------------------------------------------

def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean (H, W) mask -> (labels (H, W) int32, 0 = background; count).
    Runs of each row are joined to the runs they touch in the row above (union-find over runs)."""
    h, w = mask.shape
    edges = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    runs, row_runs = [], []  # runs: (row, start, end exclusive)
    for y in range(h):
        starts, ends = np.flatnonzero(edges[y] == 1), np.flatnonzero(edges[y] == -1)
        row_runs.append(range(len(runs), len(runs) + len(starts)))
        runs.extend((y, int(s), int(e)) for s, e in zip(starts, ends))
    parent = list(range(len(runs)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for y in range(1, h):
        above, here = row_runs[y - 1], row_runs[y]
        j = above.start
        for i in here:
            _, s, e = runs[i]
            while j < above.stop and runs[j][2] < s:  # runs above ending left of this one (minus diagonal)
                j += 1
            k = j
            while k < above.stop and runs[k][1] <= e:  # touches (diagonals included)
                parent[root(k)] = root(i)
                k += 1
    labels = np.zeros((h, w), np.int32)
    ids = {}
    for i, (y, s, e) in enumerate(runs):
        labels[y, s:e] = ids.setdefault(root(i), len(ids) + 1)
    return labels, len(ids)


@dataclass
class Found:
    """One object the classifier sees."""
    colour: str
    shape: str
    size: str
    position: str
    area: float                         # of the image
    box: tuple[int, int, int, int]      # x0, y0, x1, y1 (exclusive), pixels
    features: tuple[float, ...]          # FEATURES

    def attributes(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "position": self.position}


@dataclass
class Reading:
    background: str
    objects: list[Found]   # largest first


def _nearest(table: np.ndarray, rgb: np.ndarray) -> int:
    return int(np.argmin(((table - rgb) ** 2).sum(-1)))


def _shape_features(mask: np.ndarray) -> tuple[float, ...]:
    """FEATURES of one component's mask, cropped to its bounding box. The hull is taken over pixel centres;
    A + P/2 + 1 turns its area into pixel units (exact for a square)."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    area = len(ys)
    first = np.argmax(mask, axis=1)
    last = w - 1 - np.argmax(mask[:, ::-1], axis=1)
    rows = np.flatnonzero(mask.any(axis=1))
    hull = convex_hull([(int(first[y]), int(y)) for y in rows] + [(int(last[y]), int(y)) for y in rows])
    if len(hull) >= 3:
        pairs = list(zip(hull, hull[1:] + hull[:1]))
        hull_area = abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in pairs)) / 2
        perimeter = sum(math.dist(a, b) for a, b in pairs)
    else:
        hull_area, perimeter = 0.0, 2.0 * math.dist(hull[0], hull[-1])
    cx, cy = xs.mean(), ys.mean()
    return (area / (h * w), area / (hull_area + perimeter / 2 + 1), float(cy + 0.5) / h,
            *radial_harmonics(xs.astype(float), ys.astype(float), cx, cy))


def classify_shape(features, shapes: tuple[str, ...] = SHAPES) -> str:
    return min(shapes, key=lambda s: sum(((f - p) / k) ** 2
                                            for f, p, k in zip(features, PROTOTYPES[s], FEATURE_SCALE)))


def read_image(image: Image.Image | np.ndarray, shapes: tuple[str, ...] = SHAPES) -> Reading:
    """What the image shows: its background colour and objects, each with colour, shape (one of `shapes`),
    size and position."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    h, w, _ = rgb.shape
    b = max(1, round(BORDER * min(h, w)))
    ring = np.concatenate([rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3),
                           rgb[:, :b].reshape(-1, 3), rgb[:, -b:].reshape(-1, 3)])
    bg = np.median(ring, axis=0)
    to_bg = ((rgb - bg) ** 2).sum(-1)
    to_colour = ((rgb[:, :, None, :] - _PALETTE) ** 2).sum(-1)   # (H, W, 8)
    nearest, closest = to_colour.argmin(-1), to_colour.min(-1)
    purity = closest / np.maximum(to_bg, 1e-6)
    labels, count = label_components(closest < to_bg)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    objects = []
    for k in np.flatnonzero(areas >= MIN_AREA * h * w):
        if k == 0:
            continue
        for part in _split_by_colour(labels == k, purity, nearest, MIN_AREA * h * w):
            objects.append(_describe(part, rgb, purity, h, w, shapes))
    objects.sort(key=lambda o: -o.area)
    return Reading(list(BACKGROUNDS)[_nearest(_BACKGROUNDS, bg)], objects)


def _core(mask: np.ndarray, purity: np.ndarray) -> np.ndarray:
    """The component's body, not its blended edge: pixels at most half as far from their nearest object colour
    as from the background (purity = squared distance ratio < 1/4), or else its purest half."""
    core = mask & (purity < 0.25)
    if core.sum() < mask.sum() / 4:
        core = mask & (purity <= np.median(purity[mask]))
    return core


def _split_by_colour(mask, purity, nearest, min_area):
    """The component, or its parts when its core holds a second object colour on at least a third of it
    (two objects of different colours touching)."""
    core = _core(mask, purity)
    counts = np.bincount(nearest[core], minlength=len(_PALETTE))
    first, second = np.argsort(counts)[::-1][:2]
    if counts[second] < max(counts[first] / 2, min_area / 2):
        return [mask]
    # each part: the largest component of the pixels nearest that colour (blended edge pixels drop out)
    parts = []
    for c in (first, second):
        labels, n = label_components(mask & (nearest == c))
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        if n:
            biggest = 1 + int(np.argmax(areas[1:]))
            if areas[biggest] >= min_area:
                parts.append(labels == biggest)
    return parts or [mask]


def _describe(mask, rgb, purity, h, w, shapes) -> Found:
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    colour = list(COLOURS)[_nearest(_PALETTE, np.median(rgb[_core(mask, purity)], axis=0))]
    features = _shape_features(mask[y0:y1, x0:x1])
    side = max(x1 - x0, y1 - y0) / min(h, w)
    centre = np.array([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h])
    position = min(POSITIONS, key=lambda p: float(((centre - POSITIONS[p]) ** 2).sum()))
    return Found(colour, classify_shape(features, shapes), "large" if side > SIZE_SPLIT else "small", position,
                 len(ys) / (h * w), (x0, y0, x1, y1), tuple(round(f, 3) for f in features))


# ---- scoring -------------------------------------------------------------------------------------------

def score(reading: Reading, truth: Scene) -> dict[str, tuple[int, int]]:
    """{attribute: (right, asked)} for the attributes the truth names, plus 'count' (as many objects as asked)
    and 'all' (everything asked is right). The truth's objects are matched to the largest found objects in the
    assignment that gets most attributes right; an object not found gets every attribute wrong."""
    n = len(truth.objects)
    found = reading.objects[:n] + [None] * max(0, n - len(reading.objects))
    best = None
    for perm in itertools.permutations(found, n):
        counts = {a: [0, 0] for a in ATTRIBUTES[1:]}
        for want, got in zip(truth.objects, perm):
            for attr, value in want.attributes().items():
                if value is not None:
                    counts[attr][1] += 1
                    counts[attr][0] += int(got is not None and getattr(got, attr) == value)
        if best is None or sum(r for r, _ in counts.values()) > sum(r for r, _ in best.values()):
            best = counts
    result = {a: tuple(v) for a, v in best.items() if v[1]}
    if truth.background is not None:
        result["background"] = (int(reading.background == truth.background), 1)
    result["count"] = (int(len(reading.objects) == n), 1)
    result["all"] = (int(all(r == k for r, k in result.values())), 1)
    return result


@dataclass
class Trial:
    """One image judged: the truth it is judged against, 'seen' or 'held_out', what was read, score()."""
    truth: Scene
    split: str
    reading: Reading
    scores: dict


@dataclass
class Item(Trial):
    """A judged image file."""
    path: Path = None
    prompt: str = ""


def truth_of(path: Path, shapes: tuple[str, ...] = SHAPES) -> tuple[str, Scene]:
    """(prompt, ground truth) of an image: the dataset's sidecar name.json (the full scene), else the prompt in
    the PNG metadata of scripts/generate.py, else the caption in name.txt, parsed by the dataset's grammar."""
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        d = json.loads(sidecar.read_text(encoding="utf-8"))
        return d["caption"], Scene.from_dict(d["scene"])
    from sampling.metadata import METADATA_KEY, read_png_metadata  # what generate.py writes (sampling < training)
    with Image.open(path) as im:
        stored = METADATA_KEY in getattr(im, "text", {})
    if stored:
        prompt = read_png_metadata(path).get("prompt")
    elif path.with_suffix(".txt").is_file():
        prompt = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
    else:
        prompt = None
    if not isinstance(prompt, str):
        raise CaptionError(f"{path}: no prompt (no {path.stem}.json, no generate.py metadata, no {path.stem}.txt)")
    return prompt, parse_caption(prompt, shapes)


def evaluate_folder(folder: str | os.PathLike, limit: int | None = None,
                    shapes: tuple[str, ...] = SHAPES) -> tuple[list[Item], list[str]]:
    """Every PNG of a folder read and scored -> (items, problems: one line per image that could not be used).
    `shapes`: the shape words prompts may use and the reader may answer (add NEW_SHAPES for a LoRA's word)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    items, problems = [], []
    for path in sorted(folder.glob("*.png"))[:limit]:
        try:
            prompt, truth = truth_of(path, shapes)
            with Image.open(path) as im:
                reading = read_image(im, shapes)
        except (ValueError, OSError, KeyError, TypeError) as e:  # CaptionError, MetadataError, bad JSON: ValueErrors
            problems.append(f"{path.name}: {e}")
            continue
        split = "held_out" if held_out_reasons(truth) else "seen"
        items.append(Item(truth, split, reading, score(reading, truth), path=path, prompt=prompt))
    return items, problems


def accuracies(items: list[Trial]) -> dict[str, dict[str, tuple[int, int]]]:
    """{split: {attribute: (right, asked)}}, with 'all (1 object)' and 'all (2 objects)' in place of 'all'."""
    table = {}
    for it in items:
        row = table.setdefault(it.split, {})
        for attr, (r, k) in it.scores.items():
            if attr == "all":
                attr = f"all ({len(it.truth.objects)} object{'s' * (len(it.truth.objects) > 1)})"
            old = row.get(attr, (0, 0))
            row[attr] = (old[0] + r, old[1] + k)
    return table


def format_table(table: dict) -> str:
    splits = [s for s in ("seen", "held_out") if s in table]
    attrs = list(ATTRIBUTES) + ["count", "all (1 object)", "all (2 objects)"]
    lines = [f"{'':16}" + "".join(f"{s.replace('_', ' '):>20}" for s in splits)]
    for a in attrs:
        cells = [table[s].get(a) for s in splits]
        if any(cells):
            lines.append(f"{a:16}" + "".join(f"{100 * r / k:>10.1f}% {f'({r}/{k})':>9}" if k else f"{'-':>20}"
                                              for r, k in (c or (0, 0) for c in cells)))
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
                     + ["| " + " | ".join(row) + " |" for row in rows])


def compare_table(tables: dict[str, dict]) -> str:
    """A markdown table of several runs' accuracies, one row per run: each cell 'seen / held out'."""
    attrs = [a for a in list(ATTRIBUTES) + ["count", "all (1 object)", "all (2 objects)"]
             if any(a in t.get(s, {}) for t in tables.values() for s in t)]
    pct = lambda c: f"{100 * c[0] / c[1]:.0f}" if c and c[1] else "-"  # noqa: E731
    return markdown_table(["run"] + attrs, [
        [name] + [" / ".join(pct(t.get(s, {}).get(a)) for s in ("seen", "held_out") if s in t) for a in attrs]
        for name, t in tables.items()])


def write_grid(items: list[Item], path: str | os.PathLike, columns: int = 8, tile: int = 128) -> Path:
    """The images in a grid, each framed green (everything asked is right) or red, with its prompt below."""
    path = Path(path)
    lines, line_h = 4, 11
    rows = max(1, math.ceil(len(items) / columns))
    grid = Image.new("RGB", (columns * (tile + 8), rows * (tile + 8 + lines * line_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for n, it in enumerate(items):
        x, y = (n % columns) * (tile + 8), (n // columns) * (tile + 8 + lines * line_h)
        ok = it.scores["all"][0] == 1
        draw.rectangle([x, y, x + tile + 7, y + tile + 7], fill=(40, 170, 60) if ok else (220, 40, 40))
        with Image.open(it.path) as im:
            grid.paste(im.convert("RGB").resize((tile, tile), Image.BILINEAR), (x + 4, y + 4))
        text = ("[held out] " if it.split == "held_out" else "") + it.prompt
        for k, line in enumerate(textwrap.wrap(text, width=tile // 6)[:lines]):
            draw.text((x + 4, y + tile + 8 + k * line_h), line, fill=(0, 0, 0))
    with written_whole(path) as tmp:
        grid.save(tmp, format="PNG")
    return path


# ---- the reader's own accuracy -------------------------------------------------------------------------

def degrade(image: Image.Image, rng: np.random.Generator, blur: float = 1.0, noise: float = 8.0,
            shift: float = 15.0) -> Image.Image:
    """A clean scene as a decoder might return it: Gaussian blur (radius `blur` px at 128 px, scaled with the
    size), per-channel gain within +-8% and offset within +-shift, Gaussian noise of sd `noise` (0-255 scale)."""
    image = image.filter(ImageFilter.GaussianBlur(blur * image.width / 128))
    a = np.asarray(image, np.float32)
    a = a * rng.uniform(0.92, 1.08, 3) + rng.uniform(-shift, shift, 3) + rng.normal(0, noise, a.shape)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def ground_truth_trials(n: int = 300, size: int = 128, seed: int = 0,
                        degradation: tuple[float, float, float] | None = None,
                        shapes: tuple[str, ...] = SHAPES, thumbnail: int | None = None) -> list[Trial]:
    """The reader on n rendered scenes (any combination, held-out ones included), optionally degraded, or
    squeezed through a thumbnail x thumbnail RGB image (box down, bicubic up): how much a grid that coarse can
    carry (an 8x VAE's latent grid is size/8 cells, with 16 channels instead of 3)."""
    rng = np.random.default_rng([seed, 3])
    trials = []
    for _ in range(n):
        truth = random_scene(rng, accept=lambda s: True, shapes=shapes)
        image = render(truth, size)
        if thumbnail:
            image = image.resize((thumbnail, thumbnail), Image.BOX).resize((size, size), Image.BICUBIC)
        if degradation:
            image = degrade(image, rng, *degradation)
        reading = read_image(image, shapes)
        trials.append(Trial(truth, "held_out" if held_out_reasons(truth) else "seen", reading,
                            score(reading, truth)))
    return trials
