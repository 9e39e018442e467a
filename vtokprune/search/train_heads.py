"""Train DyVTE's exit head or ATP's ratio head on calibration data (labels from the frozen model, no annotations)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import BudgetError
from .calibration import Calibration, predict
from .learned import KINDS, BudgetHead, save_head


@torch.inference_mode()
def _features(model: Any, calibration: Calibration) -> tuple[list[torch.Tensor], list[int]]:
    """Per layer l: [N, D] last-token hidden state entering l (unpruned); and the unpruned answers."""
    per_layer: list[list[torch.Tensor]] = []
    answers: list[int] = []
    for batch in calibration.batches:
        out = model(**batch, output_hidden_states=True)
        states = out.hidden_states  # embeddings, then the output of each layer = the input of the next
        if not per_layer:
            per_layer = [[] for _ in range(len(states) - 1)]
        for layer in range(len(states) - 1):
            per_layer[layer].append(states[layer][:, -1].float())
        answers.extend(int(i) for i in out.logits[:, -1].argmax(dim=-1).tolist())
    return [torch.cat(x) for x in per_layer], answers


def stage_layers(num_layers: int, reference: tuple[int, ...] = (8, 16, 24)) -> list[int]:
    from ..strategies.pdrop import scale_layer

    return sorted({scale_layer(layer, num_layers, 32) for layer in reference})


def labels(model: Any, calibration: Calibration, kind: str, layers: list[int], levels: int) -> list[list[float]]:
    """Per layer in `layers`: one label per sample (see the module docstring of `learned`)."""
    from ..strategies.dyvte import DyVTE
    from ..strategies.scheduled import Scheduled

    reference = predict(model, calibration)
    num_layers = int(model.config.get_text_config().num_hidden_layers)
    visual, _ = calibration.visual_and_text_tokens(int(model.config.image_token_id))
    out = []
    for layer in layers:
        if kind == "dyvte":
            preds = predict(model, calibration, DyVTE(exit_layer=layer))
            out.append([float(p == r) for p, r in zip(preds, reference)])
            continue
        best = [1.0] * len(reference)
        for k in range(levels - 1, 0, -1):  # from large to small: the smallest fraction that keeps the answer
            count = max(1, math.ceil(visual * k / levels))
            counts = tuple([visual] * layer + [count] * (num_layers - layer))
            preds = predict(model, calibration, Scheduled(counts=counts))
            # contiguous from the top: a sample whose answer changed at a larger count keeps that count
            best = [k / levels if p == r and b == (k + 1) / levels else b for p, r, b in zip(preds, reference, best)]
        out.append(best)
    return out


def train_head(
    model: Any,
    calibration: Calibration,
    kind: str,
    out: str | Path,
    epochs: int = 300,
    width: int = 64,
    levels: int = 8,
    seed: int = 0,
    log: Any = print,
) -> dict[str, Any]:
    """Label, train (Adam, full batch, seeded) and save a head; returns the head's config with training stats."""
    if kind not in KINDS:
        raise BudgetError(f"unknown head kind {kind!r}; choose one of {', '.join(KINDS)}")
    text = model.config.get_text_config()
    num_layers, hidden_size = int(text.num_hidden_layers), int(text.hidden_size)
    layers = list(range(1, num_layers)) if kind == "dyvte" else stage_layers(num_layers)
    features, _ = _features(model, calibration)
    targets = labels(model, calibration, kind, layers, levels)
    x = torch.cat([features[layer] for layer in layers])
    depth = torch.cat([torch.full((len(features[layer]),), layer / num_layers) for layer in layers])
    y = torch.tensor([v for row in targets for v in row])
    torch.manual_seed(seed)
    head = BudgetHead(hidden_size, width)
    optimiser = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(epochs):
        logit = head(x, depth)
        if kind == "dyvte":
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y)
        else:
            loss = torch.nn.functional.mse_loss(torch.sigmoid(logit), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        p = torch.sigmoid(head(x, depth))
        fit = float(((p >= 0.5).float() == y).float().mean()) if kind == "dyvte" else float((p - y).abs().mean())
    config = {
        "kind": kind,
        "hidden_size": hidden_size,
        "width": width,
        "num_layers": num_layers,
        "layers": layers,
        "model_type": getattr(model.config, "model_type", None),
        "calibration": calibration.description,
        "samples": calibration.size,
        "epochs": epochs,
        "seed": seed,
        "final_loss": round(float(loss.detach()), 6),
        "train_fit": round(fit, 4),
        "label_mean": round(float(y.mean()), 4),
    }
    save_head(head, out, config)
    log(
        f"{kind} head: {len(y)} labels, mean {config['label_mean']}, final loss {config['final_loss']}, "
        f"{'train accuracy' if kind == 'dyvte' else 'mean abs error'} {config['train_fit']}; wrote {out}"
    )
    return config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vtokprune train-budget", description=__doc__)
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--model", default=None, help="HF model id or local path (default: the embedded model)")
    p.add_argument("--samples", type=int, default=256, help="training-split questions")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--levels", type=int, default=8, help="atp: ratio grid k/levels for the labels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="directory for head.safetensors + head.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..cli import load_model, quiet_libraries
    from .calibration import toy_calibration

    with quiet_libraries():
        model, processor, description = load_model(args.model)
        if processor is None:
            raise BudgetError(f"{description} has no processor; the toy training split needs one")
        model.eval()
        calibration = toy_calibration(processor, args.samples, args.seed, args.batch_size, dtype=model.dtype)
        print(f"model: {description}\ncalibration: {calibration.description}", file=sys.stderr)
        train_head(model, calibration, args.kind, args.out, args.epochs, levels=args.levels, seed=args.seed)
    print(f"use it: vtokprune sweep --strategies {args.kind} --set {args.kind}.head={args.out}")
    return 0
