"""Audio front end: prompt mel vs the upstream fixture, whisper log-mel, Kaldi fbank, resampling,
prompt loading and the ONNX sub-model wrappers (on stand-in ONNX files with the real IO contract)."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cosytools.errors import ConfigError, InputError
from cosytools.frontend.features import (
    CampPlusONNX,
    SpeechTokenizerONNX,
    campplus_features,
    kaldi_fbank,
    kaldi_mel_banks,
    load_prompt_wav,
    make_standin_onnx_models,
    prompt_mel,
    resample,
    slaney_mel_filters,
    whisper_log_mel,
)
from cosytools.wav import read_wav, write_wav


def _sine(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(sr * seconds))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# ----------------------------------------------------------------------------- prompt mel

def test_prompt_mel_matches_upstream_fixture(load_ref, record_property):
    tensors, meta = load_ref("mel")
    wav, ref = tensors["mel.in.wav"], tensors["mel.out.feat"]
    assert meta["n_fft"] == "1920" and meta["hop_size"] == "480" and meta["center"] == "false"
    out = prompt_mel(wav)
    assert out.shape == ref.shape == (1, 80, 150) and out.dtype == torch.float32
    err = (out - ref).abs().max().item()
    record_property("prompt_mel_max_abs", err)
    assert err <= 1e-5, f"prompt mel max abs diff {err:.3e}"
    # upstream's op sequence with this machine's float32 FFT: FFT-library rounding only
    err32 = (prompt_mel(wav, fft_dtype=torch.float32) - ref).abs().max().item()
    record_property("prompt_mel_fp32_fft_max_abs", err32)
    assert err32 <= 3e-5, f"prompt mel (float32 FFT) max abs diff {err32:.3e}"
    # [N] input and numpy input give the same thing
    assert torch.equal(prompt_mel(wav[0].numpy()), out)


def test_prompt_mel_frames_and_short_input():
    for n in (721, 959, 960, 24000 + 17):
        assert prompt_mel(torch.zeros(n) + 0.01).shape == (1, 80, n // 480)
    with pytest.raises(InputError, match="samples"):
        prompt_mel(torch.zeros(100))


# ----------------------------------------------------------------------------- slaney filters

@pytest.mark.parametrize("sr,n_fft,n_mels", [(24000, 1920, 80), (16000, 400, 128), (22050, 1024, 80)])
def test_slaney_filter_properties(sr, n_fft, n_mels):
    w = slaney_mel_filters(sr, n_fft, n_mels)
    assert w.shape == (n_mels, n_fft // 2 + 1) and w.dtype == np.float32
    assert (w >= 0).all() and (w.max(axis=1) > 0).all()
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    # band edges in Hz: Slaney mel scale, n_mels + 2 points evenly spaced in mel
    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        return np.where(f < 1000, f * 3 / 200, 15 + np.log(np.maximum(f, 1e-9) / 1000) * 27 / np.log(6.4))
    def mel_to_hz(m):
        return np.where(m < 15, m * 200 / 3, 1000 * np.exp((m - 15) * np.log(6.4) / 27))
    edges = mel_to_hz(np.linspace(0, hz_to_mel(sr / 2), n_mels + 2))
    peaks = freqs[w.argmax(axis=1)]
    assert np.all(peaks >= edges[:-2] - 1e-6) and np.all(peaks <= edges[2:] + 1e-6)
    nz = w > 0
    for i in range(n_mels):  # support strictly inside the band
        f = freqs[nz[i]]
        assert f.min() > edges[i] - 1e-6 and f.max() < edges[i + 2] + 1e-6
    # Slaney norm: each triangle has unit area in Hz (check on bands wide enough to sample well)
    width = edges[2:] - edges[:-2]
    wide = width > 8 * sr / n_fft
    area = w.sum(axis=1) * sr / n_fft
    np.testing.assert_allclose(area[wide], 1.0, rtol=0.02)
    # peaks increase with the mel index
    assert np.all(np.diff(edges) > 0)


# SHA-256 of the float32 bytes of openai/whisper's `assets/mel_filters.npz` (made with
# `librosa.filters.mel(sr=16000, n_fft=400, n_mels=N)`; read from whisper release 20250625).
WHISPER_MEL_FILTER_SHA256 = {
    80: "4f2701b1d287d74a0dc9871026e9519d98cb76426615f2539b0d151a0ae4ec2e",
    128: "2a5f9822897750e047c85dea37cc268d3be0ecfd23c28a5f10da129d99d05afe",
}


@pytest.mark.parametrize("n_mels", [80, 128])
def test_slaney_filters_bitwise_equal_librosa_via_whisper_assets(n_mels):
    w = np.ascontiguousarray(slaney_mel_filters(16000, 400, n_mels))
    assert hashlib.sha256(w.tobytes()).hexdigest() == WHISPER_MEL_FILTER_SHA256[n_mels]


# ----------------------------------------------------------------------------- whisper log-mel

def test_whisper_log_mel_sine():
    n = 16000 + 123
    x = _sine(1000.0, 16000, n / 16000)
    out = whisper_log_mel(torch.from_numpy(x)[None])
    assert out.shape == (1, 128, n // 160) and out.dtype == torch.float32
    assert float(out.max() - out.min()) <= 2.0 + 1e-6  # max(x, max - 8) / 4
    filters = slaney_mel_filters(16000, 400, 128)
    centre = np.fft.rfftfreq(400, 1 / 16000)[filters.argmax(axis=1)]
    peak_bin = int(out[0].mean(dim=1).argmax())
    assert abs(centre[peak_bin] - 1000.0) <= 80.0
    # numpy float64 reference of the same recipe
    xp = np.pad(x, 200, mode="reflect")
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    frames = np.lib.stride_tricks.sliding_window_view(xp, 400)[::160] * win
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
    mel = np.log10(np.maximum(filters.astype(np.float64) @ power[:-1].T, 1e-10))
    mel = (np.maximum(mel, mel.max() - 8) + 4) / 4
    np.testing.assert_allclose(out[0].numpy(), mel, atol=2e-4)


@given(n=st.integers(201, 4000))
@settings(max_examples=20, deadline=None)
def test_whisper_frame_count(n):
    x = torch.from_numpy(np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1)
    assert whisper_log_mel(x).shape == (1, 128, n // 160)


# ----------------------------------------------------------------------------- Kaldi fbank

def _kaldi_fbank_numpy(x: np.ndarray, num_bins: int = 80) -> np.ndarray:
    """Float64 numpy version of Kaldi's compute-fbank-feats defaults (independent of the torch code)."""
    frames = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), 400)[::160].copy()
    frames -= frames.mean(axis=1, keepdims=True)
    frames[:, 1:] -= 0.97 * frames[:, :-1].copy()
    frames[:, 0] -= 0.97 * frames[:, 0]
    frames *= (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)) ** 0.85
    power = np.abs(np.fft.rfft(frames, n=512, axis=-1)) ** 2
    mel = lambda f: 1127.0 * np.log(1 + f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(8000.0)
    pts = lo + np.arange(num_bins + 2) * (hi - lo) / (num_bins + 1)
    m = mel(np.arange(257) * 16000 / 512)
    banks = np.zeros((num_bins, 257))
    for i in range(num_bins):
        l, c, r = pts[i], pts[i + 1], pts[i + 2]
        banks[i] = np.clip(np.minimum((m - l) / (c - l), (r - m) / (r - c)), 0, None)
    banks[:, 256] = 0.0  # Kaldi's banks do not reach the Nyquist bin
    return np.log(np.maximum(power @ banks.T, np.finfo(np.float32).eps))


def test_kaldi_fbank_against_numpy_recipe():
    rng = np.random.default_rng(3)
    x = (0.3 * _sine(220.0, 16000, 0.5) + 0.05 * rng.standard_normal(8000)).astype(np.float32) + 0.02
    out = kaldi_fbank(torch.from_numpy(x)[None])
    assert out.shape == (1 + (8000 - 400) // 160, 80) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), _kaldi_fbank_numpy(x), atol=5e-4)  # float32 vs float64
    banks = kaldi_mel_banks(80, 512, 16000.0)
    assert banks.shape == (80, 256) and float(banks.min()) >= 0 and float(banks.max()) <= 1
    feats = campplus_features(torch.from_numpy(x))
    assert feats.shape == (1, out.shape[0], 80)
    np.testing.assert_allclose(feats[0].mean(dim=0).numpy(), 0.0, atol=1e-5)


@given(n=st.integers(400, 5000))
@settings(max_examples=25, deadline=None)
def test_kaldi_frame_count(n):
    x = torch.from_numpy(np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1)
    assert kaldi_fbank(x).shape == (1 + (n - 400) // 160, 80)


@given(seed=st.integers(0, 2**16), dc=st.floats(-0.5, 0.5), n=st.integers(400, 3200))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_kaldi_fbank_ignores_dc_offset(seed, dc, n):
    x = (np.random.default_rng(seed).standard_normal(n) * 0.2).astype(np.float32)
    a = kaldi_fbank(torch.from_numpy(x))
    b = kaldi_fbank(torch.from_numpy(x + np.float32(dc)))
    assert torch.allclose(a, b, atol=2e-3), float((a - b).abs().max())


def test_kaldi_fbank_too_short():
    with pytest.raises(InputError, match="25 ms"):
        kaldi_fbank(torch.zeros(399))


# ----------------------------------------------------------------------------- resampling

@pytest.mark.parametrize("method", ["poly", "sinc_hann"])
def test_resample_round_trip(method):
    x = _sine(440.0, 24000, 1.0)
    y = resample(x, 24000, 16000, method=method)
    assert isinstance(y, np.ndarray) and y.shape == (16000,)
    z = resample(y, 16000, 24000, method=method)
    assert z.shape == x.shape
    edge = 1200  # 50 ms of filter start-up at each end
    sig, err = x[edge:-edge], z[edge:-edge] - x[edge:-edge]
    snr = 10 * math.log10(float(np.sum(sig.astype(np.float64) ** 2) / np.sum(err.astype(np.float64) ** 2)))
    assert snr > 40, f"{method}: round-trip SNR {snr:.1f} dB"


def test_resample_identity_lengths_and_types():
    x = torch.randn(1, 1001)
    assert resample(x, 16000, 16000) is x
    for method in ("poly", "sinc_hann"):
        for sr_in, sr_out in ((44100, 16000), (24000, 16000), (16000, 24000), (48000, 24000)):
            y = resample(x, sr_in, sr_out, method=method)
            assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
            assert y.shape == (1, math.ceil(1001 * sr_out / sr_in))
    # torchaudio-style kernel keeps DC (rows sum to ~1 away from the edges)
    y = resample(torch.ones(1, 4800), 48000, 16000, method="sinc_hann")
    np.testing.assert_allclose(y[0, 50:-50].numpy(), 1.0, atol=1e-2)
    with pytest.raises(InputError, match="method"):
        resample(x, 24000, 16000, method="nope")


# ----------------------------------------------------------------------------- WAV / prompt loading

def test_wav_round_trip_16bit(tmp_path: Path):
    x = _sine(300.0, 24000, 0.5, amp=0.8)
    write_wav(tmp_path / "a.wav", x, 24000)
    y, sr = read_wav(tmp_path / "a.wav")
    assert sr == 24000 and y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(y - x).max() <= 1.5 / 32768


def test_load_prompt_wav_resamples(tmp_path: Path):
    write_wav(tmp_path / "p.wav", _sine(200.0, 24000, 1.0), 24000)
    w16 = load_prompt_wav(tmp_path / "p.wav", 16000)
    w24 = load_prompt_wav(tmp_path / "p.wav", 24000)
    assert w16.shape == (1, 16000) and w24.shape == (1, 24000) and w16.dtype == torch.float32
    assert load_prompt_wav(tmp_path / "p.wav", 16000, resample_method="poly").shape == (1, 16000)


def test_load_prompt_wav_errors(tmp_path: Path):
    write_wav(tmp_path / "long.wav", np.full(16000 * 31, 0.1, np.float32), 16000)
    with pytest.raises(InputError, match=r"31\.00 s.*at most 30 s"):
        load_prompt_wav(tmp_path / "long.wav", 16000)
    assert load_prompt_wav(tmp_path / "long.wav", 16000, max_seconds=None).shape == (1, 16000 * 31)
    write_wav(tmp_path / "low.wav", _sine(200.0, 8000, 1.0), 8000)
    with pytest.raises(InputError, match="is 8000 Hz; CosyVoice3 needs at least 16 kHz"):
        load_prompt_wav(tmp_path / "low.wav", 16000)
    (tmp_path / "text.wav").write_text("this is not audio")
    with pytest.raises(InputError, match="not a RIFF/WAVE"):
        load_prompt_wav(tmp_path / "text.wav", 16000)
    write_wav(tmp_path / "silent.wav", np.zeros(16000, np.float32), 16000)
    with pytest.raises(InputError, match="silent"):
        load_prompt_wav(tmp_path / "silent.wav", 16000)
    write_wav(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(InputError, match="empty"):
        load_prompt_wav(tmp_path / "empty.wav", 16000)
    write_wav(tmp_path / "short.wav", _sine(200.0, 16000, 0.02), 16000)
    with pytest.raises(InputError, match="20 ms"):
        load_prompt_wav(tmp_path / "short.wav", 16000)
    with pytest.raises(InputError, match="missing.wav"):
        load_prompt_wav(tmp_path / "missing.wav", 16000)


# ----------------------------------------------------------------------------- ONNX sub-models

@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict:
    return make_standin_onnx_models(tmp_path_factory.mktemp("onnx"), seed=0)


def test_standin_wrappers_shapes(standins):
    assert standins["speech_tokenizer"].name == "speech_tokenizer_v3.onnx"
    assert standins["campplus"].name == "campplus.onnx"
    tok = SpeechTokenizerONNX(standins["speech_tokenizer"])
    rng = np.random.default_rng(0)
    wav = torch.from_numpy((0.3 * rng.standard_normal(16000 * 2 + 321)).astype(np.float32))[None]
    feats = whisper_log_mel(wav)
    tokens = tok(feats)
    assert tokens.dtype == torch.int64 and tokens.shape == (1, math.ceil(feats.shape[2] / 4))
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 6561
    assert torch.equal(tok.tokenize(wav), tokens)
    assert len(set(tokens[0].tolist())) > 1
    spk = CampPlusONNX(standins["campplus"])
    emb = spk.embed(wav)
    assert emb.shape == (1, 192) and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    assert torch.equal(spk(campplus_features(wav)), emb)
    # deterministic stand-ins: same seed, same tokens
    again = make_standin_onnx_models(Path(standins["campplus"]).parent / "again", seed=0)
    assert torch.equal(SpeechTokenizerONNX(again["speech_tokenizer"])(feats), tokens)


def test_provider_fallback(standins, caplog):
    tok = SpeechTokenizerONNX(standins["speech_tokenizer"], providers=["NoSuchExecutionProvider"])
    assert tok.session.get_providers() == ["CPUExecutionProvider"]
    assert "not available" in caplog.text


def test_wrapper_input_errors(standins):
    tok = SpeechTokenizerONNX(standins["speech_tokenizer"])
    with pytest.raises(InputError, match=r"\[1, 128, T>0\]"):
        tok(torch.zeros(1, 80, 10))
    with pytest.raises(InputError, match="at most 30 s"):
        tok(torch.zeros(1, 128, 3001))
    spk = CampPlusONNX(standins["campplus"])
    with pytest.raises(InputError, match=r"\[1, T>0, 80\]"):
        spk(torch.zeros(1, 10, 128))


def test_onnx_missing_and_mismatched(tmp_path: Path, standins):
    import onnx
    from onnx import TensorProto, helper

    with pytest.raises(ConfigError, match="nowhere.onnx"):
        SpeechTokenizerONNX(tmp_path / "nowhere.onnx")
    # right ranks/types, wrong input names
    g = helper.make_graph(
        [helper.make_node("ReduceMean", ["mel"], ["indices"], axes=[1], keepdims=0)], "bad",
        [helper.make_tensor_value_info("mel", TensorProto.FLOAT, [1, 128, "T"]),
         helper.make_tensor_value_info("mel_len", TensorProto.INT32, [1])],
        [helper.make_tensor_value_info("indices", TensorProto.FLOAT, [1, "T"])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "bad.onnx"))
    with pytest.raises(ConfigError) as e:
        SpeechTokenizerONNX(tmp_path / "bad.onnx")
    msg = str(e.value)
    assert "bad.onnx" in msg and "feats (rank 3" in msg and "feats_length (rank 1" in msg
    assert "mel (rank 3" in msg and "mel_len (rank 1" in msg
    # the wrong model for the wrapper
    with pytest.raises(ConfigError, match="campplus.onnx.*expected inputs.*feats.*found.*input"):
        SpeechTokenizerONNX(standins["campplus"])
    with pytest.raises(ConfigError, match="speech_tokenizer_v3.onnx.*CAM\\+\\+"):
        CampPlusONNX(standins["speech_tokenizer"])
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="cannot load.*junk.onnx"):
        CampPlusONNX(tmp_path / "junk.onnx")
