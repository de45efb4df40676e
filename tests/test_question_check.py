"""The chat's unknown-word check on the bundled tokenizer, against expectations written by hand, and
that it says nothing where a tokenizer knows every word."""

import pytest
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from analysis.question_check import check_question, edit_distance
from tests.paths import TOY

SAMPLE = TOY / "samples" / "sample_0.png"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOY / "vlm")


def sample():
    return Image.open(SAMPLE)


def test_a_question_in_the_vocabulary_gets_no_warning(tok):
    assert check_question(tok, "what color are the triangles ?", sample()).lines() == []
    assert check_question(tok, "How many SQUARES are there?", sample()).lines() == []  # the tokenizer lower-cases
    assert check_question(tok, "there are 3 apples . 4 more apples are added . how many apples now ?").lines() == []


def test_unknown_words_with_synonyms_edit_distance_and_the_closest_template(tok):
    c = check_question(tok, "How many purple dots can you see?", sample())
    assert c.unknown == ["purple", "dots", "can", "you"]
    assert c.suggestions == {"purple": [], "dots": ["circles"], "can": ["are"], "you": ["there"]}
    assert c.rewording == "how many circles are there ?"
    lines = c.lines()
    assert lines[0].startswith("the model does not know 'purple', 'dots', 'can', 'you'") and "<unk>" in lines[0]
    assert "'dots' -> 'circles'" in lines[1] and "how many circles are there ?" in lines[2]
    assert any("numbers 0-20" in line and "colours: blue green red yellow" in line for line in lines)
    assert any(line.startswith("the pictures it knows: 1-9 shapes") for line in lines)


def test_misspelling_number_out_of_range_and_word_problem(tok):
    c = check_question(tok, "how many sqaures are there ?", sample())
    assert c.unknown == ["sqaures"] and c.suggestions["sqaures"] == ["squares"]
    assert c.rewording == "how many squares are there ?"
    c = check_question(tok, "25 triangles are taken away . how many triangles are left ?", sample())
    assert c.unknown == ["25"] and c.suggestions["25"] == []  # a number gets no look-alike
    c = check_question(tok, "tally the balls", sample())  # 2 edits from 'balls': another word, not a typo
    assert c.suggestions["tally"] == []
    c = check_question(tok, "2 sqaures are taken away . how many squares are left ?", sample())
    assert c.rewording == "2 squares are taken away . how many squares are left ?"  # the question's own number
    c = check_question(tok, "tom has 3 dogs and gets 4 . how many dogs does tom have now ?")
    assert c.unknown == ["dogs"]
    assert c.rewording == "tom has 3 apples and gets 4 . how many apples does tom have now ?"


def test_a_picture_in_another_style_is_named_even_when_every_word_is_known(tok):
    drawing = Image.new("RGB", (200, 200), "white")
    ImageDraw.Draw(drawing).ellipse((20, 20, 120, 120), outline="black", width=3)  # a line drawing
    c = check_question(tok, "how many circles are there ?", drawing)
    assert c.unknown == [] and c.picture and "does not look like" in c.lines()[0]
    assert c.rewording is None


def test_edit_distance():
    assert edit_distance("sqaures", "squares") == 2 and edit_distance("", "abc") == 3
    assert edit_distance("circle", "circles") == 1 and edit_distance("same", "same") == 0


def _bpe_tokenizer():
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["how many circles are there"], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe)


def _closed_tokenizer():
    vocab = {"<unk>": 0, "how": 1, "many": 2, "cats": 3}
    wl = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="<unk>")


def test_other_tokenizers_only_where_a_word_becomes_the_unknown_token():
    assert check_question(_bpe_tokenizer(), "how many zebras ?", sample()).lines() == []  # bytes: every word
    c = check_question(_closed_tokenizer(), "how many dogs ?", sample())
    assert c.unknown == ["dogs", "?"] and c.rewording is None and c.suggestions == {}
    assert len(c.lines()) == 1 and c.picture is None  # not the toy family: no template, vocabulary or pictures
