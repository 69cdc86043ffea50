"""Model id or path → a local snapshot folder with config, tokenizer files and weights.

Accepted: a local folder, a `.safetensors` / `.gguf` file, or a Hugging Face Hub id (`org/name`,
optionally `org/name:Q4_K_M` to pick a GGUF by its quantisation tag) with a revision. For an id the
local Hugging Face cache is used first (`HF_HUB_CACHE` / `HF_HOME` honoured, read at call time);
only missing files are downloaded, and only the ones a model needs. With `HF_HUB_OFFLINE=1`, or when
the Hub cannot be reached, resolution fails at once with a `ModelNotFoundError` saying what was
missing and where ember looked.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, ModelNotFoundError
from .io.safefile import MAX_CONFIG_BYTES, bad_file_name, read_text

# Files besides the weights that a model may need (config, tokenizer, chat template,
# sentence-transformers modules). Glob patterns relative to the repository root.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "*_Pooling/config.json",
    "*_Dense/config.json",
    "*_Dense/model.safetensors",
    "*_Dense/pytorch_model.bin",  # older sentence-transformers saves (read weights-only)
    "*_Normalize/*",
    "preprocessor_config.json",  # image processors (CLIP, SigLIP) and feature extractors (Whisper)
)


@dataclass
class Snapshot:
    """A resolved model: a folder and the files in it that matter."""

    root: Path
    weights: list[Path]
    format: str  # "safetensors" | "gguf" | "pytorch"
    source: str = ""
    files: list[str] = field(default_factory=list)

    @property
    def config(self) -> Path | None:
        return self.file("config.json")

    def file(self, name: str) -> Path | None:
        p = self.root / name
        return p if p.is_file() else None


# ---- choosing files ------------------------------------------------------------------------------
def _match_gguf(gg: list[str], hint: str) -> list[str]:
    """The GGUF files a `:TAG` (or gguf_file=) names: the exact path or base name, else the files whose
    name contains the tag; among several, those where the tag is not followed by more of a longer
    tag (`Q4_K` picks `m-Q4_K.gguf` over `m-Q4_K_M.gguf`)."""
    exact = [n for n in gg if n == hint or Path(n).name == hint]
    if exact:
        return exact
    low = hint.lower()
    found = [n for n in gg if low in Path(n).name.lower()]
    if len(found) > 1:
        whole = [n for n in found if re.search(re.escape(low) + r"(?![a-z0-9_])", Path(n).name.lower())]
        found = whole or found
    return found


def _pick_weights(names: list[str], gguf_hint: str | None = None) -> tuple[str, list[str]]:
    """(format, weight files) from a repository's file list; index files are included.

    With a GGUF hint (`org/name:TAG`, gguf_file=) the matching GGUF file is the answer even where the
    repository also has safetensors weights; no match is a `ModelNotFoundError` listing the GGUF files.
    Without one, safetensors come first, then a lone GGUF file, then pytorch_model.bin."""
    top = [n for n in names if "/" not in n]
    gg = sorted(n for n in names if n.lower().endswith(".gguf"))
    if gguf_hint:
        chosen = _match_gguf(gg, gguf_hint)
        if len(chosen) != 1:
            what = "no GGUF file matches" if not chosen else f"{len(chosen)} GGUF files match"
            raise ModelNotFoundError(f"{what} {gguf_hint!r}; available GGUF files: {', '.join(gg) or '(none)'}")
        return "gguf", chosen
    if "model.safetensors.index.json" in top:
        return "safetensors", ["model.safetensors.index.json"]
    if "model.safetensors" in top:
        return "safetensors", ["model.safetensors"]
    st = sorted(n for n in top if n.endswith(".safetensors") and not n.startswith("consolidated"))
    if st:
        return "safetensors", st
    if gg:
        if len(gg) > 1:
            raise ModelNotFoundError(
                "this repository has several GGUF files; pick one with 'org/name:TAG' (e.g. :Q4_K_M) or gguf_file=: "
                + ", ".join(gg))
        return "gguf", gg
    if "pytorch_model.bin.index.json" in top:
        return "pytorch", ["pytorch_model.bin.index.json"]
    if "pytorch_model.bin" in top:
        return "pytorch", ["pytorch_model.bin"]
    return "", []


def _expand_index(root: Path, fmt: str, files: list[str]) -> list[Path]:
    """Weight paths, with an index replaced by its shards (which must all exist)."""
    out: list[Path] = []
    for f in files:
        p = root / f
        if f.endswith(".index.json"):
            text = read_text(p, MAX_CONFIG_BYTES, CheckpointError, "shard index")
            try:
                index = json.loads(text)
                shards = list(dict.fromkeys(index["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
                raise CheckpointError(f"{p}: unreadable shard index ({str(e)[:200]})") from None
            for s in shards:
                why = bad_file_name(s)
                if why is not None:
                    raise CheckpointError(f"{p}: bad shard name {str(s)[:100]!r}: {why}")
            out += [root / s for s in shards]
        else:
            out.append(p)
    return out


def _missing(root: Path, fmt: str, files: list[str]) -> list[str]:
    miss = [f for f in files if not (root / f).is_file()]
    if miss:
        return miss
    return [p.name for p in _expand_index(root, fmt, files) if not p.is_file()]


def _local_names(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _sibling_names(folder: Path, *names: str) -> list[str]:
    """The side files (config, tokenizer, template) beside a weight file, looked up by name: a
    weight file given by path may sit in any folder (/usr/...), which is never listed, let alone
    recursively."""
    plain = [n for n in SIDE_FILES if not any(ch in n for ch in "*?[")]
    return sorted(set(names) | {n for n in plain if (folder / n).is_file()})


def _snapshot_from_folder(root: Path, source: str, gguf_hint: str | None = None) -> Snapshot:
    names = _local_names(root)
    fmt, files = _pick_weights(names, gguf_hint)
    if not files:
        raise ModelNotFoundError(f"{root}: no weights found (looked for model.safetensors[.index.json], *.safetensors, "
                                 f"*.gguf, pytorch_model.bin)")
    miss = _missing(root, fmt, files)
    if miss:
        raise CheckpointError(f"{root}: weight files missing: {', '.join(miss)}")
    return Snapshot(root, _expand_index(root, fmt, files), fmt, source, names)


# ---- the Hub -------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    v = os.environ.get("HF_HUB_OFFLINE")
    if v is not None:
        return v.strip().upper() in ("1", "ON", "YES", "TRUE")
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _split_id(model: str) -> tuple[str, str | None]:
    if ":" in model and not os.path.exists(model):
        repo, tag = model.split(":", 1)
        return repo, tag or None
    return model, None


def _from_cache(repo: str, revision: str | None, gguf_hint: str | None) -> tuple[Snapshot | None, str]:
    """The cached snapshot if it holds a complete model; else (None, what is missing)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        root = Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir(), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None, f"no snapshot of {repo!r} (revision {revision or 'main'}) in the cache"
    names = _local_names(root)
    try:
        fmt, files = _pick_weights(names, gguf_hint)
    except ModelNotFoundError as e:  # e.g. the tagged GGUF file is not cached yet: the Hub may have it
        return None, f"the cached snapshot {root}: {e}"
    if not files:
        return None, f"the cached snapshot {root} has no weight files"
    if fmt != "gguf" and "config.json" not in names:
        return None, f"the cached snapshot {root} has no config.json"
    miss = _missing(root, fmt, files)
    if miss:
        return None, f"the cached snapshot {root} lacks {', '.join(miss)}"
    return Snapshot(root, _expand_index(root, fmt, files), fmt, repo, names), ""


def _download(repo: str, revision: str | None, gguf_hint: str | None, token) -> Snapshot:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub import errors as hfe

    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token)
    try:
        # model_info fails fast when the Hub is unreachable (downloads would retry for ~25 s).
        info = api.model_info(repo, revision=revision)
    except (hfe.RepositoryNotFoundError, hfe.GatedRepoError) as e:
        raise ModelNotFoundError(f"{repo!r} was not found on the Hub or needs access rights ({type(e).__name__}); "
                                 f"check the id, or log in with `hf auth login`") from None
    except hfe.RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo!r} has no revision {revision!r}") from None
    except Exception as e:  # network failures come as several exception types across versions
        raise ModelNotFoundError(
            f"{repo!r} is not in the local cache ({cache_dir()}) and the Hub could not be reached "
            f"({type(e).__name__}: {str(e)[:120]}). Connect, or point ember at a local folder.") from None
    names = [s.rfilename for s in (info.siblings or [])]
    try:
        fmt, weights = _pick_weights(names, gguf_hint)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"{repo!r}: {e}") from None
    if not weights:
        raise ModelNotFoundError(f"{repo!r} has no weights ember can read (safetensors, GGUF); files: {', '.join(names[:20])}")
    wanted = [n for n in names if any(fnmatch.fnmatch(n, pat) for pat in SIDE_FILES)] if fmt != "gguf" else \
        [n for n in names if n in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")]
    wanted += weights
    rev = revision  # the branch/tag itself, so that the cache records refs/<revision> for offline use
    root = None

    def get(name: str) -> Path:
        try:
            return Path(hf_hub_download(repo, name, revision=rev, cache_dir=cache_dir(), token=token, endpoint=endpoint))
        except Exception as e:
            raise ModelNotFoundError(f"downloading {name} of {repo!r} failed: {type(e).__name__}: {str(e)[:200]}") from None

    for name in wanted:
        p = get(name)
        root = p.parent if "/" not in name else p.parents[len(Path(name).parts) - 1]
    for w in weights:  # shards named by an index
        if w.endswith(".index.json"):
            for shard in _expand_index(root, fmt, [w]):
                if not shard.is_file():
                    get(shard.name)
    return Snapshot(root, _expand_index(root, fmt, weights), fmt, repo, _local_names(root))


def resolve(model: str | os.PathLike, revision: str | None = None, *, token=None, gguf_file: str | None = None) -> Snapshot:
    """A local snapshot of `model`: a folder, a weight file, or a Hub id (see the module docstring)."""
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str) or not model.strip():
        raise ModelNotFoundError(f"a model must be a Hub id, folder or file path, got {model!r}")
    path = Path(model).expanduser()
    if path.is_dir():
        return _snapshot_from_folder(path, model, gguf_file)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".safetensors", ".gguf"):
            fmt = "gguf" if suffix == ".gguf" else "safetensors"
            return Snapshot(path.parent, [path], fmt, model,
                            _sibling_names(path.parent, path.name) if fmt == "safetensors" else [path.name])
        if path.name.endswith(".index.json"):
            weights = _expand_index(path.parent, "safetensors", [path.name])
            return Snapshot(path.parent, weights, "safetensors", model,
                            _sibling_names(path.parent, path.name, *(w.name for w in weights)))
        raise ModelNotFoundError(f"{path}: not a model file ember reads (.safetensors, .gguf, or a folder)")
    looks_like_path = model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1) or model.endswith(
        (".gguf", ".safetensors"))
    repo, tag = _split_id(model)
    if looks_like_path or not _ID.match(repo):
        raise ModelNotFoundError(f"{model!r}: no such file or folder, and not a Hub model id")
    hint = gguf_file or tag
    snap, why = _from_cache(repo, revision, hint)
    if snap is not None:
        return snap
    if offline():
        raise ModelNotFoundError(f"{repo!r} is not available offline: {why}. Looked in {cache_dir()}. "
                                 f"Unset HF_HUB_OFFLINE to download it, or pass a local folder.")
    return _download(repo, revision, hint, token)
