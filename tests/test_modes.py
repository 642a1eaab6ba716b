"""Every synthesis mode end to end on a tiny random model with stand-in ONNX sub-models:
the frontend's per-mode inputs (as upstream composes them), prompt alignment, streaming, the
CLI, and the errors a user gets for bad input."""
from __future__ import annotations

import json
import os
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from cosytools.cli import main
from cosytools.errors import ConfigError, InputError
from cosytools.frontend.frontend import (CAMPPLUS_FILE, SPEECH_TOKENIZER_FILE, Frontend, ModelInput, align_prompt,
                                         compose_instruction)
from cosytools.init_model import init_model
from cosytools.pipeline import Pipeline, SynthResult
from cosytools.wav import write_wav

PROMPT_TEXT = "You are a helpful assistant.<|endofprompt|>This is a recording of my voice."
EOP = 151646
SR = 24000


def _tone(seconds: float, sr: int, f0: float = 180.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * f0 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (x + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return init_model(tmp_path_factory.mktemp("cv3") / "tiny", "tiny")


@pytest.fixture(scope="session")
def pipe(model_dir) -> Pipeline:
    return Pipeline.from_model(model_dir, progress=False)


@pytest.fixture(scope="session")
def wavs(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("wavs")
    out = {k: d / f"{k}.wav" for k in ("prompt", "source", "long", "narrow", "stereo8", "notwav")}
    write_wav(out["prompt"], _tone(2.05, SR), SR)          # 2.05 s: 52 tokens vs 102 mel frames
    write_wav(out["source"], _tone(1.2, 16000, 240.0, 1), 16000)   # 30 source tokens
    write_wav(out["long"], _tone(31.0, 16000), 16000)
    write_wav(out["narrow"], _tone(2.0, 8000), 8000)
    with wave.open(str(out["stereo8"]), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(1)
        w.setframerate(16000)
        w.writeframes(bytes(range(256)) * 100)
    out["notwav"].write_text("this is not audio\n")
    return out


@pytest.fixture(scope="session")
def no_onnx_dir(model_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("no_onnx") / "m"
    d.mkdir()
    for p in model_dir.iterdir():
        if p.suffix != ".onnx":
            os.symlink(p, d / p.name)
    return d


@pytest.fixture
def llm_calls(pipe, monkeypatch):
    """Record what each LLM call gets (text ids, prompt text ids, prompt speech tokens)."""
    calls = []
    real = pipe.backend.llm_generate

    def spy(text, prompt_text, prompt_speech_token, **kw):
        calls.append((text.clone(), prompt_text.clone(), prompt_speech_token.clone()))
        return real(text, prompt_text, prompt_speech_token, **kw)

    monkeypatch.setattr(pipe.backend, "llm_generate", spy)
    return calls


N_TOKENS = {"sft": 30}  # sft (no prompt) runs long enough for two stream chunks (hop 25 + look-ahead 3)


def _run(pipe, mode, wavs, stream, **kw):
    p, s = str(wavs["prompt"]), str(wavs["source"])
    n = N_TOKENS.get(mode, 8)
    gen = dict(min_tokens=n, max_tokens=n, **kw)
    if mode == "sft":
        return pipe.sft("Hello there, I have 2 cats.", "random_female", stream=stream, **gen)
    if mode == "zero_shot":
        return pipe.zero_shot("Hello there, I have 2 cats.", PROMPT_TEXT, p, stream=stream, **gen)
    if mode == "cross_lingual":
        return pipe.cross_lingual("Bonjour, je suis là.", p, stream=stream, **gen)
    if mode == "instruct":
        return pipe.instruct("Hello there.", "Please speak very softly.", p, stream=stream, **gen)
    return pipe.vc(s, p, stream=stream)


# ----------------------------------------------------------------------------- model dir + frontend

def test_init_model_writes_onnx_standins(model_dir, pipe):
    for name in (SPEECH_TOKENIZER_FILE, CAMPPLUS_FILE):
        assert (model_dir / name).is_file()
    fe = pipe.frontend
    assert [i.name for i in fe.speech_tokenizer.session.get_inputs()] == ["feats", "feats_length"]
    assert fe.campplus.session.get_outputs()[0].shape[-1] == 192


def test_prompt_mel_and_tokens_are_aligned_like_upstream(pipe, wavs):
    fe = pipe.frontend
    raw_tok = fe.extract_speech_token(str(wavs["prompt"]))
    raw_feat = fe.extract_speech_feat(str(wavs["prompt"]))
    assert raw_tok.shape == (1, 52) and raw_feat.shape == (1, 102, 80)  # 16 kHz tokens vs 24 kHz mel frames
    p = fe.prompt_audio(str(wavs["prompt"]))
    # token_len = min(feat_len // 2, token_len); feat trimmed to 2 * token_len
    assert p.speech_token.shape == (1, 51) and p.speech_feat.shape == (1, 102, 80)
    assert torch.equal(p.speech_token, raw_tok[:, :51]) and torch.equal(p.speech_feat, raw_feat)
    assert p.embedding.shape == (1, 192) and p.aligned
    from cosytools.wav import read_wav
    p2 = fe.prompt_audio(read_wav(wavs["prompt"]))  # (waveform, sample_rate) gives the same features
    assert torch.equal(p2.speech_token, p.speech_token) and torch.equal(p2.speech_feat, p.speech_feat)
    tok, feat = align_prompt(torch.arange(60)[None], torch.zeros(1, 101, 80))  # the other way round
    assert tok.shape == (1, 50) and feat.shape == (1, 100, 80)
    # vc does not align (upstream frontend_vc)
    vc = fe.frontend_vc(str(wavs["source"]), str(wavs["prompt"]))
    assert vc.flow_prompt_speech_token.shape == (1, 52) and vc.prompt_speech_feat.shape == (1, 102, 80)
    assert vc.source_speech_token.shape == (1, 30)


def test_frontend_inputs_per_mode_match_upstream(pipe, wavs):
    fe = pipe.frontend
    p = fe.prompt_audio(str(wavs["prompt"]))
    zs = fe.frontend_zero_shot("Hello.", PROMPT_TEXT, p)
    assert torch.equal(zs.prompt_text, fe.encode(PROMPT_TEXT)) and EOP in zs.prompt_text
    assert torch.equal(zs.llm_prompt_speech_token, p.speech_token)
    assert torch.equal(zs.flow_prompt_speech_token, p.speech_token)
    xl = fe.frontend_cross_lingual("Hello.", p)
    assert xl.prompt_text.shape[1] == 0 and xl.llm_prompt_speech_token.shape[1] == 0
    assert torch.equal(xl.flow_prompt_speech_token, p.speech_token)
    instr = compose_instruction("Please speak very softly.")
    assert instr == "You are a helpful assistant. Please speak very softly.<|endofprompt|>"
    assert compose_instruction(PROMPT_TEXT) == PROMPT_TEXT
    ins = fe.frontend_instruct2("Hello.", instr, p)
    assert torch.equal(ins.prompt_text, fe.encode(instr)) and ins.llm_prompt_speech_token.shape[1] == 0
    sft = fe.frontend_sft("Hello.", "random_male")
    assert torch.equal(sft.flow_embedding, fe.speaker_embedding("random_male"))
    # upstream's model_input keys per mode (with *_len companions), int32 ids
    assert set(zs.as_dict()) == {"text", "text_len", "prompt_text", "prompt_text_len", "llm_prompt_speech_token",
                                 "llm_prompt_speech_token_len", "flow_prompt_speech_token",
                                 "flow_prompt_speech_token_len", "prompt_speech_feat", "prompt_speech_feat_len",
                                 "llm_embedding", "flow_embedding"}
    assert set(xl.as_dict()) == set(zs.as_dict()) - {"prompt_text", "prompt_text_len", "llm_prompt_speech_token",
                                                     "llm_prompt_speech_token_len"}
    assert set(ins.as_dict()) == set(zs.as_dict()) - {"llm_prompt_speech_token", "llm_prompt_speech_token_len"}
    assert set(sft.as_dict()) == {"text", "text_len", "llm_embedding", "flow_embedding"}
    assert zs.as_dict()["text"].dtype == torch.int32 and zs.as_dict()["prompt_speech_feat_len"].item() == 102
    entry = fe.speaker_entry(PROMPT_TEXT, p)
    assert "text" not in entry and entry["flow_embedding"].shape == (1, 192)


# ----------------------------------------------------------------------------- every mode, end to end

@pytest.mark.parametrize("mode", ["sft", "zero_shot", "cross_lingual", "instruct", "vc"])
def test_mode_end_to_end(pipe, wavs, llm_calls, mode):
    res = _run(pipe, mode, wavs, stream=False)
    assert isinstance(res, SynthResult) and res.sample_rate == SR
    assert res.speech.dim() == 2 and res.speech.shape[1] > 0 and bool(torch.isfinite(res.speech).all())
    if mode == "vc":
        assert not llm_calls and len(res.tokens) == 30  # the source's tokens, no LLM
        # unaligned prompt (52 tokens, 102 frames): 2 * (52 + 30) - 102 = 62 frames
        assert res.mel.shape[2] == 62 and res.speech.shape[1] == 62 * 480
    else:
        n = N_TOKENS.get(mode, 8)
        assert len(res.tokens) == n and res.speech.shape[1] == n * 2 * 480
        (text, prompt_text, prompt_speech), = llm_calls
        assert EOP in torch.cat([prompt_text, text], dim=1)
        n_prompt_speech = {"zero_shot": 51}.get(mode, 0)  # only zero-shot gives the LLM prompt speech
        assert prompt_speech.shape[1] == n_prompt_speech
        if mode == "cross_lingual":  # the instruction lives in the text, no prompt text
            assert prompt_text.shape[1] == 0 and EOP in text
        if mode in ("zero_shot", "instruct"):
            assert EOP in prompt_text and EOP not in text

    chunks = list(_run(pipe, mode, wavs, stream=True))
    assert chunks and [c.final for c in chunks] == [False] * (len(chunks) - 1) + [True]
    audio = torch.cat([c.speech for c in chunks], dim=1)
    assert bool(torch.isfinite(audio).all())
    # sft: 28 tokens (hop 25 + look-ahead 3) then the rest; vc: the 52 prompt tokens pad the first hop to
    # 48 (+3), more than the source's 30 tokens, so one chunk (as upstream)
    assert len(chunks) == {"sft": 2}.get(mode, 1)
    assert audio.shape[1] == res.speech.shape[1]


def test_text_is_split_and_segments_concatenated(pipe):
    s14 = "今天天气很好我们去公园散步。"  # 14 characters: 5 per piece (70 > 60), 2 pieces
    assert pipe.frontend.segments(s14 * 10) == [s14 * 5, s14 * 5]
    res = pipe.sft(s14 * 10, "random_female", min_tokens=4, max_tokens=4)
    assert res.segments == [s14 * 5, s14 * 5] and len(res.tokens) == 8
    assert res.speech.shape[1] == 8 * 960 and res.mel.shape[2] == 16


def test_streaming_over_segments_and_speed(pipe):
    s14 = "今天天气很好我们去公园散步。"
    chunks = list(pipe.sft(s14 * 10, "random_female", min_tokens=4, max_tokens=4, stream=True))
    assert [c.segment for c in chunks] == [0, 1] and [c.final for c in chunks] == [False, True]
    assert sum(c.speech.shape[1] for c in chunks) == 8 * 960
    res = pipe.sft("Hello there.", None, min_tokens=8, max_tokens=8, speed=2.0)
    assert res.mel.shape[2] == 8 and res.speech.shape[1] == 8 * 480  # 16 mel frames stretched to 8
    with pytest.raises(InputError, match="non-stream"):
        pipe.sft("Hello there.", None, stream=True, speed=2.0)
    with pytest.raises(InputError, match="<\\|endofprompt\\|>"):
        pipe.sft("Hello there.", None, add_default_instruction=False)


# ----------------------------------------------------------------------------- bad input (API)

def test_bad_inputs_raise_clear_errors(pipe, wavs, no_onnx_dir):
    p = str(wavs["prompt"])
    with pytest.raises(InputError, match="You are a helpful assistant.<\\|endofprompt\\|>"):
        pipe.zero_shot("Hello.", "This is my voice.", p)
    with pytest.raises(InputError, match="at most 30 s"):
        pipe.zero_shot("Hello.", PROMPT_TEXT, str(wavs["long"]))
    with pytest.raises(InputError, match="8000 Hz"):
        pipe.cross_lingual("Hello.", str(wavs["narrow"]))
    with pytest.raises(InputError, match="not a RIFF/WAVE"):
        pipe.instruct("Hello.", "Speak softly.", str(wavs["notwav"]))
    with pytest.raises(InputError, match="unsupported WAV encoding"):
        pipe.vc(str(wavs["stereo8"]), p)
    with pytest.raises(InputError, match="random_female"):
        pipe.sft("Hello.", "nobody")
    with pytest.raises(InputError, match="empty"):
        pipe.zero_shot("   ", PROMPT_TEXT, p)
    for text in ("。！？", "... !!"):
        with pytest.raises(InputError, match="only punctuation"):
            pipe.cross_lingual(text, p)
    with pytest.raises(InputError, match="instruction is empty"):
        pipe.instruct("Hello.", " ", p)
    with pytest.raises(ConfigError, match=f"{SPEECH_TOKENIZER_FILE}.*cosytools init-model"):
        Frontend(no_onnx_dir).prompt_audio(p)
    assert Frontend(no_onnx_dir).speakers() == ["random_female", "random_male"]  # sft needs no ONNX


def test_model_input_defaults():
    m = ModelInput("vc")
    assert not m.uses_llm and m.text.shape == (1, 0) and m.prompt_speech_feat.shape == (1, 0, 80)


# ----------------------------------------------------------------------------- CLI

def cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_zero_shot_writes_wav(tmp_path, capsys, model_dir, wavs):
    out = tmp_path / "zs.wav"
    code, o, err = cli(capsys, "synth", "Hello there.", "--mode", "zero_shot", "--prompt-wav", str(wavs["prompt"]),
                       "--prompt-text", PROMPT_TEXT, "--model", str(model_dir), "-o", str(out),
                       "--min-tokens", "6", "--max-tokens", "6", "--json")
    assert code == 0, err
    info = json.loads(o)
    assert info["mode"] == "zero_shot" and info["speech_tokens"] == 6 and info["segments"] == 1
    with wave.open(str(out)) as w:
        assert w.getframerate() == SR and w.getnframes() == 6 * 960


@pytest.fixture
def cli_pipe(pipe, monkeypatch):
    """`synth` reuses the session's loaded model; --model only picks the frontend's dir."""
    def from_model(model, **kw):
        p = Pipeline(pipe.backend, pipe.tokenizer, progress=False)
        p.frontend = Frontend(model, tokenizer=pipe.tokenizer)
        return p
    monkeypatch.setattr(Pipeline, "from_model", staticmethod(from_model))
    return pipe


def test_cli_stream_writes_chunks(tmp_path, capsys, cli_pipe, model_dir, wavs):
    out = tmp_path / "vc.wav"
    code, o, err = cli(capsys, "synth", "--mode", "vc", "--source-wav", str(wavs["source"]), "--prompt-wav",
                       str(wavs["prompt"]), "--model", str(model_dir), "-o", str(out), "--stream", "--json")
    assert code == 0, err
    info = json.loads(o)
    assert info["stream"] and info["chunks"] == 1 and info["seconds"] == pytest.approx(62 * 480 / SR)
    with wave.open(str(out)) as w:
        assert w.getframerate() == SR and w.getnframes() == 62 * 480


@pytest.mark.parametrize("args,needle", [
    (["Hi.", "--mode", "zero_shot", "--prompt-wav", "{prompt}", "--prompt-text", "my voice"],
     "You are a helpful assistant.<|endofprompt|>"),
    (["Hi.", "--mode", "zero_shot", "--prompt-wav", "{long}", "--prompt-text", PROMPT_TEXT], "at most 30 s"),
    (["Hi.", "--mode", "cross_lingual", "--prompt-wav", "{narrow}"], "at least 16 kHz"),
    (["Hi.", "--mode", "instruct", "--instruct", "Softly.", "--prompt-wav", "{notwav}"], "WAV"),
    (["--mode", "vc", "--source-wav", "{stereo8}", "--prompt-wav", "{prompt}"], "unsupported WAV encoding"),
    (["Hi.", "--mode", "cross_lingual", "--prompt-wav", "{prompt}", "--model", "{no_onnx}"],
     "cosytools init-model"),
    (["Hi.", "--speaker", "nobody"], "random_female"),
    (["。！", "--mode", "cross_lingual", "--prompt-wav", "{prompt}"], "only punctuation"),
    (["", "--mode", "zero_shot", "--prompt-wav", "{prompt}", "--prompt-text", PROMPT_TEXT], "empty"),
    (["Hi.", "--mode", "zero_shot", "--prompt-wav", "{prompt}"], "needs --prompt-text"),
    (["Hi.", "--mode", "vc", "--source-wav", "{prompt}", "--prompt-wav", "{prompt}"], "takes no TEXT"),
    (["Hi.", "--mode", "instruct", "--instruct", "Softly.", "--prompt-wav", "{prompt}", "--speaker", "x"],
     "does not take --speaker"),
    (["Hi.", "--mode", "cross_lingual", "--prompt-wav", "{prompt}", "--speaker", "x"], "carries its prompt"),
])
def test_cli_errors_exit_2(tmp_path, capsys, cli_pipe, model_dir, no_onnx_dir, wavs, args, needle):
    paths = {k: str(v) for k, v in wavs.items()}
    paths["no_onnx"] = str(no_onnx_dir)
    args = [a.format(**paths) if "{" in a and "<|" not in a else a for a in args]
    if "--model" not in args:
        args += ["--model", str(model_dir)]
    code, o, err = cli(capsys, "synth", *args, "-o", str(tmp_path / "x.wav"), "--max-tokens", "4")
    assert code == 2, (o, err)
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "x.wav").exists()


# ----------------------------------------------------------------------------- saved zero-shot speakers

@pytest.fixture
def speaker_dir(model_dir, tmp_path) -> Path:
    """A private copy of the tiny model dir (saving speakers writes its spk2info.pt)."""
    import shutil
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    return d


def test_saved_speaker_round_trip_and_same_synthesis(speaker_dir, pipe, wavs):
    """`add_speaker` + `save_speakers` keep the file's speakers, and zero-shot / cross-lingual synthesis
    from the saved speaker equals synthesis from the recording (upstream's zero_shot_spk_id)."""
    fe = Frontend(speaker_dir, tokenizer=pipe.tokenizer)
    before = set(fe.speakers())
    fe.add_speaker("me", PROMPT_TEXT, str(wavs["prompt"]))
    path = fe.save_speakers()
    assert path == speaker_dir / "spk2info.pt" and not (speaker_dir / "spk2info.pt.tmp").exists()
    fe2 = Frontend(speaker_dir, tokenizer=pipe.tokenizer)
    assert set(fe2.speakers()) == before | {"me"}
    ids, p = fe2.speaker_prompt("me")
    direct = fe2.prompt_audio(str(wavs["prompt"]))
    assert torch.equal(ids, fe2.encode(PROMPT_TEXT)) and torch.equal(p.speech_token, direct.speech_token)
    assert torch.equal(p.speech_feat, direct.speech_feat) and torch.equal(p.embedding, direct.embedding)
    assert torch.equal(fe2.speaker_embedding("me"), direct.embedding)  # sft can use it too
    pp = Pipeline(pipe.backend, pipe.tokenizer, progress=False)
    pp.frontend = fe2
    gen = dict(min_tokens=6, max_tokens=6, seed=3)
    a = pp.zero_shot("Hello there.", speaker="me", **gen)
    b = pp.zero_shot("Hello there.", PROMPT_TEXT, str(wavs["prompt"]), **gen)
    assert a.tokens == b.tokens and torch.equal(a.speech, b.speech)
    c = pp.cross_lingual("Bonjour.", speaker="me", **gen)
    d = pp.cross_lingual("Bonjour.", str(wavs["prompt"]), **gen)
    assert c.tokens == d.tokens and torch.equal(c.speech, d.speech)


def test_saved_speaker_errors(speaker_dir, pipe, wavs):
    fe = Frontend(speaker_dir, tokenizer=pipe.tokenizer)
    with pytest.raises(InputError, match="only an embedding"):
        fe.speaker_prompt("random_male")  # an sft speaker of init-model's spk2info.pt
    with pytest.raises(InputError, match="not in"):
        fe.speaker_prompt("nobody")
    with pytest.raises(InputError, match="non-empty"):
        fe.add_speaker(" ", PROMPT_TEXT, str(wavs["prompt"]))
    with pytest.raises(InputError, match="<\\|endofprompt\\|>"):
        fe.add_speaker("x", "no marker here", str(wavs["prompt"]))
    assert "x" not in fe.speakers()
    pp = Pipeline(pipe.backend, pipe.tokenizer, progress=False)
    pp.frontend = fe
    with pytest.raises(InputError, match="not both"):
        pp.zero_shot("Hi.", PROMPT_TEXT, str(wavs["prompt"]), speaker="random_male")
    with pytest.raises(InputError, match="exactly one"):
        pp.cross_lingual("Hi.")


def test_cli_speaker_add_list_and_synth(tmp_path, capsys, cli_pipe, speaker_dir, wavs):
    code, o, err = cli(capsys, "speaker", "add", "me", "--prompt-wav", str(wavs["prompt"]), "--prompt-text",
                       PROMPT_TEXT, "--model", str(speaker_dir))
    assert code == 0, err
    assert "saved speaker 'me'" in o and str(speaker_dir / "spk2info.pt") in o
    code, o, err = cli(capsys, "speaker", "list", "--model", str(speaker_dir), "--json")
    assert code == 0, err
    kinds = {r["speaker"]: r["kind"] for r in json.loads(o)["speakers"]}
    assert kinds["me"] == "zero_shot" and kinds["random_male"] == "sft"
    out = tmp_path / "zs.wav"
    code, o, err = cli(capsys, "synth", "Hello again.", "--mode", "zero_shot", "--speaker", "me", "--model",
                       str(speaker_dir), "-o", str(out), "--min-tokens", "6", "--max-tokens", "6", "--json")
    assert code == 0, err
    assert json.loads(o)["speech_tokens"] == 6 and out.is_file()
    code, o, err = cli(capsys, "synth", "Hi.", "--mode", "zero_shot", "--speaker", "me", "--prompt-wav",
                       str(wavs["prompt"]), "--model", str(speaker_dir))
    assert code == 2 and "carries its prompt" in err
    code, o, err = cli(capsys, "synth", "Hi.", "--mode", "zero_shot", "--speaker", "random_male", "--model",
                       str(speaker_dir), "-o", str(tmp_path / "x.wav"))
    assert code == 2 and "only an embedding" in err and "Traceback" not in err
    code, o, err = cli(capsys, "speaker", "add", "bad", "--prompt-wav", str(wavs["notwav"]), "--prompt-text",
                       PROMPT_TEXT, "--model", str(speaker_dir))
    assert code == 2 and "Traceback" not in err
