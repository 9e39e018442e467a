"""The model card (README.md beside the weights) of the toy DINOv2 LLaVA, written from training.json + a bench report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .bench import check_budget, checks_table, per_type_table, table
from .dinov2_convert import SOURCE_FILE, SOURCE_PACKAGE, SOURCE_SHA256
from .scenes import ANSWERS, COLORS, DIAMETER, OBJECT_COUNT, QUESTION_TYPES, SHAPES


def write_model_card(path: Path, report: dict[str, Any]) -> None:
    info = json.loads((path / "training.json").read_text()) if (path / "training.json").exists() else {}
    cfg = info.get("config", {})
    best = info.get("best", {})
    size_mb = sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**20
    k = check_budget(report["budgets"], report.get("visual_tokens", 256))
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "license: apache-2.0",
        "---",
        "",
        "# toy-dinov2-llava: a pruning benchmark model on a real pretrained vision tower",
        "",
        "A `LlavaForConditionalGeneration`: frozen **DINOv2-small** vision tower (ViT-S/14, 224 px, 16x16 = **256 "
        "visual tokens**, pretrained weights), a 2-layer MLP projector and a small Llama decoder trained from scratch "
        "on CPU on vtokprune's shape world. Its job is to rank visual-token pruning strategies offline.",
        "",
        "**What it measures**: how much of a question's evidence a pruning strategy keeps, under a language model "
        "trained to read arbitrary subsets of its visual tokens (kept tokens at their original positions). "
        "**What it does not measure**: a real VLM's sensitivity to pruning (its redundancy, its attention habits, "
        "its degradation on natural images and long answers). The ranking of [CLS]-based strategies rests on "
        "DINOv2's real [CLS] attention, which on these scenes falls on the objects.",
        "",
        "```python",
        "from transformers import AutoProcessor, LlavaForConditionalGeneration",
        "",
        "model = LlavaForConditionalGeneration.from_pretrained(path)",
        "processor = AutoProcessor.from_pretrained(path)  # LlavaProcessor + CLIPImageProcessorPil (no torchvision)",
        'q = "what color is the circle ?"',
        'text = f"USER: {q} <image>\\n{q} ASSISTANT:"  # the chat template writes this: question, picture, question',
        'inputs = processor(images=image, text=text, return_tensors="pt")',
        "model.generate(**inputs, max_new_tokens=1)",
        "```",
        "",
        "## Task",
        f"- Scenes (224x224): {OBJECT_COUNT[0]}-{OBJECT_COUNT[1]} shapes ({', '.join(SHAPES)}) in {len(COLORS)} "
        f"colours ({', '.join(COLORS)}), each colour and each shape at most once, {DIAMETER[0]:.0f}-{DIAMETER[1]:.0f} "
        "px across (about 2x2 patches), on a plain or softly textured background.",
        f"- Questions ({', '.join(QUESTION_TYPES)}): 'what color is the <shape> ?', 'what shape is the <colour> "
        f"object ?', 'is there a <colour> <shape> ?'; one-word answers out of {len(ANSWERS)}. Evidence: the patches "
        "of the referred object; for an absent pair, every object.",
        "- Splits by seed: train < 5e8, validation 5e8.. (model selection), held-out test >= 1e9 (never used for "
        "training or selection; the tables below).",
        "",
        "## Provenance and licences",
        f"- Vision tower: Meta's DINOv2 ViT-S/14 (Apache-2.0), converted from `{SOURCE_FILE}` of the PyPI package "
        f"`{SOURCE_PACKAGE}` (MIT), sha256 `{SOURCE_SHA256}`, by `python -m vtokprune.toyworld.dinov2_convert` "
        "(matches onnxruntime's final LayerNorm output to ~1.4e-5); stored here in fp16.",
        "- Projector and decoder: trained here from scratch; the package's licence (Apache-2.0).",
        "",
        "## Training",
        "- Frozen tower; its layer-12 patch features (before the final LayerNorm, [CLS] dropped) cached for "
        f"{info.get('train_scenes', '?')} training scenes.",
        "- Prompt: the question before the picture and again after it (the picture's tokens can read the question; "
        "text-guided strategies find it after the picture as usual).",
        "- Loss: answer cross-entropy (answer word and end of sequence) plus the projector's feature alignment (an "
        "object patch's projected token predicts that object's colour and shape words through the input embeddings, "
        "the role of LLaVA's stage-1 pretraining; ground-truth masks). **No supervision of any attention**, no "
        "strategy's scores. Without the alignment term the decoder stayed at the question-only prior for 1,500+ "
        "steps; with it it passed 95% validation accuracy by step 2,000.",
        "- Visual-token dropout (ground-truth masks and chance): a curriculum starting from the evidence objects' "
        "patches plus a random subset of the other objects' patches, then also random patches, every object's patches "
        "filled up with random ones, or some objects' patches, at a log-uniform budget "
        f"{cfg.get('min_keep', '?')}-{cfg.get('max_keep', '?')}, or all 256 tokens; kept tokens at their original "
        f"positions or (p = {cfg.get('contiguous_prob', '?')}) renumbered contiguously, as strategies feed them.",
        f"- Decoder: Llama, width {cfg.get('text_width', '?')}, {cfg.get('text_layers', '?')} layers, "
        f"{cfg.get('heads', '?')} heads; word-level tokenizer. AdamW lr {cfg.get('lr', '?')}, batch "
        f"{cfg.get('batch', '?')}, {cfg.get('threads', '?')} CPU thread(s), warmup + cosine.",
    ]
    if info:
        lines += [
            f"- {info['steps']} steps ({info['samples']} questions), {info['seconds'] / 60:.0f} minutes on a shared "
            f"2-core CPU; checkpoint kept: step {best.get('step')} (validation: unpruned "
            f"{100 * best.get('full', 0):.1f}%, random-28 {100 * best.get('random28', 0):.1f}%, oracle-28 "
            f"{100 * best.get('oracle28', 0):.1f}% / renumbered {100 * best.get('oracle28_contiguous', 0):.1f}%, "
            f"teacher-forced, n={cfg.get('val_samples', '?')}). {info.get('stopped', '')}",
            "- Feature cache: DINOv2 on 3,000 training + 300 validation scenes, ~25 minutes on one thread "
            "(once; training reads the cache).",
            "- Reproduce: `vtokprune train-toy --out DIR` (settings: `training.json`, `vtokprune/toyworld/train.py`).",
        ]
    lines += [
        f"- Weights: fp16 safetensors, {size_mb:.1f} MiB (of which the DINOv2 tower ~42 MiB).",
        "",
        f"## Held-out accuracy (n = {report['samples']} questions, greedy `generate`, 95% Wilson intervals)",
        "",
        table(report),
        "",
        "`oracle` keeps the patches the scene generator says hold the evidence (a ceiling, not a strategy). "
        "Validity checks and targets:",
        "",
        checks_table(report),
        "",
        f"Per question type at keep {k}:",
        "",
        per_type_table(report, k),
        "",
        "Reproduce: `vtokprune bench-toy` (or `python benchmarks/toy_accuracy.py`); it also writes CSV, JSON and a "
        "plot with error bars.",
    ]
    if report.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{n} ({why})" for n, why in report["skipped"].items()) + "."]
    lines += heads_section(path)
    (path / "README.md").write_text("\n".join(lines) + "\n")


def heads_section(path: Path) -> list[str]:
    """Card lines for the DyVTE / ATP heads shipped in `path/heads/` (none when there are none)."""
    heads = sorted(p.parent for p in path.glob("heads/*/head.json"))
    if not heads:
        return []
    lines = [
        "",
        "## Learned budget heads",
        "",
        "Trained on this model with `vtokprune train-budget` (labels from the frozen model on training-split "
        'questions; use them with `head="embedded"`):',
        "",
        "| head | calibration | decides at layers | fit on its training labels |",
        "|---|---|---|---|",
    ]
    for folder in heads:
        cfg = json.loads((folder / "head.json").read_text())
        fit = cfg.get("train_fit")  # dyvte: accuracy of the exit decision; atp: mean absolute error of the ratio
        shown = "?" if fit is None else (f"accuracy {100 * fit:.1f}%" if cfg["kind"] == "dyvte" else f"MAE {fit:.3f}")
        lines.append(f"| `heads/{folder.name}` | {cfg.get('calibration', '?')} | {cfg.get('layers')} | {shown} |")
    return lines
