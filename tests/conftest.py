import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
