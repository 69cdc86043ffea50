"""Whisper's token timestamps from cross-attention, as transformers' `_extract_token_timestamps`
(generate(..., return_token_timestamps=True)) computes them.

The cross-attention weights of the checkpoint's `alignment_heads` (generation_config.json:
[layer, head] pairs) over the generated tokens are normalised per encoder position (mean and
standard deviation over the tokens), smoothed along time with a median filter
(`median_filter_width`, 7), averaged over the heads, and aligned to the audio with dynamic time
warping; each token's time is where the warping path reaches the row of that token.

    heads = alignment_heads(generation_config, decoder_layers, decoder_heads)
    times = token_timestamps(model, enc, prompt, tokens, heads, num_frames=frames)   # seconds, one per token

Rows: the decoder sees the prompt then tokens[:-1] (the last token is never fed back), as in
generate; the prompt's rows are left out. Token k's time is where the path enters the row whose
input is token k; the last token repeats the one before (transformers' convention).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..errors import GenerationError
from .whisper import TIME_PRECISION  # (also the seconds per encoder position)


def alignment_heads(generation_config: dict, layers: int, heads: int) -> list[tuple[int, int]]:
    """The checkpoint's [layer, head] pairs, checked against the decoder's shape. transformers has no
    default for a checkpoint without them (its generate raises), so neither does ember."""
    raw: Any = generation_config.get("alignment_heads")
    if raw is None:
        raise GenerationError("word timestamps need the checkpoint's cross-attention alignment heads "
                              "(generation_config.json 'alignment_heads': [[layer, head], ...]); this one has none")
    ok = isinstance(raw, list) and 0 < len(raw) <= layers * heads and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in p)
        and 0 <= p[0] < layers and 0 <= p[1] < heads for p in raw)
    if not ok:
        raise GenerationError(f"generation_config.json 'alignment_heads' must be [layer, head] pairs within the "
                              f"decoder's {layers} layers and {heads} heads, got {str(raw)[:80]}")
    return [(int(a), int(b)) for a, b in raw]


def median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """Median over a window of `width` (odd) along the last dimension, edges reflected
    (transformers' _median_filter; sorting, faster than torch.median)."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    x = torch.nn.functional.pad(x, (pad, pad, 0, 0), mode="reflect")
    return x.unfold(-1, width, 1).sort()[0][..., pad]


def dtw(cost_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through `cost_matrix` [N, M] from (0, 0) to (N-1, M-1): its row and
    column indices. The same path as transformers' _dynamic_time_warping (float32 accumulated costs,
    its tie-breaking), computed one anti-diagonal at a time instead of cell by cell."""
    N, M = cost_matrix.shape
    cost = np.full((N + 1, M + 1), np.inf, dtype=np.float32)
    trace = np.full((N + 1, M + 1), -1, dtype=np.int8)
    cost[0, 0] = 0
    for d in range(2, N + M + 1):  # cells with i + j == d, i in 1..N, j in 1..M
        i = np.arange(max(1, d - M), min(N, d - 1) + 1)
        j = d - i
        c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
        t = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2))
        c = np.where(t == 0, c0, np.where(t == 1, c1, c2))
        cost[i, j] = cost_matrix[i - 1, j - 1] + c.astype(np.float64)
        trace[i, j] = t
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j = N, M
    rows, cols = [], []
    while i > 0 or j > 0:
        rows.append(i - 1)
        cols.append(j - 1)
        t = trace[i, j]
        if t == 0:
            i, j = i - 1, j - 1
        elif t == 1:
            i -= 1
        else:
            j -= 1
    return np.array(rows[::-1]), np.array(cols[::-1])


def times_from_weights(weights: torch.Tensor, filter_width: int, num_frames: int | None = None) -> list[float]:
    """Token times (seconds) from the alignment heads' weights [heads, N, S] over N fed tokens: N + 1
    times (see the module docstring); zeros when no token was fed."""
    if num_frames is not None:
        # transformers crops twice (for the batch, then per sample): the same crop, except for a window
        # that starts past the end of the audio (num_frames < 0), where parity needs both
        weights = weights[..., :num_frames // 2][..., :num_frames // 2]
    if weights.shape[1] == 0:
        return [0.0]
    std = torch.std(weights, dim=-2, keepdim=True, unbiased=False)
    mean = torch.mean(weights, dim=-2, keepdim=True)
    w = median_filter((weights - mean) / std, filter_width).mean(dim=0)
    rows, cols = dtw(-w.cpu().double().numpy())
    jumps = np.pad(np.diff(rows), (1, 0), constant_values=1).astype(bool)
    jump_times = (cols[jumps] * TIME_PRECISION).tolist()
    return jump_times + jump_times[-1:]


@torch.inference_mode()
def token_timestamps(model, enc: torch.Tensor, prompt: Sequence[int], tokens: Sequence[int],
                     heads: Sequence[tuple[int, int]], num_frames: int | None = None) -> list[float]:
    """Seconds from the window's start, one per token of `tokens` (generated after `prompt` from the
    encoder states `enc` [1, S, d]); num_frames: the log-mel frames of real audio in the window (the
    weights past them are dropped, as transformers does with an attention mask)."""
    if not tokens:
        return []
    ids = torch.tensor([list(prompt) + list(tokens[:-1])], dtype=torch.long, device=enc.device)
    w = model.alignment_weights(ids, enc, list(heads))[:, len(prompt):].float()
    return times_from_weights(w, model.config.median_filter_width, num_frames)
