"""The callables `apply` installs on a model, and the guards that make unrecognised runtime states fail loudly.

They are small classes rather than closures so that `pickle` / `copy.deepcopy` of a pruned model stop with a message
that names the fix, instead of "cannot pickle local object" (or, for deepcopy, a copy whose forward still runs the
original model).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch
import transformers

from ..compat import cache_from_args
from ..errors import PruningStateError

if TYPE_CHECKING:
    from ..strategies.base import VisionStrategy

_PASS: ContextVar[Any] = ContextVar("vtokprune_adapter_pass", default=None)

COPY_HINT = (
    "a pruned model cannot be pickled, saved with torch.save or deep-copied (its forward is wrapped by vtokprune); "
    "call vtokprune.remove(model) first, copy or save it, and vtokprune.apply(...) again to each copy "
    "(save_pretrained saves the weights of a pruned model as usual)"
)


class _Installed:
    def __reduce__(self) -> Any:
        raise PruningStateError(f"vtokprune: {COPY_HINT}")

    def __deepcopy__(self, memo: dict) -> Any:
        raise PruningStateError(f"vtokprune: {COPY_HINT}")


class InstalledHook(_Installed):
    """A hook or method vtokprune installs on a model; refuses pickling / deep copies (see COPY_HINT)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class PrunedForward(_Installed):
    """Replaces the multimodal module's `forward`: every call goes through `adapter.pruned_forward`."""

    def __init__(self, adapter: Any, state: Any, original: Callable[..., Any], signature: inspect.Signature) -> None:
        self.adapter, self.state, self.original, self.signature = adapter, state, original, signature
        self.__signature__ = signature  # what inspect.signature (and generate's argument check) sees

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = self.signature.bind(*args, **kwargs)
        return self.adapter.pruned_forward(self.state, self.original, dict(bound.arguments))


class LabelledForward(_Installed):
    """Replaces the top-level forward of models that take `labels=`: the loss is computed on the pruned sequence.

    Pruning shortens the sequence the language model sees, so its logits have fewer rows than the caller's labels.
    The labels are gathered with the same compaction (pruned positions become -100) and the model's own loss function
    is applied; at keep-all this is exactly the unpruned loss.
    """

    def __init__(self, adapter: Any, state: Any, original: Callable[..., Any]) -> None:
        self.adapter, self.state, self.original = adapter, state, original
        self.signature = inspect.signature(original)
        self.__signature__ = self.signature

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = dict(self.signature.bind(*args, **kwargs).arguments)
        bound.update(bound.pop("kwargs", None) or {})
        labels = bound.pop("labels", None)
        if labels is None:
            return self.original(**bound)
        if bound.get("return_dict") is False:
            raise PruningStateError("vtokprune: labels= with return_dict=False is not supported on a pruned model")
        self.state.set_call_compaction(None)
        out = self.original(**bound)
        compaction = self.state.call_compaction()
        if compaction is not None:
            labels = compaction.gather(labels.to(compaction.cols.device), fill=-100)
        logits = out.logits
        if labels.shape[:2] != logits.shape[:2]:
            raise PruningStateError(
                f"vtokprune: labels of shape {tuple(labels.shape)} do not match the pruned logits "
                f"{tuple(logits.shape[:2])}; pass labels for every input token (and no logits_to_keep)"
            )
        vocab = self.adapter.text_config().vocab_size
        out.loss = self.adapter.model.loss_function(logits=logits, labels=labels.to(logits.device), vocab_size=vocab)
        return out


@contextmanager
def adapter_pass(state: Any) -> Iterator[None]:
    """Marks the current call as one that went through the adapter (see `bypass_guard`)."""
    token = _PASS.set(state)
    try:
        yield
    finally:
        _PASS.reset(token)


def bypass_guard(state: Any) -> Callable[..., Any]:
    """Pre-hook for the first decoder layer: refuse a filled KV cache that reached the decoder around the adapter."""

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        cache = cache_from_args(kwargs, context="the decoder layer's arguments")
        if _PASS.get() is state or cache is None or cache.get_seq_length() == 0:
            return None
        raise PruningStateError(
            f"vtokprune: a decoding step with a filled KV cache reached the language model without passing the "
            f"vtokprune adapter (transformers {transformers.__version__} may call the model in a way this vtokprune "
            "does not know); refusing to decode against a cache that may be pruned. Call the model itself (or "
            "generate), or vtokprune.remove(model) first"
        )

    return hook


def encoder_hook(
    original: Callable[..., Any], encode: Callable[..., Any], strategy: VisionStrategy
) -> Callable[..., Any]:
    """Wrap an encoder method (e.g. `get_image_features`) so it runs through `encode(original, args, strategy)`."""
    signature = inspect.signature(original)

    def hooked(*args: Any, **kwargs: Any) -> Any:
        bound = dict(signature.bind(*args, **kwargs).arguments)
        bound.update(bound.pop("kwargs", None) or {})
        return encode(original, bound, strategy)

    return hooked


def check_cache_lengths(record: Any, cache: Any, attention_mask: torch.Tensor | None, q: int) -> None:
    """A decoding step must continue the sequence the record describes; anything else is state we do not know."""
    past_len = int(cache.get_seq_length())
    done = past_len - record.lm_len
    if done < 0:
        raise PruningStateError(
            f"vtokprune: the KV cache holds {past_len} tokens but its pruned prefill left {record.lm_len}; it was "
            f"cropped or reused (transformers {transformers.__version__}). Prefill again with a new cache"
        )
    for stage in record.stages:
        layer_len = int(cache.get_seq_length(stage.layer))
        if layer_len != stage.comp.length + done:
            raise PruningStateError(
                f"vtokprune: decoder layer {stage.layer}'s KV cache holds {layer_len} tokens, expected "
                f"{stage.comp.length + done} after in-LLM pruning (transformers {transformers.__version__}); "
                "refusing to decode on"
            )
    if attention_mask is not None and attention_mask.dim() == 2:
        expected = record.outer_len + done + q
        if attention_mask.shape[1] != expected:
            raise PruningStateError(
                f"vtokprune: a decoding step's attention_mask has {attention_mask.shape[1]} columns; the unpruned "
                f"sequence so far has {expected} ({record.outer_len} prompt + {done} generated + {q} new). Pass the "
                "mask of the whole (unpruned) sequence, as generate does"
            )
