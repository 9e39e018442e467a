"""The one place that knows how transformers names things that changed between the releases we support.

transformers 5.24 renamed the model-forward argument `past_key_values` to `cache` (the old name is a deprecated alias
until 5.40), and decoder layers receive the cache under the new name too. Output objects expose both `cache` and a
compatibility `past_key_values`. Everything in vtokprune (and its tests) that looks for a KV cache goes through here,
and anything that does not fit what we know raises instead of computing on.
"""

from __future__ import annotations

from typing import Any

import transformers
from packaging.version import Version

from .errors import PruningStateError

TRANSFORMERS_VERSION = Version(transformers.__version__)
# The oldest release CI runs: `mm_encoder_outputs` (pre-encoded image features passed to the VLM forward) exists from it.
MIN_TRANSFORMERS = Version("5.18.0")
# Names a KV cache is passed under, newest first.
CACHE_ARG_NAMES = ("cache", "past_key_values")


def _cache_types() -> tuple[type, ...]:
    from transformers.cache_utils import Cache

    return (Cache,)


def is_cache(value: Any) -> bool:
    return isinstance(value, _cache_types())


def _where(context: str) -> str:
    return f"{context} (transformers {transformers.__version__}; vtokprune knows the cache names {CACHE_ARG_NAMES})"


def cache_from_args(args: dict[str, Any], context: str = "forward arguments") -> Any:
    """The KV cache in a call's arguments, under whichever name this transformers release uses, or None.

    Raises PruningStateError if two names carry different caches, or if a Cache object sits under a name we do not
    know (a future rename must turn into an error, not into a call that silently ignores our pruning record).
    """
    found = {name: args[name] for name in CACHE_ARG_NAMES if args.get(name) is not None}
    if len({id(v) for v in found.values()}) > 1:
        raise PruningStateError(
            f"vtokprune: two different KV caches were passed, as {sorted(found)}; " + _where(context)
        )
    for name, value in args.items():
        if name not in CACHE_ARG_NAMES and is_cache(value):
            raise PruningStateError(
                f"vtokprune: a KV cache was passed under the unknown argument name {name!r}; "
                + _where(context)
                + ". Upgrade vtokprune, or pin transformers to a release CI has run"
            )
    return next(iter(found.values()), None)


def normalise_cache_args(args: dict[str, Any], native: str) -> dict[str, Any]:
    """Return `args` with the cache (if any) under `native`, the name the wrapped forward declares."""
    cache = cache_from_args(args)
    out = {k: v for k, v in args.items() if k not in CACHE_ARG_NAMES}
    if cache is not None:
        out[native] = cache
    elif native in args:
        out[native] = args[native]
    return out


def native_cache_name(parameters: Any, context: str) -> str:
    """Which cache argument name a forward signature declares (its `inspect.signature(...).parameters`)."""
    for name in CACHE_ARG_NAMES:
        if name in parameters:
            return name
    raise PruningStateError(
        f"vtokprune: {context} takes no KV-cache argument under any known name; "
        + _where(context)
        + ". Upgrade vtokprune, or pin transformers to a release CI has run"
    )


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """`{name: cache}` under the name this transformers release's forwards take (for callers building a call)."""
    import inspect

    from transformers import LlamaModel

    return {native_cache_name(inspect.signature(LlamaModel.forward).parameters, "LlamaModel.forward"): cache}


def cache_from_output(out: Any) -> Any:
    """The KV cache a forward returned (`out.cache` from 5.24, `out.past_key_values` before), or None."""
    for name in CACHE_ARG_NAMES:
        value = getattr(out, name, None)
        if value is not None:
            return value
    return None


def check_supported() -> None:
    """Raise if the installed transformers is older than the oldest release CI runs."""
    if Version(TRANSFORMERS_VERSION.base_version) < MIN_TRANSFORMERS:
        raise ImportError(
            f"vtokprune needs transformers>={MIN_TRANSFORMERS} (pre-encoded image features, `mm_encoder_outputs`); "
            f"found {transformers.__version__}. Run: pip install -U 'transformers>={MIN_TRANSFORMERS}'"
        )


__all__ = [
    "CACHE_ARG_NAMES",
    "MIN_TRANSFORMERS",
    "TRANSFORMERS_VERSION",
    "cache_from_args",
    "cache_from_output",
    "cache_kwargs",
    "check_supported",
    "is_cache",
    "native_cache_name",
    "normalise_cache_args",
]
