"""A per-layer schedule given as data (a searched schedule file, or counts), scored like FastV / PyramidDrop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import BudgetError
from .base import LLMContext, LLMStrategy
from .fastv import last_token_attention_scores
from .registry import register_strategy


@register_strategy
@dataclass(frozen=True)
class Scheduled(LLMStrategy):
    """Visual tokens per decoder layer from a schedule: `file=` (written by `vtokprune search`) or `counts=`.

    `counts[l]` is the number of visual tokens per image entering decoder layer l (counts[0] = every token; never
    increasing). Where the count drops, the visual tokens the last token attends to least stop: score_j =
    (1/H) sum_h A_h[last, j], from the previous layer's attention (`score_layer="previous"`, FastV's official code)
    or from the stage layer's own q/k on its input (`"stage"`, PyramidDrop's). A file records the family it was
    searched with; `score_layer=None` takes it from there (default "previous").

    `tokens` is the image size the counts were written for (default counts[0]); an image with a different number
    of visual tokens keeps the same fraction at each layer (rounded up). The file's layer count must equal the
    model's.

    Budget: none needed with a schedule. `keep` / `ratio` scale it by one factor so that the deepest layer keeps
    exactly that many (as `keep` means for the other multi-stage strategies: the count after the last stage); the
    shape is kept. Without a schedule, `keep` / `ratio` alone keep that many from layer 1 on.
    """

    file: str | None = None
    counts: tuple[int, ...] | None = None
    tokens: int | None = None
    score_layer: str | None = None

    name: ClassVar[str] = "scheduled"
    paper: ClassVar[str] = "searched / given per-layer schedule (G-Search, P-Sigmoid, ...)"

    def __post_init__(self) -> None:
        super().__post_init__()
        from ..search.schedule_file import read_schedule, validate_counts

        if self.file is not None:
            if self.counts is not None:
                raise BudgetError("scheduled: give file= or counts=, not both")
            record = read_schedule(self.file)
            object.__setattr__(self, "counts", tuple(record["counts"]))
            object.__setattr__(self, "tokens", int(record["visual_tokens"]))
            if self.score_layer is None:
                object.__setattr__(self, "score_layer", record.get("score_layer", "previous"))
        if self.counts is not None:
            counts = tuple(self.counts)
            tokens = counts[0] if self.tokens is None else self.tokens
            object.__setattr__(self, "counts", validate_counts(counts, tokens, "scheduled counts"))
            object.__setattr__(self, "tokens", tokens)
        elif self.tokens is not None:
            raise BudgetError("scheduled: tokens= describes counts=; give counts= (or file=) too")
        if self.score_layer is None:
            object.__setattr__(self, "score_layer", "previous")
        if self.score_layer not in ("previous", "stage"):
            raise BudgetError(f"scheduled score_layer must be 'previous' or 'stage', got {self.score_layer!r}")

    def has_budget(self) -> bool:
        return self.counts is not None or super().has_budget()

    def per_layer(self, num_layers: int, available: int) -> list[int]:
        """Visual tokens per image entering each decoder layer."""
        from ..search.schedule_file import for_available, scale_to_last

        if self.counts is None:
            if num_layers < 2:
                raise BudgetError("scheduled: a decoder with one layer has no layer to prune before")
            return [available] + [self.budget(available)] * (num_layers - 1)
        if len(self.counts) != num_layers:
            where = f" in {self.file!r}" if self.file else ""
            raise BudgetError(
                f"scheduled: the schedule{where} has {len(self.counts)} layers but this model's decoder has "
                f"{num_layers}; search a schedule for this model (`vtokprune search --model ...`)"
            )
        counts = for_available(self.counts, int(self.tokens or self.counts[0]), available)
        if self.keep is not None or self.ratio is not None:
            counts = scale_to_last(counts, available, self.budget(available))
        return counts

    def schedule(self, num_layers: int, available: int) -> dict[int, int]:
        from ..search.schedule_file import stages

        return stages(self.per_layer(num_layers, available))

    def probe_layer(self, stage: int) -> int:
        return stage if self.score_layer == "stage" else stage - 1

    def score(self, probs: torch.Tensor, row_valid: torch.Tensor, ctx: LLMContext) -> torch.Tensor:
        return last_token_attention_scores(probs)
