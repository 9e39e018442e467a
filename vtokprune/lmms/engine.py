"""Batched generation and log-likelihood scoring of (images, prompt) requests on a pruned HF VLM.

Shared by the lmms-eval model class (:mod:`vtokprune.lmms.model`) and the in-process sweep (:mod:`vtokprune.sweep`),
and free of any lmms-eval import. Batches are left padded, so the prompt ends at the same column in every row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Stats:
    """What the engine has run since the last `reset`: wall time, samples, kept visual tokens."""

    seconds: float = 0.0
    samples: int = 0
    batches: int = 0
    images: int = 0
    kept_tokens: int = 0
    available_tokens: int = 0
    text_tokens: int = 0

    def summary(self) -> dict[str, float | int | None]:
        return {
            "samples": self.samples,
            "seconds": round(self.seconds, 4),
            "ms_per_sample": round(1e3 * self.seconds / self.samples, 3) if self.samples else None,
            "kept_tokens": round(self.kept_tokens / self.images, 2) if self.images else None,
            "available_tokens": round(self.available_tokens / self.images, 2) if self.images else None,
            "text_tokens": round(self.text_tokens / self.samples, 2) if self.samples else None,
        }


def resolve_dtype(dtype: Any) -> Any:
    if dtype in (None, "auto"):
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
    value = getattr(torch, aliases.get(name, name), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, float16, bfloat16 or auto")
    return value


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(str(device))


def processor_for_tiny(model: Any) -> Any:
    """A LlavaProcessor for the embedded tiny random LLaVA (which ships none): the toy world's word tokenizer (same
    special ids) and a CLIP image processor at the model's resolution. Its answers are meaningless words."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from ..toyworld.model import CHAT_TEMPLATE, build_tokenizer

    vc = model.config.vision_config
    size = int(vc.image_size)
    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=build_tokenizer(),
        patch_size=int(vc.patch_size),
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def load_model(
    pretrained: str | None = None,
    dtype: Any = "auto",
    device: str | None = None,
    attn_implementation: str | None = None,
    device_map: Any = None,
) -> tuple[Any, Any, str]:
    """(model, processor, description). `pretrained` None/"embedded"/"default": the embedded default model."""
    if pretrained in (None, "", "embedded", "default"):
        from ..embedded import load_default

        model, processor, description = load_default()
        if processor is None:
            processor = processor_for_tiny(model)
        resolved = resolve_dtype(dtype)
        if resolved != "auto":
            model = model.to(resolved)
        if attn_implementation:
            model.set_attn_implementation(attn_implementation)
    else:
        from ..loading import load_pretrained

        kwargs: dict[str, Any] = {}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model, processor, description = load_pretrained(
            str(pretrained), dtype=resolve_dtype(dtype), device_map=device_map, **kwargs
        )
    if device_map is None:
        model = model.to(resolve_device(device))
    return model.eval(), processor, description


class Engine:
    """Runs requests on `model` with the processor's chat template; prunes with the strategy set by `set_strategy`."""

    def __init__(self, model: Any, processor: Any, description: str = "", system_prompt: str | None = None) -> None:
        self.model = model
        self.processor = processor
        self.description = description
        self.system_prompt = system_prompt
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.image_token = str(getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER)
        self.stats = Stats()
        self.last_rows: list[dict[str, int]] = []

    # ------------------------------------------------------------------ pruning

    def set_strategy(self, strategy: Any | None) -> None:
        """Prune with `strategy` from now on (None or "none": no pruning); replaces any earlier strategy."""
        from .. import api
        from ..registry import get_strategy

        api.remove(self.model)
        if strategy is None or (isinstance(strategy, str) and strategy.strip().lower() in ("", "none", "full")):
            return
        api.apply(self.model, get_strategy(strategy))

    @property
    def strategy(self) -> Any | None:
        from .. import api

        return api.strategy_of(self.model)

    def reset_stats(self) -> Stats:
        old, self.stats = self.stats, Stats()
        return old

    # ------------------------------------------------------------------ prompts

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt(self, text: str, n_images: int, answer: str | None = None) -> str:
        """The chat-formatted prompt with `n_images` image slots before `text` (placeholders in `text` are dropped)."""
        text = text.replace(self.image_token, "").replace(IMAGE_PLACEHOLDER, "").strip()
        content: list[dict[str, str]] = [{"type": "image"} for _ in range(n_images)]
        content.append({"type": "text", "text": text})
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        messages.append({"role": "user", "content": content})
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if template:
            return str(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        images = " ".join([self.image_token] * n_images)
        return f"USER: {images}\n{text} ASSISTANT:" if n_images else f"USER: {text} ASSISTANT:"

    def inputs(self, texts: list[str], images: list[list[Any]]) -> dict[str, Any]:
        """One left-padded batch of model inputs, as `generate` builds it: each text chat-formatted with its images."""
        return self._encode([self.prompt(t, len(ims)) for t, ims in zip(texts, images)], images)

    def _encode(self, texts: list[str], images: list[list[Any]]) -> dict[str, Any]:
        flat = [im for ims in images for im in ims]
        if flat:
            inputs = self.processor(images=flat, text=texts, return_tensors="pt", padding=True)
        else:
            inputs = self.tokenizer(texts, return_tensors="pt", padding=True)
        dtype = self.model.dtype
        out: dict[str, Any] = {}
        for k, v in dict(inputs).items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device)
                if v.is_floating_point():
                    v = v.to(dtype)
            out[k] = v
        return out

    def _account(self, n: int, seconds: float, has_images: bool) -> None:
        """Add one batch to the stats and set `last_rows`: per batch row, the visual tokens kept and available."""
        from .. import api

        self.stats.seconds += seconds
        self.stats.samples += n
        self.stats.batches += 1
        self.last_rows = [{"visual_tokens_kept": 0, "visual_tokens_available": 0} for _ in range(n)]
        self.stats.text_tokens += self._text_tokens()
        if not has_images:
            return
        sel = api.last_selection(self.model) if api.is_pruned(self.model) else None
        if sel is not None:
            self.stats.images += len(sel.kept)
            for kept, available, row in zip(sel.kept, sel.available, sel.sample_of):
                self.stats.kept_tokens += int(kept.numel())
                self.stats.available_tokens += int(available)
                if 0 <= row < n:
                    self.last_rows[row]["visual_tokens_kept"] += int(kept.numel())
                    self.last_rows[row]["visual_tokens_available"] += int(available)
        else:
            n_img, per = self._unpruned_image_tokens()
            self.stats.images += n_img
            self.stats.kept_tokens += n_img * per
            self.stats.available_tokens += n_img * per
            for row, count in enumerate(getattr(self, "_last_images_per_row", [])[:n]):
                self.last_rows[row]["visual_tokens_kept"] = count * per
                self.last_rows[row]["visual_tokens_available"] = count * per

    def _text_tokens(self) -> int:
        """Non-padding, non-image prompt tokens of the last batch (what the language model prefills besides images)."""
        ids, mask = getattr(self, "_last_ids", None), getattr(self, "_last_mask", None)
        if ids is None:
            return 0
        real = int(mask.sum()) if mask is not None else int(ids.numel())
        image_id = getattr(self.model.config, "image_token_id", None)
        return real - (int((ids == image_id).sum()) if image_id is not None else 0)

    def _unpruned_image_tokens(self) -> tuple[int, int]:
        ids = getattr(self, "_last_ids", None)
        image_id = getattr(self.model.config, "image_token_id", None)
        if ids is None or image_id is None:
            return 0, 0
        total = int((ids == image_id).sum())
        n = int(getattr(self, "_last_n_images", 0))
        return (n, total // n) if n else (0, 0)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ requests

    @torch.inference_mode()
    def generate(
        self, texts: list[str], images: list[list[Any]], gen_kwargs: dict[str, Any] | None = None
    ) -> list[str]:
        """One batch: greedy (unless temperature > 0) continuations, cut at the first `until` string."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        inputs = self.inputs(texts, images)
        self._last_ids, self._last_n_images = inputs["input_ids"], sum(len(i) for i in images)
        self._last_images_per_row = [len(i) for i in images]
        self._last_mask = inputs.get("attention_mask")
        temperature = float(kwargs.pop("temperature", 0) or 0)
        do_sample = bool(kwargs.pop("do_sample", False)) and temperature > 0
        generate_kwargs: dict[str, Any] = {
            "max_new_tokens": int(kwargs.pop("max_new_tokens", 32)),
            "do_sample": do_sample,
            "num_beams": int(kwargs.pop("num_beams", 1) or 1),
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if do_sample:
            generate_kwargs["temperature"] = temperature
            if kwargs.get("top_p") is not None:
                generate_kwargs["top_p"] = float(kwargs["top_p"])
        self._sync()
        start = time.perf_counter()
        out = self.model.generate(**inputs, **generate_kwargs)
        self._sync()
        self._account(len(texts), time.perf_counter() - start, bool(self._last_n_images))
        new = out[:, inputs["input_ids"].shape[1] :]
        mask = inputs.get("attention_mask")
        for row, counts in enumerate(self.last_rows):
            counts["input_tokens"] = int(mask[row].sum()) if mask is not None else int(inputs["input_ids"].shape[1])
            counts["output_tokens"] = int((new[row] != self.tokenizer.pad_token_id).sum())
        answers = [str(a) for a in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        return [_cut(a, until).strip() for a in answers]

    @torch.inference_mode()
    def loglikelihood(
        self, contexts: list[str], continuations: list[str], images: list[list[Any]]
    ) -> list[tuple[float, bool]]:
        """One batch: (sum of log-probs of the continuation's tokens, whether greedy decoding would produce them)."""
        prompts = [self.prompt(c, len(ims)) for c, ims in zip(contexts, images)]
        fulls = [p + c for p, c in zip(prompts, continuations)]
        n_cont = []
        for p, f in zip(prompts, fulls):
            p_ids = self.tokenizer(p, add_special_tokens=True)["input_ids"]
            f_ids = self.tokenizer(f, add_special_tokens=True)["input_ids"]
            n_cont.append(max(1, len(f_ids) - len(p_ids)))
        inputs = self._encode(fulls, images)
        self._last_ids, self._last_n_images = inputs["input_ids"], sum(len(i) for i in images)
        self._last_images_per_row = [len(i) for i in images]
        self._last_mask = inputs.get("attention_mask")
        self._sync()
        start = time.perf_counter()
        logits = self.model(**inputs, use_cache=False).logits
        self._sync()
        self._account(len(contexts), time.perf_counter() - start, bool(self._last_n_images))
        ids = inputs["input_ids"]
        results = []
        for row, n in enumerate(n_cont):
            # left padding: the continuation is the last n tokens of every row. In-LLM pruning may shorten the
            # logits (visual positions removed), which leaves the text tail, counted from the end, where it was.
            target = ids[row, -n:]
            pred = logits[row, -n - 1 : -1].float().log_softmax(-1)
            logprob = float(pred.gather(-1, target[:, None]).sum())
            greedy = bool((pred.argmax(-1) == target).all())
            results.append((logprob, greedy))
        return results


def images_of(visuals: Any) -> list[Any]:
    """A document's visuals (doc_to_visual's list, nested lists flattened) as RGB PIL images; anything else (video,
    audio) raises NotImplementedError."""
    flat: list[Any] = []
    for v in visuals or []:
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


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
