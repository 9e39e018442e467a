"""`vtokprune train-toy` and `vtokprune bench-toy`: entry points taking an argv list."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from .model import ASSET_DIR


def train_main(argv: list[str] | None = None) -> int:
    """Train the toy LLaVA from scratch and save it (fp16 safetensors + processor) to --out."""
    import torch

    from .train import TrainConfig, train

    parser = argparse.ArgumentParser(prog="vtokprune train-toy", description=train_main.__doc__)
    for f in dataclasses.fields(TrainConfig):
        default = f.default
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    cfg = TrainConfig(**vars(args))
    torch.set_num_threads(cfg.threads)

    def log(line: str) -> None:
        print(line, flush=True)

    summary = train(cfg, log)
    print(f"saved to {cfg.out}: {summary['steps']} steps, {summary['seconds']:.0f}s, val_acc={summary['val_acc']:.3f}")
    return 0


def bench_main(argv: list[str] | None = None) -> int:
    """Held-out accuracy unpruned and per strategy x budget; prints a table, writes JSON."""
    import torch

    from .bench import DEFAULT_BUDGETS, per_type_table, run_benchmark, table

    parser = argparse.ArgumentParser(prog="vtokprune bench-toy", description=bench_main.__doc__)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the shipped toy-llava)")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)))
    parser.add_argument("--strategies", default=None, help="comma-separated names (default: every registered one)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="toy_accuracy.json", help="where to write the results ('' to skip)")
    parser.add_argument("--card", action="store_true", help="also rewrite the checkpoint's README.md model card")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    budgets = tuple(int(b) for b in args.budgets.split(",") if b)
    strategies = [s.strip() for s in args.strategies.split(",")] if args.strategies else None
    report = run_benchmark(args.model, args.samples, budgets, strategies, args.batch)
    print()
    print(table(report))
    print()
    print(per_type_table(report, min(budgets)))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    if args.card:
        path = Path(args.model) if args.model else ASSET_DIR
        write_model_card(path, report)
        print(f"wrote {path / 'README.md'}")
    return 0


def answer_prior(samples: int) -> float:
    """Accuracy of answering each held-out question with its type's most frequent answer (image ignored)."""
    from collections import Counter

    from .scenes import heldout

    data = heldout(samples)
    by_kind: dict[str, Counter[str]] = {}
    for s in data:
        by_kind.setdefault(s.qa.kind, Counter())[s.qa.answer] += 1
    return sum(c.most_common(1)[0][1] for c in by_kind.values()) / len(data)


def write_model_card(path: Path, report: dict[str, Any]) -> None:
    from .bench import per_type_table, table
    from .scenes import ANSWERS, COLORS, QUESTION_TYPES, SHAPES

    info = json.loads((path / "training.json").read_text()) if (path / "training.json").exists() else {}
    cfg = info.get("config", {})
    size_kb = sum(p.stat().st_size for p in path.glob("*.safetensors")) / 1024
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "license: apache-2.0",
        "---",
        "",
        "# toy-llava: a tiny LLaVA trained from scratch on vtokprune's shape world",
        "",
        "A `LlavaForConditionalGeneration` (CLIP ViT vision tower, 336x336 input, patch 14 = **576 visual tokens**; "
        "a small Llama decoder) trained from scratch on CPU, on procedurally generated scenes from "
        "`vtokprune.toyworld`. It exists so that visual-token pruning strategies can be compared offline on a real "
        "trained model whose answers depend on specific image tokens (small objects cover about 2x2 of the 24x24 "
        "patches). It is no general-purpose model.",
        "",
        "```python",
        "from transformers import AutoProcessor, LlavaForConditionalGeneration",
        "",
        "model = LlavaForConditionalGeneration.from_pretrained(path)",
        "processor = AutoProcessor.from_pretrained(path)  # LlavaProcessor + CLIPImageProcessorPil (no torchvision)",
        'inputs = processor(images=image, text="USER: <image>\\nhow many objects are there ? ASSISTANT:", '
        'return_tensors="pt")',
        "model.generate(**inputs, max_new_tokens=1)",
        "```",
        "",
        "## Task",
        f"- Scenes: 2-6 shapes ({', '.join(SHAPES)}) in {len(COLORS)} colours ({', '.join(COLORS)}), each "
        "(colour, shape) pair at most once; small (18-26 px) or large (44-72 px); cluttered grey background (noise, "
        "strokes, dots, grey glyphs).",
        f"- Questions ({', '.join(QUESTION_TYPES)}), answered with one word out of {len(ANSWERS)}.",
        "- Held-out split: scenes with seeds >= 1e9 (training uses seeds below).",
        "",
        "## Architecture",
        f"- Vision: CLIP ViT, width {cfg.get('vision_width', '?')}, {cfg.get('vision_layers', '?')} layers, 4 heads, "
        "336px / patch 14; features from the last layer (`vision_feature_layer=-1`), [CLS] dropped "
        "(`vision_feature_select_strategy='default'`).",
        f"- Language model: Llama, width {cfg.get('text_width', '?')}, {cfg.get('text_layers', '?')} layers, "
        "word-level tokenizer (`tokenizers` WordLevel in `tokenizer.json`).",
        f"- Weights: fp16 safetensors, {size_kb:.0f} KiB.",
        "",
        "## Training",
        f"- From scratch, fp32 on CPU with {cfg.get('threads', 1)} thread(s), AdamW, warmup + cosine schedule, "
        "scenes generated on the fly.",
        "- Loss: answer cross-entropy (10 questions per image as a multi-turn conversation) + per-patch "
        "classification head on the vision features (which colour-shape pair covers each patch) + multi-label head "
        "on [CLS] (which pairs are present, which of them small) + projected patch tokens scored against the input "
        "word embeddings of their object's colour and shape words + attention supervision: at each answer position, "
        "the first two heads of decoder layers 1 and 2 are pushed to put their mass on the patches of the objects "
        "the question is about (`-log` of that mass). The auxiliary heads are not part of the checkpoint.",
    ]
    if "scenes" in info:
        lines += [
            f"- {info['steps']} steps x {cfg.get('batch')} images = {info['scenes']} scenes "
            f"({info['questions']} questions), {info['seconds'] / 60:.1f} minutes wall time; "
            f"lr {cfg.get('lr')}; validation accuracy at the end {100 * info['val_acc']:.1f}% (teacher-forced).",
            "- Reproduce: `vtokprune train-toy --out DIR` (see `vtokprune/toyworld/train.py` for the settings).",
        ]
    lines += [
        "",
        f"## Held-out accuracy ({report['samples']} questions, greedy `generate`)",
        "",
        table(report),
        "",
        f"Per question type, at keep {min(report['budgets'])}:",
        "",
        per_type_table(report, min(report["budgets"])),
        "",
        "Reproduce: `vtokprune bench-toy` (or `python benchmarks/toy_accuracy.py`).",
    ]
    full = next((r["accuracy"] for r in report["results"] if r["strategy"] == "none"), None)
    prior = answer_prior(report["samples"])
    lines += [
        "",
        "## Limitations",
        f"- Answering every question with the most frequent answer of its question type scores {100 * prior:.1f}% "
        "on the same split (no image needed)"
        + (f"; the unpruned model is {100 * (full - prior):+.1f} points above that." if full is not None else "."),
        f"- With {report['samples']} questions one accuracy has a standard error of about "
        f"{100 * (0.25 / report['samples']) ** 0.5:.1f} points: differences between strategies smaller than ~5 points "
        "are noise. More training (more steps, a GPU) is what makes this model rank pruning strategies.",
    ]
    if report.get("skipped"):
        lines += ["", "Skipped (CapabilityError): " + ", ".join(report["skipped"]) + "."]
    (path / "README.md").write_text("\n".join(lines) + "\n")
