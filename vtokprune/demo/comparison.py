"""`Comparer`: one question through the unpruned model and each chosen strategy; an `Outcome` per panel."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import CapabilityError, VTokPruneError
from .rendering import PatchGrid, _thumbnail, highlight, model_view, patch_grid, tower_grid

log = logging.getLogger("vtokprune.demo")

DEFAULT_STRATEGIES = ("cls", "fastv", "divprune", "random", "pool")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
UNPRUNED = "none (unpruned)"


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
        from .. import api
        from ..registry import available_strategies, get_strategy

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
            from ..embedded import build_prompt

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
        from .. import api
        from ..registry import get_strategy

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
