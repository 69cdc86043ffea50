"""ember.kernels.int16_linear: the AVX2 vpmaddwd kernel against int16_reference (the same arithmetic
in PyTorch), bit for bit, on shapes that are not multiples of the 6x16 tile, the 128-k chunk or the
4-k padding; and the float32 encoder path built on it (backends.int16) against float32."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

kernels = pytest.importorskip("ember.kernels")

native = pytest.mark.skipif(not (kernels.available() and "avx2" in kernels.isas()),
                            reason="needs the native kernels on an AVX2 CPU")


def _case(M, K, N, seed=0, outliers=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    if outliers and K > 4:
        x[:, :3] *= 12  # LayerNorm outputs carry a few large channels
    w = torch.randn(N, K, generator=g) * 0.05
    b = torch.randn(N, generator=g)
    return x, w, b


def test_pack_round_trips_codes_and_scales():
    x, w, b = _case(3, 37, 21)
    p = kernels.int16_pack(w)
    codes = kernels.int16_codes(p)
    assert p.packed.shape == (2, 20, 16, 2) and codes.dtype == torch.int16
    assert codes.abs().max().item() == kernels.INT16_W_MAX
    assert torch.allclose(codes.float() * p.scale[:, None], w, atol=0, rtol=0) is False  # quantised, not equal
    assert ((codes.float() * p.scale[:, None] - w).abs() <= p.scale[:, None] / 2 * 1.0001).all()
    assert p.packed.reshape(-1).count_nonzero() == codes.count_nonzero()  # padding is zero


@pytest.mark.parametrize("M,K,N", [(1, 384, 384), (5, 37, 21), (7, 130, 17), (13, 256, 48), (50, 1536, 40),
                                   (6, 4, 16), (31, 257, 33)])
@native
def test_kernel_matches_reference_bit_for_bit(M, K, N):
    x, w, b = _case(M, K, N, seed=M * 1000 + K + N)
    p = kernels.int16_pack(w)
    with kernels.use_isa("avx2"):
        y = kernels.int16_linear(x, p, b)
        y_nobias = kernels.int16_linear(x.view(1, M, K), p)
    ref = kernels.int16_reference(x, p, b)
    assert torch.equal(y, ref)
    assert y_nobias.shape == (1, M, N) and torch.equal(y_nobias[0], kernels.int16_reference(x, p))
    # and close to float32: 14-bit activations x 12-bit weights
    f32 = F.linear(x.double(), w.double(), b.double())
    assert ((y.double() - f32).norm() / f32.norm()).item() < 2e-3


@native
def test_kernel_edge_rows_threads_and_zero_rows():
    x, w, b = _case(100, 200, 70, seed=3)
    x[4] = 0  # a zero row: zeros times the weights, plus the bias
    p = kernels.int16_pack(w)
    ref = kernels.int16_reference(x, p, b)
    before = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            assert torch.equal(kernels.int16_linear(x, p, b), ref)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(ref[4], b)
    assert kernels.int16_linear(x[:0], p, b).shape == (0, 70)
    x[7, 150], x[9, 3], x[11, 199] = float("nan"), float("inf"), -float("inf")  # a NaN or an infinity: NaNs
    y, ref = kernels.int16_linear(x, p, b), kernels.int16_reference(x, p, b)
    bad = torch.zeros(100, dtype=torch.bool)
    bad[[7, 9, 11]] = True
    assert y[bad].isnan().all() and ref[bad].isnan().all()
    assert torch.equal(y[~bad], ref[~bad]) and not y[~bad].isnan().any()


@native
def test_fused_gelu_is_within_1e_6_of_torch_gelu():
    x, w, b = _case(40, 96, 50, seed=7)
    x *= 3  # GELU's inputs over its whole curve, both tails included
    p = kernels.int16_pack(w)
    y = kernels.int16_linear(x, p, b, gelu=True)
    pre = kernels.int16_reference(x, p, b)
    ref = kernels.int16_reference(x, p, b, gelu=True)
    assert torch.equal(ref, F.gelu(pre))
    assert pre.abs().max() > 8 and (pre < -4).any()
    assert torch.allclose(y, ref, atol=1e-6, rtol=1e-6)


def test_generic_isa_uses_the_reference():
    x, w, b = _case(9, 40, 20, seed=5)
    p = kernels.int16_pack(w)
    with kernels.use_isa("generic"):
        assert torch.equal(kernels.int16_linear(x, p, b), kernels.int16_reference(x, p, b))


# the float32 encoder path (backends.int16) on a tiny random BERT whose sizes are not multiples of
# the kernel's tiles: K = 60 / 90 (not a multiple of 4), N = 180 / 60 / 90
def _tiny_bert(tmp_path):
    from parity import save
    from test_encoders_parity import _bert_cfg, _hf

    return save(_hf(_bert_cfg(hidden_size=60, num_attention_heads=4, intermediate_size=90, num_hidden_layers=2),
                    "BertModel"), tmp_path)


def _cos_min(a, b):
    return F.cosine_similarity(a, b, dim=-1).min().item()


@native
def test_avx2_default_encoder_runs_on_int16_and_tracks_float32(tmp_path, monkeypatch):
    import transformers

    import ember
    from ember.backends.int16 import Int16Linear
    from test_encoders_parity import _batch

    folder = _tiny_bert(tmp_path)
    monkeypatch.setenv("EMBER_CPU_ISA", "avx2")  # ember's kernels, and its bf16 check, see an AVX2 CPU
    enc = ember.load(folder, device="cpu")
    plain = ember.load(folder, device="cpu", prepack=False)
    assert enc.dtype == torch.float32 and "int16-f32" in enc._loaded.transforms
    assert "int16-f32" not in plain._loaded.transforms
    layer = enc.model.layers[0]
    lins = [m for m in enc.model.modules() if isinstance(m, Int16Linear)]
    assert len(lins) == 8 and layer.up.gelu and not layer.o.gelu  # GELU fused into up
    ref_model = transformers.AutoModel.from_pretrained(folder).float().eval()
    with torch.no_grad():
        ids, mask = _batch(0, lengths=(5,))  # 5 rows: F.linear on the checkpoint's weights, no conversion
        assert (enc.model(ids, mask) - plain.model(ids, mask)).abs().max().item() < 1e-5
        assert all(m.w16 is None for m in lins)
        ids, mask = _batch(0, lengths=(30, 20, 17))  # 90 rows >= LAZY_ROWS: converted to int16 codes
        got, want = enc.model(ids, mask), plain.model(ids, mask)
        ref = ref_model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert all(m.w16 is not None and m._plain is None for m in lins)
        solo = enc.model(ids[1:2, :20], mask[1:2, :20])  # 20 rows, on the int16 codes too
    m = mask.bool()
    assert _cos_min(got[m], want[m]) > 0.9999 and _cos_min(got[m], ref[m]) > 0.9999
    assert (got[m] - ref[m]).abs().max().item() < 0.02
    assert (got[m] - want[m]).abs().max().item() > 1e-6  # not float32 arithmetic
    assert (solo[0] - got[1, :20]).abs().max().item() < 1e-5  # activations are quantised per token


def test_int16_path_only_where_asked(tmp_path, monkeypatch):
    """An explicit dtype=float32, EMBER_INT16=0 and EMBER_KERNELS=0 keep float32 matmuls; so does a
    CPU whose kernels run AVX-512 (its default stays as it was)."""
    import ember
    from ember import kernels

    folder = _tiny_bert(tmp_path)
    if kernels.cpu_isa() != "avx2":
        assert "int16-f32" not in ember.load(folder, device="cpu")._loaded.transforms
    monkeypatch.setenv("EMBER_CPU_ISA", "avx2")
    assert "int16-f32" not in ember.load(folder, dtype=torch.float32, device="cpu")._loaded.transforms
    for var in ("EMBER_INT16", "EMBER_KERNELS"):
        monkeypatch.setenv(var, "0")
        assert "int16-f32" not in ember.load(folder, device="cpu")._loaded.transforms
        monkeypatch.delenv(var)


def test_int16_linear_without_the_library_stays_float32(monkeypatch):
    from ember.backends.int16 import Int16Linear
    from ember.nn.layers import Linear

    x, w, b = _case(70, 40, 24, seed=9)
    monkeypatch.setattr(kernels, "available", lambda: False)
    lin = Int16Linear(Linear(w.clone(), b), gelu=True)
    assert torch.allclose(lin(x), F.gelu(F.linear(x, w, b)), atol=1e-6)
    assert lin.w16 is None and lin._plain is not None


def test_int16_linear_runs_float32_while_the_library_is_first_built(monkeypatch):
    """On a machine whose kernel library is not built yet, the first large call does not wait for
    the compiler: kernels.available_now() starts the build on a background thread and says None,
    the Linear runs F.linear meanwhile, and converts at a large call once the library is there."""
    from ember.backends.int16 import Int16Linear
    from ember.kernels import _build
    from ember.nn.layers import Linear

    started = []
    monkeypatch.setitem(_build._state, "loaded", None)
    monkeypatch.setattr(_build, "cached", lambda: False)
    monkeypatch.setattr(_build, "load_in_background", lambda: started.append(1))
    monkeypatch.delenv("EMBER_KERNELS", raising=False)
    assert kernels.available_now() is None and started == [1]
    x, w, b = _case(70, 40, 24, seed=11)
    lin = Int16Linear(Linear(w.clone(), b))
    assert torch.allclose(lin(x), F.linear(x, w, b), atol=1e-6)  # float32 meanwhile
    assert lin.w16 is None and lin._plain is not None and lin.lazy_rows < 1 << 62 and started == [1, 1]
    monkeypatch.setattr(_build, "cached", lambda: True)  # built: the next large call converts
    monkeypatch.setattr(kernels, "available", lambda: True)
    monkeypatch.setattr(kernels, "int16_pack", lambda w: "packed")
    monkeypatch.setattr(kernels, "int16_linear", lambda x, w16, bias, gelu: (w16, x.shape))
    assert lin(x) == ("packed", x.shape) and lin._plain is None


def test_background_build_does_not_hold_up_its_callers(monkeypatch):
    """load_in_background starts one thread, and a caller asking again while the build runs (holding
    the build lock) returns at once."""
    import threading

    from ember.kernels import _build

    building, done = threading.Event(), threading.Event()

    def slow_load():
        with _build._lock:  # as load() holds it through a build
            building.set()
            done.wait(10)
        return True

    monkeypatch.setattr(_build, "load", slow_load)
    monkeypatch.setattr(_build, "_background", [])
    _build.load_in_background()
    assert building.wait(10)
    caller = threading.Thread(target=_build.load_in_background)
    caller.start()
    caller.join(2)
    alive = caller.is_alive()
    done.set()
    _build._background[0].join(10)
    assert not alive and len(_build._background) == 1
