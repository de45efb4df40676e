"""What the chat shows beside its answers (worker side): the words of the question the model cannot
read (analysis.question_check), sent before any answer, and the probabilities where each answer's
key tokens were produced (analysis.key_tokens), from generate's own logits: no extra forward pass."""

from __future__ import annotations

from analysis.key_tokens import key_tokens
from analysis.question_check import check_question
from merging.loading import tokenizer_of


def question_check(processor, question: str, image=None) -> dict | None:
    """The check's JSON when it has something to say, else None (a tokenizer that knows every word)."""
    check = check_question(tokenizer_of(processor), question, image)
    return check.to_json() if check.lines() else None


class KeyTokens:
    """Collects each pane's key-token table; `recorder(stream)` is stream_answer's on_logits."""

    def __init__(self, processor):
        self.tok = tokenizer_of(processor)
        self.by_stream: dict[str, list[dict]] = {}

    def recorder(self, stream: str):
        def record(ids, logits):
            self.by_stream[stream] = key_tokens(self.tok, ids, logits)
        return record
