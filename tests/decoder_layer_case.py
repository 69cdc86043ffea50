"""One decode token through `ops.decoder_layer` (the fused native layer), through the native ops it
chains, and through the pure-PyTorch fallback: the set-up shared by the bf16 (test_bf16_decode.py)
and GGUF-block (test_quant_blocks.py) tests, which compare the three."""
from types import SimpleNamespace

import torch

from ember import kernels
from ember.nn import ops


def run_decoder_layer(isa, dtype, linears, g, E, H, KV, D, F_, pos):
    """linears(n, k) -> (reference Linear, native Linear) over the same weight, made under `isa`.
    Returns got (fused), sep (the chained native ops), want (the fallback), and the k/v caches each
    wrote (fused, separate, ref) beside the initial ones (caches)."""
    with kernels.use_isa(isa):
        parts = [linears(n, k) for n, k in (((H + 2 * KV) * D, E), (E, H * D), (2 * F_, E), (E, F_))]
    (qkv_ref, qkv), (o_ref, o), (gu_ref, gu), (down_ref, down) = parts
    x, pending = (torch.randn(1, 1, E, generator=g).to(dtype) for _ in range(2))
    w1, w2 = (torch.rand(E, generator=g).add(0.5).to(dtype) for _ in range(2))
    ang = torch.rand(1, 1, D // 2, generator=g) * 6.3
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    caches = [torch.randn(1, KV, 16, D, generator=g).to(dtype) for _ in range(2)]
    fused, separate, ref = ([c.clone() for c in caches] for _ in range(3))
    with kernels.use_isa(isa):
        got = ops.decoder_layer(x, pending, w1, 1e-5, qkv, o, cos, sin, *fused, pos, H, None, w2, 1e-5, gu, down)
        s, n = ops.add_rms_norm(x, pending, w1, 1e-5)
        s, n = ops.add_rms_norm(s, o(ops.rope_cache_attention(qkv(n), cos, sin, *separate, pos, H, None)), w2, 1e-5)
        sep = (s, down(ops.silu_mul(gu(n))))
    with ops.using({name: None for name in ops.DEFAULTS}):
        want = ops.decoder_layer(x, pending, w1, 1e-5, qkv_ref, o_ref, cos, sin, *ref, pos, H, None, w2, 1e-5, gu_ref,
                                 down_ref)
    return SimpleNamespace(got=got, sep=sep, want=want, caches=caches, fused=fused, separate=separate, ref=ref)


def rel(got, want) -> float:
    """The relative error of got's norm against want (float32)."""
    return ((got.float() - want.float()).norm() / want.float().norm()).item()

