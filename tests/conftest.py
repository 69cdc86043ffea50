import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, Triton's interpreter runs ember's Triton kernels on CPU tensors (test_triton_ops.py).
# It must be on before anything imports triton: transformers and torch._inductor do, at collection,
# and triton's own library functions are defined then.
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_hf():
    import realmodels

    return realmodels.smollm2_hf()


@pytest.fixture(scope="session")
def smollm2_gguf():
    import realmodels

    return realmodels.smollm2_gguf()


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory):
    """Folder of a tiny random Llama with a trained BPE tokenizer and a ChatML template."""
    import tinymodels

    return tinymodels.tiny_chat_model(tmp_path_factory.mktemp("tiny_chat"))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny Llama: config.json + model.safetensors (shared by the hostile-load and fuzz tests, which
    copy it before changing anything)."""
    from transformers import LlamaConfig

    from parity import save, tiny_hf_model

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, bos_token_id=None, eos_token_id=None)
    folder = tmp_path_factory.mktemp("tiny_llama")
    save(tiny_hf_model(cfg), folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes gain nothing from a second thread, and on a busy machine each op's OpenMP
    hand-off can cost ~100 ms (transformers' depthwise conv1d most of all). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def native_ops():
    """ember's native ops registered for the test, the kernels' ISA override cleared after it
    (`pytestmark = pytest.mark.usefixtures("native_ops")` in the kernel tests)."""
    from ember import kernels
    from ember.backends import native

    native.register_ops()
    yield
    kernels.set_isa(None)
