"""The lmms-eval model ``vtokprune``: any HF VLM vtokprune supports, with a pruning strategy, on standard benchmarks.

    lmms-eval --model vtokprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,strategy=visionzip,keep=64,dtype=bfloat16 \\
        --tasks gqa,mmbench_en_dev,mme,pope,textvqa_val --batch_size 8 --output_path logs/

``--model_args`` keys: ``pretrained`` (hub id or local directory; ``embedded`` or omitted: vtokprune's embedded
model), ``strategy`` (a registered name, default ``none``), ``keep`` or ``ratio`` (the budget), ``dtype``,
``device``, ``device_map``, ``attn_implementation``, ``batch_size``, ``system_prompt``; any other key is passed
to the strategy (``strategy=fastv,keep=64,layer=2``).

Bad arguments (unknown strategy, ``keep=4.5``, ``keep=abc``, a budget or strategy parameter without a strategy)
raise before the model loads; under the lmms-eval command they stop it with exit status 2 (lmms-eval itself logs
model errors and exits 0).

With ``--log_samples``, every sample's ``token_counts`` has ``visual_tokens_kept`` / ``visual_tokens_available``,
``strategy`` (the resolved config, every field) and ``rank``; ``results["throughput"]`` has the averages
(``avg_visual_tokens_kept``) over every rank. :meth:`VTokPruneLMM.strategy_record` gives the same as a dict.

Data parallel on any device (one model copy per process; lmms-eval deals the documents round-robin by rank and
gathers the results; each process takes ``cuda:LOCAL_RANK``, or the CPU when there is no GPU)::

    torchrun --nproc_per_node 8 -m lmms_eval --model vtokprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,strategy=visionzip,keep=64,dtype=bfloat16 \\
        --tasks pope,gqa --batch_size 8 --output_path logs/
    # or: accelerate launch --num_processes 8 -m lmms_eval ...   (GPUs)
    # CPU: torchrun --nproc_per_node 2 -m lmms_eval --model vtokprune --model_args ...,device=cpu ...  (gloo)
    # multi-node, on each node: torchrun --nnodes N --node_rank R --nproc_per_node 8 --master_addr HOST0 \\
    #     --master_port 29500 -m lmms_eval ...
"""

from __future__ import annotations

import numbers
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms

from ..budget import validate_budget
from ..errors import BudgetError, VTokPruneError
from .engine import Engine, images_of, load_model

_NO_STRATEGY = ("none", "full", "")


@dataclass
class VisualTokenCounts(TokenCounts):
    """lmms-eval's per-sample token counts plus the visual tokens the strategy kept (logged with --log_samples)."""

    visual_tokens_kept: int | None = None
    visual_tokens_available: int | None = None
    strategy: str | None = None
    rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(super().to_dict())
        for key in ("visual_tokens_kept", "visual_tokens_available", "strategy", "rank"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d


def _budget_args(keep: Any, ratio: Any) -> dict[str, Any]:
    """model_args keep / ratio as the API takes them; lmms-eval hands over ints, floats or strings."""
    budget: dict[str, Any] = {}
    if keep is not None and keep != "":
        if isinstance(keep, numbers.Integral) and not isinstance(keep, bool):
            budget["keep"] = int(keep)
        elif isinstance(keep, str) and keep.strip().isdigit():
            budget["keep"] = int(keep.strip())
        else:
            raise BudgetError(
                f"model_args keep={keep!r} is not a whole number of visual tokens (e.g. keep=64); "
                "use ratio= for a fraction"
            )
    if ratio is not None and ratio != "":
        try:
            if isinstance(ratio, bool):
                raise ValueError
            budget["ratio"] = float(ratio)
        except (TypeError, ValueError):
            raise BudgetError(f"model_args ratio={ratio!r} is not a number in (0, 1] (e.g. ratio=0.25)") from None
    validate_budget(budget.get("keep"), budget.get("ratio"))
    return budget


def _under_lmms_eval_cli() -> bool:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return "lmms_eval.__main__" in sys.modules or getattr(spec, "name", "") == "lmms_eval.__main__"


def _fail(error: Exception) -> NoReturn:
    """The lmms-eval CLI logs any Exception from model construction and exits 0; a bad model argument must stop it
    with a non-zero status, so under that CLI the error leaves as SystemExit(2) (elsewhere it is raised as is)."""
    if _under_lmms_eval_cli():
        print(f"vtokprune: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    raise error


class VTokPruneLMM(lmms):
    """lmms-eval model wrapping a vtokprune-pruned HF VLM (generate_until and loglikelihood, batched, left padded)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = "embedded",
        strategy: str = "none",
        keep: int | None = None,
        ratio: float | None = None,
        dtype: str = "auto",
        device: str | None = None,
        device_map: str | None = None,
        attn_implementation: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        system_prompt: str | None = None,
        max_new_tokens: int = 128,
        **strategy_kwargs: Any,
    ) -> None:
        super().__init__()
        self._accelerator = None
        try:
            budget = _budget_args(keep, ratio)
            if str(strategy or "none").strip().lower() in _NO_STRATEGY and (budget or strategy_kwargs):
                given = ", ".join(f"{k}={v}" for k, v in {**budget, **strategy_kwargs}.items())
                raise VTokPruneError(
                    f"model_args {given} given without a pruning strategy; add strategy=<name> (e.g. strategy=cls) "
                    "or drop them to evaluate the unpruned model"
                )
            resolved = self._resolve(strategy, budget, strategy_kwargs)
        except (VTokPruneError, TypeError) as e:
            _fail(e)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not device_map:
            from accelerate import Accelerator

            # One process per device: this rank's GPU (cuda:LOCAL_RANK), or the CPU when there is none. Rank and world
            # come from the launcher's environment (torchrun / accelerate launch): on CPU, accelerate reports a single
            # process although the gloo group spans them all.
            self._accelerator = Accelerator()
            if torch.cuda.is_available() and str(device or "cuda") in ("", "auto", "cuda"):
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            elif device in (None, "", "auto"):
                device = "cpu"
            self._rank = int(os.environ.get("RANK", "0"))
            self._world_size = world
        model, processor, description = load_model(
            None if pretrained is None else str(pretrained),
            dtype=dtype,
            device=device,
            attn_implementation=attn_implementation,
            device_map=device_map or None,
        )
        self.engine = Engine(
            model, processor, description, system_prompt=self._resolve_system_prompt(system_prompt or "")
        )
        self.pretrained = pretrained
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1
        self.default_max_new_tokens = int(max_new_tokens)
        try:
            self.engine.set_strategy(resolved)
        except VTokPruneError as e:
            _fail(e)
        self._log_configuration()

    # ------------------------------------------------------------------ configuration

    @staticmethod
    def _resolve(strategy: Any, budget: dict[str, Any], strategy_kwargs: dict[str, Any]) -> Any:
        from ..registry import get_strategy
        from ..strategies.base import Strategy

        if isinstance(strategy, Strategy):
            if budget or strategy_kwargs:
                raise TypeError("pass budget/strategy arguments only with a strategy name, not with a Strategy")
            return strategy
        name = str(strategy or "none").strip().lower()
        if name in _NO_STRATEGY:
            if budget or strategy_kwargs:
                raise VTokPruneError(f"model_args {sorted({**budget, **strategy_kwargs})} need a pruning strategy")
            return None
        return get_strategy(name, **budget, **strategy_kwargs).with_default_budget()  # the paper's, or BudgetError

    def set_strategy(self, strategy: Any = "none", **kwargs: Any) -> None:
        """Switch the pruning strategy (a Strategy, or a name with budget/keyword arguments) without reloading."""
        budget = _budget_args(kwargs.pop("keep", None), kwargs.pop("ratio", None))
        self.engine.set_strategy(self._resolve(strategy, budget, {k: v for k, v in kwargs.items() if v is not None}))

    def strategy_record(self) -> dict[str, Any]:
        """What is evaluated, for the results: the resolved strategy (every field, defaults included) and versions."""
        import dataclasses

        from .. import __version__

        strategy = self.engine.strategy
        fields = {} if strategy is None else dataclasses.asdict(strategy)
        return {
            "vtokprune_version": __version__,
            "strategy": "none" if strategy is None else strategy.name,
            "strategy_config": repr(strategy) if strategy is not None else "none (unpruned)",
            "strategy_fields": {
                k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v) for k, v in fields.items()
            },
            "model": self.engine.description,
        }

    def _log_configuration(self) -> None:
        if self.rank == 0:
            record = self.strategy_record()
            print(
                f"vtokprune {record['vtokprune_version']}: {record['strategy_config']} on {record['model']}",
                file=sys.stderr,
            )

    def _token_counts(self, row: int) -> Any:
        counts = dict(self.engine.last_rows[row]) if row < len(self.engine.last_rows) else {}
        return VisualTokenCounts(
            input_tokens=counts.pop("input_tokens", None),
            output_tokens=counts.pop("output_tokens", None),
            visual_tokens_kept=counts.get("visual_tokens_kept"),
            visual_tokens_available=counts.get("visual_tokens_available"),
            strategy=self.strategy_record()["strategy_config"],
            rank=self.rank,
        )

    @property
    def model(self) -> Any:
        return self.engine.model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> Any:
        return self.engine.device

    @property
    def accelerator(self) -> Any:
        return self._accelerator

    # ------------------------------------------------------------------ requests

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual: Any, doc: Any) -> list[Any]:
        return [] if doc_to_visual is None else images_of(doc_to_visual(doc))

    def _progress(self, total: int, desc: str) -> Any:
        try:
            from tqdm import tqdm

            return tqdm(total=total, disable=self.rank != 0, desc=desc)
        except ImportError:  # pragma: no cover
            return None

    def generate_until(self, requests: list[Instance]) -> list[str]:
        args = [r.args for r in requests]
        # longest prompts first (OOM early, tight batches); requests with different generation kwargs never share one
        order = sorted(range(len(args)), key=lambda i: (repr(sorted(args[i][1].items())), -len(args[i][0])))
        results: list[GenerationResult | None] = [None] * len(args)
        bar = self._progress(len(args), "vtokprune generate")
        i = 0
        while i < len(order):
            key = repr(sorted(args[order[i]][1].items()))
            batch = [order[i]]
            while (
                len(batch) < self.batch_size
                and i + len(batch) < len(order)
                and repr(sorted(args[order[i + len(batch)]][1].items())) == key
            ):
                batch.append(order[i + len(batch)])
            i += len(batch)
            texts, images = [], []
            for j in batch:
                context, _, doc_to_visual, doc_id, task, split = args[j]
                texts.append(context)
                images.append(self._visuals(doc_to_visual, self._doc(task, split, doc_id)))
            gen_kwargs = dict(args[batch[0]][1])
            gen_kwargs.setdefault("max_new_tokens", self.default_max_new_tokens)
            for row, (j, answer) in enumerate(zip(batch, self.engine.generate(texts, images, gen_kwargs))):
                results[j] = GenerationResult(text=answer, token_counts=self._token_counts(row))
                self.cache_hook.add_partial("generate_until", (args[j][0], args[j][1]), answer)
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        self._log_kept_tokens(results)
        return [r if r is not None else GenerationResult(text="") for r in results]

    def loglikelihood(self, requests: list[Instance]) -> list[Any]:
        """Per request: (loss, greedy), loss = the continuation's summed negative log-likelihood (lmms-eval's
        convention: its multiple_choice scoring picks the choice with the lowest value)."""
        args = [r.args for r in requests]
        order = sorted(range(len(args)), key=lambda i: -len(args[i][0]) - len(str(args[i][1])))
        results: list[tuple[float, bool] | None] = [None] * len(args)
        counts: list[Any] = [None] * len(args)
        bar = self._progress(len(args), "vtokprune loglikelihood")
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            contexts, continuations, images = [], [], []
            for j in batch:
                context, target, doc_to_visual, doc_id, task, split = args[j]
                doc = self._doc(task, split, doc_id)
                contexts.append(context)
                continuations.append(target if isinstance(target, str) else str(target(doc)))
                images.append(self._visuals(doc_to_visual, doc))
            scored = self.engine.loglikelihood(contexts, continuations, images)
            for row, (j, (logprob, greedy)) in enumerate(zip(batch, scored)):
                results[j] = (-logprob, greedy)
                counts[j] = self._token_counts(row)
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        self._log_kept_tokens([GenerationResult(text="", token_counts=c) for c in counts])
        return [
            GenerationResult(text=r if r is not None else (float("inf"), False), token_counts=c)  # type: ignore[arg-type]
            for r, c in zip(results, counts)
        ]

    def _log_kept_tokens(self, results: list[Any]) -> None:
        """Aggregate kept visual tokens per sample into lmms-eval's results["throughput"] (avg_visual_tokens_*)."""
        counts = [r.token_counts for r in results if r is not None and r.token_counts is not None]
        kept = [c.visual_tokens_kept for c in counts if c.visual_tokens_kept is not None]
        available = [c.visual_tokens_available or 0 for c in counts if c.visual_tokens_kept is not None]
        generated = sum(c.output_tokens or 0 for c in counts)
        if self.world_size > 1:  # every rank's shard, so rank 0's summary covers the whole task
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                shards: list[Any] = [None] * self.world_size
                dist.all_gather_object(shards, (kept, available, generated))
                kept = [k for shard in shards for k in shard[0]]
                available = [a for shard in shards for a in shard[1]]
                generated = sum(shard[2] for shard in shards)
        if not kept:
            return
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        log_metrics(
            total_elapsed_time=self.engine.stats.seconds,
            total_gen_tokens=generated,
            avg_speed=0.0,
            additional_metrics={
                "visual_tokens_kept": sum(kept) / len(kept),
                "visual_tokens_available": sum(available) / len(available),
                "samples": len(kept),
            },
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "vtokprune's lmms-eval model does not implement multi-round generation (generate_until_multi_round); "
            "use single-turn tasks"
        )
