"""The worker process: owns the device, keeps the model loaded, runs jobs one at a time in two lanes.

Started by webapp.ui.client with the multiprocessing "spawn" context. A thread reads requests from
`requests` into the lanes (webapp.protocol.lane_of); it answers with events on `events` (see
webapp.protocol), and reads job ids to cancel from `control`; the cancel flag is checked between
tensors (merges), tokens (chat), steps (analyses) and batches (evaluations, the leaderboard).

Chat never waits for a long job to end: at each progress step of a long job that does not change
weights itself, the worker answers the chat lane's waiting jobs for the same triple, then puts the
weights back as the long job had them (a kept merge: no re-merge).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from merging import method_needs
from merging.engine import merge_to_disk
from merging.errors import LabError
from merging.inplace import PARTIAL
from merging.memory_plan import plan_triple
from merging.recipe import from_dict
from webapp.protocol import Cancelled, DriftRun, recipe_key, triple_of
from webapp.safety import limit_pil
from webapp.worker.chat_jobs import run_chat
from webapp.worker.drift_jobs import run_drift_job
from webapp.worker.evaluate_jobs import run_evaluate
from webapp.worker.lanes import CancelFlag, Lanes
from webapp.worker.models import SNAPSHOTS, ModelHolder, load_serving, pick_device, serving_itemsize
from webapp.worker.outcome_jobs import run_outcome
from webapp.worker.panes import request_triple


@dataclass
class JobContext:
    """What one job may use of the worker: its id and cancel flag, the device, the cache folder,
    the loaded models, its events, its progress callback, and the DRIFT result kept loaded."""

    job_id: int
    flag: CancelFlag
    device: str
    cache_dir: str | None
    models: ModelHolder
    worker: Worker  # for the two DRIFT-result helpers below only

    def send(self, kind: str, payload=None) -> None:
        self.worker.send(self.job_id, kind, payload)

    def progress(self, yields: bool = False):
        """progress(done, total, message); `yields`: the job changes no weights itself, so the chat
        lane is answered at each step."""
        return self.worker.progress_fn(self.job_id, self.flag, yields)

    def drift_loaded(self, folder: str, progress=None):
        return self.worker.drift_loaded(folder, progress)

    def forget_drift(self) -> None:
        self.worker.drift_model = None


JOBS: dict[str, Callable[[JobContext, dict], dict]] = {}


def job(kind: str):
    """Register a function (ctx, args) -> result dict as the job `kind`."""
    def register(fn):
        JOBS[kind] = fn
        return fn
    return register


class Worker:
    def __init__(self, events, control, config: dict):
        self.events, self.control, self.config = events, control, config
        self.device = pick_device(config.get("device", "auto"))
        self.cache_dir = config.get("cache_dir")
        limit = config.get("max_memory_gib")
        self.models = ModelHolder(self.device, bool(config.get("trust_remote_code", False)),
                                  config.get("cpu_dtype") or "float32",
                                  int(float(limit) * 2**30) if limit else None)
        self.cancelled: set[int] = set()
        self.lanes = Lanes()
        self._serving = False  # answering the chat lane inside a long job's step
        self.drift_model = None  # (folder, model, processor) of the last DRIFT result chatted with
        self._sweep_exports()

    def _sweep_exports(self) -> None:
        """Remove the temp folders of exports a killed worker left behind (finished ones are kept)."""
        if not self.cache_dir:
            return
        for sub in ("exports", "drift", "leaderboard"):
            for tmp in Path(self.cache_dir, sub).glob(".*.tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)

    # -- plumbing ------------------------------------------------------------------------------
    def send(self, job_id: int, kind: str, payload=None) -> None:
        self.events.put((job_id, kind, payload))

    def progress_fn(self, job_id: int, flag: CancelFlag, yields: bool = False):
        """progress(done, total, message) for a job: checks its cancel flag, sends progress events, and
        (yields: the job does not change weights itself) answers the chat lane at each step."""
        last = [0.0]

        def progress(done, total, message=""):
            flag.check()
            if yields:
                self.serve_chat_lane()
            now = time.monotonic()
            if now - last[0] >= 0.1 or done >= total:
                last[0] = now
                self.send(job_id, "progress", (int(done), int(total), str(message)))

        return progress

    def run(self, requests) -> None:
        threading.Thread(target=self._read, args=(requests,), daemon=True).start()
        while True:
            req = self.lanes.next()
            if req is None:
                break
            self.handle(req)

    def _read(self, requests) -> None:
        while True:
            try:
                req = requests.get()
            except (EOFError, OSError, ValueError):
                req = None
            self.lanes.put(req)
            if req is None:
                return

    def _can_serve_now(self, req: dict) -> bool:
        """A chat-lane request runs inside a long job only on the loaded triple and the DRIFT run kept
        loaded (no second model loaded beside the ones the long job holds)."""
        if req["kind"] == "ping":
            return True
        args = req.get("args", {})
        for variant in (args.get("recipe"), args.get("compare")):
            if isinstance(variant, DriftRun) and not (
                    self.drift_model is not None and self.drift_model[0] == str(Path(variant.folder).resolve())):
                return False
        try:
            triple = request_triple(args)
        except (TypeError, KeyError):
            return False
        loaded = self.models.loaded
        return loaded is not None and loaded.triple == triple

    def serve_chat_lane(self) -> None:
        """Answer the chat lane's waiting requests now (called between a long job's steps), then give
        the long job back the weights it had."""
        loaded = self.models.loaded
        if self._serving or (loaded is not None and loaded.merger.current == PARTIAL):
            return  # never in the middle of a change of the weights
        pending = self.lanes.take_chat(self._can_serve_now)
        if not pending:
            return
        self._serving = True
        state = loaded.state() if loaded is not None else None
        try:
            for req in pending:
                self.handle(req)
        finally:
            self._serving = False
            if loaded is not None and self.models.loaded is loaded:
                loaded.restore_state(state)

    def handle(self, req: dict) -> None:
        job_id, kind, args = req["id"], req["kind"], req.get("args", {})
        flag = CancelFlag(self.control, job_id, self.cancelled)
        if flag():
            self.send(job_id, "cancelled", "cancelled before it started")
            return
        self.send(job_id, "started")
        t0 = time.monotonic()
        try:
            result = dict(self.call(kind, args, job_id, flag) or {})
            result.setdefault("seconds", round(time.monotonic() - t0, 2))
            self.send(job_id, "result", result)
        except Cancelled:
            self.send(job_id, "cancelled", f"cancelled after {time.monotonic() - t0:.1f} s")
        except LabError as e:
            if flag():  # an error the cancel itself caused (a half-read input, say) reads as the cancel
                self.send(job_id, "cancelled", f"cancelled after {time.monotonic() - t0:.1f} s")
            else:
                self.send(job_id, "error", str(e))
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            self.send(job_id, "error", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
        finally:
            self.cancelled.discard(job_id)

    def call(self, kind: str, args: dict, job_id: int = 0, flag: CancelFlag | None = None):
        """Run the registered job `kind` here and now; LabError for a kind nobody registered."""
        fn = JOBS.get(kind)
        if fn is None:
            raise LabError(f"unknown job kind {kind!r}; known: {', '.join(sorted(JOBS))}")
        flag = flag or CancelFlag(self.control, job_id, self.cancelled)
        return fn(JobContext(job_id, flag, self.device, self.cache_dir, self.models, self), args)

    def drift_loaded(self, folder: str, progress=None):
        """(model, processor) of a DRIFT result folder; one is kept loaded beside the triple's VLM."""
        folder = str(Path(folder).resolve())
        drift_root = Path(self.cache_dir or ".", "drift").resolve()
        if Path(folder).parent != drift_root or not Path(folder, "config.json").is_file():
            raise LabError("that DRIFT result is gone; run DRIFT again")
        if self.drift_model is None or self.drift_model[0] != folder:
            self.drift_model = None
            if progress:
                progress(0, 1, f"loading the DRIFT result {Path(folder).name}")
            self.drift_model = (folder, *load_serving(folder, self.device, self.models.trust_remote_code))
        return self.drift_model[1], self.drift_model[2]


# -- jobs: each a function (ctx, args) -> result dict, registered by kind -----------------------
@job("ping")
def ping(ctx: JobContext, args: dict) -> dict:
    return {"device": ctx.device, "pid": os.getpid()}


@job("plan")
def plan(ctx: JobContext, args: dict) -> dict:
    """The memory plan of a triple on this worker's device, before anything of it is loaded."""
    triple = triple_of(args["triple"])
    loaded = ctx.models.loaded
    same = loaded is not None and loaded.triple == tuple(triple)
    freed = (0, 0)
    if loaded is not None and not same:  # loading this triple replaces that one
        use = loaded.plan.use
        freed = (use.get("device", 0), use.get("host", 0)) if ctx.device != "cpu" else (use["host"], use["host"])
    p = plan_triple(*triple, ctx.device, serving_itemsize(ctx.device, ctx.models.cpu_dtype),
                    loaded=same, max_sets=SNAPSHOTS, freed=freed, limit=ctx.models.limit)
    lines = p.lines()
    if p.fits:
        free = (p.host_free if ctx.device == "cpu" else p.device_free) - p.use.get(
            "host" if ctx.device == "cpu" else "device", 0)
        lines += method_needs.lines(*triple, ctx.device, max(0, free), "beside the served model", p.held_inputs())
    return {"fits": p.fits, "lines": lines, "plan": p.to_json()}


@job("merge")
def merge(ctx: JobContext, args: dict) -> dict:
    recipe = args["recipe"]
    progress = ctx.progress()
    loaded = ctx.models.get(triple_of(recipe), progress)
    t0 = time.monotonic()
    worked = loaded.ensure(recipe, progress=progress, cancel=ctx.flag)
    return {"key": recipe_key(recipe), "merge_seconds": round(time.monotonic() - t0, 2),
            "reused": not worked, "device": ctx.device, "report": loaded.merger.diagnostics.report}


@job("chat")
def chat(ctx: JobContext, args: dict) -> dict:
    return run_chat(ctx, args)


@job("analysis")
def analysis(ctx: JobContext, args: dict) -> dict:
    # The UI process imports this module too (webapp.ui.client), and a worker may only merge and chat.
    # lazy: analysis.runner imports plotly's figures, 0.22 s after torch (python -X importtime).
    from webapp.worker.analysis_jobs import run_analysis

    return run_analysis(ctx, args)


@job("evaluate")
def evaluate(ctx: JobContext, args: dict) -> dict:
    return run_evaluate(ctx, args)


@job("outcome")
def outcome(ctx: JobContext, args: dict) -> dict:
    return run_outcome(ctx, args)


@job("handout")
def handout(ctx: JobContext, args: dict) -> dict:
    # lazy: analysis.handout draws with plotly, 0.22 s after torch (python -X importtime).
    from webapp.worker.handout_jobs import run_handout

    return run_handout(ctx, args)


@job("leaderboard")
def leaderboard(ctx: JobContext, args: dict) -> dict:
    # lazy: analysis.leaderboard draws with plotly, 0.22 s after torch (python -X importtime).
    from webapp.worker.leaderboard_jobs import run_leaderboard

    return run_leaderboard(ctx, args)


@job("sweep")
def sweep(ctx: JobContext, args: dict) -> dict:
    # lazy: analysis.sweep draws with plotly, 0.22 s after torch (python -X importtime).
    from webapp.worker.tune_jobs import run_sweep

    return run_sweep(ctx, args)


@job("tune")
def tune(ctx: JobContext, args: dict) -> dict:
    # lazy: analysis.tune brings plotly and optuna (0.7 s after torch), for this job only.
    from webapp.worker.tune_jobs import run_tune

    return run_tune(ctx, args)


@job("drift")
def drift(ctx: JobContext, args: dict) -> dict:
    return run_drift_job(ctx, args)


@job("export")
def export(ctx: JobContext, args: dict) -> dict:
    out_dir = Path(args["out_dir"])
    progress = ctx.progress(yields=True)
    merge_to_disk(from_dict(args["recipe"]), out_dir, device=ctx.device, progress=progress, cancel=ctx.flag)
    return {"path": str(out_dir.resolve())}


def _exit_with_parent(parent_pid: int) -> None:
    """The UI process was killed without closing us: do not linger holding the device."""
    while True:
        time.sleep(2)
        if os.getppid() != parent_pid:
            os._exit(0)


def main(requests, events, control, config: dict) -> None:
    """Entry point of the spawned process."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    threads = config.get("threads")
    try:
        limit_pil()
        if threads:
            torch.set_num_threads(int(threads))
        worker = Worker(events, control, config)
    except Exception as e:
        events.put((-1, "fatal", f"the worker could not start: {type(e).__name__}: {e}"))
        return
    events.put((-1, "ready", {"device": worker.device, "pid": os.getpid()}))
    with contextlib.suppress(KeyboardInterrupt):
        worker.run(requests)
