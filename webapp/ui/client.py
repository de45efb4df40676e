"""UI-side proxy to the worker process: submit jobs, follow their events, cancel them.

One worker shared by every browser tab, with two FIFO lanes (webapp.protocol.lane_of): chat turns and
merges go before, and between the steps of, long jobs. Each job remembers the Gradio session that
made it, so "Cancel" in one tab only stops that tab's jobs.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from webapp.protocol import TERMINAL, lane_of, spawned_main

# Long jobs (analyses, evaluations, leaderboards, DRIFT, exports) one tab, and all tabs, may have
# running or waiting at once: one user cannot fill the worker's queue for everybody.
MAX_LONG_PER_SESSION = 2
MAX_LONG = 8
CRASHED = ("the worker stopped unexpectedly (exit code {code}: killed, or out of memory); it was "
           "restarted — please run this again")


@dataclass
class Job:
    id: int
    kind: str
    session: str | None
    events: queue.Queue = field(default_factory=queue.Queue)
    started: bool = False
    done: bool = False
    generation: int = 0  # which worker process it was sent to
    cancel_requested: bool = False  # the status then says "Cancelling" until the worker confirms


class WorkerClient:
    def __init__(self, config: dict):
        self.config = config
        self._ctx = mp.get_context("spawn")
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._jobs: dict[int, Job] = {}
        self._order: list[int] = []  # submitted, not finished, FIFO
        self._proc = None
        self._generation = 0
        self._closing = False
        self._dead: set[int] = set()  # generations whose death was handled
        self._ran: set[int] = set()  # generations that reported ready
        self.restarts = 0
        self.info: dict = {}
        self._ready = threading.Event()

    # -- process ------------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            self._generation += 1
            self._requests = self._ctx.Queue()
            self._events = self._ctx.Queue()
            self._control = self._ctx.Queue()
            self._ready.clear()
            self.info = {"state": "starting", "message": "starting…"}
            self._proc = self._ctx.Process(target=spawned_main, name="merge-lab-worker", daemon=True,
                                           args=(self._requests, self._events, self._control, self.config))
            self._proc.start()
            gen, proc, events = self._generation, self._proc, self._events
        threading.Thread(target=self._dispatch, args=(gen, proc, events), daemon=True).start()
        threading.Thread(target=self._watch, args=(gen, proc), daemon=True).start()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def wait_ready(self, timeout: float = 120) -> dict:
        self._ready.wait(timeout)
        return self.info

    def close(self) -> None:
        self._closing = True
        if self._proc is None:
            return
        try:
            self._requests.put(None)
            self._proc.join(5)
        finally:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc = None

    def _dispatch(self, gen: int, proc, events) -> None:
        while True:
            try:
                job_id, kind, payload = events.get(timeout=0.5)
            except queue.Empty:
                if not proc.is_alive():
                    self._on_death(gen, proc)
                    return
                continue
            except (EOFError, OSError, ValueError):
                self._on_death(gen, proc)
                return
            if job_id == -1:
                if kind == "ready":
                    self._ran.add(gen)
                self.info = {"state": kind, **(payload if isinstance(payload, dict) else {"message": payload})}
                self._ready.set()
                continue
            with self._lock:
                job = self._jobs.get(job_id)
                if job is None:
                    continue
                if kind == "started":
                    job.started = True
                if kind in TERMINAL:
                    job.done = True
                    self._jobs.pop(job_id, None)
                    if job_id in self._order:
                        self._order.remove(job_id)
            job.events.put((kind, payload))

    def _watch(self, gen: int, proc) -> None:
        """Backstop for _dispatch: if the worker died mid-message the event read can block forever."""
        wait([proc.sentinel])
        time.sleep(3)  # let _dispatch drain what the worker sent before it died
        self._on_death(gen, proc)

    def _on_death(self, gen: int, proc) -> None:
        """The worker of generation `gen` is gone: fail its jobs (once) and, when it had been running
        fine, start a fresh one at once (a worker that failed to start waits for the next request)."""
        with self._lock:
            if gen in self._dead:
                return
            self._dead.add(gen)
            proc.join(1)
            code = proc.exitcode
            lost = [j for j in self._jobs.values() if j.generation == gen]
            for j in lost:
                self._jobs.pop(j.id, None)
                if j.id in self._order:
                    self._order.remove(j.id)
            if self.info.get("state") == "fatal" and gen == self._generation:
                message = self.info.get("message", "the worker could not start")
            else:
                message = CRASHED.format(code=code)
            if gen == self._generation and gen in self._ran and not self._closing:
                self.restarts += 1
                self.start()
        for j in lost:
            j.done = True
            j.events.put(("error", message))

    # -- jobs ---------------------------------------------------------------------------------
    def refusal(self, kind: str, session: str | None) -> str | None:
        """Why a long job may not be queued now (one tab may hold MAX_LONG_PER_SESSION, all tabs
        MAX_LONG), or None. Chat-lane jobs are never refused: they never wait behind long ones."""
        if lane_of(kind) != "long":
            return None
        waiting = [j for j in self._jobs.values() if not j.done and lane_of(j.kind) == "long"]
        mine = [j for j in waiting if session is not None and j.session == session]
        if len(mine) >= MAX_LONG_PER_SESSION:
            kinds = ", ".join(sorted({j.kind for j in mine}))
            return (f"this tab already has {len(mine)} long job(s) running or waiting ({kinds}); the limit is "
                    f"{MAX_LONG_PER_SESSION} a tab: wait for one to end or cancel it")
        if len(waiting) >= MAX_LONG:
            return f"the worker already has {len(waiting)} long jobs running or waiting (all tabs); try again later"
        return None

    def submit(self, kind: str, args: dict, session: str | None = None) -> Job:
        """Queue a job; a refused one (refusal()) comes back at once as a finished job whose only
        event is the error saying why, so every caller shows it as it shows a failure."""
        with self._lock:
            why = self.refusal(kind, session)
            if why:
                job = Job(next(self._ids), kind, session, started=True, done=True)
                job.events.put(("error", why))
                return job
            if not self.alive():
                if self._proc is not None:
                    self._on_death(self._generation, self._proc)  # fails its jobs; restarts if it ran
                if not self.alive():
                    self.start()
            job = Job(next(self._ids), kind, session, generation=self._generation)
            self._jobs[job.id] = job
            self._order.append(job.id)
            self._requests.put({"id": job.id, "kind": kind, "args": args, "session": session})
        return job

    def ahead_of(self, job: Job) -> int:
        """How many jobs (of any tab) the worker runs before this one: those of its lane submitted
        earlier, and for a long job also every running or waiting chat-lane job."""
        with self._lock:
            if job.id not in self._order:
                return 0
            lane = lane_of(job.kind)
            before = self._order[: self._order.index(job.id)]
            return sum(1 for i in before if i in self._jobs and (
                lane_of(self._jobs[i].kind) == lane or lane == "long"))

    def holder(self) -> str | None:
        """The long job running now (its kind), which a waiting chat-lane job is served between the
        steps of; None when no long job runs."""
        with self._lock:
            running = [j for j in self._jobs.values() if j.started and not j.done and lane_of(j.kind) == "long"]
        return running[0].kind if running else None

    def cancel(self, job: Job | int) -> None:
        job_id = job.id if isinstance(job, Job) else job
        with self._lock:
            known = self._jobs.get(job_id)
        if known is not None:
            known.cancel_requested = True
        self._control.put(job_id)

    def cancel_session(self, session: str | None, kinds: tuple[str, ...] | None = None) -> int:
        with self._lock:
            mine = [j for j in self._jobs.values() if j.session == session and (kinds is None or j.kind in kinds)]
        for j in mine:
            self.cancel(j)
        return len(mine)

    def follow(self, job: Job, poll: float = 0.25) -> Iterator[tuple[str, object]]:
        """Yield (type, payload) events until a terminal one; ("waiting", (n jobs ahead, the kind of
        the long job holding the device or None)) while queued."""
        while True:
            try:
                kind, payload = job.events.get(timeout=poll)
            except queue.Empty:
                if not job.started:
                    yield "waiting", (self.ahead_of(job), self.holder())
                else:
                    yield "tick", None
                continue
            yield kind, payload
            if kind in TERMINAL:
                return

    def run(self, kind: str, args: dict, session: str | None = None, timeout: float = 600) -> tuple[str, object]:
        """Submit and wait: the terminal (type, payload)."""
        job = self.submit(kind, args, session)
        t0 = time.monotonic()
        for ev, payload in self.follow(job):
            if ev in TERMINAL:
                return ev, payload
            if time.monotonic() - t0 > timeout:
                self.cancel(job)
        return "error", "no answer"
