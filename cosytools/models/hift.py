"""CosyVoice3 HiFT vocoder (``CausalHiFTGenerator``) as plain torch modules.

mel [B, 80, T] -> causal F0 predictor (float64) -> harmonic NSF source (SineGen2 with
fixed uniform noise tables) -> STFT of the source -> causal conv upsampling with Snake
resblocks and source fusion -> conv_post -> magnitude/phase -> iSTFT -> waveform.

Module and attribute names follow the upstream checkpoint keys one to one, so an
upstream ``hift.pt`` loads with ``strict=True``.  Weight-normed convolutions use
``torch.nn.utils.parametrizations.weight_norm`` exactly where upstream does (keys
``...parametrizations.weight.original0/1``); ``source_downs`` are plain convolutions,
as upstream.

Numerical policy (float32 runs reproduce upstream to round-off):

* the F0 predictor always runs in float64 (upstream: its precision is crucial for
  causal inference); the generator keeps it in float64 even when the rest of the
  model is cast to bf16/fp16, and ``state_dict()`` reports its entries in the
  generator's dtype (float32 normally, the dtype of upstream checkpoints);
* the NSF source, the STFT of the source and the final iSTFT run in float32; only the
  convolution stack runs in the module dtype;
* device independence: the float32 CPU reference is reproduced on CUDA too (with TF32
  off): the F0 predictor's weight norm is evaluated exactly in float64, the per-sample
  phase increment divides by a tensor and the phase sum uses a float64 accumulator
  (CPU semantics); otherwise CUDA differs in the last ulp there and the long phase sum
  amplifies it into ~1e-2 waveform differences.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from cosytools.errors import ConfigError, InputError
from cosytools.taps import tap

__all__ = [
    "Snake",
    "CausalConv1d",
    "CausalConv1dDownSample",
    "CausalConv1dUpsample",
    "ResBlock",
    "SineGen2",
    "SourceModuleHnNSF",
    "CausalHiFTGenerator",
    "DefaultSourceNoise",
    "NOISE_TABLE_SAMPLES",
    "stft_window",
    "istft_overlap_add",
]

#: Length of upstream's fixed source-noise tables: 300 s at 24 kHz (whatever the sampling rate).
NOISE_TABLE_SAMPLES = 300 * 24000


def _get_padding(kernel_size: int, dilation: int = 1) -> int:
    return int((kernel_size * dilation - dilation) / 2)


def stft_window(n_fft: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Periodic Hann window in float32 (equal to scipy ``get_window('hann', n, fftbins=True)``)."""
    return torch.hann_window(n_fft, periodic=True, dtype=torch.float64, device=device).to(torch.float32)


def istft_overlap_add(real: torch.Tensor, imag: torch.Tensor, n_fft: int, hop: int,
                      window: torch.Tensor) -> torch.Tensor:
    """``torch.istft(torch.complex(real, imag), n_fft, hop, n_fft, window, center=True)`` written
    out (inverse real FFT, windowed overlap-add, division by the summed squared window, centre
    trim) for [B, n_fft/2+1, frames] -> [B, hop·(frames-1)].  Same arithmetic up to round-off,
    but without ``torch.istft``'s window-envelope check, a host sync that CUDA graph capture
    forbids (the envelope of a periodic Hann window with hop <= n_fft/2 is never zero)."""
    frames = torch.fft.irfft(torch.complex(real, imag), n=n_fft, dim=1) * window.view(1, -1, 1)
    count = frames.shape[2]
    total = n_fft + hop * (count - 1)
    y = F.fold(frames, output_size=(1, total), kernel_size=(1, n_fft), stride=(1, hop))
    env = F.fold((window * window).view(1, -1, 1).expand(1, n_fft, count), output_size=(1, total),
                 kernel_size=(1, n_fft), stride=(1, hop))
    start = n_fft // 2
    return (y[:, 0, 0, start:total - start] / env[:, 0, 0, start:total - start])


# ---------------------------------------------------------------------------------------
# activations and causal convolutions
# ---------------------------------------------------------------------------------------

class Snake(nn.Module):
    """Snake activation ``x + sin(alpha * x)^2 / (alpha + 1e-9)`` with one alpha per channel."""

    def __init__(self, in_features: int, alpha: float = 1.0, alpha_trainable: bool = True,
                 alpha_logscale: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.alpha_logscale = alpha_logscale
        init = 0.0 if alpha_logscale else alpha
        self.alpha = nn.Parameter(torch.full((in_features,), float(init)), requires_grad=alpha_trainable)
        self.no_div_by_zero = 1e-9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha[None, :, None]
        if self.alpha_logscale:
            a = torch.exp(a)
        return x + (1.0 / (a + self.no_div_by_zero)) * torch.sin(x * a).pow(2)


class CausalConv1d(nn.Conv1d):
    """Stride-1 Conv1d padded on one side only.

    ``causal_type='left'`` pads the past (a causal conv); ``'right'`` pads the future
    (a look-ahead conv).  ``cache`` replaces the zero padding with real context frames
    (``causal_padding`` of them), which is how streaming calls supply look-ahead.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 causal_type: str = "left", device=None, dtype=None) -> None:
        if stride != 1:
            raise ValueError(f"CausalConv1d supports stride 1 only, got {stride}")
        if causal_type not in ("left", "right"):
            raise ValueError(f"causal_type must be 'left' or 'right', got {causal_type!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride=1, padding=0,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        # same formula as upstream: (k-1)*d for odd k, one extra frame for even k
        self.causal_padding = int((kernel_size * dilation - dilation) / 2) * 2 + (kernel_size + 1) % 2
        self.causal_type = causal_type

    def causal_pad(self, x: torch.Tensor, cache: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` with its one-sided context: zeros, or ``cache`` when given."""
        p = self.causal_padding
        if cache is None or cache.shape[2] == 0:
            return F.pad(x, (p, 0) if self.causal_type == "left" else (0, p))
        if cache.shape[2] != p:
            raise ValueError(f"cache has {cache.shape[2]} frames, expected {p}")
        return torch.cat([cache, x] if self.causal_type == "left" else [x, cache], dim=2)

    def forward(self, x: torch.Tensor, cache: Optional[torch.Tensor] = None) -> torch.Tensor:
        return super().forward(self.causal_pad(x, cache))


class CausalConv1dDownSample(nn.Conv1d):
    """Strided Conv1d with ``stride - 1`` frames of left (past) zero padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None) -> None:
        if stride == 1 or dilation != 1 or kernel_size % stride != 0:
            raise ValueError("CausalConv1dDownSample needs stride > 1, dilation 1 and kernel_size % stride == 0")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, dilation=dilation,
                         groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        self.causal_padding = stride - 1

    def forward(self, x: torch.Tensor, cache: Optional[torch.Tensor] = None) -> torch.Tensor:
        if cache is None or cache.shape[2] == 0:
            x = F.pad(x, (self.causal_padding, 0))
        else:
            x = torch.cat([cache, x], dim=2)
        return super().forward(x)


class CausalConv1dUpsample(nn.Conv1d):
    """Nearest upsampling by ``stride`` followed by a causal (left-padded) stride-1 Conv1d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None) -> None:
        if dilation != 1:
            raise ValueError("CausalConv1dUpsample supports dilation 1 only")
        super().__init__(in_channels, out_channels, kernel_size, 1, padding=0, dilation=dilation,
                         groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        self.causal_padding = kernel_size - 1
        # F.interpolate with a float scale (not repeat_interleave) so indices round as upstream's
        self.upsample = nn.Upsample(scale_factor=stride, mode="nearest")

    def forward(self, x: torch.Tensor, cache: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.upsample(x)
        if cache is None or cache.shape[2] == 0:
            x = F.pad(x, (self.causal_padding, 0))
        else:
            x = torch.cat([cache, x], dim=2)
        return super().forward(x)


class ResBlock(nn.Module):
    """HiFi-GAN/BigVGAN residual block: per dilation, Snake -> conv(d) -> Snake -> conv(1) + skip."""

    def __init__(self, channels: int = 512, kernel_size: int = 3, dilations: Sequence[int] = (1, 3, 5),
                 causal: bool = False) -> None:
        super().__init__()
        self.causal = causal

        def conv(dilation: int) -> nn.Module:
            if causal:
                layer = CausalConv1d(channels, channels, kernel_size, 1, dilation=dilation, causal_type="left")
            else:
                layer = nn.Conv1d(channels, channels, kernel_size, 1, dilation=dilation,
                                  padding=_get_padding(kernel_size, dilation))
            return weight_norm(layer)

        self.convs1 = nn.ModuleList([conv(d) for d in dilations])
        self.convs2 = nn.ModuleList([conv(1) for _ in dilations])
        self.activations1 = nn.ModuleList([Snake(channels, alpha_logscale=False) for _ in dilations])
        self.activations2 = nn.ModuleList([Snake(channels, alpha_logscale=False) for _ in dilations])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = c2(a2(c1(a1(x)))) + x
        return x


# ---------------------------------------------------------------------------------------
# neural source filter
# ---------------------------------------------------------------------------------------

class DefaultSourceNoise:
    """Deterministic default for upstream's fixed source-noise tables.

    Upstream draws ``rand_ini`` [1, 9] (column 0 zeroed), ``sine_waves`` [1, 7200000, 9]
    and ``uv`` [1, 7200000, 1] (uniform [0, 1)) from the global RNG when the module is
    built (~290 MB), so its values depend on whatever ran before and cannot be
    reproduced.  DEVIATION: here the tables come from fixed seeds and are made lazily,
    in blocks of ``block`` samples (block ``b`` of the sine table is drawn with
    ``torch.Generator().manual_seed(SINE_SEED + b)``, of the uv table with
    ``UV_SEED + b``), so the default for N samples is always a prefix of the default
    for more samples, nothing large is allocated at construction, and one model always
    gives the same audio.  To replay an upstream call exactly, pass its noise slices
    (``hift.in.noise.*`` of a dump) instead.
    """

    SINE_SEED = 1_000_000
    UV_SEED = 2_000_000
    RAND_INI_SEED = 3_000_000

    def __init__(self, dim: int = 9, max_samples: int = NOISE_TABLE_SAMPLES, block: int = 24000) -> None:
        self.dim = dim
        self.max_samples = max_samples
        self.block = block
        self._cache: Dict[str, torch.Tensor] = {}

    def _rand_ini(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.RAND_INI_SEED)
        r = torch.rand(1, self.dim, generator=g)
        r[:, 0] = 0  # no initial phase offset for the fundamental, as upstream
        return r

    def _blocks(self, seed: int, width: int, start: int, stop: int) -> torch.Tensor:
        parts = [torch.rand(self.block, width, generator=torch.Generator().manual_seed(seed + b))
                 for b in range(start, stop)]
        return torch.cat(parts, dim=0)[None]

    def get(self, num_samples: int, device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
        """``{'rand_ini': [1,dim], 'sine': [1,N,dim], 'uv': [1,N,1]}`` float32 for N = ``num_samples``."""
        if num_samples > self.max_samples:
            raise InputError(
                f"HiFT input too long: {num_samples} samples ({num_samples / 24000:.1f} s at 24 kHz) exceed "
                f"the {self.max_samples} samples ({self.max_samples / 24000:.0f} s) covered by the fixed "
                f"source-noise tables (upstream's limit); split the mel into shorter calls")
        device = torch.empty(0, device=device).device  # normalise, e.g. "cuda" -> cuda:0
        with torch.inference_mode(False):
            cache = self._cache
            if not cache or cache["rand_ini"].device != device:
                cache = {"rand_ini": self._rand_ini().to(device),
                         "sine": torch.zeros(1, 0, self.dim, device=device),
                         "uv": torch.zeros(1, 0, 1, device=device)}
            have = cache["sine"].shape[1] // self.block
            need = -(-num_samples // self.block)
            if need > have:
                # grow at least geometrically so streaming calls of growing length stay cheap
                max_blocks = -(-self.max_samples // self.block)
                stop = min(max(need, 2 * have), max_blocks)
                cache["sine"] = torch.cat(
                    [cache["sine"], self._blocks(self.SINE_SEED, self.dim, have, stop).to(device)], dim=1)
                cache["uv"] = torch.cat(
                    [cache["uv"], self._blocks(self.UV_SEED, 1, have, stop).to(device)], dim=1)
            self._cache = cache
        return {"rand_ini": cache["rand_ini"],
                "sine": cache["sine"][:, :num_samples],
                "uv": cache["uv"][:, :num_samples]}

    def clear(self) -> None:
        """Drop the cached tables (they are regenerated identically on demand)."""
        self._cache = {}


class SineGen2(nn.Module):
    """Harmonic sine source of the causal NSF (upstream ``SineGen2`` in causal inference mode).

    Phases are accumulated at frame rate (linear down-sampling of the per-sample phase
    increments by ``upsample_scale``) and held per frame (nearest up-sampling), so the
    source of a prefix does not depend on later frames.  As upstream, the phase itself is
    held, so the harmonic part is constant within each mel frame (a staircase, not a sine
    at f0); only the noise varies from sample to sample.  Noise comes from fixed uniform
    tables passed in by the caller, not from the RNG.
    """

    def __init__(self, samp_rate: int, upsample_scale: int, harmonic_num: int = 0, sine_amp: float = 0.1,
                 noise_std: float = 0.003, voiced_threshold: float = 0) -> None:
        super().__init__()
        self.sampling_rate = samp_rate
        self.upsample_scale = int(upsample_scale)
        self.harmonic_num = harmonic_num
        self.dim = harmonic_num + 1
        self.sine_amp = sine_amp
        self.noise_std = noise_std
        self.voiced_threshold = voiced_threshold

    def _f02uv(self, f0: torch.Tensor) -> torch.Tensor:
        return (f0 > self.voiced_threshold).to(torch.float32)

    def _f02sine(self, f0_values: torch.Tensor, rand_ini: torch.Tensor) -> torch.Tensor:
        # per-sample phase increment in cycles; the integer part is irrelevant for the phase.
        # Divide by a tensor, not a Python number: CUDA turns division by a Python scalar into a
        # reciprocal multiply (1 ulp off), and the phase sum below amplifies that ~3000-fold.
        rad = (f0_values / f0_values.new_full((), float(self.sampling_rate))) % 1
        # initial phases go onto the first time step; with the linear down-sampling below that
        # sample never contributes, so rand_ini has no effect -- kept because upstream does it
        rad[:, 0, :] = rad[:, 0, :] + rand_ini
        rad = F.interpolate(rad.transpose(1, 2), scale_factor=1 / self.upsample_scale,
                            mode="linear").transpose(1, 2)
        # float32 cumsum with a float64 accumulator: exactly what the CPU kernel does (the CUDA
        # kernel accumulates in float32), so every device reproduces the CPU reference
        phase = torch.cumsum(rad, dim=1, dtype=torch.float64).to(torch.float32) * 2 * math.pi
        # causal: hold each frame's phase for the whole frame (nearest), as upstream -- this
        # makes sin(phase) constant within a frame
        phase = F.interpolate(phase.transpose(1, 2) * self.upsample_scale,
                              scale_factor=float(self.upsample_scale), mode="nearest").transpose(1, 2)
        return torch.sin(phase)

    def forward(self, f0: torch.Tensor, rand_ini: torch.Tensor,
                sine_noise: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """f0 [B, N, 1] (Hz, per sample) -> (sine_waves [B,N,dim], uv [B,N,1], noise [B,N,dim]).

        ``rand_ini`` [1, dim] and ``sine_noise`` [1, >=N, dim] are the fixed tables.
        """
        harmonics = torch.arange(1, self.dim + 1, dtype=torch.float32, device=f0.device)
        fn = f0 * harmonics.view(1, 1, -1)
        sine_waves = self._f02sine(fn, rand_ini) * self.sine_amp
        uv = self._f02uv(f0)
        # voiced: small additive noise; unvoiced: noise of about the sine amplitude.
        # Causal inference uses the uniform [0,1) table as "noise" (not Gaussian), as upstream.
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        noise = noise_amp * sine_noise[:, :sine_waves.shape[1]]
        sine_waves = sine_waves * uv + noise
        return sine_waves, uv, noise


class SourceModuleHnNSF(nn.Module):
    """Harmonic-plus-noise source: SineGen2 harmonics merged by ``tanh(Linear(dim -> 1))``."""

    def __init__(self, sampling_rate: int, upsample_scale: int, harmonic_num: int = 0, sine_amp: float = 0.1,
                 add_noise_std: float = 0.003, voiced_threshod: float = 0) -> None:
        super().__init__()
        self.sine_amp = sine_amp
        self.noise_std = add_noise_std
        self.l_sin_gen = SineGen2(sampling_rate, upsample_scale, harmonic_num, sine_amp, add_noise_std,
                                  voiced_threshod)
        self.l_linear = nn.Linear(harmonic_num + 1, 1)
        self.l_tanh = nn.Tanh()

    def forward(self, x: torch.Tensor, rand_ini: torch.Tensor, sine_noise: torch.Tensor,
                uv_noise: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """f0 per sample [B, N, 1] -> (sine_merge [B,N,1], noise [B,N,1], uv [B,N,1]), all float32."""
        sine_wavs, uv, _ = self.l_sin_gen(x, rand_ini, sine_noise)
        # merge in float32 even when the module was cast to a low-precision dtype
        w = self.l_linear.weight.to(torch.float32)
        b = self.l_linear.bias.to(torch.float32) if self.l_linear.bias is not None else None
        sine_merge = self.l_tanh(F.linear(sine_wavs, w, b))
        # noise branch: returned for completeness; the generator never uses it (nor does upstream)
        noise = uv_noise[:, :uv.shape[1]] * self.sine_amp / 3
        return sine_merge, noise, uv


# ---------------------------------------------------------------------------------------
# generator
# ---------------------------------------------------------------------------------------

def _split_right(x: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x without its last n frames, the last n frames)."""
    t = x.shape[2]
    return x[:, :, :t - n], x[:, :, t - n:]


class CausalHiFTGenerator(nn.Module):
    """CosyVoice3 causal HiFT vocoder (HiFTNet: neural source filter + iSTFTNet).

    Keyword arguments (names and defaults) are upstream's.  ``f0_predictor`` is a
    :class:`~cosytools.models.f0_predictor.CausalConvRNNF0Predictor`; the generator keeps
    it in float64.
    """

    def __init__(
            self,
            in_channels: int = 80,
            base_channels: int = 512,
            nb_harmonics: int = 8,
            sampling_rate: int = 22050,
            nsf_alpha: float = 0.1,
            nsf_sigma: float = 0.003,
            nsf_voiced_threshold: float = 10,
            upsample_rates: List[int] = [8, 8],
            upsample_kernel_sizes: List[int] = [16, 16],
            istft_params: Dict[str, int] = {"n_fft": 16, "hop_len": 4},
            resblock_kernel_sizes: List[int] = [3, 7, 11],
            resblock_dilation_sizes: List[List[int]] = [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
            source_resblock_kernel_sizes: List[int] = [7, 11],
            source_resblock_dilation_sizes: List[List[int]] = [[1, 3, 5], [1, 3, 5]],
            lrelu_slope: float = 0.1,
            audio_limit: float = 0.99,
            conv_pre_look_right: int = 4,
            f0_predictor: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.out_channels = 1
        self.nb_harmonics = nb_harmonics
        self.sampling_rate = sampling_rate
        self.istft_params = dict(istft_params)
        self.lrelu_slope = lrelu_slope
        self.audio_limit = audio_limit
        self.upsample_rates = list(upsample_rates)
        self.conv_pre_look_right = conv_pre_look_right
        self.num_kernels = len(resblock_kernel_sizes)
        self.num_upsamples = len(upsample_rates)
        n_fft, hop = self.istft_params["n_fft"], self.istft_params["hop_len"]
        self.n_fft, self.hop_len = n_fft, hop
        self.upsample_prod = math.prod(self.upsample_rates)  # STFT frames per mel frame
        self.upsample_scale = self.upsample_prod * hop  # samples per mel frame

        self.m_source = SourceModuleHnNSF(
            sampling_rate=sampling_rate, upsample_scale=self.upsample_scale, harmonic_num=nb_harmonics,
            sine_amp=nsf_alpha, add_noise_std=nsf_sigma, voiced_threshod=nsf_voiced_threshold)

        self.conv_pre = weight_norm(
            CausalConv1d(in_channels, base_channels, conv_pre_look_right + 1, 1, causal_type="right"))

        self.ups = nn.ModuleList([
            weight_norm(CausalConv1dUpsample(base_channels // (2 ** i), base_channels // (2 ** (i + 1)), k, u))
            for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes))
        ])

        # source fusion: the source STFT is brought down to each upsampling stage's rate
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        rates = [1] + list(upsample_rates[::-1][:-1])
        cum_rates = [math.prod(rates[:j + 1]) for j in range(len(rates))][::-1]
        for i, (u, k, d) in enumerate(zip(cum_rates, source_resblock_kernel_sizes, source_resblock_dilation_sizes)):
            ch = base_channels // (2 ** (i + 1))
            if u == 1:
                self.source_downs.append(CausalConv1d(n_fft + 2, ch, 1, 1, causal_type="left"))
            else:
                self.source_downs.append(CausalConv1dDownSample(n_fft + 2, ch, u * 2, u))
            self.source_resblocks.append(ResBlock(ch, k, d, causal=True))

        self.resblocks = nn.ModuleList()
        ch = base_channels
        for i in range(len(self.ups)):
            ch = base_channels // (2 ** (i + 1))
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes):
                self.resblocks.append(ResBlock(ch, k, d, causal=True))

        self.conv_post = weight_norm(CausalConv1d(ch, n_fft + 2, 7, 1, causal_type="left"))
        self.reflection_pad = nn.ReflectionPad1d((1, 0))
        self.register_buffer("stft_window", stft_window(n_fft), persistent=False)
        self.f0_predictor = f0_predictor
        if f0_predictor is not None:
            f0_predictor.to(torch.float64)
        self.default_noise = DefaultSourceNoise(nb_harmonics + 1)
        self.register_state_dict_post_hook(CausalHiFTGenerator._report_fixed_dtypes)

    # -- dtype policy --------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the convolution stack (the module dtype)."""
        return self.conv_pre.bias.dtype

    # submodules whose dtype a module cast must not change: upstream runs the F0 predictor in
    # float64 (its precision is crucial for causal inference); the NSF source stays float32
    _FIXED_DTYPES = {"f0_predictor": torch.float64, "m_source": torch.float32}

    def _apply(self, fn, recurse: bool = True):
        # Casts (.half(), .to(bf16), .double(), ...) skip the fixed-dtype submodules and the
        # float32 STFT window; device moves and anything else that keeps dtypes apply as usual.
        held = {n: self._modules[n] for n in self._FIXED_DTYPES if self._modules.get(n) is not None}
        for n in held:
            self._modules[n] = None
        try:
            super()._apply(fn, recurse)
        finally:
            self._modules.update(held)
        for n, mod in held.items():
            # probe fn on the module's own device: does it change dtypes, where does it move to?
            t = next(iter(mod.parameters()), None)
            if t is None:
                t = next(iter(mod.buffers()), torch.zeros(()))
            p32 = fn(torch.zeros((), dtype=torch.float32, device=t.device))
            p64 = fn(torch.zeros((), dtype=torch.float64, device=t.device))
            if p32.dtype == torch.float32 and p64.dtype == torch.float64:
                mod._apply(fn, recurse)
            else:
                device, dtype = p64.device, self._FIXED_DTYPES[n]
                mod._apply(lambda x: x.to(device=device, dtype=dtype if x.is_floating_point() else None), recurse)
        if self.stft_window.dtype != torch.float32:
            self.stft_window = stft_window(self.n_fft, device=self.stft_window.device)
        return self

    @staticmethod
    def _report_fixed_dtypes(module: "CausalHiFTGenerator", state_dict: dict, prefix: str,
                             local_metadata: dict) -> None:
        # the float64 F0 predictor / float32 source are execution details: state_dict() reports
        # them in the generator's dtype, like every other parameter (float32 = checkpoint dtype)
        dtype = module.dtype
        prefixes = tuple(f"{prefix}{n}." for n in module._FIXED_DTYPES)
        for k, v in state_dict.items():
            if k.startswith(prefixes) and v.is_floating_point() and v.dtype != dtype:
                state_dict[k] = v.to(dtype)

    def _f0_predictor_f64(self) -> nn.Module:
        f0p = self.f0_predictor
        if f0p is None:
            raise RuntimeError("CausalHiFTGenerator was built without an f0_predictor")
        p = next(f0p.parameters(), None)
        if p is not None and p.dtype != torch.float64:
            f0p.to(torch.float64)  # only if something replaced/cast its parameters since
        return f0p

    # -- noise ---------------------------------------------------------------------------

    def _noise_tables(self, num_samples: int, noise: Optional[Dict[str, torch.Tensor]],
                      device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dim = self.nb_harmonics + 1
        if noise is None:
            t = self.default_noise.get(num_samples, device)
            return t["rand_ini"], t["sine"], t["uv"]
        expected = {"rand_ini": (1, dim), "sine": (1, num_samples, dim), "uv": (1, num_samples, 1)}
        out = []
        for key, shape in expected.items():
            if key not in noise:
                raise InputError(f"HiFT noise dict lacks {key!r} (expected shape {list(shape)}); "
                                 f"keys given: {sorted(noise)}")
            v = noise[key]
            ok = v.dim() == len(shape) and v.shape[0] == 1 and v.shape[-1] == shape[-1]
            if key != "rand_ini":
                ok = ok and v.shape[1] >= num_samples
            if not ok:
                raise InputError(f"HiFT noise {key!r}: expected shape {list(shape)} (longer tables are cut), "
                                 f"got {list(v.shape)}")
            if key != "rand_ini":
                v = v[:, :num_samples]
            out.append(v.to(device=device, dtype=torch.float32))
        return out[0], out[1], out[2]

    # -- STFT ----------------------------------------------------------------------------

    def _stft(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        spec = torch.stft(x, self.n_fft, self.hop_len, self.n_fft, window=self.stft_window, center=True,
                          return_complex=True)
        spec = torch.view_as_real(spec)
        return spec[..., 0], spec[..., 1]

    def _istft(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        magnitude = torch.clip(magnitude, max=1e2)
        real = magnitude * torch.cos(phase)
        imag = magnitude * torch.sin(phase)
        return torch.istft(torch.complex(real, imag), self.n_fft, self.hop_len, self.n_fft,
                           window=self.stft_window, center=True)

    # -- forward -------------------------------------------------------------------------

    def decode(self, x: torch.Tensor, s: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        """mel [B,80,T] + source [B,1,N] -> waveform [B, samples] (float32)."""
        s_real, s_imag = self.source_stft(s)
        magnitude, phase = self.decode_body(x, s_real, s_imag, finalize)
        return self.synthesize(magnitude, phase, finalize)

    def source_stft(self, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Source [B,1,N] -> its STFT (real, imag) in float32, tapped: the input of :meth:`decode_body`."""
        s_real, s_imag = self._stft(s.squeeze(1).to(torch.float32))
        tap("s_stft_real", s_real)
        tap("s_stft_imag", s_imag)
        return s_real, s_imag

    def synthesize(self, magnitude: torch.Tensor, phase: torch.Tensor, finalize: bool = True,
                   graph_safe: bool = False) -> torch.Tensor:
        """The output of :meth:`decode_body` -> clamped waveform (iSTFT; without ``finalize`` the
        last hop, which the next chunk recomputes, is cut), tapped.  ``graph_safe``: the iSTFT as
        :func:`istft_overlap_add` (no host sync; round-off differences only)."""
        tap("magnitude", magnitude)
        tap("phase", phase)
        if graph_safe:
            m = torch.clip(magnitude, max=1e2)
            wav = istft_overlap_add(m * torch.cos(phase), m * torch.sin(phase), self.n_fft, self.hop_len,
                                    self.stft_window)
        else:
            wav = self._istft(magnitude, phase)
        tap("istft", wav)
        if not finalize:
            wav = wav[:, :wav.shape[1] - self.upsample_scale]
        return torch.clamp(wav, -self.audio_limit, self.audio_limit)

    def decode_body(self, x: torch.Tensor, s_real: torch.Tensor, s_imag: torch.Tensor,
                    finalize: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """The convolution stack of :meth:`decode`: mel [B,80,T] + source STFT (real, imag
        [B, n_fft/2+1, frames]) -> (magnitude, phase) [B, n_fft/2+1, frames'] float32."""
        dt = self.dtype
        x = x.to(dt)
        if finalize:
            x = self.conv_pre(x)
        else:
            body, look_ahead = _split_right(x, self.conv_pre_look_right)
            x = self.conv_pre(body, look_ahead)
            keep = s_real.shape[2] - self.upsample_prod * self.conv_pre_look_right
            s_real, s_imag = s_real[:, :, :keep], s_imag[:, :, :keep]
        tap("conv_pre", x)
        s_stft = torch.cat([s_real, s_imag], dim=1).to(dt)

        for i in range(self.num_upsamples):
            x = F.leaky_relu(x, self.lrelu_slope)
            x = self.ups[i](x)
            tap(f"ups.{i}", x)
            if i == self.num_upsamples - 1:
                x = self.reflection_pad(x)
            si = self.source_downs[i](s_stft)
            tap(f"source_downs.{i}", si)
            si = self.source_resblocks[i](si)
            tap(f"source_resblocks.{i}", si)
            x = x + si
            xs = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                xs = xs + self.resblocks[i * self.num_kernels + j](x)
            x = xs / self.num_kernels
            tap(f"resblocks.{i}", x)  # mean of the stage's resblocks (not in upstream dumps)

        x = F.leaky_relu(x)  # default slope 0.01 here, not lrelu_slope: upstream does so
        x = self.conv_post(x)
        tap("conv_post", x)
        x = x.to(torch.float32)
        nb = self.n_fft // 2 + 1
        magnitude = torch.exp(x[:, :nb, :])
        phase = torch.sin(x[:, nb:, :])  # sin before the cos/sin of the iSTFT: redundant, kept as upstream
        return magnitude, phase

    def forward(self, speech_feat: torch.Tensor, finalize: bool = True,
                noise: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """mel [B,80,T] -> (speech [B, samples] float32, source [B,1,N] float32).

        ``finalize=False`` treats the last frames as look-ahead (3 for the F0 predictor,
        ``conv_pre_look_right`` for conv_pre) and drops the last mel frame's worth of audio,
        as upstream's streaming calls do.  ``noise`` = ``{'rand_ini': [1,9], 'sine': [1,N,9],
        'uv': [1,N,1]}`` replays upstream's fixed tables (longer tables are cut to N);
        ``None`` uses :class:`DefaultSourceNoise`.
        """
        mel, s = self.source_excitation(speech_feat, finalize=finalize, noise=noise)
        return self.decode(mel, s, finalize=finalize), s

    def source_noise(self, frames: int, finalize: bool, noise: Optional[Dict[str, torch.Tensor]],
                     device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The source-noise tables (rand_ini, sine, uv) a call on ``frames`` mel frames uses: the
        given ``noise`` (checked, cut) or the fixed default tables."""
        f0_look_ahead = self._f0_predictor_f64().condnet[0].causal_padding
        min_frames = 1 if finalize else f0_look_ahead + self.conv_pre_look_right + 1
        if frames < min_frames:
            raise InputError(f"HiFT mel has {frames} frames; finalize={finalize} needs at least {min_frames}")
        f0_frames = frames if finalize else frames - f0_look_ahead
        return self._noise_tables(f0_frames * self.upsample_scale, noise, device)

    def source_excitation(self, speech_feat: torch.Tensor, finalize: bool = True,
                          noise: Optional[Dict[str, torch.Tensor]] = None,
                          f0_predictor: Optional[Callable[..., torch.Tensor]] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The part of :meth:`forward` before :meth:`decode`: checks the input, predicts F0 (float64)
        and builds the harmonic source.  Returns (mel for ``decode`` — the F0 look-ahead removed
        when ``finalize=False`` —, source [B,1,N] float32).  ``f0_predictor`` replaces the call of
        the float64 F0 module (same arguments and result), e.g. by a compiled version of it.
        """
        if self.sampling_rate == 22050:
            raise ConfigError(
                "HiFT sampling_rate 22050 selects upstream's non-causal SineGen with fresh random noise; "
                "only the causal SineGen2 source (CosyVoice3, 24000 Hz) is implemented")
        f0p = self._f0_predictor_f64()
        f0_look_ahead = f0p.condnet[0].causal_padding
        if speech_feat.dim() != 3 or speech_feat.shape[1] != self.conv_pre.in_channels:
            raise InputError(f"HiFT mel must be [B, {self.conv_pre.in_channels}, T], got {list(speech_feat.shape)}")
        # checked before any compute (raises for > 300 s with the default tables)
        rand_ini, sine_noise, uv_noise = self.source_noise(speech_feat.shape[2], finalize, noise, speech_feat.device)

        # upstream: the F0 predictor's precision is crucial for causal inference -> float64
        f0_64 = (f0p if f0_predictor is None else f0_predictor)(speech_feat.to(torch.float64), finalize=finalize)
        tap("f0_f64", f0_64)
        f0 = f0_64.to(device=speech_feat.device, dtype=torch.float32)
        tap("f0", f0)

        # nearest (causal) up-sampling of f0 to the sample rate, then the harmonic source
        f0_up = F.interpolate(f0[:, None], scale_factor=float(self.upsample_scale), mode="nearest")
        s, _, _ = self.m_source(f0_up.transpose(1, 2), rand_ini, sine_noise, uv_noise)
        s = s.transpose(1, 2)

        mel = speech_feat
        if not finalize:
            mel, _ = _split_right(speech_feat, f0_look_ahead)
        return mel, s

    @torch.inference_mode()
    def inference(self, speech_feat: torch.Tensor, finalize: bool = True,
                  noise: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Upstream ``CausalHiFTGenerator.inference`` (see :meth:`forward`), under inference mode."""
        return self.forward(speech_feat, finalize=finalize, noise=noise)
