"""The decode step captured in CUDA graphs, one per batch-size bucket.

A decode step over `B` cache rows is shape-static once the attention span is fixed: the graph
attends over the whole preallocated cache (columns past a row's position are masked), so one
capture per batch bucket serves every step. Inputs are copied into static buffers, the graph is
replayed, and the logits are read from its static output: no Python, no allocation, and a single
launch per token. The same model code runs eagerly on CPU (tests exercise everything but the
capture itself there).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from ..generation.step import DecodeStep

log = logging.getLogger("ember")

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def bucket_for(n: int, buckets) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"batch {n} exceeds the largest bucket {buckets[-1]}")


class StaticDecoder(DecodeStep):
    """decode(ids [n,1], pos [n,1]) -> (logits [n, vocab], greedy tokens [n]) through per-bucket
    static buffers.

    On CUDA (capture=True) each bucket's step is captured once in a CUDA graph, optionally after
    torch.compile. Elsewhere the same static-shape step runs eagerly (what CPU tests exercise).
    The step also feeds itself: it writes its argmax tokens and the next positions back into its
    input buffers, so while every running row decodes greedily the host only calls `replay(n)` and
    reads the tokens — one launch and one small copy per token.
    """

    feedback = True

    def __init__(self, model, cache, *, buckets=DEFAULT_BUCKETS, capture: bool | None = None,
                 compile: bool = False, compile_mode: str = "max-autotune-no-cudagraphs"):
        self.model, self.cache = model, cache
        self.device = cache.device
        self.buckets = tuple(b for b in buckets if b <= cache.batch) or (cache.batch,)
        self.capture = (self.device.type == "cuda") if capture is None else capture
        self.max_len = cache.max_len
        self._fn: Callable = self._step
        self.compile_seconds = 0.0
        if compile:
            if self.device.type == "cpu":
                import torch._inductor.config as inductor_config

                from ..backends.onednn import unprepack_all

                # Inductor cannot lower oneDNN-prepacked weights; it prepacks the plain ones itself.
                if unprepack_all(model):
                    log.info("compile: prepacked Linears turned back into plain ones for Inductor")

                # Weights become constants: Inductor prepacks them for oneDNN and folds what it can.
                inductor_config.freezing = True
            t = time.perf_counter()
            self._fn = torch.compile(self._step, mode=compile_mode, fullgraph=True, dynamic=False)
            self.compile_seconds += time.perf_counter() - t  # the real cost is paid at first call, added below
        self._compile = compile
        self.graphs: dict[int, tuple] = {}  # bucket -> (graph or None, ids, pos, out)
        self.verify_graphs: dict[tuple[int, int], tuple] = {}  # (bucket, tokens) -> the same, for verify()
        self.capture_seconds = 0.0
        self._host: list[torch.Tensor] | None = None
        self._flip = 0

    def _step(self, ids: torch.Tensor, pos: torch.Tensor):
        B = ids.shape[0]
        logits = self.model(ids, position_ids=pos, cache=self.cache, kv_len=self.max_len, cache_rows=slice(0, B))[:, 0]
        tok = logits.argmax(dim=-1)
        ids.copy_(tok[:, None])
        # idle rows sit on the scratch column max_len - 1 and stay there
        pos.copy_(torch.clamp(pos + 1, max=self.max_len - 1))
        return logits, tok

    def _build(self, b: int):
        ids = torch.zeros(b, 1, dtype=torch.long, device=self.device)
        # idle rows write to the last column, which no live sequence reads before writing (see Generator)
        pos = torch.full((b, 1), self.max_len - 1, dtype=torch.long, device=self.device)
        t = time.perf_counter()
        if not self.capture:
            if self._compile:
                with torch.inference_mode():  # as every later step runs: a grad-mode change would recompile
                    self._fn(ids, pos)  # compile now, not inside a timed step
                self.compile_seconds += time.perf_counter() - t
            return None, ids, pos, None
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s), torch.inference_mode():
            for _ in range(3):  # warm-up: compilation, autotuning, cuBLAS workspaces
                self._fn(ids, pos)
        torch.cuda.current_stream(self.device).wait_stream(s)
        if self._compile:
            self.compile_seconds += time.perf_counter() - t
        t = time.perf_counter()
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g), torch.inference_mode():
                out = self._fn(ids, pos)
        except RuntimeError as e:  # e.g. a model that syncs with the host mid-step (data-dependent MoE routing)
            log.warning("CUDA graph capture failed (%s); decoding eagerly with static shapes", str(e)[:200])
            torch.cuda.synchronize(self.device)
            self.capture = False
            return None, ids, pos, None
        torch.cuda.synchronize(self.device)
        self.capture_seconds += time.perf_counter() - t
        return g, ids, pos, out

    def warmup(self, buckets=None) -> None:
        for b in buckets or self.buckets:
            if b not in self.graphs:
                self.graphs[b] = self._build(b)

    def _get(self, n: int):
        b = bucket_for(n, self.buckets)
        if b not in self.graphs:
            self.graphs[b] = self._build(b)
        return b, self.graphs[b]

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, kv_len: int | None = None):
        """Load new inputs for the first n rows (the rest of the bucket idles), then step."""
        n = ids.shape[0]
        b, (g, sids, spos, out) = self._get(n)
        sids[:n].copy_(ids, non_blocking=True)
        spos[:n].copy_(pos, non_blocking=True)
        if n < b:
            sids[n:].zero_()
            spos[n:].fill_(self.max_len - 1)
        return self.replay(n)

    @torch.inference_mode()
    def launch(self, n: int) -> "_Tokens":
        """replay(n) without waiting: the greedy tokens come back through a pinned buffer and an
        event, so the host can process the previous step while this one runs."""
        _, tok = self.replay(n)
        if self.device.type != "cuda":
            return _Tokens(tok.tolist())
        if self._host is None:
            self._host = [torch.empty(max(self.buckets), dtype=torch.long, pin_memory=True) for _ in range(2)]
        buf = self._host[self._flip]
        self._flip ^= 1  # two buffers: step k+1 is launched before step k's tokens are read
        buf[:n].copy_(tok, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        return _Tokens(None, buf, n, ev)

    @torch.inference_mode()
    def replay(self, n: int):
        """Step again from the inputs the previous step left in the buffers."""
        b, (g, sids, spos, out) = self._get(n)
        if g is None:
            logits, tok = self._fn(sids, spos)
        else:
            g.replay()
            logits, tok = out
        return logits[:n], tok[:n]


    def _verify_step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model(ids, position_ids=pos, cache=self.cache, kv_len=self.max_len, cache_rows=slice(0, ids.shape[0]))

    def _build_verify(self, b: int, T: int):
        ids = torch.zeros(b, T, dtype=torch.long, device=self.device)
        pos = torch.full((b, T), self.max_len - 1, dtype=torch.long, device=self.device)
        if not self.capture:
            return None, ids, pos, None
        # (eager model code inside the graph: a compiled variant would compile again for this shape)
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s), torch.inference_mode():
            for _ in range(2):
                self._verify_step(ids, pos)
        torch.cuda.current_stream(self.device).wait_stream(s)
        t = time.perf_counter()
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g), torch.inference_mode():
                out = self._verify_step(ids, pos)
        except RuntimeError as e:
            log.warning("CUDA graph capture of the verify step failed (%s); verifying eagerly", str(e)[:200])
            torch.cuda.synchronize(self.device)
            return None, ids, pos, None
        torch.cuda.synchronize(self.device)
        self.capture_seconds += time.perf_counter() - t
        return g, ids, pos, out

    @torch.inference_mode()
    def verify(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits [n, T, vocab] of a T-token step over the first n rows (speculative decoding's
        verification, generation/speculative.py), through static buffers: one CUDA graph per
        (bucket, T), attending over the whole cache as the decode step does. Leaves the decode
        step's own buffers alone (the Generator reloads them after)."""
        n, T = ids.shape
        b = bucket_for(n, self.buckets)
        if (b, T) not in self.verify_graphs:
            self.verify_graphs[(b, T)] = self._build_verify(b, T)
        g, sids, spos, out = self.verify_graphs[(b, T)]
        sids[:n].copy_(ids, non_blocking=True)
        spos[:n].copy_(pos, non_blocking=True)
        if n < b:
            sids[n:].zero_()
            spos[n:].fill_(self.max_len - 1)
        if g is None:
            return self._verify_step(sids, spos)[:n]
        g.replay()
        return out[:n]


class _Tokens:
    """Greedy tokens of a launched step: ready now (CPU), or once its CUDA event completes."""

    def __init__(self, ready: list[int] | None, buf=None, n: int = 0, event=None):
        self._ready, self._buf, self._n, self._event = ready, buf, n, event

    def result(self) -> list[int]:
        if self._ready is None:
            self._event.synchronize()
            self._ready = self._buf[: self._n].tolist()
        return self._ready
