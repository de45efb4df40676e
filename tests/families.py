"""Tiny random VLMs of every family the name mapping covers, built offline from configs.

Each builder returns (vlm_model, text_llm_model): the text LLM is the plain causal LM of the
VLM's own text config, whose tensor names are the independent ground truth for the mapping.
"""

from __future__ import annotations

import torch

TXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8)
MROPE = {"type": "mrope", "mrope_section": [1, 1, 2]}


def _llava():
    import transformers as T

    cfg = T.LlavaConfig(text_config=T.LlamaConfig(**TXT), vision_config=T.CLIPVisionConfig(**CLIP), image_token_index=127)
    return T.LlavaForConditionalGeneration(cfg), T.LlamaForCausalLM(T.LlamaConfig(**TXT))


def _llava_next():
    import transformers as T

    cfg = T.LlavaNextConfig(text_config=T.LlamaConfig(**TXT), vision_config=T.CLIPVisionConfig(**CLIP),
                            image_token_index=127, image_grid_pinpoints=[[32, 32]])
    return T.LlavaNextForConditionalGeneration(cfg), T.LlamaForCausalLM(T.LlamaConfig(**TXT))


def _idefics2():
    import transformers as T

    cfg = T.Idefics2Config(
        text_config=dict(model_type="mistral", **TXT), vision_config=CLIP, image_token_id=127,
        perceiver_config=dict(hidden_size=32, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=8, num_key_value_heads=1))
    return T.Idefics2ForConditionalGeneration(cfg), T.MistralForCausalLM(T.MistralConfig(**TXT))


def _idefics3():
    import transformers as T

    cfg = T.Idefics3Config(text_config=dict(model_type="llama", **TXT), vision_config=CLIP, image_token_id=127, scale_factor=2)
    return T.Idefics3ForConditionalGeneration(cfg), T.LlamaForCausalLM(T.LlamaConfig(**TXT))


def _qwen2_vl():
    import transformers as T

    cfg = T.Qwen2VLConfig(
        text_config=dict(**TXT, rope_scaling=MROPE), image_token_id=127, video_token_id=126, vision_start_token_id=125,
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3))
    return T.Qwen2VLForConditionalGeneration(cfg), T.Qwen2ForCausalLM(T.Qwen2Config(**TXT))


def _qwen2_5_vl():
    import transformers as T

    cfg = T.Qwen2_5_VLConfig(
        text_config=dict(**TXT, rope_scaling=MROPE), image_token_id=127, video_token_id=126, vision_start_token_id=125,
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3, fullatt_block_indexes=[0],
                           window_size=16))
    return T.Qwen2_5_VLForConditionalGeneration(cfg), T.Qwen2ForCausalLM(T.Qwen2Config(**TXT))


def _mistral3():
    import transformers as T

    cfg = T.Mistral3Config(
        text_config=dict(model_type="mistral", **TXT), image_token_index=127, spatial_merge_size=2,
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, image_size=32, patch_size=8, head_dim=8))
    vlm = T.Mistral3ForConditionalGeneration(cfg)
    return vlm, T.MistralForCausalLM(T.MistralConfig(**TXT, tie_word_embeddings=vlm.config.tie_word_embeddings))


def _gemma3():
    import transformers as T

    text = dict(**TXT, head_dim=8, sliding_window=16)
    cfg = T.Gemma3Config(
        text_config=dict(model_type="gemma3_text", **text), mm_tokens_per_image=4, image_token_index=127,
        boi_token_index=125, eoi_token_index=126,
        vision_config=dict(model_type="siglip_vision_model", **CLIP))
    return T.Gemma3ForConditionalGeneration(cfg), T.Gemma3ForCausalLM(T.Gemma3TextConfig(**text))


BUILDERS = {"llava": _llava, "llava_next": _llava_next, "idefics2": _idefics2, "idefics3": _idefics3,
            "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "mistral3": _mistral3, "gemma3": _gemma3}

# transformers <= 4.51 names (what save_pretrained writes) -> >= 4.52 / 5.x names.
_LLAVA_RULES = [(r"^language_model\.model\.", "model.language_model."), (r"^language_model\.lm_head\.", "lm_head."),
                (r"^vision_tower\.", "model.vision_tower."), (r"^multi_modal_projector\.", "model.multi_modal_projector."),
                (r"^image_newline$", "model.image_newline")]
_QWEN_RULES = [(r"^model\.", "model.language_model."), (r"^visual\.", "model.visual.")]
NEW_LAYOUT_RULES = {"llava": _LLAVA_RULES, "llava_next": _LLAVA_RULES, "mistral3": _LLAVA_RULES, "gemma3": _LLAVA_RULES,
                    "qwen2_vl": _QWEN_RULES, "qwen2_5_vl": _QWEN_RULES, "idefics2": [], "idefics3": []}


def build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return BUILDERS[family]()
