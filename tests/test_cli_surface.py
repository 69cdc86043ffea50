"""The command line's ollama/mlx-lm habits, run in-process (ember.cli.main) on the tiny chat model:
what `ember run WORDS...` takes for a model, chat input, --version, list/rm, -v's tok/s, the spinner."""
import io
import os
import shutil

import pytest

import ember
from ember import cli, hub
from ember.cli_chat import read_message
from ember.spinner import Spinner


def run(capsys, *argv, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty Hugging Face and ember caches, offline (the compiled kernels stay where they are)."""
    from ember.kernels import _build

    monkeypatch.setenv("EMBER_KERNELS_CACHE", str(_build.cache_dir().parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "ember"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _cache_repo(cache, repo: str, folder, commit="c" * 40):
    """A snapshot of `folder` in the Hugging Face cache layout (refs/main → snapshots/<commit>)."""
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    blobs = base / "blobs"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        if f.is_file():
            shutil.copy(f, blobs / f.name)
            os.symlink(os.path.relpath(blobs / f.name, snap), snap / f.name)
    return base


def test_the_first_word_is_a_model_only_when_it_names_one(caches, tiny_chat, tmp_path):
    _cache_repo(caches / "hf", "gpt2", tiny_chat)  # an id without org/, cached
    split = cli.split_model
    assert split(["hello", "world"]) == (None, ["hello", "world"])  # not a model: the prompt's first word
    assert split(["What is 2 + 2?"]) == (None, ["What is 2 + 2?"])
    assert split([str(tiny_chat)]) == (str(tiny_chat), [])  # a folder
    assert split([str(tiny_chat), "Hi", "there"]) == (str(tiny_chat), ["Hi", "there"])
    assert split(["Qwen/Qwen2.5-0.5B-Instruct"]) == ("Qwen/Qwen2.5-0.5B-Instruct", [])  # org/name, not cached
    assert split(["org/repo:Q4_K_M", "hi"]) == ("org/repo:Q4_K_M", ["hi"])
    assert split(["gpt2", "hi"]) == ("gpt2", ["hi"])  # cached
    assert split(["bert", "hi"]) == (None, ["bert", "hi"])  # an id-like word, but not cached
    assert split(["smollm2", "hi"]) == ("smollm2", ["hi"]) and split(["MiniLM"]) == ("MiniLM", [])  # short names
    assert split(["./no-such-folder", "hi"])[0] == "./no-such-folder"  # written as a path: its error is reported
    assert split([]) == (None, [])


def test_run_words_without_a_model_go_to_the_default_model(caches, tiny_chat, capsys, monkeypatch):
    monkeypatch.setenv("EMBER_MODEL", str(tiny_chat))
    llm = ember.load(tiny_chat)
    code, out, err = run(capsys, "run", "hello", "world", "-n", 6)
    assert code == 0, err
    assert out == llm.chat([{"role": "user", "content": "hello world"}], max_tokens=6) + "\n"


def test_run_model_without_a_prompt_on_a_terminal_chats(caches, tiny_chat, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "_chat", lambda model, a: calls.append(model) or 0)
    tty = io.StringIO()
    tty.isatty = lambda: True
    monkeypatch.setattr("sys.stdin", tty)
    assert cli.main(["run", str(tiny_chat)]) == 0 and calls == [str(tiny_chat)]
    assert cli.main(["run"]) == 0 and calls[-1] is None  # the default model


def test_chat_takes_multi_line_messages(caches, tiny_chat, capsys, monkeypatch):
    llm = ember.load(tiny_chat)
    r1 = llm.chat([{"role": "user", "content": "Hi"}], max_tokens=5)
    r2 = llm.chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": r1},
                   {"role": "user", "content": "line one\nline two"}], max_tokens=5)
    code, out, err = run(capsys, "chat", tiny_chat, "-n", 5, stdin='Hi\n"""line one\nline two"""\n/exit\nnever\n',
                         monkeypatch=monkeypatch)
    assert code == 0, err
    assert out == f"{r1}\n{r2}\n"


def test_run_model_with_a_piped_prompt_answers_once(caches, tiny_chat, capsys, monkeypatch):
    llm = ember.load(tiny_chat)
    code, out, err = run(capsys, "run", tiny_chat, "-n", 5, stdin="Hi\nthere\n", monkeypatch=monkeypatch)
    assert code == 0, err
    assert out == llm.chat([{"role": "user", "content": "Hi\nthere\n"}], max_tokens=5) + "\n"


def test_run_with_an_empty_pipe_says_there_is_no_prompt(caches, tiny_chat, capsys, monkeypatch):
    code, out, err = run(capsys, "run", tiny_chat, stdin="", monkeypatch=monkeypatch)
    assert (code, out) == (2, "") and "no prompt: stdin was empty" in err


def test_verbose_prints_tokens_per_second(caches, tiny_chat, capsys):
    code, out, err = run(capsys, "-v", "run", tiny_chat, "Hello", "-n", 7, "--raw")
    assert code == 0, err
    line = [ln for ln in err.splitlines() if "tok/s" in ln]
    assert line and "7 tokens generated at" in line[-1] and "prompt tokens in" in line[-1], err


def test_read_message_joins_continued_and_quoted_lines():
    def reader(lines):
        it = iter(lines)

        def read(prompt):
            try:
                return next(it)
            except StopIteration:
                raise EOFError from None
        return read

    assert read_message(reader(["one line"])) == "one line"
    assert read_message(reader(["first \\", "second"])) == "first \nsecond"
    assert read_message(reader(['"""', "a", "b", '"""'])) == "a\nb"
    assert read_message(reader(['"""start', 'end"""'])) == "start\nend"
    assert read_message(reader(['"""one line"""'])) == "one line"
    assert read_message(reader(['"""unfinished', "x"])) == "unfinished\nx"  # end of input ends the message
    with pytest.raises(EOFError):
        read_message(reader([]))


def test_chat_history_is_saved_between_sessions(caches, monkeypatch):
    pytest.importorskip("readline")
    from ember import cli_chat

    rl = cli_chat._readline()
    rl.clear_history()
    rl.add_history("what is a fox?")
    cli_chat._save_history(rl)
    rl.clear_history()
    assert cli_chat.history_file().read_text().strip().endswith("what is a fox?")
    rl2 = cli_chat._readline()
    assert rl2.get_history_item(rl2.get_current_history_length()) == "what is a fox?"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"ember {ember.__version__}"


def test_inspect_without_a_model_inspects_the_default_model(caches, tiny_chat, capsys, monkeypatch):
    monkeypatch.setenv("EMBER_MODEL", str(tiny_chat))
    code, out, err = run(capsys, "inspect", "--limit", 1)
    assert code == 0, err
    assert f"folder: {tiny_chat}" in out and "model_type=llama" in out


def test_bench_with_an_unknown_preset_lists_the_presets(capsys):
    from ember.engine.presets import PRESETS

    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--config", "nosuch"])
    msg = str(e.value.code)
    assert "unknown --config 'nosuch'" in msg and all(p in msg for p in PRESETS)
    cli.build_parser().parse_args(["bench", "--config", "gemma3-1b"])
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert "gemma3-1b" in capsys.readouterr().out


def test_list_shows_cached_models_with_sizes_and_rm_deletes_them(caches, tiny_chat, capsys):
    base = _cache_repo(caches / "hf", "acme/tiny", tiny_chat)
    default = caches / "ember" / "default" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    default.parent.mkdir(parents=True)
    default.write_bytes(b"\0" * 3000)
    code, out, err = run(capsys, "list")
    assert code == 0, err
    rows = {ln.split()[0]: ln for ln in out.splitlines()[1:]}
    size = sum(f.stat().st_size for f in tiny_chat.iterdir() if f.is_file())
    assert set(rows) == {"acme/tiny", "smollm2"}
    assert cli._human(size) in rows["acme/tiny"] and "2.9 KB" in rows["smollm2"]
    assert hub.resolve("acme/tiny").root.parent.parent == base  # what list shows is what ember loads
    code, out, err = run(capsys, "rm", "acme/tiny", "smollm2")
    assert code == 0, err
    assert not base.exists() and not default.exists()
    assert "deleted acme/tiny" in out and "deleted smollm2" in out
    code, out, err = run(capsys, "rm", "acme/tiny")
    assert code == 1 and "not in the cache" in err
    assert run(capsys, "list")[2].startswith("no models cached")


def test_the_spinner_draws_while_loading_and_clears_its_line():
    buf = io.StringIO()
    import time

    with Spinner("loading x", stream=buf, enabled=True, interval=0.01):
        time.sleep(0.05)
    text = buf.getvalue()
    assert "loading x" in text and text.endswith("\r") and text.rstrip("\r").endswith(" ")
    buf = io.StringIO()  # not a terminal: nothing
    with Spinner("loading x", stream=buf):
        pass
    assert buf.getvalue() == ""


def test_serve_without_a_model_serves_the_default_under_its_short_name(caches, monkeypatch):
    pytest.importorskip("fastapi")
    import ember.serve.server as server

    got = {}
    monkeypatch.setattr(server, "serve", lambda model, **kw: got.update(model=model, **kw))
    monkeypatch.delenv("EMBER_MODEL", raising=False)
    assert cli.main(["serve", "--port", "0"]) == 0
    assert got["model"] == "smollm2" and got["served_model_name"] is None  # served as "smollm2"
    assert hub.looks_like_model(got["model"])
