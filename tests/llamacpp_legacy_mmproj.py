"""Run llama.cpp's tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py (LLaVA's mmproj writer)
as a subprocess of the tests:

    python tests/llamacpp_legacy_mmproj.py LLAMA_CPP_DIR VISION_FOLDER LLAVA_PROJECTOR OUT_DIR

VISION_FOLDER: the tower saved as a CLIPVisionModel, LLAVA_PROJECTOR: torch.save of the projector's
`multi_modal_projector.*` tensors (what llava_surgery_v2.py leaves). The script was written for
transformers 4, whose CLIPVisionModel held its layers under `.vision_model`; a wrapper gives it that
shape over transformers 5's flattened class (same tensors, same names in its state dict).
"""
import runpy
import sys

import torch
import transformers

FLAT = transformers.CLIPVisionModel
LOAD = FLAT.from_pretrained


class Nested(torch.nn.Module):
    """transformers 4's CLIPVisionModel layout: the tower under `.vision_model`."""

    def __init__(self, model):
        super().__init__()
        self.vision_model = model


def main(llama_cpp: str, vision: str, projector: str, out: str) -> None:
    sys.path[:0] = [f"{llama_cpp}/gguf-py"]
    FLAT.from_pretrained = classmethod(lambda cls, folder: Nested(LOAD(folder)))
    sys.argv = ["convert_image_encoder_to_gguf.py", "-m", vision, "--llava-projector", projector, "--output-dir", out,
                "--clip-model-is-vision"]
    runpy.run_path(f"{llama_cpp}/tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py", run_name="__main__")


if __name__ == "__main__":
    main(*sys.argv[1:5])
