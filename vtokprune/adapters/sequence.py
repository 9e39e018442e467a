"""Sequence bookkeeping shared by every adapter: which placeholder columns belong to which image, shortening ids,
masks and positions to the kept tokens (compaction.py), the in-LLM run's per-image budgets, and the decode steps that
continue from a shortened KV cache (its CacheRecord says how the prefill was shortened).

`Adapter` (base.py) inherits these; a family overrides the ones its positions need (M-RoPE: qwen2_vl.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..compaction import Compaction, renumber_contiguous
from ..runtime import CacheRecord, ForwardRun, PrunerState, Selection, active_run
from ..strategies.base import LLMStrategy
from .hooks import check_cache_lengths


class SequenceBookkeeping:
    """Positions, compaction, cache records and decode steps of the prefill / decode flow in `Adapter`."""

    model: Any
    cache_name: str  # the forward's KV-cache argument, set when the adapter is installed

    if TYPE_CHECKING:  # the family structure, defined by Adapter and its subclasses

        def text_config(self) -> Any: ...

        def image_token_id(self) -> int: ...

        def decoder_layers(self) -> Any: ...

        def per_token_args(self) -> tuple[str, ...]: ...

        def mrope(self) -> bool: ...

    def default_positions(self, args: dict[str, Any], past_len: int) -> torch.Tensor:
        """Positions the unwrapped model would use for this call: [B, L] (or [3, B, L] for M-RoPE)."""
        ids = args["input_ids"] if args.get("input_ids") is not None else args["inputs_embeds"][..., 0]
        b, length = ids.shape[:2]
        return (torch.arange(length, device=ids.device) + past_len).expand(b, length)

    def _decode(
        self, state: PrunerState, original: Callable[..., Any], args: dict[str, Any], record: CacheRecord
    ) -> Any:
        past = args[self.cache_name]
        past_len = past.get_seq_length()  # layer 0: the LM-level length so far
        ids = args["input_ids"] if args.get("input_ids") is not None else args["inputs_embeds"]
        q = ids.shape[1]
        check_cache_lengths(record, past, args.get("attention_mask"), q)
        if record.outer is not None:
            outer = record.outer
            done_new = past_len - record.lm_len  # tokens generated after the prefill so far
            if record.contiguous:  # the compact sequence is the input: continue from the cache length
                args["position_ids"] = (torch.arange(q, device=ids.device) + past_len).expand(ids.shape[0], q)
            elif args.get("position_ids") is None:
                args["position_ids"] = self.decode_positions(args, record, past_len)
            mask = args.get("attention_mask")
            if mask is not None and mask.dim() == 2:
                prefix = outer.gather(mask[:, : record.outer_len], fill=0)
                args["attention_mask"] = torch.cat([prefix, mask[:, record.outer_len :]], dim=1)
            elif mask is None and outer.has_padding:
                tail = torch.ones(outer.cols.shape[0], done_new + q, dtype=torch.long, device=ids.device)
                args["attention_mask"] = torch.cat([outer.valid.long(), tail], dim=1)
        if not record.stages:
            return original(**args)
        strategy = state.strategy
        assert isinstance(strategy, LLMStrategy)
        run = ForwardRun(
            strategy=strategy,
            image_mask=torch.zeros(1, 1, dtype=torch.bool),
            valid=torch.ones(1, 1, dtype=torch.bool),
            budgets={},
            num_layers=len(self.decoder_layers()),
            eager=self._eager(),
            flat_masks=self._flat_masks(),
            record=record,
            kv_len=past_len + q,
        )
        with active_run(run):
            return original(**args)

    def decode_positions(self, args: dict[str, Any], record: CacheRecord, past_len: int) -> torch.Tensor:
        """Positions of decoding tokens when the caller gave none: as if nothing had been pruned."""
        ids = args["input_ids"] if args.get("input_ids") is not None else args["inputs_embeds"][..., 0]
        b, q = ids.shape[:2]
        start = past_len - record.lm_len + record.outer_len
        return (torch.arange(q, device=ids.device) + start).expand(b, q)

    def _eager(self) -> bool:
        return getattr(self.text_config(), "_attn_implementation", "sdpa") == "eager"

    def _flat_masks(self) -> bool:
        return "flash" in str(getattr(self.text_config(), "_attn_implementation", ""))

    @staticmethod
    def _image_slots(image_mask: torch.Tensor, counts: list[int]) -> list[tuple[int, torch.Tensor]]:
        """(sample, placeholder columns) per image, images in the order the model fills placeholders."""
        if int(image_mask.sum()) != sum(counts):
            raise ValueError(
                f"the prompt has {int(image_mask.sum())} image placeholder tokens but the images give {sum(counts)} "
                "features; build inputs with the model's processor"
            )
        rows, cols = image_mask.nonzero(as_tuple=True)
        out, start = [], 0
        for n in counts:
            sample = int(rows[start])
            if not bool((rows[start : start + n] == sample).all()):
                raise ValueError("an image's placeholder tokens span two samples; build inputs with the processor")
            out.append((sample, cols[start : start + n]))
            start += n
        return out

    def _sample_of(self, image_mask: torch.Tensor, counts: list[int]) -> list[int]:
        return [s for s, _ in self._image_slots(image_mask, counts)]

    def _keep_mask(self, image_mask: torch.Tensor, kept: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
        keep = ~image_mask
        for (sample, cols), idx in zip(self._image_slots(image_mask, counts), kept):
            keep[sample, cols[idx.to(cols.device)]] = True
        return keep

    def compact_args(self, args: dict[str, Any], outer: Compaction, positions_mode: str = "original") -> dict[str, Any]:
        """Shorten ids, mask and positions to the kept tokens; positions stay those of the full sequence, or are
        renumbered contiguously (`positions_mode="contiguous"`, 1-D positions only)."""
        args = dict(args)
        ids = args["input_ids"]
        past = args.get(self.cache_name)
        past_len = past.get_seq_length() if past is not None else 0
        positions = args.get("position_ids")
        if positions is None:
            positions = self.default_positions(args, past_len)
        pad_id = self.pad_token_id()
        args["input_ids"] = outer.gather(ids, fill=pad_id)
        for name in self.per_token_args():
            if args.get(name) is not None:
                args[name] = outer.gather(args[name], fill=0, dim=-1)
        mask = args.get("attention_mask")
        if mask is not None:
            args["attention_mask"] = outer.gather(mask, fill=0)
        elif outer.has_padding or outer.length < ids.shape[1]:
            # An explicit mask: without one (and without a cache), transformers reads the gaps that pruning leaves in
            # position_ids as boundaries of packed sequences.
            args["attention_mask"] = outer.valid.long()
        args["position_ids"] = outer.gather(positions, fill=1, dim=-1)
        if positions_mode == "contiguous":
            args["position_ids"] = renumber_contiguous(args["position_ids"], past_len)
        return args

    def pad_token_id(self) -> int:
        pad = getattr(self.text_config(), "pad_token_id", None)
        if pad is None or pad == self.image_token_id():
            pad = 0 if self.image_token_id() != 0 else 1
        return int(pad)

    def _llm_run(
        self,
        state: PrunerState,
        strategy: LLMStrategy,
        image_mask: torch.Tensor,
        attention_mask: torch.Tensor | None,
        counts: list[int],
    ) -> ForwardRun:
        layers = self.decoder_layers()
        slots = self._image_slots(image_mask, counts)
        b = image_mask.shape[0]
        # Each image keeps its own budget: image j of sample s is ranked only against its own tokens.
        image_ids = torch.full(image_mask.shape, -1, dtype=torch.long, device=image_mask.device)
        slot_of: list[tuple[int, int]] = []
        seen: dict[int, int] = {}
        for sample, cols in slots:
            j = seen.get(sample, 0)
            seen[sample] = j + 1
            image_ids[sample, cols] = j
            slot_of.append((sample, j))
        m = max(seen.values(), default=1)
        per_image = [strategy.schedule(len(layers), n) for n in counts]
        budgets: dict[int, torch.Tensor] = {}
        for layer in sorted(strategy.schedule(len(layers), max(counts))):
            budget = torch.zeros(b, m, dtype=torch.long, device=image_mask.device)
            for (sample, j), sched in zip(slot_of, per_image):
                budget[sample, j] = sched[layer]
            budgets[layer] = budget
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(image_mask)
        return ForwardRun(
            strategy=strategy,
            image_mask=image_mask,
            valid=valid,
            budgets=budgets,
            num_layers=len(layers),
            eager=self._eager(),
            flat_masks=self._flat_masks(),
            image_ids=image_ids,
            contiguous=strategy.positions == "contiguous" and not self.mrope(),
        )

    def _llm_selection(self, run: ForwardRun, image_mask: torch.Tensor, counts: list[int]) -> Selection:
        slots = self._image_slots(image_mask, counts)
        stages: dict[int, list[torch.Tensor]] = {}
        for stage in run.new_stages:
            kept_cols = torch.zeros_like(image_mask)
            rows = torch.arange(image_mask.shape[0], device=image_mask.device)[:, None].expand_as(stage.comp.cols)
            valid = stage.comp.valid
            kept_cols[rows[valid], stage.comp.cols[valid]] = True
            stages[stage.layer] = [torch.nonzero(kept_cols[s, cols], as_tuple=True)[0] for s, cols in slots]
        last = max(stages) if stages else None
        kept = stages[last] if last is not None else [torch.arange(n) for n in counts]
        return Selection(kept=kept, available=counts, sample_of=[s for s, _ in slots], layer=last, stages=stages)
