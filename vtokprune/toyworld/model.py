"""The toy LLaVA: config, word-level tokenizer, processor, prompt format, and loading the shipped checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .scenes import ANSWERS, IMAGE_SIZE, PATCH, QUESTION_WORDS

SPECIALS = ("<pad>", "<s>", "</s>", "<image>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID, UNK_ID = range(5)
PROMPT_WORDS = ("USER", "ASSISTANT", ":")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %} "
    "{% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy-llava"


def prompt(question: str) -> str:
    """The single-turn prompt the model was trained on (same as the chat template's output)."""
    return f"USER: <image>\n{question} ASSISTANT:"


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


def build_processor(tokenizer: Any | None = None) -> Any:
    """LlavaProcessor with the PIL-backed CLIP image processor (no torchvision needed)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(
    vision_width: int = 128,
    vision_layers: int = 4,
    text_width: int = 128,
    text_layers: int = 3,
    seed: int = 0,
) -> Any:
    """A randomly initialised LlavaForConditionalGeneration with a 336px / patch-14 CLIP tower (576 image tokens)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=vision_width * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=vision_width,
    )
    text = LlamaConfig(
        vocab_size=len(vocabulary()),
        hidden_size=text_width,
        intermediate_size=text_width * 3,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    llava_kwargs: dict[str, Any] = dict(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_ID,
        # the last vision layer's output feeds the projector (LLaVA-1.5 uses -2; a toy model has no layer to spare)
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=PAD_ID,
    )
    config = LlavaConfig(**llava_kwargs)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
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
