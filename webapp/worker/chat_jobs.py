"""The worker's chat job: one question answered by both sides of the tab's comparison, streamed token by
token (worker side).

The "merged" stream is this tab's merge or DRIFT run (the left pane), the "original" stream the model it
is compared with (the right pane): the original VLM unless the request names another merge or DRIFT run
(webapp.worker.panes). Both merges stay kept in the merger, so a repeated turn costs two generates and a
swap of the changed tensors, never a merge.
"""

from __future__ import annotations

from webapp.safety import open_image
from webapp.worker.chat import stream_answer
from webapp.worker.chat_insight import KeyTokens, question_check
from webapp.worker.panes import check_compare, request_triple, weights_of


def run_chat(ctx, args: dict) -> dict:
    """{"answers": {stream: text}, "notices", "check" (the question check), "keys" (key-token probabilities)}."""
    other = check_compare(args)
    progress = ctx.progress()
    loaded = ctx.models.get(request_triple(args), progress)
    image = open_image(args["image"]) if args.get("image") else None
    answers, notices = {}, []

    def notice(text):
        if text not in notices:
            notices.append(text)
            ctx.send("notice", text)

    recipe = args.get("recipe")
    if isinstance(recipe, dict) and isinstance(other, dict) and loaded.merger.max_snapshots < 2:
        notice(f"the memory plan keeps one merged state on {ctx.device} at this size, so each turn merges both "
               "sides again; compare with the original VLM (a swap) for quick turns")
    sides = ([("merged", recipe)] if recipe else []) + ([("original", other)] if args.get("original", True) else [])
    check = question_check(loaded.processor, args["question"], image)  # before any answer
    if check:
        ctx.send("partial", {"check": check})
    keys = KeyTokens(loaded.processor)
    for stream, variant in sides:
        (model, processor), _ = weights_of(ctx, loaded, variant, progress)
        answers[stream] = stream_answer(
            model, processor, args["question"], image, args.get("history", {}).get(stream),
            args.get("max_new_tokens", 48), args.get("temperature", 0.0),
            on_text=lambda piece, s=stream: ctx.send("token", {"stream": s, "text": piece}),
            cancelled=ctx.flag, on_notice=notice, on_logits=keys.recorder(stream))
    return {"answers": answers, "notices": notices, "check": check, "keys": keys.by_stream}
