"""Bad input through `ember.load`: every failure is an EmberError that names the problem."""
import json
import subprocess
import sys

import pytest
import torch

import ember
from ember.errors import (ArgumentError, CheckpointError, ConfigError, EmberError, ShapeMismatchError,
                          TensorNotFoundError, UnsupportedModelError)
from ember.io.safetensors import save_file
from parity import save, tiny_hf_model


@pytest.fixture
def folder(tmp_path):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, bos_token_id=None, eos_token_id=None)
    save(tiny_hf_model(cfg), tmp_path)
    return tmp_path


def _edit_config(folder, **kw):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(kw)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_unknown_model_type_lists_the_supported_ones(folder):
    _edit_config(folder, model_type="frobnicator", architectures=["FrobForCausalLM"])
    with pytest.raises(UnsupportedModelError) as e:
        ember.load(folder)
    assert "'frobnicator'" in str(e.value) and "llama" in str(e.value) and "qwen2" in str(e.value)


def test_config_that_disagrees_with_the_weights_names_key_and_shapes(folder):
    _edit_config(folder, intermediate_size=50)
    with pytest.raises(ShapeMismatchError) as e:
        ember.load(folder)
    assert "mlp.gate_proj.weight" in str(e.value) and "[48, 32]" in str(e.value) and "[50, 32]" in str(e.value)


def test_missing_tensor_is_named_with_nearest_keys(folder):
    from safetensors.torch import load_file

    sd = load_file(folder / "model.safetensors")
    del sd["model.layers.1.post_attention_layernorm.weight"]
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(TensorNotFoundError) as e:
        ember.load(folder)
    assert "model.layers.1.post_attention_layernorm.weight" in str(e.value)
    assert "model.layers.0.post_attention_layernorm.weight" in str(e.value)


def test_truncated_weights_are_refused(folder):
    p = folder / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        ember.load(folder)


@pytest.mark.parametrize("kw, msg", [
    (dict(hidden_size="64"), "'hidden_size' should be int"),
    (dict(num_attention_heads=-2), "'num_attention_heads' must be positive"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(rope_parameters={"rope_type": "warp", "rope_theta": 1.0}), "unsupported rope type 'warp'"),
    (dict(hidden_act="zap"), "unsupported activation 'zap'"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0}), "needs 'factor'"),
])
def test_bad_config_values_are_config_errors(folder, kw, msg):
    _edit_config(folder, **kw)
    with pytest.raises(ConfigError, match=msg):
        ember.load(folder)


def test_unreadable_config_json(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ember.load(folder)


def test_pickle_checkpoints_load_weights_only(tmp_path, folder):
    from safetensors.torch import load_file

    sd = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(sd, folder / "pytorch_model.bin")
    llm = ember.load(folder, dtype=torch.float32)
    assert llm.model(torch.tensor([[1, 2]])).shape == (1, 2, 64)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, folder / "pytorch_model.bin", _use_new_zipfile_serialization=True)
    with pytest.raises(CheckpointError, match="weights-only"):
        ember.load(folder)


def test_all_errors_derive_from_ember_error():
    for cls in (CheckpointError, ConfigError, UnsupportedModelError, ShapeMismatchError, TensorNotFoundError,
                ArgumentError):
        assert issubclass(cls, EmberError)
    import ember.errors

    assert all(issubclass(getattr(ember.errors, name), EmberError) for name in ember.errors.__all__)
    assert set(ember.errors.__all__) <= set(ember.__all__)


@pytest.mark.parametrize("kw, msg", [
    (dict(device="nope"), "unknown device 'nope'; use 'cpu', 'cuda', 'cuda:N' or 'mps'"),  # was: RuntimeError
    (dict(device=""), "unknown device ''"),
    (dict(device=[0]), "device must be a string such as 'cpu'"),
    (dict(device="meta"), "device 'meta': ember runs models on 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    (dict(dtype=5), "dtype must be a torch.dtype or a name such as 'float32' or 'bf16', got int"),  # was: TypeError
    (dict(dtype="nope"), "unknown dtype 'nope'"),
    (dict(dtype=torch.int8), "dtype torch.int8 is not one ember computes in"),
    (dict(dtyp="bf16"), "unknown option(s) 'dtyp'"),  # was: TypeError from the model's constructor
    (dict(keep_quantized=True), "keep_quantized=True applies to GGUF files"),  # was: TypeError
])
def test_bad_load_arguments_are_argument_errors(folder, kw, msg):
    with pytest.raises(ArgumentError, match=msg.replace("(", r"\(").replace(")", r"\)")) as e:
        ember.load(folder, **kw)
    assert isinstance(e.value, EmberError) and isinstance(e.value, ValueError)



def test_the_old_packed_option_still_works_with_a_deprecation_warning(folder):
    with pytest.warns(DeprecationWarning, match="now keep_quantized"):
        with pytest.raises(ArgumentError, match="keep_quantized=True applies to GGUF files"):
            ember.load(folder, packed=True)

def test_unknown_option_is_refused_before_anything_is_read(tmp_path):
    with pytest.raises(ArgumentError, match="unknown option.*'fuze'.*fuse"):
        ember.load(tmp_path / "does-not-exist", fuze=False)


def test_load_options_reach_the_model(folder):
    assert ember.load(folder, fuse=False, keep_quantized=None).model.model.layers[0].self_attn.qkv.fused is None
    assert ember.load(folder).model.model.layers[0].self_attn.qkv.fused is not None


def test_unavailable_cuda_device_is_an_argument_error(folder):
    """Was an AssertionError from torch ("Torch not compiled with CUDA enabled") or a CUDA RuntimeError."""
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        with pytest.raises(ArgumentError, match=f"has {n} CUDA device"):
            ember.load(folder, device=f"cuda:{n}")
    else:
        for device in ("cuda", "cuda:3", 0):
            with pytest.raises(ArgumentError, match="CUDA is not available"):
                ember.load(folder, device=device)


def test_import_ember_is_light():
    code = "import sys, ember; print('transformers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_cli_help_does_not_import_torch():
    """`ember --help` and the parser of every subcommand stay instant: torch loads on first use."""
    code = ("import sys, contextlib, io\nfrom ember import cli\nfor argv in (['--help'], ['bench', '--help'], "
            "['serve', '--help'], ['embed', '--help']):\n    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n            cli.main(argv)\n        except SystemExit:\n            pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False"]


# ---- a quantization_config that the weights contradict: refused by name, never loaded as plain weights ----
@pytest.mark.parametrize("qc, err, match", [
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, CheckpointError, "says fp8, but no tensor is quantised"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, CheckpointError, "says gptq, but no tensor is quantised"),
    ({"quant_method": "awq", "bits": 4}, CheckpointError, "says awq, but no tensor is quantised"),
    ({"quant_method": "compressed-tensors"}, ConfigError, "config_groups must be a non-empty object"),
    ({"load_in_4bit": True}, ConfigError, "quantization_config has no quant_method"),
])
def test_a_quantization_config_over_plain_weights_is_refused_naming_its_method(folder, tmp_path, qc, err, match):
    import shutil

    d = tmp_path / "q"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = qc
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(err, match=match):
        ember.load(d)


def test_a_gptq_side_file_over_plain_weights_is_refused(folder, tmp_path):
    import shutil

    d = tmp_path / "q"
    shutil.copytree(folder, d)
    (d / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128}))
    with pytest.raises(CheckpointError, match="says gptq, but no tensor is quantised"):
        ember.load(d)


def test_fp8_weights_with_scales_but_no_config_are_refused(folder):
    from safetensors.torch import load_file

    d = folder

    sd = load_file(d / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    sd[name] = sd[name].to(torch.float8_e4m3fn)
    sd[name + "_scale_inv"] = torch.ones(1)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="q_proj.weight_scale_inv' belongs to a quantised checkpoint, but config.json "
                                              "has no quantization_config"):
        ember.load(d)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool])
def test_integer_weights_are_a_checkpoint_error_not_a_crash_later(folder, dtype):
    from safetensors.torch import load_file

    d = folder

    sd = load_file(d / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    sd[name] = sd[name].to(dtype)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"down_proj.weight' .* is stored as {dtype}"):
        ember.load(d, dtype=torch.float32)
