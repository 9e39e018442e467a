"""Validation during training on cached features: teacher-forced accuracy at a token budget (:func:`val_accuracy`),
the model-selection score (:func:`val_score`), and the periodic evaluation that keeps the best checkpoint
(:func:`evaluate`). The recipe is in train.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .scenes import NUM_PATCHES, Sample
from .train_batches import assemble, hidden_states, token_ids


@torch.no_grad()
def val_accuracy(
    model: Any,
    tokenizer: Any,
    samples: list[Sample],
    feats: dict[int, torch.Tensor],
    k: int,
    mode: str,
    batch: int = 100,
    contiguous: bool = False,
) -> float:
    """Teacher-forced accuracy with k kept tokens chosen by mode ("random" or "evidence": the oracle's patches)."""
    from .scenes import evidence_cover

    model.eval()
    rng = np.random.default_rng(0)
    correct = 0
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        keeps = []
        for s in chunk:
            if k >= NUM_PATCHES:
                keeps.append(np.arange(NUM_PATCHES))
            elif mode == "random":
                keeps.append(np.sort(rng.permutation(NUM_PATCHES)[:k]))
            else:
                score = evidence_cover(s.scene, s.qa.refs) * 10 + rng.random(NUM_PATCHES) * 0.01
                keeps.append(np.sort(np.argsort(-score)[:k]))
        f = torch.stack([feats[s.scene.seed] for s in chunk]).float()
        qs = [token_ids(tokenizer, s.qa.question.split()) for s in chunk]
        renumber = torch.full((len(chunk),), contiguous) if k < NUM_PATCHES else None
        embeds, pos, mask, at = assemble(
            model, f, torch.from_numpy(np.stack(keeps)), qs, None, tokenizer, None, renumber
        )
        hidden = hidden_states(model, embeds, pos, mask)
        pred = model.lm_head(hidden[torch.arange(len(at)), at]).argmax(-1).tolist()
        correct += sum(int(p) == int(tokenizer.convert_tokens_to_ids(s.qa.answer)) for p, s in zip(pred, chunk))
    model.train()
    return correct / len(samples)


def val_score(acc: dict[str, float]) -> float:
    """Model selection: mean of unpruned and 11%-oracle validation accuracy (reading the whole picture, and reading
    the evidence alone, at original and renumbered positions). Random subsets are not rewarded: a benchmark model should not be chosen for shrugging off
    random pruning."""
    return (acc["full"] + (acc["oracle28"] + acc.get("oracle28_contiguous", acc["oracle28"])) / 2) / 2


def evaluate(
    model: Any,
    tokenizer: Any,
    val: list[Sample],
    val_feats: dict[int, torch.Tensor],
    out: Path,
    step: int,
    start: float,
    history: list[dict[str, Any]],
    best: float,
    log: Callable[[str], None],
) -> float:
    """Validation accuracies at `step`, appended to `history` and logged; saves `out`/best.pt (everything but the
    vision tower) when the score beats `best`. Returns the best score so far."""
    acc = {
        "full": val_accuracy(model, tokenizer, val, val_feats, NUM_PATCHES, "random"),
        "random28": val_accuracy(model, tokenizer, val, val_feats, 28, "random"),
        "oracle28": val_accuracy(model, tokenizer, val, val_feats, 28, "evidence"),
        "oracle28_contiguous": val_accuracy(model, tokenizer, val, val_feats, 28, "evidence", contiguous=True),
    }
    score = val_score(acc)
    history.append({"step": step, "seconds": round(time.time() - start, 1), "score": score, **acc})
    log(f"step {step} val " + " ".join(f"{k}={v:.3f}" for k, v in acc.items()) + f" score={score:.3f}")
    if score > best:
        state = {n: p.detach().clone() for n, p in model.state_dict().items() if "vision_tower" not in n}
        torch.save({"step": step, "val": acc, "state": state}, out / "best.pt")
        best = score
    return best
