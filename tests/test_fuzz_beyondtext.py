"""Hostile config.json values for the encoder-decoder and image-text families (T5, Whisper, CLIP,
SigLIP): every top-level (and nested tower) key set to a bad value beside valid weights either
loads or fails with an EmberError; never another exception, a hang or an allocation sized by the
claim."""
from __future__ import annotations

import json
import logging

import pytest
import torch

BAD = [-1, 0, 10**9, 1.5, float("nan"), None, "x", {"a": 1}]


def _folders(root):
    import test_t5_parity as t5
    import test_vision_parity as vision
    import test_whisper_parity as whisper

    out = {}
    for name, make in (("t5", lambda d: t5._tiny(d, feed_forward_proj="gated-gelu")),
                       ("whisper", lambda d: whisper._tiny(d)),
                       ("clip", lambda d: vision._tiny_clip(d)),
                       ("siglip", lambda d: vision._tiny_siglip(d))):
        d = root / name
        d.mkdir()
        make(d)
        out[name] = d
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return _folders(tmp_path_factory.mktemp("fuzz_bt"))


@pytest.fixture
def quiet_ember():
    """ember's warnings off for one test (restored: other tests read them through caplog)."""
    lg = logging.getLogger("ember")
    before = lg.level
    lg.setLevel(logging.ERROR)
    yield
    lg.setLevel(before)


@pytest.mark.parametrize("family", ["t5", "whisper", "clip", "siglip"])
def test_hostile_config_values_are_ember_errors(folders, family, quiet_ember):
    import ember

    folder = folders[family]
    good = json.loads((folder / "config.json").read_text())
    paths = [(k,) for k in good if k not in ("architectures", "transformers_version")]
    for tower in ("text_config", "vision_config"):
        if isinstance(good.get(tower), dict):
            paths += [(tower, k) for k in good[tower] if k not in ("model_type", "architectures")]
    checked = 0
    try:
        for path in paths:
            for v in BAD:
                cfg = json.loads(json.dumps(good))
                node = cfg
                for k in path[:-1]:
                    node = node[k]
                node[path[-1]] = v
                (folder / "config.json").write_text(json.dumps(cfg))
                try:
                    ember.load(folder, dtype=torch.float32, device="cpu")
                except ember.EmberError:
                    pass
                except Exception as e:  # noqa: BLE001 - the point of the test
                    raise AssertionError(f"{family}: {'.'.join(path)} = {v!r:.40} raised {type(e).__name__}: {e}")
                checked += 1
    finally:
        (folder / "config.json").write_text(json.dumps(good))
    assert checked > 100
