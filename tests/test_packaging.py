"""The wheel users install, built from this tree by setuptools' PEP 517 backend (what `python -m build`
runs): the package with its type marker and kernel sources, the `ember` command, the license, one
version, and only the runtime dependencies src/ imports."""
import email
import subprocess
import sys
import zipfile
from pathlib import Path

import ember

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_what_users_need(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("ember-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_string(z.read(f"{info}/METADATA").decode())
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    assert "ember/py.typed" in names and "ember/__init__.py" in names
    assert {"ember/kernels/csrc/ops.cpp", "ember/kernels/csrc/ember_kernels.cpp"} <= names
    assert any(n.startswith(f"{info}/licenses/") or n == f"{info}/LICENSE" for n in names), sorted(names)[:5]
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    assert meta["Version"] == ember.__version__
    assert "ember = ember.cli:main" in entry_points
    runtime = {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower().replace("_", "-")
               for r in meta.get_all("Requires-Dist") if "extra ==" not in r}
    assert runtime == {"torch", "huggingface-hub", "tokenizers", "jinja2", "numpy", "tqdm", "ninja"}, runtime
