"""CosyVoice3 flow-matching estimator: the DiT (diffusion transformer) and its parts.

Plain-torch rewrite of upstream ``cosyvoice/flow/DiT`` (itself derived from F5-TTS).
Attribute names follow the upstream checkpoint keys (``decoder.estimator.*`` in
``flow.pt``) one to one.  Numerics follow upstream float32 to round-off; under
fp16/bf16 the attention scores and softmax, the sinusoidal time features and the
rotary angles are computed in float32.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosytools.taps import enabled, tap

__all__ = [
    "DiT",
    "DiTBlock",
    "Attention",
    "FeedForward",
    "AdaLayerNormZero",
    "AdaLayerNormZero_Final",
    "TimestepEmbedding",
    "SinusPositionEmbedding",
    "InputEmbedding",
    "CausalConvPositionEmbedding",
    "RotaryEmbedding",
    "apply_rotary_interleaved",
    "chunk_attention_mask",
    "dit_attention_mask",
    "Float32BuffersMixin",
]


class Float32BuffersMixin:
    """Keeps the buffers named in ``_float32_buffers`` in float32 when the module is cast.

    Module casts (``.half()``, ``.to(dtype)``) still move them to the new device.
    """

    _float32_buffers: Sequence[str] = ()

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        kept = {name: getattr(self, name) for name in self._float32_buffers}
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        for name, old in kept.items():
            new = getattr(self, name)
            if old is not None and new is not None and new.dtype != old.dtype:
                setattr(self, name, old.to(device=new.device))
        return out


# ----------------------------------------------------------------------------- masks


def chunk_attention_mask(size: int, chunk_size: int, num_left_chunks: int = -1,
                         device: Optional[torch.device] = None) -> Tensor:
    """Static chunk mask [size, size] (bool): row i may attend to column j.

    Frame i sees every frame before the end of its own chunk,
    ``j < (i // chunk_size + 1) * chunk_size``; with ``num_left_chunks >= 0`` also only
    ``j >= (i // chunk_size - num_left_chunks) * chunk_size``.
    """
    pos = torch.arange(size, device=device)
    chunk_idx = torch.div(pos, chunk_size, rounding_mode="trunc")
    end = (chunk_idx + 1) * chunk_size
    allowed = pos.unsqueeze(0) < end.unsqueeze(1)
    if num_left_chunks >= 0:
        start = ((chunk_idx - num_left_chunks) * chunk_size).clamp(min=0)
        allowed = allowed & (pos.unsqueeze(0) >= start.unsqueeze(1))
    return allowed


def dit_attention_mask(mask: Tensor, streaming: bool, static_chunk_size: int,
                       num_left_chunks: int = -1) -> Tensor:
    """Attention mask [B, 1, L, L] (bool) from a frame mask [B, 1, L] as the upstream DiT builds it.

    Non-streaming: every row is the key padding mask.  Streaming (and
    ``static_chunk_size > 0``): padding mask AND the static chunk mask.  Rows that end
    up all-false are set all-true (upstream does the same; padded rows are masked later).
    """
    valid = mask.bool()
    length = valid.size(-1)
    if streaming and static_chunk_size > 0:
        chunk = chunk_attention_mask(length, static_chunk_size, num_left_chunks, device=valid.device)
        full = valid & chunk.unsqueeze(0)
    else:
        full = valid.expand(-1, length, -1)
    # sync-free version of upstream's "force fully masked rows to True"
    full = full | ~full.any(dim=-1, keepdim=True)
    return full.unsqueeze(1)


# ----------------------------------------------------------------------------- embeddings


class SinusPositionEmbedding(nn.Module):
    """Sinusoidal features [B, dim] of a scalar per batch row (sin half, then cos half)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor, scale: float = 1000) -> Tensor:
        half = self.dim // 2
        step = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=x.device).float() * -step)
        # same operation order as upstream: (scale * x) * freqs
        args = scale * x.float().unsqueeze(1) * freqs.unsqueeze(0)
        return torch.cat((args.sin(), args.cos()), dim=-1)


class TimestepEmbedding(nn.Module):
    """Flow time t [B] -> conditioning vector [B, dim] (sinusoid, then a 2-layer SiLU MLP)."""

    def __init__(self, dim: int, freq_embed_dim: int = 256) -> None:
        super().__init__()
        self.time_embed = SinusPositionEmbedding(freq_embed_dim)
        self.time_mlp = nn.Sequential(nn.Linear(freq_embed_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, timestep: Tensor) -> Tensor:
        hidden = self.time_embed(timestep).to(self.time_mlp[0].weight.dtype)
        return self.time_mlp(hidden)


def grouped_conv1d_im2col(x: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int) -> Tensor:
    """Unpadded, stride-1 grouped conv1d computed as one batched matmul over the unfolded input
    (im2col): x [B, C, L + K - 1], weight [C_out, C/groups, K] -> [B, C_out, L].  Same sum, other
    order (float round-off); on the GPU far faster than cuDNN's grouped kernel for DiT's 16 groups
    x 31 taps (~580 us per call on an H100 in bf16, docs/benchmarks.md)."""
    k = weight.shape[2]
    b, c, _ = x.shape
    cin = c // groups
    cols = x.unfold(2, k, 1)  # [B, C, L, K] view
    length = cols.shape[2]
    cols = cols.reshape(b, groups, cin, length, k).permute(1, 0, 3, 2, 4).reshape(groups, b * length, cin * k)
    w = weight.reshape(groups, -1, cin * k).transpose(1, 2)  # [G, Cin*K, Cout/G]
    y = torch.bmm(cols, w)  # [G, B*L, Cout/G]
    y = y.reshape(groups, b, length, -1).permute(1, 0, 3, 2).reshape(b, -1, length)
    return y + bias.view(1, -1, 1) if bias is not None else y


def grouped_conv1d_as_matmul(x: Tensor, conv: nn.Conv1d) -> Tensor:
    """``conv(x)`` for an unpadded, stride-1 grouped ``nn.Conv1d`` by :func:`grouped_conv1d_im2col`
    (the ``conv_fn`` hook form)."""
    return grouped_conv1d_im2col(x, conv.weight, conv.bias, conv.groups)


class CausalConvPositionEmbedding(nn.Module):
    """Two left-padded grouped conv1d + Mish layers over [B, L, dim] (causal position signal).

    ``conv_fn(x, conv)`` replaces the calls of the two convolutions (e.g.
    :func:`grouped_conv1d_as_matmul`); the default is the module's own ``conv1d``."""

    def __init__(self, dim: int, kernel_size: int = 31, groups: int = 16) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"CausalConvPositionEmbedding: kernel_size must be odd, got {kernel_size}")
        self.kernel_size = kernel_size
        self.conv1 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups, padding=0), nn.Mish())
        self.conv2 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups, padding=0), nn.Mish())

    def forward(self, x: Tensor, mask: Optional[Tensor] = None,
                conv_fn: Optional[Callable[[Tensor, nn.Conv1d], Tensor]] = None) -> Tensor:
        if mask is not None:
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        y = x.transpose(1, 2)
        for layer in (self.conv1, self.conv2):  # Sequential(Conv1d, Mish)
            y = F.pad(y, (self.kernel_size - 1, 0))
            y = layer[1](layer[0](y) if conv_fn is None else conv_fn(y, layer[0]))
        y = y.transpose(1, 2)
        if mask is not None:
            y = y.masked_fill(~mask.unsqueeze(-1), 0.0)
        return y


class InputEmbedding(nn.Module):
    """[x, cond, mu, spks] concatenated per frame -> Linear -> + causal conv position embedding."""

    def __init__(self, mel_dim: int, text_dim: int, out_dim: int, spk_dim: Optional[int] = None) -> None:
        super().__init__()
        self.spk_dim = 0 if spk_dim is None else spk_dim
        self.proj = nn.Linear(mel_dim * 2 + text_dim + self.spk_dim, out_dim)
        self.conv_pos_embed = CausalConvPositionEmbedding(dim=out_dim)

    def forward(self, x: Tensor, cond: Tensor, text_embed: Tensor, spks: Optional[Tensor],
                conv_fn: Optional[Callable[[Tensor, nn.Conv1d], Tensor]] = None) -> Tensor:
        parts = [x, cond, text_embed]
        if self.spk_dim > 0:
            if spks is None:
                spks = x.new_zeros(x.shape[0], self.spk_dim)
            parts.append(spks.unsqueeze(1).expand(-1, x.shape[1], -1))
        h = self.proj(torch.cat(parts, dim=-1))
        return self.conv_pos_embed(h, conv_fn=conv_fn) + h


class RotaryEmbedding(Float32BuffersMixin, nn.Module):
    """Rotary angles for interleaved channel pairs (x-transformers ``RotaryEmbedding`` layout).

    ``inv_freq`` is a persistent buffer (it is in the upstream checkpoint) and stays
    float32 when the module is cast.
    """

    _float32_buffers = ("inv_freq",)

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)

    def forward_from_seq_len(self, seq_len: int) -> Tensor:
        """Angles [1, seq_len, dim] for positions 0..seq_len-1, each frequency repeated for its pair."""
        inv_freq = self.inv_freq.float()
        pos = torch.arange(seq_len, device=inv_freq.device, dtype=torch.float32)
        # repeat the (static) frequency table, not the [seq_len, dim/2] product: same values, and
        # the ONNX exporter keeps the rank when seq_len is dynamic
        return (pos.unsqueeze(1) * inv_freq.repeat_interleave(2).unsqueeze(0)).unsqueeze(0)


def _rotate_pairs(x: Tensor) -> Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rotary_interleaved(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate the first ``freqs.shape[-1]`` channels of x [B, L, C] by the angles [1, L, rot_dim].

    Computed in float32, returned in x's dtype; the remaining channels pass unchanged.
    """
    rot_dim = freqs.shape[-1]
    head, rest = x[..., :rot_dim], x[..., rot_dim:]
    head32 = head.float()
    rotated = head32 * freqs.cos() + _rotate_pairs(head32) * freqs.sin()
    return torch.cat((rotated.to(x.dtype), rest), dim=-1)


# ----------------------------------------------------------------------------- blocks


class AdaLayerNormZero(nn.Module):
    """LayerNorm modulated by the time embedding; also returns the gates/shift/scale for the MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, dim * 6)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: Tensor, emb: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        mod = self.linear(self.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = torch.chunk(mod, 6, dim=1)
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZero_Final(nn.Module):  # noqa: N801 - upstream class name
    """Final LayerNorm modulated by the time embedding (scale first, then shift, as upstream)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, dim * 2)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        mod = self.linear(self.silu(emb))
        scale, shift = torch.chunk(mod, 2, dim=1)
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


class FeedForward(nn.Module):
    """Linear -> GELU -> dropout -> Linear (keys ``ff.0.0`` and ``ff.2``)."""

    def __init__(self, dim: int, dim_out: Optional[int] = None, mult: float = 4, dropout: float = 0.0,
                 approximate: str = "none") -> None:
        super().__init__()
        inner = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        self.ff = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner), nn.GELU(approximate=approximate)),
            nn.Dropout(dropout),
            nn.Linear(inner, dim_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.ff(x)


class Attention(nn.Module):
    """Multi-head self-attention with the upstream DiT rotary quirk and a [B,1,L,L] bool mask."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.heads = heads
        self.dim_head = dim_head
        self.inner_dim = dim_head * heads
        self.to_q = nn.Linear(dim, self.inner_dim)
        self.to_k = nn.Linear(dim, self.inner_dim)
        self.to_v = nn.Linear(dim, self.inner_dim)
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, dim), nn.Dropout(dropout)])

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, rope: Optional[Tensor] = None) -> Tensor:
        b = x.shape[0]
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        if rope is not None:
            # upstream quirk: rotary is applied to [B, L, heads*dim_head] before the head split with a
            # dim_head-wide table, so only head 0's channels are rotated
            q = apply_rotary_interleaved(q, rope)
            k = apply_rotary_interleaved(k, rope)
        q = q.view(b, -1, self.heads, self.dim_head).transpose(1, 2)
        k = k.view(b, -1, self.heads, self.dim_head).transpose(1, 2)
        v = v.view(b, -1, self.heads, self.dim_head).transpose(1, 2)
        if q.dtype != torch.bfloat16:
            # scores and softmax in float32: in fp16 they overflow to NaN (as upstream's do)
            q, k, v = q.float(), k.float(), v.float()
        # bf16 (float32's exponent range: no overflow) goes to the fused kernels as it is; they
        # accumulate the scores and run the softmax in float32 internally
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = out.to(x.dtype).transpose(1, 2).reshape(b, -1, self.inner_dim)
        out = self.to_out[1](self.to_out[0](out))
        if mask is not None:
            # upstream zeroes the frames that the last query row may not see (the padding)
            out = out.masked_fill(~mask[:, 0, -1].unsqueeze(-1), 0.0)
        return out


class DiTBlock(nn.Module):
    """AdaLN-zero transformer block: modulated attention and modulated tanh-GELU MLP, gated residuals."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: float = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.attn_norm = AdaLayerNormZero(dim)
        self.attn = Attention(dim=dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.ff_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim=dim, mult=ff_mult, dropout=dropout, approximate="tanh")

    def forward(self, x: Tensor, t: Tensor, mask: Optional[Tensor] = None, rope: Optional[Tensor] = None) -> Tensor:
        norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.attn_norm(x, emb=t)
        x = x + gate_msa.unsqueeze(1) * self.attn(norm, mask=mask, rope=rope)
        ff_in = self.ff_norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp.unsqueeze(1) * self.ff(ff_in)


# ----------------------------------------------------------------------------- DiT


class DiT(nn.Module):
    """The CFM velocity estimator: noisy mel x plus conditions (mu, cond, spks, t) -> velocity [B, mel_dim, L].

    ``tap_prefix`` names the debug taps of the next call (the CFM sets ``stepNN.dit``
    while a capture is active).
    """

    def __init__(
        self,
        *,
        dim: int,
        depth: int = 8,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.1,
        ff_mult: float = 4,
        mel_dim: int = 80,
        mu_dim: Optional[int] = None,
        long_skip_connection: bool = False,
        spk_dim: Optional[int] = None,
        out_channels: Optional[int] = None,
        static_chunk_size: int = 50,
        num_decoding_left_chunks: int = 2,
    ) -> None:
        super().__init__()
        mu_dim = mel_dim if mu_dim is None else mu_dim
        self.time_embed = TimestepEmbedding(dim)
        self.input_embed = InputEmbedding(mel_dim, mu_dim, dim, spk_dim)
        self.rotary_embed = RotaryEmbedding(dim_head)
        self.dim = dim
        self.depth = depth
        self.transformer_blocks = nn.ModuleList(
            [DiTBlock(dim=dim, heads=heads, dim_head=dim_head, ff_mult=ff_mult, dropout=dropout)
             for _ in range(depth)]
        )
        self.long_skip_connection = nn.Linear(dim * 2, dim, bias=False) if long_skip_connection else None
        self.norm_out = AdaLayerNormZero_Final(dim)
        self.proj_out = nn.Linear(dim, mel_dim)
        self.out_channels = out_channels
        self.static_chunk_size = static_chunk_size
        # kept for config parity only: upstream DiT always passes -1 (all left chunks) to the chunk mask
        self.num_decoding_left_chunks = num_decoding_left_chunks
        self.tap_prefix = "dit"

    def _tap(self, name: str, value: Tensor) -> None:
        if enabled():
            tap(f"{self.tap_prefix}.{name}", value)

    def forward(self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Optional[Tensor] = None,
                cond: Optional[Tensor] = None, streaming: bool = False,
                block_fn: Optional[Callable[..., Tensor]] = None,
                conv_fn: Optional[Callable[[Tensor, nn.Conv1d], Tensor]] = None) -> Tensor:
        """x, mu, cond [B, 80, L]; mask [B, 1, L]; t [B] (or scalar); spks [B, spk_dim] -> [B, mel_dim, L].

        ``block_fn(block, h, temb, mask, rope)`` replaces the call of each transformer block (e.g. by
        one compiled function shared by all blocks: regional compilation); ``conv_fn(x, conv)`` the
        position embedding's grouped convolutions (e.g. :func:`grouped_conv1d_as_matmul`)."""
        self._tap("in.x", x)
        self._tap("in.mask", mask)
        self._tap("in.mu", mu)
        self._tap("in.t", t)
        if spks is not None:
            self._tap("in.spks", spks)
        if cond is not None:
            self._tap("in.cond", cond)
        if cond is None:
            cond = torch.zeros_like(x)
        x = x.transpose(1, 2)
        mu = mu.transpose(1, 2)
        cond = cond.transpose(1, 2)
        batch, seq_len = x.shape[0], x.shape[1]
        if t.ndim == 0:
            t = t.repeat(batch)

        temb = self.time_embed(t)
        self._tap("time_embed", temb)
        h = self.input_embed(x, cond, mu, spks, conv_fn=conv_fn)
        self._tap("input_embed", h)

        rope = self.rotary_embed.forward_from_seq_len(seq_len)
        residual = h
        # upstream passes num_decoding_left_chunks=-1 here, whatever the constructor got
        attn_mask = dit_attention_mask(mask, streaming, self.static_chunk_size, -1)

        for i, block in enumerate(self.transformer_blocks):
            h = block(h, temb, mask=attn_mask, rope=rope) if block_fn is None else block_fn(block, h, temb, attn_mask, rope)
            if enabled():
                tap(f"{self.tap_prefix}.block.{i:02d}", h)

        if self.long_skip_connection is not None:
            h = self.long_skip_connection(torch.cat((h, residual), dim=-1))

        h = self.norm_out(h, temb)
        self._tap("norm_out", h)
        out = self.proj_out(h).transpose(1, 2)
        self._tap("out", out)
        return out
