"""ember vs transformers on Qwen2.5-VL image + text chat, measured in the same run.

    python benchmarks/bench_qwen2_5_vl.py                      # Qwen2.5-VL's tower shape, 4 blocks; small decoder
    python benchmarks/bench_qwen2_5_vl.py --side 672 --vision-layers 8 --tokens 64

No real Qwen2.5-VL weights can be fetched here, so both libraries run the same random checkpoint (the
real vision tower's widths: 1280 wide, 16 heads, patch 14, windows of 112 px, the last block full
attention; a Qwen2 decoder of --hidden / --layers), in fp32 on CPU, on one --side x --side image
((side / 28)^2 image tokens). Per library, the best of --repeats runs:
  image    processor + vision tower + merger (ember: LLM.encode_images; transformers: processor +
           get_image_features)
  chat     the whole greedy chat of --tokens new tokens (template, image, prefill, M-RoPE decode)
and the ratios transformers / ember (> 1: ember is faster). The greedy tokens are compared too.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--side", type=int, default=448)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    import ember
    import test_qwen2_5_vl as t
    from bench_image_chat import best

    folder = Path(tempfile.mkdtemp(prefix="bench_qwen2_5_vl_"))
    heads = max(1, args.hidden // 64)
    t.SHAPES["bench"] = (
        dict(hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
             num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
             rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e6}),
        dict(depth=args.vision_layers, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
             window_size=112, out_hidden_size=args.hidden, fullatt_block_indexes=[args.vision_layers - 1]),
        dict(min_pixels=56 * 56, max_pixels=args.side * args.side), "saved")
    hf, proc = t.tiny_qwen2_5_vl(folder, "bench")
    llm = ember.load(folder, dtype=torch.float32, device="cpu")
    improc = Qwen2VLImageProcessorPil.from_pretrained(folder)

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.side, args.side, 3), dtype=np.uint8))
    text = "Describe the picture in detail."

    def hf_image():
        with torch.no_grad():
            px = improc([img], return_tensors="pt")
            return hf.model.get_image_features(px["pixel_values"], px["image_grid_thw"]).pooler_output

    def ember_image():
        return llm.encode_images([img])

    def hf_chat():
        return t._hf_generate(hf, t._hf_inputs(proc, [img], text), args.tokens)

    def ember_chat():
        return llm.chat(t._ember_messages([img], text), args.tokens, ignore_eos=True, temperature=0,
                        details=True).token_ids

    rows = []
    for what, h, e in (("image", hf_image, ember_image), ("chat", hf_chat, ember_chat)):
        h()
        e()  # warm-up
        th, oh = best(h, args.repeats)
        te, oe = best(e, args.repeats)
        rows.append((what, th, te))
        if what == "chat":
            print(f"greedy tokens identical: {oh == oe}")
    n = (args.side // 28) ** 2
    print(f"{'':8}{'transformers':>14}{'ember':>10}{'ratio':>8}   (fp32, CPU, {torch.get_num_threads()} threads; "
          f"decoder {args.hidden}x{args.layers}, tower 1280x{args.vision_layers}, ~{n} image tokens, "
          f"{args.tokens} new tokens)")
    for what, th, te in rows:
        print(f"{what:8}{th:13.3f}s{te:9.3f}s{th / te:7.2f}x")


if __name__ == "__main__":
    main()
