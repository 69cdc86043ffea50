"""bf16 weights on the native decode path: `ops.decoder_layer` as one native call
(`bf16_decoder_layer`) over NativeBf16Linears, on every ISA this machine runs, against the separate
native ops (bit-identical: the same kernels in the same order) and against the pure-PyTorch fallback
(plain bf16 Linears and the default ops: bf16 rounding apart); and a tiny bf16 Llama loaded as
ember.load does it (per-phase linears) decoding as the fallback does."""
import pytest
import torch

from decoder_layer_case import rel as _rel, run_decoder_layer
from ember.nn import ops
from ember.nn.layers import Linear

native = pytest.importorskip("ember.backends.native")
kernels = pytest.importorskip("ember.kernels")

pytestmark = [pytest.mark.skipif(not native.available(), reason="native kernels unavailable"),
              pytest.mark.usefixtures("native_ops")]

ISAS = kernels.isas() if native.available() else []
BF16 = torch.bfloat16


def _linears(n, k, g):
    """(a plain bf16 Linear, its NativeBf16Linear) over the same weight."""
    lin = Linear((torch.randn(n, k, generator=g) * k ** -0.5).to(BF16))
    return lin, native.NativeBf16Linear(lin)


@pytest.mark.parametrize("isa", ISAS)
def test_bf16_decoder_layer(isa):
    g = torch.Generator().manual_seed(31)
    E, pos = 96, 7  # K of 96 / 160: the kernels' tails (not multiples of 32)
    r = run_decoder_layer(isa, BF16, lambda n, k: _linears(n, k, g), g, E, H=6, KV=2, D=16, F_=160, pos=pos)
    got, sep, want, fused, separate, ref = r.got, r.sep, r.want, r.fused, r.separate, r.ref
    assert all(a.shape == (1, 1, E) and a.dtype == BF16 for a in got)
    assert torch.equal(got[0], sep[0]) and torch.equal(got[1], sep[1])
    assert torch.equal(fused[0], separate[0]) and torch.equal(fused[1], separate[1])
    assert not torch.equal(fused[0][:, :, pos], r.caches[0][:, :, pos])  # the token's k was written
    # bf16 rounding of every op's output, in a different summation order: ~2^-8 relative per op
    assert _rel(got[0], want[0]) <= 1e-2 and _rel(got[1], want[1]) <= 3e-2
    assert _rel(fused[0], ref[0]) <= 1e-2 and _rel(fused[1], ref[1]) <= 1e-2


def test_bf16_decoder_layer_falls_back_with_a_bias_or_a_plain_linear():
    g = torch.Generator().manual_seed(5)
    E, H, KV, D, F_ = 64, 4, 2, 16, 96
    (qkv_ref, qkv), (o_ref, o), (gu_ref, gu), (down_ref, down) = (
        _linears(n, k, g) for n, k in (((H + 2 * KV) * D, E), (E, H * D), (2 * F_, E), (E, F_)))
    biased = native.NativeBf16Linear(Linear(o_ref.weight, torch.randn(E, generator=g).to(BF16)))
    x, pending = (torch.randn(1, 1, E, generator=g).to(BF16) for _ in range(2))
    w = torch.ones(E, dtype=BF16)
    cos, sin = torch.ones(1, 1, D, dtype=BF16), torch.zeros(1, 1, D, dtype=BF16)
    for o_proj in (biased, o_ref):
        caches = [torch.zeros(1, KV, 8, D, dtype=BF16) for _ in range(2)]
        again = [c.clone() for c in caches]
        got = ops.decoder_layer(x, pending, w, 1e-5, qkv, o_proj, cos, sin, *caches, 3, H, None, w, 1e-5, gu, down)
        want = ops.default("decoder_layer")(x, pending, w, 1e-5, qkv, o_proj, cos, sin, *again, 3, H, None, w, 1e-5,
                                            gu, down)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    from transformers import LlamaConfig

    from parity import save, tiny_hf_model

    cfg = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=None, pad_token_id=None)
    d = tmp_path_factory.mktemp("bf16dec")
    save(tiny_hf_model(cfg, init=0.05).to(BF16), d)
    return d


def _decode_logits(llm, steps=(3, 17, 99, 4)):
    with torch.no_grad():
        cache = llm.model.new_cache(1, 64)
        llm.model(torch.arange(1, 11)[None], position_ids=torch.arange(10)[None], cache=cache, kv_len=10)
        out = [llm.model(torch.tensor([[t]]), position_ids=torch.tensor([[10 + i]]), cache=cache, kv_len=11 + i)
               for i, t in enumerate(steps)]
    return torch.cat(out, 1).float()


@pytest.mark.parametrize("cap", [None, "avx2"])
def test_tiny_bf16_llama_decodes_through_the_fused_layer(bf16_folder, monkeypatch, cap):
    """ember.load on a bf16 checkpoint: decode runs one native call per layer over the plain bf16
    weights (prefill on the same weights: bf16 where the CPU has native bf16, float32 on AVX2), with
    the fallback's logits (bf16 rounding apart) and its greedy tokens."""
    import ember
    from ember.backends.onednn import bf16_native
    from parity import ember_greedy

    if cap:
        monkeypatch.setenv("EMBER_CPU_ISA", cap)
    llm = ember.load(bf16_folder)
    assert llm.dtype == BF16
    assert "native-bf16" in llm._loaded.transforms  # one copy of the weights: no prepacked prefill copy
    assert not any(m.prefill is not None for m in llm.model.modules() if type(m) is native.NativeBf16Linear)
    assert all(m.bf16_prefill == bf16_native() for m in llm.model.modules() if type(m) is native.NativeBf16Linear)
    layers = llm.model.model.layers
    assert all(native._bf16_pair(la.self_attn.qkv.fused, la.self_attn.o_proj)
               and native._bf16_pair(la.mlp.gate_up.fused, la.mlp.down_proj) for la in layers)
    calls = []
    counted = {"decoder_layer": (lambda f: lambda *a: calls.append(1) or f(*a))(ops.current("decoder_layer"))}
    with ops.using(counted):
        got, toks = _decode_logits(llm), ember_greedy(llm, [[5, 6, 7, 8]], 10)
    assert len(calls) >= 4  # layer 1 (layer 0 has no pending residual add) x 4 decode steps
    with ops.using({name: None for name in ops.DEFAULTS}):  # the separate ops on the same layers
        sep, sep_toks = _decode_logits(llm), ember_greedy(llm, [[5, 6, 7, 8]], 10)
    assert toks == sep_toks
    assert torch.nn.functional.cosine_similarity(got[0], sep[0], dim=-1).min().item() > 0.9999
    # an independent path: no native kernels at all (oneDNN's bf16 Linears, or float32 on AVX2)
    from ember import transforms

    monkeypatch.setattr(transforms, "native_kernels", lambda device: False)
    with ops.using({name: None for name in ops.DEFAULTS}):
        want = _decode_logits(ember.load(bf16_folder))
    assert torch.nn.functional.cosine_similarity(got[0], want[0], dim=-1).min().item() > 0.999


def test_weight_bytes_counts_the_decode_weight_once(bf16_folder):
    """`ember bench`'s bytes per decode step: the plain bf16 weights, not the prefill's prepacked copy."""
    import ember
    from ember.engine.bench import weight_bytes

    llm = ember.load(bf16_folder)
    plain = sum(m.weight.numel() * 2 for m in llm.model.modules() if type(m) is native.NativeBf16Linear)
    # the Linears (the tied head reads the embedding table) plus the norms' weights
    norms = sum(p.numel() * p.element_size() for n, p in llm.model.named_parameters() if n.endswith("norm.weight"))
    assert weight_bytes(llm.model) == plain + norms


def test_prepack_true_adds_a_prepacked_prefill_copy(bf16_folder):
    """prepack=True (on a CPU with native bf16): prefill on oneDNN's prepacked copy, decode on the plain
    weights; the same greedy tokens as the default's one copy."""
    import ember
    from ember.backends.onednn import bf16_native
    from parity import ember_greedy

    if not (bf16_native() and native.available()):
        pytest.skip("no native bf16 here: prefill runs in float32 either way")
    one, two = ember.load(bf16_folder), ember.load(bf16_folder, prepack=True)
    assert "native-bf16-prepack" in two._loaded.transforms and "native-bf16" in one._loaded.transforms
    assert all(m.prefill is not None for m in two.model.modules() if type(m) is native.NativeBf16Linear)
    prompt = [list(range(3, 40))]  # more rows than the decode GEMV takes: the prefill path
    assert ember_greedy(one, prompt, 10) == ember_greedy(two, prompt, 10)


def test_huge_page_weights_moves_the_decode_weights_and_keeps_ties(monkeypatch):
    """The decode weights (>= one 2 MiB huge page of them) copied into one huge-page region: same
    values, same outputs, a tied embedding re-pointed with its head (one Parameter still); with
    EMBER_HUGEPAGES=0, or under a huge page of weights, they stay where they are."""
    from torch import nn

    from ember import malloc

    g = torch.Generator().manual_seed(3)

    def model():
        m = nn.Module()
        m.embed = nn.Embedding(1024, 1536).to(BF16).requires_grad_(False)  # 3 MiB: a huge page's worth
        m.head = native.NativeBf16Linear(Linear(m.embed.weight))
        m.proj = native.NativeBf16Linear(Linear((torch.randn(96, 1536, generator=g) * 0.03).to(BF16)))
        m.norm = nn.Parameter(torch.ones(8), requires_grad=False)
        return m

    x = torch.randn(1, 1536, generator=g).to(BF16)
    m = model()
    want = m.head(x), m.proj(x), m.embed(torch.tensor([5, 1000]))
    before = {k: (v.data_ptr(), v.clone()) for k, v in m.state_dict(keep_vars=True).items()}
    moved = native.huge_page_weights(m)
    if not malloc.huge_pages():
        assert moved == 0
        pytest.skip("no transparent huge pages here")
    assert moved >= 1024 * 1536 * 2 + 96 * 1536 * 2
    assert m.head.weight is m.embed.weight and isinstance(m.head.weight, nn.Parameter)
    base = m.head.weight.untyped_storage().data_ptr()
    assert m.proj.weight.untyped_storage().data_ptr() == base  # one region
    for w in (m.head.weight, m.proj.weight):
        assert w.data_ptr() % 64 == 0 and w.data_ptr() != before["head.weight"][0]
    assert m.norm.data_ptr() == before["norm"][0]  # not a decode weight: left alone
    for k, (_, v) in before.items():
        assert torch.equal(m.state_dict()[k], v)
    got = m.head(x), m.proj(x), m.embed(torch.tensor([5, 1000]))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert native.huge_page_weights(m) == moved  # again: a fresh region, the same values
    assert torch.equal(m.proj(x), want[1])

    monkeypatch.setenv("EMBER_HUGEPAGES", "0")
    m = model()
    ptr = m.proj.weight.data_ptr()
    assert not malloc.huge_pages() and native.huge_page_weights(m) == 0 and m.proj.weight.data_ptr() == ptr
    monkeypatch.delenv("EMBER_HUGEPAGES")
    small = nn.Module()
    small.proj = native.NativeBf16Linear(Linear(torch.ones(64, 64, dtype=BF16)))
    ptr = small.proj.weight.data_ptr()
    assert native.huge_page_weights(small) == 0 and small.proj.weight.data_ptr() == ptr  # under a huge page


def test_loaded_bf16_model_decodes_from_huge_pages(tmp_path, monkeypatch):
    """ember.load on a bf16 checkpoint with over a huge page of weights: the decode weights (the head
    tied to the embedding) sit in one huge-page region, and decoding gives the same logits, bit for
    bit, as the same load with EMBER_HUGEPAGES=0 (the same kernels on the same values)."""
    import ember
    from ember import malloc
    from parity import save, tiny_hf_model
    from transformers import LlamaConfig

    if not malloc.huge_pages():
        pytest.skip("no transparent huge pages here")
    cfg = LlamaConfig(vocab_size=8192, hidden_size=160, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    save(tiny_hf_model(cfg, init=0.05).to(BF16), tmp_path)  # a 2.6 MB embedding
    llm = ember.load(tmp_path)
    linears = [m for m in llm.model.modules() if type(m) is native.NativeBf16Linear]
    region = {m.weight.untyped_storage().data_ptr() for m in linears}
    assert len(region) == 1 and llm.model.lm_head.weight is llm.model.model.embed_tokens.weight
    got = _decode_logits(llm)
    monkeypatch.setenv("EMBER_HUGEPAGES", "0")
    plain = ember.load(tmp_path)
    assert len({m.weight.untyped_storage().data_ptr() for m in plain.model.modules()
                if type(m) is native.NativeBf16Linear}) > 1
    assert torch.equal(got, _decode_logits(plain))
_FAULTS = """
import ctypes, resource, sys, ember, ember.malloc
llm = ember.load(sys.argv[1], prepack=True if sys.argv[2] == "1" else None)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def churn():  # what a prefill's per-call weight temporaries do: 8 MB allocated, written, freed
    p = libc.malloc(8 << 20)
    libc.memset(p, 1, 8 << 20)
    libc.free(p)
def faults():
    churn()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        churn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
loaded = faults()
ember.malloc.tune()  # what the next ember.load does first: its own temporaries back at 1 MiB
print(",".join(llm._loaded.transforms), loaded, faults())
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's allocator")
def test_plain_bf16_prefill_reuses_its_temporaries(bf16_folder):
    """A bf16 model on the plain weights (its prefill reorders or widens each weight per call) lifts
    glibc's mmap threshold once loaded: an 8 MB temporary comes back from the heap without faulting
    its pages in again. With the prepacked copy (no such temporaries) the 1 MiB threshold stays, and
    each one is a fresh mapping (2048 page faults); the next load (malloc.tune) goes back to that."""
    import subprocess
    import sys

    got = {}
    for prepack in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", _FAULTS, str(bf16_folder), prepack], capture_output=True, text=True,
                             timeout=120, env={**__import__("os").environ, "EMBER_MALLOC_TUNING": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
        transforms, loaded, reloading = out.stdout.split()[-3:]
        got[prepack] = (transforms, int(loaded), int(reloading))
    assert "native-bf16" in got["0"][0].split(",") and got["0"][1] < 2000, got
    assert got["0"][2] > 10 * 2048 * 0.9, got  # a later load runs at 1 MiB again
    if "native-bf16-prepack" in got["1"][0].split(","):  # CPUs with native bf16 (oneDNN prepacks there)
        assert got["1"][1] > 10 * 2048 * 0.9, got
