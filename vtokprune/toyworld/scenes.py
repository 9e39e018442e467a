"""Procedural shape scenes and one-word questions whose evidence is small and local, deterministic by seed.

A scene is a 224x224 RGB picture (16x16 = 256 patches of 14 px for a ViT-S/14): a plain or softly textured
background with 2-4 small shapes (about 2x2 patches each), every one with its own colour and its own shape. A question
asks the colour of the object of a shape, the shape of the object of a colour, or whether a colour-shape pair is there.
Its evidence is the patches of the object it refers to; for an absent pair ("no") it is every object, since an answer
must rule each one out. Answers and evidence follow from the scene metadata alone.

Splits by seed range, never overlapping: training scenes use seeds below :data:`VAL_BASE`, validation (model
selection) seeds from :data:`VAL_BASE`, the held-out test split seeds from :data:`HELDOUT_BASE`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 224
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 16 -> 256 patches
NUM_PATCHES = GRID * GRID

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 220),
    "yellow": (240, 210, 30),
    "purple": (150, 50, 185),
}
SHAPES = ("circle", "square", "triangle", "cross")
QUESTION_TYPES = ("color", "shape", "exist")
OBJECT_COUNT = (2, 4)  # inclusive
DIAMETER = (24.0, 32.0)  # pixels: about two patches across
VAL_BASE = 500_000_000
HELDOUT_BASE = 1_000_000_000

ANSWERS: tuple[str, ...] = ("yes", "no", *COLORS, *SHAPES)
QUESTION_WORDS: tuple[str, ...] = ("is", "there", "a", "what", "color", "shape", "the", "object", "?")
NUM_CLASSES = 1 + len(COLORS) * len(SHAPES)  # per-patch classes: background + every colour-shape pair


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
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
    background: int  # seed of the background texture

    def find(self, color: str | None = None, shape: str | None = None) -> list[Obj]:
        return [o for o in self.objects if (color is None or o.color == color) and (shape is None or o.shape == shape)]


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str
    refs: tuple[int, ...] = ()  # Obj.label of the objects whose patches hold the evidence


@dataclass(frozen=True)
class Sample:
    scene: Scene
    qa: QA


def make_scene(seed: int) -> Scene:
    """The scene of `seed` (same seed, same scene)."""
    rng = np.random.default_rng([seed, 14])
    n = int(rng.integers(OBJECT_COUNT[0], OBJECT_COUNT[1] + 1))
    colors = [list(COLORS)[i] for i in rng.permutation(len(COLORS))[:n]]
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n]]
    objects: list[Obj] = []
    for color, shape in zip(colors, shapes):
        d = float(rng.uniform(*DIAMETER))
        for _ in range(100):
            cx, cy = (float(v) for v in rng.uniform(d / 2 + 3, IMAGE_SIZE - d / 2 - 3, size=2))
            if all(np.hypot(cx - o.cx, cy - o.cy) > (d + o.diameter) / 2 + 12 for o in objects):
                objects.append(Obj(color, shape, round(cx, 2), round(cy, 2), round(d, 2)))
                break
    return Scene(seed=seed, objects=objects, background=int(rng.integers(0, 2**31 - 1)))


def _draw_obj(draw: ImageDraw.ImageDraw, o: Obj, fill: int | tuple[int, int, int]) -> None:
    r = o.diameter / 2
    x, y = o.cx, o.cy
    if o.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif o.shape == "square":
        s = r * 0.85
        draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=fill)
    else:
        t = r * 0.34
        draw.rectangle((x - t, y - r, x + t, y + r), fill=fill)
        draw.rectangle((x - r, y - t, x + r, y + t), fill=fill)


def render(scene: Scene) -> Image.Image:
    """The RGB picture of `scene`: plain or softly textured grey-ish background, then the objects."""
    rng = np.random.default_rng(scene.background)
    base = rng.uniform(110, 210)
    tint = rng.uniform(-12, 12, size=3)
    grey = np.full((IMAGE_SIZE, IMAGE_SIZE), base, dtype=np.float32)
    if rng.random() < 0.5:  # textured: low-frequency blotches plus grain
        low = rng.normal(0, 14, size=(6, 6)).astype(np.float32)
        grey += np.asarray(Image.fromarray(low).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC))
        grey += rng.normal(0, 5, size=grey.shape).astype(np.float32)
    arr = np.clip(grey[..., None] + tint[None, None, :], 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw_obj(draw, o, COLORS[o.color])
    return img


def object_cover(scene: Scene) -> dict[int, np.ndarray]:
    """Obj.label -> [NUM_PATCHES] float32: the fraction of each patch that object covers."""
    out: dict[int, np.ndarray] = {}
    for o in scene.objects:
        mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        _draw_obj(ImageDraw.Draw(mask), o, 255)
        cover = np.asarray(mask, dtype=np.float32).reshape(GRID, PATCH, GRID, PATCH).mean(axis=(1, 3)) / 255.0
        out[o.label] = cover.reshape(-1)
    return out


def patch_labels(scene: Scene, min_cover: float = 0.1) -> np.ndarray:
    """[NUM_PATCHES] int64: per patch, the label of the object covering most of it (>= min_cover), else 0."""
    covers = object_cover(scene)
    labels = np.zeros(NUM_PATCHES, dtype=np.int64)
    best = np.zeros(NUM_PATCHES, dtype=np.float32)
    for label, cover in covers.items():
        take = (cover >= min_cover) & (cover > best)
        labels[take] = label
        best = np.maximum(best, cover)
    return labels


def evidence_cover(scene: Scene, refs: tuple[int, ...]) -> np.ndarray:
    """[NUM_PATCHES] float32: how much of each patch the evidence objects `refs` cover (0 where none does)."""
    covers = object_cover(scene)
    out = np.zeros(NUM_PATCHES, dtype=np.float32)
    for label in refs:
        out = np.maximum(out, covers[label])
    return out


def answer_question(scene: Scene, question: str) -> str:
    """The answer to `question` computed from the scene metadata alone (raises ValueError if it has none)."""
    w = question.replace("?", "").split()
    if w[:2] == ["is", "there"] and len(w) == 5:
        return "yes" if scene.find(w[3], w[4]) else "no"
    if w[:4] == ["what", "color", "is", "the"] and len(w) == 5:
        (o,) = scene.find(shape=w[4])
        return o.color
    if w[:4] == ["what", "shape", "is", "the"] and len(w) == 6:
        (o,) = scene.find(color=w[4])
        return o.shape
    raise ValueError(f"not a toyworld question: {question!r}")


def evidence(scene: Scene, question: str) -> tuple[int, ...]:
    """Labels of the objects whose patches an answer must look at (every object for an absent pair)."""
    w = question.replace("?", "").split()
    if w[:2] == ["is", "there"]:
        found = scene.find(w[3], w[4]) or scene.objects
    elif w[1] == "color":
        found = scene.find(shape=w[4])
    else:
        found = scene.find(color=w[4])
    return tuple(sorted(o.label for o in found))


def _make(kind: str, scene: Scene, rng: np.random.Generator) -> QA | None:
    objs = scene.objects
    if kind == "color":
        q = f"what color is the {objs[int(rng.integers(len(objs)))].shape} ?"
    elif kind == "shape":
        q = f"what shape is the {objs[int(rng.integers(len(objs)))].color} object ?"
    elif kind == "exist":
        if rng.random() < 0.5:
            q = f"is there a {objs[int(rng.integers(len(objs)))].name} ?"
        else:  # absent pairs sharing a colour or a shape with a present object: the informative "no"s
            present = {(o.color, o.shape) for o in objs}
            near = [
                (c, s)
                for c in COLORS
                for s in SHAPES
                if (c, s) not in present and any(c == pc or s == ps for pc, ps in present)
            ]
            c, s = near[int(rng.integers(len(near)))]
            q = f"is there a {c} {s} ?"
    else:
        raise ValueError(f"unknown question type {kind!r}; known: {QUESTION_TYPES}")
    return QA(q, answer_question(scene, q), kind, evidence(scene, q))


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


def split(n: int, base: int) -> list[Sample]:
    """`n` (scene, question) pairs from seeds `base`, `base + 1`, ..., question types taken in turn."""
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


def heldout(n: int = 600, base: int = HELDOUT_BASE) -> list[Sample]:
    """The held-out test split (seeds >= HELDOUT_BASE): never used for training or model selection."""
    return split(n, base)


def validation(n: int = 600) -> list[Sample]:
    """The validation split (seeds from VAL_BASE): model selection and early stopping only."""
    return split(n, VAL_BASE)


def train_seed(i: int) -> int:
    """Seed of the i-th training scene (always below VAL_BASE)."""
    return i % VAL_BASE
