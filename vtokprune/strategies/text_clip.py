"""Text-guided pre-LLM selection: keep the patches whose CLIP embedding best matches the prompt's."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..errors import BudgetError, CapabilityError
from ..selection import gather_tokens, topk_indices
from .base import VisionSelection, VisionSignals, VisionStrategy
from .registry import register_strategy


def text_patch_scores(text_emb: torch.Tensor, patch_emb: torch.Tensor) -> torch.Tensor:
    """[N, P] text and [N, T, P] patch embeddings -> [N, T] cosine similarities."""
    t = F.normalize(text_emb.float(), dim=-1)
    p = F.normalize(patch_emb.float(), dim=-1)
    return torch.einsum("ntp,np->nt", p, t)


class ClipScorer:
    """A loaded CLIP (text tower, vision post-norm + projection) and the VLM tokenizer that decodes prompts."""

    def __init__(self, backend: str, clip: str, clip_tokenizer: str | None, vlm_tokenizer: str) -> None:
        from transformers import AutoTokenizer

        self.backend = backend
        self.vlm_tokenizer = AutoTokenizer.from_pretrained(vlm_tokenizer)
        if backend == "hf":
            from transformers import CLIPModel

            self.model: Any = CLIPModel.from_pretrained(clip).float().eval()
            self.tokenizer: Any = AutoTokenizer.from_pretrained(clip_tokenizer or clip)
            self.width = int(self.model.config.vision_config.hidden_size)
            self.max_len = int(self.model.config.text_config.max_position_embeddings)
        else:
            try:
                import open_clip
            except ImportError as e:
                raise CapabilityError(
                    "text_clip backend='open_clip' needs open_clip_torch: pip install 'vtokprune[clip]' "
                    "(or use backend='hf' with a transformers CLIP checkpoint)"
                ) from e
            name, _, pretrained = clip.partition(":") if not clip.startswith("hf-hub:") else (clip, "", "")
            self.model, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained or None)
            self.model = self.model.float().eval()
            self.tokenizer = open_clip.get_tokenizer(clip_tokenizer or name)
            visual = self.model.visual
            if getattr(visual, "proj", None) is None or not hasattr(visual, "ln_post"):
                raise CapabilityError(f"open_clip model {clip!r} has no ln_post/proj on its ViT; use a ViT CLIP")
            self.width = int(visual.ln_post.normalized_shape[0])

    @torch.no_grad()
    def encode_text(self, text: str, device: torch.device) -> torch.Tensor:
        """One prompt -> [P] text embedding (each prompt alone, so results never depend on the batch)."""
        self.model.to(device)
        if self.backend == "hf":
            inputs = self.tokenizer([text], truncation=True, max_length=self.max_len, return_tensors="pt").to(device)
            return self.model.get_text_features(**inputs).pooler_output[0]
        return self.model.encode_text(self.tokenizer([text]).to(device))[0]

    @torch.no_grad()
    def encode_patches(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, T, Dv] vision-tower hidden states -> [N, T, P]: post-layernorm then the visual projection."""
        self.model.to(hidden.device)
        x = hidden.float()
        if self.backend == "hf":
            return self.model.visual_projection(self.model.vision_model.post_layernorm(x))
        visual = self.model.visual
        return visual.ln_post(x) @ visual.proj

    def decode(self, ids: torch.Tensor) -> str:
        return str(self.vlm_tokenizer.decode(ids.tolist(), skip_special_tokens=True)).strip()


@lru_cache(maxsize=4)
def load_scorer(backend: str, clip: str, clip_tokenizer: str | None, vlm_tokenizer: str) -> ClipScorer:
    """Loaded once per (backend, clip, tokenizers) and cached."""
    return ClipScorer(backend, clip, clip_tokenizer, vlm_tokenizer)


@register_strategy
@dataclass(frozen=True)
class TextCLIP(VisionStrategy):
    """Text-guided selection before the LLM: keep the patches most similar to the prompt in CLIP space.

    score_j = cos(E_text(prompt), W_proj LN_post(h_j)), with h_j the VLM vision tower's hidden state of patch j at the
    output of the feature layer, LN_post and W_proj the CLIP's vision post-layernorm and visual projection, and
    E_text its text encoder applied to the image's prompt (decoded from its token ids with the VLM's `tokenizer`).
    Keep the k largest. In the spirit of CLIP-guided pruning/selection (e.g. Radford et al., CLIP, 2021 for the
    joint space); the projection is only meaningful when `clip` is the CLIP the VLM's vision tower came from
    (e.g. openai/clip-vit-large-patch14-336 for LLaVA-1.5), which must at least have the same width.

    clip: CLIP checkpoint name/path (backend "hf": transformers CLIPModel; "open_clip": "model[:pretrained]").
    tokenizer: the VLM's tokenizer name/path; clip_tokenizer: the CLIP's (default: `clip`). Loaded lazily, cached.
    When the feature layer is the tower's last, its input (not its output) is used: the runtime exposes layer inputs.
    """

    clip: str = ""
    tokenizer: str = ""
    backend: str = "hf"
    clip_tokenizer: str | None = None

    name: ClassVar[str] = "text_clip"
    paper: ClassVar[str] = "text-guided CLIP patch selection"
    needs: ClassVar[frozenset[str]] = frozenset({"hidden"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in ("hf", "open_clip"):
            raise BudgetError(f"text_clip backend must be 'hf' or 'open_clip', got {self.backend!r}")

    def _check_config(self) -> None:
        if not self.clip or not self.tokenizer:
            raise CapabilityError(
                "text_clip needs clip= (the CLIP checkpoint of the VLM's vision tower, e.g. "
                "'openai/clip-vit-large-patch14-336') and tokenizer= (the VLM's tokenizer, to read the prompt)"
            )

    def vision_layers(self, num_layers: int, feature_layer: int) -> tuple[int, ...]:
        self._check_config()  # fail when the strategy is applied, not at the first image
        return (min(feature_layer + 1, num_layers - 1),)

    def scorer(self) -> ClipScorer:
        self._check_config()
        return load_scorer(self.backend, self.clip, self.clip_tokenizer, self.tokenizer)

    def scores(self, signals: VisionSignals) -> torch.Tensor:
        if signals.prompt_ids is None:
            raise CapabilityError("text_clip needs the prompt: this adapter does not provide prompt_ids")
        hidden = signals.hidden[max(signals.hidden)]
        scorer = self.scorer()
        if scorer.width != hidden.shape[-1]:
            raise CapabilityError(
                f"text_clip: the VLM's vision tower has width {hidden.shape[-1]} but the CLIP {self.clip!r} has width "
                f"{scorer.width}; pass clip= the CLIP checkpoint the VLM's vision tower was initialised from"
            )
        texts = [scorer.decode(ids) for ids in signals.prompt_ids]
        text_emb = torch.stack([scorer.encode_text(text, hidden.device) for text in texts])
        return text_patch_scores(text_emb, scorer.encode_patches(hidden))

    def select(self, signals: VisionSignals, k: int) -> VisionSelection:
        feats = signals.features
        n, t = feats.shape[:2]
        if k >= t:
            return VisionSelection(torch.arange(t, device=feats.device).expand(n, t), feats)
        idx = topk_indices(self.scores(signals), k)
        return VisionSelection(idx, gather_tokens(feats, idx))
