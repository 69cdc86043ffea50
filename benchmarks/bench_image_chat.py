"""ember vs transformers on image + text chat (LLaVA), measured in the same run.

    python benchmarks/bench_image_chat.py                    # a random LLaVA of ~llava-1.5's tower shape, small decoder
    python benchmarks/bench_image_chat.py --hidden 1024 --layers 8 --tokens 64 --repeats 3

No real LLaVA weights can be fetched here, so both libraries run the same random checkpoint (a CLIP
ViT tower at 224 px / patch 14 → 256 image tokens, a Llama decoder of --hidden / --layers), in fp32
on CPU. Per library, the best of --repeats runs (a shared machine's noise only ever slows a run):
  image    processor + vision tower + projector for one image (ember: LLM.encode_images;
           transformers: processor + get_image_features)
  chat     the whole greedy chat of --tokens new tokens (template, image, prefill, decode)
and the ratios transformers / ember (> 1: ember is faster). The greedy tokens are compared too.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def best(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from PIL import Image
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    import ember
    import test_image_chat as t

    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="bench_image_chat_"))
    tk = t._tokenizer(folder)
    cfg = LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=tk.get_vocab_size(), hidden_size=args.hidden,
                         intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                         num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 128),
                         bos_token_id=None, eos_token_id=tk.token_to_id("<|im_end|>")),
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=args.vision_layers, num_attention_heads=16, image_size=224, patch_size=14),
        image_token_index=tk.token_to_id("<image>"))
    hf = LlavaForConditionalGeneration(cfg).eval()
    hf.save_pretrained(folder)
    t._write_tokenizer_config(folder, t.LLAVA_TEMPLATE)
    improc = LlavaImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    improc.save_pretrained(folder)
    proc = LlavaProcessor(image_processor=improc, tokenizer=t._hf_tokenizer(folder), patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=t.LLAVA_TEMPLATE)
    llm = ember.load(folder, dtype=torch.float32, device="cpu")

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    text = "Describe the picture in detail."

    def hf_image():
        with torch.no_grad():
            px = improc([img], return_tensors="pt")["pixel_values"]
            return hf.model.get_image_features(pixel_values=px).pooler_output

    def ember_image():
        return llm.encode_images([img])

    def hf_chat():
        inputs = t._hf_inputs(proc, [img], text)
        n = inputs["input_ids"].shape[1]
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        return out[0, n:].tolist()

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
    print(f"{'':8}{'transformers':>14}{'ember':>10}{'ratio':>8}   (fp32, CPU, {torch.get_num_threads()} threads; "
          f"decoder {args.hidden}x{args.layers}, 256 image tokens, {args.tokens} new tokens)")
    for what, th, te in rows:
        print(f"{what:8}{th:13.3f}s{te:9.3f}s{th / te:7.2f}x")


if __name__ == "__main__":
    main()
