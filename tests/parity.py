"""Helpers for parity tests against the transformers reference on tiny random checkpoints."""
from __future__ import annotations

import torch


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every 1-D parameter (norm weights, biases) so that a norm applied as w vs (1 + w),
    or a missing bias, changes the output: transformers initialises them to exact 1s or 0s."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def tiny_hf_model(config, model_cls=None, seed: int = 0):
    """A transformers model with random weights (fp32, eval mode)."""
    if model_cls is None:
        from transformers import AutoModelForCausalLM

        model_cls = AutoModelForCausalLM
    torch.manual_seed(seed)
    m = model_cls.from_config(config) if hasattr(model_cls, "from_config") else model_cls(config)
    return randomize_(m.float().eval(), seed)


def save(model, folder, max_shard_size=None) -> str:
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kw)
    return str(folder)


def left_padded(batch: int, length: int, vocab: int, pads: list[int], seed: int = 0):
    """(ids, attention_mask, position_ids) for a batch whose row i has pads[i] left-padding tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i, p in enumerate(pads):
        mask[i, :p] = 0
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


def check_parity(hf_model, folder, vocab: int, *, atol: float = 1e-4, seq: int = 24, gen: int = 32,
                 prompts=((5, 6, 7, 8, 9, 10, 11), (12, 13, 14)), padding_invariant: bool = True):
    """The standard checks: logits on a plain and a left-padded batch, greedy continuations.

    padding_invariant=False for rope types whose frequencies depend on the batch's longest
    sequence (dynamic, longrope): a padded row then legitimately differs from the row alone."""
    import ember

    llm = ember.load(folder, dtype=torch.float32, device="cpu")
    ids, mask, pos = left_padded(3, seq, vocab, [0, 5, 11])
    with torch.no_grad():
        ref = hf_model(ids[:1]).logits
        got = llm.model(ids[:1])
        assert got.dtype == torch.float32 and got.shape == ref.shape
        d = max_diff_masked(ref, got, None)
        assert d <= atol, f"logits differ by {d}"
        ref = hf_model(ids, attention_mask=mask, position_ids=pos).logits
        got = llm.model(ids, attention_mask=mask)
        d = max_diff_masked(ref, got, mask)
        assert d <= atol, f"left-padded logits differ by {d}"
        if padding_invariant:  # a padded row must equal the same sequence unpadded
            solo = llm.model(ids[2:3, 11:])
            d = (solo[0] - got[2, 11:]).abs().max().item()
            assert d <= atol, f"padded row differs from the unpadded sequence by {d}"
    prompts = [list(p) for p in prompts]
    want = [hf_greedy(hf_model, p, gen) for p in prompts]
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
