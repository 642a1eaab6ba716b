"""The command line: synth on the built-in model, init-model, inspect, and exit code 2 on bad input."""
from __future__ import annotations

import json
import shutil
import wave

import pytest
import torch

from cosytools.checkpoint import read_state_dict, write_state_dict
from cosytools.cli import main


def cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_synth_default_tiny_model(tmp_path, capsys, monkeypatch, tiny_cache):
    monkeypatch.setenv("COSYTOOLS_CACHE", str(tiny_cache))
    out = tmp_path / "hello.wav"
    code, o, err = cli(capsys, "synth", "hello", "-o", str(out), "--min-tokens", "20", "--max-tokens", "20", "--json")
    assert code == 0, err
    info = json.loads(o)
    assert info["speech_tokens"] == 20 and info["seconds"] == pytest.approx(0.8)
    with wave.open(str(out)) as w:
        assert w.getframerate() == 24000 and w.getnframes() == 20 * 2 * 480
    assert (tiny_cache / "models" / "tiny-seed0" / "cosyvoice3.yaml").is_file()


def test_synth_is_deterministic_per_seed(tmp_path, capsys, monkeypatch, tiny_cache):
    monkeypatch.setenv("COSYTOOLS_CACHE", str(tiny_cache))
    paths = []
    for i in range(2):
        p = tmp_path / f"{i}.wav"
        assert cli(capsys, "synth", "hello again", "-o", str(p), "--seed", "3", "--max-tokens", "15")[0] == 0
        paths.append(p.read_bytes())
    assert paths[0] == paths[1]


def test_synth_with_speaker_and_strict_prompt(tmp_path, capsys, monkeypatch, tiny_cache):
    monkeypatch.setenv("COSYTOOLS_CACHE", str(tiny_cache))
    code, _, err = cli(capsys, "synth", "hi", "-o", str(tmp_path / "a.wav"), "--speaker", "random_female",
                       "--max-tokens", "8")
    assert code == 0, err
    code, _, err = cli(capsys, "synth", "hi", "-o", str(tmp_path / "b.wav"), "--speaker", "nobody")
    assert code == 2 and "random_female" in err
    code, _, err = cli(capsys, "synth", "hi", "-o", str(tmp_path / "c.wav"), "--strict-prompt")
    assert code == 2 and "<|endofprompt|>" in err and "Traceback" not in err


def test_init_model_and_inspect(tmp_path, capsys):
    d = tmp_path / "m"
    code, o, err = cli(capsys, "init-model", "--preset", "tiny", "--seed", "5", "--format", "pt",
                       "--format", "safetensors", str(d))
    assert code == 0, err
    for f in ("cosyvoice3.yaml", "llm.pt", "flow.pt", "hift.pt", "llm.safetensors", "spk2info.pt",
              "CosyVoice-BlankEN/config.json", "CosyVoice-BlankEN/vocab.json", "CosyVoice-BlankEN/merges.txt",
              "CosyVoice-BlankEN/tokenizer_config.json"):
        assert (d / f).is_file(), f
    assert not (d / "CosyVoice-BlankEN" / "tokenizer.json").exists()  # like the real folder
    sd = read_state_dict(d / "hift.pt")
    assert any(k.endswith("parametrizations.weight.original0") for k in sd)  # upstream weight-norm keys
    code, o, err = cli(capsys, "inspect", str(d), "--json")
    info = json.loads(o)
    assert code == 0 and info["components"]["flow"]["class"] == "CausalMaskedDiffWithDiT"
    code, _, err = cli(capsys, "init-model", str(d))
    assert code == 2 and "--overwrite" in err


@pytest.fixture
def broken_model(tmp_path, fixture_model_dir):
    d = tmp_path / "m"
    shutil.copytree(fixture_model_dir, d, ignore=shutil.ignore_patterns("*.safetensors"))
    return d


@pytest.mark.parametrize("case,expect", [
    ("truncated", "truncated"),
    ("renamed", "missing in file: llm_decoder.weight"),
    ("shape", "file has [6761, 16], model expects [6761, 32]"),
    ("unknown_class", "does not implement"),
])
def test_bad_model_inputs_exit_2(tmp_path, capsys, broken_model, case, expect):
    d = broken_model
    if case == "truncated":
        data = (d / "llm.pt").read_bytes()
        (d / "llm.pt").write_bytes(data[: len(data) // 3])
    elif case == "renamed":
        sd = read_state_dict(d / "llm.pt")
        sd["llm_decoder.weights"] = sd.pop("llm_decoder.weight")
        write_state_dict(sd, d / "llm.pt")
    elif case == "shape":
        sd = read_state_dict(d / "llm.pt")
        sd["llm_decoder.weight"] = torch.zeros(6761, 16)
        write_state_dict(sd, d / "llm.pt")
    elif case == "unknown_class":
        y = d / "cosyvoice3.yaml"
        y.write_text(y.read_text().replace("cosyvoice.llm.llm.CosyVoice3LM", "cosyvoice.llm.llm.TransformerLM"))
    code, out, err = cli(capsys, "synth", "hello", "--model", str(d), "-o", str(tmp_path / "x.wav"))
    assert code == 2, (out, err)
    assert expect in err and "Traceback" not in err
    if case != "unknown_class":
        assert "llm.pt" in err


def test_unknown_backend_and_model_dir(tmp_path, capsys):
    code, _, err = cli(capsys, "synth", "hi", "--model", str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in err
    code, _, err = cli(capsys, "parity", "flow", "--ref", "x.safetensors", "--backend", "nosuch")
    assert code == 2
