"""Sentence embeddings from an encoder: `ember.load(model).embed(texts)`.

    enc = ember.load("sentence-transformers/all-MiniLM-L6-v2")
    vecs = enc.embed(["A cat sat on the mat.", "Un chat"])      # [2, 384] float32, L2-normalised
    vecs, truncated = enc.embed(texts, return_truncated=True)    # which texts exceeded enc.max_length
    hidden = enc.model(input_ids, attention_mask)                # last hidden states [B, T, hidden]

What happens after the encoder follows the checkpoint's sentence-transformers files, read the way
sentence-transformers reads them: `modules.json` lists the modules in order (Transformer, Pooling,
Dense, Normalize); `1_Pooling/config.json` picks the pooling (cls, mean, max, mean_sqrt_len_tokens,
weightedmean, lasttoken, or several concatenated); `2_Dense` holds a linear layer + activation;
`sentence_bert_config.json` gives max_seq_length and do_lower_case; `config_sentence_transformers.json`
the prompts. A checkpoint without them is mean-pooled, unnormalised, and the Embedder says so
(`pooling_source`, and a log line). The files come from downloaded repositories: every field ember
reads is type- and range-checked (an `EmbeddingError` names the file and the field), and a module's
`path` must be relative and stay inside the model folder.

Texts are tokenized together, sorted by length and run in batches of `batch_size` with little
padding; the results come back in the input order. Texts longer than `max_length` tokens are
truncated (as sentence-transformers does); `return_truncated=True` tells which ones.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Sequence, cast, overload

import torch
import torch.nn.functional as F
from torch import nn

from .errors import EmbeddingError, TokenizerError
from .loading import Loaded

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

log = logging.getLogger("ember")

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# sentence-transformers' legacy boolean keys, in the order it concatenates the modes
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Dense activations by class name (sentence-transformers stores e.g. "torch.nn.modules.activation.Tanh")
_DENSE_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Tanh": torch.tanh, "Identity": lambda x: x, "ReLU": F.relu, "GELU": F.gelu, "Sigmoid": torch.sigmoid,
    "SiLU": F.silu,
}


def _read_json(path: Path) -> Any:
    from .io.safefile import MAX_CONFIG_BYTES, read_text

    text = read_text(path, MAX_CONFIG_BYTES, EmbeddingError, "sentence-transformers file")
    try:
        return json.loads(text)
    except ValueError as e:  # ValueError: UnicodeDecodeError, JSONDecodeError, ints past the digit limit
        raise EmbeddingError(f"{path}: cannot read: {e}") from None
    except RecursionError:
        raise EmbeddingError(f"{path}: cannot read: JSON nested too deeply") from None


# ---- typed fields of the sentence-transformers files (each error names the file and the field) ----
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_bool(cfg: dict, key: str, default: bool, where: Path | str) -> bool:
    """cfg[key] as a bool: absent or null gives `default`; anything but true/false is refused."""
    v = cfg.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise EmbeddingError(f"{where}: '{key}' must be true or false, got {v!r:.60}")
    return v


def _opt_str(cfg: dict, key: str, where: Path | str) -> str | None:
    v = cfg.get(key)
    if v is not None and not isinstance(v, str):
        raise EmbeddingError(f"{where}: '{key}' must be a string, got {v!r:.60}")
    return v


def _positive_int(cfg: dict, key: str, where: Path | str) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise EmbeddingError(f"{where}: '{key}' must be a positive integer, got {v!r:.60}")
    return v


# ---- modules after the encoder ----------------------------------------------------------------
class Pooling:
    """Token embeddings [B, T, E] + padding mask [B, T] → one vector per text, computed in float32."""

    def __init__(self, modes: Sequence[str] = ("mean",), include_prompt: bool = True):
        modes = tuple(modes)
        bad = [m for m in modes if m not in POOLING_MODES]
        if bad or not modes:
            raise EmbeddingError(f"unsupported pooling mode(s) {bad or modes}; supported: {', '.join(POOLING_MODES)}")
        self.modes = modes
        self.include_prompt = include_prompt

    @classmethod
    def from_config(cls, cfg: dict, where: Path | str = "the Pooling config") -> "Pooling":
        """From a sentence-transformers Pooling config (new `pooling_mode` or legacy boolean keys);
        `where` (the file) names the source in errors."""
        if not isinstance(cfg, dict):
            raise EmbeddingError(f"{where}: expected a JSON object")
        mode = cfg.get("pooling_mode")
        if mode is None:
            mode = tuple(m for k, m in _LEGACY_POOLING_KEYS.items() if _opt_bool(cfg, k, False, where)) or ("mean",)
        if isinstance(mode, str):
            modes = (mode,)
        elif isinstance(mode, (list, tuple)) and mode and all(isinstance(m, str) for m in mode):
            modes = tuple(mode)
        else:
            raise EmbeddingError(f"{where}: 'pooling_mode' must be a mode name or a non-empty list of them "
                                 f"({', '.join(POOLING_MODES)}), got {mode!r:.60}")
        include_prompt = _opt_bool(cfg, "include_prompt", True, where)
        try:
            return cls(modes, include_prompt=include_prompt)
        except EmbeddingError as e:
            raise EmbeddingError(f"{where}: 'pooling_mode': {e}") from None

    def __repr__(self) -> str:
        return f"Pooling({'+'.join(self.modes)})"

    def __call__(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = h.float()
        m = mask.to(h.dtype).unsqueeze(-1)  # [B, T, 1]
        out = []
        for mode in self.modes:
            if mode == "cls":
                first = mask.to(torch.int).argmax(dim=1)  # first attended token (0 unless a prompt is excluded)
                out.append(h[torch.arange(h.shape[0], device=h.device), first])
            elif mode == "max":
                out.append(h.masked_fill(m == 0, float("-inf")).max(dim=1).values)
            elif mode in ("mean", "mean_sqrt_len_tokens"):
                n = m.sum(dim=1).clamp(min=1e-9)
                out.append((h * m).sum(dim=1) / (n if mode == "mean" else n.sqrt()))
            elif mode == "weightedmean":
                w = m * torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype).view(1, -1, 1)
                out.append((h * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9))
            else:  # lasttoken: the last attended token (right padding)
                T = h.shape[1]
                values, idx = mask.flip(1).max(1)
                idx = torch.where(values == 0, T - 1, idx)
                out.append((h * m)[torch.arange(h.shape[0], device=h.device), T - 1 - idx])
        return out[0] if len(out) == 1 else torch.cat(out, dim=-1)


class Dense(nn.Module):
    """sentence-transformers' Dense: act(W x + b) (+ x, or + R x, with use_residual)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act: str = "Tanh",
                 residual: torch.Tensor | None | bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight.float(), requires_grad=False)
        self.bias = nn.Parameter(bias.float(), requires_grad=False) if bias is not None else None
        if act not in _DENSE_ACTIVATIONS:
            raise EmbeddingError(f"Dense activation {act!r} is not supported; supported: {', '.join(_DENSE_ACTIVATIONS)}")
        self.act_name = act
        self.act = _DENSE_ACTIVATIONS[act]
        self.use_residual = residual is not False
        self.residual = nn.Parameter(residual.float(), requires_grad=False) if isinstance(residual, torch.Tensor) else None

    @classmethod
    def from_folder(cls, folder: Path) -> "Dense":
        cfg = _read_json(folder / "config.json")
        if not isinstance(cfg, dict):
            raise EmbeddingError(f"{folder / 'config.json'}: expected a JSON object")
        where = folder / "config.json"
        if cfg.get("module_input_name", "sentence_embedding") != "sentence_embedding":
            raise EmbeddingError(f"{where}: a Dense module over 'module_input_name' {cfg['module_input_name']!r:.60} "
                                 f"is not supported (only 'sentence_embedding')")
        fin, fout = _positive_int(cfg, "in_features", where), _positive_int(cfg, "out_features", where)
        act = (_opt_str(cfg, "activation_function", where) or "torch.nn.modules.activation.Tanh").rsplit(".", 1)[-1]
        if act not in _DENSE_ACTIVATIONS:
            raise EmbeddingError(f"{where}: 'activation_function' {act!r:.60} is not supported; supported: "
                                 f"{', '.join(_DENSE_ACTIVATIONS)}")
        use_bias = _opt_bool(cfg, "bias", True, where)
        use_residual = _opt_bool(cfg, "use_residual", False, where)
        tensors = _module_weights(folder)
        try:
            w = tensors["linear.weight"]
            b = tensors.get("linear.bias") if use_bias else None
        except KeyError:
            raise EmbeddingError(f"{folder}: no linear.weight in the Dense module's weights") from None
        if tuple(w.shape) != (fout, fin):
            raise EmbeddingError(f"{folder}: linear.weight has shape {list(w.shape)}, config says [{fout}, {fin}]")
        if b is not None and tuple(b.shape) != (fout,):
            raise EmbeddingError(f"{folder}: linear.bias has shape {list(b.shape)}, config says [{fout}]")
        residual: torch.Tensor | bool | None = False
        if use_residual:
            residual = True if fin == fout else tensors.get("residual.weight")
            if residual is None:
                raise EmbeddingError(f"{folder}: use_residual with in != out needs residual.weight")
            if isinstance(residual, torch.Tensor) and tuple(residual.shape) != (fout, fin):
                raise EmbeddingError(f"{folder}: residual.weight has shape {list(residual.shape)}, "
                                     f"config says [{fout}, {fin}]")
        return cls(w, b, act, residual)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(F.linear(x, self.weight, self.bias))
        if self.use_residual:
            y = y + (x if self.residual is None else F.linear(x, self.residual))
        return y


def _module_weights(folder: Path) -> dict[str, torch.Tensor]:
    st = folder / "model.safetensors"
    if st.is_file():
        from .varbuilder import SafetensorsSource

        src = SafetensorsSource([st])
        return {k: src.load(k) for k in src.keys()}
    binf = folder / "pytorch_model.bin"
    if binf.is_file():
        try:
            sd = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:  # refused or corrupt pickle
            raise EmbeddingError(f"{binf}: unreadable as a weights-only PyTorch file: {type(e).__name__}: {e}") from None
        if isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values()):
            return sd
        raise EmbeddingError(f"{binf}: not a state dict of tensors")
    raise EmbeddingError(f"{folder}: no model.safetensors or pytorch_model.bin")


class Normalize:
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2, dim=-1)

    def __repr__(self) -> str:
        return "Normalize()"


# ---- the sentence-transformers files ------------------------------------------------------------
def _read_object(path: Path) -> dict:
    """A JSON object file's contents, or {} when the file is absent."""
    try:
        if not path.is_file():
            return {}
    except OSError as e:  # a name too long, ...
        raise EmbeddingError(f"{path}: cannot read: {e}") from None
    data = _read_json(path)
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path}: expected a JSON object")
    return data


def _module_dir(root: Path, modules_file: Path, i: int, rel: Any) -> Path:
    """The folder of module i: `rel` must be a relative path that stays inside the model folder."""
    if rel is None:
        rel = ""
    if not isinstance(rel, str):
        raise EmbeddingError(f"{modules_file}: module {i} 'path' must be a string, got {rel!r:.60}")
    if "\0" in rel:
        raise EmbeddingError(f"{modules_file}: module {i} 'path' {rel!r:.60} contains a NUL character")
    if Path(rel).is_absolute() or rel.startswith(("/", "\\")) or rel[1:2] == ":" and rel[:1].isalpha():
        raise EmbeddingError(f"{modules_file}: module {i} 'path' {rel!r:.60} is absolute; module paths must be "
                             f"relative to the model folder")
    folder = root / rel
    try:
        inside = folder.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a name too long ...
        raise EmbeddingError(f"{modules_file}: module {i} 'path' {rel!r:.60} cannot be resolved: {e}") from None
    if not inside:
        raise EmbeddingError(f"{modules_file}: module {i} 'path' {rel!r:.60} leads outside the model folder; "
                             f"module paths must stay inside it")
    return folder


def read_sentence_transformers(root: Path) -> tuple["Pooling | None", list["Dense | Normalize"], str | None]:
    """(pooling, post-modules after pooling, source description) from a checkpoint folder."""
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return None, [], None
    modules = _read_json(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise EmbeddingError(f"{modules_file}: expected a list of module objects")
    for i, m in enumerate(modules):
        if m.get("idx") is not None and not _is_int(m["idx"]):
            raise EmbeddingError(f"{modules_file}: module {i} 'idx' must be an integer, got {m['idx']!r:.60}")
        if not isinstance(m.get("type"), str):
            raise EmbeddingError(f"{modules_file}: module {i} 'type' must be a class name string, "
                                 f"got {m.get('type')!r:.60}")
    pooling: Pooling | None = None
    post: list[Dense | Normalize] = []
    order = sorted(range(len(modules)), key=lambda i: (modules[i].get("idx") or 0, i))
    for i in order:
        m = modules[i]
        kind = m["type"].rsplit(".", 1)[-1]
        path = _module_dir(root, modules_file, i, m.get("path"))
        if kind == "Transformer":
            if m.get("path"):
                raise EmbeddingError(f"{modules_file}: a Transformer module in a subfolder ({m['path']}) is not supported")
        elif kind == "Pooling":
            cfg_file = path / "config.json"
            pooling = Pooling.from_config(_read_object(cfg_file), cfg_file)
        elif kind == "Dense":
            if pooling is None:
                raise EmbeddingError(f"{modules_file}: a Dense module before Pooling is not supported")
            post.append(Dense.from_folder(path))
        elif kind == "Normalize":
            post.append(Normalize())
        else:
            raise EmbeddingError(f"{modules_file}: sentence-transformers module {m['type']!r:.200} is not supported "
                                 f"(supported: Transformer, Pooling, Dense, Normalize)")
    if pooling is None:
        raise EmbeddingError(f"{modules_file}: no Pooling module (token-level models are not supported)")
    return pooling, post, str(modules_file)


class CausalLMEncoder(nn.Module):
    """A causal LM's last hidden states (final norm applied) seen as an encoder, for embedding models
    built on decoders (Qwen3-Embedding and the like: last-token pooling). Batches are right-padded,
    which causal attention makes exact: a token never sees the padding after it."""

    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.lm = lm
        self.config = lm.config
        self.hidden_size = lm.config.hidden_size
        self.max_tokens = lm.max_context
        pad = getattr(lm.config, "pad_token_id", None)
        self.pad_token_id = pad if isinstance(pad, int) else 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        from .models.base import make_step

        step = make_step(input_ids, attention_mask, causal=not self.lm.bidirectional)
        return self.lm.model(input_ids, step).float()


def _check_texts(texts: object) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if texts is None:
        raise EmbeddingError("embed() needs a string or a list of strings, got None")
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
        raise EmbeddingError(f"embed() needs a string or a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise EmbeddingError("embed() got an empty list of texts; pass at least one string")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise EmbeddingError(f"texts[{i}] is {type(t).__name__} ({t!r:.40}), not a string; "
                                 f"every text must be a str")
    return texts


class Embedder:
    """A loaded encoder with its tokenizer and sentence-transformers pipeline; see the module docstring.

    Attributes: `model` (the encoder: model(input_ids, attention_mask) -> hidden states),
    `tokenizer`, `pooling`, `modules` (after pooling: Dense, Normalize), `max_length` (tokens, settable),
    `dim`, `pooling_source` (the file the pipeline came from, or "default"), `prompts`.
    """

    def __init__(self, loaded: Loaded):
        self._loaded = loaded
        self.config = loaded.config
        # the encoder: model(input_ids, attention_mask) -> last hidden states
        lm: Any = loaded.model
        self.model: Any = (lm if loaded.entry.task == "encoder" else lm.as_encoder()
                           if hasattr(lm, "as_encoder") else CausalLMEncoder(lm))  # as_encoder: T5
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.dtype = loaded.dtype
        root = Path(loaded.snapshot.root)
        hidden = self.model.hidden_size
        pooling, modules, source = read_sentence_transformers(root)
        if pooling is None:
            log.warning("%s has no sentence-transformers modules.json: using mean pooling over the last hidden "
                        "states, not normalised", loaded.snapshot.source or root)
            pooling, modules, source = Pooling(("mean",)), [], "default"
        self.pooling: Pooling = pooling
        self.modules: list = modules
        self.pooling_source: str = source or "default"
        self.normalized = any(isinstance(m, Normalize) for m in modules)
        self._post = [m.to(self.device) if isinstance(m, nn.Module) else m for m in modules]
        dim = hidden * len(pooling.modes)
        for m in modules:
            if isinstance(m, Dense):
                if m.weight.shape[1] != dim:
                    raise EmbeddingError(f"a Dense module expects {m.weight.shape[1]} inputs, the pooling gives {dim}")
                dim = m.out_features
        self.dim = dim

        sb_file, stc_file = root / "sentence_bert_config.json", root / "config_sentence_transformers.json"
        sb, stc = _read_object(sb_file), _read_object(stc_file)
        prompts = stc.get("prompts")
        if prompts is None:
            prompts = {}
        if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
            raise EmbeddingError(f"{stc_file}: 'prompts' must map names to strings, got {prompts!r:.60}")
        self.prompts: dict[str, str] = dict(prompts)
        default = _opt_str(stc, "default_prompt_name", stc_file) or None
        if default is not None and default not in self.prompts:
            raise EmbeddingError(f"{stc_file}: 'default_prompt_name' {default!r:.60} is not one of its prompts "
                                 f"({', '.join(map(repr, self.prompts)) or 'none'})")
        self.default_prompt_name: str | None = default
        max_seq = sb.get("max_seq_length")
        if max_seq is not None and (not _is_int(max_seq) or max_seq < 1):
            raise EmbeddingError(f"{sb_file}: 'max_seq_length' must be a positive integer, got {max_seq!r:.60}")
        self._max_length = self._default_max_length(max_seq)
        self.do_lower_case = _opt_bool(sb, "do_lower_case", False, sb_file)
        self._warned_truncation = False
        self._prompt_lengths: dict[str, int] = {}
        self.pad_token_id = self.model.pad_token_id
        if self.tokenizer is not None:
            self._setup_tokenizer()

    def __repr__(self) -> str:
        return (f"Embedder({self._loaded.snapshot.source!r}, type={self._loaded.entry.model_type}, dim={self.dim}, "
                f"pooling={'+'.join(self.pooling.modes)}, normalize={self.normalized}, max_length={self.max_length}, "
                f"dtype={self.dtype}, device={self.device})")

    def _default_max_length(self, configured: object) -> int:
        """sentence_bert_config's max_seq_length, else the tokenizer's model_max_length, capped by the
        positions the model has (as sentence-transformers does)."""
        cap = int(self.model.max_tokens)
        if isinstance(configured, int) and not isinstance(configured, bool) and configured > 0:
            if configured > cap:
                log.warning("max_seq_length %d exceeds the %d positions the model has: using %d", configured, cap, cap)
            return min(configured, cap)
        mml = self.tokenizer.model_max_length if self.tokenizer is not None else None
        return min(mml, cap) if isinstance(mml, int) and mml > 0 else cap

    # ---- tokenizer ----------------------------------------------------------------------------
    def _setup_tokenizer(self) -> None:
        tk = self.tokenizer.tk
        tk.no_padding()  # tokenizer.json may carry a fixed padding/truncation; batches are padded here
        tk.enable_truncation(self._max_length)
        if self.do_lower_case:  # as sentence-transformers: lowercase before the tokenizer's own normaliser
            from tokenizers import normalizers

            cur = tk.normalizer
            tk.normalizer = normalizers.Sequence([normalizers.Lowercase()] + ([cur] if cur is not None else []))
            self.tokenizer.refresh_limits()
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.model.pad_token_id

    @property
    def max_length(self) -> int:
        """Texts longer than this many tokens (special tokens included) are truncated."""
        return self._max_length

    @max_length.setter
    def max_length(self, n: int) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 2 or n > self.model.max_tokens:
            raise EmbeddingError(f"max_length must be an int in [2, {self.model.max_tokens}], got {n!r}")
        self._max_length = n
        if self.tokenizer is not None:
            self.tokenizer.tk.enable_truncation(n)

    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of each text (special tokens added, truncated to max_length), and which were truncated."""
        if self.tokenizer is None:
            raise TokenizerError("this model has no tokenizer.json; call embedder.model(input_ids, attention_mask) "
                                 "with token ids instead")
        texts = list(texts)
        for i, t in enumerate(texts):  # text that is not valid Unicode: say which (the tokenizer raises TypeError)
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise EmbeddingError(f"texts[{i}] is not valid Unicode text: {e.reason} at position {e.start} "
                                     f"({t[e.start:e.end]!r}; a lone surrogate, e.g. from a JSON \"\\ud800\" "
                                     f"escape or undecodable bytes)") from None
        self.tokenizer.check_input(texts)  # bounded normalisation
        encs = self.tokenizer._run("encode the texts", self.tokenizer.tk.encode_batch, texts, add_special_tokens=True)
        return [e.ids for e in encs], [bool(e.overflowing) for e in encs]

    def _resolve_prompt(self, prompt: str | None, prompt_name: str | None) -> str | None:
        if prompt is not None and not isinstance(prompt, str):
            raise EmbeddingError(f"prompt must be a string, got {type(prompt).__name__}")
        if prompt_name is not None and not isinstance(prompt_name, str):
            raise EmbeddingError(f"prompt_name must be a string (one of: {', '.join(self.prompts) or 'none'}), "
                                 f"got {type(prompt_name).__name__}")
        if prompt is None and prompt_name is not None:
            if prompt_name not in self.prompts:
                raise EmbeddingError(f"no prompt named {prompt_name!r}; this model has: {', '.join(self.prompts) or 'none'}")
            return self.prompts[prompt_name]
        if prompt is None and self.default_prompt_name:
            return self.prompts.get(self.default_prompt_name)
        return prompt or None

    def _prompt_length(self, prompt: str) -> int:
        # tokens of the prompt alone, without a trailing special token (sentence-transformers' rule)
        if prompt not in self._prompt_lengths:
            self.tokenizer.check_input([prompt])
            ids = self.tokenizer._run("encode the prompt", self.tokenizer.tk.encode, prompt, add_special_tokens=True).ids
            n = len(ids) - (1 if ids and ids[-1] in self.tokenizer.special_ids else 0)
            self._prompt_lengths[prompt] = n
        return self._prompt_lengths[prompt]

    # ---- embedding ----------------------------------------------------------------------------
    @overload
    def embed(self, texts: str | Sequence[str], batch_size: int = 32, normalize: bool | None = None, *,
              return_truncated: Literal[False] = False, progress: bool = False, prompt: str | None = None,
              prompt_name: str | None = None) -> torch.Tensor: ...
    @overload
    def embed(self, texts: str | Sequence[str], batch_size: int = 32, normalize: bool | None = None, *,
              return_truncated: Literal[True], progress: bool = False, prompt: str | None = None,
              prompt_name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...
    @torch.inference_mode()
    def embed(self, texts: str | Sequence[str], batch_size: int = 32, normalize: bool | None = None, *,
              return_truncated: bool = False, progress: bool = False, prompt: str | None = None,
              prompt_name: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [N, dim] (float32, CPU) of `texts`, in their order.

        normalize: None follows the model (its Normalize module), True/False forces L2 normalisation
        on/off. return_truncated=True also returns a [N] bool tensor: which texts were longer than
        `max_length` tokens and cut. progress=True shows a progress bar. prompt / prompt_name prepend
        an instruction (prompt_name looks it up in the model's prompts; the model's default prompt
        applies otherwise, as in sentence-transformers).
        """
        texts = _check_texts(texts)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise EmbeddingError(f"batch_size must be a positive int, got {batch_size!r}")
        if normalize is not None and not isinstance(normalize, bool):
            raise EmbeddingError(f"normalize must be True, False or None, got {normalize!r}")
        for name, flag in (("return_truncated", return_truncated), ("progress", progress)):
            if not isinstance(flag, bool):
                raise EmbeddingError(f"{name} must be True or False, got {flag!r:.60}")
        p = self._resolve_prompt(prompt, prompt_name)
        if p:
            texts = [p + t for t in texts]
        ids, truncated = self.tokenize(texts)
        exclude = self._prompt_length(p) if p and not self.pooling.include_prompt else 0
        n_trunc = sum(truncated)
        if n_trunc and not self._warned_truncation and not return_truncated:
            self._warned_truncation = True
            log.warning("%d of %d texts were longer than %d tokens and were truncated (this is logged once; "
                        "embed(..., return_truncated=True) tells which)", n_trunc, len(texts), self.max_length)
        out = self._embed_ids(ids, batch_size, normalize, exclude, progress)
        if return_truncated:
            return out, torch.tensor(truncated, dtype=torch.bool)
        return out

    __call__ = embed

    def encode(self, sentences: str | Sequence[str], prompt_name: str | None = None, prompt: str | None = None,
               batch_size: int = 32, show_progress_bar: bool | None = None, convert_to_numpy: bool = True,
               convert_to_tensor: bool = False, normalize_embeddings: bool = False,
               truncate_dim: int | None = None) -> "np.ndarray | torch.Tensor | list[torch.Tensor]":
        """`embed` under sentence-transformers' `SentenceTransformer.encode` names and return types: a
        NumPy array (a torch tensor with convert_to_tensor=True, a list of 1-D tensors with
        convert_to_numpy=False), 1-D for one string. The model's own modules (Normalize included)
        always apply; normalize_embeddings=True L2-normalises afterwards; truncate_dim keeps the first
        dimensions (Matryoshka models), before that normalisation, as sentence-transformers does."""
        if truncate_dim is not None and (isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int)
                                         or not 0 < truncate_dim):
            raise EmbeddingError(f"truncate_dim must be a positive int or None, got {truncate_dim!r:.60}")
        for name, flag in (("convert_to_numpy", convert_to_numpy), ("convert_to_tensor", convert_to_tensor),
                           ("normalize_embeddings", normalize_embeddings)):
            if not isinstance(flag, bool):
                raise EmbeddingError(f"{name} must be True or False, got {flag!r:.60}")
        if show_progress_bar is not None and not isinstance(show_progress_bar, bool):
            raise EmbeddingError(f"show_progress_bar must be True, False or None, got {show_progress_bar!r:.60}")
        single = isinstance(sentences, str)
        texts = [cast(str, sentences)] if single else sentences
        out = self.embed(texts, batch_size, None, progress=bool(show_progress_bar),
                         prompt=prompt, prompt_name=prompt_name)
        if truncate_dim is not None:
            out = out[:, :truncate_dim]
        if normalize_embeddings:
            out = F.normalize(out, p=2, dim=-1)
        if single:
            out = out[0]
        if convert_to_tensor:
            return out
        if convert_to_numpy:
            return out.numpy()
        return list(out) if not single else out

    def _embed_ids(self, ids: list[list[int]], batch_size: int, normalize: bool | None, exclude: int = 0,
                   progress: bool = False) -> torch.Tensor:
        N = len(ids)
        order = sorted(range(N), key=lambda i: -len(ids[i]))
        out = torch.empty(N, self.dim, dtype=torch.float32)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=N, unit="text", desc="embedding")
        pad = self.pad_token_id
        for start in range(0, N, batch_size):
            rows = order[start:start + batch_size]
            T = max(1, len(ids[rows[0]]))  # an empty text may have no tokens at all (no special tokens)
            batch = [ids[i] + [pad] * (T - len(ids[i])) for i in rows]
            input_ids = torch.tensor(batch, dtype=torch.long)
            lens = torch.tensor([len(ids[i]) for i in rows])
            mask = (torch.arange(T)[None, :] < lens[:, None]).to(torch.long)
            input_ids, mask_d = input_ids.to(self.device), mask.to(self.device)
            h = self.model(input_ids, attention_mask=mask_d if bool((lens < T).any()) else None)
            if exclude:
                mask_d = mask_d.clone()
                mask_d[:, :exclude] = 0
            e = self._finish(h, mask_d, normalize)
            out[torch.tensor(rows)] = e.float().cpu()
            if bar is not None:
                bar.update(len(rows))
        if bar is not None:
            bar.close()
        return out

    def _finish(self, h: torch.Tensor, mask: torch.Tensor, normalize: bool | None) -> torch.Tensor:
        e = self.pooling(h, mask)
        for m in self._post:
            if not (normalize is False and isinstance(m, Normalize)):
                e = m(e)
        if normalize and not self.normalized:
            e = F.normalize(e, p=2, dim=-1)
        return e

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity matrix [len(a), len(b)] of two sets of embeddings."""
        return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T
