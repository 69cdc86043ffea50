"""Load test for `ember serve`: N concurrent streaming clients on loopback for a fixed time.

Reports requests/s, aggregate completion tokens/s, p50/p99 time to first token, p50/p99 request
latency, and errors (which must be 0). By default it starts the server itself (a subprocess on
127.0.0.1) with the tiny random chat model; `--model` takes any model ember loads (`smollm2` is the
SmolLM2-135M-Instruct test fixture), `--url` targets a server already running. `--baseline` runs the
same load a second time against a `--max-batch 1` server (no batching) as the peer to compare with.

    python benchmarks/bench_server.py                              # tiny model, 16 clients, 20 s
    python benchmarks/bench_server.py --model smollm2 --clients 8 --duration 30 --baseline
    python benchmarks/bench_server.py --url http://127.0.0.1:8000 --model-name my-model
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["foxes", "the sea", "a small robot", "Paris", "winter", "a lost key", "mountains", "tea", "the moon",
          "a library", "trains", "a garden", "bees", "an old map", "rain", "a lighthouse"]


def resolve_model(name: str) -> str:
    if name == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        import tinymodels

        return str(tinymodels.tiny_chat_model(Path(tempfile.mkdtemp(prefix="ember-bench-tiny-"))))
    if name == "smollm2":
        sys.path.insert(0, str(ROOT / "tests"))
        import realmodels

        return str(realmodels.smollm2_hf())
    if name == "default":  # what `ember serve` loads when no model is named
        from ember.fixtures import default_model

        return default_model()
    return name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, max_len: int | None, log_path: Path,
                 threads: int | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "ember.serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(max_batch), "--served-model-name", "bench", "--log-level", "warning"]
    if max_len:
        cmd += ["--max-len", str(max_len)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 600
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see {log_path}:\n{log_path.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up in 600 s")


async def client_loop(http: httpx.AsyncClient, cid: int, args, deadline: float, out: dict) -> None:
    i = 0
    while time.perf_counter() < deadline:
        topic = TOPICS[(cid + i) % len(TOPICS)]
        i += 1
        body = {"model": args.model_name, "max_tokens": args.max_tokens, "temperature": args.temperature,
                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": not args.allow_eos}
        if args.endpoint == "chat":
            path = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": f"Write a short story about {topic}. " * args.prompt_repeat}]
        else:
            path = "/v1/completions"
            body["prompt"] = f"Once upon a time, a story about {topic}: " * args.prompt_repeat
        t0 = time.perf_counter()
        ttft = None
        tokens = None
        done = False
        try:
            async with http.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    out["errors"].append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        out["errors"].append(f"stream error: {obj['error'].get('message')}")
                        break
                    if obj.get("usage"):
                        tokens = obj["usage"]["completion_tokens"]
                    for ch in obj.get("choices", []):
                        piece = ch.get("delta", {}).get("content") if args.endpoint == "chat" else ch.get("text")
                        if piece and ttft is None:
                            ttft = time.perf_counter() - t0
        except httpx.HTTPError as e:
            out["errors"].append(f"{type(e).__name__}: {e}")
            continue
        if not done or tokens is None:
            if not out["errors"] or done:
                out["errors"].append("stream ended without usage/[DONE]")
            continue
        out["latency"].append(time.perf_counter() - t0)
        out["ttft"].append(ttft if ttft is not None else float("nan"))
        out["tokens"] += tokens
        out["requests"] += 1


def pct(xs: list[float], q: float) -> float:
    xs = sorted(x for x in xs if x == x)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


async def load(url: str, args) -> dict:
    out = {"requests": 0, "tokens": 0, "ttft": [], "latency": [], "errors": []}
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(args.timeout), limits=limits) as http:
        # warm-up: one request, not counted
        warm = {"requests": 0, "tokens": 0, "ttft": [], "latency": [], "errors": []}
        await client_loop(http, 0, args, time.perf_counter() + 1e-9, warm)
        t0 = time.perf_counter()
        deadline = t0 + args.duration
        await asyncio.gather(*(client_loop(http, c, args, deadline, out) for c in range(args.clients)))
        out["elapsed"] = time.perf_counter() - t0
    out["errors"] += warm["errors"]
    return out


def report(label: str, r: dict) -> dict:
    el = r["elapsed"]
    row = {"label": label, "requests": r["requests"], "elapsed_s": round(el, 2),
           "req_per_s": round(r["requests"] / el, 3), "tok_per_s": round(r["tokens"] / el, 1),
           "ttft_p50_ms": round(pct(r["ttft"], 50) * 1e3, 1), "ttft_p99_ms": round(pct(r["ttft"], 99) * 1e3, 1),
           "latency_p50_s": round(pct(r["latency"], 50), 3), "latency_p99_s": round(pct(r["latency"], 99), 3),
           "errors": len(r["errors"])}
    print(f"{label:>22}: {row['requests']:5d} req in {el:6.1f}s | {row['req_per_s']:8.2f} req/s | "
          f"{row['tok_per_s']:9.1f} tok/s | TTFT p50 {row['ttft_p50_ms']:8.1f} ms p99 {row['ttft_p99_ms']:8.1f} ms | "
          f"latency p50 {row['latency_p50_s']:.3f}s p99 {row['latency_p99_s']:.3f}s | errors {row['errors']}")
    for e in r["errors"][:5]:
        print(f"{'':>24}error: {e}")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny (random, default) | smollm2 | any id/folder/file ember loads")
    ap.add_argument("--url", default=None, help="benchmark a server already running here instead of starting one")
    ap.add_argument("--model-name", default="bench", help="the model name to send (with --url)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    ap.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request (default 64)")
    ap.add_argument("--max-batch", type=int, default=8, help="server slots (default 8)")
    ap.add_argument("--max-len", type=int, default=1024, help="server tokens per request (default 1024)")
    ap.add_argument("--threads", type=int, default=None, help="server torch CPU threads (default: torch's choice)")
    ap.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    ap.add_argument("--prompt-repeat", type=int, default=1, help="repeat the prompt sentence (longer prompts)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--allow-eos", action="store_true", help="let requests stop at EOS (default: ignore_eos)")
    ap.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds")
    ap.add_argument("--baseline", action="store_true", help="also run the load against a --max-batch 1 server")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    args = ap.parse_args(argv)

    rows = []
    if args.url:
        rows.append(report("server", asyncio.run(load(args.url.rstrip("/"), args))))
    else:
        model = resolve_model(args.model)
        configs = [("ember serve", args.max_batch)] + ([("ember serve, batch 1", 1)] if args.baseline else [])
        print(f"model {args.model} ({model}); {args.clients} clients x {args.duration:.0f}s, "
              f"{args.max_tokens} tokens per request, endpoint {args.endpoint}")
        for label, mb in configs:
            with tempfile.TemporaryDirectory() as tmp:
                proc, url = start_server(model, mb, args.max_len, Path(tmp) / "server.log", args.threads)
                try:
                    rows.append(report(f"{label} (batch {mb})", asyncio.run(load(url, args))))
                finally:
                    proc.terminate()
                    try:
                        proc.wait(15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
