"""CosyVoice3 flow stage: speech tokens (+ prompt) -> 80-bin mel, as plain torch modules.

Rewrite of upstream ``CausalMaskedDiffWithDiT`` (``cosyvoice/flow/flow.py``), its
``PreLookaheadLayer`` and ``CausalConditionalCFM`` (10 Euler steps, cosine t schedule,
classifier-free guidance as a batch of 2, fixed start noise).  Attribute names match
the upstream ``flow.pt`` keys.  The ODE state and the t schedule stay float32 whatever
the module dtype; the estimator runs in the module dtype.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosytools.errors import InputError
from cosytools.models.dit import Float32BuffersMixin
from cosytools.taps import enabled, tap

__all__ = ["PreLookaheadLayer", "CausalConditionalCFM", "CausalMaskedDiffWithDiT", "fixed_flow_noise",
           "euler_schedule"]

NOISE_FRAMES = 50 * 300  # upstream rand_noise length: 300 s of 50 Hz mel frames


def fixed_flow_noise(channels: int = 80, frames: int = NOISE_FRAMES) -> Tensor:
    """Upstream's fixed ODE start noise [1, channels, frames]: ``randn`` right after ``manual_seed(0)``."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(1, channels, frames, generator=gen)


def euler_schedule(t_span: Tensor) -> Tuple[Tensor, Tensor]:
    """(t, dt) per Euler step, [n] each, accumulated exactly as upstream's solver does.

    t starts at t_span[0] and advances by dt; each next dt is t_span[k+1] minus the
    accumulated t (not the plain difference of t_span), which the fixtures pin.
    """
    n = t_span.numel() - 1
    ts, dts = [], []
    t = t_span[0]
    dt = t_span[1] - t_span[0]
    for step in range(1, n + 1):
        ts.append(t)
        dts.append(dt)
        t = t + dt
        if step < n:
            dt = t_span[step + 1] - t
    return torch.stack(ts), torch.stack(dts)


def _cfg(params: Any, key: str, default: Any) -> Any:
    if isinstance(params, Mapping):
        return params.get(key, default)
    return getattr(params, key, default)


class PreLookaheadLayer(nn.Module):
    """Token-rate conv block that looks ``pre_lookahead_len`` tokens ahead, with a residual.

    Input/output [B, T, in_channels].  ``context`` [B, <=pre_lookahead_len, in_channels]
    holds the embeddings of the look-ahead tokens when the call is not the last one of a
    stream; otherwise the look-ahead is zero padding.
    """

    def __init__(self, in_channels: int, channels: int, pre_lookahead_len: int = 1) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.channels = channels
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = nn.Conv1d(in_channels, channels, kernel_size=pre_lookahead_len + 1, stride=1, padding=0)
        self.conv2 = nn.Conv1d(channels, in_channels, kernel_size=3, stride=1, padding=0)

    def forward(self, inputs: Tensor, context: Optional[Tensor] = None) -> Tensor:
        x = inputs.transpose(1, 2)
        if context is None or context.size(1) == 0:
            x = F.pad(x, (0, self.pre_lookahead_len))
        else:
            n_ctx = context.size(1)
            if n_ctx > self.pre_lookahead_len:
                raise InputError(f"PreLookaheadLayer: context has {n_ctx} frames, at most "
                                 f"pre_lookahead_len={self.pre_lookahead_len} expected")
            x = torch.cat([x, context.transpose(1, 2).to(x.dtype)], dim=2)
            x = F.pad(x, (0, self.pre_lookahead_len - n_ctx))
        x = F.leaky_relu(self.conv1(x))
        x = self.conv2(F.pad(x, (self.conv2.kernel_size[0] - 1, 0)))
        return x.transpose(1, 2) + inputs


class CausalConditionalCFM(Float32BuffersMixin, nn.Module):
    """Conditional flow matching decoder: Euler ODE from fixed noise to mel, with CFG.

    ``cfm_params`` is a mapping (or attribute object) with ``sigma_min``, ``solver``,
    ``t_scheduler``, ``training_cfg_rate``, ``inference_cfg_rate``, ``reg_loss_type``.
    ``rand_noise`` is a non-persistent float32 buffer (not in the state dict).
    """

    _float32_buffers = ("rand_noise",)

    def __init__(self, in_channels: int, cfm_params: Any, n_spks: int = 1, spk_emb_dim: int = 64,
                 estimator: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.n_feats = in_channels
        self.n_spks = n_spks
        self.spk_emb_dim = spk_emb_dim
        self.solver = _cfg(cfm_params, "solver", "euler")
        self.sigma_min = float(_cfg(cfm_params, "sigma_min", 1e-4))
        self.t_scheduler = _cfg(cfm_params, "t_scheduler", "cosine")
        self.training_cfg_rate = float(_cfg(cfm_params, "training_cfg_rate", 0.2))
        self.inference_cfg_rate = float(_cfg(cfm_params, "inference_cfg_rate", 0.7))
        self.reg_loss_type = _cfg(cfm_params, "reg_loss_type", "l1")
        self.estimator = estimator
        # upstream draws this once in __init__ right after set_all_random_seed(0); fixed noise makes calls replayable
        self.register_buffer("rand_noise", fixed_flow_noise(), persistent=False)

    def t_span(self, n_timesteps: int, device: Optional[torch.device] = None) -> Tensor:
        """The n_timesteps+1 time points (float32): linspace(0, 1), cosine-warped when t_scheduler is 'cosine'."""
        span = torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=torch.float32)
        if self.t_scheduler == "cosine":
            span = 1 - torch.cos(span * 0.5 * torch.pi)
        return span

    @torch.inference_mode()
    def forward(self, mu: Tensor, mask: Tensor, n_timesteps: int, temperature: float = 1.0,
                spks: Optional[Tensor] = None, cond: Optional[Tensor] = None, streaming: bool = False,
                noise: Optional[Tensor] = None) -> Tuple[Tensor, None]:
        """Integrate the ODE: mu, cond [B, 80, L], mask [B, 1, L], spks [B, spk] -> (mel [B, 80, L] float32, None).

        ``noise`` is the start state z [1 or B, 80, >=L] (its first L frames are used); default ``rand_noise[:, :, :L]``.
        """
        z = self.initial_state(mu, noise, temperature)
        t_span = self.t_span(n_timesteps, device=mu.device)
        return self.solve_euler(z, t_span, mu=mu, mask=mask, spks=spks, cond=cond, streaming=streaming), None

    def initial_state(self, mu: Tensor, noise: Optional[Tensor] = None, temperature: float = 1.0) -> Tensor:
        """The ODE start z [1, 80, L] float32 for ``mu`` [B, 80, L]: the first L frames of ``noise``
        (default: the fixed ``rand_noise`` buffer), times ``temperature``."""
        channels, length = mu.shape[1], mu.shape[2]
        if noise is None:
            if length > self.rand_noise.shape[2] or channels != self.rand_noise.shape[1]:
                raise InputError(f"flow decoder: need noise [1, {channels}, {length}] but the fixed buffer is "
                                 f"{list(self.rand_noise.shape)}; pass noise explicitly")
            noise = self.rand_noise[:, :, :length]
        elif noise.dim() != 3 or noise.shape[1] != channels or noise.shape[2] < length:
            raise InputError(f"flow decoder: noise must be [1, {channels}, >={length}], got {list(noise.shape)}")
        else:
            noise = noise[:, :, :length]  # a longer table is used by prefix, like the fixed buffer
        return noise.to(device=mu.device, dtype=torch.float32) * temperature

    def solve_euler(self, x: Tensor, t_span: Tensor, mu: Tensor, mask: Tensor, spks: Optional[Tensor],
                    cond: Optional[Tensor], streaming: bool = False) -> Tensor:
        """Fixed-step Euler with CFG; row 0 of the estimator batch is conditional, row 1 has zero mu/spks/cond."""
        if self.estimator is None:
            raise RuntimeError("CausalConditionalCFM: no estimator")
        dtype = mu.dtype
        batch = mu.shape[0]
        t_seq, dt_seq = euler_schedule(t_span)
        tap("t", t_seq)
        if spks is None:
            spks = mu.new_zeros(batch, self.spk_emb_dim)
        if cond is None:
            cond = torch.zeros_like(mu)
        # constant halves of the CFG batch, built once
        mask_in = torch.cat([mask, mask], dim=0).to(dtype)
        mu_in = torch.cat([mu, torch.zeros_like(mu)], dim=0)
        spks_in = torch.cat([spks, torch.zeros_like(spks)], dim=0).to(dtype)
        cond_in = torch.cat([cond, torch.zeros_like(cond)], dim=0).to(dtype)
        x = x.expand(batch, -1, -1)
        cfg = self.inference_cfg_rate
        for i in range(t_seq.shape[0]):
            x_in = torch.cat([x, x], dim=0).to(dtype)
            t_in = t_seq[i].expand(2 * batch).to(dtype)
            if enabled() and hasattr(self.estimator, "tap_prefix"):
                self.estimator.tap_prefix = f"step{i:02d}.dit"
            out = self.estimator(x_in, mask_in, mu_in, t_in, spks_in, cond_in, streaming=streaming).float()
            v_cond, v_uncond = out[:batch], out[batch:]
            dphi = (1.0 + cfg) * v_cond - cfg * v_uncond
            x = x + dt_seq[i] * dphi
            if enabled():
                tap(f"step{i:02d}.x", x)
        if hasattr(self.estimator, "tap_prefix"):
            self.estimator.tap_prefix = "dit"
        return x.float()


class CausalMaskedDiffWithDiT(nn.Module):
    """Flow stage: token embedding -> PreLookaheadLayer -> repeat to mel rate -> CFM decoder (DiT)."""

    def __init__(
        self,
        input_size: int = 512,
        output_size: int = 80,
        spk_embed_dim: int = 192,
        output_type: str = "mel",
        vocab_size: int = 4096,
        input_frame_rate: int = 50,
        only_mask_loss: bool = True,
        token_mel_ratio: int = 2,
        pre_lookahead_len: int = 3,
        pre_lookahead_layer: Optional[nn.Module] = None,
        decoder: Optional[nn.Module] = None,
        decoder_conf: Optional[Mapping[str, Any]] = None,  # training-only, ignored
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.output_type = output_type
        self.vocab_size = vocab_size
        self.input_frame_rate = input_frame_rate
        self.only_mask_loss = only_mask_loss
        self.input_embedding = nn.Embedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)
        self.pre_lookahead_len = pre_lookahead_len
        self.pre_lookahead_layer = pre_lookahead_layer
        self.decoder = decoder
        self.token_mel_ratio = token_mel_ratio

    @torch.inference_mode()
    def inference(self, token: Tensor, token_len: Tensor, prompt_token: Tensor, prompt_token_len: Tensor,
                  prompt_feat: Tensor, prompt_feat_len: Tensor, embedding: Tensor, streaming: bool,
                  finalize: bool, noise: Optional[Tensor] = None, n_timesteps: int = 10) -> Tuple[Tensor, None]:
        """Mel [1, 80, 2*(T or T-lookahead)] float32 for speech tokens [1, T] given the prompt.

        ``prompt_feat`` is [1, 2*Tp, 80]; ``embedding`` [1, 192] (L2-normalised here).
        ``finalize=False`` holds back the last ``pre_lookahead_len`` tokens as look-ahead
        context; ``streaming=True`` uses the DiT's chunk attention mask.  ``noise`` is the
        ODE start [1, 80, L] (L = prompt + generated frames); default: the fixed buffer.
        """
        mu, mask, spk, conds, mel_len1 = self.prepare_decoder_inputs(
            token, token_len, prompt_token, prompt_token_len, prompt_feat, embedding, finalize)
        feat, _ = self.decoder(mu=mu, mask=mask, n_timesteps=n_timesteps, spks=spk, cond=conds,
                               streaming=streaming, noise=noise)
        return feat[:, :, mel_len1:].float(), None

    def prepare_decoder_inputs(self, token: Tensor, token_len: Tensor, prompt_token: Tensor,
                               prompt_token_len: Tensor, prompt_feat: Tensor, embedding: Tensor,
                               finalize: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Everything before the ODE: ``(mu [1,80,L], mask [1,1,L], spks [1,80], cond [1,80,L],
        prompt_mel_frames)`` in the module dtype (see :meth:`inference` for the arguments)."""
        if token.shape[0] != 1:
            raise InputError(f"flow inference takes batch 1, got token shape {list(token.shape)}")
        if self.pre_lookahead_layer is None or self.decoder is None:
            raise RuntimeError("CausalMaskedDiffWithDiT: pre_lookahead_layer and decoder must be set")
        weight = self.spk_embed_affine_layer.weight
        dtype, device = weight.dtype, weight.device

        spk = F.normalize(embedding.to(device=device, dtype=torch.float32), dim=1).to(dtype)
        spk = self.spk_embed_affine_layer(spk)
        tap("spk_proj", spk)

        tokens = torch.cat([prompt_token, token], dim=1).to(device=device, dtype=torch.long)
        lengths = (prompt_token_len + token_len).to(device).reshape(-1, 1)
        tmask = (torch.arange(tokens.shape[1], device=device).unsqueeze(0) < lengths).unsqueeze(-1).to(dtype)
        emb = self.input_embedding(torch.clamp(tokens, min=0)) * tmask

        if finalize:
            tap("token_emb", emb)
            h = self.pre_lookahead_layer(emb)
        else:
            n = self.pre_lookahead_len
            body, context = emb[:, :-n], emb[:, -n:]
            tap("token_emb", body)
            tap("token_emb_context", context)
            h = self.pre_lookahead_layer(body, context=context)
        tap("pre_lookahead", h)
        h = h.repeat_interleave(self.token_mel_ratio, dim=1)

        mel_len1 = prompt_feat.shape[1]
        length = h.shape[1]
        conds = torch.zeros(1, length, self.output_size, device=device, dtype=dtype)
        conds[:, :mel_len1] = prompt_feat.to(device=device, dtype=dtype)
        conds = conds.transpose(1, 2)
        mask = torch.ones(1, 1, length, device=device, dtype=dtype)
        mu = h.transpose(1, 2).contiguous()
        tap("mu", mu)
        tap("cond", conds)
        tap("mask", mask)
        return mu, mask, spk, conds, mel_len1
