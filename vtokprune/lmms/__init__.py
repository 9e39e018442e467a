"""lmms-eval integration: the ``vtokprune`` model (any supported HF VLM + a pruning strategy) and local tasks.

Registered through the entry-point group ``lmms_eval.models`` (see pyproject.toml), so after
``pip install 'vtokprune[lmms-eval]'``::

    lmms-eval --model vtokprune --model_args pretrained=llava-hf/llava-1.5-7b-hf,strategy=visionzip,keep=64 \\
        --tasks pope,gqa --batch_size 8

The offline synthetic tasks (``vtokprune_toy``, ``vtokprune_toy_mc``) live in :mod:`vtokprune.lmms.tasks`; add them
with ``--include_path "$(python -m vtokprune.lmms.tasks)"``. See :mod:`vtokprune.lmms.model` for every model
argument, what the results record, and the data-parallel (torchrun / accelerate, GPU or CPU) commands.
"""

from __future__ import annotations

from typing import Any

MODEL_NAME = "vtokprune"
MODEL_CLASS_PATH = "vtokprune.lmms.model.VTokPruneLMM"


def manifest() -> Any:
    """The entry-point payload lmms-eval loads: a ModelManifest naming the model class (imported only when used)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS_PATH, aliases=("vtokprune_hf",))


def tasks_path() -> str:
    """The directory of vtokprune's local lmms-eval tasks (for ``--include_path``)."""
    from .tasks import path

    return path()


__all__ = ["MODEL_CLASS_PATH", "MODEL_NAME", "manifest", "tasks_path"]
