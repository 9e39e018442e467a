"""Deterministic top-k selection and gathering helpers shared by every strategy.

Both run in :mod:`vtokprune.kernels` (the one selection path, backend chosen there); this module keeps the names the
strategies import.
"""

from __future__ import annotations

from .kernels import gather_tokens, topk_indices

__all__ = ["gather_tokens", "topk_indices"]
