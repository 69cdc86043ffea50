"""The Engine: Generators over one persistent cache, each given the static decode step (CUDA graphs,
or torch.compile) when it is made. `ember.load(..., engine=, compile=)` decides whether an LLM has one."""
from __future__ import annotations

from ..generation.loop import Generator
from .graphs import DEFAULT_BUCKETS, StaticDecoder


class Engine:
    def __init__(self, model, tokenizer, eos_ids=(), *, max_batch: int = 32, max_len: int | None = None,
                 cuda_graphs: bool | None = None, compile: bool | str = False, buckets=DEFAULT_BUCKETS, dtype=None,
                 kv_blocks: int | None = None, kv_block: int = 16):
        """compile: False, True (torch.compile mode "max-autotune-no-cudagraphs"), or a mode name.
        kv_blocks: a paged KV cache (nn/paged_cache.py) of this many blocks of `kv_block` tokens,
        shared by the rows as their sequences grow, instead of max_batch x max_len."""
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, list(eos_ids)
        p = next(model.parameters())
        self.device = p.device
        self.max_len = min(max_len or 4096, model.max_context)
        self.max_batch = max_batch
        if kv_blocks:
            from ..nn.paged_cache import PagedKVCache

            self.cache = PagedKVCache.for_model(model, max_batch, self.max_len, block=kv_block, num_blocks=kv_blocks,
                                                dtype=dtype, device=self.device)
        else:
            self.cache = model.new_cache(max_batch, self.max_len, dtype=dtype, device=self.device)
        use_graphs = (self.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        # On CPU "graphs" means the same static-shape step run eagerly (what the tests exercise).
        mode = compile if isinstance(compile, str) else "max-autotune-no-cudagraphs"
        if not isinstance(compile, str) and getattr(self.cache, "recurrent", False) and self.device.type == "cpu":
            # Inductor's max-autotune CPU templates (with freezing) compute a Mamba-2 decode step wrong
            # (torch 2.13; its default mode is right): state-space models compile in the default mode
            mode = "default"
        self.decoder = StaticDecoder(model, self.cache, buckets=buckets, capture=use_graphs and self.device.type == "cuda",
                                     compile=bool(compile), compile_mode=mode) if (use_graphs or compile) else None

    def generator(self, max_batch: int | None = None, longest: int | None = None) -> Generator:
        """A Generator over the engine's cache. Requests longer than the engine's context fall back
        to a plain generator sized for them."""
        if longest is not None and longest + 1 > self.max_len:
            return Generator(self.model, self.tokenizer, max_batch=min(max_batch or 1, self.max_batch),
                             max_len=longest + 1, eos_ids=self.eos_ids, device=self.device)
        return Generator(self.model, self.tokenizer, max_batch=min(max_batch or self.max_batch, self.max_batch),
                         max_len=self.max_len, eos_ids=self.eos_ids, device=self.device, cache=self.cache,
                         step=self.decoder)

    def warmup(self, buckets=None) -> None:
        if self.decoder is not None:
            self.decoder.warmup(buckets)
