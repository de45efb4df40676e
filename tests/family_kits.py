"""Each VLM family as its checkpoint ships, in miniature: a tiny random model built with
transformers' own classes, a word-level tokenizer (the tokenizers library) holding the family's
real special tokens, the family's image processor and processor settings, and a chat template in
the family's style; beside it a text reasoner and base of the same language model (a triple the
lab merges). Written once per test session; a family takes a second or two. Below the builders, the
oracles of where an image goes: the positions a model itself fills with image features, and each
family's layout rule for the tokens of one image.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

WORDS = ["user", "assistant", "system", "how", "many", "circles", "squares", "are", "there", "?", "what", "is", "the",
         "answer", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "+", "-", "=", ".", ",", ":", "red", "blue",
         "shapes", "count", "describe", "image"]  # the last two: analysis.attention's default question
SPECIALS = {
    "llava": ["<image>"],
    "llava_next": ["<image>"],
    "idefics2": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
    "idefics3": ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
    + [f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)],
    "qwen2_vl": ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"],
    "mistral3": ["[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"],
    "gemma3": ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<image_soft_token>", "<end_of_image>"],
}
SPECIALS["qwen2_5_vl"] = SPECIALS["qwen2_vl"]
NO_TORCHVISION = importlib.util.find_spec("torchvision") is None
# the processor each family loads here: transformers' own class (the lab's image-only one derives from
# Qwen's), except Pixtral's, which transformers cannot import without torchvision
PROCESSORS = {"llava": "LlavaProcessor", "llava_next": "LlavaNextProcessor", "idefics2": "Idefics2Processor",
              "idefics3": "Idefics3Processor", "qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
              "gemma3": "Gemma3Processor"}
FAMILIES = ("llava", "llava_next", "idefics2", "idefics3", "qwen2_vl", "qwen2_5_vl", "mistral3", "gemma3")
BASE = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB = 128
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8)
MROPE = {"type": "mrope", "mrope_section": [1, 1, 2]}
WIDE, TALL = (64, 32), (32, 64)  # width x height: a 1 x 2 and a 2 x 1 grid where a family splits or tiles

TEMPLATES = {  # the families' turn layouts, shortened; {IMG} is where each family puts its image placeholder
    "llava": ("{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
              "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
              "{% if add_generation_prompt %}ASSISTANT:{% endif %}"),
    "idefics": ("{% for m in messages %}{{ m['role'] | capitalize }}:{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
                "{% if add_generation_prompt %}Assistant:{% endif %}"),
    "qwen": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
             "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "mistral": ("<s>{% for m in messages %}{% if m['role'] == 'user' %}[INST]{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}[IMG]{% else %}{{ c['text'] }}{% endif %}{% endfor %}[/INST]"
                "{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"),
    "gemma": ("<s>{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
              "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}"
              "{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
              "{% endif %}"),
}


def tokenizer(family: str):
    """A word-level tokenizer: the four base tokens, the family's specials, the toy words (128 ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[family]
    words = [w for w in (["USER", "ASSISTANT", "User", "Assistant", "model", "ASSISTANT:", "Assistant:", "USER:"] + WORDS)
             if w not in specials]
    vocab = {w: i for i, w in enumerate(BASE + specials + words)}
    assert len(vocab) <= VOCAB, len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # split on whitespace, and on the special tokens (added below) wherever they sit in a word
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Split(":", behavior="isolated")])
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    extra = {"extra_special_tokens": named} if family == "gemma3" else {}  # Gemma3's processor reads these
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", **extra)
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


def _ids(tok, *tokens) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def _llava(tok):
    import transformers as T

    (img,) = _ids(tok, "<image>")
    cfg = T.LlavaConfig(text_config=T.LlamaConfig(**TEXT), vision_config=T.CLIPVisionConfig(**CLIP),
                        image_token_index=img, vision_feature_select_strategy="default")
    ip = T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = T.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                            chat_template=TEMPLATES["llava"], num_additional_image_tokens=1)
    return T.LlavaForConditionalGeneration(cfg), proc


def _llava_next(tok):
    import transformers as T

    (img,) = _ids(tok, "<image>")
    cfg = T.LlavaNextConfig(text_config=T.LlamaConfig(**TEXT), vision_config=T.CLIPVisionConfig(**CLIP),
                            image_token_index=img, image_grid_pinpoints=[[32, 32]],
                            vision_feature_select_strategy="default")
    ip = T.LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   image_grid_pinpoints=[[32, 32]])
    proc = T.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8,
                                vision_feature_select_strategy="default", chat_template=TEMPLATES["llava"],
                                num_additional_image_tokens=1)
    return T.LlavaNextForConditionalGeneration(cfg), proc


def _idefics2(tok):
    import transformers as T

    (img,) = _ids(tok, "<image>")
    cfg = T.Idefics2Config(
        text_config=dict(model_type="mistral", **TEXT), vision_config=CLIP, image_token_id=img,
        perceiver_config=dict(hidden_size=32, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=8, num_key_value_heads=1))
    ip = T.Idefics2ImageProcessor(do_image_splitting=False, size={"shortest_edge": 32, "longest_edge": 32})
    proc = T.Idefics2Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=TEMPLATES["idefics"])
    return T.Idefics2ForConditionalGeneration(cfg), proc


def _idefics3(tok):
    import transformers as T

    (img,) = _ids(tok, "<image>")
    cfg = T.Idefics3Config(text_config=dict(model_type="llama", **TEXT), vision_config=CLIP, image_token_id=img,
                           scale_factor=2)
    ip = T.Idefics3ImageProcessor(do_image_splitting=True, size={"longest_edge": 64},
                                  max_image_size={"longest_edge": 32})
    proc = T.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=TEMPLATES["idefics"])
    return T.Idefics3ForConditionalGeneration(cfg), proc


def _qwen_config(T, cls, tok, vision: dict):
    img, vid, start = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>")
    return cls(text_config=dict(**TEXT, rope_scaling=MROPE), image_token_id=img, video_token_id=vid,
               vision_start_token_id=start, vision_config=vision)


def _qwen_processor(T, tok, name: str):
    ip = T.Qwen2VLImageProcessor(min_pixels=32 * 32, max_pixels=32 * 32, patch_size=4, merge_size=2,
                                 temporal_patch_size=2)
    return ip, {"processor_class": name, "chat_template": TEMPLATES["qwen"]}


def _qwen2_vl(tok):
    import transformers as T

    cfg = _qwen_config(T, T.Qwen2VLConfig, tok, dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2,
                                                       patch_size=4, spatial_merge_size=2, temporal_patch_size=2))
    return T.Qwen2VLForConditionalGeneration(cfg), _qwen_processor(T, tok, "Qwen2VLProcessor")


def _qwen2_5_vl(tok):
    import transformers as T

    cfg = _qwen_config(T, T.Qwen2_5_VLConfig, tok, dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=4,
        spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0], window_size=16))
    return T.Qwen2_5_VLForConditionalGeneration(cfg), _qwen_processor(T, tok, "Qwen2_5_VLProcessor")


def _mistral3(tok):
    import transformers as T

    (img,) = _ids(tok, "[IMG]")
    cfg = T.Mistral3Config(
        text_config=dict(model_type="mistral", **TEXT), image_token_index=img, spatial_merge_size=2,
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, image_size=32, patch_size=8, head_dim=8))
    # the vision patch, as the real checkpoints ship it; the processor asks for patch * spatial_merge_size
    ip = T.PixtralImageProcessor(patch_size=8, size={"longest_edge": 32})
    return T.Mistral3ForConditionalGeneration(cfg), (ip, {
        "processor_class": "PixtralProcessor", "patch_size": 8, "spatial_merge_size": 2, "image_token": "[IMG]",
        "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]", "chat_template": TEMPLATES["mistral"]})


def _gemma3(tok):
    import transformers as T

    boi, img, eoi = _ids(tok, "<start_of_image>", "<image_soft_token>", "<end_of_image>")
    cfg = T.Gemma3Config(
        text_config=dict(model_type="gemma3_text", **{**TEXT, "num_key_value_heads": 2}, head_dim=8,
                         sliding_window=64),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8),
        mm_tokens_per_image=4, boi_token_index=boi, eoi_token_index=eoi, image_token_index=img)
    ip = T.Gemma3ImageProcessor(size={"height": 32, "width": 32})
    proc = T.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=TEMPLATES["gemma"])
    return T.Gemma3ForConditionalGeneration(cfg), proc


BUILDERS = {"llava": _llava, "llava_next": _llava_next, "idefics2": _idefics2, "idefics3": _idefics3,
            "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "mistral3": _mistral3, "gemma3": _gemma3}


def _save_processor(folder: Path, tok, proc) -> None:
    """The processor's files; for the families whose processor needs torchvision here (a tuple of
    image processor and settings), the files as the real checkpoint ships them, written by hand."""
    if not isinstance(proc, tuple):
        proc.save_pretrained(folder)
        return
    ip, settings = proc
    tok.save_pretrained(folder)
    ip.save_pretrained(folder)
    template = settings.pop("chat_template")
    (folder / "chat_template.jinja").write_text(template)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**pre, "processor_class": settings["processor_class"]}))
    if settings["processor_class"] == "PixtralProcessor":
        (folder / "processor_config.json").write_text(json.dumps(settings))


def _text_lm(vlm):
    """The plain causal LM of the VLM's text config (the reasoner's and base's architecture); Qwen2-VL's
    text config has no causal LM of its own: its reasoners are Qwen2 models."""
    import transformers as T

    text = vlm.config.get_text_config()
    tied = bool(getattr(vlm.config, "tie_word_embeddings", False))  # a VLM that ties has no lm_head of its own
    if text.model_type.startswith("qwen2"):
        return T.Qwen2ForCausalLM(T.Qwen2Config(**TEXT, tie_word_embeddings=tied))
    text.tie_word_embeddings = tied
    return T.AutoModelForCausalLM.from_config(text)


def build(family: str, root: Path, seed: int = 0) -> dict[str, Path]:
    """root/{vlm,reasoner,base}: the base random, the VLM's LM and the reasoner each the base plus
    a small perturbation (they share it as a parent)."""
    from tests.factories import _perturb

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    tok = tokenizer(family)
    vlm, proc = BUILDERS[family](tok)
    paths = {k: Path(root) / k for k in ("vlm", "reasoner", "base")}
    base = _text_lm(vlm)
    lm = getattr(vlm.model, "language_model", None) or vlm.model.text_model  # Idefics names it text_model
    missing, unexpected = lm.load_state_dict(base.model.state_dict(), strict=False)
    assert not unexpected, unexpected
    if getattr(vlm, "lm_head", None) is not None and getattr(base, "lm_head", None) is not None:
        vlm.lm_head.load_state_dict(base.lm_head.state_dict())
    base.save_pretrained(paths["base"])
    tok.save_pretrained(paths["base"])
    reasoner = _text_lm(vlm)
    reasoner.load_state_dict(base.state_dict())
    _perturb(reasoner, 0.05, gen)
    reasoner.save_pretrained(paths["reasoner"])
    tok.save_pretrained(paths["reasoner"])
    _perturb(lm, 0.05, gen)
    vlm.save_pretrained(paths["vlm"])
    _save_processor(paths["vlm"], tok, proc)
    return paths


# ------------------------------------------------------------ where each family puts an image
def scattered(model, enc) -> torch.Tensor:
    """[B, T] where the model itself puts image features: its decoder's input embeddings that are not
    the token embeddings of the ids."""
    seen = {}
    hook = model.get_decoder().register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**enc)
    finally:
        hook.remove()
    return (seen["inputs_embeds"] != model.get_input_embeddings()(enc["input_ids"])).any(-1)


def image_layout(family: str, config, enc, size) -> list[str]:
    """An image's tokens by the family's own rule, from the processor's image outputs."""
    if family in ("qwen2_vl", "qwen2_5_vl"):  # the patch grid, spatial_merge_size^2 patches a token
        n = int(enc["image_grid_thw"].prod()) // config.vision_config.spatial_merge_size ** 2
        return ["<|vision_start|>"] + ["<|image_pad|>"] * n + ["<|vision_end|>"]
    if family == "gemma3":
        return ["<start_of_image>"] + ["<image_soft_token>"] * config.mm_tokens_per_image + ["<end_of_image>"]
    if family == "mistral3":  # rows of [IMG] from the pixels' own size, a break after each row, the end last
        side = config.vision_config.patch_size * config.spatial_merge_size
        rows, cols = (s // side for s in enc["pixel_values"].shape[-2:])
        tokens = (["[IMG]"] * cols + ["[IMG_BREAK]"]) * rows
        return tokens[:-1] + ["[IMG_END]"]
    if family == "idefics3":  # 32 x 32 tiles of the image (longest edge 64), then the global image; 4 tokens each
        rows, cols = size[1] // 32, size[0] // 32
        tiles = [t for r in range(1, rows + 1) for c in range(1, cols + 1)
                 for t in ["<fake_token_around_image>", f"<row_{r}_col_{c}>"] + ["<image>"] * 4]
        return tiles + ["<fake_token_around_image>", "<global-img>"] + ["<image>"] * 4 + ["<fake_token_around_image>"]
    if family == "idefics2":
        return ["<fake_token_around_image>"] + ["<image>"] * 4 + ["<fake_token_around_image>"]  # the resampler's 4
    # LLaVA: (32 / 8)^2 CLIP patches; LLaVA-NeXT adds its one 32 x 32 tile unpadded to the image's 2:1 shape,
    # 4 x 2 patches with a newline feature per row: 16 + 8 + 2 (wide), 16 + 8 + 4 (tall)
    return ["<image>"] * {"llava": 16, "llava_next": 26 if size == WIDE else 28}[family]
