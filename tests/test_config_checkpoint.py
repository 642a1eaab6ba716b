"""Config reading (HyperPyYAML as data), presets, checkpoint loading and its errors."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cosytools.checkpoint import adapt_weight_norm, read_state_dict, write_state_dict
from cosytools.config import ModelConfig
from cosytools.errors import CheckpointError, ConfigError
from cosytools.hyperyaml import Tagged, loads_hyperyaml
from cosytools.inspect import parameter_counts
from cosytools.loading import load_model


def test_hyperyaml_tags_are_data_and_refs_resolve():
    doc = loads_hyperyaml(
        "a: 25\nb: 2\nc: !ref <a> * <b>\nd: !ref <c>\ne: !ref (<a> + 5) // <b>\n"
        "x: !new:os.system\n    command: rm -rf /\n"
        "f: !name:some.func\n    k: !ref <b>\n"
        "g: !apply:random.seed [1986]\n")
    assert doc["c"] == 50 and doc["d"] == 50 and doc["e"] == 15
    assert isinstance(doc["x"], Tagged) and doc["x"].target == "os.system"  # never executed
    assert doc["f"].kind == "name" and doc["f"].kwargs() == {"k": 2}
    assert doc["g"].args == [1986]


def test_hyperyaml_bad_ref():
    with pytest.raises(ConfigError, match="not defined"):
        loads_hyperyaml("a: !ref <nope>\n")
    with pytest.raises(ConfigError, match="not simple arithmetic"):
        loads_hyperyaml("a: 1\nb: !ref __import__('os') or <a>\n")


def test_fixture_yaml_sizes(fixture_model_dir):
    cfg = ModelConfig.from_model_dir(fixture_model_dir)
    est = cfg.doc["flow"].kwargs()["decoder"].kwargs()["estimator"].kwargs()
    assert est["static_chunk_size"] == 50  # <chunk_size> * <token_mel_ratio>
    assert cfg.qwen2.hidden_size == 32 and cfg.qwen2.rope_theta == 1e6
    assert cfg.sampling_kwargs() == {"top_p": 0.8, "top_k": 25, "win_size": 10, "tau_r": 0.1}


def test_full_preset_parameter_counts_equal_the_real_model():
    counts = parameter_counts(ModelConfig.from_preset("full"))
    assert counts["llm.qwen2"] == 494_032_768
    assert counts["llm.speech_embedding+llm_decoder"] == 12_115_712
    assert counts["flow.decoder.estimator"] == 331_142_224
    assert counts["flow"] == 332_257_088
    assert counts["hift"] == 20_779_887


def test_unknown_model_class(tmp_path, fixture_model_dir):
    d = tmp_path / "m"
    shutil.copytree(fixture_model_dir, d)
    y = (d / "cosyvoice3.yaml").read_text().replace("cosyvoice.flow.flow.CausalMaskedDiffWithDiT",
                                                    "cosyvoice.flow.flow.MaskedDiffWithXvec")
    (d / "cosyvoice3.yaml").write_text(y)
    with pytest.raises(ConfigError, match=r"MaskedDiffWithXvec.*does not implement"):
        ModelConfig.from_model_dir(d)


def test_missing_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no cosyvoice3.yaml"):
        ModelConfig.from_model_dir(tmp_path)


@pytest.fixture
def model_copy(tmp_path, fixture_model_dir) -> Path:
    d = tmp_path / "m"
    shutil.copytree(fixture_model_dir, d, ignore=shutil.ignore_patterns("*.safetensors"))
    return d


def test_truncated_checkpoint(model_copy):
    p = model_copy / "flow.pt"
    p.write_bytes(p.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"flow\.pt.*truncated"):
        load_model(model_copy, components=["flow"])


def test_renamed_key_names_file_and_key(model_copy):
    sd = read_state_dict(model_copy / "flow.pt")
    sd["input_embedding.weight_renamed"] = sd.pop("input_embedding.weight")
    write_state_dict(sd, model_copy / "flow.pt")
    with pytest.raises(CheckpointError) as e:
        load_model(model_copy, components=["flow"])
    msg = str(e.value)
    assert "flow.pt" in msg and "missing in file: input_embedding.weight [6561, 80]" in msg
    assert "input_embedding.weight_renamed" in msg


def test_wrong_shape_names_both_shapes(model_copy):
    sd = read_state_dict(model_copy / "hift.pt")
    sd["m_source.l_linear.weight"] = torch.zeros(1, 7)
    write_state_dict(sd, model_copy / "hift.pt")
    with pytest.raises(CheckpointError, match=r"m_source\.l_linear\.weight: file has \[1, 7\], model expects \[1, 9\]"):
        load_model(model_copy, components=["hift"])


@pytest.mark.parametrize("spelling", ["weight_g", "weight.original", "plain"])
def test_weight_norm_spellings_load_the_same(model_copy, spelling):
    ref = load_model(model_copy, components=["hift"]).hift.state_dict()
    sd = read_state_dict(model_copy / "hift.pt")
    out = {}
    for k, v in sd.items():
        if ".parametrizations.weight.original" in k:
            base, idx = k.split(".parametrizations.weight.original")
            if spelling == "weight_g":
                out[f"{base}.weight_{'g' if idx == '0' else 'v'}"] = v
            elif spelling == "weight.original":
                out[f"{base}.weight.original{idx}"] = v
            else:
                if idx == "1":
                    g = sd[f"{base}.parametrizations.weight.original0"]
                    out[f"{base}.weight"] = v * (g / v.norm(2, dim=tuple(range(1, v.dim())), keepdim=True))
        else:
            out[k] = v
    write_state_dict(out, model_copy / "hift.pt")
    got = load_model(model_copy, components=["hift"]).hift.state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.allclose(got[k], ref[k], rtol=1e-6, atol=1e-7), k


def test_adapt_weight_norm_splits_plain_weight():
    w = torch.randn(4, 3, 5)
    out = adapt_weight_norm({"c.weight": w}, ["c.parametrizations.weight.original0", "c.parametrizations.weight.original1"])
    g, v = out["c.parametrizations.weight.original0"], out["c.parametrizations.weight.original1"]
    assert torch.allclose(v * g / v.norm(2, dim=(1, 2), keepdim=True), w, atol=1e-6)


def test_pt_and_safetensors_agree(fixture_model_dir):
    a = load_model(fixture_model_dir, components=["flow"], fmt="pt").flow.state_dict()
    b = load_model(fixture_model_dir, components=["flow"], fmt="safetensors").flow.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
