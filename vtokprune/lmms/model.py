"""The lmms-eval model ``vtokprune``: any HF VLM vtokprune supports, with a pruning strategy, on standard benchmarks.

    lmms-eval --model vtokprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,strategy=visionzip,keep=64,dtype=bfloat16 \\
        --tasks gqa,mmbench_en_dev,mme,pope,textvqa_val --batch_size 8 --output_path logs/

``--model_args`` keys: ``pretrained`` (hub id or local directory; ``embedded`` or omitted: vtokprune's embedded
model), ``strategy`` (a registered name, default ``none``), ``keep`` or ``ratio`` (the budget), ``dtype``,
``device``, ``device_map``, ``attn_implementation``, ``batch_size``, ``system_prompt``; any other key is passed
to the strategy (``strategy=fastv,keep=64,layer=2``).

Data parallel on several GPUs or nodes, through accelerate (each process holds one copy of the model, lmms-eval
shards the documents by rank and gathers the results):

    accelerate launch --num_processes 8 -m lmms_eval --model vtokprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,strategy=visionzip,keep=64,dtype=bfloat16 \\
        --tasks pope,gqa --batch_size 8 --output_path logs/

(multi-node: add ``--num_machines N --machine_rank R --main_process_ip HOST --main_process_port PORT``).
"""

from __future__ import annotations

import os
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from .engine import Engine, load_model

_BUDGET_KEYS = ("keep", "ratio")


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
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not device_map:
            from accelerate import Accelerator

            self._accelerator = Accelerator()
            device = f"cuda:{self._accelerator.local_process_index}"
            self._rank = self._accelerator.process_index
            self._world_size = self._accelerator.num_processes
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
        self.set_strategy(strategy, keep=keep, ratio=ratio, **strategy_kwargs)

    # ------------------------------------------------------------------ configuration

    def set_strategy(self, strategy: Any = "none", **kwargs: Any) -> None:
        """Switch the pruning strategy (a Strategy, or a name with budget/keyword arguments) without reloading."""
        from ..registry import get_strategy
        from ..strategies.base import Strategy

        if isinstance(strategy, Strategy):
            self.engine.set_strategy(strategy)
            return
        name = str(strategy or "none").strip().lower()
        kwargs = {k: v for k, v in kwargs.items() if v is not None and not (k in _BUDGET_KEYS and v == "")}
        if name in ("none", "full", ""):
            if set(kwargs) - set(_BUDGET_KEYS):
                raise TypeError(f"unexpected model_args {sorted(kwargs)} without a pruning strategy")
            self.engine.set_strategy(None)
            return
        if "keep" in kwargs:
            kwargs["keep"] = int(kwargs["keep"])
        if "ratio" in kwargs:
            kwargs["ratio"] = float(kwargs["ratio"])
        self.engine.set_strategy(get_strategy(name, **kwargs))

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
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(doc) or []
        flat: list[Any] = []
        for v in visuals:
            if isinstance(v, (list, tuple)):
                flat.extend(v)
            else:
                flat.append(v)
        for v in flat:
            if not hasattr(v, "convert"):
                raise NotImplementedError(
                    f"vtokprune's lmms-eval model takes images (PIL), not {type(v).__name__}; video and audio "
                    "tasks are not supported"
                )
        return [v.convert("RGB") for v in flat]

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
        results: list[str | None] = [None] * len(args)
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
            for j, answer in zip(batch, self.engine.generate(texts, images, gen_kwargs)):
                results[j] = answer
                self.cache_hook.add_partial("generate_until", (args[j][0], args[j][1]), answer)
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        return [r if r is not None else "" for r in results]

    def loglikelihood(self, requests: list[Instance]) -> list[Any]:
        """Per request: (loss, greedy), loss = the continuation's summed negative log-likelihood (lmms-eval's
        convention: its multiple_choice scoring picks the choice with the lowest value)."""
        args = [r.args for r in requests]
        order = sorted(range(len(args)), key=lambda i: -len(args[i][0]) - len(str(args[i][1])))
        results: list[tuple[float, bool] | None] = [None] * len(args)
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
            for j, (logprob, greedy) in zip(batch, self.engine.loglikelihood(contexts, continuations, images)):
                results[j] = (-logprob, greedy)
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        return [_keep_tuple(r if r is not None else (float("inf"), False)) for r in results]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "vtokprune's lmms-eval model does not implement multi-round generation (generate_until_multi_round); "
            "use single-turn tasks"
        )


def _keep_tuple(result: tuple[float, bool]) -> Any:
    """lmms-eval 0.7.3 turns any model output that is not a string into ``str(output)`` (``unwrap_generation_output``),
    which breaks its own multiple_choice scoring; a GenerationResult passes its payload through untouched."""
    try:
        from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
    except ImportError:  # pragma: no cover - older lmms-eval: tuples pass through
        return result
    if unwrap_generation_output(result)[0] == result:
        return result
    return GenerationResult(text=result)  # type: ignore[arg-type]
