"""How the worker takes its requests: two FIFO lanes (chat first, long jobs round robin over tabs)
and each job's cancel flag, read from the UI's control queue."""

from __future__ import annotations

import collections
import queue
import threading

from webapp.protocol import Cancelled, lane_of


class CancelFlag:
    """Callable: True once the UI asked to cancel this job."""

    def __init__(self, control, job_id: int, cancelled: set):
        self._control, self._id, self._cancelled = control, job_id, cancelled

    def __call__(self) -> bool:
        while True:
            try:
                self._cancelled.add(self._control.get_nowait())
            except (queue.Empty, OSError, EOFError):
                break
        return self._id in self._cancelled

    def check(self) -> None:
        if self():
            raise Cancelled("cancelled")


class Lanes:
    """The two FIFO lanes of requests; next() takes the chat lane first. A None request closes."""

    def __init__(self):
        self._cond = threading.Condition()
        self._q = {"chat": collections.deque(), "long": collections.deque()}
        self._closed = False
        self._served: dict = {}  # tab (session) -> the turn its last long job was taken at
        self._turn = 0

    def put(self, req: dict | None) -> None:
        with self._cond:
            if req is None:
                self._closed = True
            else:
                self._q[lane_of(req["kind"])].append(req)
            self._cond.notify()

    def next(self) -> dict | None:
        """The oldest chat-lane request; else the oldest long one of the tab served longest ago
        (round robin over tabs: one tab's queued jobs never run all before another tab's first)."""
        with self._cond:
            while not (self._closed or self._q["chat"] or self._q["long"]):
                self._cond.wait()
            if self._closed:
                return None
            if self._q["chat"]:
                return self._q["chat"].popleft()
            long = self._q["long"]
            pick = min(long, key=lambda r: (self._served.get(r.get("session"), -1), long.index(r)))
            long.remove(pick)
            self._turn += 1
            self._served[pick.get("session")] = self._turn
            return pick

    def take_chat(self, accept) -> list[dict]:
        """The chat lane's requests that accept(req) takes, in order; the others stay."""
        with self._cond:
            taken = [r for r in self._q["chat"] if accept(r)]
            for r in taken:
                self._q["chat"].remove(r)
            return taken
