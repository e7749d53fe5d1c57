"""Coloured shapes on plain backgrounds, with captions: the world the demo model learns to draw.

Everything is drawn from a seed with numpy and pillow, so `write_dataset(..., seed=0)` gives the same files on
every machine. A scene is a background colour and one or two objects; each object has a shape, a colour, a size
and a position:

    one object:   "a small red circle on the left, on a white background"
    two objects:  "a large blue star to the left of a small yellow triangle on a black background"

Captions come from several templates and synonyms, and any attribute may be left out ("a red circle",
"a star at the top", "tiny square, left, grey background"), so short prompts work too. `parse_caption` reads
any caption of this grammar back into the attributes it names: the evaluator gets its ground truth that way.

HELD_OUT lists colour x shape pairs, colour x background pairs and two-object shape pairings that no training
image shows (so no caption names them either); `evaluation_prompts("held_out")` asks for exactly those: the test
of compositional prompt-following. "heart" (NEW_SHAPES) is never in the dataset: it is the word a LoRA teaches
later; render, parse_caption and the reader know it only when asked (`shapes=SHAPES + NEW_SHAPES`).

Geometry is in fractions of the image side, so any resolution works; at the demo's 128x128 a small object is
27-35 px (3-4 latent cells of the 8x VAE) and a large one 45-52 px (6-7 cells).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
NEW_SHAPES = ("heart",)  # drawn and read, never in the dataset: the word a LoRA teaches the demo model later
COLOURS = {  # RGB; the closest pair (orange/yellow) is 91 apart, every colour >= 100 from every background
    "red": (215, 25, 35), "orange": (250, 130, 10), "yellow": (240, 220, 20), "green": (30, 160, 50),
    "teal": (0, 165, 165), "blue": (30, 70, 220), "purple": (135, 45, 195), "pink": (250, 115, 185),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128), "beige": (235, 220, 185)}
SIZES = {"small": (0.21, 0.27), "large": (0.35, 0.41)}  # side of the object's box / image side
POSITIONS = {  # centre of the object's box, (x, y) / image side
    "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "centre": (0.5, 0.5)}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
JITTER = {1: 0.03, 2: 0.02}  # random shift of the box centre, by number of objects (two never touch)
TWO_OBJECT_SHARE = 0.4       # of training scenes
CROSS_ARM = 0.38             # arm width of the cross / its box side


@dataclass(frozen=True)
class HeldOut:
    colour_shape: frozenset        # {(colour, shape)}
    colour_background: frozenset   # {(object colour, background)}
    shape_pairs: frozenset         # {frozenset({shape, shape})}: never together in one scene


# Each colour loses at most one shape and each shape one colour, so every word is still seen often.
HELD_OUT = HeldOut(
    colour_shape=frozenset({("red", "triangle"), ("blue", "circle"), ("green", "square"), ("yellow", "star"),
                            ("purple", "diamond"), ("orange", "cross")}),
    colour_background=frozenset({("red", "black"), ("yellow", "white"), ("blue", "gray"), ("teal", "beige")}),
    shape_pairs=frozenset({frozenset({"circle", "square"}), frozenset({"triangle", "star"}),
                           frozenset({"diamond", "cross"})}),
)


@dataclass(frozen=True)
class Obj:
    """One object; None = not known (a caption that leaves it out). `box` is where it is drawn:
    (centre x, centre y, side) in fractions of the image side."""
    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    position: str | None = None
    box: tuple[float, float, float] | None = field(default=None, compare=False)

    def attributes(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "position": self.position}


@dataclass(frozen=True)
class Scene:
    background: str | None
    objects: tuple[Obj, ...]

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [
            {k: v for k, v in asdict(o).items() if v is not None} for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        objs = tuple(Obj(**{**o, "box": tuple(o["box"]) if o.get("box") else None}) for o in d["objects"])
        return cls(d.get("background"), objs)


def held_out_reasons(scene: Scene, held_out: HeldOut = HELD_OUT) -> list[str]:
    """Which held-out combinations the scene contains (attributes it does not know are no evidence)."""
    reasons = []
    for o in scene.objects:
        if (o.colour, o.shape) in held_out.colour_shape:
            reasons.append(f"colour x shape: {o.colour} {o.shape}")
        if (o.colour, scene.background) in held_out.colour_background:
            reasons.append(f"colour x background: {o.colour} on {scene.background}")
    shapes = [o.shape for o in scene.objects if o.shape]
    if len(shapes) == 2 and frozenset(shapes) in held_out.shape_pairs:
        reasons.append(f"shape pair: {' + '.join(sorted(shapes))}")
    return reasons


# ---- scenes ----------------------------------------------------------------------------------------------

def _pick(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


def place(obj: Obj, n_objects: int, rng: np.random.Generator) -> Obj:
    """The object with a box drawn at random around its position's anchor, with a side in its size's range."""
    (x, y), (lo, hi), j = POSITIONS[obj.position], SIZES[obj.size], JITTER[n_objects]
    return replace(obj, box=(x + rng.uniform(-j, j), y + rng.uniform(-j, j), rng.uniform(lo, hi)))


def random_scene(rng: np.random.Generator, n_objects: int | None = None,
                 accept: Callable[[Scene], bool] = lambda s: not held_out_reasons(s),
                 shapes: tuple[str, ...] = SHAPES) -> Scene:
    """A scene with every attribute and box set, drawn until `accept` (default: no held-out combination)."""
    while True:
        n = n_objects or (2 if rng.random() < TWO_OBJECT_SHARE else 1)
        if n == 1:
            positions = [_pick(rng, POSITIONS)]
        else:
            positions = _pick(rng, [("left", "right"), ("top", "bottom")])
            positions = positions if rng.random() < 0.5 else positions[::-1]
        objs = tuple(place(Obj(_pick(rng, shapes), _pick(rng, COLOURS), _pick(rng, SIZES), p), n, rng)
                     for p in positions)
        scene = Scene(_pick(rng, BACKGROUNDS), objs)
        if accept(scene):
            return scene


def _outline(shape: str) -> list[tuple[float, float]]:
    """Polygon of an upright shape in its unit box (x right, y down), touching all four sides (star and heart,
    wider than tall: left, right and top/bottom, centred)."""
    if shape == "square":
        return [(0, 0), (1, 0), (1, 1), (0, 1)]
    if shape == "triangle":
        return [(0.5, 0), (1, 1), (0, 1)]
    if shape == "diamond":
        return [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]
    if shape == "cross":
        p, q = (1 - CROSS_ARM) / 2, (1 + CROSS_ARM) / 2
        return [(p, 0), (q, 0), (q, p), (1, p), (1, q), (q, q), (q, 1), (p, 1), (p, q), (0, q), (0, p), (p, p)]
    if shape == "star":  # five points, inner radius 0.45 of the outer (fatter than the classic 0.38: reads at 3 cells)
        pts = [(r * math.sin(k * math.pi / 5), -r * math.cos(k * math.pi / 5))
               for k, r in zip(range(10), [1.0, 0.45] * 5)]
    elif shape == "heart":  # the classic parametric heart, point down
        pts = [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                          - math.cos(4 * t))) for t in (2 * math.pi * k / 120 for k in range(120))]
    else:
        raise ValueError(f"unknown shape {shape!r}; the demo draws {', '.join(SHAPES + NEW_SHAPES)}")
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    scale = max(max(xs) - min(xs), max(ys) - min(ys))  # keep the aspect; centre in the box
    ox, oy = (1 - (max(xs) - min(xs)) / scale) / 2, (1 - (max(ys) - min(ys)) / scale) / 2
    return [(ox + (x - min(xs)) / scale, oy + (y - min(ys)) / scale) for x, y in pts]


OUTLINES = {s: _outline(s) for s in SHAPES + NEW_SHAPES if s != "circle"}


def render(scene: Scene, size: int = 128, supersample: int = 4) -> Image.Image:
    """The scene as an RGB image, size x size: drawn at `supersample` times the size and box-filtered down, so
    edges are anti-aliased (each pixel holds the exact share of the shape it covers, to 1/supersample^2)."""
    big = size * supersample
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        cx, cy, side = o.box
        x0, y0, s = (cx - side / 2) * big, (cy - side / 2) * big, side * big
        if o.shape == "circle":
            draw.ellipse([x0, y0, x0 + s, y0 + s], fill=COLOURS[o.colour])
        else:
            draw.polygon([(x0 + u * s, y0 + v * s) for u, v in OUTLINES[o.shape]], fill=COLOURS[o.colour])
    return image.resize((size, size), Image.BOX)


# ---- captions --------------------------------------------------------------------------------------------

SHAPE_WORDS = {s: (s,) for s in SHAPES + NEW_SHAPES} | {"circle": ("circle", "disk")}
UNNAMED_SHAPE = ("shape", "object")
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
BACKGROUND_WORDS = {b: (b,) for b in BACKGROUNDS} | {"gray": ("gray", "grey")}
POSITION_PHRASES = {
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "near the top", "in the upper half"),
    "bottom": ("at the bottom", "near the bottom", "in the lower half"),
    "centre": ("in the centre", "in the center", "in the middle"),
}
POSITION_TAGS = {"left": ("left",), "right": ("right",), "top": ("top",), "bottom": ("bottom",),
                 "centre": ("centre", "center")}
RELATION_PHRASES = {  # keyed by the position of the object named first ("A left of B": A left, B right)
    "left": ("to the left of", "left of"), "right": ("to the right of", "right of"),
    "top": ("above", "over"), "bottom": ("below", "under", "beneath")}
BACKGROUND_PHRASES = ("on a {} background", "against a {} background", "on {}", "with a {} background",
                      "on a plain {} background")
PREFIXES = ("a picture of", "an image of", "a drawing of", "a simple drawing of")
TEMPLATES = {1: ("plain", "prefixed", "position_first", "background_first", "background_with", "tags"),
             2: ("plain", "prefixed", "positions", "background_first", "background_with")}
DROP = 0.3         # chance that a caption leaves out an object's size or colour, the positions, the background
DROP_SHAPE = 0.05  # ... or says "shape" / "object" instead of the shape


def named_attributes(scene: Scene, rng: np.random.Generator, drop: float = DROP,
                     drop_shape: float = DROP_SHAPE) -> Scene:
    """What a caption will name: the scene with some attributes set to None, objects in caption order.
    Positions go together (a relation names both)."""
    keep_position, keep_background = rng.random() >= drop, rng.random() >= drop
    objs = [Obj(o.shape if rng.random() >= drop_shape else None, o.colour if rng.random() >= drop else None,
                o.size if rng.random() >= drop else None, o.position if keep_position else None)
            for o in scene.objects]
    if len(objs) == 2 and rng.random() < 0.5:
        objs.reverse()
    return Scene(scene.background if keep_background else None, tuple(objs))


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _object_words(o: Obj, rng) -> str:
    words = [_pick(rng, SIZE_WORDS[o.size]) if o.size else None, o.colour,
             _pick(rng, SHAPE_WORDS[o.shape]) if o.shape else _pick(rng, UNNAMED_SHAPE)]
    return " ".join(w for w in words if w)


def write_caption(named: Scene, rng: np.random.Generator, template: str | None = None) -> str:
    """A caption naming exactly the attributes of `named` (None = left out), in one of TEMPLATES."""
    n = len(named.objects)
    template = template or _pick(rng, TEMPLATES[n])
    if template not in TEMPLATES[n]:
        raise ValueError(f"no template {template!r} for {n} object(s); choose from {', '.join(TEMPLATES[n])}")
    objs = [_article(_object_words(o, rng)) for o in named.objects]
    bg_word = _pick(rng, BACKGROUND_WORDS[named.background]) if named.background else None
    bg = (_pick(rng, [" ", ", "]) + _pick(rng, BACKGROUND_PHRASES).format(bg_word)) if bg_word else ""
    first_pos = named.objects[0].position
    if n == 1:
        pos = " " + _pick(rng, POSITION_PHRASES[first_pos]) if first_pos else ""
        body = objs[0] + pos
    elif template == "positions" and first_pos:
        body = " and ".join(f"{o} {_pick(rng, POSITION_PHRASES[p.position])}" for o, p in zip(objs, named.objects))
    else:
        body = f"{objs[0]} {_pick(rng, RELATION_PHRASES[first_pos]) if first_pos else 'and'} {objs[1]}"
    if template == "prefixed":
        return f"{_pick(rng, PREFIXES)} {body}{bg}"
    if template == "position_first" and first_pos:
        return f"{_pick(rng, POSITION_PHRASES[first_pos])}, {objs[0]}{bg}"
    if template == "background_first" and bg_word:
        return f"{bg_word} background, {body}"
    if template == "background_with" and bg_word:
        return f"a {bg_word} background with {body}"
    if template == "tags":
        o = named.objects[0]
        tags = [" ".join(w for w in (o.colour, _pick(rng, SHAPE_WORDS[o.shape]) if o.shape else "shape") if w),
                _pick(rng, SIZE_WORDS[o.size]) if o.size else None,
                _pick(rng, POSITION_TAGS[first_pos]) if first_pos else None,
                f"{bg_word} background" if bg_word else None]
        return ", ".join(t for t in tags if t)
    return body + bg  # plain, and the templates above when the attribute they lead with is left out


def describe(scene: Scene) -> str:
    """The canonical, fully specified prompt of a scene (evaluation prompts):
    'a small red circle on the left, on a white background'."""
    objs = [_article(" ".join(w for w in (o.size, o.colour, o.shape) if w)) for o in scene.objects]
    first = scene.objects[0].position
    if len(objs) == 1:
        body = objs[0] + (" " + POSITION_PHRASES[first][0] if first else "")
    else:
        body = f"{objs[0]} {RELATION_PHRASES[first][0] if first else 'and'} {objs[1]}"
    return body + (f", on a {scene.background} background" if scene.background else "")


# ---- parsing ---------------------------------------------------------------------------------------------

def _lexicon() -> dict[str, tuple[str, str | None]]:
    """word -> (kind, value), from the tables above (each fact written once)."""
    lex = {}
    for kind, table in (("shape", SHAPE_WORDS), ("size", SIZE_WORDS), ("background", BACKGROUND_WORDS),
                        ("position", POSITION_TAGS)):
        lex.update({w: (kind, value) for value, words in table.items() for w in words})
    lex.update({c: ("colour", c) for c in COLOURS} | {w: ("shape", None) for w in UNNAMED_SHAPE})
    lex.update({"upper": ("position", "top"), "lower": ("position", "bottom"), "middle": ("position", "centre")})
    lex.update({"above": ("relation", "top"), "over": ("relation", "top"), "below": ("relation", "bottom"),
                "under": ("relation", "bottom"), "beneath": ("relation", "bottom")})
    return lex


LEXICON = _lexicon()
FILLER = frozenset("a an the on at in of to and with against side half near picture image drawing simple plain "
                   "background".split())


class CaptionError(ValueError):
    """A prompt outside the demo's grammar; the message says which word and what the vocabulary is."""


def vocabulary() -> str:
    """One line per attribute: what the demo model can draw."""
    return "\n".join([f"shapes: {', '.join(SHAPES)}", f"colours: {', '.join(COLOURS)}",
                      f"backgrounds: {', '.join(BACKGROUNDS)}", f"sizes: {', '.join(SIZES)}",
                      f"positions: {', '.join(POSITIONS)} (or one object left of / right of / above / below another)"])


def parse_caption(text: str, shapes: tuple[str, ...] = SHAPES) -> Scene:
    """The attributes a caption of the dataset's grammar names (None for those it leaves out).

    Colour and size words belong to the next shape word (or the last, in tags like 'red circle, small');
    position words to the previous shape word (or the next: 'on the left, a red circle'); a relation
    ('left of', 'above', ...) sets the positions of the shapes on either side of it. Shape words outside
    `shapes` ('heart' unless asked for) are refused like any word outside the vocabulary."""
    words = re.findall(r"[a-z]+", text.lower())

    def known(w):
        kind, value = LEXICON.get(w, (None, None))
        return w in FILLER or (kind is not None and (kind != "shape" or value is None or value in shapes))
    unknown = sorted({w for w in words if not known(w)})
    if unknown:
        raise CaptionError(f"{text!r}: {', '.join(map(repr, unknown))} not in the demo vocabulary "
                           f"({vocabulary().replace(chr(10), '; ')})")
    shape_at = [i for i, w in enumerate(words) if LEXICON.get(w, ("",))[0] == "shape"]
    if not 1 <= len(shape_at) <= 2:
        raise CaptionError(f"{text!r}: names {len(shape_at)} shapes; demo prompts name one or two "
                           f"({', '.join(SHAPES)}, or 'shape')")
    objs = [{"shape": LEXICON[words[i]][1]} for i in shape_at]
    background = None

    def put(k: int, attr: str, value: str):
        if objs[k].get(attr, value) != value:
            raise CaptionError(f"{text!r}: object {k + 1} is given two {attr}s ({objs[k][attr]}, {value})")
        objs[k][attr] = value

    before = lambda i: max((k for k, s in enumerate(shape_at) if s < i), default=None)  # noqa: E731
    after = lambda i: min((k for k, s in enumerate(shape_at) if s > i), default=None)  # noqa: E731
    for i, w in enumerate(words):
        kind, value = LEXICON.get(w, (None, None))
        if kind == "background":
            if background not in (None, value):
                raise CaptionError(f"{text!r}: two backgrounds ({background}, {value})")
            background = value
        elif kind in ("colour", "size"):
            put(after(i) if after(i) is not None else len(objs) - 1, kind, value)
        elif kind == "relation" or (kind == "position" and words[i + 1:i + 2] == ["of"]):
            a, b = before(i), after(i)
            if a is None or b is None:
                raise CaptionError(f"{text!r}: {w!r} needs a shape on either side ('a circle {w} a square')")
            put(a, "position", value)
            put(b, "position", OPPOSITE[value])
        elif kind == "position":
            put(before(i) if before(i) is not None else 0, "position", value)
    return Scene(background, tuple(Obj(**o) for o in objs))


# ---- evaluation prompts ----------------------------------------------------------------------------------

def evaluation_prompts(split: str, per_combination: int = 2, seed: int = 0) -> list[tuple[str, Scene]]:
    """Fully specified prompts and their scenes. 'held_out': per_combination prompts for every held-out
    combination, each containing that one combination and no other; 'seen': as many scenes with no held-out
    combination, with the same mix of one- and two-object scenes; 'new_shapes': one-object scenes of
    NEW_SHAPES, as many as the one-object prompts of the others."""
    if split not in ("seen", "held_out", "new_shapes"):
        raise ValueError(f"split must be 'seen', 'held_out' or 'new_shapes', not {split!r}")
    rng = np.random.default_rng([seed, {"seen": 1, "held_out": 2, "new_shapes": 3}[split]])
    if split == "new_shapes":   # one object of a shape the dataset never shows (the LoRA example's word)
        n = (len(HELD_OUT.colour_shape) + len(HELD_OUT.colour_background)) * per_combination
        return [(describe(s), s) for s in (random_scene(rng, 1, shapes=NEW_SHAPES) for _ in range(n))]
    singles = (len(HELD_OUT.colour_shape) + len(HELD_OUT.colour_background)) * per_combination
    pairs = len(HELD_OUT.shape_pairs) * per_combination
    if split == "seen":
        scenes = [random_scene(rng, 1) for _ in range(singles)] + [random_scene(rng, 2) for _ in range(pairs)]
    else:
        wanted = ([(1, f"colour x shape: {c} {s}") for c, s in sorted(HELD_OUT.colour_shape)]
                  + [(1, f"colour x background: {c} on {b}") for c, b in sorted(HELD_OUT.colour_background)]
                  + [(2, f"shape pair: {' + '.join(sorted(p))}") for p in sorted(map(sorted, HELD_OUT.shape_pairs))])
        scenes = [random_scene(rng, n, accept=lambda s, r=reason: held_out_reasons(s) == [r])
                  for n, reason in wanted for _ in range(per_combination)]
    return [(describe(s), s) for s in scenes]


# ---- the dataset folder ----------------------------------------------------------------------------------

def training_sample(index: int, seed: int = 0, shapes: tuple[str, ...] = SHAPES) -> tuple[Scene, Scene, str]:
    """Sample `index` of the dataset of `seed`: (scene, what its caption names, caption). Each sample has its
    own generator, so a dataset of N samples is the first N of any larger one. `shapes`: the shapes objects
    are drawn from (("heart",): the new word a LoRA teaches)."""
    rng = np.random.default_rng([seed, 0, index])
    scene = random_scene(rng, shapes=shapes)
    named = named_attributes(scene, rng)
    return scene, named, write_caption(named, rng)


def full_caption(index: int, seed: int = 0, scene: Scene | None = None) -> str:
    """Sample `index`'s scene in a caption that names everything (a template drawn as for any caption): what
    the transformer reads first, before the captions that leave attributes out (DemoOptions.full_caption_steps).
    `scene`: that sample's scene when the caller has it already (else drawn again)."""
    scene = scene or training_sample(index, seed)[0]
    rng = np.random.default_rng([seed, 1, index])
    return write_caption(named_attributes(scene, rng, drop=0, drop_shape=0), rng)


def one_object_samples(count: int, seed: int) -> list[tuple[Scene, Scene, str]]:
    """The first `count` one-object samples of dataset `seed` (training_sample's triples), for the probes."""
    samples, index = [], 0
    while len(samples) < count:
        sample = training_sample(index, seed)
        index += 1
        if len(sample[0].objects) == 1:
            samples.append(sample)
    return samples


def make_sample(index: int, seed: int = 0, size: int = 128,
                shapes: tuple[str, ...] = SHAPES) -> tuple[Image.Image, str, dict]:
    """(image, caption, sidecar) of training_sample(index, seed, shapes)."""
    scene, named, caption = training_sample(index, seed, shapes)
    sidecar = {"caption": caption, "scene": scene.to_dict(), "named": named.to_dict(), "seed": seed,
               "index": index, "size": size}
    return render(scene, size), caption, sidecar


def write_dataset(out_dir: str | os.PathLike, count: int, size: int = 128, seed: int = 0,
                  progress: Callable[[int], None] | None = None, shapes: tuple[str, ...] = SHAPES) -> Path:
    """OUT_DIR/000000.png + .txt (caption, kohya layout) + .json (ground truth), and dataset.json (vocabulary,
    held-out set, parameters). Written into a temporary folder beside OUT_DIR and renamed at the end, so
    OUT_DIR is complete or absent."""
    out = Path(out_dir)
    if count < 1 or size < 16:
        raise ValueError(f"need --count >= 1 and --size >= 16 (got {count}, {size})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new OUT_DIR or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for i in range(count):
            image, caption, sidecar = make_sample(i, seed, size, shapes)
            image.save(tmp / f"{i:06d}.png")
            (tmp / f"{i:06d}.txt").write_text(caption + "\n", encoding="utf-8")
            (tmp / f"{i:06d}.json").write_text(json.dumps(sidecar, sort_keys=True) + "\n", encoding="utf-8")
            if progress:
                progress(i + 1)
        info = {"count": count, "size": size, "seed": seed, "shapes": shapes, "colours": COLOURS,
                "backgrounds": BACKGROUNDS, "sizes": SIZES, "positions": POSITIONS,
                "held_out": {"colour_shape": sorted(HELD_OUT.colour_shape),
                             "colour_background": sorted(HELD_OUT.colour_background),
                             "shape_pairs": sorted(map(sorted, HELD_OUT.shape_pairs))}}
        (tmp / "dataset.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
