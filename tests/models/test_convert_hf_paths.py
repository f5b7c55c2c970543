"""tools/convert_hf_checkpoint.py reads only .safetensors files inside the model folder: a
model.safetensors.index.json whose weight map leaves the folder is refused by name, with exit
status 2 and before any tensor is read."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(ROOT, "tools")


def _tool():
    from megatron_ddk.commands import convert_hf_checkpoint

    return convert_hf_checkpoint


def _folder(tmp_path, weight_map):
    from safetensors.torch import save_file

    hf = tmp_path / "model"
    hf.mkdir()
    save_file({"a": torch.zeros(2)}, str(hf / "model-00001.safetensors"))
    save_file({"b": torch.zeros(2)}, str(tmp_path / "outside.safetensors"))  # a real target
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return hf


@pytest.mark.parametrize("fname", ["../outside.safetensors", "ABS", "link.safetensors",
                                   "model-00001.bin", "."])
def test_weight_map_leaving_the_folder_is_refused(tmp_path, fname):
    hf_dir = tmp_path / "model"
    if fname == "ABS":
        fname = str(tmp_path / "outside.safetensors")
    hf = _folder(tmp_path, {"a": "model-00001.safetensors", "b": fname})
    if fname == "link.safetensors":
        os.symlink(str(tmp_path / "outside.safetensors"), str(hf / "link.safetensors"))
    with pytest.raises(ValueError, match=r"weight_map\['b'\] = .* is not a \.safetensors file "
                                         r"inside .*model; refusing to read it"):
        _tool()._weight_files(str(hf_dir))


def test_weight_map_inside_the_folder_is_read(tmp_path):
    os.makedirs(str(tmp_path / "model" / "sub"))
    hf = tmp_path / "model"
    from safetensors.torch import save_file

    save_file({"c": torch.zeros(1)}, str(hf / "sub" / "part.safetensors"))
    (hf / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"c": "sub/./part.safetensors"}}))
    assert _tool()._weight_files(str(hf)) == {
        "c": os.path.realpath(str(hf / "sub" / "part.safetensors"))}


def test_cli_exits_2_naming_the_index(tmp_path):
    hf = _folder(tmp_path, {"a": "model-00001.safetensors", "b": "../outside.safetensors"})
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
        "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "vocab_size": 300, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False}))
    proc = subprocess.run([sys.executable, "tools/convert_hf_checkpoint.py", "--hf-dir", str(hf),
                           "--save", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.safetensors.index.json: weight_map['b'] = '../outside.safetensors'" in proc.stderr
    assert not os.path.exists(str(tmp_path / "out"))
