"""`ember transcribe`: speech to text with a Whisper model.

    ember transcribe MODEL speech.wav [more.flac ...]    # one line of text per file
    ember transcribe MODEL speech.wav --language de --task translate
    ember transcribe MODEL talk.mp3 --timestamps              # a "[start --> end] text" line per segment
    ember transcribe MODEL talk.mp3 --word-timestamps         # and under each, a "start end word" line per word

`ember.cli` picks this module up through `add_parser(subparsers)`; `main(args)` runs it.
"""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("transcribe", help="speech to text: ember transcribe MODEL AUDIO...",
                              description="Transcribe (or translate to English) audio files with a Whisper model. "
                                          "WAV always; FLAC/MP3/OGG with soundfile installed.")
    p.add_argument("model", metavar="MODEL", help="Hub id or local folder of a Whisper checkpoint")
    p.add_argument("audio", nargs="+", metavar="AUDIO", help="audio files")
    p.add_argument("--language", help="language code (default: detected, on multilingual models)")
    p.add_argument("--task", choices=["transcribe", "translate"], default="transcribe")
    p.add_argument("-n", "--max-tokens", type=int, help="at most this many tokens per 30 s window")
    p.add_argument("--timestamps", action="store_true", help="print each segment with its start and end (seconds)")
    p.add_argument("--word-timestamps", action="store_true",
                   help="also print each word with its start and end (seconds; needs the checkpoint's alignment_heads)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="logs on stderr")
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    import ember
    from ember.errors import GenerationError
    from ember.speech import Transcriber

    asr = ember.load(args.model, dtype=args.dtype, device=args.device, revision=args.revision)
    if not isinstance(asr, Transcriber):
        raise GenerationError(f"{args.model} is not a speech model; ember transcribe needs a Whisper checkpoint")
    for path in args.audio:
        t = asr.transcription(path, language=args.language, task=args.task, max_tokens=args.max_tokens,
                              timestamps=args.timestamps, word_timestamps=args.word_timestamps)
        if args.timestamps or args.word_timestamps:
            for s in t.segments:
                print(f"[{s.start:8.2f} --> {s.end:8.2f}] {s.text.strip()}", flush=True)
                for w in s.words:
                    print(f"    {w.start:8.2f} {w.end:8.2f} {w.word.strip()}", flush=True)
        else:
            print(t.text, flush=True)
    return 0
