"""`ember pull` on a Hub id: one snapshot_download of the files a model needs, and a cached snapshot
brought up to date when the Hub has a new commit (tests/fakehub.py serves the Hub's API locally)."""
import shutil

import pytest
import torch

import ember
from ember import cli, hub
from fakehub import COMMIT, FakeHub
from parity import save, tiny_hf_model

NEW = "f" * 40


def _tiny(seed):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, bos_token_id=None, eos_token_id=None)
    return tiny_hf_model(cfg, seed=seed)


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return tmp_path


def _logits(model_or_llm, ids):
    with torch.no_grad():
        out = model_or_llm(ids)
    return out.logits if hasattr(out, "logits") else out


def test_pull_downloads_then_refreshes_a_cached_snapshot(env, monkeypatch, capsys, caplog):
    repo = env / "repo"
    old, new = _tiny(0), _tiny(1)
    save(old, repo)
    (repo / "README.md").write_text("not needed")
    ids = torch.tensor([[1, 2, 3]])
    with FakeHub({"acme/tiny": repo}) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        assert cli.main(["pull", "acme/tiny"]) == 0
        first = capsys.readouterr().out.strip()
        assert first.endswith(f"snapshots/{COMMIT}")
        assert any("/tree/" in r for r in fake.requests)  # snapshot_download listed the repository once
        assert not any(r.endswith("README.md") for r in fake.requests)
        # a new commit on the Hub: new weights, same config
        shutil.rmtree(repo)
        save(new, repo)
        fake.commit = NEW
        assert hub.resolve("acme/tiny").root.name == COMMIT  # loading uses the cache as it is
        fake.requests.clear()
        assert cli.main(["pull", "acme/tiny"]) == 0
        second = capsys.readouterr().out.strip()
    assert second.endswith(f"snapshots/{NEW}")
    assert any(r.startswith("GET") and r.endswith("/model.safetensors") for r in fake.requests), fake.requests
    assert (_logits(ember.load("acme/tiny", dtype=torch.float32).model, ids) - _logits(new, ids)).abs().max() < 1e-5
    # the Hub gone: pull keeps the cached snapshot and says why it could not refresh
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with caplog.at_level("WARNING", logger="ember"):
        assert cli.main(["pull", "acme/tiny"]) == 0
    assert capsys.readouterr().out.strip() == second and "could not refresh acme/tiny" in caplog.text
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: no attempt at all
    assert cli.main(["pull", "acme/tiny"]) == 0 and capsys.readouterr().out.strip() == second


def test_sharded_download_gets_every_shard_in_one_go(env, monkeypatch, tmp_path):
    from ember.io.safetensors import save_file

    m = _tiny(2)
    repo = tmp_path / "sharded"
    save(m, repo)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    names = sorted(sd)
    half = len(names) // 2
    (repo / "model.safetensors").unlink()
    save_file({k: sd[k] for k in names[:half]}, repo / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in names[half:]}, repo / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors"
                                            for i, k in enumerate(names)}}
    import json

    (repo / "model.safetensors.index.json").write_text(json.dumps(index))
    with FakeHub({"acme/sharded": repo}) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        snap = hub.resolve("acme/sharded")
    assert [w.name for w in snap.weights] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    ids = torch.tensor([[4, 5]])
    assert (_logits(ember.load(snap.root, dtype=torch.float32).model, ids) - _logits(m, ids)).abs().max() < 1e-5
