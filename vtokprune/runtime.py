"""Per-model pruning state, per-call context, and the decoder-layer hooks that drop tokens inside the LLM.

State that outlives one forward call (what was pruned, needed to decode against a shortened KV cache) is keyed by the
cache object itself, so concurrent generations never see each other's state. State of one call lives in a ContextVar,
so two threads running the same wrapped model stay apart.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from . import kernels
from .compaction import Compaction, contiguous_stage_cols, remap_mask
from .errors import PruningStateError
from .probe import attention_rows
from .strategies.base import LLMContext, LLMStrategy, Strategy


@dataclass
class Selection:
    """Which visual tokens were kept in the last call, per image, as indices into that image's token sequence.

    kept[i]:     LongTensor of kept token indices (ascending) for image i of the batch (images in prompt order).
    available[i]: number of visual tokens image i had.
    sample_of[i]: batch row image i belongs to.
    layer:       None for pre-LLM strategies; for in-LLM strategies the decoder layer of the last stage.
    """

    kept: list[torch.Tensor]
    available: list[int]
    sample_of: list[int]
    layer: int | None = None
    stages: dict[int, list[torch.Tensor]] = field(default_factory=dict)


@dataclass
class StageRecord:
    layer: int
    comp: Compaction  # into the language-model-level sequence


@dataclass
class CacheRecord:
    """How the sequence behind a KV cache was shortened at prefill, to decode against it."""

    outer: Compaction | None  # pre-LLM: compact sequence -> caller's sequence
    outer_len: int  # caller's prefill length (unpruned)
    lm_len: int  # language-model-level prefill length
    stages: list[StageRecord] = field(default_factory=list)
    contiguous: bool = False  # pre-LLM: kept tokens were renumbered 0..n-1, so decoding continues from the cache length


class PrunerState:
    """Everything `apply` attaches to a model; `remove` undoes it."""

    def __init__(self, strategy: Strategy, adapter: Any) -> None:
        self.strategy = strategy
        self.adapter = adapter
        self.handles: list[Any] = []
        self.records: weakref.WeakKeyDictionary[Any, CacheRecord] = weakref.WeakKeyDictionary()
        self.lock = threading.Lock()
        self._local = threading.local()
        self.calls: Counter[str] = Counter()  # prefill / decode / text_only calls that went through the adapter

    def __reduce__(self) -> Any:
        from .adapters.hooks import COPY_HINT

        raise PruningStateError(f"vtokprune: {COPY_HINT}")

    def __deepcopy__(self, memo: dict) -> Any:
        return self.__reduce__()

    def set_call_compaction(self, comp: Compaction | None) -> None:
        """How the last prefill of this thread shortened the sequence the logits cover (None: not at all)."""
        self._local.compaction = comp

    def call_compaction(self) -> Compaction | None:
        return getattr(self._local, "compaction", None)

    def remember(self, cache: Any, record: CacheRecord) -> None:
        if cache is None:
            return
        with self.lock:
            self.records[cache] = record

    def record_for(self, cache: Any) -> CacheRecord | None:
        if cache is None:
            return None
        with self.lock:
            return self.records.get(cache)

    @property
    def last_selection(self) -> Selection | None:
        return getattr(self._local, "selection", None)

    @last_selection.setter
    def last_selection(self, value: Selection | None) -> None:
        self._local.selection = value


@dataclass
class ForwardRun:
    """The in-LLM side of one language-model forward call."""

    strategy: LLMStrategy
    image_mask: torch.Tensor  # [B, L_lm] visual tokens at LM level
    valid: torch.Tensor  # [B, L_lm] real tokens at LM level
    budgets: dict[int, torch.Tensor]  # stage layer -> [B, M] visual tokens to keep per image (M images at most)
    num_layers: int
    eager: bool
    image_ids: torch.Tensor | None = None  # [B, L_lm] index of the image (within its sample) of each token, else -1
    record: CacheRecord | None = None  # decoding against a pruned cache
    kv_len: int = 0  # LM-level key length of this call (past + new), for decoding
    current: Compaction | None = None
    stage_layer: int | None = None
    pending: dict[int, torch.Tensor] = field(default_factory=dict)
    mask_cache: dict[tuple, Any] = field(default_factory=dict)
    new_stages: list[StageRecord] = field(default_factory=list)
    inputs_embeds: torch.Tensor | None = None  # [B, L_lm, D] the decoder's input, kept for strategies that read it
    contiguous: bool = False  # renumber kept tokens' positions at each stage (positions="contiguous", 1-D RoPE)
    flat_masks: bool = False  # the attention implementation takes [B, L] padding masks (flash attention)

    def context(self, hidden: torch.Tensor | None, layer: int) -> LLMContext:
        comp = self.current
        image = self.image_mask if comp is None else comp.gather(self.image_mask, fill=False)
        valid = self.valid if comp is None else comp.gather(self.valid, fill=False)
        positions = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
        # A row whose attention mask is all zeros has no last token; 0 is as good as any (it has no candidates).
        last = torch.where(valid, positions, torch.full_like(positions, -1)).max(dim=1).values.clamp(min=0)
        return LLMContext(
            image_mask=image & valid,
            valid=valid,
            text_mask=valid & ~image,
            last_index=last,
            layer=layer,
            num_layers=self.num_layers,
            hidden=hidden,
            inputs_embeds=self.inputs_embeds,
            lm_image_mask=self.image_mask & self.valid,
            lm_valid=self.valid,
            cols=comp.cols if comp is not None else positions,
        )


_RUN: ContextVar[ForwardRun | None] = ContextVar("vtokprune_run", default=None)


@contextmanager
def active_run(run: ForwardRun | None) -> Iterator[None]:
    token = _RUN.set(run)
    try:
        yield
    finally:
        _RUN.reset(token)


# ---------------------------------------------------------------- probe: attention rows at the layer before a stage


def make_stage_probe(stage_layer: int):  # type: ignore[no-untyped-def]
    def probe(module, query, key, value, attention_mask, kwargs) -> None:  # type: ignore[no-untyped-def]
        run = _RUN.get()
        if run is None or run.record is not None or stage_layer not in run.budgets:
            return
        if run.stage_layer is not None and run.stage_layer >= stage_layer:
            return  # a stage layer probed for its own scores runs again after pruning: nothing to score then
        ctx = run.context(None, stage_layer - 1)
        if not run.strategy.needs_attention:
            run.pending[stage_layer] = run.strategy.key_scores(key, ctx)
            return
        rows, row_valid = run.strategy.query_rows(ctx)
        probs = attention_rows(query, key, attention_mask, rows, kwargs.get("scaling"), causal=True)
        run.pending[stage_layer] = run.strategy.score(probs, row_valid, ctx)

    return probe


# ---------------------------------------------------------------- decoder-layer pre-hook


def _layer_kwargs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], args[1:], kwargs
    return kwargs.pop("hidden_states"), (), kwargs


def decoder_pre_hook(layer_idx: int):  # type: ignore[no-untyped-def]
    def hook(module, args, kwargs):  # type: ignore[no-untyped-def]
        run = _RUN.get()
        if run is None:
            return None
        if run.record is not None:
            return _decode_step(run, layer_idx, args, kwargs)
        if layer_idx == 0 and run.strategy.reads_inputs_embeds:
            run.inputs_embeds = args[0] if args else kwargs["hidden_states"]
        if layer_idx in run.budgets:
            hidden, rest, kwargs = _layer_kwargs(args, dict(kwargs))
            if run.strategy.probe_layer(layer_idx) == layer_idx:
                _score_with_own_attention(run, module, hidden, kwargs)
            hidden = _prune_stage(run, layer_idx, hidden)
            return (hidden, *rest), _stage_kwargs(run, kwargs, hidden.dtype)
        if run.current is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            return args, _stage_kwargs(run, dict(kwargs), hidden.dtype)
        return None

    return hook


_CACHE_ARGS = frozenset({"past_key_values", "past_key_value", "cache", "use_cache"})


def _score_with_own_attention(run: ForwardRun, layer: Any, hidden: torch.Tensor, kwargs: dict) -> None:
    """Run a stage layer's attention on its unpruned input, cache untouched, so its probe scores the stage."""
    current = _stage_kwargs(run, dict(kwargs), hidden.dtype) if run.current is not None else kwargs
    layer.self_attn(
        hidden_states=layer.input_layernorm(hidden), **{k: v for k, v in current.items() if k not in _CACHE_ARGS}
    )


def _prune_stage(run: ForwardRun, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    scores = run.pending.pop(layer, None)
    if scores is None:
        raise RuntimeError(
            f"vtokprune: no attention scores were captured before decoder layer {layer}; the layer before it must "
            "run its attention through the vtokprune probe"
        )
    ctx = run.context(hidden, layer)
    candidates = ctx.image_mask
    assert run.image_ids is not None
    image_ids = run.image_ids if run.current is None else run.current.gather(run.image_ids, fill=-1)
    image_ids = image_ids.masked_fill(~candidates, -1)
    budget = run.strategy.stage_budget(run.budgets[layer], hidden, ctx, image_ids)
    scores = run.strategy.stage_scores(scores, hidden, ctx, image_ids, budget)
    chosen = kernels.topk_per_group(scores, image_ids, budget)  # each image's budget of its own tokens
    inner = Compaction.from_keep_mask(chosen | ~candidates)  # padding stays: masked as before, shapes unchanged
    merged = run.strategy.merge(hidden, inner.cols, ctx, scores)
    new_hidden = inner.gather(hidden if merged is None else merged)
    run.current = inner if run.current is None else run.current.compose(inner)
    run.stage_layer = layer
    run.new_stages.append(StageRecord(layer, run.current))
    run.mask_cache.clear()
    return new_hidden


def _stage_kwargs(run: ForwardRun, kwargs: dict, dtype: torch.dtype) -> dict:
    """Replace the LM-level mask and positions a layer was handed with those of the current compact sequence."""
    comp = run.current
    assert comp is not None
    for name in ("attention_mask", "position_embeddings", "position_ids"):
        if name not in kwargs or kwargs[name] is None and name != "attention_mask":
            continue
        value = kwargs[name]
        key = (run.stage_layer or 0, name, id(value))
        if key not in run.mask_cache:
            if name == "attention_mask":
                run.mask_cache[key] = _prefill_mask(run, value, dtype)
            elif name == "position_embeddings":
                run.mask_cache[key] = tuple(_position_comp(run).gather(t, dim=-2) for t in value)
            else:
                run.mask_cache[key] = _position_comp(run).gather(value, dim=-1)
        kwargs[name] = run.mask_cache[key]
    return kwargs


def _position_comp(run: ForwardRun) -> Compaction:
    assert run.current is not None
    return contiguous_stage_cols(run.current, run.valid) if run.contiguous else run.current


def _flat_mask(mask: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor | None:
    """Flash attention's [B, L] padding mask for the kept columns `cols` [B, K] (-1: padding slot); None if none."""
    if mask is None:
        return None if bool((cols >= 0).all()) else cols >= 0
    kept = torch.gather(mask, 1, cols.clamp(min=0))
    return kept.masked_fill(cols < 0, 0)


def _check_mask_kind(lm_mask: Any) -> None:
    if lm_mask is not None and (not torch.is_tensor(lm_mask) or lm_mask.dim() not in (2, 4)):
        raise NotImplementedError(
            "vtokprune: in-LLM pruning needs the 'sdpa' or 'eager' attention implementation (4D or no mask); "
            f"this model built a {type(lm_mask).__name__} mask. Load the model with attn_implementation='sdpa'"
        )


def _prefill_mask(run: ForwardRun, lm_mask: Any, dtype: torch.dtype) -> Any:
    _check_mask_kind(lm_mask)
    comp = run.current
    assert comp is not None
    if run.flat_masks or (lm_mask is not None and lm_mask.dim() == 2):
        return _flat_mask(lm_mask, comp.cols)
    if lm_mask is not None and lm_mask.shape[2] != lm_mask.shape[3]:
        raise NotImplementedError("vtokprune: in-LLM pruning of a prefill that continues a filled cache")
    return remap_mask(lm_mask, comp.cols, comp.cols, comp.cols.clamp(min=0), run.eager, dtype)


def _decode_step(run: ForwardRun, layer_idx: int, args: tuple, kwargs: dict):  # type: ignore[no-untyped-def]
    record = run.record
    assert record is not None
    stage = None
    for s in record.stages:
        if s.layer <= layer_idx:
            stage = s
    if stage is None:
        return None
    kwargs = dict(kwargs)
    lm_mask = kwargs.get("attention_mask")
    key = (stage.layer, id(lm_mask))
    if key not in run.mask_cache:
        comp = stage.comp
        b = comp.cols.shape[0]
        hidden = args[0] if args else kwargs["hidden_states"]
        q = hidden.shape[1]
        new = torch.arange(record.lm_len, run.kv_len, device=comp.cols.device).expand(b, -1)
        k_cols = torch.cat([comp.cols, new], dim=1)
        q_pos = torch.arange(run.kv_len - q, run.kv_len, device=comp.cols.device).expand(b, -1)
        _check_mask_kind(lm_mask)
        # LM-level mask columns run over [0, kv_len); gather the ones this stage's cache holds. Query rows of a
        # decoding step are never compacted, so they index the LM-level rows relative to this call.
        q_rows = torch.arange(q, device=comp.cols.device).expand(b, -1)
        if run.flat_masks or (lm_mask is not None and lm_mask.dim() == 2):
            run.mask_cache[key] = _flat_mask(lm_mask, k_cols)
        elif lm_mask is None:
            run.mask_cache[key] = remap_mask(None, q_pos, k_cols, q_pos, run.eager, hidden.dtype)
        else:
            run.mask_cache[key] = remap_mask(lm_mask, q_rows, k_cols, q_pos, run.eager, lm_mask.dtype)
    kwargs["attention_mask"] = run.mask_cache[key]
    return args, kwargs
