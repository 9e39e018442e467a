"""Token index -> patch cell geometry, the model's view of the picture with pruned patches dimmed, and the HTML
cards the app shows (everything the user typed or the model said is escaped)."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from .comparison import Outcome

DISPLAY = 224  # pixels across each panel's picture
DIM = 0.72  # how much pruned patches are darkened (0 = not at all, 1 = black)


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
    from ..lmms.tasks.vtokprune_toy.utils import exact_match

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
