"""generate/stream/chat with details=True (Completion, Chunk), and the sampling defaults that
generation_config.json gives the Python API and the server alike."""
import json
import logging
import shutil

import pytest
import torch

import ember
from ember.errors import ArgumentError, GenerationError
from ember.generation.results import Completion


@pytest.fixture(scope="module")
def llm(tiny_chat):
    return ember.load(tiny_chat, dtype=torch.float32)


def test_details_carry_the_text_ids_finish_reason_and_usage(llm):
    text = llm.generate("Once upon a time", max_tokens=12)
    c = llm.generate("Once upon a time", max_tokens=12, details=True)
    assert isinstance(c, Completion) and str(c) == c.text == text
    assert c.prompt_token_ids == llm.encode("Once upon a time")
    assert len(c.token_ids) == 12 and c.finish_reason == "length"
    assert llm.tokenizer.decode(c.token_ids) == text
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (len(c.prompt_token_ids), 12)
    assert c.usage.total_tokens == len(c.prompt_token_ids) + 12
    assert 0 < c.ttft_s <= c.total_s and c.generation_tps > 0 and c.prompt_tps > 0
    assert c.logprobs is None and c.top_logprobs is None


def test_a_stop_token_ends_with_finish_reason_stop_and_is_counted(llm):
    ids = llm.encode("Once upon a time")
    first = llm.generate(ids, max_tokens=1, details=True).token_ids[0]
    c = llm.generate(ids, max_tokens=20, stop_token_ids=[first], details=True)
    assert c.finish_reason == "stop" and c.token_ids == [first] and c.text == ""
    assert c.usage.completion_tokens == 1  # as the server counts it


def test_logprobs_are_the_models_log_softmax(llm):
    c = llm.generate("The quick brown", max_tokens=5, logprobs=3, details=True)
    ids = torch.tensor([c.prompt_token_ids + c.token_ids])
    with torch.no_grad():
        lp = torch.log_softmax(llm.model(ids)[0].float(), dim=-1)
    n = len(c.prompt_token_ids)
    for i, (tok, got, top) in enumerate(zip(c.token_ids, c.logprobs, c.top_logprobs)):
        row = lp[n - 1 + i]
        assert got == pytest.approx(row[tok].item(), abs=1e-4)
        want = row.topk(3)
        assert [t for t, _ in top] == want.indices.tolist()
        assert [v for _, v in top] == pytest.approx(want.values.tolist(), abs=1e-4)
    assert llm.generate("The quick brown", max_tokens=2, logprobs=0, details=True).top_logprobs is None


def test_streamed_chunks_add_up_to_the_completion(llm):
    chunks = list(llm.stream("Once upon a time", max_tokens=10, details=True))
    whole = llm.generate("Once upon a time", max_tokens=10, details=True)
    assert len(chunks) == 10 and [ch.token_id for ch in chunks] == whole.token_ids
    assert "".join(ch.text for ch in chunks) == whole.text
    assert all(ch.completion is None and ch.finish_reason is None for ch in chunks[:-1])
    last = chunks[-1].completion
    assert chunks[-1].finish_reason == "length" and last.text == whole.text and last.token_ids == whole.token_ids


def test_batches_and_chat_give_completions_too(llm):
    prompts = ["The quick brown fox", "Héllo"]
    outs = llm.generate(prompts, max_tokens=6, details=True)
    assert [o.text for o in outs] == llm.generate(prompts, max_tokens=6)
    msgs = [{"role": "user", "content": "Hi"}]
    c = llm.chat(msgs, max_tokens=6, details=True)
    assert c.text == llm.chat(msgs, max_tokens=6)
    assert [ch.text for ch in llm.chat(msgs, max_tokens=6, stream=True, details=True)][-1] is not None
    with pytest.raises(GenerationError, match="details"):
        llm.generate("Hi", max_tokens=2, details="yes")


def _with_generation_config(src, dst, gc: dict):
    shutil.copytree(src, dst)
    (dst / "generation_config.json").write_text(json.dumps(gc))
    return dst


def test_generation_config_gives_the_defaults_in_python_and_the_server(tiny_chat, tmp_path):
    pytest.importorskip("fastapi")
    from ember.serve.app import sampling_defaults as server_defaults

    gc = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "do_sample": True}
    llm = ember.load(_with_generation_config(tiny_chat, tmp_path / "m", gc), dtype=torch.float32)
    want = {k: gc[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")}
    assert llm.sampling_defaults == want == server_defaults(llm.generation_config)
    s = llm.request("Hi", 4).sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.repetition_penalty) == (0.7, 0.8, 20, 0.0, 1.05)
    s = llm.request("Hi", 4, temperature=0, top_k=0).sampling  # a caller's value wins, 0 included
    assert (s.temperature, s.top_k, s.top_p) == (0, 0, 0.8)
    # sampling with the file's values is what passing them gives
    a = llm.generate("Once upon a time", max_tokens=12, seed=3)
    b = llm.generate("Once upon a time", max_tokens=12, seed=3, **want)
    assert a == b
    assert a != llm.generate("Once upon a time", max_tokens=12, temperature=0)  # it did sample


def test_without_sampling_fields_python_is_greedy(llm):
    assert llm.sampling_defaults == {}  # the tiny model's generation_config.json has token ids only
    assert llm.request("Hi", 3).sampling.greedy


def test_a_bad_generation_config_value_is_dropped_with_a_warning(tiny_chat, tmp_path, caplog):
    llm_dir = _with_generation_config(tiny_chat, tmp_path / "m", {"temperature": 0.5, "top_k": -5, "top_p": "x"})
    with caplog.at_level(logging.WARNING, logger="ember"):
        llm = ember.load(llm_dir, dtype=torch.float32)
    assert llm.sampling_defaults == {"temperature": 0.5}
    assert "top_k=-5" in caplog.text and "top_p='x'" in caplog.text
    llm.generate("Hi", max_tokens=2, seed=0)  # calls that omit them are not refused


def test_load_task_checks_the_kind_of_model(tiny_chat, tmp_path):
    import tinyencoders

    assert isinstance(ember.load(tiny_chat, task="generate"), ember.LLM)
    with pytest.raises(ArgumentError, match="task=.generate. \(LLM"):
        ember.load(tiny_chat, task="embed")
    bert = tinyencoders.tiny_bert(tmp_path / "bert")
    assert isinstance(ember.load(bert, task="embed"), ember.Embedder)
    with pytest.raises(ArgumentError, match="task=.embed. \(Embedder"):
        ember.load(bert, task="generate")
    with pytest.raises(ArgumentError, match="task must be one of"):
        ember.load(bert, task="classify")
