"""Audio front end of CosyVoice3: prompt mel, whisper log-mel, Kaldi fbank, resampling, prompt
loading and the two ONNX sub-models (speech tokenizer, CAM++ speaker encoder).

Written in numpy/torch without librosa or torchaudio. What each function reproduces:

* :func:`slaney_mel_filters` -- ``librosa.filters.mel`` (Slaney mel scale, ``norm='slaney'``, float32).
* :func:`prompt_mel` -- matcha-tts ``mel_spectrogram`` (the yaml's ``feat_extractor``; 24 kHz,
  n_fft 1920, hop 480, 80 bins, ``center=False``), giving ``[1, 80, frames]``.
* :func:`whisper_log_mel` -- OpenAI whisper ``log_mel_spectrogram(audio, n_mels=128)``, the input
  of ``speech_tokenizer_v3.onnx``.
* :func:`kaldi_fbank` -- ``torchaudio.compliance.kaldi.fbank(wav, num_mel_bins=80, dither=0,
  sample_frequency=16000)``; :func:`campplus_features` adds upstream's per-utterance mean
  subtraction, the input of ``campplus.onnx``.
* :func:`resample` -- ``scipy.signal.resample_poly`` (``method="poly"``) or a reimplementation of
  ``torchaudio.transforms.Resample`` defaults (``method="sinc_hann"``), which is what upstream's
  ``load_wav`` uses.

Upstream (``cosyvoice/cli/frontend.py``) feeds all three extractors the waveform as float in
[-1, 1] (``torchaudio.load`` normalisation; no ``* 32768`` before the Kaldi fbank).

Numerics: every step is upstream's op in float32, in upstream's order, except the FFT and the
magnitude/power right after it, which run in float64 by default (``fft_dtype``) and are rounded to
float32 once. Different float32 FFT libraries (MKL builds, pocketfft, cuFFT) round differently, which
moves low-energy log-mel bins by ~1e-5; an exact FFT leaves only the reference's own rounding in the
difference (prompt mel vs the upstream fixture: 7.2e-6 max abs with float64, 1.2e-5 with this
machine's float32 MKL FFT). Pass ``fft_dtype=torch.float32`` for upstream's exact op sequence.
"""
from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError
from ..wav import read_wav

__all__ = [
    "slaney_mel_filters",
    "prompt_mel",
    "whisper_log_mel",
    "kaldi_mel_banks",
    "kaldi_fbank",
    "campplus_features",
    "resample",
    "load_prompt_wav",
    "SpeechTokenizerONNX",
    "CampPlusONNX",
    "make_standin_onnx_models",
    "MIN_PROMPT_SAMPLE_RATE",
    "MAX_TOKENIZER_SECONDS",
]

log = logging.getLogger(__name__)

ArrayLike = Union[torch.Tensor, np.ndarray]

#: upstream's ``load_wav`` refuses to resample audio below this rate
MIN_PROMPT_SAMPLE_RATE = 16000
#: upstream's ``_extract_speech_token`` refuses audio longer than this
MAX_TOKENIZER_SECONDS = 30
#: whisper frames (100 Hz) in 30 s
_MAX_TOKENIZER_FRAMES = MAX_TOKENIZER_SECONDS * 100


# --------------------------------------------------------------------------- helpers

def _fft_dtype(requested: torch.dtype, device: torch.device) -> torch.dtype:
    """float64 FFTs where the device has them (not MPS), else float32."""
    if requested == torch.float64 and device.type == "mps":
        return torch.float32
    return requested


def _as_mono_tensor(wav: ArrayLike, what: str) -> torch.Tensor:
    """[N] or [1, N] tensor/array -> float32 tensor [1, N]."""
    x = torch.as_tensor(wav) if not isinstance(wav, torch.Tensor) else wav
    if not x.is_floating_point():
        raise InputError(f"{what}: expected a float waveform in [-1, 1], got dtype {x.dtype}")
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2 or x.shape[0] != 1:
        raise InputError(f"{what}: expected a mono waveform of shape [N] or [1, N], got {list(x.shape)}")
    return x.to(torch.float32)


# --------------------------------------------------------------------------- Slaney mel filters

_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def _hz_to_mel_slaney(freqs: np.ndarray) -> np.ndarray:
    f = np.asarray(freqs, dtype=np.float64)
    mels = np.atleast_1d(f / _F_SP).astype(np.float64)
    f1 = np.atleast_1d(f)
    log_t = f1 >= _MIN_LOG_HZ
    mels[log_t] = _MIN_LOG_MEL + np.log(f1[log_t] / _MIN_LOG_HZ) / _LOGSTEP
    return mels


def _mel_to_hz_slaney(mels: np.ndarray) -> np.ndarray:
    m = np.asarray(mels, dtype=np.float64)
    freqs = _F_SP * m
    log_t = m >= _MIN_LOG_MEL
    freqs[log_t] = _MIN_LOG_HZ * np.exp(_LOGSTEP * (m[log_t] - _MIN_LOG_MEL))
    return freqs


def slaney_mel_filters(sr: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                       fmax: Optional[float] = None) -> np.ndarray:
    """Slaney-style mel filterbank [n_mels, n_fft//2+1], float32, as ``librosa.filters.mel``
    with its defaults (``htk=False``, ``norm='slaney'``, ``dtype=float32``)."""
    if fmax is None:
        fmax = float(sr) / 2
    n_mels = int(n_mels)
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    min_mel = _hz_to_mel_slaney(fmin)[0]
    max_mel = _hz_to_mel_slaney(fmax)[0]
    mel_f = _mel_to_hz_slaney(np.linspace(min_mel, max_mel, n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    weights = np.zeros((n_mels, int(1 + n_fft // 2)), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))  # rounded to float32 here, as librosa
    enorm = 2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels])
    weights *= enorm[:, np.newaxis]  # float64 multiply, float32 store (numpy in-place semantics)
    if not np.all((mel_f[:-2] == 0) | (weights.max(axis=1) > 0)):
        log.warning("slaney_mel_filters(sr=%s, n_fft=%s, n_mels=%s): some mel bins are empty; "
                    "use fewer mels or a larger n_fft", sr, n_fft, n_mels)
    return weights


# --------------------------------------------------------------------------- prompt mel (matcha)

@functools.lru_cache(maxsize=32)
def _mel_basis_and_window(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: Optional[float],
                          win_size: int, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    basis = torch.from_numpy(slaney_mel_filters(sr, n_fft, n_mels, fmin, fmax)).float().to(device)
    window = torch.hann_window(win_size).to(device)
    return basis, window


def prompt_mel(wav: ArrayLike, n_fft: int = 1920, num_mels: int = 80, sampling_rate: int = 24000,
               hop_size: int = 480, win_size: int = 1920, fmin: float = 0, fmax: Optional[float] = None,
               center: bool = False, fft_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Prompt mel of a 24 kHz waveform ([N] or [1, N], float in [-1, 1]) -> [1, num_mels, frames],
    as matcha-tts ``mel_spectrogram`` (CosyVoice3's ``feat_extractor``).

    Upstream uses ``feat.squeeze(0).transpose(0, 1)[None]`` ([1, frames, 80]) as ``prompt_feat``.
    Every step is upstream's float32 op except the STFT magnitude, computed in ``fft_dtype`` (float64 by
    default: see the module notes) and rounded to float32 once.
    """
    y = _as_mono_tensor(wav, "prompt_mel")
    pad = int((n_fft - hop_size) / 2)
    if y.shape[-1] <= pad:
        raise InputError(f"prompt_mel: the waveform has {y.shape[-1]} samples; at least {pad + 1} "
                         f"({(pad + 1) / sampling_rate * 1000:.0f} ms at {sampling_rate} Hz) are needed")
    basis, window = _mel_basis_and_window(int(sampling_rate), int(n_fft), int(num_mels), fmin, fmax,
                                          int(win_size), str(y.device))
    y = F.pad(y.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    dt = _fft_dtype(fft_dtype, y.device)
    spec = torch.view_as_real(torch.stft(y.to(dt), n_fft, hop_length=hop_size, win_length=win_size,
                                         window=window.to(dt), center=center, pad_mode="reflect", normalized=False,
                                         onesided=True, return_complex=True))
    spec = torch.sqrt(spec.pow(2).sum(-1) + 1e-9).to(torch.float32)
    spec = torch.matmul(basis, spec)
    return torch.log(torch.clamp(spec, min=1e-5) * 1)


# --------------------------------------------------------------------------- whisper log-mel

_WHISPER_N_FFT = 400
_WHISPER_HOP = 160


@functools.lru_cache(maxsize=8)
def _whisper_filters_and_window(n_mels: int, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    filters = torch.from_numpy(slaney_mel_filters(16000, _WHISPER_N_FFT, n_mels)).to(device)
    window = torch.hann_window(_WHISPER_N_FFT).to(device)
    return filters, window


def whisper_log_mel(wav16k: ArrayLike, n_mels: int = 128, fft_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Whisper log-mel of a 16 kHz waveform ([N] or [1, N]) -> [1, n_mels, N // 160], as
    ``whisper.log_mel_spectrogram(audio, n_mels)`` (the speech tokenizer's input); the power spectrum
    is computed in ``fft_dtype`` and rounded to float32 once."""
    audio = _as_mono_tensor(wav16k, "whisper_log_mel")
    half = _WHISPER_N_FFT // 2
    if audio.shape[-1] <= half:
        raise InputError(f"whisper_log_mel: the waveform has {audio.shape[-1]} samples; at least {half + 1} "
                         "are needed at 16 kHz")
    filters, window = _whisper_filters_and_window(int(n_mels), str(audio.device))
    dt = _fft_dtype(fft_dtype, audio.device)
    stft = torch.stft(audio.to(dt), _WHISPER_N_FFT, _WHISPER_HOP, window=window.to(dt), return_complex=True)
    magnitudes = (stft[..., :-1].abs() ** 2).to(torch.float32)
    mel_spec = filters @ magnitudes
    log_spec = torch.clamp(mel_spec, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


# --------------------------------------------------------------------------- Kaldi fbank

_KALDI_EPS = torch.finfo(torch.float32).eps  # 1.1920928955078125e-07


def _kaldi_mel(freq: torch.Tensor) -> torch.Tensor:
    return 1127.0 * (1.0 + freq / 700.0).log()


@functools.lru_cache(maxsize=8)
def kaldi_mel_banks(num_bins: int, padded_window_size: int, sample_freq: float, low_freq: float = 20.0,
                    high_freq: float = 0.0) -> torch.Tensor:
    """Kaldi triangular mel banks [num_bins, padded_window_size // 2] (float32, no VTLN warp), as
    ``torchaudio.compliance.kaldi.get_mel_banks``; ``high_freq <= 0`` is an offset from Nyquist."""
    num_fft_bins = padded_window_size / 2
    nyquist = 0.5 * sample_freq
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ConfigError(f"kaldi mel banks: bad low_freq {low_freq} / high_freq {high_freq} for Nyquist {nyquist}")
    fft_bin_width = sample_freq / padded_window_size
    mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)
    mel_high = 1127.0 * math.log(1.0 + high_freq / 700.0)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins).unsqueeze(1)
    left = mel_low + b * delta
    center = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    mel = _kaldi_mel(fft_bin_width * torch.arange(num_fft_bins)).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    return torch.max(torch.zeros(1), torch.min(up, down))


@functools.lru_cache(maxsize=8)
def _povey_window(size: int) -> torch.Tensor:
    return torch.hann_window(size, periodic=False, dtype=torch.float32).pow(0.85)


def kaldi_fbank(wav16k: ArrayLike, num_mel_bins: int = 80, sample_frequency: float = 16000.0,
                fft_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Kaldi log mel filterbank of a waveform ([N] or [1, N], float in [-1, 1]) -> [frames, num_mel_bins]
    with ``frames = 1 + (N - 400) // 160``, as ``torchaudio.compliance.kaldi.fbank(wav,
    num_mel_bins=num_mel_bins, dither=0, sample_frequency=16000)`` (25 ms povey frames every 10 ms,
    snip_edges, per-frame DC removal, pre-emphasis 0.97, 512-point power spectrum, log floor = float eps);
    the power spectrum is computed in ``fft_dtype`` and rounded to float32 once."""
    x = _as_mono_tensor(wav16k, "kaldi_fbank")[0]
    shift = int(sample_frequency * 10.0 * 0.001)
    size = int(sample_frequency * 25.0 * 0.001)
    padded = 1 if size == 0 else 2 ** (size - 1).bit_length()
    if x.shape[0] < size:
        raise InputError(f"kaldi_fbank: the waveform has {x.shape[0]} samples; one 25 ms frame needs {size}")
    frames = x.unfold(0, size, shift)  # (m, size), same strides as kaldi's as_strided view
    frames = frames - torch.mean(frames, dim=1).unsqueeze(1)
    prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)  # replicate-pad shift
    frames = frames - 0.97 * prev
    frames = frames * _povey_window(size).to(frames.device).unsqueeze(0)
    frames = F.pad(frames, (0, padded - size), mode="constant", value=0.0)
    spectrum = torch.fft.rfft(frames.to(_fft_dtype(fft_dtype, frames.device))).abs().pow(2.0).to(torch.float32)
    banks = kaldi_mel_banks(int(num_mel_bins), padded, float(sample_frequency)).to(frames.device)
    banks = F.pad(banks, (0, 1), mode="constant", value=0.0)
    mel = torch.mm(spectrum, banks.T)
    return torch.max(mel, torch.tensor(_KALDI_EPS, dtype=torch.float32, device=mel.device)).log()


def campplus_features(wav16k: ArrayLike, num_mel_bins: int = 80) -> torch.Tensor:
    """CAM++ input: Kaldi fbank minus its per-utterance mean -> [1, frames, num_mel_bins]."""
    feat = kaldi_fbank(wav16k, num_mel_bins=num_mel_bins)
    feat = feat - feat.mean(dim=0, keepdim=True)
    return feat.unsqueeze(0)


# --------------------------------------------------------------------------- resampling

@functools.lru_cache(maxsize=16)
def _sinc_hann_kernel(orig: int, new: int, lowpass_filter_width: int = 6,
                      rolloff: float = 0.99) -> Tuple[torch.Tensor, int]:
    """torchaudio's sinc/Hann resampling kernel [new, 1, 2*width+orig] (float64 math, float32 out)."""
    base_freq = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base_freq)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    # torchaudio builds this term from an int64 arange divided in float32, then promotes to float64
    t = torch.arange(0, -new, -1)[:, None, None] / new + idx
    t *= base_freq
    t = t.clamp_(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t *= math.pi
    scale = base_freq / orig
    kernels = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t)
    kernels *= window * scale
    return kernels.to(torch.float32), width


def _resample_sinc_hann(x: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    kernel, width = _sinc_hann_kernel(orig, new)
    n = x.shape[-1]
    y = F.pad(x, (width, width + orig))
    y = F.conv1d(y[:, None], kernel.to(x.device), stride=orig)
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    return y[..., : int(math.ceil(new * n / orig))]


def resample(wav: ArrayLike, orig_sr: int, target_sr: int, method: str = "poly") -> ArrayLike:
    """Resample a waveform ([N] or [C, N], numpy or torch; returns the same kind) from ``orig_sr`` to
    ``target_sr``; identity when they are equal.

    ``method="poly"``: ``scipy.signal.resample_poly`` with the gcd-reduced up/down factors.
    ``method="sinc_hann"``: ``torchaudio.transforms.Resample(orig_sr, target_sr)`` defaults (Hann-windowed
    sinc, 6 zero crossings, rolloff 0.99) -- what upstream's ``load_wav`` does.
    Both give ``ceil(N * target_sr / orig_sr)`` samples.
    """
    orig_sr, target_sr = int(orig_sr), int(target_sr)
    if orig_sr <= 0 or target_sr <= 0:
        raise InputError(f"resample: sample rates must be positive, got {orig_sr} -> {target_sr}")
    if orig_sr == target_sr:
        return wav
    g = math.gcd(orig_sr, target_sr)
    up, down = target_sr // g, orig_sr // g
    is_torch = isinstance(wav, torch.Tensor)
    if method == "poly":
        from scipy.signal import resample_poly
        arr = wav.detach().cpu().numpy() if is_torch else np.asarray(wav)
        out = resample_poly(arr.astype(np.float64), up, down, axis=-1).astype(np.float32)
        return torch.from_numpy(out).to(wav.device) if is_torch else out
    if method == "sinc_hann":
        x = wav if is_torch else torch.from_numpy(np.asarray(wav, dtype=np.float32))
        shape = x.shape
        y = _resample_sinc_hann(x.reshape(-1, shape[-1]).to(torch.float32), down, up)
        y = y.reshape(shape[:-1] + y.shape[-1:])
        return y if is_torch else y.numpy()
    raise InputError(f"resample: unknown method {method!r}; use 'poly' or 'sinc_hann'")


# --------------------------------------------------------------------------- prompt loading

def load_prompt_wav(path: Union[str, Path], target_sr: int, max_seconds: Optional[float] = MAX_TOKENIZER_SECONDS,
                    min_seconds: float = 0.1, resample_method: str = "sinc_hann") -> torch.Tensor:
    """Read a prompt WAV (channels averaged) and resample it to ``target_sr`` -> float32 [1, N].

    Refuses (InputError): sample rates below 16 kHz, empty or silent audio, audio shorter than
    ``min_seconds`` and longer than ``max_seconds`` (upstream's speech tokenizer takes at most 30 s;
    ``None`` disables the check). ``resample_method`` is passed to :func:`resample`; the default
    matches upstream's torchaudio resampler.
    """
    audio, sr = read_wav(path)
    n = int(audio.shape[0])
    if n == 0:
        raise InputError(f"prompt audio {path} is empty (0 samples); give a 3-10 s recording of the prompt speaker")
    if sr < MIN_PROMPT_SAMPLE_RATE:
        raise InputError(f"prompt audio {path} is {sr} Hz; CosyVoice3 needs at least {MIN_PROMPT_SAMPLE_RATE // 1000} "
                         "kHz (16 kHz or more, 24 kHz preferred). Use a better recording; upsampling does not "
                         "restore the missing band.")
    if not np.all(np.isfinite(audio)):
        raise InputError(f"prompt audio {path} contains NaN or Inf samples")
    seconds = n / sr
    if max_seconds is not None and seconds > max_seconds:
        raise InputError(f"prompt audio {path} is {seconds:.2f} s long; CosyVoice3's speech tokenizer accepts at "
                         f"most {max_seconds:g} s (upstream refuses longer prompts). Cut a 3-10 s clip, e.g. "
                         f"`sox in.wav out.wav trim 0 10`.")
    if seconds < min_seconds:
        raise InputError(f"prompt audio {path} is {seconds * 1000:.0f} ms long; at least {min_seconds:g} s is "
                         "needed (3-10 s works best)")
    peak = float(np.max(np.abs(audio)))
    if peak <= 1e-4:
        raise InputError(f"prompt audio {path} is silent (peak {peak:.1e}); give a recording of the prompt speaker")
    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)).unsqueeze(0)
    return resample(x, sr, target_sr, method=resample_method)


# --------------------------------------------------------------------------- ONNX sub-models

_IOSpec = Tuple[Optional[str], int, str]  # (name or None = any, rank, onnxruntime type string)


def _select_providers(providers: Optional[Sequence[str]]) -> List[str]:
    import onnxruntime as ort
    if not providers:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    available = set(ort.get_available_providers())
    chosen = [p for p in providers if p in available]
    missing = [p for p in providers if p not in available]
    if missing:
        log.warning("onnxruntime providers %s are not available here (have %s); using %s", missing,
                    sorted(available), chosen + ["CPUExecutionProvider"] if "CPUExecutionProvider" not in chosen
                    else chosen)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def _describe(specs) -> str:
    return ", ".join(f"{n if n is not None else '<any name>'} (rank {r}, {t})" for n, r, t in specs)


def _open_session(path: Union[str, Path], what: str, expected: Sequence[_IOSpec],
                  providers: Optional[Sequence[str]]):
    """Create an onnxruntime session (upstream's options) and check its inputs against ``expected``."""
    import onnxruntime as ort
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} model not found: {path} (a CosyVoice3 model dir has it next to cosyvoice3.yaml)")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=_select_providers(providers))
    except Exception as e:  # onnxruntime raises its own exception types
        raise ConfigError(f"cannot load {what} model {path}: {e}") from None
    actual = [(i.name, len(i.shape) if i.shape is not None else -1, i.type) for i in sess.get_inputs()]
    ok = len(actual) == len(expected) and all(
        (en is None or en == an) and er == ar and et == at for (en, er, et), (an, ar, at) in zip(expected, actual))
    if not ok:
        raise ConfigError(f"{path} does not look like a CosyVoice3 {what}: expected inputs [{_describe(expected)}], "
                          f"found [{_describe(actual)}]")
    return sess


class SpeechTokenizerONNX:
    """``speech_tokenizer_v3.onnx``: whisper log-mel [1, 128, T] (100 Hz) -> speech tokens [1, Ns] (25 Hz)."""

    INPUTS: Tuple[_IOSpec, ...] = (("feats", 3, "tensor(float)"), ("feats_length", 1, "tensor(int32)"))

    def __init__(self, path: Union[str, Path], providers: Optional[Sequence[str]] = None) -> None:
        self.path = Path(path)
        self.session = _open_session(self.path, "speech tokenizer", self.INPUTS, providers)
        self._names = [i.name for i in self.session.get_inputs()]

    def __call__(self, feats: ArrayLike) -> torch.Tensor:
        """Tokens (LongTensor [1, Ns]) of a whisper log-mel [1, 128, T] (T <= 3000, i.e. <= 30 s)."""
        x = feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
        if x.ndim != 3 or x.shape[0] != 1 or x.shape[1] != 128 or x.shape[2] == 0:
            raise InputError(f"speech tokenizer {self.path}: expected feats of shape [1, 128, T>0], "
                             f"got {list(x.shape)}")
        if x.shape[2] > _MAX_TOKENIZER_FRAMES:
            raise InputError(f"speech tokenizer: {x.shape[2] / 100:.2f} s of audio; CosyVoice3's speech tokenizer "
                             f"accepts at most {MAX_TOKENIZER_SECONDS} s (upstream refuses longer prompts). Use a "
                             "shorter prompt (3-10 s).")
        out = self.session.run(None, {self._names[0]: np.ascontiguousarray(x, dtype=np.float32),
                                      self._names[1]: np.array([x.shape[2]], dtype=np.int32)})[0]
        return torch.from_numpy(np.asarray(out).reshape(1, -1).astype(np.int64))

    def tokenize(self, wav16k: ArrayLike) -> torch.Tensor:
        """Tokens [1, Ns] of a 16 kHz waveform (whisper log-mel, then the model)."""
        return self(whisper_log_mel(wav16k, n_mels=128))


class CampPlusONNX:
    """``campplus.onnx`` (CAM++ speaker encoder): mean-normalised fbank [1, T, 80] -> embedding [1, 192].

    Upstream feeds it by position, so the input's name is not checked, only its rank and type.
    """

    INPUTS: Tuple[_IOSpec, ...] = ((None, 3, "tensor(float)"),)

    def __init__(self, path: Union[str, Path], providers: Optional[Sequence[str]] = None) -> None:
        self.path = Path(path)
        self.session = _open_session(self.path, "CAM++ speaker encoder", self.INPUTS, providers)
        self._name = self.session.get_inputs()[0].name

    def __call__(self, fbank: ArrayLike) -> torch.Tensor:
        """Embedding (float32 [1, D], D = 192 for the real model) of features [1, T, 80]."""
        x = fbank.detach().cpu().numpy() if isinstance(fbank, torch.Tensor) else np.asarray(fbank)
        if x.ndim != 3 or x.shape[0] != 1 or x.shape[2] != 80 or x.shape[1] == 0:
            raise InputError(f"CAM++ {self.path}: expected fbank of shape [1, T>0, 80], got {list(x.shape)}")
        out = self.session.run(None, {self._name: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(1, -1))

    def embed(self, wav16k: ArrayLike) -> torch.Tensor:
        """Speaker embedding [1, D] of a 16 kHz waveform (fbank, mean subtraction, then the model)."""
        return self(campplus_features(wav16k))


def make_standin_onnx_models(out_dir: Union[str, Path], seed: int = 0) -> Dict[str, Path]:
    """Write small *stand-in* ``speech_tokenizer_v3.onnx`` and ``campplus.onnx`` to ``out_dir``.

    They are not the real models (those cannot be downloaded here) but keep their IO contract:
    the tokenizer takes ``feats`` float [1, 128, T] and ``feats_length`` int32 [1] and returns
    ``indices`` int64 [1, ceil(T/4)] in [0, 6561) (mel minus its time mean, 4-frame average pool, random
    projection, argmax); CAM++ takes ``input`` float [B, T, 80] and returns ``output`` float [B, 192] (time mean,
    random projection). Returns ``{"speech_tokenizer": path, "campplus": path}``.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def save(graph, name: str) -> Path:
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                  producer_name="cosytools-standin")
        model.ir_version = 8
        model.doc_string = "cosytools stand-in with the real model's IO contract; random weights, not the real model"
        onnx.checker.check_model(model)
        path = out / name
        onnx.save(model, str(path))
        return path

    w_tok = (rng.standard_normal((128, 6561)) / np.sqrt(128)).astype(np.float32)
    tok_graph = helper.make_graph(
        [
            helper.make_node("Cast", ["feats_length"], ["len64"], to=TensorProto.INT64),
            helper.make_node("Slice", ["feats", "zero", "len64", "time_axis"], ["valid"]),
            helper.make_node("ReduceMean", ["valid"], ["utt_mean"], axes=[2], keepdims=1),
            helper.make_node("Sub", ["valid", "utt_mean"], ["centred"]),
            helper.make_node("AveragePool", ["centred"], ["pooled"], kernel_shape=[4], strides=[4], ceil_mode=1),
            helper.make_node("Transpose", ["pooled"], ["frames"], perm=[0, 2, 1]),
            helper.make_node("MatMul", ["frames", "w"], ["logits"]),
            helper.make_node("ArgMax", ["logits"], ["indices"], axis=2, keepdims=0),
        ],
        "speech_tokenizer_standin",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, 128, "T"]),
         helper.make_tensor_value_info("feats_length", TensorProto.INT32, [1])],
        [helper.make_tensor_value_info("indices", TensorProto.INT64, [1, "Ns"])],
        initializer=[numpy_helper.from_array(np.array([0], np.int64), "zero"),
                     numpy_helper.from_array(np.array([2], np.int64), "time_axis"),
                     numpy_helper.from_array(w_tok, "w")],
    )
    w_spk = (rng.standard_normal((80, 192)) / np.sqrt(80)).astype(np.float32)
    b_spk = (0.1 * rng.standard_normal(192)).astype(np.float32)
    spk_graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["pooled"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["pooled", "w"], ["proj"]),
            helper.make_node("Add", ["proj", "b"], ["output"]),
        ],
        "campplus_standin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", "T", 80])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", 192])],
        initializer=[numpy_helper.from_array(w_spk, "w"), numpy_helper.from_array(b_spk, "b")],
    )
    return {"speech_tokenizer": save(tok_graph, "speech_tokenizer_v3.onnx"),
            "campplus": save(spk_graph, "campplus.onnx")}
