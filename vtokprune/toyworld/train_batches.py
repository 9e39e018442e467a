"""Training batches for the toy LLaVA on cached features: which visual tokens a sample keeps (:func:`keep_indices`,
from ground-truth masks and chance), and the sequence the model reads (:func:`assemble`), with the logits at the
answer. The recipe is in train.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .model import BOS_ID, EOS_ID, PAD_ID
from .scenes import NUM_PATCHES, make_questions, make_scene, object_cover

if TYPE_CHECKING:
    from .train import TrainConfig

PREFIX = ("USER", ":")
SUFFIX = ("ASSISTANT", ":")


class SceneInfo:
    """Per-scene questions and object coverage, computed once per seed."""

    def __init__(self) -> None:
        self._memo: dict[int, tuple[list[Any], np.ndarray, list[int]]] = {}

    def get(self, seed: int) -> tuple[list[Any], np.ndarray, list[int]]:
        """(questions, [objects, patches] cover, object labels in cover-row order)."""
        if seed not in self._memo:
            scene = make_scene(seed)
            cover = object_cover(scene)
            self._memo[seed] = (make_questions(scene, 12), np.stack(list(cover.values())), list(cover))
        return self._memo[seed]


def keep_indices(
    rng: np.random.Generator,
    covers: np.ndarray,
    refs_rows: list[int],
    k: int,
    cfg: TrainConfig,
    evidence_only: float,
) -> np.ndarray:
    """Sorted patch indices for one training sample, from ground-truth masks and chance (never a strategy's scores):
    only the evidence objects' patches (probability `evidence_only`), only a random subset of the objects' patches,
    every object's patches filled up to k with random ones, or k random patches."""
    noise = rng.random(NUM_PATCHES)
    u = rng.random()
    if u < evidence_only:  # the evidence objects plus a random subset of the others (object patches only)
        rows = sorted(set(refs_rows) | {i for i in range(len(covers)) if rng.random() < 0.5})
        return np.flatnonzero(covers[rows].max(axis=0) >= 0.1)
    u = (u - evidence_only) / max(1e-9, 1 - evidence_only)
    if u < cfg.random_frac:
        return np.sort(np.argsort(-noise)[:k])
    if u < cfg.random_frac + cfg.all_objects_frac:
        cover = covers.max(axis=0)
        return np.sort(np.argsort(-((cover > 0.05) * (1.0 + cover) + noise * 0.5))[:k])
    chosen = covers[rng.random(len(covers)) < 0.5]
    if not len(chosen):
        return np.sort(np.argsort(-noise)[: max(1, k // 4)])
    return np.flatnonzero(chosen.max(axis=0) >= 0.1)


def token_ids(tokenizer: Any, words: tuple[str, ...] | list[str]) -> list[int]:
    return [int(i) for i in tokenizer.convert_tokens_to_ids(list(words))]


def pad_keeps(keeps: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, K] indices, [B, K] valid) from per-sample index arrays of different lengths (padding: index 0)."""
    width = max(1, max(len(k) for k in keeps))
    idx = torch.zeros(len(keeps), width, dtype=torch.long)
    valid = torch.zeros(len(keeps), width, dtype=torch.bool)
    for i, k in enumerate(keeps):
        idx[i, : len(k)] = torch.from_numpy(np.asarray(k, dtype=np.int64))
        valid[i, : len(k)] = True
    return idx, valid


def assemble(
    model: Any,
    feats: torch.Tensor,
    keep: torch.Tensor,
    questions: list[list[int]],
    answers: list[int] | None,
    tokenizer: Any,
    valid: torch.Tensor | None = None,
    contiguous: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs_embeds, position_ids, attention_mask, index of the position predicting the answer) for a batch.
    `contiguous` ([B] bool): samples whose kept visual tokens are renumbered 0, 1, ... after the prefix instead of
    keeping their original positions.

    Sequence (model.prompt): <s> USER : question [kept visual tokens at their original positions] question ASSISTANT :
    (answer </s>). The prefix is left-padded to the batch's longest (masked out), visual parts shorter than the widest
    are padded (masked out), the tail is right-padded (causal attention never looks at what follows a sample's end)."""
    inner = model.model
    b, k = keep.shape
    valid = torch.ones_like(keep, dtype=torch.bool) if valid is None else valid
    embed = inner.get_input_embeddings()
    suffix = token_ids(tokenizer, SUFFIX)
    heads = [[BOS_ID, *token_ids(tokenizer, PREFIX), *q] for q in questions]
    p = max(len(h) for h in heads)
    head_ids = torch.full((b, p), PAD_ID, dtype=torch.long)
    head_mask = torch.zeros(b, p, dtype=torch.long)
    starts = torch.tensor([p - len(h) for h in heads])
    for i, h in enumerate(heads):
        head_ids[i, p - len(h) :] = torch.tensor(h)
        head_mask[i, p - len(h) :] = 1
    vis = inner.multi_modal_projector(torch.gather(feats, 1, keep[..., None].expand(-1, -1, feats.shape[-1])))
    tails = [q + suffix + ([answers[i], EOS_ID] if answers is not None else []) for i, q in enumerate(questions)]
    width = max(len(t) for t in tails)
    tail_ids = torch.full((b, width), EOS_ID, dtype=torch.long)
    for i, t in enumerate(tails):
        tail_ids[i, : len(t)] = torch.tensor(t)
    embeds = torch.cat([embed(head_ids), vis.to(embed.weight.dtype), embed(tail_ids)], dim=1)
    lengths = (p - starts)[:, None]
    head_pos = (torch.arange(p)[None, :] - starts[:, None]).clamp(min=0)
    vis_pos = keep + lengths
    tail_start = lengths + NUM_PATCHES
    if contiguous is not None:  # renumbered kept tokens, as strategies with positions="contiguous" feed them
        ranks = valid.long().cumsum(1) - 1
        vis_pos = torch.where(contiguous[:, None], lengths + ranks.clamp(min=0), vis_pos)
        tail_start = torch.where(contiguous[:, None], lengths + valid.long().sum(1, keepdim=True), tail_start)
    positions = torch.cat([head_pos, vis_pos, tail_start + torch.arange(width)[None, :]], dim=1)
    mask = torch.cat([head_mask, valid.long(), torch.ones(b, width, dtype=torch.long)], 1)
    answer_at = torch.tensor([p + k + len(q) + len(suffix) - 1 for q in questions])
    return embeds, positions, mask, answer_at


def hidden_states(model: Any, embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    lm = model.model.language_model
    return lm(inputs_embeds=embeds, position_ids=positions, attention_mask=mask).last_hidden_state  # type: ignore


def logits_at(
    model: Any, embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, at: torch.Tensor
) -> torch.Tensor:
    """[B, 2, V] logits at `at` (predicting the answer) and `at + 1` (predicting </s>)."""
    hidden = hidden_states(model, embeds, positions, mask)
    rows = torch.arange(len(at))[:, None]
    return model.lm_head(hidden[rows, torch.stack([at, at + 1], dim=1)])
