"""Loading real models by id or path: safetensors only, ids and paths checked before anything is read; and the
pruning config a pruned model carries into `save_pretrained` (restored by :func:`load`).

A pruned model records its strategy in ``model.config.vtokprune`` (name, every field, vtokprune version), so
``model.save_pretrained(dir)`` writes it into ``dir/config.json`` beside the weights, and ``vtokprune.load(dir)``
(or ``vtokprune.apply(model, vtokprune.saved_strategy(model))`` after a plain transformers load) prunes again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from .errors import UnsupportedModelError, VTokPruneError

CONFIG_KEY = "vtokprune"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_model_ref(name: str) -> str:
    """A local directory, or a hub id `owner/name`; anything else is refused with the fix."""
    if os.path.isdir(name):
        return os.path.abspath(name)
    if os.path.exists(name):
        raise VTokPruneError(f"{name!r} is a file; pass the model's directory (with config.json) or a hub id")
    if not _HUB_ID.match(name) or ".." in name:
        raise VTokPruneError(f"{name!r} is neither an existing directory nor a hub id like 'llava-hf/llava-1.5-7b-hf'")
    return name


def load_pretrained(
    name: str, dtype: Any = "auto", device_map: Any = None, processor: bool = True, **kwargs: Any
) -> tuple[Any, Any, str]:
    """(model, processor, description) for any model type vtokprune has an adapter for. Weights: safetensors only.

    `processor=False` skips the processor (None is returned in its place), for checkpoints saved without one.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from .adapters import ADAPTERS

    ref = check_model_ref(name)
    if os.path.isdir(ref):
        check_weight_files(Path(ref))
    config = AutoConfig.from_pretrained(ref)
    if config.model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"{name!r} is a {config.model_type!r} model; vtokprune supports: {', '.join(sorted(ADAPTERS))}"
        )
    kwargs.setdefault("attn_implementation", "sdpa")
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            ref, dtype=dtype, device_map=device_map, use_safetensors=True, **kwargs
        ).eval()
    except OSError as e:
        if "safetensors" in str(e).lower() and not os.path.isdir(ref):
            raise VTokPruneError(f"{name!r}: {_PICKLE_REFUSED} ({e})") from e
        raise
    loaded = AutoProcessor.from_pretrained(ref) if processor else None
    return model, loaded, f"{name} ({config.model_type})"


_PICKLE_REFUSED = (
    "vtokprune loads safetensors weights only: pickle checkpoints (pytorch_model.bin, *.pt) are refused on purpose, "
    "since unpickling a file can run any code in it. Convert once, in an environment you trust: "
    "load it with transformers and call model.save_pretrained(directory) (safetensors by default)"
)


def check_weight_files(directory: Path) -> None:
    """Refuse, naming the file, a local checkpoint whose weights are pickle-only or whose safetensors are damaged."""
    safetensors = sorted(directory.glob("*.safetensors"))
    if not safetensors:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise VTokPruneError(f"{directory}: only pickle weights ({', '.join(pickles)}). {_PICKLE_REFUSED}")
        return
    for path in safetensors:
        check_safetensors_file(path)


def check_safetensors_file(path: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensor data the header points into:
    a truncated or corrupted file fails here with its name instead of deep inside the loader."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError("shorter than the 8-byte header length")
            header_len = int.from_bytes(prefix, "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError(f"header of {header_len} bytes does not fit in the file's {size} bytes")
            header = json.loads(f.read(header_len))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise VTokPruneError(f"{path}: not a readable safetensors file ({e}); re-download or re-save it") from None
    if 8 + header_len + end > size:
        raise VTokPruneError(
            f"{path}: truncated safetensors file ({size} bytes, the header needs {8 + header_len + end}); "
            "re-download or re-save it"
        )


# ---------------------------------------------------------------------------------------------- saved pruning config


def strategy_to_dict(strategy: Any) -> dict[str, Any]:
    """{"strategy": name, "fields": every field (defaults included), "vtokprune_version": ...}, JSON-safe."""
    from . import __version__

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return [[plain(k), plain(v)] for k, v in value.items()]  # int keys survive JSON as pairs
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    fields = {f.name: plain(getattr(strategy, f.name)) for f in dataclasses.fields(strategy)}
    return {"strategy": strategy.name, "fields": fields, "vtokprune_version": __version__}


def strategy_from_dict(record: Any) -> Any:
    """The Strategy that `strategy_to_dict` described (lists come back as tuples)."""
    from .registry import get_strategy

    def frozen(value: Any) -> Any:
        return tuple(frozen(v) for v in value) if isinstance(value, list) else value

    if not isinstance(record, dict) or "strategy" not in record:
        raise VTokPruneError(f"not a vtokprune pruning config: {record!r}")
    return get_strategy(record["strategy"], **{k: frozen(v) for k, v in dict(record.get("fields") or {}).items()})


def record_strategy(model: Any, strategy: Any) -> None:
    """Called by `apply`: the config (hence `save_pretrained`) carries the strategy; the repr names it."""
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CONFIG_KEY, strategy_to_dict(strategy))
    model._get_name = _PrunedName(type(model).__name__, repr(strategy))


def forget_strategy(model: Any) -> None:
    """Called by `remove`."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    if isinstance(model.__dict__.get("_get_name"), _PrunedName):
        del model.__dict__["_get_name"]


class _PrunedName:
    """The first line of a pruned model's repr: one line saying it is pruned and how to undo it."""

    def __init__(self, class_name: str, strategy: str) -> None:
        self.text = f"[vtokprune: pruned with {strategy}; vtokprune.remove(model) undoes it]\n{class_name}"

    def __call__(self) -> str:
        return self.text


def saved_strategy(model_or_config: Any) -> Any:
    """The strategy a checkpoint was saved with (None if it was saved unpruned)."""
    config = getattr(model_or_config, "config", model_or_config)
    record = getattr(config, CONFIG_KEY, None)
    return None if record is None else strategy_from_dict(record)


def load(name: str, dtype: Any = "auto", device_map: Any = None, **kwargs: Any) -> Any:
    """Load a checkpoint (hub id or directory, safetensors only) and prune it as it was saved.

    `vtokprune.load(dir)` after `pruned_model.save_pretrained(dir)` gives the same pruned model; a checkpoint saved
    unpruned loads unpruned. The processor, if any: `transformers.AutoProcessor.from_pretrained(dir)`.
    """
    from .api import apply

    model, _, _ = load_pretrained(name, dtype=dtype, device_map=device_map, processor=False, **kwargs)
    strategy = saved_strategy(model)
    if strategy is not None:
        delattr(model.config, CONFIG_KEY)
        apply(model, strategy)
    return model
