"""Model resolution: local folders and files, the Hugging Face cache layout, downloads, offline mode."""
import json
import os
import shutil

import pytest
import torch

import ember
from ember import hub
from ember.errors import ModelNotFoundError
from ember.io.safetensors import save_file
from fakehub import COMMIT, FakeHub
from parity import save, tiny_hf_model


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, bos_token_id=None, eos_token_id=None)
    folder = tmp_path_factory.mktemp("repo")
    m = tiny_hf_model(cfg)
    save(m, folder)
    (folder / "README.md").write_text("not needed by ember")
    (folder / "pytorch_model.bin").write_bytes(b"should never be downloaded")
    return folder, m


def _lay_out_cache(cache, repo: str, files: dict, revision="main", commit=COMMIT):
    """The real huggingface_hub cache layout: blobs/, refs/<rev>, snapshots/<commit>/ with symlinks."""
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / revision).write_text(commit)
    snap = base / "snapshots" / commit
    for name, src in files.items():
        blob = base / "blobs" / f"blob-{name.replace('/', '_')}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, blob)
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, (snap / name).parent), snap / name)
    return snap


@pytest.fixture
def env(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return cache


def test_hub_id_resolves_from_the_local_cache_offline(env, tiny_repo, monkeypatch):
    folder, m = tiny_repo
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap_dir = _lay_out_cache(env, "acme/tiny", {"config.json": folder / "config.json",
                                                  "model.safetensors": folder / "model.safetensors"})
    snap = hub.resolve("acme/tiny")
    assert snap.root == snap_dir and snap.format == "safetensors"
    llm = ember.load("acme/tiny", dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert (llm.model(ids) - m(ids).logits).abs().max() < 1e-5


def test_revision_refs_are_honoured(env, tiny_repo, monkeypatch):
    folder, _ = tiny_repo
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    other = "f" * 40
    _lay_out_cache(env, "acme/tiny", {"config.json": folder / "config.json",
                                       "model.safetensors": folder / "model.safetensors"}, revision="v1", commit=other)
    assert hub.resolve("acme/tiny", revision="v1").root.name == other
    with pytest.raises(ModelNotFoundError, match="revision main"):
        hub.resolve("acme/tiny")


def test_offline_with_no_cache_fails_fast_saying_where_it_looked(env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as e:
        ember.load("acme/absent")
    assert "not available offline" in str(e.value) and str(env) in str(e.value)


def test_offline_with_a_partial_snapshot_names_the_missing_files(env, tiny_repo, monkeypatch, tmp_path):
    folder, _ = tiny_repo
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}))
    shard = tmp_path / "s.safetensors"
    save_file({"a": torch.zeros(1)}, shard)
    _lay_out_cache(env, "acme/sharded", {"config.json": folder / "config.json",
                                          "model.safetensors.index.json": index,
                                          "model-00001-of-00002.safetensors": shard})
    with pytest.raises(ModelNotFoundError, match="lacks model-00002-of-00002.safetensors"):
        hub.resolve("acme/sharded")


def test_download_fetches_only_needed_files_into_the_cache(env, tiny_repo, monkeypatch):
    folder, m = tiny_repo
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with FakeHub({"acme/tiny": folder}) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        llm = ember.load("acme/tiny", dtype=torch.float32)
        got = {r.split(" ", 1)[1] for r in fake.requests if "/resolve/" in r}
    assert any(p.endswith("/config.json") for p in got) and any(p.endswith("/model.safetensors") for p in got)
    assert not any(p.endswith(("README.md", "pytorch_model.bin")) for p in got)
    snap = env / "models--acme--tiny" / "snapshots" / COMMIT
    assert (snap / "model.safetensors").is_file() and not (snap / "README.md").exists()
    with torch.no_grad():
        ids = torch.tensor([[4, 5, 6]])
        assert (llm.model(ids) - m(ids).logits).abs().max() < 1e-5
    # now it is cached: works offline, no server needed
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve("acme/tiny").root == snap


def test_download_of_an_unknown_repo_says_not_found(env, monkeypatch, tiny_repo):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with FakeHub({"acme/tiny": tiny_repo[0]}) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        with pytest.raises(ModelNotFoundError, match="not found on the Hub"):
            hub.resolve("acme/nope")


def test_unreachable_hub_fails_fast_with_a_clear_error(env, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    t = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="could not be reached"):
        hub.resolve("acme/tiny")
    assert time.monotonic() - t < 10


def test_local_folder_and_single_file(tiny_repo):
    folder, _ = tiny_repo
    assert hub.resolve(folder).weights == [folder / "model.safetensors"]
    snap = hub.resolve(folder / "model.safetensors")
    assert snap.format == "safetensors" and snap.config == folder / "config.json"


def test_nonsense_model_names_are_refused():
    for bad in ("", "   ", "./no/such/dir", "/abs/missing.gguf"):
        with pytest.raises(ModelNotFoundError):
            hub.resolve(bad)
    with pytest.raises(ModelNotFoundError):
        hub.resolve(None)


def test_several_gguf_files_need_a_tag(tmp_path):
    for q in ("Q4_K_M", "Q8_0"):
        (tmp_path / f"m-{q}.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="several GGUF files"):
        hub.resolve(tmp_path)
    assert hub.resolve(tmp_path, gguf_file="Q8_0").weights == [tmp_path / "m-Q8_0.gguf"]


# ---- a repository with both safetensors and GGUF files: `org/name:TAG` ---------------------------
@pytest.fixture(scope="module")
def both_repo(tiny_repo, tmp_path_factory):
    """The tiny model's Hub folder plus two GGUF conversions of it (F32 and Q8_0), as many repos ship."""
    from ggufmake import hf_to_gguf

    folder, m = tiny_repo
    ggufs = tmp_path_factory.mktemp("ggufs")
    return {"config.json": folder / "config.json", "model.safetensors": folder / "model.safetensors",
            "tiny-F32.gguf": hf_to_gguf(m, ggufs / "tiny-F32.gguf", qtype=0),
            "tiny-Q8_0.gguf": hf_to_gguf(m, ggufs / "tiny-Q8_0.gguf", qtype=8)}, m


def test_a_tag_picks_the_gguf_even_where_the_repo_has_safetensors(env, both_repo, monkeypatch):
    files, m = both_repo
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap_dir = _lay_out_cache(env, "acme/both", files)
    assert hub.resolve("acme/both").weights == [snap_dir / "model.safetensors"]  # no tag: safetensors
    snap = hub.resolve("acme/both:Q8_0")
    assert snap.format == "gguf" and snap.weights == [snap_dir / "tiny-Q8_0.gguf"]
    assert hub.resolve("acme/both", gguf_file="tiny-F32.gguf").weights == [snap_dir / "tiny-F32.gguf"]
    llm = ember.load("acme/both:F32", dtype=torch.float32)
    assert llm._loaded.snapshot.format == "gguf"
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert (llm.model(ids) - m(ids).logits).abs().max() < 1e-4


def test_a_tag_no_gguf_matches_lists_the_gguf_files(env, both_repo, monkeypatch):
    files, _ = both_repo
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _lay_out_cache(env, "acme/both", files)
    with pytest.raises(ModelNotFoundError) as e:
        hub.resolve("acme/both:Q4_K_M")
    msg = str(e.value)
    assert "no GGUF file matches 'Q4_K_M'" in msg and "tiny-F32.gguf, tiny-Q8_0.gguf" in msg
    assert "model.safetensors" not in msg.split("available GGUF files:")[1]


def test_a_tag_names_the_whole_quant_type(tmp_path):
    for q in ("Q4_K", "Q4_K_M", "Q4_K_S"):
        (tmp_path / f"m-{q}.gguf").write_bytes(b"GGUF")
    assert hub.resolve(tmp_path, gguf_file="Q4_K").weights == [tmp_path / "m-Q4_K.gguf"]
    assert hub.resolve(tmp_path, gguf_file="q4_k_m").weights == [tmp_path / "m-Q4_K_M.gguf"]
    with pytest.raises(ModelNotFoundError, match="2 GGUF files match 'Q4_K_'"):
        hub.resolve(tmp_path, gguf_file="Q4_K_")


def test_a_tag_downloads_only_that_gguf(env, both_repo, monkeypatch, tmp_path):
    files, _ = both_repo
    repo = tmp_path / "served"
    repo.mkdir()
    for name, src in files.items():
        shutil.copy(src, repo / name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with FakeHub({"acme/both": repo}) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        snap = hub.resolve("acme/both:Q8_0")
        got = {r.split(" ", 1)[1].rsplit("/", 1)[1] for r in fake.requests if "/resolve/" in r}
        with pytest.raises(ModelNotFoundError, match="'acme/both': no GGUF file matches 'Q2_K'; available GGUF files: "
                                                     "tiny-F32.gguf, tiny-Q8_0.gguf"):
            hub.resolve("acme/both:Q2_K")
    assert snap.format == "gguf" and snap.weights == [snap.root / "tiny-Q8_0.gguf"]
    assert "tiny-Q8_0.gguf" in got and not got & {"model.safetensors", "tiny-F32.gguf"}


# ---- a sharded safetensors checkpoint in the cache -------------------------------------------------
def test_sharded_checkpoint_resolves_from_the_cache_and_loads(env, tiny_repo, monkeypatch, tmp_path):
    from safetensors.torch import load_file

    _, m = tiny_repo
    folder = tmp_path / "sharded"
    save(m, folder, max_shard_size="20KB")  # transformers writes the index and the shards
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and not (folder / "model.safetensors").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap_dir = _lay_out_cache(env, "acme/sharded", {n: folder / n for n in
                                                     ["config.json", "model.safetensors.index.json", *shards]})
    snap = hub.resolve("acme/sharded")
    assert snap.format == "safetensors" and snap.root == snap_dir
    assert sorted(snap.weights) == [snap_dir / s for s in shards]
    assert all(w.is_symlink() for w in snap.weights)  # the cache's own layout: snapshot links into blobs/
    assert sum(len(load_file(w)) for w in snap.weights) == len(index["weight_map"])
    llm = ember.load("acme/sharded", dtype=torch.float32)
    ids = torch.tensor([[7, 8, 9, 10]])
    with torch.no_grad():
        assert (llm.model(ids) - m(ids).logits).abs().max() < 1e-5
