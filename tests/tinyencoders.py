"""A tiny random BERT with a real WordPiece tokenizer and sentence-transformers module files, for
tests of the Embedder (pooling modes, Dense, Normalize, prompts) against sentence-transformers."""
from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating food. A woman is playing the violin.",
    "Sentence embeddings map texts to vectors; similar texts get similar vectors.",
    "Héllo wörld, ça va? Ünïcödé and 日本語のテキスト.",
    "Numbers 1234567890 and punctuation ! ? , ; : ( ) [ ]",
] * 10
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tokenizer(vocab_size: int = 300, lowercase: bool = True):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    tk.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                             show_progress=False))
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tk.token_to_id("[CLS]")), ("[SEP]", tk.token_to_id("[SEP]"))])
    return tk


def tiny_bert(folder: Path, *, seed: int = 0, lowercase: bool = True, max_position_embeddings: int = 64,
              model_cls: str = "BertModel") -> Path:
    """config.json, model.safetensors, tokenizer files (no sentence-transformers files yet)."""
    import torch
    import transformers

    from parity import randomize_

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tk = build_tokenizer(lowercase=lowercase)
    tk.save(str(folder / "tokenizer.json"))
    vocab = sorted(tk.get_vocab().items(), key=lambda kv: kv[1])
    (folder / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": lowercase, "model_max_length": max_position_embeddings,
        "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]"}))
    cfg = transformers.BertConfig(vocab_size=tk.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=max_position_embeddings, pad_token_id=0)
    torch.manual_seed(seed)
    model = randomize_(getattr(transformers, model_cls)(cfg).float().eval(), seed)
    model.save_pretrained(folder)
    return folder


def add_sentence_transformers(folder: Path, *, pooling: dict | None = None, dense: list[dict] | None = None,
                              normalize: bool = False, max_seq_length: int | None = None, do_lower_case: bool = False,
                              prompts: dict | None = None, default_prompt_name: str | None = None,
                              seed: int = 0, dense_format: str = "safetensors") -> Path:
    """modules.json and the module folders, as sentence-transformers saves them. `pooling` is a
    Pooling config ({"pooling_mode": "cls"} or legacy booleans); each `dense` dict gives
    out_features and optionally bias / activation_function / use_residual."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    hidden = json.loads((folder / "config.json").read_text())["hidden_size"]
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    pooling = pooling or {"pooling_mode_mean_tokens": True}
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": hidden, **pooling}))
    modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
    mode = pooling.get("pooling_mode")
    n_modes = (1 if isinstance(mode, str) else len(mode)) if mode else max(1, sum(
        bool(v) for k, v in pooling.items() if k.startswith("pooling_mode_")))
    dim = hidden * n_modes
    g = torch.Generator().manual_seed(seed)
    for d in dense or []:
        i = len(modules)
        path = f"{i}_Dense"
        (folder / path).mkdir(exist_ok=True)
        out = d["out_features"]
        cfg = {"in_features": dim, "out_features": out, "bias": d.get("bias", True),
               "activation_function": d.get("activation_function", "torch.nn.modules.activation.Tanh")}
        tensors = {"linear.weight": torch.randn(out, dim, generator=g) * 0.3}
        if cfg["bias"]:
            tensors["linear.bias"] = torch.randn(out, generator=g) * 0.1
        if d.get("use_residual"):
            cfg["use_residual"] = True
            if out != dim:
                tensors["residual.weight"] = torch.randn(out, dim, generator=g) * 0.3
        (folder / path / "config.json").write_text(json.dumps(cfg))
        if dense_format == "bin":  # older sentence-transformers saves
            torch.save(tensors, folder / path / "pytorch_model.bin")
        else:
            save_file(tensors, str(folder / path / "model.safetensors"))
        modules.append({"idx": i, "name": str(i), "path": path, "type": "sentence_transformers.models.Dense"})
        dim = out
    if normalize:
        i = len(modules)
        (folder / f"{i}_Normalize").mkdir(exist_ok=True)
        modules.append({"idx": i, "name": str(i), "path": f"{i}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    sb = {"do_lower_case": do_lower_case}
    if max_seq_length is not None:
        sb["max_seq_length"] = max_seq_length
    (folder / "sentence_bert_config.json").write_text(json.dumps(sb))
    cst = {"prompts": prompts or {}, "default_prompt_name": default_prompt_name}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(cst))
    return folder
