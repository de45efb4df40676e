"""What every UI panel shares: the worker client, launch options, and small helpers (UI side)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from gradio.utils import get_upload_folder

from merging.errors import LabError
from webapp import presets
from webapp.protocol import lane_of, triple_of
from webapp.ui.client import Job, WorkerClient

# A long job's kind as the waiting status names it.
HELD = {"analysis": "an analysis", "evaluate": "an evaluation", "leaderboard": "a leaderboard",
        "drift": "a DRIFT fine-tune", "export": "an export", "outcome": "a walkthrough step's measurement",
        "handout": "a handout", "sweep": "a sweep", "tune": "a tune"}


@dataclass
class Lab:
    client: WorkerClient
    cache_dir: Path
    models_root: str | None = None
    device: str = "auto"
    upload_dir: Path | None = None  # this server's own Gradio upload folder (app.py makes a private one)

    @property
    def read_roots(self) -> list[Path]:
        """The only folders a user-named file may be read from: this server's uploads and the models root."""
        return [Path(r) for r in (self.upload_dir or get_upload_folder(), self.models_root) if r]

    def triple(self, preset: str, vlm: str = "", reasoner: str = "", base: str = "") -> dict[str, str]:
        """The (vlm, reasoner, base) refs the UI's model inputs name; LabError when unusable."""
        if preset and preset != presets.CUSTOM:
            p = presets.by_label(preset)
            missing = [f"{role}: {msg}" for role, ref in p.triple().items() if (msg := presets.availability(ref))]
            if missing:
                raise LabError("; ".join(missing))
            return {k: presets.locate(v) for k, v in p.triple().items()}
        out, problems = {}, []
        for k, v in (("vlm", vlm), ("reasoner", reasoner), ("base", base)):
            try:
                out[k] = presets.resolve_custom(v, self.models_root)
            except LabError as e:  # all three checked: the user fixes every field at once
                problems.append(f"{k}: {e}")
        if problems:
            raise LabError("; ".join(problems))
        return out


def made_of(lab: Lab, variant, preset: str, vlm: str, reasoner: str, base: str) -> bool:
    """Whether a merge recipe or DRIFT run was made of the triple the model inputs name now (picking
    the same preset again changes nothing)."""
    if not variant:
        return False
    try:
        now = lab.triple(preset, vlm, reasoner, base)
    except LabError:
        return False
    return tuple(triple_of(variant)) == (now["vlm"], now["reasoner"], now.get("base"))


def session_of(request) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


def bar(done: int, total: int, width: int = 20) -> str:
    frac = 0.0 if total <= 0 else max(0.0, min(1.0, done / total))
    full = round(frac * width)
    return f"`{'█' * full}{'░' * (width - full)}` {frac * 100:3.0f}%"


def time_left(run_s: float, done: int, total: int, done_before: int = 0) -> str:
    """'; about 40 s left' at the pace of the run_s seconds in which done - done_before steps were done;
    while none is, that it is being estimated. done_before: steps already done when the clock started (a
    cached or precomputed part counts as done at once, and would make the pace look far faster)."""
    if total <= 0 or done >= total:
        return ""
    if done <= done_before:
        return "; estimating the time left"
    left = run_s * (total - done) / (done - done_before)
    return f"; about {left:.0f} s left" if left < 90 else f"; about {left / 60:.0f} min left"


def follow_status(client: WorkerClient, job: Job, verb: str):
    """Yield (markdown status, terminal event or None) while a job runs; the last has the event."""
    t0 = time.monotonic()
    started = None  # when the worker picked the job up
    pace_from = None  # (seconds, steps done) at the first progress line: the time left is estimated from then
    last = f"○ **{verb}…**"
    try:
        for ev, payload in client.follow(job):
            el = time.monotonic() - t0
            if ev == "tick" and (not job.cancel_requested or last.startswith("■")):
                continue  # nothing new to show
            if job.cancel_requested and ev not in ("result", "error", "cancelled"):
                # at once (also between two progress lines), and not overwritten by one meanwhile
                last = f"■ **Cancelling…** ({el:.0f} s)"
            elif ev == "waiting":
                ahead, holder = payload
                held = f"; the device is running {HELD.get(holder, holder)}" if holder else ""
                if holder and lane_of(job.kind) == "chat":
                    held += ", which lets this through between its steps"
                last = (f"○ **Waiting for the worker**: {ahead} job(s) ahead of this one{held} ({el:.0f} s)"
                        if ahead or holder else f"○ **Starting on the worker…** ({el:.0f} s)")
            elif ev == "started":
                started = el
                last = f"○ **{verb}…** ({el:.1f} s)"
            elif ev == "progress":
                done, total, msg = payload
                if pace_from is None:  # what is done by the first line came from a cache, or is the first step
                    pace_from = (started or 0, 0) if done <= 1 else (el, done)
                left = time_left(el - pace_from[0], done, total, pace_from[1])
                last = f"○ **{verb}…** {bar(done, total)} — {msg} ({el:.1f} s{left})"
            elif ev in ("result", "error", "cancelled"):
                yield last, (ev, payload, el)
                return
            yield last, None
    finally:
        if not job.done:  # the browser went away or the handler was stopped: stop the job too
            client.cancel(job)


def follow_result(client: WorkerClient, job: Job, verb: str, keep: tuple):
    """A handler's loop over follow_status: yields (status, *keep) while the job runs, and its one failure
    line (error or cancel) with keep; returns (payload, seconds) of a result, None otherwise. Use as
    `got = yield from follow_result(...)`."""
    for text, end in follow_status(client, job, verb):
        if end is None:
            yield (text, *keep)
            continue
        ev, payload, el = end
        if ev != "result":
            yield (f"{'■' if ev == 'cancelled' else '✗'} {payload}", *keep)
            return None
        return payload, el
    return None
