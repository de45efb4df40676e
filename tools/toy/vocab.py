"""The closed vocabulary shared by all three models, and the tokenizer built over it.

Words are collected from the fixed word lists and from many draws of every generator, so the
vocabulary is complete and identical whatever run (smoke or full) builds it.
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from tasks import toydata as td
from tools.toy import corpus

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", td.IMAGE_TOKEN]
PAD, UNK, BOS, EOS, IMAGE = range(5)


def collect_words(compare: bool = False) -> list[str]:
    words = {str(i) for i in range(td.MAX_NUMBER + 1)}
    words |= set(td.COLOURS) | set(td.SHAPES) | set(td.PLURAL.values()) | set(td.OBJECTS) | set(td.NAMES)
    words |= {"user", "assistant", ":", ".", "?", "+", "-", "=", "the", "answer", "is", "yes", "no"}
    rng = random.Random(0)
    texts = [corpus.base_text(rng) for _ in range(3000)]
    texts += [
        " ".join(td.random_text_math(rng)[1].__dict__[k] for k in ("question", "answer")) for _ in range(2000)
    ]
    for _ in range(500):
        scene = td.random_scene(rng)
        for kind in (*td.PERCEPTION_KINDS, "describe"):
            item = td.perception_item(scene, kind)
            texts.append(item.question + " " + item.answer)
        item = td.random_visual_math(rng)[1]
        texts.append(item.question + " " + item.answer)
    if compare:  # the comparison questions' words (off: the earlier families' vocabulary, unchanged)
        words |= {"than", "<", ">"}
    for t in texts:
        words.update(w for w in t.split() if w not in SPECIALS)
    return sorted(words)


def build_tokenizer(compare: bool = False) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in collect_words(compare):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": td.IMAGE_TOKEN},
        chat_template=td.CHAT_TEMPLATE,
        model_max_length=128,
    )
    return tok
