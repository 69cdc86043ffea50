"""Whisper long-form transcription: ember against transformers in the same run, on Whisper tiny.en
(the CTranslate2 file from PyPI, converted by ember.convert_ct2; tests/realmodels.py fetches it)
and speech synthesised with espeak-ng, repeated with silences to --seconds.

    python benchmarks/bench_whisper.py                    # 60 s of audio, float32 CPU
    python benchmarks/bench_whisper.py --seconds 120 --repeat 3
    python benchmarks/bench_whisper.py --words            # word timestamps on both sides (transformers:
                                                          # return_token_timestamps), and ember without them

Prints each side's seconds (best of --repeat), the real-time factor and ember's speed-up, and
whether both produced the same segments.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--words", action="store_true", help="word timestamps (cross-attention + DTW) on both sides")
    args = ap.parse_args()
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from realmodels import whisper_tiny_en_dir

    import ember
    from ember.audio import load_audio
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    if shutil.which("espeak-ng") is None:
        raise SystemExit("needs espeak-ng (apt-get install espeak-ng) to synthesise speech")
    wav = Path(tempfile.mkdtemp(prefix="ember-bench-whisper-")) / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "Hello world. This is a test of speech recognition, "
                    "read slowly by a robot on a quiet afternoon."], check=True, capture_output=True)
    one = load_audio(wav)
    parts, n = [], 0
    while n < args.seconds * 16000:
        parts += [one, np.zeros(16000, np.float32)]
        n += len(one) + 16000
    x = np.concatenate(parts)[: int(args.seconds * 16000)]
    folder = whisper_tiny_en_dir()
    asr = ember.load(folder, dtype=torch.float32, device="cpu")
    hf = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    fe = WhisperFeatureExtractor.from_pretrained(folder)

    def run_ember(words=args.words):
        return [(s.start, s.end, s.tokens) for s in asr.transcription(x, timestamps=True,
                                                                      word_timestamps=words).segments]

    def run_hf():
        f = fe(x, sampling_rate=16000, truncation=False, padding="longest", return_attention_mask=True,
               return_tensors="pt")
        with torch.no_grad():
            out = hf.generate(f["input_features"], attention_mask=f["attention_mask"], return_timestamps=True,
                              return_segments=True, return_token_timestamps=args.words or None)
        return [(float(s["start"]), float(s["end"]), s["tokens"].tolist()) for s in out["segments"][0]]

    times = {}
    results = {}
    runs = [("ember", run_ember), ("transformers", run_hf)]
    if args.words:
        runs.append(("ember no words", lambda: run_ember(False)))
    for name, fn in runs:
        best = float("inf")
        for _ in range(args.repeat):
            t = time.perf_counter()
            results[name] = fn()
            best = min(best, time.perf_counter() - t)
        times[name] = best
    same = [r[2] for r in results["ember"]] == [r[2] for r in results["transformers"]]
    print(f"audio {args.seconds:.0f} s, {len(results['ember'])} segments, same segments: {same}")
    for name, t in times.items():
        print(f"  {name:13s} {t:7.2f} s   real-time factor {t / args.seconds:.3f}")
    print(f"  ember speed-up: {times['transformers'] / times['ember']:.2f}x")
    if args.words:
        print(f"  word timestamps cost ember {times['ember'] / times['ember no words'] - 1:+.1%}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
