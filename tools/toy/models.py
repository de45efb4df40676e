"""Configs and builders: the Llama base LM, the LLaVA VLM wrapped around it, the processor."""

from __future__ import annotations

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from tasks import toydata as td
from tools.toy.vocab import BOS, EOS, IMAGE, PAD

PATCH = 16
NUM_IMAGE_TOKENS = (td.IMAGE_SIZE // PATCH) ** 2  # "default" strategy drops the CLS token


def llama_config(vocab_size: int, num_layers: int = 4) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )


def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=td.IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=64,
    )


def generation_config() -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, do_sample=False, max_new_tokens=32
    )


def build_base(vocab_size: int, seed: int, num_layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(vocab_size, num_layers))
    model.generation_config = generation_config()
    return model


def build_vlm(base: LlamaForCausalLM, seed: int) -> LlavaForConditionalGeneration:
    """A LLaVA model: random vision tower and projector, language model copied from `base`."""
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=vision_config(),
        text_config=base.config.to_dict(),
        image_token_index=IMAGE,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        pad_token_id=PAD,
    )
    vlm = LlavaForConditionalGeneration(cfg)
    vlm.model.language_model.load_state_dict(base.model.state_dict())
    vlm.lm_head.load_state_dict(base.lm_head.state_dict())
    vlm.generation_config = generation_config()
    return vlm


def build_processor(tokenizer) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": td.IMAGE_SIZE},
        crop_size={"height": td.IMAGE_SIZE, "width": td.IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=td.IMAGE_TOKEN,
        chat_template=td.CHAT_TEMPLATE,
    )
