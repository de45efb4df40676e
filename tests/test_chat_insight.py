"""The chat's insight block (pure rendering): the warning before the answers, the key-token table."""

from webapp.ui.chat_insight import insight_html, warning_markdown

CHECK = {"lines": ["the model does not know 'dots': its tokenizer reads it as <unk>, so the answer is a guess",
                   "closest known words: 'dots' -> 'circles'", "its 82 words: numbers 0-20",
                   "the pictures it knows: 1-9 shapes"]}
ROW = {"role": "count", "position": 2, "token": "5", "prob": 0.9, "top": [["5", 0.9], ["<4>", 0.05]]}


def test_the_pane_warning_is_short_and_the_block_has_everything():
    w = warning_markdown(CHECK)
    assert "does not know 'dots'" in w and "'dots' -> 'circles'" in w and "82 words" not in w
    assert warning_markdown(None) is None and warning_markdown({"lines": []}) is None
    html = insight_html([{"check": CHECK, "keys": {"merged": [ROW], "original": []}}])
    assert "82 words" in html and "pictures it knows" in html
    assert "merged model" in html and "original VLM" not in html  # a pane without key tokens has no column
    assert "&lt;4&gt;" in html and "0.90" in html and "0.05" in html  # tokens escaped
    assert insight_html([]) == "" and insight_html([{"question": "q"}]) == ""


def test_the_examples_offer_no_question_both_models_answer_wrong():
    from webapp.ui.chat_panel import examples

    ex = examples()
    texts = [m["text"] for m in ex]
    assert "what color are the triangles ?" not in texts and len(ex) == 4
    assert texts[2] == "5 triangles are taken away . how many triangles are left ?"
    assert ex[2]["files"][0].endswith("sample_4.png") and texts[0] == "how many squares are there ?"
