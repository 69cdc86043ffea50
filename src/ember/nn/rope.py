"""Rotary position embeddings with the scaling types transformers supports.

Types: default, linear, dynamic (NTK), yarn, llama3, longrope (Phi-3's "su" too). The inverse
frequencies are computed in float32 exactly as transformers does, so logits match to float32
precision. Dynamic and longrope depend on the sequence length; they are evaluated per call from
the largest position, with tensor ops only (no host sync), which is what transformers does.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope", "proportional")


def rope_parameters(raw: dict, rope_theta_default: float = 10000.0) -> dict[str, Any]:
    """One rope dict from a config.json: new-style `rope_parameters` or old-style
    `rope_theta` + `rope_scaling`, normalised like transformers' `standardize_rope_params`."""
    params = raw.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"config field 'rope_parameters' should be an object, got {params!r:.80}")
    scaling = raw.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"config field 'rope_scaling' should be an object, got {scaling!r:.80}")
    p: dict[str, Any] = dict(params or scaling or {})
    theta = raw.get("rope_theta")
    p.setdefault("rope_theta", theta if theta is not None else rope_theta_default)
    rope_type = p.get("rope_type", p.get("type", "default"))
    if rope_type == "su":
        rope_type = "longrope"
    if rope_type == "mrope":  # multimodal rope, equal to default for text-only positions
        rope_type = "default"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"unsupported rope type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    p["rope_type"] = rope_type
    if raw.get("partial_rotary_factor") is not None:
        p.setdefault("partial_rotary_factor", raw["partial_rotary_factor"])
    if rope_type in ("llama3", "yarn", "longrope"):
        if raw.get("original_max_position_embeddings") is not None:
            p["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
        else:
            p.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings", 2048))
    if not isinstance(p["rope_theta"], (int, float)) or isinstance(p["rope_theta"], bool) or p["rope_theta"] <= 0:
        raise ConfigError(f"rope_theta must be a positive number, got {p['rope_theta']!r:.80}")
    _check_numbers(p)
    return p


# Numeric rope parameters: (smallest allowed value, whether that bound is excluded). Every one must be a
# finite number: the tables are computed with Python floats and math.log, where a string, a list,
# NaN, a zero or a negative number would raise TypeError/ValueError/ZeroDivisionError deep inside.
_ROPE_NUMBERS = {
    "rope_theta": (0.0, True),
    "factor": (0.0, True),
    "low_freq_factor": (0.0, True),
    "high_freq_factor": (0.0, True),
    "original_max_position_embeddings": (1.0, False),
    "beta_fast": (0.0, True),
    "beta_slow": (0.0, True),
    "attention_factor": (0.0, True),
    "mscale": (None, False),
    "mscale_all_dim": (None, False),
    "partial_rotary_factor": (0.0, True),
}
_ROPE_MAX = float(1 << 53)  # beyond any real context length or base; keeps every product finite


def _finite(key: str, v: Any) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if ok:
        try:
            f = float(v)
        except OverflowError:  # an int beyond float range
            ok = False
        else:
            ok = math.isfinite(f) and abs(f) <= _ROPE_MAX
    if not ok:
        raise ConfigError(f"rope parameter {key!r} must be a finite number (at most 2**53), got {v!r:.80}")
    return f


def _check_numbers(p: dict) -> None:
    for key, (lo, open_) in _ROPE_NUMBERS.items():
        if p.get(key) is None:
            continue
        v = _finite(key, p[key])
        if lo is not None and (v <= lo if open_ else v < lo):
            raise ConfigError(f"rope parameter {key!r} must be {'>' if open_ else '>='} {lo:g}, got {p[key]!r:.80}")
    f = p.get("partial_rotary_factor")
    if f is not None and f > 1:
        raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {f!r}")
    for key in ("short_factor", "long_factor"):
        v = p.get(key)
        if v is not None:
            if not isinstance(v, list):
                raise ConfigError(f"rope parameter {key!r} must be a list of numbers, got {v!r:.80}")
            for x in v:
                _finite(key, x)
    if p["rope_type"] == "yarn" and p["rope_theta"] == 1:
        raise ConfigError("yarn rope scaling needs rope_theta != 1 (it divides by log(rope_theta))")
    if p["rope_type"] == "longrope" and p.get("original_max_position_embeddings", 2) < 2:
        raise ConfigError("longrope needs original_max_position_embeddings >= 2 (it divides by its log)")


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _need(p: dict, key: str):
    if p.get(key) is None:
        raise ConfigError(f"rope type {p['rope_type']!r} needs {key!r} in rope_scaling/rope_parameters")
    return p[key]


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions; `rotary_dim` < head_dim rotates only the leading dims."""

    def __init__(self, head_dim: int, params: dict, max_position_embeddings: int, rotary_dim: int | None = None):
        super().__init__()
        self.head_dim = head_dim
        if params["rope_type"] == "proportional":
            # Gemma 4: the whole head in rotate-half form, the frequencies past partial_rotary_factor
            # zero (those dims unrotated), the exponents over head_dim
            rotary_dim = head_dim
        if rotary_dim is None:
            rotary_dim = int(head_dim * float(params.get("partial_rotary_factor", 1.0)))
        if not 2 <= rotary_dim <= head_dim or rotary_dim % 2 or (rotary_dim == 2 and params["rope_type"] == "dynamic"):
            raise ConfigError(f"rotary embeddings need an even number of rotated dims between 2 (4 for dynamic) and "
                              f"head_dim ({head_dim}), got {rotary_dim} (check head_dim and partial_rotary_factor)")
        self.rotary_dim = rotary_dim
        self.type = params["rope_type"]
        self.max_position_embeddings = max_position_embeddings
        dim = rotary_dim
        base = float(params["rope_theta"])
        self.base = base
        scaling = 1.0
        inv = _base_inv_freq(base, dim)
        if self.type == "linear":
            inv = inv / float(_need(params, "factor"))
        elif self.type == "proportional":
            angles = int(float(params.get("partial_rotary_factor", 1.0)) * dim // 2)
            inv = torch.cat((inv[:angles], torch.zeros(dim // 2 - angles))) / float(params.get("factor", 1.0))
        elif self.type == "dynamic":
            self.factor = float(_need(params, "factor"))
        elif self.type == "llama3":
            factor = float(_need(params, "factor"))
            low, high = float(_need(params, "low_freq_factor")), float(_need(params, "high_freq_factor"))
            old = float(params["original_max_position_embeddings"])
            low_wl, high_wl = old / low, old / high
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wl, inv / factor, inv)
            smooth = (old / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
            inv = torch.where(medium, smoothed, scaled)
        elif self.type == "yarn":
            inv, scaling = self._yarn(params, base, dim, max_position_embeddings)
        elif self.type == "longrope":
            old = int(params["original_max_position_embeddings"])
            factor = params.get("factor")
            if factor is None:
                factor = max_position_embeddings / old
            scaling = params.get("attention_factor")
            if scaling is None:
                scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))
            shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
            short = torch.tensor(_need(params, "short_factor"), dtype=torch.float32)
            long = torch.tensor(_need(params, "long_factor"), dtype=torch.float32)
            if short.numel() != dim // 2 or long.numel() != dim // 2:
                raise ConfigError(f"longrope short/long factors need {dim // 2} values, got {short.numel()}/{long.numel()}")
            self.register_buffer("long_inv_freq", 1.0 / (long * base**shape), persistent=False)
            inv = 1.0 / (short * base**shape)
            self.original_max = old
        factors = params.get("freq_factors")  # GGUF's rope_freqs (Llama 3.1 scaling as divisors)
        if factors is not None:
            if self.type != "default":
                raise ConfigError(f"freq_factors apply to the default rope type, not {self.type!r}")
            f = torch.tensor(factors, dtype=torch.float32) if isinstance(factors, list) else None
            if f is None or f.numel() != inv.numel() or not bool((f > 0).all()) or not bool(torch.isfinite(f).all()):
                raise ConfigError(f"rope freq_factors must be {inv.numel()} positive finite numbers")
            inv = inv / f
        self.attention_scaling = float(scaling)
        self.register_buffer("inv_freq", inv.float(), persistent=False)
        # None, or which of (t, h, w) each frequency reads with [3, B, T] positions
        self.register_buffer("mrope_axes", mrope_axes(params, dim // 2), persistent=False)

    @staticmethod
    def _yarn(p: dict, base: float, dim: int, max_pos: int):
        factor = p.get("factor")
        old = float(p["original_max_position_embeddings"])
        if factor is None:
            factor = max_pos / old
        factor = float(factor)

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        att = p.get("attention_factor")
        mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
        if att is None:
            att = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all else get_mscale(factor)
        beta_fast = p.get("beta_fast") or 32
        beta_slow = p.get("beta_slow") or 1

        def corr_dim(rot):
            return (dim * math.log(old / (rot * 2 * math.pi))) / (2 * math.log(base))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
        extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
        keep = 1 - ramp
        return inter * (1 - keep) + extra * keep, float(att)

    def _inv_freq(self, position_ids: torch.Tensor) -> torch.Tensor:
        if self.type == "dynamic":
            seq = (position_ids.max() + 1).float().clamp(min=self.max_position_embeddings)
            d = self.rotary_dim
            base = self.base * ((self.factor * seq / self.max_position_embeddings) - (self.factor - 1)) ** (d / (d - 2))
            idx = torch.arange(0, d, 2, dtype=torch.int64, device=position_ids.device).float() / d
            return 1.0 / (base**idx)
        if self.type == "longrope":
            seq = position_ids.max() + 1
            return torch.where(seq > self.original_max, self.long_inv_freq, self.inv_freq)
        return self.inv_freq

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, T, rotary_dim] for integer positions [B, T], or M-RoPE positions
        [3, B, T] (temporal, height, width: each frequency rotates by the axis `mrope_axes` gives it;
        [B, T] positions are all three axes at once, so text is plain RoPE)."""
        inv = self._inv_freq(position_ids).to(position_ids.device)
        freqs = position_ids[..., None].float() * inv
        if position_ids.dim() == 3:
            if self.mrope_axes is None or position_ids.shape[0] != 3:
                raise ValueError(f"[3, B, T] rotary positions need an M-RoPE config (mrope_section), got "
                                 f"{list(position_ids.shape)}")
            axes = self.mrope_axes.expand(1, *freqs.shape[1:])
            freqs = freqs.gather(0, axes)[0]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def mrope_axes(params: dict, half: int) -> torch.Tensor | None:
    """M-RoPE (Qwen2-VL and later): which position axis (0 t, 1 h, 2 w) each of the `half` rotary
    frequencies reads, from the rope dict's `mrope_section` (frequencies per axis). Contiguous
    sections in turn (Qwen2/2.5-VL: transformers' recomposition by `split(mrope_section)`), or
    with `mrope_interleaved` every third frequency from 1 (h) and 2 (w) up to 3 * section
    (Qwen3-VL, Qwen3.5: apply_interleaved_mrope). None without an mrope_section."""
    section = params.get("mrope_section")
    if section is None:
        return None
    ok = isinstance(section, list) and len(section) >= 3 and all(
        isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= half for n in section)
    if not ok or (not params.get("mrope_interleaved") and sum(section) != half):
        raise ConfigError(f"mrope_section must be non-negative integers summing to {half} (half the rotary dims), got "
                          f"{section!r:.80}")
    if params.get("mrope_interleaved"):
        axes = torch.zeros(half, dtype=torch.long)
        for axis in (1, 2):
            axes[axis:3 * section[axis]:3] = axis
        return axes
    return torch.cat([torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(section)])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q, k [B, H, T, D] with cos/sin [B, T, R]; R < D rotates the leading R dims only."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    r = cos.shape[-1]
    if r == q.shape[-1]:
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    q_rot, q_pass = q[..., :r], q[..., r:]
    k_rot, k_pass = k[..., :r], k[..., r:]
    q_rot = q_rot * cos + rotate_half(q_rot) * sin
    k_rot = k_rot * cos + rotate_half(k_rot) * sin
    return torch.cat((q_rot, q_pass), dim=-1), torch.cat((k_rot, k_pass), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the rotation of interleaved (GPT-J style) pairs."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rotary_interleaved(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """apply_rotary for checkpoints that rotate adjacent pairs (dims 2i, 2i+1) instead of halves
    (GLM-4, GPT-J, Cohere): the same cos/sin tables, each frequency repeated twice in a row."""
    r = cos.shape[-1]
    cos = cos[..., : r // 2].repeat_interleave(2, dim=-1).unsqueeze(1)
    sin = sin[..., : r // 2].repeat_interleave(2, dim=-1).unsqueeze(1)

    def rot(x):
        xr = x[..., :r]
        out = xr * cos + rotate_pairs(xr) * sin
        return out if r == x.shape[-1] else torch.cat((out, x[..., r:]), dim=-1)

    return rot(q), rot(k)


def apply_rotary_bthd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] (heads second to last, as projections come out) with cos/sin [B, T, R].
    Lets q and k be rotated together as one [B, T, H + KV, D] view of a fused projection."""
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    r = c.shape[-1]
    if r == x.shape[-1]:
        return x * c + rotate_half(x) * s
    xr = x[..., :r]
    return torch.cat((xr * c + rotate_half(xr) * s, x[..., r:]), dim=-1)


def rotary_from_config(raw: dict, head_dim: int, max_position_embeddings: int, rotary_dim: int | None = None,
                       rope_theta_default: float = 10000.0, device=None) -> RotaryEmbedding:
    """A RotaryEmbedding for a config.json dict, its tables on `device` (pass the VarBuilder's)."""
    rot = RotaryEmbedding(head_dim, rope_parameters(raw, rope_theta_default), max_position_embeddings, rotary_dim)
    return rot.to(device) if device is not None else rot
