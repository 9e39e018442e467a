"""What every strategy is: a small frozen config dataclass, plus pure functions over tensors.

Two kinds exist, told apart by `acts`:

* ``"vision"`` strategies run once per image after the vision encoder and projector (pre-LLM). They get a
  :class:`VisionSignals` bundle and return which of the image's tokens reach the language model (and, for merging
  strategies, the merged features).
* ``"llm"`` strategies run inside the decoder. Their :meth:`LLMStrategy.schedule` says at which decoder layers tokens
  are dropped and how many survive; at the layer just before each stage, the runtime computes the attention rows the
  strategy asks for (from that layer's q and k, whatever the attention implementation) and the strategy turns them into
  one score per token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..budget import normalise_budget, resolve_budget, validate_budget
from ..errors import BudgetError


@dataclass(frozen=True)
class Strategy:
    """Base config. `keep` is an absolute number of visual tokens per image, `ratio` a fraction of them."""

    keep: int | None = None
    ratio: float | None = None
    # "original": kept tokens keep the positions they had in the unpruned sequence; "contiguous": they are renumbered
    # 0..n-1 as if the pruned sequence were the input (decoding continues from there for pre-LLM strategies; in-LLM
    # stages renumber their survivors, decoding keeps the unpruned count). M-RoPE models always keep their 3-D
    # positions (a documented no-op). Each strategy defaults to what its official code does.
    positions: str = "original"

    name: ClassVar[str] = ""
    acts: ClassVar[str] = "vision"
    paper: ClassVar[str] = ""
    # The budget the paper (or its official code) states as the default, used when neither keep= nor ratio= is given,
    # e.g. {"ratio": 0.5}. None: the paper states none, and a strategy without a budget is refused.
    default_budget: ClassVar[dict[str, Any] | None] = None

    def __post_init__(self) -> None:
        keep, ratio = normalise_budget(self.keep, self.ratio)
        object.__setattr__(self, "keep", keep)
        object.__setattr__(self, "ratio", ratio)
        validate_budget(self.keep, self.ratio)
        if self.positions not in ("original", "contiguous"):
            raise BudgetError(f"positions must be 'original' or 'contiguous', got {self.positions!r}")

    def has_budget(self) -> bool:
        """Whether the config says how many tokens survive (subclasses with their own budget fields override)."""
        return self.keep is not None or self.ratio is not None

    def with_default_budget(self) -> Strategy:
        """This config, with the paper's default budget filled in if none was given; raises if the paper has none."""
        if self.has_budget():
            return self
        if self.default_budget is None:
            raise BudgetError(
                f"strategy {self.name!r} needs a budget: pass keep= (visual tokens per image, e.g. keep=64) or "
                f"ratio= (fraction kept, e.g. ratio=0.25); its paper states no single default. To keep every token "
                "use the 'none' strategy"
            )
        return dataclasses.replace(self, **self.default_budget)

    def budget(self, available: int) -> int:
        """Tokens to keep out of `available` visual tokens of one image."""
        return resolve_budget(self.keep, self.ratio, available)


@dataclass
class VisionSignals:
    """Everything a vision-side strategy may look at, for N images of T tokens each.

    features:   [N, T, D] projected features, exactly what the language model would receive.
    grid:       (rows, cols) of the patch grid when the T tokens form one, else None.
    cls_attn:   vision layer -> [N, H, T] attention of the [CLS] query over the T patch tokens (softmax taken over
                the full row, [CLS] included, then the [CLS] column dropped).
    keys:       vision layer -> [N, H, T, d] attention keys of the patch tokens.
    values:     vision layer -> [N, H, T, d] attention values of the patch tokens.
    cls_keys / cls_values: vision layer -> [N, H, d] the [CLS] token's own key / value.
    hidden:     vision layer -> [N, T, Dv] hidden states (input of that layer) of the patch tokens.
    prompt_ids: per image, the token ids of the prompt it belongs to (for text-guided strategies).
    embed_tokens / projector / projector_input: see the fields (optional; None where the adapter gives none).
    """

    features: torch.Tensor
    grid: tuple[int, int] | None = None
    cls_attn: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    cls_keys: dict[int, torch.Tensor] = field(default_factory=dict)
    cls_values: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    prompt_ids: list[torch.Tensor] | None = None
    tiles: list[list[int]] | None = None
    # The language model's input-embedding module (ids -> [.., D]), for strategies that read the prompt in LM space.
    embed_tokens: Any = None
    # The projector (vision hidden -> LM features) and its input per kept-able token [N, T, Dv], where exposed.
    projector: Any = None
    projector_input: torch.Tensor | None = None
    # [N, D] the [CLS] token's feature-layer hidden state through the projector (LLaVA-1.5 only), when wanted.
    cls_feature: torch.Tensor | None = None


@dataclass
class VisionSelection:
    """indices: [N, k] kept token indices, ascending; features: [N, k, D] what the LLM receives for them."""

    indices: torch.Tensor
    features: torch.Tensor


@dataclass(frozen=True)
class VisionStrategy(Strategy):
    # Select at this vision layer (0-based, negative counts from the end) and run the later vision layers on the kept
    # tokens only (vtokprune/adapters/in_tower.py); a tuple of layers selects progressively (a geometric path of
    # budgets down to keep); None: select after the tower. [CLS]-attention strategies only.
    in_tower_layer: int | tuple[int, ...] | None = field(default=None, kw_only=True)
    # With in_tower_layer: the dropped patches ride on as one fused token (EViT), weighted as the tokens it stands for
    # (ToMe's proportional attention), context for the later vision layers only; the LLM never sees it.
    in_tower_fuse: bool = field(default=False, kw_only=True)

    acts: ClassVar[str] = "vision"
    # Which signals the strategy reads, beyond `features`: subset of {"cls_attn", "keys", "values", "hidden"}.
    needs: ClassVar[frozenset[str]] = frozenset()
    # Signals used when the adapter can give them, without refusing models that cannot: subset of {"cls_feature"}.
    wants: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.in_tower_layer, list):
            object.__setattr__(self, "in_tower_layer", tuple(self.in_tower_layer))
        if not isinstance(self.in_tower_fuse, bool):
            raise BudgetError(f"{self.name} in_tower_fuse must be True or False, got {self.in_tower_fuse!r}")
        if self.in_tower_fuse and self.in_tower_layer is None:
            raise BudgetError(f"{self.name} in_tower_fuse=True needs in_tower_layer (it fuses what the tower drops)")
        if self.in_tower_layer is not None:
            from ..adapters.in_tower import validate_strategy

            validate_strategy(self)

    def vision_layers(self, num_layers: int, feature_layer: int) -> tuple[int, ...]:
        """Vision-tower layers whose signals are needed (0-based). Default: the layer that makes the features."""
        return (feature_layer,)

    def select(self, signals: VisionSignals, k: int) -> VisionSelection:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class LLMContext:
    """What an in-LLM strategy sees at the layer before a pruning stage (current, possibly compacted, sequence).

    image_mask: [B, L] True at visual tokens still present.
    valid:      [B, L] True at real (non-padding) tokens.
    text_mask:  [B, L] True at real non-visual tokens.
    last_index: [B] index of the last real token of each sample.
    """

    image_mask: torch.Tensor
    valid: torch.Tensor
    text_mask: torch.Tensor
    last_index: torch.Tensor
    layer: int
    num_layers: int
    hidden: torch.Tensor | None = None
    # LM-level view (before any stage compacted the sequence); cols [B, L] maps each current slot to its LM-level
    # column (-1 for padding slots). inputs_embeds is set only for strategies with `reads_inputs_embeds`.
    inputs_embeds: torch.Tensor | None = None
    lm_image_mask: torch.Tensor | None = None
    lm_valid: torch.Tensor | None = None
    cols: torch.Tensor | None = None


@dataclass(frozen=True)
class LLMStrategy(Strategy):
    acts: ClassVar[str] = "llm"
    # False for strategies that never read attention weights (they score from keys / hidden states), so they also
    # run where no attention rows can be computed for them (e.g. flash_attention_2).
    needs_attention: ClassVar[bool] = True
    # True for strategies that read the decoder's input embeddings (LLMContext.inputs_embeds).
    reads_inputs_embeds: ClassVar[bool] = False

    def schedule(self, num_layers: int, available: int) -> dict[int, int]:
        """Decoder layer -> visual tokens per image that survive from that layer on (before it runs)."""
        raise NotImplementedError  # pragma: no cover

    def probe_layer(self, stage: int) -> int:
        """Decoder layer whose attention scores the stage before `stage`: the previous one, or `stage` itself (its
        attention is then run once more on the unpruned input, cache untouched)."""
        return stage - 1

    def query_rows(self, ctx: LLMContext) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, R] query row indices, [B, R] validity) whose attention rows the strategy needs."""
        return ctx.last_index[:, None], torch.ones_like(ctx.last_index[:, None], dtype=torch.bool)

    def score(self, probs: torch.Tensor, row_valid: torch.Tensor, ctx: LLMContext) -> torch.Tensor:
        """probs: [B, H, R, L] softmax attention rows. Returns [B, L]; only visual positions are ranked."""
        raise NotImplementedError  # pragma: no cover

    def key_scores(self, key: torch.Tensor, ctx: LLMContext) -> torch.Tensor:
        """For `needs_attention = False`: [B, Hkv, L, d] keys of the layer before a stage -> [B, L] scores."""
        raise NotImplementedError  # pragma: no cover

    def stage_budget(
        self, budget: torch.Tensor, hidden: torch.Tensor, ctx: LLMContext, image_ids: torch.Tensor
    ) -> torch.Tensor:
        """[B, M] tokens each image keeps at this stage; instance-adaptive strategies (DyVTE, ATP) decide it here
        from the stage input `hidden` [B, L, D]. Default: the schedule's `budget`."""
        return budget

    def stage_scores(
        self, scores: torch.Tensor, hidden: torch.Tensor, ctx: LLMContext, image_ids: torch.Tensor, budget: torch.Tensor
    ) -> torch.Tensor:
        """Final [B, L] scores at the stage, given its input hidden states [B, L, D], image_ids [B, L] (index of the
        image within its sample, -1 elsewhere) and budget [B, M] (tokens each image keeps). Default: `scores`."""
        return scores

    def merge(
        self, hidden: torch.Tensor, keep_idx: torch.Tensor, ctx: LLMContext, scores: torch.Tensor
    ) -> torch.Tensor | None:
        """Optionally rewrite the kept hidden states (e.g. recycle pruned tokens). Default: plain gather."""
        return None
