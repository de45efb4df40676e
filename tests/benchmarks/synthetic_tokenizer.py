"""The synthetic Qwen2-shaped family's tokenizer: a byte-level BPE over the whole vocabulary, whose
words are single tokens, so a loadable synthetic checkpoint reads and writes text as Qwen2's does."""

from __future__ import annotations

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")  # ids 0-4, as the bundled toy family

# Qwen2's pre-tokenizer: transformers loads any qwen2 folder's tokenizer as Qwen2Tokenizer, which
# rebuilds this pipeline (byte-level BPE) around the vocabulary and merges of tokenizer.json.
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
ENGLISH = ("the of and to in is you that it he was for on are as with his they at be this have from or one had "
           "by word but not what all were we when your can said there use an each which she do how their if will "
           "up other about out many then them these so some her would make like him into time has look two more "
           "write go see number no way could people my than first water been call who its now find long down day "
           "did get come made may part image picture color shape count left right top bottom big small")


def build_tokenizer(vocab_size: int, max_length: int):
    """Byte-level BPE over the whole vocabulary, as Qwen2's: specials, the 256 byte symbols (any
    text encodes), then " word" as one token for a small English vocabulary and the toy family's
    words (its questions and chat template: "<s> user : <image> how many circles ? assistant :"),
    then filler tokens " tok<id>" up to vocab_size (they decode; no text encodes to them). Digits
    are single tokens, as Qwen2 splits numbers into digits."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    from tasks import toydata as td
    from tools.toy.vocab import collect_words

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = []
    for word in sorted({*collect_words(compare=True), *ENGLISH.split()}):
        if word.isdigit():
            continue
        # " word" is built one symbol at a time from the space symbol: every merge's left side
        # starts with it, so exactly one merge applies at each step and each word is one token.
        cur = "\u0120"  # the byte-level symbol of a space
        for ch in word:
            if cur + ch not in vocab:
                vocab[cur + ch] = len(vocab)
                merges.append((cur, ch))
            cur += ch
    if len(vocab) > vocab_size:
        raise SystemExit(f"error: vocab_size {vocab_size} is below the {len(vocab)} tokens of the words")
    while len(vocab) < vocab_size:
        vocab[f"\u0120tok{len(vocab)}"] = len(vocab)  # decodes as " tok<id>": a random model's output reads as words
    tk = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
                       fuse_unk=False, byte_fallback=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
                                   chat_template=td.CHAT_TEMPLATE, model_max_length=max_length)
