"""Small learned heads that set visual-token budgets per input (DyVTE, ATP): the module, save / load, training.

A head reads the last token's hidden state entering decoder layer l (plus l / L) and returns one number in (0, 1):
DyVTE's probability that every visual token can exit before layer l without changing the answer, or ATP's fraction
of the visual tokens to keep at stage l. Heads are saved as `head.safetensors` + `head.json` in a directory.

Training (minutes on a CPU for the toy model; `vtokprune train-budget`): labels come from the model itself on
calibration data (the toy world's training split), compared with its unpruned answers, so no annotations are needed:

* DyVTE: for each sample and layer l, y = 1 if making every visual token exit before l keeps the greedy answer;
  binary cross-entropy.
* ATP: for each sample and stage l, y = the smallest fraction (of a grid) that, pruned at l alone, keeps the answer;
  mean squared error on the sigmoid output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BudgetError

KINDS = ("dyvte", "atp")
_CACHE: dict[str, tuple[BudgetHead, dict[str, Any]]] = {}


class BudgetHead(nn.Module):
    def __init__(self, hidden_size: int, width: int = 64) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.net = nn.Sequential(nn.Linear(hidden_size + 1, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, hidden: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """hidden [N, D], depth [N] (layer / num_layers) -> [N] logits."""
        x = torch.cat([self.norm(hidden.float()), depth.float()[:, None]], dim=-1)
        return self.net(x)[:, 0]


def save_head(head: BudgetHead, out: str | Path, config: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    from .. import __version__

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(out / "head.safetensors"))
    (out / "head.json").write_text(json.dumps({**config, "vtokprune_version": __version__}, indent=1, sort_keys=True))
    return out


EMBEDDED = "embedded"  # head=embedded: the heads shipped beside the embedded benchmark model


def head_dir(path: str | Path, kind: str) -> Path:
    """The directory a `head=` value names: a path, or "embedded" for the shipped head of that kind."""
    if str(path) == EMBEDDED:
        from ..embedded import TOY_DIR

        return TOY_DIR / "heads" / kind
    return Path(path)


def load_head(path: str | Path, kind: str) -> tuple[BudgetHead, dict[str, Any]]:
    """(head, config) from a directory written by `save_head` (or "embedded"); cached per path. BudgetError naming
    the fix."""
    folder = head_dir(path, kind)
    key = str(folder.resolve())
    if key in _CACHE and (folder / "head.safetensors").is_file():
        head, config = _CACHE[key]
        if config.get("kind") != kind:
            raise BudgetError(f"{str(folder)!r} is a {config.get('kind')!r} head, not a {kind!r} one")
        return head, config
    if not (folder / "head.json").is_file() or not (folder / "head.safetensors").is_file():
        raise BudgetError(
            f"{str(folder)!r} holds no budget head (head.json + head.safetensors); train one with "
            f"`vtokprune train-budget --kind {kind} --out DIR`"
        )
    from safetensors.torch import load_file

    config = json.loads((folder / "head.json").read_text())
    if config.get("kind") != kind:
        raise BudgetError(f"{str(folder)!r} is a {config.get('kind')!r} head, not a {kind!r} one")
    head = BudgetHead(int(config["hidden_size"]), int(config["width"]))
    head.load_state_dict(load_file(str(folder / "head.safetensors")))
    head.eval()
    _CACHE[key] = (head, config)
    return head, config


@torch.no_grad()
def head_output(head: BudgetHead, hidden: torch.Tensor, last_index: torch.Tensor, layer: int, num_layers: int):
    """[B] sigmoid output of the head on each sample's last token entering `layer`."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    h = hidden[rows, last_index.clamp(min=0)].to(next(head.parameters()).device)
    depth = torch.full((h.shape[0],), layer / num_layers, device=h.device)
    return torch.sigmoid(head(h, depth)).to(hidden.device)


def check_model(config: dict[str, Any], num_layers: int, hidden_size: int, path: str) -> None:
    if int(config["num_layers"]) != num_layers or int(config["hidden_size"]) != hidden_size:
        raise BudgetError(
            f"the head in {path!r} was trained for a decoder of {config['num_layers']} layers, width "
            f"{config['hidden_size']}; this one has {num_layers}, width {hidden_size}: train a head for this model"
        )
