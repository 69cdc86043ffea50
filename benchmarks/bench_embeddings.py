"""ember vs sentence-transformers on sentence embeddings, measured in the same run.

    python benchmarks/bench_embeddings.py                      # all-MiniLM-L6-v2 from the test fixtures
    python benchmarks/bench_embeddings.py --model PATH_OR_ID --n 1000 --repeats 5
    python benchmarks/bench_embeddings.py --isa avx2           # both libraries capped to AVX2

--isa avx2 caps every library in the run (and the startup subprocesses) to AVX2 on an AVX-512
machine: EMBER_CPU_ISA=avx2, ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, and also
MKL_ENABLE_INSTRUCTIONS=AVX2 and FBGEMM_ENABLE_INSTRUCTIONS=AVX2: float32 `F.linear` runs on MKL's
sgemm, which ignores the first three and keeps its AVX-512 kernels (1.6x AVX2's speed here).

Two measurements:
  throughput  sentences/s embedding N sentences of ~20 words (batch 32), in one process with both
              libraries loaded, runs interleaved; the best of --repeats runs is reported (a shared
              machine's noise only ever slows a run down).
  startup     wall time from launching `python` to the first embedding returned (the child prints
              the wall-clock moment it has the vectors), each library in a fresh subprocess
              (interleaved, best and median of --startup-repeats). The time to the child's exit is
              shown too: tearing down a process that imported torch costs another ~0.3 s here. ember's
              bytecode is compiled first (what installing a wheel does): with PYTHONDONTWRITEBYTECODE=1
              in the environment and stale or missing .pyc files, every start would compile ember's
              modules from source again (~0.4 s of CPU, more than the rest of ember's start-up).
              The children's CPU time (user + sys, all threads) is shown too: a count of work that
              other processes' load moves much less than wall time (--startup-threads 1 steadies it
              further).
Also: the cosine similarity between the two libraries' embeddings, and the ratios against the bars
(throughput >= 2x sentence-transformers, startup <= 1.5 s).
"""
from __future__ import annotations

import argparse
import compileall
import os
import resource
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORDS = ("the a of to and in is was for on that with as by at from it this be are an or have which not but "
         "people city river music science history school market water light night morning summer winter "
         "government company family student teacher doctor computer language garden window mountain ocean "
         "quickly slowly carefully often never always sometimes together alone early late again "
         "walks reads builds writes finds brings opens closes carries watches follows changes explains "
         "old new small large bright dark quiet loud happy strange famous simple ancient modern "
         "because although while after before during between under over through").split()


def sentences(n: int, words: int = 20, seed: int = 0) -> list[str]:
    """n sentences of about `words` words (±5), deterministic."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = max(3, words + rng.randint(-5, 5))
        s = " ".join(rng.choice(WORDS) for _ in range(k))
        out.append(s[0].upper() + s[1:] + ".")
    return out


def default_model() -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    import realmodels

    return str(realmodels.minilm_dir())


STARTUP = {
    "ember": "import ember; e = ember.load({model!r}{kw}); v = e.embed(['hello world'])",
    "sentence-transformers": "from sentence_transformers import SentenceTransformer; "
                             "m = SentenceTransformer({model!r}, device='cpu'); v = m.encode(['hello world'])",
    "(import torch alone)": "import torch",
}
AVX2_CAPS = {"EMBER_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
DONE = "; import time as _t; print('EMBER_BENCH_DONE', repr(_t.time()), flush=True)"


def startup_times(model: str, repeats: int, dtype: str | None,
                  threads: int | None = None) -> dict[str, dict[str, list[float]]]:
    """{"first": {library: [s, ...]}, "exit": {...}, "cpu": {...}}: launch -> vectors, launch -> exit, and
    the child's CPU seconds (user + sys)."""
    compileall.compile_dir(ROOT / "src" / "ember", quiet=1)  # as installed: bytecode present (see the docstring)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    kw = f", dtype={dtype!r}" if dtype else ""
    first: dict[str, list[float]] = {k: [] for k in STARTUP}
    exit_: dict[str, list[float]] = {k: [] for k in STARTUP}
    cpu: dict[str, list[float]] = {k: [] for k in STARTUP}
    for _ in range(repeats):
        for name, code in STARTUP.items():
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t_wall, t = time.time(), time.perf_counter()
            r = subprocess.run([sys.executable, "-c", code.format(model=model, kw=kw) + DONE], env=env,
                               capture_output=True, text=True)
            exit_[name].append(time.perf_counter() - t)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[name].append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
            if r.returncode != 0:
                raise SystemExit(f"{name} startup run failed:\n{r.stderr[-2000:]}")
            done = [ln for ln in r.stdout.splitlines() if ln.startswith("EMBER_BENCH_DONE ")]
            first[name].append(float(done[-1].split()[1]) - t_wall)
    return {"first": first, "exit": exit_, "cpu": cpu}


def report_startup(startup: dict, repeats: int) -> None:
    first, exit_, cpu = startup["first"], startup["exit"], startup["cpu"]
    print(f"\nprocess start -> first embedding, and -> process exit (best / median of {repeats}); the child's CPU:")
    for k, ts in first.items():
        print(f"  {k:<28} {min(ts):6.2f} s / {statistics.median(ts):6.2f} s    exit {min(exit_[k]):6.2f} s / "
              f"{statistics.median(exit_[k]):6.2f} s    cpu {min(cpu[k]):6.2f} s / {statistics.median(cpu[k]):6.2f} s")
    e, s = min(first["ember"]), min(first["sentence-transformers"])
    torch_only = "(import torch alone)"
    print(f"  ember startup is {s / e:.2f}x faster; {e - min(first[torch_only]):.2f} s over importing torch "
          f"({min(cpu['ember']) - min(cpu[torch_only]):.2f} s of CPU); bar <= 1.5 s: {'met' if e <= 1.5 else 'NOT met'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="folder or Hub id (default: all-MiniLM-L6-v2 from the test fixtures)")
    ap.add_argument("--n", type=int, default=1000, help="sentences (default 1000)")
    ap.add_argument("--words", type=int, default=20, help="words per sentence (default 20)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="throughput runs per library (best is reported)")
    ap.add_argument("--startup-repeats", type=int, default=3)
    ap.add_argument("--dtype", help="ember's dtype (default: ember's default: bf16 matmuls on CPUs with native bf16)")
    ap.add_argument("--also-fp32", action="store_true",
                    help="also measure ember with dtype=float32 (float32 matmuls, where the default is bf16 or int16)")
    ap.add_argument("--skip-startup", action="store_true")
    ap.add_argument("--startup-only", action="store_true", help="only the start-up measurement")
    ap.add_argument("--startup-threads", type=int, help="OMP_NUM_THREADS of the start-up children (default: unset)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="throughput on 1 thread in the process's CPU time, not wall time: what a shared, busy "
                         "machine can still measure (other processes' load barely moves it)")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native",
                    help="avx2: cap ember, torch, oneDNN, MKL and FBGEMM to AVX2 (see the docstring)")
    a = ap.parse_args()
    if a.isa == "avx2":  # before torch is imported here or in a startup subprocess
        os.environ.update(AVX2_CAPS)
    sys.path.insert(0, str(ROOT / "src"))
    model = a.model or default_model()
    startup = None if a.skip_startup else startup_times(model, a.startup_repeats, a.dtype, a.startup_threads)
    if a.startup_only:
        report_startup(startup, a.startup_repeats)
        return 0

    import torch
    import torch.nn.functional as F

    import ember
    from sentence_transformers import SentenceTransformer

    texts = sentences(a.n, a.words)
    clock = time.perf_counter
    if a.cpu_time:
        torch.set_num_threads(1)
        clock = time.process_time
    st = SentenceTransformer(model, device="cpu")
    runners = {"sentence-transformers": lambda: torch.as_tensor(st.encode(texts, batch_size=a.batch_size))}
    enc = ember.load(model, dtype=a.dtype, device="cpu")
    int16 = "int16-f32" in enc._loaded.transforms  # float32 on 16-bit integer matmuls (AVX2 CPUs)
    label = str(enc.dtype).replace("torch.", "") + (", int16 matmuls" if int16 else "")
    runners[f"ember ({label})"] = lambda: enc.embed(texts, batch_size=a.batch_size)
    if a.also_fp32 and (enc.dtype != torch.float32 or int16):
        enc32 = ember.load(model, dtype=torch.float32, device="cpu")
        runners["ember (float32)"] = lambda: enc32.embed(texts, batch_size=a.batch_size)
    caps = {k: v for k, v in os.environ.items() if k in AVX2_CAPS}
    print(f"model: {model}\ncpu threads: {torch.get_num_threads()}, bf16 native: "
          f"{ember.loading.cpu_bf16_fast()}, torch {torch.__version__}, ISA caps: {caps or 'none'}")
    print(f"ember's transforms: {', '.join(enc._loaded.transforms) or 'none'}")
    print(f"{a.n} sentences, ~{a.words} words, batch {a.batch_size}; {enc!r}")

    outs = {k: f() for k, f in runners.items()}  # warm-up, and the embeddings to compare
    ref = outs["sentence-transformers"].float()
    for k, v in outs.items():
        if k != "sentence-transformers":
            cos = F.cosine_similarity(ref, v.float())
            print(f"cosine to sentence-transformers, {k}: min {cos.min().item():.6f}, mean {cos.mean().item():.6f}")
    best: dict[str, float] = {}
    for _ in range(a.repeats):
        for k, f in runners.items():
            t = clock()
            f()
            best[k] = min(best.get(k, float("inf")), clock() - t)
    base = a.n / best["sentence-transformers"]
    print(f"\nthroughput (best of {a.repeats}{', 1 thread, CPU time' if a.cpu_time else ''}):")
    for k, t in best.items():
        print(f"  {k:<28} {a.n / t:8.0f} sentences/s   {a.n / t / base:5.2f}x sentence-transformers")

    if startup is not None:
        report_startup(startup, a.startup_repeats)
    ratio = max(n for k, n in ((k, a.n / t) for k, t in best.items()) if k.startswith("ember")) / base
    print(f"throughput bar >= 2x sentence-transformers: {'met' if ratio >= 2 else 'NOT met'} ({ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
