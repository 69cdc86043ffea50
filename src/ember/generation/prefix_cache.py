"""The prefix cache: keys and values of token sequences already computed, reused by later requests
whose prompts begin with the same tokens (an earlier turn of the same chat, a shared system prompt),
so that only the rest of the prompt is prefilled.

Sequences are cut into blocks of `block` tokens, and a last, partial block for the tokens after the
last whole block. A prompt reuses the whole blocks it begins with, then as much of one more block as
it shares with the prompt's next tokens (keys and values of a position depend only on the tokens up
to it), so a chat's next turn reuses its previous turn up to the very token where they part.
A block is keyed by (its parent block, its tokens), so a key names the whole prefix up to the block's
end exactly (dictionary equality, no hash that could collide), and prompts that share a start share
its blocks (a tree; partial blocks are leaves). Each layer keeps one pool
tensor [blocks, kv_heads, block, head_dim] on the cache's device, allocated on first use and sized by
`max_bytes`; when it is full the least recently used leaf block is evicted (a block is never older
than its children, since every use touches its whole chain, leaf first).

`restore` copies a matched prefix into a cache row, `save` copies a row's blocks into the pools (only
blocks not held yet); both are a few batched copies per layer, far cheaper than the prefill they save.

Sliding-window layers. A window layer's keys are needed only for the last `window` positions before
the first token prefilled, and a ring cache (kv_cache.py) holds only a row's last `window` positions,
so a block records from which of its positions on its window layers' data is there (`win`): the
positions that were still in the rings when it was saved (a later save that sees more of it in a ring
extends that). A prefix is reused only if its last `window` positions have window data (shorter
matches are tried); full-attention layers have every block's data. So with ring caches the prefix
cache is correct, and reuses a prefix only up to where an earlier sequence ended (a chat's previous
turn: the common case) or a block boundary still in that sequence's rings.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from ..nn.kv_cache import KVCache

log = logging.getLogger("ember")

BLOCK = 16


class _Node:
    __slots__ = ("key", "id", "idx", "parent", "children", "start", "length", "win")

    def __init__(self, key, id_: int, idx: int, parent: "_Node | None", start: int):
        self.key, self.id, self.idx, self.parent = key, id_, idx, parent
        self.children = 0
        self.start, self.length = start, len(key[1])  # its first position, its tokens
        self.win = self.length  # window layers' data is valid from this offset on (length: none)


class PrefixCache:
    """Blocks of keys/values of earlier sequences, shared by every Generator over one model."""

    def __init__(self, model, max_bytes: int, *, block: int = BLOCK):
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be a positive integer, got {block!r}")
        self.layout = list(model.cache_layout())
        self.windows = list(model.cache_windows())  # the model's (attention) windows, per layer
        self.wmax = max((w for w in self.windows if w is not None), default=None)
        self.block = block
        self.max_bytes = int(max_bytes)
        self.capacity = 0  # blocks; set when the pools are made
        self.k: list[torch.Tensor] | None = None
        self.v: list[torch.Tensor] | None = None
        self.dtype = self.device = None
        self.nodes: dict[tuple, _Node] = {}
        self.kids: dict[tuple[int, int], set[_Node]] = {}  # (parent id, first token) -> child blocks
        self.lru: OrderedDict[int, _Node] = OrderedDict()  # node id -> node, least recent first
        self.free: list[int] = []
        self._next_id = 0
        self.stats = {"queries": 0, "query_tokens": 0, "hits": 0, "hit_tokens": 0, "evicted_blocks": 0}

    # ---- sizing ---------------------------------------------------------------------------------
    def block_bytes(self, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        return sum(2 * h * d * self.block * size for h, d in self.layout)

    @property
    def used_blocks(self) -> int:
        return len(self.nodes)

    @property
    def usage(self) -> float:
        """The fraction of the pools in use (0 before the first save)."""
        return len(self.nodes) / self.capacity if self.capacity else 0.0

    def compatible(self, cache) -> bool:
        """Whether `cache` is a KVCache of this model's layout (and of the pools' dtype and device)."""
        return (type(cache) is KVCache and len(cache.k) == len(self.layout)
                and all(tuple(cache.k[i].shape[1::2]) == tuple(hd) for i, hd in enumerate(self.layout))
                and (self.k is None or (cache.dtype == self.dtype and cache.device == self.device)))

    def _pools(self, cache: KVCache) -> bool:
        if self.k is not None:
            return True
        per = self.block_bytes(cache.dtype)
        n = self.max_bytes // per
        if n < 1:
            return False
        self.dtype, self.device, self.capacity = cache.dtype, cache.device, n
        # torch.empty: on CPU, pages are only committed as blocks are written
        self.k = [torch.empty(n, h, self.block, d, dtype=cache.dtype, device=cache.device) for h, d in self.layout]
        self.v = [torch.empty(n, h, self.block, d, dtype=cache.dtype, device=cache.device) for h, d in self.layout]
        self.free = list(range(n - 1, -1, -1))
        log.info("prefix cache: %d blocks of %d tokens (%.1f MiB)", n, self.block, n * per / 2**20)
        return True

    # ---- lookup ---------------------------------------------------------------------------------
    def _walk(self, tokens) -> tuple[list[_Node], int]:
        """The cached blocks `tokens` begins with (whole blocks, then the block that shares most of
        the tokens after them) and how many of its tokens they hold."""
        out, parent, bs = [], -1, self.block
        for j in range(len(tokens) // bs):
            node = self.nodes.get((parent, tuple(tokens[j * bs:(j + 1) * bs])))
            if node is None:
                break
            out.append(node)
            parent = node.id
        at = len(out) * bs
        rest = tokens[at:at + bs]
        best, r = None, 0
        for node in self.kids.get((parent, rest[0]), ()) if rest else ():
            k = 0
            for x, y in zip(node.key[1], rest):
                if x != y:
                    break
                k += 1
            if k > r:
                best, r = node, k
        if best is not None:
            out.append(best)
        return out, at + r

    def _window_ok(self, chain: list[_Node], P: int) -> bool:
        """Whether the window layers' data of the positions a query at P can see is in `chain`."""
        if self.wmax is None:
            return True
        lo = max(0, P - self.wmax)
        return all(node.win <= max(lo - node.start, 0) for node in chain[lo // self.block:(P - 1) // self.block + 1])

    def _touch(self, chain: list[_Node]) -> None:
        for node in reversed(chain):  # leaf first: a parent ends up more recent than its children
            self.lru.move_to_end(node.id)

    def restore(self, cache: KVCache, row: int, tokens) -> int:
        """Copy the longest cached prefix of `tokens` (leaving at least its last token to be fed)
        into cache row `row`; the number of tokens restored (0: none)."""
        self.stats["queries"] += 1
        self.stats["query_tokens"] += len(tokens)
        if self.k is None or len(tokens) < 2 or not self.compatible(cache):
            return 0
        chain, end = self._walk(tokens)
        if not chain:
            return 0
        n, bs = len(tokens), self.block
        # the longest first, then shorter ones at block boundaries (ring caches: see the module doc)
        for P in sorted({min(end, n - 1)} | {min(j * bs, n - 1) for j in range(1, end // bs + 1)}, reverse=True):
            if self._window_ok(chain, P):
                break
        else:
            return 0
        chain = chain[:(P - 1) // bs + 1]
        idx = torch.tensor([node.idx for node in chain], device=self.device)
        for layer, w in enumerate(self.windows):
            lo = 0 if w is None else max(0, P - w)
            b0 = lo // bs
            sel = idx[b0:]
            ring = cache.windows[layer]
            for pool, dst in ((self.k[layer], cache.k[layer]), (self.v[layer], cache.v[layer])):
                data = pool[sel].permute(1, 0, 2, 3).flatten(1, 2)[:, lo - b0 * bs:P - b0 * bs]  # [KV, P - lo, D]
                if ring is None:
                    dst[row, :, lo:P] = data
                else:
                    dst[row][:, torch.arange(lo, P, device=self.device) % ring] = data
        self._touch(chain)
        self.stats["hits"] += 1
        self.stats["hit_tokens"] += P
        return P

    # ---- saving ---------------------------------------------------------------------------------
    def _evict_one(self, keep: set[int]) -> int | None:
        for nid, node in self.lru.items():
            if node.children == 0 and nid not in keep:
                del self.lru[nid]
                del self.nodes[node.key]
                sibs = self.kids[(node.key[0], node.key[1][0])]
                sibs.discard(node)
                if not sibs:
                    del self.kids[(node.key[0], node.key[1][0])]
                if node.parent is not None:
                    node.parent.children -= 1
                self.stats["evicted_blocks"] += 1
                return node.idx
        return None

    def save(self, cache: KVCache, row: int, tokens, written: int | None = None) -> int:
        """Keep the blocks of `tokens` (whose keys/values are in cache row `row`, positions 0..) that
        are not held yet. `written`: how far the row has been written (its ring layers hold the
        positions before it; default len(tokens)). The number of blocks copied."""
        if not tokens or not self.compatible(cache) or not self._pools(cache):
            return 0
        bs = self.block
        written = len(tokens) if written is None else written
        rings = [w for w in cache.windows if w is not None]
        in_rings = max(0, written - min(rings)) if rings else 0  # window data is there from here on
        chain: list[_Node] = []
        new: list[_Node] = []  # nodes whose full layers' data is to be copied
        win: list[_Node] = []  # ... whose window layers' data is
        keep: set[int] = set()
        parent = None
        for j in range(0, len(tokens), bs):
            key = (parent.id if parent is not None else -1, tuple(tokens[j:j + bs]))
            node = self.nodes.get(key)
            if node is None:
                idx = self.free.pop() if self.free else self._evict_one(keep)
                if idx is None:
                    break  # every block is this chain's: keep what fits
                node = _Node(key, self._next_id, idx, parent, j)
                self._next_id += 1
                self.nodes[key] = node
                self.kids.setdefault((key[0], key[1][0]), set()).add(node)
                self.lru[node.id] = node
                if parent is not None:
                    parent.children += 1
                new.append(node)
            w0 = min(max(in_rings - j, 0), node.length)
            if w0 < node.win:
                node.win = w0
                win.append(node)
            chain.append(node)
            keep.add(node.id)
            parent = node
        self._copy_in(cache, row, new, full=True)
        self._copy_in(cache, row, win, full=False)
        self._touch(chain)
        return len(new)

    def _copy_in(self, cache: KVCache, row: int, nodes: list[_Node], full: bool) -> None:
        """Copy the positions of `nodes` from cache row `row` into their pool blocks: for the
        full-attention layers (full=True) or for the window layers."""
        if not nodes or (full and all(w is not None for w in self.windows)) or (
                not full and self.wmax is None):
            return
        bs = self.block
        starts = torch.tensor([node.start for node in nodes], device=self.device)
        idx = torch.tensor([node.idx for node in nodes], device=self.device)
        # a partial block's positions past its end hold whatever is there (never read back)
        pos = (starts[:, None] + torch.arange(bs, device=self.device)).flatten().clamp(max=cache.max_len - 1)
        for layer, w in enumerate(self.windows):
            if (w is None) != full:
                continue
            ring = cache.windows[layer]
            cols = pos if ring is None else torch.where(pos == cache.scratch, ring, pos % ring)
            for pool, src in ((self.k[layer], cache.k[layer]), (self.v[layer], cache.v[layer])):
                data = src[row][:, cols]  # [KV, n * bs, D]
                pool[idx] = data.unflatten(1, (len(nodes), bs)).permute(1, 0, 2, 3).to(pool.dtype)

    def clear(self) -> None:
        """Forget every block (the pools stay allocated)."""
        self.nodes.clear()
        self.kids.clear()
        self.lru.clear()
        if self.k is not None:
            self.free = list(range(self.capacity - 1, -1, -1))


def for_generator(gen, max_bytes: int | None = None, *, block: int = BLOCK) -> PrefixCache | None:
    """A PrefixCache for `gen` (default size: half of its KV cache), set as its `prefix_cache`; None
    (and a log line saying why) where it cannot apply."""
    if not PrefixCache(gen.model, 0, block=block).compatible(gen.cache):
        log.info("prefix cache: off (this model's cache, %s, keeps state it cannot restore)", type(gen.cache).__name__)
        return None
    pc = PrefixCache(gen.model, max_bytes if max_bytes is not None else gen.cache.nbytes // 2, block=block)
    if any(w is not None for w in gen.cache.windows):
        log.info("prefix cache: sliding-window layers keep rings, so a prompt reuses an earlier sequence "
                 "only up to where that sequence ended, or to a block still in its rings")
    gen.prefix_cache = pc
    return pc
