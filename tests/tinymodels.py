"""A tiny chat model with a real tokenizer, for tests of text in/out (CLI, streaming, server).

The tokenizer is a byte-level BPE trained on a fixed corpus (deterministic), with ChatML special
tokens and a chat template; the model is a random-weight Llama (fast on CPU). Text it writes is
gibberish, but every token maps to real bytes, so decoding, streaming and stop strings are
exercised for real.
"""
from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a little model that could.",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Héllo wörld, ça va? Ünïcödé and emoji 🎉🔥 and 日本語のテキスト.",
    "def add(a, b):\n    return a + b\n",
    "1234567890 + - * / = ( ) [ ] { } < > ! ? , ; : ' \"",
] * 20


def build_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    return tk


def tiny_chat_model(folder: Path, *, seed: int = 0, num_hidden_layers: int = 2, hidden_size: int = 64) -> Path:
    """Write config.json, model.safetensors, tokenizer files and a chat template into folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tk = build_tokenizer()
    tk.save(str(folder / "tokenizer.json"))
    eos = tk.token_to_id("<|im_end|>")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE, "model_max_length": 512}))
    cfg = LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=None, eos_token_id=eos,
                      pad_token_id=tk.token_to_id("<|endoftext|>"), tie_word_embeddings=True,
                      initializer_range=0.3)  # large weights: varied, non-repeating greedy text
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # make the eos token unlikely so that generations run their full length
        model.model.embed_tokens.weight[eos] *= 0.0
    model.save_pretrained(folder)
    return folder
