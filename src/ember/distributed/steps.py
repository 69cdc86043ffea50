"""Keeping the ranks of a split model in step: rank 0 drives, the others follow its requests."""
from __future__ import annotations

import dataclasses
import random

from ..generation.loop import Request
from .group import TensorParallel


def follow_rank0(tp: TensorParallel, req: Request) -> Request:
    """Rank 0's request (prompt ids, limits, sampling options) on every rank, with a seed chosen by
    rank 0 when sampling has none: the gathered logits are the same on every rank, so with the same
    inputs and seed every rank picks the same tokens and runs the same steps."""
    if tp.rank == 0 and req.sampling.temperature > 0 and req.sampling.seed is None:
        req = dataclasses.replace(req, sampling=dataclasses.replace(req.sampling, seed=random.getrandbits(63)))
    sent = tp.broadcast_object(portable(req))
    return dataclasses.replace(sent, id=req.id)  # ids stay this process's own


def portable(req: Request) -> Request:
    """The request as it travels to the other ranks: image features (an image+text model's prompt) on
    the CPU, since each rank's model sits on its own device (the model moves them back)."""
    emb = req.image_embeds
    if emb is not None and getattr(emb, "device", None) is not None and emb.device.type != "cpu":
        return dataclasses.replace(req, image_embeds=emb.cpu())
    return req


# ---- serving: rank 0's scheduler drives a generator, the other ranks replay its calls ----------------
class LeaderGenerator:
    """Rank 0's generator for `ember serve --tp N`: the scheduler's calls pass through to `gen`, and
    each step first broadcasts the adds and aborts since the last one, which the other ranks replay on
    their own generators (`follow`) before the same step. Requests that sample without a seed get one,
    so every rank samples alike. While idle a heartbeat keeps the followers' waits under the timeout."""

    def __init__(self, gen, tp: TensorParallel, init: dict):
        import threading

        self.gen, self.tp = gen, tp
        self._ops: list = []
        self._lock = threading.Lock()
        self._last = 0.0
        self._closed = False
        self._send(("init", init))
        threading.Thread(target=self._heartbeat, name="ember-tp-heartbeat", daemon=True).start()

    def __getattr__(self, name):  # max_batch, max_len, running, check, has_work ...
        return getattr(self.gen, name)

    def _send(self, msg) -> None:
        import time

        with self._lock:
            if not self._closed:
                self.tp.broadcast_object(msg)
                self._last = time.monotonic()

    def _heartbeat(self) -> None:
        import time

        period = max(0.5, self.tp.timeout / 4)
        while not self._closed:
            time.sleep(period / 4)
            if time.monotonic() - self._last > period:
                try:
                    self._send(("idle",))
                except Exception:  # the step that follows reports the failure
                    return

    def add(self, req: Request) -> None:
        if req.sampling.temperature > 0 and req.sampling.seed is None:
            req.sampling = dataclasses.replace(req.sampling, seed=random.getrandbits(63))
        self.gen.add(req)
        self._ops.append(("add", portable(req)))

    def abort(self, req_id: int) -> None:
        self.gen.abort(req_id)
        self._ops.append(("abort", req_id))

    def step(self):
        ops, self._ops = self._ops, []
        self._send(("step", ops))
        return self.gen.step()

    def close(self) -> None:
        """Tell the other ranks to stop following (nothing is sent after that, not even a heartbeat)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self.tp.broadcast_object(("stop",))


def follow(tp: TensorParallel, make_generator) -> None:
    """A rank other than 0 under `ember serve --tp N`: build the generator rank 0 built
    (`make_generator(**init)`) and replay rank 0's adds, aborts and steps until it stops."""
    gen = None
    while True:
        msg = tp.broadcast_object(None)
        if msg[0] == "init":
            gen = make_generator(**msg[1])
        elif msg[0] == "step":
            for op, arg in msg[1]:
                getattr(gen, op)(arg)
            gen.step()
        elif msg[0] == "stop":
            return
