"""Compacting a batch of sequences to the tokens that survive, keeping every kept token's original position.

A :class:`Compaction` maps each slot of the compact sequence to a column of the sequence it came from; samples that
keep fewer tokens are padded on the left with slots that point nowhere (-1), masked out everywhere, exactly like
left padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Compaction:
    cols: torch.Tensor  # [B, N] long, index into the source sequence, -1 for padding slots

    @property
    def valid(self) -> torch.Tensor:
        return self.cols >= 0

    @property
    def has_padding(self) -> bool:
        return bool((self.cols < 0).any())

    @property
    def length(self) -> int:
        return int(self.cols.shape[1])

    def gather(self, x: torch.Tensor, fill: float | int | bool = 0, dim: int = 1) -> torch.Tensor:
        """Gather along `dim` (the sequence dim; the batch dim is dim 0, or dim `dim-1` for leading extra dims).

        x may have a batch dim of 1 (broadcast, e.g. position_ids from `arange`); it is expanded.
        """
        dim = dim % x.dim()
        bdim = dim - 1
        b = self.cols.shape[0]
        if x.shape[bdim] != b:
            shape = list(x.shape)
            shape[bdim] = b
            x = x.expand(*shape)
        idx = self.cols.clamp(min=0)
        view = [1] * x.dim()
        view[bdim], view[dim] = b, idx.shape[1]
        idx = idx.view(view)
        expand = list(x.shape)
        expand[dim] = self.cols.shape[1]
        out = torch.gather(x, dim, idx.expand(*expand))
        if self.has_padding:
            pad = (~self.valid).view(view).expand(*expand)
            out = out.masked_fill(pad, fill)
        return out

    def compose(self, inner: Compaction) -> Compaction:
        """`inner` indexes into this compaction's output; return the map straight to this one's source."""
        src = torch.gather(self.cols, 1, inner.cols.clamp(min=0))
        return Compaction(torch.where(inner.valid, src, torch.full_like(src, -1)))

    @staticmethod
    def identity(batch: int, length: int, device: torch.device) -> Compaction:
        return Compaction(torch.arange(length, device=device).expand(batch, length).clone())

    @staticmethod
    def from_keep_mask(keep: torch.Tensor) -> Compaction:
        """keep: [B, L] bool -> compaction keeping those columns in order, left-padded to the longest sample."""
        counts = keep.sum(dim=1)
        n = int(counts.max().item()) if keep.numel() else 0
        b, length = keep.shape
        # Rank of each kept column among the kept ones, shifted right so every row ends at slot n-1.
        rank = torch.cumsum(keep.long(), dim=1) - 1 + (n - counts)[:, None]
        cols = torch.full((b, n), -1, dtype=torch.long, device=keep.device)
        src = torch.arange(length, device=keep.device).expand(b, length)
        rows = torch.arange(b, device=keep.device)[:, None].expand(b, length)
        cols[rows[keep], rank[keep]] = src[keep]
        return Compaction(cols)


def remap_mask(
    mask: torch.Tensor | None,
    q_cols: torch.Tensor,
    k_cols: torch.Tensor,
    q_pos: torch.Tensor,
    eager: bool,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """Attention mask for a compacted layer, from the mask the language model built for the full sequence.

    mask:   None (plain causal, no padding) or 4D [B, 1|H, Lq, Lk] boolean (True = attend) / additive float.
    q_cols: [B, Q] source row of each compact query (-1 = padding slot); k_cols: [B, K] source column of each key.
    q_pos:  [B, Q] source position of each query, used to rebuild causality when `mask` is None.
    A padding query attends only to itself, so no row is all masked (SDPA would return NaN, and NaN times a zero
    attention weight still poisons the values).
    """
    q_pad, k_pad = q_cols < 0, k_cols < 0
    if mask is None:
        if not bool(q_pad.any()) and not bool(k_pad.any()):
            return None  # order is preserved, so plain causal attention is still right
        allowed = (k_cols[:, None, :] <= q_pos[:, :, None]) & ~k_pad[:, None, :]
        allowed = allowed[:, None]
    else:
        if mask.dim() != 4:
            raise ValueError(f"expected a 4D attention mask, got shape {tuple(mask.shape)}")
        m = mask
        qi = q_cols.clamp(min=0)[:, None, :, None].expand(m.shape[0], m.shape[1], q_cols.shape[1], m.shape[-1])
        m = torch.gather(m, 2, qi)
        ki = k_cols.clamp(min=0)[:, None, None, :].expand(m.shape[0], m.shape[1], m.shape[2], k_cols.shape[1])
        m = torch.gather(m, 3, ki)
        if not bool(q_pad.any()) and not bool(k_pad.any()):
            return m
        allowed = m if m.dtype == torch.bool else m == 0
        allowed = allowed & ~k_pad[:, None, None, :]
    if bool(q_pad.any()):
        k_len = k_cols.shape[1]
        q_len = q_cols.shape[1]
        # a padding query is the padding key at the same compact slot (query slots are the last q_len keys)
        diag = torch.zeros(q_len, k_len, dtype=torch.bool, device=k_cols.device)
        diag[torch.arange(q_len), torch.arange(k_len - q_len, k_len)] = True
        allowed = torch.where(q_pad[:, None, :, None], diag[None, None], allowed)
    if mask is not None and mask.dtype == torch.bool:
        return allowed
    if mask is None and not eager:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, neg)


# ---------------------------------------------------------------------------------------------- kept tokens' positions


def renumber_contiguous(positions: torch.Tensor, past_len: int) -> torch.Tensor:
    """Positions of a compacted prefill, renumbered as if the compact sequence were the whole input.

    [B, N] -> past_len + slot index (left-padding slots included, as the model numbers an unpruned padded batch; RoPE
    only sees differences, so that shift is harmless). M-RoPE positions ([3, B, N]) are returned unchanged: their
    3-D layout (time, height, width) is what the model was trained on, so they always keep the original values.
    """
    if positions.dim() != 2:
        return positions
    b, n = positions.shape
    return (torch.arange(n, device=positions.device) + past_len).expand(b, n)


def contiguous_stage_cols(comp: Compaction, lm_valid: torch.Tensor) -> Compaction:
    """For an in-LLM stage: the LM-level columns whose positions the compact slots take when renumbered.

    Each real kept token gets the position of the LM-level column first_real + rank (its rank among the row's kept
    real tokens), i.e. positions become contiguous from the row's first real position on; padding slots keep their
    own column. Gathering the LM-level position ids / rotary embeddings at these columns renumbers them.
    """
    real = comp.valid & torch.gather(lm_valid, 1, comp.cols.clamp(min=0))
    rank = torch.cumsum(real.long(), dim=1) - 1
    first = torch.argmax(lm_valid.long(), dim=1, keepdim=True)  # first real LM-level column of each row
    return Compaction(torch.where(real, first + rank, comp.cols))
