"""What every causal LM shares: positions, masks and cache plumbing, and the logits head.

A family's `ForCausalLM` sets `self.model` (embeddings → layers → final norm, returning hidden
states) and `self.lm_head`, and lists its layers' attention windows; forward() and new_cache()
come from here, so every family takes the same arguments:

    logits = model(input_ids)                                  # [B, T] -> [B, T, vocab] float32
    logits = model(input_ids, attention_mask=mask)             # padded batch (left or right)
    logits = model(ids, position_ids=pos, cache=c, kv_len=n)   # incremental decoding
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..nn.attention import build_mask, positions_from_mask
from ..nn.kv_cache import KVCache, ring_key_positions
from ..nn.state_cache import StateCache


@dataclass
class Step:
    """Per-forward inputs every layer needs."""

    position_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor | None
    cache: KVCache | None
    kv_len: int | None
    _masks: dict
    cache_rows: slice | None = None  # which cache rows this batch occupies (default: the first B)
    fresh: bool = False  # prefill from position 0: keys are the queries, plain causal attention
    causal: bool = True  # False: bidirectional self-attention (decoder-based encoders), no cache
    _host_pos: int | None = None  # the position of a single-token CPU decode, read once
    # [B, T] image block ids (-1: a text token): tokens of one image also see each other's later tokens
    # (Gemma 3). Only in a forward whose keys are its own tokens (no cache, or a fresh prefill).
    image_blocks: torch.Tensor | None = None
    # [3, B, T] (or [B, T]) rotary positions when they differ from position_ids (M-RoPE: an image's
    # tokens take (t, h, w) grid positions; see CausalLM.mrope). position_ids stay the cache columns.
    rope_position_ids: torch.Tensor | None = None

    @property
    def rope_positions(self) -> torch.Tensor:
        """The positions rotary embeddings rotate by: rope_position_ids, else position_ids."""
        return self.position_ids if self.rope_position_ids is None else self.rope_position_ids

    def mask(self, window: int | None = None) -> torch.Tensor | None:
        """The [B, 1, T, S] boolean mask for layers with this sliding window (None = full)."""
        if window not in self._masks:
            self._masks[window] = self._base_mask(window)
            if self.image_blocks is not None:
                self._masks[window] = self._with_image_blocks(self._masks[window], window)
        return self._masks[window]

    def _with_image_blocks(self, mask: torch.Tensor | None, window: int | None) -> torch.Tensor:
        """`mask` OR (query and key in the same image, within the window): transformers' Gemma 3
        masks, AND(window, OR(causal, same image))."""
        b, p = self.image_blocks, self.position_ids
        T = b.shape[1]
        if mask is None:
            mask = torch.ones(T, T, dtype=torch.bool, device=b.device).tril()[None, None]
        same = (b[:, :, None] == b[:, None, :]) & (b[:, :, None] >= 0)
        if window is not None:
            same = same & (p[:, :, None] - p[:, None, :] < window)
        return mask | same.unsqueeze(1)

    def _base_mask(self, window: int | None) -> torch.Tensor | None:
        if not self.causal:
            return build_mask(self.position_ids, self.attention_mask, window=window, causal=False)
        if self.cache is not None and self.cache.is_ring(window):
            return self._ring_mask(window)
        if self._single_query_sees_all(window):
            return None  # one query at the last cached position: every key is visible
        return build_mask(self.position_ids, self.attention_mask, kv_len=None if self.fresh else self.kv_len,
                          window=window)

    def chunk_mask(self, chunk: int) -> torch.Tensor:
        """The [B, 1, T, S] mask of chunked attention (Llama 4): a query sees the earlier keys of its
        own chunk of `chunk` positions (chunks counted from each row's position 0, padding excluded)."""
        key = ("chunk", chunk)
        if key not in self._masks:
            q = self.position_ids.unsqueeze(-1)  # [B, T, 1]
            if self.cache is not None:  # cache columns are positions
                k = torch.arange(self.kv_len, device=q.device)
                self._masks[key] = ((k <= q) & (k // chunk == q // chunk)).unsqueeze(1)
            else:
                causal = self.mask(None)
                if causal is None:
                    T = q.shape[1]
                    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[None, None]
                self._masks[key] = causal & (q // chunk == q.transpose(1, 2) // chunk).unsqueeze(1)
        return self._masks[key]

    def _ring_mask(self, window: int) -> torch.Tensor | None:
        """The mask over what KVCache.update returns for a ring layer (see kv_cache.py)."""
        T = self.position_ids.shape[1]
        mode = KVCache.ring_mode(window, T, self.kv_len)
        if mode == "plain":
            if self._single_query_sees_all(None):
                return None
            return build_mask(self.position_ids, None, kv_len=None if self.fresh else self.kv_len, window=window)
        if mode == "decode":
            if self._single_query_sees_all(None):
                return None  # one row at its last position: every ring column is in its window
            cols = torch.arange(window, device=self.position_ids.device)
            return (cols <= self.position_ids.unsqueeze(-1)).unsqueeze(1)
        kpos, valid = ring_key_positions(self.position_ids, window, self.fresh)
        q = self.position_ids.unsqueeze(-1)  # [B, T, 1]
        k = kpos.unsqueeze(1)  # [B, 1, S]
        return (valid.unsqueeze(1) & (k <= q) & (q - k < window)).unsqueeze(1)

    def decode_slot(self, layer: int, window: int | None):
        """(k_cache, v_cache, position) for one row decoding one token on CPU into a full-attention
        cache layer where every key up to the token is visible: the layer's cache rows [1, KV, S, D]
        and the host position to write at, for `ops.rope_cache_attention`. None otherwise."""
        c = self.cache
        if c is None or not isinstance(c, KVCache) or c.windows[layer] is not None \
                or not self._single_query_sees_all(window):  # (a paged cache has no contiguous rows)
            return None
        if c.batch == 1:
            return c.k[layer], c.v[layer], self.kv_len - 1
        rows = self.cache_rows or slice(0, 1)
        return c.k[layer][rows], c.v[layer][rows], self.kv_len - 1

    def _single_query_sees_all(self, window) -> bool:
        # CPU decode of one row: a host read of its position is cheap, and skipping the mask lets
        # SDPA take its unmasked kernel. (Never on CUDA: no host sync, and graphs need static masks.)
        p = self.position_ids
        if self.kv_len is None or self.fresh or p.shape != (1, 1) or p.is_cuda or torch.compiler.is_compiling():
            return False
        if self._host_pos is None:  # one host read per forward
            self._host_pos = int(p[0, 0])
        pos = self._host_pos
        return pos == self.kv_len - 1 and (window is None or window > pos)


def make_step(input_ids: torch.Tensor, attention_mask=None, position_ids=None, cache=None, kv_len=None,
              cache_rows: slice | None = None, fresh: bool = False, causal: bool = True,
              image_blocks: torch.Tensor | None = None, rope_position_ids: torch.Tensor | None = None) -> Step:
    B, T = input_ids.shape[:2]
    if position_ids is None:
        if cache is not None:
            raise ValueError("decoding with a cache needs position_ids")
        position_ids = positions_from_mask(attention_mask, B, T, input_ids.device)
    if cache is not None and kv_len is None:
        kv_len = int(position_ids.max()) + 1
    if cache is not None and attention_mask is not None:
        raise ValueError("with a cache, padding is expressed through position_ids, not attention_mask")
    if fresh and (cache is None or kv_len != T):
        raise ValueError("fresh=True means a prefill from position 0 whose kv_len equals its length")
    if not causal and cache is not None:
        raise ValueError("bidirectional attention runs without a cache")
    if image_blocks is not None and cache is not None and not fresh:
        raise ValueError("image blocks need the whole prompt in one forward (no cache, or fresh=True)")
    if rope_position_ids is not None and rope_position_ids.shape[-2:] != position_ids.shape:
        raise ValueError(f"rope_position_ids {list(rope_position_ids.shape)} do not match position_ids "
                         f"{list(position_ids.shape)}")
    return Step(position_ids, attention_mask, cache, kv_len, {}, cache_rows, fresh, causal, image_blocks=image_blocks,
                rope_position_ids=rope_position_ids)


class CausalLM(nn.Module):
    """Base of every family's ForCausalLM. Subclasses set model, lm_head, config."""

    final_logit_softcapping: float | None = None  # tanh soft-capping of the logits (Gemma 2)
    logits_scaling: float = 1.0  # logits are divided by it (Granite)
    # M-RoPE (Qwen2.5-VL ...): forwards over a cache without rope_position_ids rotate by cache
    # position + the row's delta (`cache.rope_deltas`, nn/kv_cache.py), so decoding after an image
    # prompt continues from its rotary positions; the Generator sets the deltas.
    mrope: bool = False

    @property
    def bidirectional(self) -> bool:
        """An encoder variant of a decoder (EmbeddingGemma's use_bidirectional_attention): it embeds,
        it does not generate."""
        return bool(getattr(self.config, "use_bidirectional_attention", False))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        kv_len: int | None = None,
        logits_index: torch.Tensor | None = None,
        cache_rows: slice | None = None,
        fresh: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        image_blocks: torch.Tensor | None = None,
        rope_position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (float32) for every position, or only at `logits_index` [B] → [B, 1, vocab].

        fresh=True (with a cache): this chunk starts every row at position 0, so attention is plain
        causal over the chunk and needs no mask (faster kernels). Right-padding rows is fine then.
        inputs_embeds [B, T, E]: the input embeddings to use instead of input_ids' (image+text models
        merge image features into them); image_blocks [B, T]: see `Step.image_blocks`.
        rope_position_ids [3, B, T]: M-RoPE models' rotary positions (t, h, w) where they differ from
        position_ids (an image prompt's prefill); without them an M-RoPE model over a cache rotates
        by position_ids + the rows' `cache.rope_deltas` (see `mrope`)."""
        if cache is not None:
            cache.begin_forward()  # per-forward memos (the decode write column) start afresh
            if rope_position_ids is None and self.mrope and position_ids is not None:
                rope_position_ids = cache.rope_deltas.positions(position_ids, cache_rows)
        step = make_step(input_ids, attention_mask, position_ids, cache, kv_len, cache_rows, fresh,
                         causal=not self.bidirectional, image_blocks=image_blocks, rope_position_ids=rope_position_ids)
        h = self.model(input_ids, step) if inputs_embeds is None else self.model(input_ids, step, inputs_embeds)
        return self.logits(h, logits_index)

    def logits(self, h: torch.Tensor, logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """The head over the final hidden states h [B, T, E] (only at `logits_index` [B]: [B, 1, vocab])."""
        if logits_index is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_index].unsqueeze(1)
        logits = self.lm_head(h)
        if self.logits_scaling != 1.0:
            logits = logits / self.logits_scaling
        if self.final_logit_softcapping:
            c = self.final_logit_softcapping
            logits = torch.tanh(logits.float() / c) * c
        return logits.float()

    def cache_layout(self) -> list[tuple[int, ...]]:
        """(kv_heads, head_dim) per layer, for KVCache (or (kv_heads, k_dim, v_dim): MLA's latent);
        (0, 0), no keys or values, for a layer without attention (a state-space layer)."""
        return [(a.num_kv_heads, a.head_dim) if (a := getattr(layer, "self_attn", None)) is not None else (0, 0)
                for layer in self.model.layers]

    def cache_windows(self) -> list[int | None]:
        """Each layer's sliding window (None = full attention): those layers keep a ring in KVCache."""
        return [getattr(getattr(layer, "self_attn", None), "window", None) for layer in self.model.layers]

    def state_layout(self) -> list:
        """Each layer's recurrent state (`StateCache`'s spec: shapes and dtypes), from the layer's
        `state_spec()`; None for layers without (attention layers)."""
        return [layer.state_spec() if hasattr(layer, "state_spec") else None for layer in self.model.layers]

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> KVCache:
        """The cache generation runs in: a KVCache, or a StateCache where layers keep recurrent state."""
        p = next(iter(self.parameters()))
        dtype = dtype or (p.dtype if p.is_floating_point() else torch.float32)
        states = self.state_layout()
        if any(s is not None for s in states):
            return StateCache(batch, max_len, self.cache_layout(), states, dtype=dtype, device=device or p.device,
                              windows=self.cache_windows())
        return KVCache(batch, max_len, self.cache_layout(), dtype=dtype, device=device or p.device,
                       windows=self.cache_windows())

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Cache bytes one more token of context costs a sequence (ring layers cost nothing more)."""
        p = next(iter(self.parameters()))
        size = torch.empty((), dtype=dtype or (p.dtype if p.is_floating_point() else torch.float32)).element_size()
        return sum(KVCache.token_width(spec) * size for spec, w in zip(self.cache_layout(), self.cache_windows())
                   if w is None)

    @property
    def max_context(self) -> int:
        """The longest sequence the model is meant for: max_position_embeddings, times the factor of
        rope scalings that extend it at run time (dynamic NTK)."""
        n = int(getattr(self.config, "max_position_embeddings", 0) or 1 << 20)
        rotary = getattr(getattr(self, "model", None), "rotary", None)
        if rotary is not None and getattr(rotary, "type", None) == "dynamic":
            n = int(min(n * rotary.factor, 1 << 62))
        return max(n, 1)


def tied_or_own_head(vb, cfg, embed_weight: torch.Tensor, hidden: int, vocab: int, bias: bool = False) -> nn.Module:
    """lm_head: the embedding matrix when tied (or when the checkpoint has no lm_head), else its own
    (split over the vocabulary under tensor parallelism: `ember.distributed.layers.head`)."""
    from ..distributed.layers import head
    import logging

    if getattr(cfg, "tie_word_embeddings", False) or not vb.contains("lm_head.weight"):
        if not getattr(cfg, "tie_word_embeddings", False):
            logging.getLogger("ember").warning("checkpoint has no lm_head.weight: tying it to the embeddings")
        return head(vb, embed_weight, hidden, vocab)  # a packed (GGUF) table gives a packed head
    return head(vb, None, hidden, vocab, bias=bias)
