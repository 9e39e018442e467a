"""Training the toy LLaVA from scratch on freshly generated scenes (CPU-friendly).

Loss = answer cross-entropy (multi-turn: several questions about one image in one sequence, so the image and its
576 tokens are encoded once for all of them) + a per-patch classification head on the vision features ("which
colour-shape pair covers this patch") + a multi-label head on [CLS] ("which pairs are in the scene, which of them
small"). Without the two auxiliary losses a model this size trained from scratch stays near chance (see NOTES).
The auxiliary heads are dropped when the checkpoint is saved: it is a plain LlavaForConditionalGeneration.
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
from torch import nn

from .model import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, build_model, build_processor, prompt
from .scenes import HELDOUT_BASE, NUM_CLASSES, Sample, heldout, make_questions, make_scene, patch_labels, render

VAL_BASE = HELDOUT_BASE + 500_000_000  # validation scenes (for logging only): disjoint from train and held-out


@dataclass
class TrainConfig:
    out: str = "toy-llava"
    minutes: float = 40.0  # wall-clock budget for the optimisation loop
    max_steps: int = 100_000
    batch: int = 4  # images per step
    turns: int = 10  # questions per image (multi-turn sequence)
    lr: float = 1.5e-3
    min_lr_frac: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    patch_weight: float = 1.0
    cls_weight: float = 2.0
    word_weight: float = 1.0  # projected patch tokens -> colour and shape words (input-embedding space)
    fg_weight: float = 5.0  # weight of object patches (vs background) in the per-patch loss
    attn_weight: float = 0.5  # attention supervision: answer position -> evidence patches
    attn_layers: str = "1,2"  # decoder layers whose first `attn_heads` heads are supervised
    attn_heads: int = 2
    vision_width: int = 128
    vision_layers: int = 4
    text_width: int = 128
    text_layers: int = 3
    seed: int = 0
    threads: int = 1
    eval_every: int = 250
    eval_samples: int = 200
    log_every: int = 25


class AuxHeads(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.patch = nn.Linear(width, NUM_CLASSES)
        self.cls = nn.Linear(width, 2 * (NUM_CLASSES - 1))


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_batch(seeds: list[int], processor: Any, turns: int) -> dict[str, torch.Tensor]:
    """Pixel values, multi-turn token ids (right-padded), answer labels and auxiliary targets for these scenes."""
    tok = processor.tokenizer
    user, assistant = _ids(tok, "USER :"), _ids(tok, "ASSISTANT :")
    n_img = 576
    images, seqs, labs, plabels, slabels = [], [], [], [], []
    evid: list[list[tuple[int, ...]]] = []
    from .scenes import scene_labels

    for seed in seeds:
        scene = make_scene(seed)
        images.append(render(scene))
        plabels.append(patch_labels(scene))
        slabels.append(scene_labels(scene))
        ids = [BOS_ID, *user, *([IMAGE_ID] * n_img)]
        lab = [-100] * len(ids)
        qas = make_questions(scene, turns)
        evid.append([qa.refs for qa in qas])
        for t, qa in enumerate(qas):
            head = (user if t else []) + _ids(tok, qa.question) + assistant
            ans = tok.convert_tokens_to_ids(qa.answer)
            ids += head + [ans, EOS_ID]
            lab += [-100] * len(head) + [ans, EOS_ID]
        seqs.append(ids)
        labs.append(lab)
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(lab)
        mask[i, : len(s)] = 1
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    # attention targets: for the position that predicts each answer, which image patches hold the evidence
    pl = torch.from_numpy(np.stack(plabels))
    rows, cols, targets = [], [], []
    for b in range(len(seqs)):
        qpos = [t for t in range(width - 1) if int(labels[b, t + 1]) not in (-100, EOS_ID)]
        for t, refs in zip(qpos, evid[b]):
            if refs:
                m = torch.isin(pl[b], torch.tensor(refs))
                if bool(m.any()):
                    rows.append(b)
                    cols.append(t)
                    targets.append(m)
    return {
        "pixel_values": pixels,
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "patch_labels": torch.from_numpy(np.stack(plabels)),
        "scene_labels": torch.from_numpy(np.stack(slabels)),
        "attn_rows": torch.tensor(rows, dtype=torch.long),
        "attn_cols": torch.tensor(cols, dtype=torch.long),
        "attn_targets": torch.stack(targets) if targets else torch.zeros((0, n_img), dtype=torch.bool),
    }


class AttentionProbe:
    """Captures the inputs of chosen decoder attention layers to recompute one head's attention rows."""

    def __init__(self, model: Any, layers: tuple[int, ...]) -> None:
        self.inputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.handles = []
        for i in layers:
            attn = model.model.language_model.layers[i].self_attn
            self.handles.append(attn.register_forward_pre_hook(self._hook(i), with_kwargs=True))
        self.model = model

    def _hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.inputs[i] = (h, kwargs["position_embeddings"])

        return hook

    def loss(self, batch: dict[str, torch.Tensor], heads: int = 1) -> torch.Tensor:
        """-log(attention mass on the evidence patches) of the first `heads` heads, at the answer positions."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        rows, cols, tgt = batch["attn_rows"], batch["attn_cols"], batch["attn_targets"]
        if rows.numel() == 0:
            return torch.zeros(())
        ids, mask = batch["input_ids"], batch["attention_mask"]
        total = torch.zeros(())
        for i, (h, (cos, sin)) in self.inputs.items():
            attn = self.model.model.language_model.layers[i].self_attn
            d = attn.head_dim
            q = attn.q_proj(h).view(*h.shape[:2], -1, d)[:, :, :heads].transpose(1, 2)  # [B, h, L, d]
            k = attn.k_proj(h).view(*h.shape[:2], -1, d)[:, :, :heads].transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            qs = q[rows, :, cols]  # [M, h, d]
            scores = torch.einsum("mhd,mhld->mhl", qs, k[rows]) * attn.scaling  # [M, h, L]
            pos = torch.arange(ids.shape[1])
            valid = (pos[None, :] <= cols[:, None]) & mask[rows].bool()
            scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
            logp = scores.log_softmax(-1)
            img = ids[rows] == IMAGE_ID  # [M, L]; image tokens are in patch order
            img_logp = logp[:, :, :][img[:, None, :].expand_as(logp)].view(len(rows), logp.shape[1], -1)
            on = img_logp.masked_fill(~tgt[:, None, :], float("-inf")).logsumexp(-1)  # [M, h]
            total = total - on.mean()
        n = len(self.inputs)
        self.inputs.clear()
        return total / max(n, 1)

    def remove(self) -> None:
        for hd in self.handles:
            hd.remove()


def word_targets(tokenizer: Any) -> torch.Tensor:
    """[NUM_CLASSES, 2] token ids of (colour word, shape word) for every patch class (row 0, background: unused)."""
    from .scenes import COLORS, SHAPES

    rows = [[PAD_ID, PAD_ID]] + [tokenizer.convert_tokens_to_ids([c, s]) for c in COLORS for s in SHAPES]
    return torch.tensor(rows, dtype=torch.long)


def losses(
    model: Any,
    heads: AuxHeads,
    batch: dict[str, torch.Tensor],
    words: torch.Tensor | None = None,
    fg_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    inner = model.model
    feats = inner.vision_tower(batch["pixel_values"]).last_hidden_state  # vision_feature_layer = -1
    patch_logits = heads.patch(feats[:, 1:])
    cls_logits = heads.cls(feats[:, 0])
    image_embeds = inner.multi_modal_projector(feats[:, 1:])
    ids = batch["input_ids"]
    embeds = inner.get_input_embeddings()(ids)
    img_mask = (ids == IMAGE_ID).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(img_mask, image_embeds.to(embeds.dtype).reshape(-1))
    hidden = inner.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"]
    where = labels[:, 1:] != -100  # predict token t+1 from position t
    logits = model.lm_head(hidden[:, :-1][where])
    target = labels[:, 1:][where]
    answer_loss = F.cross_entropy(logits, target)
    # accuracy on answer words only (not on the </s> after them)
    is_word = target != EOS_ID
    acc = (logits.argmax(-1) == target)[is_word].float().mean()
    plabels = batch["patch_labels"].reshape(-1)
    pw = 1.0 + (fg_weight - 1.0) * (plabels > 0).float()  # object patches are few: weigh them up
    patch_ce = F.cross_entropy(patch_logits.reshape(-1, NUM_CLASSES), plabels, reduction="none")
    patch_loss = (patch_ce * pw).sum() / pw.sum()
    cls_loss = F.binary_cross_entropy_with_logits(
        cls_logits, batch["scene_labels"], pos_weight=torch.full_like(cls_logits[0], 3.0)
    )
    out = {"answer": answer_loss, "patch": patch_loss, "cls": cls_loss, "acc": acc}
    if words is not None:
        fg = batch["patch_labels"] > 0
        if bool(fg.any()):
            table = inner.get_input_embeddings().weight  # [V, D]
            sims = image_embeds[fg] @ table.t() / math.sqrt(table.shape[1])
            tgt = words[batch["patch_labels"][fg]]  # [M, 2]
            logp = sims.log_softmax(-1)
            out["word"] = -0.5 * (logp.gather(1, tgt[:, :1]) + logp.gather(1, tgt[:, 1:])).mean()
    return out


@torch.no_grad()
def quick_accuracy(model: Any, processor: Any, samples: list[Sample], batch: int = 16) -> float:
    """Teacher-forced single-turn accuracy (argmax of the first answer token), through the normal LLaVA forward."""
    model.eval()
    correct = 0
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        inputs = processor(
            images=[render(s.scene) for s in chunk],
            text=[prompt(s.qa.question) for s in chunk],
            return_tensors="pt",
            padding=True,
        )
        logits = model(**inputs).logits[:, -1]
        pred = processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        correct += sum(p == s.qa.answer for p, s in zip(pred, chunk))
    model.train()
    return correct / len(samples)


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    processor = build_processor()
    model = build_model(cfg.vision_width, cfg.vision_layers, cfg.text_width, cfg.text_layers, seed=cfg.seed)
    model.config._attn_implementation = "sdpa"
    heads = AuxHeads(cfg.vision_width)
    model.train()
    params = [p for p in [*model.parameters(), *heads.parameters()] if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    val = heldout(cfg.eval_samples, base=VAL_BASE)
    words = word_targets(processor.tokenizer) if cfg.word_weight else None
    layers = tuple(int(x) for x in cfg.attn_layers.split(",") if x) if cfg.attn_weight else ()
    probe = AttentionProbe(model, layers)
    budget = cfg.minutes * 60
    start = time.time()
    history: list[dict[str, float]] = []
    run: dict[str, float] = {}
    step = 0
    next_scene = cfg.seed * 10_000_000
    while step < cfg.max_steps:
        elapsed = time.time() - start
        progress = max(step / cfg.max_steps, elapsed / budget)
        if progress >= 1:
            break
        warm = min(1.0, (step + 1) / cfg.warmup)
        lr = cfg.lr * warm * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        seeds = list(range(next_scene, next_scene + cfg.batch))
        next_scene += cfg.batch
        batch = build_batch(seeds, processor, cfg.turns)
        parts = losses(model, heads, batch, words, cfg.fg_weight)
        loss = parts["answer"] + cfg.patch_weight * parts["patch"] + cfg.cls_weight * parts["cls"]
        if "word" in parts:
            loss = loss + cfg.word_weight * parts["word"]
        if layers:
            parts["attn"] = probe.loss(batch, cfg.attn_heads)
            loss = loss + cfg.attn_weight * parts["attn"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        for k, v in parts.items():
            run[k] = 0.9 * run.get(k, float(v.detach())) + 0.1 * float(v.detach())
        if step % cfg.log_every == 0:
            log(
                f"step {step} t={time.time() - start:.0f}s lr={lr:.2e} "
                + " ".join(f"{k}={v:.3f}" for k, v in run.items())
            )
        if cfg.eval_every and step % cfg.eval_every == 0:
            acc = quick_accuracy(model, processor, val)
            probe.inputs.clear()
            log(f"step {step} val_acc={acc:.3f}")
            history.append({"step": step, "seconds": time.time() - start, "val_acc": acc, **run})
    seconds = time.time() - start
    probe.remove()
    acc = quick_accuracy(model, processor, val)
    log(f"done: {step} steps, {step * cfg.batch} scenes, {seconds:.0f}s, val_acc={acc:.3f}")
    history.append({"step": step, "seconds": seconds, "val_acc": acc, **run})
    summary = {
        "steps": step,
        "scenes": step * cfg.batch,
        "questions": step * cfg.batch * cfg.turns,
        "seconds": round(seconds, 1),
        "val_acc": acc,
        "config": asdict(cfg),
        "history": history,
    }
    save(model, processor, cfg.out, summary)
    return summary


def save(model: Any, processor: Any, out: str | Path, summary: dict[str, Any]) -> None:
    """fp16 safetensors + config + processor files: a directory `from_pretrained` loads offline."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.half().save_pretrained(str(out), safe_serialization=True)
    model.float()
    processor.save_pretrained(str(out))
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
