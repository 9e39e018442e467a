"""Procedural shape scenes and single-word questions about them, deterministic by seed.

A scene is a 336x336 RGB picture: a cluttered grey background (low-frequency noise, grey strokes and dots, small grey
glyphs) with 2-6 coloured shapes, each a unique (colour, shape) pair, some small (about two patches across) and some
large. Questions ask about existence, colour, shape, size, counts and left/right/above/below relations, and their
answers follow from the scene's metadata alone (:func:`answer_question`).

Training scenes use seeds below :data:`HELDOUT_BASE`; the held-out split uses seeds from it upwards, so the two never
share a scene.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 336
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 24 -> 576 patches

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 220),
    "yellow": (240, 210, 30),
    "purple": (150, 50, 185),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
QUESTION_TYPES = ("exist", "color", "shape", "size", "count_shape", "count_all", "left", "above", "smallest")

SMALL_RANGE = (18, 26)  # diameter in pixels: under two patches
LARGE_RANGE = (44, 72)
HELDOUT_BASE = 1_000_000_000  # training seeds are below this, held-out seeds at or above it

ANSWERS: tuple[str, ...] = ("yes", "no", *COLORS, *SHAPES, *SIZES, *NUMBERS)
QUESTION_WORDS: tuple[str, ...] = (
    "is",
    "there",
    "a",
    "what",
    "color",
    "shape",
    "the",
    "object",
    "small",
    "or",
    "large",
    "how",
    "many",
    "objects",
    "are",
    "left",
    "of",
    "above",
    "smallest",
    "circles",
    "squares",
    "triangles",
    "crosses",
    "?",
)


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    size: str  # "small" | "large"
    cx: float
    cy: float
    diameter: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def label(self) -> int:
        """1-based class id of (colour, shape); 0 is background."""
        return 1 + list(COLORS).index(self.color) * len(SHAPES) + SHAPES.index(self.shape)


@dataclass
class Scene:
    seed: int
    objects: list[Obj]
    background: int
    glyphs: list[tuple[str, int, int]] = field(default_factory=list)

    def find(self, color: str | None = None, shape: str | None = None) -> list[Obj]:
        return [o for o in self.objects if (color is None or o.color == color) and (shape is None or o.shape == shape)]


NUM_CLASSES = 1 + len(COLORS) * len(SHAPES)  # per-patch classes (background + every colour-shape pair)


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str
    refs: tuple[int, ...] = ()  # Obj.label of the objects whose patches hold the answer (empty: none do)


def make_scene(seed: int, glyphs: bool = True) -> Scene:
    """The scene of `seed` (same seed, same scene)."""
    rng = np.random.default_rng([seed, 7])
    n = int(rng.integers(2, 7))
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    order = rng.permutation(len(pairs))
    objects: list[Obj] = []
    for pi in order:
        if len(objects) == n:
            break
        color, shape = pairs[int(pi)]
        size = "small" if rng.random() < 0.5 else "large"
        lo, hi = SMALL_RANGE if size == "small" else LARGE_RANGE
        d = float(rng.uniform(lo, hi))
        for _ in range(60):
            cx, cy = (float(v) for v in rng.uniform(d / 2 + 4, IMAGE_SIZE - d / 2 - 4, size=2))
            if all(np.hypot(cx - o.cx, cy - o.cy) > (d + o.diameter) / 2 + 10 for o in objects):
                objects.append(Obj(color, shape, size, round(cx, 2), round(cy, 2), round(d, 2)))
                break
    glyph_list: list[tuple[str, int, int]] = []
    if glyphs:
        for _ in range(int(rng.integers(3, 10))):
            ch = str(rng.choice(list(string.ascii_uppercase + string.digits)))
            glyph_list.append((ch, int(rng.integers(0, IMAGE_SIZE - 10)), int(rng.integers(0, IMAGE_SIZE - 12))))
    return Scene(seed=seed, objects=objects, background=int(rng.integers(0, 2**31 - 1)), glyphs=glyph_list)


def _shape_polygon(o: Obj) -> list[tuple[float, float]] | None:
    r = o.diameter / 2
    x, y = o.cx, o.cy
    if o.shape == "triangle":
        return [(x, y - r), (x + r * 0.95, y + r * 0.8), (x - r * 0.95, y + r * 0.8)]
    if o.shape == "cross":
        t = r * 0.36
        return [
            (x - t, y - r),
            (x + t, y - r),
            (x + t, y - t),
            (x + r, y - t),
            (x + r, y + t),
            (x + t, y + t),
            (x + t, y + r),
            (x - t, y + r),
            (x - t, y + t),
            (x - r, y + t),
            (x - r, y - t),
            (x - t, y - t),
        ]
    return None


def _draw_obj(draw: ImageDraw.ImageDraw, o: Obj, fill: int | tuple[int, int, int]) -> None:
    r = o.diameter / 2
    box = (o.cx - r, o.cy - r, o.cx + r, o.cy + r)
    if o.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif o.shape == "square":
        s = r * 0.88
        draw.rectangle((o.cx - s, o.cy - s, o.cx + s, o.cy + s), fill=fill)
    else:
        poly = _shape_polygon(o)
        assert poly is not None
        draw.polygon(poly, fill=fill)


_FONT: ImageFont.FreeTypeFont | ImageFont.ImageFont | None = None


def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.load_default()
    return _FONT


def render(scene: Scene) -> Image.Image:
    """The RGB picture of `scene`."""
    rng = np.random.default_rng(scene.background)
    base = rng.uniform(120, 200)
    low = rng.normal(0, 18, size=(8, 8)).astype(np.float32)
    low_img = Image.fromarray(low).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    grey = base + np.asarray(low_img) + rng.normal(0, 6, size=(IMAGE_SIZE, IMAGE_SIZE))
    tint = rng.uniform(-6, 6, size=3)
    arr = np.clip(grey[..., None] + tint[None, None, :], 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 12))):  # grey strokes
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, IMAGE_SIZE, size=4))
        g = int(rng.integers(60, 230))
        draw.line((x0, y0, x1, y1), fill=(g, g, g), width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(10, 40))):  # grey dots
        x, y = (float(v) for v in rng.uniform(0, IMAGE_SIZE, size=2))
        rr = float(rng.uniform(1, 4))
        g = int(rng.integers(60, 230))
        draw.ellipse((x - rr, y - rr, x + rr, y + rr), fill=(g, g, g))
    for ch, gx, gy in scene.glyphs:
        g = int(rng.integers(30, 90))
        draw.text((gx, gy), ch, fill=(g, g, g), font=_font())
    for o in scene.objects:
        _draw_obj(draw, o, COLORS[o.color])
    return img


def patch_labels(scene: Scene, min_cover: float = 0.12) -> np.ndarray:
    """[576] int64: per patch, the class (Obj.label) of the object covering most of it, 0 for background."""
    best = np.zeros((GRID, GRID), dtype=np.float32)
    labels = np.zeros((GRID, GRID), dtype=np.int64)
    for o in scene.objects:
        mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        _draw_obj(ImageDraw.Draw(mask), o, 255)
        cover = np.asarray(mask, dtype=np.float32).reshape(GRID, PATCH, GRID, PATCH).mean(axis=(1, 3)) / 255.0
        take = (cover >= min_cover) & (cover > best)
        labels[take] = o.label
        best = np.maximum(best, cover)
    return labels.reshape(-1)


def scene_labels(scene: Scene) -> np.ndarray:
    """[2 * (NUM_CLASSES - 1)] float32 multi-hot: which colour-shape pairs are present, and which are present small."""
    out = np.zeros(2 * (NUM_CLASSES - 1), dtype=np.float32)
    for o in scene.objects:
        out[o.label - 1] = 1.0
        if o.size == "small":
            out[NUM_CLASSES - 1 + o.label - 1] = 1.0
    return out


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


_SHAPE_OF_PLURAL = {_plural(s): s for s in SHAPES}


def _pick(rng: np.random.Generator, objs: list[Obj]) -> Obj:
    """Pick an object, small ones twice as likely (they are what pruning loses)."""
    w = np.array([2.0 if o.size == "small" else 1.0 for o in objs])
    return objs[int(rng.choice(len(objs), p=w / w.sum()))]


def _make(kind: str, scene: Scene, rng: np.random.Generator) -> QA | None:
    objs = scene.objects
    if kind == "exist":
        if rng.random() < 0.5:
            o = _pick(rng, objs)
            q = f"is there a {o.name} ?"
        else:
            present = {(o.color, o.shape) for o in objs}
            # absent pairs that share a colour or a shape with a present object are the informative ones
            near = [
                (c, s)
                for c in COLORS
                for s in SHAPES
                if (c, s) not in present and any(c == pc or s == ps for pc, ps in present)
            ]
            if not near:
                return None
            c, s = near[int(rng.integers(len(near)))]
            q = f"is there a {c} {s} ?"
    elif kind == "color":
        uniq = [o for o in objs if len(scene.find(shape=o.shape)) == 1]
        if not uniq:
            return None
        q = f"what color is the {_pick(rng, uniq).shape} ?"
    elif kind == "shape":
        uniq = [o for o in objs if len(scene.find(color=o.color)) == 1]
        if not uniq:
            return None
        q = f"what shape is the {_pick(rng, uniq).color} object ?"
    elif kind == "size":
        q = f"is the {objs[int(rng.integers(len(objs)))].name} small or large ?"
    elif kind == "count_shape":
        q = f"how many {_plural(SHAPES[int(rng.integers(len(SHAPES)))])} are there ?"
    elif kind == "count_all":
        q = "how many objects are there ?"
    elif kind in ("left", "above"):
        if len(objs) < 2:
            return None
        axis = 0 if kind == "left" else 1
        pairs = [
            (a, b)
            for a in objs
            for b in objs
            if a is not b and abs((a.cx, a.cy)[axis] - (b.cx, b.cy)[axis]) > (a.diameter + b.diameter) / 4 + 8
        ]
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        q = f"is the {a.name} left of the {b.name} ?" if kind == "left" else f"is the {a.name} above the {b.name} ?"
    elif kind == "smallest":
        ds = sorted(o.diameter for o in objs)
        if len(ds) < 2 or ds[0] > 0.8 * ds[1]:
            return None
        q = "what color is the smallest object ?"
    else:
        raise ValueError(f"unknown question type {kind!r}")
    return QA(q, answer_question(scene, q), kind, evidence(scene, q))


def answer_question(scene: Scene, question: str) -> str:
    """The answer to `question` computed from the scene metadata alone (raises ValueError if it has none)."""
    w = question.replace("?", "").split()
    if w[:2] == ["is", "there"]:
        return "yes" if scene.find(w[3], w[4]) else "no"
    if w[:3] == ["what", "color", "is"] and w[4] == "smallest":
        return min(scene.objects, key=lambda o: o.diameter).color
    if w[:3] == ["what", "color", "is"]:
        (o,) = scene.find(shape=w[4])
        return o.color
    if w[:3] == ["what", "shape", "is"]:
        (o,) = scene.find(color=w[4])
        return o.shape
    if w[0] == "is" and w[-3:] == ["small", "or", "large"]:
        (o,) = scene.find(w[2], w[3])
        return o.size
    if w[:2] == ["how", "many"]:
        if w[2] == "objects":
            return NUMBERS[len(scene.objects)]
        return NUMBERS[len(scene.find(shape=_SHAPE_OF_PLURAL[w[2]]))]
    if w[0] == "is" and w[4] in ("left", "above"):
        (a,) = scene.find(w[2], w[3])
        rest = w[-2:]
        (b,) = scene.find(rest[0], rest[1])
        if w[4] == "left":
            return "yes" if a.cx < b.cx else "no"
        return "yes" if a.cy < b.cy else "no"
    raise ValueError(f"not a toyworld question: {question!r}")


def evidence(scene: Scene, question: str) -> tuple[int, ...]:
    """Labels of the objects a question is about (the patches an answer must look at); empty if none exist."""
    w = question.replace("?", "").split()
    if w[:2] == ["is", "there"]:
        found = scene.find(w[3], w[4])
    elif w[:3] == ["what", "color", "is"] and w[4] == "smallest":
        found = scene.objects
    elif w[:3] == ["what", "color", "is"]:
        found = scene.find(shape=w[4])
    elif w[:3] == ["what", "shape", "is"]:
        found = scene.find(color=w[4])
    elif w[:2] == ["how", "many"]:
        found = scene.objects if w[2] == "objects" else scene.find(shape=_SHAPE_OF_PLURAL[w[2]])
    elif w[0] == "is" and w[-3:] == ["small", "or", "large"]:
        found = scene.find(w[2], w[3])
    else:
        found = scene.find(w[2], w[3]) + scene.find(w[-2], w[-1])
    return tuple(sorted(o.label for o in found))


def make_questions(scene: Scene, n: int, seed: int | None = None, kinds: tuple[str, ...] = QUESTION_TYPES) -> list[QA]:
    """`n` distinct questions about `scene` (fewer if the scene does not allow that many), deterministic by seed."""
    rng = np.random.default_rng([scene.seed if seed is None else seed, 11])
    out: list[QA] = []
    seen: set[str] = set()
    for _ in range(n * 8):
        if len(out) == n:
            break
        qa = _make(kinds[int(rng.integers(len(kinds)))], scene, rng)
        if qa is not None and qa.question not in seen:
            seen.add(qa.question)
            out.append(qa)
    return out


@dataclass(frozen=True)
class Sample:
    scene: Scene
    qa: QA


def heldout(n: int = 300, base: int = HELDOUT_BASE) -> list[Sample]:
    """The held-out evaluation split: `n` (scene, question) pairs, question types taken in turn, seeds >= base."""
    out: list[Sample] = []
    i = 0
    while len(out) < n:
        scene = make_scene(base + i)
        kind = QUESTION_TYPES[len(out) % len(QUESTION_TYPES)]
        qs = make_questions(scene, 1, seed=base + i, kinds=(kind,))
        if qs:
            out.append(Sample(scene, qs[0]))
        i += 1
    return out


def train_seed(i: int) -> int:
    """Seed of the i-th training scene (always below HELDOUT_BASE)."""
    return i % HELDOUT_BASE
