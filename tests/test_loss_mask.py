"""A fine-tune's loss mask (merging.finetune.build_batch): exactly the answer's tokens and the turn's
end are trained, every prompt token is masked, for the toy template and a Qwen3-like one."""

import pytest
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoProcessor, CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

from merging.finetune import build_batch
from merging.loading import prompt, user_turn
from tests.paths import TOY

needs_toy = pytest.mark.skipif(not (TOY / "vlm" / "config.json").exists(), reason="toy family not built")

@needs_toy
def test_the_loss_mask_is_exactly_the_answer_tokens():
    """Against the toy vocabulary looked up word by word (its tokenizer splits on spaces): every prompt
    token is masked, the trained ones are the answer's words and the template's end of turn."""
    proc = AutoProcessor.from_pretrained(TOY / "vlm")
    vocab = proc.tokenizer.get_vocab()
    image = Image.open(TOY / "eval" / "images" / "perception_0000.png").convert("RGB")
    examples = [(image, "how many circles ?", "there are 3 circles . the answer is 3 ."), (None, "what is 2 + 3 ?", "5")]
    batch = build_batch(proc, examples)
    for i, (img, q, a) in enumerate(examples):
        words = ["<s>", "user", ":"] + ["<image>"] * 9 * (img is not None) + q.split() + ["assistant", ":"]
        want_prompt = [vocab[w] for w in words]
        want_answer = [vocab[w] for w in a.split()] + [vocab["</s>"]]
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, :n].tolist() == want_prompt + want_answer
        labels = batch["labels"][i]
        assert labels[:len(want_prompt)].eq(-100).all() and labels[n:].eq(-100).all()
        assert labels[len(want_prompt):n].tolist() == want_answer


def test_the_loss_mask_with_a_template_that_adds_tokens_after_the_generation_prompt():
    """A Qwen3-like template (byte-level BPE, an empty think block after the generation prompt that its
    written turns lack, <|im_end|>\\n closing a turn): the trained tokens decode to exactly the answer and
    the turn's end, the masked ones to exactly the generation prompt (the think block included)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<image>", "<think>", "</think>"]
    bpe.train_from_iterator(["how many circles are there ?\nthe answer is 3 .", "user\nassistant\n"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|pad|>", eos_token="<|im_end|>",
                                  extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}")
    image_proc = CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    proc = LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=16, chat_template=template,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
    image = Image.new("RGB", (48, 48), "red")
    examples = [(image, "how many circles are there ?", "there are 3 circles . the answer is 3 ."),
                (None, "how many ?", "3")]
    batch = build_batch(proc, examples)
    for i, (img, q, a) in enumerate(examples):
        labels, real = batch["labels"][i], batch["attention_mask"][i].bool()
        shown = prompt(proc, [user_turn(q, img is not None)])
        assert shown.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        masked = batch["input_ids"][i][real & labels.eq(-100)]
        assert tok.decode(masked) == shown.replace("<image>", "<image>" * 9)
        assert tok.decode(labels[labels.ne(-100)]) == a + "<|im_end|>\n"
        assert labels.ne(-100).nonzero().flatten().tolist() == list(range(len(masked), int(real.sum())))
