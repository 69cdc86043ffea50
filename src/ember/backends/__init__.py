"""Compute backends that transforms put behind a built model's layers: ember's native CPU kernels
(native.py, int16.py), torch's int4 kernel (int4.py), oneDNN prepacking (onednn.py)."""
from __future__ import annotations


def replace_modules(model, want, make) -> int:
    """Every submodule `m` of `model` with `want(m)` becomes `make(m)`, in place. Returns how many."""
    n = 0
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if want(child):
                setattr(mod, name, make(child))
                n += 1
    return n


def replace_fusing_gelu(model, want, make) -> int:
    """Every submodule `m` of `model` with `want(m)` becomes `make(m, gelu)`, in place. gelu is True for
    a Linear whose output its module sends through an exact GELU, which the module says with
    `fusable_gelu() -> attribute name`; its `gelu_fused()` is then called (it drops its own GELU).
    Returns how many."""
    n = 0
    for mod in list(model.modules()):
        fusable = getattr(mod, "fusable_gelu", None)
        name = fusable() if fusable is not None else None
        if name is not None and want(getattr(mod, name)):
            setattr(mod, name, make(getattr(mod, name), True))
            mod.gelu_fused()
            n += 1
        for child_name, child in list(mod.named_children()):
            if want(child):
                setattr(mod, child_name, make(child, False))
                n += 1
    return n
