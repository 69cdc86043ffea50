"""The server's scheduler: one background thread owns a `Generator` and steps it while there is work.

HTTP handlers run on the asyncio event loop and never touch the model. A handler `submit()`s a
`Submission` (the requests of one HTTP call: one per choice/prompt); the scheduler thread hands those
requests to the generator as slots free up (`Generator.add`), loops `step()`, and posts each step's
events back to the submission's asyncio queue with `loop.call_soon_threadsafe`. `cancel()` (a client
went away) aborts the requests at the next step boundary, freeing their slots.

Faults are contained per request. The scheduler only `add`s as many requests as there are free slots, so
every request it adds is admitted (prefilled) by the very next `step()`. When a step raises:
  * if it admitted one new request, that request is finished with the error;
  * if it admitted several, they are taken out again and re-admitted one per step, so the one that
    fails is found and the others go on;
  * if it admitted none (a decode step failed, which cannot be pinned on one request), the requests
    that were running are finished with the error.
Running requests are unaffected by a failed admission (a generator admits before it decodes and
prefills only the new requests' cache rows). The server keeps serving in every case.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("ember.serve")


class StepFailure(Exception):
    """A request failed inside a generation step; `cause` is the original exception."""

    def __init__(self, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


class ClientGone(Exception):
    """The submission was cancelled (the client disconnected)."""


class Submission:
    """The requests of one HTTP call and the queue their events come back on (loop side)."""

    def __init__(self, requests: list, loop: asyncio.AbstractEventLoop | None = None):
        self.requests = list(requests)
        self.loop = loop or asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending = {r.id: None for r in self.requests}  # ids not finished yet (an ordered set)
        self.cancelled = False
        self.scheduler: Scheduler | None = None

    # scheduler thread → loop
    def post(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed (server shut down)
            pass

    @property
    def done(self) -> bool:
        return not self.pending

    def cancel(self) -> None:
        """Abort what is still running (the client went away); wakes whoever waits on next()."""
        if self.cancelled or self.done:
            return
        self.cancelled = True
        if self.scheduler is not None:
            self.scheduler.abort(self)
        self.queue.put_nowait(("cancel", None))

    async def next(self) -> list | None:
        """The events that have arrived (waits for at least one); None once every request finished.

        Raises StepFailure if a request failed in a step, ClientGone if cancelled.
        """
        if self.cancelled:
            raise ClientGone()
        if not self.pending:
            return None
        items = [await self.queue.get()]
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        events = []
        for kind, payload in items:
            if kind == "cancel":
                raise ClientGone()
            if kind == "error":
                rid, exc = payload
                self.pending.pop(rid, None)
                raise StepFailure(exc)
            for ev in payload:
                if ev.finished:
                    self.pending.pop(ev.request.id, None)
                events.append(ev)
        return events


@dataclass
class _Entry:
    req: Any
    sub: Submission
    added: bool = False  # handed to the generator
    suspect: bool = False  # was admitted with others in a step that failed: re-admit alone
    t0: float = field(default_factory=time.perf_counter)  # submitted
    t_last: float | None = None  # its latest token (for the observer)


class Scheduler:
    """Drives one generator from one thread (continuous batching)."""

    def __init__(self, generator, *, max_batch: int | None = None, name: str = "ember-scheduler"):
        self.generator = generator
        self.max_batch = max_batch or getattr(generator, "max_batch", 8)
        self.name = name
        self._cv = threading.Condition()
        self._incoming: list[_Entry] = []
        self._aborts: set[int] = set()
        self._stop = False
        self._thread: threading.Thread | None = None
        # scheduler-thread state
        self._live: dict[int, _Entry] = {}
        self._backlog: deque[_Entry] = deque()
        self._fresh: list[_Entry] = []  # added since the last step
        self.stats = {"steps": 0, "failed_steps": 0, "aborted": 0, "failed_requests": 0, "finished": 0}
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self.observer = None  # observe(entry, event, now) for every routed event (serve/metrics.py)

    # ---- lifecycle (any thread) ---------------------------------------------------------------
    def start(self) -> None:
        with self._cv:
            if self._thread is not None or self._stop:
                return
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish every request with an error and end the thread (for good)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def max_len(self) -> int:
        return self.generator.max_len

    @property
    def running(self) -> int:
        """Requests in the generator's slots (read from another thread: a snapshot)."""
        return self.generator.running

    @property
    def waiting(self) -> int:
        return len(self._backlog) + len(self._incoming)

    def check(self, req) -> None:
        """Validate a request (raises GenerationError); reads only the generator's fixed limits."""
        self.generator.check(req)

    # ---- loop side ----------------------------------------------------------------------------
    def submit(self, sub: Submission) -> Submission:
        if self._thread is None:
            self.start()
        sub.scheduler = self
        with self._cv:
            if self._stop:
                raise RuntimeError("the server is shutting down")
            self._incoming.extend(_Entry(r, sub) for r in sub.requests)
            self._cv.notify()
        return sub

    def abort(self, sub: Submission) -> None:
        with self._cv:
            self._aborts.update(sub.pending)
            self._cv.notify()

    # ---- scheduler thread ------------------------------------------------------------------------
    def _run(self) -> None:
        gen = self.generator
        try:
            while True:
                with self._cv:
                    while not (self._incoming or self._aborts or self._stop or self._backlog or gen.has_work()):
                        self._cv.wait()
                    if self._stop:
                        break
                    incoming, self._incoming = self._incoming, []
                    aborts, self._aborts = self._aborts, set()
                for e in incoming:
                    self._live[e.req.id] = e
                    self._backlog.append(e)
                for rid in aborts:
                    self._drop(rid)
                self._admit()
                if not gen.has_work():
                    continue
                try:
                    events = gen.step()
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as exc:  # noqa: BLE001 - contained per request, see the module doc (a
                    # BaseException too: tokenizers' pyo3 PanicException must not kill the scheduler thread)
                    self._recover(exc)
                    continue
                self.stats["steps"] += 1
                self.consecutive_failures = 0
                self._fresh = []
                self._route(events)
        except BaseException as exc:  # a bug in the scheduler itself: fail everything, say so
            log.exception("scheduler thread died")
            self.last_error = f"scheduler thread died: {type(exc).__name__}: {exc}"
            for e in list(self._live.values()):
                self._fail(e, exc)
            raise
        finally:
            shutdown = RuntimeError("the server is shutting down")
            with self._cv:
                left = self._incoming + list(self._live.values())
                self._incoming = []
            self._live.clear()
            self._backlog.clear()
            for e in left:
                e.sub.post(("error", (e.req.id, shutdown)))

    def _admit(self) -> None:
        """Hand backlog requests to the generator, no more than there are free slots.

        Fair between submissions: a free slot goes to the waiting request whose submission holds the
        fewest slots (the oldest among equals), so one call with many choices cannot keep every slot
        while a later call waits for all of them."""
        gen = self.generator
        free = self.max_batch - gen.running
        if not self._backlog or free <= 0:
            return
        held = Counter(id(e.sub) for e in self._live.values() if e.added)
        while self._backlog and free > 0:
            e = self._backlog[0]
            if e.suspect and self._fresh:
                break  # a suspect is admitted alone
            if self._fresh and self._fresh[0].suspect:
                break
            if e.suspect or not held:
                self._backlog.popleft()
            else:  # suspects sit at the front (see _recover): past them, the fairest pick
                e = min(self._backlog, key=lambda x: held[id(x.sub)])
                self._backlog.remove(e)
            try:
                gen.add(e.req)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: BLE001 - check() failures land here
                self._fail(e, exc)
                continue
            e.added = True
            held[id(e.sub)] += 1
            self._fresh.append(e)
            free -= 1

    def _recover(self, exc: BaseException) -> None:
        gen = self.generator
        self.stats["failed_steps"] += 1
        self.consecutive_failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        fresh = [e for e in self._fresh if e.req.id in self._live]
        self._fresh = []
        if len(fresh) == 1:
            log.warning("request failed at admission (%s: %s); others go on", type(exc).__name__, exc,
                        exc_info=exc)
            gen.abort(fresh[0].req.id)
            self._fail(fresh[0], exc)
        elif fresh:
            log.warning("a step admitting %d requests failed (%s: %s); re-admitting them one at a time",
                        len(fresh), type(exc).__name__, exc)
            for e in fresh:
                gen.abort(e.req.id)
                e.added, e.suspect = False, True
            self._backlog.extendleft(reversed(fresh))
        else:
            running = [e for e in self._live.values() if e.added]
            log.error("a decode step failed (%s: %s); finishing the %d running requests with the error",
                      type(exc).__name__, exc, len(running), exc_info=exc)
            for e in running:
                gen.abort(e.req.id)
                self._fail(e, exc)

    def _fail(self, e: _Entry, exc: BaseException) -> None:
        self._live.pop(e.req.id, None)
        self.stats["failed_requests"] += 1
        e.sub.post(("error", (e.req.id, exc)))

    def _drop(self, rid: int) -> None:
        e = self._live.pop(rid, None)
        if e is None:
            return
        self.stats["aborted"] += 1
        if e.added:
            self.generator.abort(rid)
            self._fresh = [f for f in self._fresh if f is not e]
        else:
            try:
                self._backlog.remove(e)
            except ValueError:
                pass

    def _route(self, events: list) -> None:
        by_sub: dict[int, tuple[Submission, list]] = {}
        now = time.perf_counter()
        for ev in events:
            e = self._live.get(ev.request.id)
            if e is None:  # aborted meanwhile
                continue
            if self.observer is not None:
                self.observer.observe(e, ev, now)
            by_sub.setdefault(id(e.sub), (e.sub, []))[1].append(ev)
            if ev.finished:
                del self._live[ev.request.id]
                self.stats["finished"] += 1
        for sub, evs in by_sub.values():
            sub.post(("events", evs))


def wait_idle(scheduler: "Scheduler", timeout: float = 10.0) -> bool:
    """Until the generator has no running request (tests)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if scheduler.running == 0 and scheduler.waiting == 0:
            return True
        time.sleep(0.01)
    return False
