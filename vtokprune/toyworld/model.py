"""The toy LLaVA (DINOv2-small tower): config, word-level tokenizer, processor, prompt format, and loading the shipped checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .scenes import ANSWERS, IMAGE_SIZE, PATCH, QUESTION_WORDS

SPECIALS = ("<pad>", "<s>", "</s>", "<image>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID, UNK_ID = range(5)
PROMPT_WORDS = ("USER", "ASSISTANT", ":")
# The question comes before the picture and again after it: the visual tokens can read it (the picture's tokens only see
# what precedes them), and text-guided strategies still find it after the picture, where LLaVA-style prompts put it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% set ns = namespace(text='', image=false) %}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{% set ns.image = true %}{% else %}{% set ns.text = ns.text + c['text'] %}{% endif %}"
    "{% endfor %}"
    "USER: {{ ns.text }} {% if ns.image %}<image>\n{{ ns.text }} {% endif %}"
    "{% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy-dinov2-llava"


def prompt(question: str) -> str:
    """The single-turn prompt the model was trained on (same as the chat template's output)."""
    return f"USER: {question} <image>\n{question} ASSISTANT:"


def vocabulary() -> list[str]:
    words: list[str] = list(SPECIALS)
    for w in (*PROMPT_WORDS, *QUESTION_WORDS, *ANSWERS):
        if w not in words:
            words.append(w)
    return words


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok.add_special_tokens(list(SPECIALS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VISION_FEATURE_LAYER = -1  # DINOv2's last block (before its final LayerNorm) feeds the projector


def build_processor(tokenizer: Any | None = None) -> Any:
    """LlavaProcessor: 224 px, ImageNet normalisation (DINOv2's), PIL-backed (no torchvision needed)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(text_width: int = 256, text_layers: int = 4, heads: int = 4, seed: int = 0, vision: Any = None) -> Any:
    """A LlavaForConditionalGeneration: DINOv2-small tower (`vision`: a converted Dinov2Model whose weights are
    copied in; None leaves the tower random), 2-layer MLP projector, a small Llama decoder trained from scratch."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from .dinov2_convert import dinov2_small_config

    text = LlamaConfig(
        vocab_size=len(vocabulary()),
        hidden_size=text_width,
        intermediate_size=text_width * 3,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(  # type: ignore[call-arg]
        vision_config=dinov2_small_config(),
        text_config=text,
        image_token_id=IMAGE_ID,
        vision_feature_layer=VISION_FEATURE_LAYER,
        vision_feature_select_strategy="default",
        pad_token_id=PAD_ID,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    if vision is not None:
        # copy the state (loading the converted tower by file name trips transformers 5's key renames)
        model.model.vision_tower.load_state_dict(vision.state_dict())
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.max_new_tokens = 2
    model.generation_config.do_sample = False
    return model


def load(path: str | Path | None = None, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32) -> Any:
    """(model, processor) from a saved checkpoint directory (default: the shipped one), offline."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = ASSET_DIR if path is None else Path(path)
    model = LlavaForConditionalGeneration.from_pretrained(
        str(path), attn_implementation=attn_implementation, dtype=dtype, local_files_only=True
    ).eval()
    processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    return model, processor


@torch.no_grad()
def answer(model: Any, processor: Any, images: list[Any], questions: list[str]) -> list[str]:
    """Greedy single-word answers for a batch of (image, question) pairs, through `model.generate`."""
    inputs = processor(images=images, text=[prompt(q) for q in questions], return_tensors="pt", padding=True)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
