"""`vtokprune demo`: a Gradio app comparing what each strategy keeps, side by side with the unpruned model.

The parts that need no browser (input checks, the token -> patch-cell geometry, highlighting, running the strategies)
are plain functions here, tested without Gradio; `build_app` and `main` import Gradio only when called
(`pip install 'vtokprune[demo]'`).

Token index -> patch cell: a single-grid vision tower (LLaVA's CLIP) sees one square crop of the picture, cut into
rows x cols patches, and its token t is the patch at row t // cols, column t % cols. The crop is found from the
processor's own settings (pad to square, resize the shortest edge, centre crop), so the highlighted cells sit on the
part of the uploaded picture the model actually looked at.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import ipaddress
import logging
import math
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import CapabilityError, VTokPruneError

log = logging.getLogger("vtokprune.demo")

MAX_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 20_000_000
MAX_ASPECT = 20  # long side / short side: a 1x100000 "picture" is not one
MAX_QUESTION_CHARS = 500
DISPLAY = 224  # pixels across each panel's picture
DIM = 0.72  # how much pruned patches are darkened (0 = not at all, 1 = black)
DEFAULT_STRATEGIES = ("cls", "fastv", "divprune", "random", "pool")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
UNPRUNED = "none (unpruned)"
# Headless Chromium for the screenshot script and the browser test: Debian's build, no network side traffic.
CHROMIUM = os.environ.get("VTOKPRUNE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class DemoInputError(VTokPruneError, ValueError):
    """An upload or question the demo cannot take; the message is shown to the user as is."""


# ---------------------------------------------------------------------------------------------------------- inputs


def load_upload(path: str | os.PathLike[str] | None) -> Image.Image:
    """The uploaded picture as RGB, or DemoInputError with a message for the user (size is checked before decoding)."""
    if path is None or str(path) == "":
        raise DemoInputError("Upload an image (PNG, JPEG, WebP, ...) or pick one of the examples.")
    try:
        size = os.path.getsize(path)
    except OSError:
        raise DemoInputError("The upload could not be read; please upload the image again.") from None
    if size > MAX_BYTES:
        raise DemoInputError(f"The file is {size / 2**20:.1f} MB; the demo takes images of up to 20 MB.")
    if size == 0:
        raise DemoInputError("The file is empty; please upload an image.")
    not_image = "This file is not an image the demo can read; upload a PNG, JPEG, WebP, GIF or BMP picture."
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size  # read from the header; nothing is decoded yet
                if w * h > MAX_PIXELS:
                    raise DemoInputError(
                        f"The image is {w}x{h} pixels ({w * h / 1e6:.1f} MP); the demo takes images of up to 20 MP."
                    )
                if w == 0 or h == 0:
                    raise DemoInputError(not_image)
                if max(w, h) > MAX_ASPECT * min(w, h):
                    raise DemoInputError(
                        f"The image is {w}x{h} pixels; the demo takes pictures whose long side is at most "
                        f"{MAX_ASPECT} times the short side."
                    )
                strict = ImageFile.LOAD_TRUNCATED_IMAGES
                ImageFile.LOAD_TRUNCATED_IMAGES = False  # other libraries (lmms-eval) turn this on process-wide
                try:
                    img.load()
                finally:
                    ImageFile.LOAD_TRUNCATED_IMAGES = strict
                picture = ImageOps.exif_transpose(img) or img
                return picture.convert("RGB")
    except Image.DecompressionBombError:
        raise DemoInputError("The image has far too many pixels; the demo takes images of up to 20 MP.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        if isinstance(e, DemoInputError):
            raise
        raise DemoInputError(not_image) from None


def check_question(question: str | None) -> str:
    q = (question or "").strip()
    if not q:
        raise DemoInputError("Type a question about the image.")
    if len(q) > MAX_QUESTION_CHARS:
        raise DemoInputError(f"The question is {len(q)} characters long; keep it under {MAX_QUESTION_CHARS}.")
    return q


# -------------------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class PatchGrid:
    """The region of the original picture the vision tower saw, cut into rows x cols patches in raster order.

    box: (left, top, right, bottom) in the original picture's pixels; it may reach past the picture's edges when the
    processor pads it to a square first.
    """

    box: tuple[float, float, float, float]
    rows: int
    cols: int

    @property
    def tokens(self) -> int:
        return self.rows * self.cols

    def cell(self, token: int) -> tuple[int, int]:
        """(row, col) of token index `token`."""
        if not 0 <= token < self.tokens:
            raise ValueError(f"token {token} is outside the {self.rows}x{self.cols} patch grid")
        return divmod(int(token), self.cols)


def _field(size: Any, key: str) -> Any:
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def tower_grid(model: Any, processor: Any = None) -> tuple[int, int] | None:
    """(image side the tower sees, patch_size) of a single-grid vision tower, else None. The side is the processor's
    crop when it has one: DINOv2 configs say 518 (their position grid) but are fed 224 px crops."""
    vc = getattr(model.config, "vision_config", None)
    side, patch = getattr(vc, "image_size", None), getattr(vc, "patch_size", None)
    crop = getattr(getattr(processor, "image_processor", None), "crop_size", None)
    height = crop.get("height") if isinstance(crop, dict) else getattr(crop, "height", None)
    width = crop.get("width") if isinstance(crop, dict) else getattr(crop, "width", None)
    if isinstance(height, int) and height == width:
        side = height
    if isinstance(side, (list, tuple)):
        side = side[0]
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    if not isinstance(side, int) or not isinstance(patch, int) or patch <= 0:
        return None
    return side, patch


def patch_grid(picture_size: tuple[int, int], side: int, patch: int, image_processor: Any = None) -> PatchGrid:
    """Where the `side`/`patch` vision tower's patches fall on a picture of `picture_size` (width, height).

    Follows the image processor's steps: optional pad to a square (LLaVA's `do_pad`), resize (shortest edge to N, or
    to a fixed height x width), centre crop. With no processor, the demo's own preprocessing is assumed: shortest edge
    to `side`, centre crop `side` x `side`.
    """
    w, h = (float(v) for v in picture_size)
    left, top, right, bottom = 0.0, 0.0, w, h
    n = side // patch
    if image_processor is None:
        resize_short: float | None = side
        fixed: tuple[float, float] | None = None
        crop: tuple[float, float] | None = (side, side)
    else:
        if getattr(image_processor, "do_pad", False):
            s = max(w, h)
            left, top = (w - s) / 2, (h - s) / 2
            right, bottom = left + s, top + s
        size = getattr(image_processor, "size", None)
        resize_short, fixed = None, None
        if getattr(image_processor, "do_resize", True) and size is not None:
            if _field(size, "shortest_edge"):
                resize_short = float(_field(size, "shortest_edge"))
            elif _field(size, "height") and _field(size, "width"):
                fixed = (float(_field(size, "height")), float(_field(size, "width")))
        crop_size = getattr(image_processor, "crop_size", None)
        crop = None
        if getattr(image_processor, "do_center_crop", False) and _field(crop_size, "height"):
            crop = (float(_field(crop_size, "height")), float(_field(crop_size, "width")))
    bw, bh = right - left, bottom - top
    # scale from box pixels to processed pixels, per axis
    if fixed is not None:
        sx, sy = fixed[1] / bw, fixed[0] / bh
    elif resize_short is not None:
        sx = sy = resize_short / min(bw, bh)
    else:
        sx = sy = 1.0
    if crop is not None:
        ch, cw = crop
        rw, rh = bw * sx, bh * sy
        cl, ct = max(0.0, (rw - cw) / 2), max(0.0, (rh - ch) / 2)
        left, top = left + cl / sx, top + ct / sy
        right, bottom = left + min(cw, rw) / sx, top + min(ch, rh) / sy
    return PatchGrid((left, top, right, bottom), n, n)


def model_view(picture: Image.Image, grid: PatchGrid, width: int = DISPLAY) -> Image.Image:
    """The part of `picture` the model saw, `width` pixels wide (outside the picture, i.e. padding: grey)."""
    left, top, right, bottom = grid.box
    bw, bh = max(right - left, 1e-6), max(bottom - top, 1e-6)
    height = max(1, round(width * bh / bw))
    f = min(1.0, 2 * width / bw)  # shrink first, so padding a huge picture never builds a huge canvas
    small = (
        picture
        if f == 1.0
        else picture.resize(
            (max(1, round(picture.width * f)), max(1, round(picture.height * f))), Image.Resampling.LANCZOS
        )
    )
    canvas = Image.new("RGB", (max(1, math.ceil(bw * f)), max(1, math.ceil(bh * f))), (124, 116, 104))
    canvas.paste(small.convert("RGB"), (round(-left * f), round(-top * f)))
    return canvas.resize((width, height), Image.Resampling.LANCZOS, box=(0, 0, bw * f, bh * f))


def highlight(
    view: Image.Image, kept: Sequence[int] | torch.Tensor | None, rows: int, cols: int, dim: float = DIM
) -> Image.Image:
    """`view` with the patches whose token index is not in `kept` darkened by `dim`; kept=None keeps everything.

    Token t is the patch at row t // cols, column t % cols of the rows x cols grid laid over `view`.
    """
    if kept is None:
        return view.copy()
    idx = [int(t) for t in (kept.tolist() if isinstance(kept, torch.Tensor) else kept)]
    total = rows * cols
    bad = [t for t in idx if not 0 <= t < total]
    if bad:
        raise ValueError(f"kept token indices {bad[:5]} are outside the {rows}x{cols} patch grid")
    flat = np.zeros(total, dtype=bool)
    flat[idx] = True
    keep_cells = flat.reshape(rows, cols)
    w, h = view.size
    ys = (np.arange(h) * rows // h).clip(0, rows - 1)
    xs = (np.arange(w) * cols // w).clip(0, cols - 1)
    kept_px = keep_cells[ys[:, None], xs[None, :]]
    arr = np.asarray(view.convert("RGB"), dtype=np.float32)
    arr = np.where(kept_px[..., None], arr, arr * (1.0 - dim))
    return Image.fromarray(arr.round().clip(0, 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------------------- inference


@dataclass
class Outcome:
    """One panel: a strategy (or the unpruned model) answering the question."""

    name: str
    answer: str = ""
    kept: int | None = None
    available: int | None = None
    latency_ms: float | None = None
    picture: Image.Image | None = None
    error: str | None = None
    note: str | None = None


def tiny_pixels(picture: Image.Image, side: int) -> torch.Tensor:
    """[1, 3, side, side] CLIP-normalised pixels: shortest edge to `side`, centre crop (for models with no processor)."""
    w, h = picture.size
    scale = side / min(w, h)
    rw, rh = max(side, round(w * scale)), max(side, round(h * scale))
    resized = picture.convert("RGB").resize((rw, rh), Image.Resampling.BICUBIC)
    left, top = (rw - side) // 2, (rh - side) // 2
    crop = resized.crop((left, top, left + side, top + side))
    arr = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((arr - mean) / std)[None]


def text_ids(question: str, vocab: int, first: int = 5, limit: int = 64) -> list[int]:
    """A stand-in tokenizer for models with no processor: one id in [first, vocab) per UTF-8 byte of the question."""
    return [first + b % (vocab - first) for b in question.encode("utf-8")[:limit]]


class Comparer:
    """Runs one question through the unpruned model and each chosen strategy, one request at a time."""

    def __init__(self, model: Any, processor: Any, description: str, max_new_tokens: int = 16) -> None:
        self.model = model
        self.processor = processor
        self.description = description
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()
        self.tower = tower_grid(model, processor)
        self.tokens = self._image_tokens()
        self.usable, self.skipped = self._probe_strategies()

    def _image_tokens(self) -> int | None:
        if self.tower is None:
            return None
        side, patch = self.tower
        return (side // patch) ** 2

    def _probe_strategies(self) -> tuple[list[str], dict[str, str]]:
        from . import api
        from .registry import available_strategies, get_strategy

        usable, skipped = [], {}
        for name in available_strategies():
            if name == "none":
                continue
            try:
                api.apply(self.model, get_strategy(name, keep=1))
            except CapabilityError as e:
                skipped[name] = str(e)
                continue
            except Exception as e:  # a strategy that cannot even be set up here is not offered
                skipped[name] = f"{type(e).__name__}: {e}"
                continue
            api.remove(self.model)
            usable.append(name)
        return usable, skipped

    @property
    def default_strategies(self) -> list[str]:
        chosen = [s for s in DEFAULT_STRATEGIES if s in self.usable]
        return chosen or self.usable[:4]

    @property
    def default_keep(self) -> int:
        n = self.tokens or 64
        return max(min(4, n), round(n * 64 / 576))

    def inputs(self, picture: Image.Image, question: str) -> dict[str, Any]:
        model = self.model
        if self.processor is None:
            if self.tower is None:
                raise VTokPruneError("this model has neither a processor nor a single-grid vision tower to feed")
            side, _ = self.tower
            assert self.tokens is not None
            image_id = int(model.config.image_token_id)
            vocab = int(model.config.text_config.vocab_size)
            bos = getattr(model.config.text_config, "bos_token_id", None)
            ids = ([bos] if bos is not None else []) + [image_id] * self.tokens + text_ids(question, vocab)
            inputs: dict[str, Any] = {
                "input_ids": torch.tensor([ids]),
                "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                "pixel_values": tiny_pixels(picture, side),
            }
        else:
            from .embedded import build_prompt

            inputs = dict(
                self.processor(images=picture, text=build_prompt(self.processor, question), return_tensors="pt")
            )
        device = getattr(model, "device", torch.device("cpu"))
        out = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(device)
                if v.is_floating_point():
                    v = v.to(model.dtype)
            out[k] = v
        return out

    def grid_for(self, picture: Image.Image, inputs: dict[str, Any], available: int | None) -> PatchGrid | None:
        """The patch grid of this picture, or None when the tokens do not form one grid over one crop."""
        thw = inputs.get("image_grid_thw")
        if thw is not None and len(thw) == 1:  # Qwen2-VL style: the whole picture, merged patches in raster order
            t, gh, gw = (int(v) for v in thw[0].tolist())
            merge = int(getattr(self.model.config.vision_config, "spatial_merge_size", 1) or 1)
            w, h = picture.size
            if t == 1 and (gh // merge) * (gw // merge) == available:
                return PatchGrid((0.0, 0.0, float(w), float(h)), gh // merge, gw // merge)
            return None
        if self.tower is None:
            return None
        side, patch = self.tower
        ip = getattr(self.processor, "image_processor", None) if self.processor is not None else None
        grid = patch_grid(picture.size, side, patch, ip)
        if available is not None and grid.tokens != available:
            return None
        return grid

    def _generate(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, float]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        if self.processor is None:
            kwargs["suppress_tokens"] = [int(self.model.config.image_token_id)]
            kwargs["min_new_tokens"] = self.max_new_tokens
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        return out[:, inputs["input_ids"].shape[1] :], (time.perf_counter() - start) * 1e3

    def _answer(self, new: torch.Tensor) -> str:
        if self.processor is None:
            return "token ids: " + " ".join(str(t) for t in new[0].tolist())
        decode = getattr(self.processor, "batch_decode", None) or self.processor.tokenizer.batch_decode
        return str(decode(new, skip_special_tokens=True)[0]).strip() or "(empty answer)"

    def warmup(self) -> None:
        """One tiny generation, so the first request's latencies are not inflated by lazy initialisation."""
        picture = Image.new("RGB", (64, 64), (128, 128, 128))
        with self.lock:
            saved = self.max_new_tokens
            self.max_new_tokens = 1
            try:
                self._generate(self.inputs(picture, "warm up"))
            finally:
                self.max_new_tokens = saved

    def compare(self, picture: Image.Image, question: str, names: Sequence[str], keep: int) -> list[Outcome]:
        from . import api
        from .registry import get_strategy

        with self.lock:
            inputs = self.inputs(picture, question)
            new, ms = self._generate(inputs)
            grid = self.grid_for(picture, inputs, self.tokens)
            view = model_view(picture, grid) if grid is not None else _thumbnail(picture)
            outcomes = [Outcome(UNPRUNED, self._answer(new), self.tokens, self.tokens, ms, view)]
            for name in names:
                outcome = Outcome(name)
                try:
                    strategy = get_strategy(name, keep=int(keep))
                    with api.pruned(self.model, strategy):
                        new, ms = self._generate(inputs)
                        sel = api.last_selection(self.model)
                except VTokPruneError as e:
                    outcome.error = str(e)
                    outcomes.append(outcome)
                    continue
                except Exception as e:  # one strategy failing must not take the others down
                    log.exception("strategy %s failed", name)
                    outcome.error = f"{type(e).__name__}: {e}"
                    outcomes.append(outcome)
                    continue
                outcome.answer, outcome.latency_ms = self._answer(new), ms
                if sel is not None and sel.kept:
                    outcome.kept, outcome.available = int(sel.kept[0].numel()), int(sel.available[0])
                    grid = self.grid_for(picture, inputs, outcome.available)
                    if grid is not None:
                        outcome.picture = highlight(model_view(picture, grid), sel.kept[0], grid.rows, grid.cols)
                    else:
                        outcome.picture = _thumbnail(picture)
                        outcome.note = "this model's image tokens do not form one patch grid; no highlighting"
                    if getattr(sel, "layer", None) is not None:
                        outcome.note = f"dropped inside the LLM at decoder layer {sel.layer}"
                outcomes.append(outcome)
            return outcomes


def _thumbnail(picture: Image.Image) -> Image.Image:
    out = picture.copy()
    out.thumbnail((DISPLAY, DISPLAY))
    return out


# --------------------------------------------------------------------------------------------------------- render


def _data_uri(picture: Image.Image) -> str:
    buf = io.BytesIO()
    picture.convert("RGB").save(buf, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CARD = (
    "flex:0 0 {w}px;border:1px solid #d0d4dc;border-radius:10px;padding:8px;background:#fff;"
    "font-family:system-ui,sans-serif;color:#1f2430;box-shadow:0 1px 3px rgba(0,0,0,.08)"
)


def is_right(answer: str, expected: str) -> bool:
    """The toy world's scoring: the answer's words, lower-cased and without punctuation, equal the expected ones."""
    from .lmms.tasks.vtokprune_toy.utils import exact_match

    return bool(exact_match(answer, expected))


def render_results(outcomes: Sequence[Outcome], question: str, expected: str | None = None) -> str:
    """HTML cards, one per outcome, side by side (everything the user typed or the model said is escaped).
    `expected`: the scene's right answer when known (the examples): each answer is marked right or wrong."""
    cards = []
    for o in outcomes:
        name = html.escape(o.name)
        parts = [
            f'<div class="vtp-card" data-strategy="{html.escape(o.name, quote=True)}" style="{_CARD.format(w=DISPLAY + 18)}">'
        ]
        parts.append(f'<div class="vtp-name" style="font-weight:700;font-size:15px;margin-bottom:6px">{name}</div>')
        if o.picture is not None:
            parts.append(
                f'<img class="vtp-picture" alt="tokens kept by {name}" src="{_data_uri(o.picture)}" '
                f'style="width:{DISPLAY}px;display:block;border-radius:6px;image-rendering:auto"/>'
            )
        if o.error is not None:
            parts.append(
                f'<div class="vtp-error" style="color:#a3271f;margin-top:6px;font-size:13px">'
                f"not run: {html.escape(o.error)}</div>"
            )
        else:
            kept = "-" if o.kept is None else f"{o.kept}/{o.available}"
            ms = "-" if o.latency_ms is None else f"{o.latency_ms:.0f} ms"
            mark = ""
            if expected is not None:
                right = is_right(o.answer, expected)
                colour = "#1a7f37" if right else "#a3271f"
                mark = f' <span class="vtp-mark" style="color:{colour};font-weight:700">{"right" if right else "wrong"}</span>'
            parts.append(
                f'<div class="vtp-answer" style="margin-top:6px;font-size:14px;word-break:break-word">'
                f"<b>Answer:</b> {html.escape(o.answer)}{mark}</div>"
            )
            parts.append(
                f'<div class="vtp-stats" style="margin-top:4px;font-size:13px;color:#4a5160">'
                f'kept <span class="vtp-kept">{kept}</span> tokens &middot; '
                f'<span class="vtp-latency">{ms}</span></div>'
            )
            if o.note:
                parts.append(f'<div class="vtp-note" style="font-size:12px;color:#6b7280">{html.escape(o.note)}</div>')
        parts.append("</div>")
        cards.append("".join(parts))
    head = (
        f'<div class="vtp-question" style="font-family:system-ui,sans-serif;margin:4px 0 10px;color:#1f2430">'
        f"<b>Question:</b> {html.escape(question)}"
        + (
            f' <span class="vtp-expected">(right answer: <b>{html.escape(expected)}</b>)</span>'
            if expected is not None
            else ""
        )
        + ' <span style="color:#6b7280">&mdash; dimmed patches were pruned</span></div>'
    )
    return (
        f'<div class="vtp-results">{head}<div style="display:flex;flex-wrap:wrap;gap:12px">{"".join(cards)}</div></div>'
    )


# ------------------------------------------------------------------------------------------------------- examples


def example_images(folder: str | os.PathLike[str]) -> list[tuple[str, str, str | None]]:
    """(image path, question, right answer or None) written into `folder`: toy-world scenes when available (their
    answers are known), else a drawn picture."""
    os.makedirs(folder, exist_ok=True)
    out: list[tuple[str, str, str | None]] = []
    try:
        from .toyworld import make_questions, make_scene, render

        for seed in (1001, 1002, 1003):
            scene = make_scene(seed)
            qs = make_questions(scene, 1)
            path = os.path.join(folder, f"scene-{seed}.png")
            render(scene).save(path)
            out.append((path, qs[0].question, qs[0].answer) if qs else (path, "What is in the image?", None))
    except Exception:  # the toy world is optional; fall back to a simple drawing
        from PIL import ImageDraw

        img = Image.new("RGB", (336, 336), (236, 232, 220))
        draw = ImageDraw.Draw(img)
        draw.ellipse((40, 50, 150, 160), fill=(200, 40, 40))
        draw.rectangle((190, 180, 300, 290), fill=(40, 90, 200))
        path = os.path.join(folder, "shapes.png")
        img.save(path)
        out.append((path, "What shapes are in the image?", None))
    return out


# ------------------------------------------------------------------------------------------------------------- app


FAILED = "⚠️ Something went wrong while running the model; the details are in the server's log."


def _handle_upload(path: str | None) -> tuple[Any, str]:
    """The upload's checks run as soon as it arrives: a refused picture is removed from the widget and the reason
    shown right under it. Returns (the widget's new value, the message)."""
    if not path:
        return None, ""
    try:
        load_upload(path)
    except DemoInputError as e:
        return None, f"⚠️ {e}"
    return path, ""


def _raw_upload_path(payload: Any) -> str | None:
    return None if payload is None or getattr(payload, "path", None) is None else str(payload.path)


def _expected_answer(examples: Sequence[tuple[str, str, str | None]], path: str | None, question: str) -> str | None:
    """The right answer when the picture and question are one of the examples (Gradio keeps the file's name)."""
    name = os.path.basename(str(path or ""))
    for example_path, example_question, answer in examples:
        if name == os.path.basename(example_path) and question.strip() == example_question.strip():
            return answer
    return None


def answer_request(
    comparer: Comparer,
    examples: Sequence[tuple[str, str, str | None]],
    path: str | None,
    question: str | None,
    names: list[str] | None,
    keep: float | None,
) -> tuple[str, str]:
    """(results HTML, status message) for one click of Compare; never raw exception text (show_error=False)."""
    tokens = comparer.tokens or 576
    try:
        picture = load_upload(path)
        q = check_question(question)
        chosen = [n for n in (names or []) if n in comparer.usable]
        if keep is None or not 1 <= int(keep) <= tokens:
            raise DemoInputError(f"Choose a budget between 1 and {tokens} tokens.")
        outcomes = comparer.compare(picture, q, chosen, int(keep))
    except DemoInputError as e:
        return "", f"⚠️ {e}"
    except Exception:  # the user sees a clean message; the traceback goes to the server's log
        log.exception("demo request failed")
        return "", FAILED
    note = "" if chosen else "No strategy chosen: showing the unpruned model only."
    return render_results(outcomes, q, _expected_answer(examples, path, q)), note


def build_app(comparer: Comparer, examples_dir: str | None = None) -> Any:
    """The Gradio Blocks app around `comparer` (not launched)."""
    import gradio as gr

    tokens = comparer.tokens or 576
    examples = example_images(examples_dir or tempfile.mkdtemp(prefix="vtokprune-demo-"))

    def run(path: str | None, question: str | None, names: list[str] | None, keep: float | None) -> tuple[str, str]:
        return answer_request(comparer, examples, path, question, names, keep)

    skipped = "".join(f"\n- `{name}`: {html.escape(reason)}" for name, reason in sorted(comparer.skipped.items()))
    with gr.Blocks(title="vtokprune demo", analytics_enabled=False) as app:
        gr.Markdown(
            "## vtokprune: which visual tokens does each strategy keep?\n"
            f"Model: **{html.escape(comparer.description)}** ({tokens} visual tokens per image). "
            "Upload a picture or pick an example, ask a question, and compare the answers, kept tokens and latency of "
            "each pruning strategy with the unpruned model. Pruned patches are dimmed."
        )
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                upload = gr.Image(
                    label="Image (PNG, JPEG, WebP; up to 20 MB and 20 MP)",
                    type="filepath",
                    sources=["upload", "clipboard"],
                    height=240,
                    elem_id="vtp-upload",
                )
                # Gradio would open the upload with PIL first; hand over the file untouched instead, so that every
                # check in `load_upload` runs, with its message, before anything is decoded. (An instance attribute:
                # subclassing a Gradio component makes Gradio write a .pyi stub beside this module.)
                upload.preprocess = _raw_upload_path  # type: ignore[method-assign]
                upload_note = gr.Markdown(elem_id="vtp-upload-note")
                question = gr.Textbox(label="Question", placeholder="What is in the image?", elem_id="vtp-question")
                strategies = gr.CheckboxGroup(
                    choices=comparer.usable,
                    value=comparer.default_strategies,
                    label="Strategies",
                    elem_id="vtp-strategies",
                )
                keep = gr.Slider(
                    1,
                    tokens,
                    value=comparer.default_keep,
                    step=1,
                    label=f"Budget: visual tokens kept per image (of {tokens})",
                    elem_id="vtp-keep",
                )
                button = gr.Button("Compare", variant="primary", elem_id="vtp-run")
                status = gr.Markdown(elem_id="vtp-status")  # under the button the user just pressed
                gr.Examples(
                    examples=[[p, q] for p, q, _ in examples],
                    inputs=[upload, question],
                    label="Examples (right answer in brackets)",
                    example_labels=[f"{os.path.basename(p)}: {q}" + (f" ({a})" if a else "") for p, q, a in examples],
                )
                if skipped:
                    with gr.Accordion("Strategies this model cannot run", open=False):
                        gr.Markdown(skipped)
            with gr.Column(scale=3):
                results = gr.HTML(elem_id="vtp-results")
        upload.upload(_handle_upload, inputs=upload, outputs=[upload, upload_note])  # user uploads, not examples
        upload.clear(lambda: "", outputs=upload_note)
        for event in (button.click, question.submit):
            event(run, inputs=[upload, question, strategies, keep], outputs=[results, status], concurrency_limit=1)
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vtokprune demo", description="Gradio demo: compare pruning strategies side by side."
    )
    p.add_argument("--model", default=None, help="HF model id or local path (default: the embedded model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-new-tokens", type=int, default=16)
    return p


def launch(comparer: Comparer, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> Any:
    """Build and launch the app; with block=False it serves from a background thread and the app is returned."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(comparer)
    app.queue(default_concurrency_limit=1)
    app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        show_error=False,
        ssr_mode=False,
        max_file_size=4 * MAX_BYTES,
        quiet=not block,
    )
    return app


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("vtokprune demo needs Gradio: pip install 'vtokprune[demo]'")
        return 2
    from .cli import load_model

    if not _is_loopback(args.host):
        print(f"note: binding {args.host}: the demo will be reachable from other machines")
    model, processor, description = load_model(args.model)
    comparer = Comparer(model, processor, description, max_new_tokens=args.max_new_tokens)
    comparer.warmup()
    print(f"model: {description}; strategies: {', '.join(comparer.usable)}")
    launch(comparer, args.host, args.port, block=True)
    return 0
