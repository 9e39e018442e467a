"""G-Search: greedily, from the shallowest decoder layer to the deepest, the fewest visual tokens each layer can keep.

Zhao et al., "Accelerating Multimodal Large Language Models by Searching Optimal Vision Token Reduction" (CVPR 2025):
the ranking of visual tokens by attention is similar across layers (except the first), so the number of essential
tokens never grows with depth, and a greedy pass from shallow to deep finds the fewest per layer.

For layer l = 1 .. L-1 in turn, with layers < l fixed, the candidate counts c <= counts[l-1] (a grid of `levels`
fractions of the image's tokens) are tried with every layer >= l at c; the smallest c whose calibration objective
stays within `tolerance` of the unpruned model's is kept. The objective is assumed to grow with c, so each layer is a
binary search over the grid (about log2(levels) evaluations). Layer 0 always sees every token: a stage is scored by
the attention of the layer before it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def candidate_counts(available: int, levels: int) -> list[int]:
    """ceil(available * k / levels) for k = 1 .. levels, ascending, without duplicates."""
    return sorted({max(1, math.ceil(available * k / levels)) for k in range(1, levels + 1)})


def greedy_search(
    objective: Callable[[Sequence[int]], float],
    num_layers: int,
    available: int,
    threshold: float,
    levels: int = 16,
) -> list[int]:
    """Per-layer counts: for each layer, shallow to deep, the smallest grid count with objective >= threshold."""
    counts = [available] * num_layers
    grid = candidate_counts(available, levels)
    for layer in range(1, num_layers):
        options = [c for c in grid if c <= counts[layer - 1]]
        low, high = 0, len(options) - 1  # options[high] is the previous layer's count: assumed good enough
        while low < high:
            mid = (low + high) // 2
            trial = counts[:layer] + [options[mid]] * (num_layers - layer)
            if objective(trial) >= threshold:
                high = mid
            else:
                low = mid + 1
        for deeper in range(layer, num_layers):
            counts[deeper] = options[high]
    return counts


def greedy_evaluations(num_layers: int, levels: int) -> int:
    """Upper bound of the evaluations `greedy_search` makes (for a progress bar)."""
    return (num_layers - 1) * max(1, math.ceil(math.log2(levels + 1)))
