"""Where a sweep cell runs: `InProcessBackend` (vtokprune's own loop over the local toy-world tasks) or
`LmmsEvalBackend` (any lmms-eval task through lmms-eval's evaluator, the model loaded once)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

LOCAL_TASKS = ("vtokprune_toy", "vtokprune_toy_mc")


class InProcessBackend:
    """vtokprune's own evaluation loop over the local toy-world tasks (no lmms-eval)."""

    name = "inprocess"

    def __init__(self, model: str | None, device: str | None, dtype: str, batch_size: int) -> None:
        from ..lmms.engine import Engine, load_model

        m, processor, description = load_model(model, dtype=dtype, device=device)
        self.engine = Engine(m, processor, description)
        self.batch_size = batch_size

    def run(self, task: str, strategy: Any, limit: int | None) -> dict[str, Any]:
        from ..lmms.tasks import load_docs
        from ..lmms.tasks.vtokprune_toy import utils

        if task not in LOCAL_TASKS:
            raise ValueError(
                f"the inprocess backend runs the local tasks {', '.join(LOCAL_TASKS)}; use --backend lmms-eval "
                f"for {task!r}"
            )
        docs = load_docs(task, limit)
        self.engine.set_strategy(strategy)
        self.engine.reset_stats()
        correct = 0.0
        for i in range(0, len(docs), self.batch_size):
            chunk = docs[i : i + self.batch_size]
            texts = [utils.doc_to_text(d) for d in chunk]
            images = [utils.doc_to_visual(d) for d in chunk]
            if task == "vtokprune_toy":
                answers = self.engine.generate(texts, images, {"max_new_tokens": 4, "until": ["\n"]})
                correct += sum(utils.exact_match(a, d["answer"]) for a, d in zip(answers, chunk))
            else:
                for text, image, doc in zip(texts, images, chunk):
                    choices = utils.doc_to_choice(doc)
                    scores: list[float] = []
                    for j in range(0, len(choices), self.batch_size):
                        part = choices[j : j + self.batch_size]
                        res = self.engine.loglikelihood(
                            [text] * len(part), [" " + c for c in part], [image] * len(part)
                        )
                        scores.extend(r[0] for r in res)
                    best = max(range(len(choices)), key=lambda k: scores[k])
                    correct += float(best == utils.doc_to_choice_index(doc))
        stats = self.engine.stats.summary()
        stats["ms_per_sample"] = round(1e3 * self.engine.stats.seconds / max(1, len(docs)), 3)
        metric = "exact_match" if task == "vtokprune_toy" else "acc"
        return {"accuracy": correct / max(1, len(docs)), "metric": metric, "samples": len(docs), **stats}


class LmmsEvalBackend:
    """Any lmms-eval task, through lmms-eval's evaluator, with the `vtokprune` lmms-eval model loaded once."""

    name = "lmms-eval"

    def __init__(self, model: str | None, device: str | None, dtype: str, batch_size: int) -> None:
        from ..lmms.model import VTokPruneLMM

        self.task_manager = lmms_task_manager()
        self.lm = VTokPruneLMM(pretrained=model or "embedded", device=device, dtype=dtype, batch_size=batch_size)
        self.engine = self.lm.engine
        self.batch_size = batch_size

    @staticmethod
    def check_tasks(tasks: list[str]) -> None:
        known = set(lmms_task_manager().all_tasks)
        unknown = [t for t in tasks if t not in known]
        if unknown:
            import difflib

            hints = [
                f"{t!r}"
                + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(t, known, 1)) else "")
                for t in unknown
            ]
            raise ValueError(f"unknown lmms-eval task {', '.join(hints)}; `lmms-eval --tasks list` lists them")

    def run(self, task: str, strategy: Any, limit: int | None) -> dict[str, Any]:
        from lmms_eval import evaluator

        self.lm.set_strategy(strategy)
        engine = self.lm.engine
        engine.reset_stats()
        try:
            from lmms_eval.models.model_utils.gen_metrics import reset_logged_metrics

            reset_logged_metrics()  # throughput (kept visual tokens over every rank) per cell, not cumulative
        except ImportError:  # pragma: no cover
            pass
        results = evaluator.simple_evaluate(
            model=self.lm,
            tasks=[task],
            limit=limit,
            batch_size=self.batch_size,
            task_manager=self.task_manager,
            log_samples=False,
            verbosity="WARNING",
            bootstrap_iters=0,
            distributed_executor_backend="torchrun" if _distributed() else "accelerate",  # as lmms-eval's CLI does
        )
        if results is None:  # non-zero ranks under accelerate
            return {"accuracy": None, "metric": None, "samples": 0}
        metrics = dict(results["results"].get(task, {}))
        metric, accuracy = _primary_metric(metrics)
        stats = engine.stats.summary()
        samples = int(results.get("n-samples", {}).get(task, {}).get("effective", 0) or 0)
        if engine.stats.samples:  # this process's own samples: per-sample latency of one model copy
            stats["ms_per_sample"] = round(1e3 * engine.stats.seconds / engine.stats.samples, 3)
        kept = results.get("throughput", {}).get("avg_visual_tokens_kept")
        if kept is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            stats["kept_tokens"] = round(float(kept), 2)  # every rank's samples, not only this one's
        return {
            "accuracy": accuracy,
            "metric": metric,
            "metrics": metrics,
            **stats,
            "samples": samples or stats["samples"],
        }


_TASK_MANAGER: list[Any] = []


def lmms_task_manager() -> Any:
    """lmms-eval's task index with vtokprune's local tasks, built once per process."""
    if not _TASK_MANAGER:
        try:
            from lmms_eval.tasks import TaskManager
        except ImportError:
            raise ImportError("the lmms-eval backend needs lmms-eval: pip install 'vtokprune[lmms-eval]'") from None
        from ..lmms import tasks_path

        _TASK_MANAGER.append(TaskManager("WARNING", include_path=tasks_path()))
    return _TASK_MANAGER[0]


def _primary_metric(metrics: dict[str, Any]) -> tuple[str | None, float | None]:
    for key, value in metrics.items():
        if key == "alias" or "stderr" in key:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            return key.split(",")[0], number  # as lmms-eval reports it (some tasks use 0-100 or other scales)
    return None, None


BACKENDS: dict[str, Callable[..., Any]] = {"inprocess": InProcessBackend, "lmms-eval": LmmsEvalBackend}


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()
