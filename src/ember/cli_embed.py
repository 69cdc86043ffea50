"""`ember embed`: sentence embeddings from the command line.

    ember embed MODEL "first text" "second text"          # one JSON array per text on stdout
    ember embed MODEL --file lines.txt --out vectors.npy  # one text per line; float32 [N, dim] array
    cat lines.txt | ember embed MODEL --file - --out vectors.npy

`ember.cli` picks this module up through `add_parser(subparsers)`; `main(args)` runs it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

PROGRESS_MIN = 256  # show a progress bar from this many texts (on a terminal, or with --progress)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("embed", help="sentence embeddings: ember embed MODEL TEXT... | --file lines.txt --out x.npy",
                              description="Embed texts with an encoder (BERT, RoBERTa, MPNet, ModernBERT ...), "
                                          "following its sentence-transformers pooling/normalisation.")
    p.add_argument("model", metavar="MODEL", help="Hub id, local folder, .safetensors file or short name (minilm)")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (or use --file)")
    p.add_argument("-f", "--file", help="read texts from this file, one per line ('-' = stdin); empty lines are kept")
    p.add_argument("-o", "--out", help="write a float32 [N, dim] array: .npy (NumPy), .pt (torch) or .jsonl; "
                                       "default: JSON lines on stdout")
    p.add_argument("-b", "--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    p.add_argument("--normalize", dest="normalize", action="store_true", default=None,
                   help="L2-normalise (default: as the model's sentence-transformers config says)")
    p.add_argument("--no-normalize", dest="normalize", action="store_false", help="do not L2-normalise")
    p.add_argument("--max-length", type=int, help="truncate texts to this many tokens (default: the model's)")
    p.add_argument("--prompt", help="text prepended to every input (e.g. 'query: ')")
    p.add_argument("--prompt-name", help="one of the model's named prompts (config_sentence_transformers.json)")
    p.add_argument("--progress", action="store_true", default=None, help="always show a progress bar")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="never show a progress bar")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: bf16 matmuls with a float32 residual stream on CPUs with native bf16, "
                        "else float32; bf16 on CUDA)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="timings and logs on stderr")
    p.set_defaults(func=main)
    return p


def _read_lines(path: str) -> list[str]:
    from .errors import EmbeddingError

    try:
        if path == "-":
            data = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                data = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise EmbeddingError(f"cannot read texts from {path}: {e}") from None
    lines = data.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start an empty one
    return [ln.rstrip("\r") for ln in lines]


def _write(out: str | None, vecs, truncated) -> None:
    from .errors import EmbeddingError

    if out is None or out.endswith(".jsonl"):
        f = sys.stdout if out is None else open(out, "w", encoding="utf-8")
        try:
            for row in vecs.tolist():
                f.write(json.dumps([round(x, 7) for x in row]) + "\n")
        finally:
            if f is not sys.stdout:
                f.close()
        return
    if out.endswith(".npy"):
        import numpy as np

        np.save(out, vecs.numpy())
    elif out.endswith(".pt"):
        import torch

        torch.save(vecs, out)
    else:
        raise EmbeddingError(f"--out {out}: use a .npy, .pt or .jsonl file name")


def main(args) -> int:
    from .errors import EmbeddingError

    verbose = getattr(args, "verbose", False)
    if args.file is not None and args.texts:
        raise EmbeddingError("give texts as arguments or with --file, not both")
    texts = _read_lines(args.file) if args.file is not None else list(args.texts)
    if not texts:
        raise EmbeddingError("no texts to embed: pass TEXT arguments or --file lines.txt"
                             + (f" ({args.file} is empty)" if args.file else ""))
    for i, t in enumerate(texts):  # undecodable argv/stdin bytes arrive as lone surrogates: refuse them up front
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            where = f"line {i + 1} of {args.file}" if args.file is not None else f"TEXT {i + 1}"
            raise EmbeddingError(f"{where} is not valid UTF-8 text ({e.reason} at position {e.start}: "
                                 f"{t[e.start:e.end]!r})") from None
    if args.batch_size < 1:
        raise EmbeddingError(f"--batch-size must be positive, got {args.batch_size}")
    if args.out is not None and not args.out.endswith((".npy", ".pt", ".jsonl")):
        raise EmbeddingError(f"--out {args.out}: use a .npy, .pt or .jsonl file name")
    if args.out is not None:  # before any work: a bad path used to fail after all of it
        import os

        parent = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(parent):
            raise EmbeddingError(f"--out {args.out}: the folder {parent} does not exist")
        if not os.access(parent, os.W_OK) or os.path.isdir(args.out):
            raise EmbeddingError(f"--out {args.out}: cannot write there")

    import ember

    t0 = time.perf_counter()
    enc = ember.load(args.model, dtype=args.dtype, device=args.device, revision=args.revision)
    if not isinstance(enc, ember.Embedder):
        raise EmbeddingError(f"{args.model} is a {enc._loaded.entry.model_type} causal LM, not an encoder; "
                             f"ember embed needs an encoder (supported: {', '.join(ember.registry.supported('encoder'))})")
    if args.max_length is not None:
        enc.max_length = args.max_length
    t1 = time.perf_counter()
    progress = args.progress if args.progress is not None else (len(texts) >= PROGRESS_MIN and sys.stderr.isatty())
    vecs, truncated = enc.embed(texts, batch_size=args.batch_size, normalize=args.normalize, return_truncated=True,
                                progress=progress, prompt=args.prompt, prompt_name=args.prompt_name)
    t2 = time.perf_counter()
    try:
        _write(args.out, vecs, truncated)
    except OSError as e:
        raise EmbeddingError(f"--out {args.out}: cannot write: {e.strerror or e}") from None
    n_trunc = int(truncated.sum())
    if n_trunc:
        print(f"ember: {n_trunc} of {len(texts)} texts were longer than {enc.max_length} tokens and were truncated",
              file=sys.stderr)
    if args.out:
        print(f"ember: wrote {len(texts)} x {enc.dim} embeddings to {args.out}", file=sys.stderr)
    if verbose:
        print(f"[{enc!r}]\n[loaded in {t1 - t0:.2f}s; {len(texts)} texts in {t2 - t1:.2f}s, "
              f"{len(texts) / max(t2 - t1, 1e-9):.0f} texts/s]", file=sys.stderr)
    return 0
