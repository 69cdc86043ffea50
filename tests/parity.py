"""Helpers for parity tests against the transformers reference on tiny random checkpoints."""
from __future__ import annotations

import torch

# Weight std of the tiny models. transformers' default (0.02) gives logits of std ~0.16 and greedy
# text that settles into one repeated token within a few steps, which barely tests cached decoding;
# 0.3 gives logits of std ~2.4 (max ~10) and varied continuations (check_parity asserts it).
INIT = 0.3
# Norms that fix a scale the init would otherwise set get gains of about what the init gives families
# without them. q/k norms (Qwen 3, Gemma 3, OLMo 2, Phi, StableLM) make attention scores O(1) whatever
# the weights, so attention averages the context; post-block norms (Gemma 2/3, OLMo 2) make each
# block's output O(1), so the embedding (Gemma: times sqrt(hidden)) dominates the residual stream and,
# with a tied head, predicts itself. Either way greedy text collapses into a repeated token.
QK_NORM_GAIN = 3.0
POST_NORM_GAIN = 8.0


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every 1-D parameter (norm weights, biases) so that a norm applied as w vs (1 + w),
    or a missing bias, changes the output: transformers initialises them to exact 1s or 0s."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _scale_gain_(norm: torch.nn.Module, k: float) -> None:
    """Multiply a norm's output by k: its weight (and bias), or 1 + weight for Gemma's (1 + w) norms."""
    gemma = type(norm).__name__.startswith("Gemma")
    for p in norm.parameters():
        p.copy_((1 + p) * k - 1 if gemma else p * k)


def scale_norm_gains_(model: torch.nn.Module, qk: float = QK_NORM_GAIN,
                      post: float = POST_NORM_GAIN) -> torch.nn.Module:
    """Gains of `qk` on q/k norms and `post` on post-block norms (see QK_NORM_GAIN)."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.endswith(("q_norm", "k_norm", "q_layernorm", "k_layernorm")):
                _scale_gain_(mod, qk)
            # a post-attention norm only where a post-feedforward one exists: in Llama & co.
            # post_attention_layernorm is the MLP's input norm
            elif hasattr(mod, "post_feedforward_layernorm"):
                _scale_gain_(mod.post_feedforward_layernorm, post)
                _scale_gain_(mod.post_attention_layernorm, post)
    return model


def tiny_hf_model(config, model_cls=None, seed: int = 0, init: float | None = INIT):
    """A transformers model with random weights (fp32, eval mode): weights of std `init` (set as the
    config's initializer_range; None keeps the config's), 1-D parameters perturbed, q/k and
    post-block norm gains scaled."""
    if model_cls is None:
        from transformers import AutoModelForCausalLM

        model_cls = AutoModelForCausalLM
    if init is not None:
        for c in (config, getattr(config, "text_config", None)):
            if c is not None:
                c.initializer_range = init
    torch.manual_seed(seed)
    m = model_cls.from_config(config) if hasattr(model_cls, "from_config") else model_cls(config)
    return scale_norm_gains_(randomize_(m.float().eval(), seed))


def save(model, folder, max_shard_size=None) -> str:
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kw)
    return str(folder)


def padded(batch: int, length: int, vocab: int, pads: list[int], side: str = "left", seed: int = 0):
    """(ids, attention_mask, position_ids) for a batch whose row i has pads[i] padding tokens on the
    left or the right (the same random ids either way; padding positions hold random ids too)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i, p in enumerate(pads):
        if side == "left":
            mask[i, :p] = 0
        else:
            mask[i, length - p:] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def max_diff_masked(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> float:
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return (a.float() - b.float()).abs().max().item()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def ember_greedy(llm, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy tokens for several prompts generated together as one batch (ignore_eos)."""
    reqs = [llm.request(p, n, ignore_eos=True) for p in prompts]
    out = {r.id: [] for r in reqs}
    for ev in llm.events(reqs):
        out[ev.request.id].append(ev.token_id)
    return [out[r.id] for r in reqs]


def assert_varied(tokens: list[int], prompt) -> None:
    """A greedy continuation that exercises cached decoding: not collapsed into one repeated token
    or a short loop, as random weights at transformers' default init make it (see INIT)."""
    assert len(set(tokens)) >= 8 and len(set(tokens[-16:])) >= 4, \
        f"the greedy continuation of {prompt} is degenerate, so it tests little: {tokens}"


def check_parity(hf_model, folder, vocab: int, *, atol: float = 1e-4, seq: int = 24, gen: int = 32,
                 prompts=((5, 6, 7, 8, 9, 10, 11), (12, 13, 14)), padding_invariant: bool = True,
                 require_varied: bool = True, reference_left_padding: bool = True):
    """The standard checks: logits on a plain, a left-padded and a right-padded batch; greedy
    continuations (varied ones) equal to transformers' generate.

    padding_invariant=False for rope types whose frequencies depend on the batch's longest
    sequence (dynamic, longrope): a padded row then legitimately differs from the row alone.
    require_varied=False for a shape whose random greedy text loops whatever the init (another shape
    of the family must then check varied continuations).
    reference_left_padding=False where the reference's left-padded rows are not its rows alone (Llama 4's
    temperature tuning counts cache slots, padding included): left-padded rows are then checked
    against the rows alone only."""
    import ember

    llm = ember.load(folder, dtype=torch.float32, device="cpu")
    pads = [0, 5, 11]
    with torch.no_grad():
        ids, _, _ = padded(1, seq, vocab, [0])
        ref = hf_model(ids).logits
        got = llm.model(ids)
        assert got.dtype == torch.float32 and got.shape == ref.shape
        d = max_diff_masked(ref, got, None)
        assert d <= atol, f"logits differ by {d}"
        for side in ("left", "right"):
            ids, mask, pos = padded(3, seq, vocab, pads, side)
            ref = hf_model(ids, attention_mask=mask, position_ids=pos).logits
            got = llm.model(ids, attention_mask=mask)
            d = max_diff_masked(ref, got, mask)
            assert d <= atol or (side == "left" and not reference_left_padding), f"{side}-padded logits differ by {d}"
            if padding_invariant:  # a padded row must equal the same sequence unpadded
                for i in range(1, len(pads)):
                    real = mask[i].bool()
                    alone = hf_model(ids[i:i + 1, real]).logits[0]
                    d = (alone - got[i, real]).abs().max().item()
                    assert d <= atol, f"{side}-padded row {i} differs from the unpadded sequence by {d}"
    prompts = [list(p) for p in prompts]
    want = [hf_greedy(hf_model, p, gen) for p in prompts]
    for p, w in zip(prompts, want):
        if require_varied:
            assert_varied(w, p)
    if padding_invariant:
        assert ember_greedy(llm, prompts, gen) == want
    else:  # frequencies depend on the batch's longest row: compare prompt by prompt
        assert [ember_greedy(llm, [p], gen)[0] for p in prompts] == want
    return llm


def save_state_dict(model, folder) -> str:
    """config.json plus the model's in-memory tensors under their in-memory names, as one
    safetensors file: the layout transformers 5 computes with (e.g. fused `experts.gate_up_proj`),
    which save_pretrained converts back to the Hub layout."""
    from pathlib import Path

    from ember.io.safetensors import save_file

    model.config.save_pretrained(folder)
    sd = dict(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    save_file(sd, Path(folder) / "model.safetensors")
    return str(folder)


def models_by_shape(tmp_path_factory, config_of, prepare=None):
    """A `make(shape) -> (transformers model, folder)` that builds each shape's tiny random model
    (from `config_of(shape)`, then `prepare(model)` if given) once and saves it in its own temporary
    folder (a module fixture's body)."""
    made = {}

    def make(shape):
        if shape not in made:
            hf = tiny_hf_model(config_of(shape))
            if prepare is not None:
                prepare(hf)
            made[shape] = hf, save(hf, tmp_path_factory.mktemp(shape))
        return made[shape]
    return make


def check_cache_token_by_token(model, vocab: int, length: int = 20, chunks: tuple[int, int] = (7, 11),
                               atol: float = 1e-4) -> None:
    """Prefill two rows in two chunks (the second continuing from the cache: keys/values and any
    recurrent state), then decode one token at a time: every step's logits equal the uncached
    forward's at that position."""
    ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(1))
    a_end, b_end = chunks
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, length + 12)
        pos = torch.arange(length).expand(2, -1)
        a = model(ids[:, :a_end], position_ids=pos[:, :a_end], cache=cache, kv_len=a_end, fresh=True)
        b = model(ids[:, a_end:b_end], position_ids=pos[:, a_end:b_end], cache=cache, kv_len=b_end)
        torch.testing.assert_close(torch.cat([a, b], 1), full[:, :b_end], atol=atol, rtol=0)
        for t in range(b_end, length):
            step = model(ids[:, t:t + 1], position_ids=pos[:, t:t + 1], cache=cache, kv_len=t + 1)
            torch.testing.assert_close(step[:, 0], full[:, t], atol=atol, rtol=0)
