"""Run llama.cpp's own convert_hf_to_gguf.py on a Hugging Face folder that has no tokenizer (the
vocabulary step skipped), as a subprocess of the tests:

    python tests/llamacpp_convert.py LLAMA_CPP_DIR HF_FOLDER OUT.gguf [CONVERTER OPTIONS, e.g. --mmproj]

It imports llama.cpp's own gguf-py (newer than the installed `gguf` package), hence its own process.
"""
import importlib
import pkgutil
import sys


def main(llama_cpp: str, folder: str, out: str, *options: str) -> None:
    sys.path[:0] = [f"{llama_cpp}/gguf-py", llama_cpp]
    import conversion
    import convert_hf_to_gguf
    from conversion.base import TextModel

    for m in pkgutil.iter_modules(conversion.__path__):  # every family's class, to skip its vocabulary
        try:
            importlib.import_module(f"conversion.{m.name}")
        except Exception:  # noqa: BLE001 - families with optional dependencies this machine lacks
            pass
    todo = [TextModel]
    while todo:
        cls = todo.pop()
        cls.set_vocab = lambda self: self._set_vocab_none()
        todo.extend(cls.__subclasses__())
    sys.argv = ["convert_hf_to_gguf.py", folder, "--outfile", out, "--outtype", "f32", *options]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main(*sys.argv[1:])
