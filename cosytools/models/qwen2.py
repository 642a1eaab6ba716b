"""Qwen2 decoder (the text/speech LM trunk of CosyVoice3) with a pre-allocated KV cache.

Attribute names follow Hugging Face ``Qwen2ForCausalLM`` so that upstream ``llm.pt`` keys
(``llm.model.model.layers.N.self_attn.q_proj.weight`` …) load with ``load_state_dict``.
Numerics follow HF's float32 path: RMSNorm in float32, rotate-half RoPE with cos/sin
computed in float32, GQA by repeating KV heads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..taps import tap

__all__ = ["Qwen2Config", "Qwen2RMSNorm", "Qwen2Attention", "Qwen2MLP", "Qwen2DecoderLayer",
           "Qwen2Model", "Qwen2ForCausalLM", "KVCache"]


@dataclass
class Qwen2Config:
    """The Qwen2 hyper-parameters cosytools needs (from ``CosyVoice-BlankEN/config.json``)."""

    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    vocab_size: int = 151936
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> "Qwen2Config":
        d = dict(d)
        if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):
            d["rope_theta"] = d["rope_parameters"].get("rope_theta", cls.rope_theta)
        mt = d.get("model_type", "qwen2")
        if mt != "qwen2":
            raise ConfigError(f"{where}: model_type is {mt!r}; cosytools implements the Qwen2 LLM of CosyVoice3 only")
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if cfg.hidden_size % cfg.num_attention_heads or cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ConfigError(f"{where}: hidden_size {cfg.hidden_size}, num_attention_heads {cfg.num_attention_heads}"
                              f" and num_key_value_heads {cfg.num_key_value_heads} are inconsistent")
        return cfg

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "Qwen2Config":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"cannot read Qwen2 config {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, str(path))

    def to_dict(self) -> dict:
        """A ``config.json`` body in the HF layout (both rope spellings, like the real folder)."""
        return {
            "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
            "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": self.hidden_size,
            "initializer_range": 0.02, "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_hidden_layers, "model_type": "qwen2",
            "num_attention_heads": self.num_attention_heads, "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads, "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "rope_theta": self.rope_theta, "sliding_window": None,
            "tie_word_embeddings": self.tie_word_embeddings, "torch_dtype": "float32",
            "use_cache": True, "use_sliding_window": False, "vocab_size": self.vocab_size,
        }


class KVCache:
    """Pre-allocated per-layer key/value tensors ``[B, kv_heads, max_len, head_dim]``.

    ``length`` is how many positions are filled; a step writes at ``length`` and advances it.
    """

    def __init__(self, cfg: Qwen2Config, max_len: int, batch: int = 1,
                 device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k: List[torch.Tensor] = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v: List[torch.Tensor] = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0

    def reset(self) -> None:
        self.length = 0


class Qwen2RMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled in the input dtype (as HF Qwen2)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[T, head_dim]`` for integer ``positions`` (computed in float32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[KVCache], layer_idx: int, start: int) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            end = start + t
            cache.k[layer_idx][:, :, start:end] = k
            cache.v[layer_idx][:, :, start:end] = v
            k, v = cache.k[layer_idx][:, :, :end], cache.v[layer_idx][:, :, :end]
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        total = k.shape[2]
        if t == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        elif total == t:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # a chunk appended after cached positions: causal w.r.t. absolute positions
            qpos = torch.arange(total - t, total, device=x.device)[:, None]
            mask = torch.arange(total, device=x.device)[None, :] <= qpos
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(cfg)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[KVCache], layer_idx: int, start: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer_idx, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, inputs_embeds: torch.Tensor, cache: Optional[KVCache] = None,
                start: Optional[int] = None) -> torch.Tensor:
        """Run the decoder over ``inputs_embeds [B,T,H]`` at positions ``start…start+T-1``.

        With a cache, ``start`` defaults to ``cache.length`` and the cache advances by T.
        Returns the final-norm hidden states.  Taps ``hidden.NN`` follow HF's
        ``hidden_states`` numbering (0 = inputs, j = output of layer j-1, last = after norm).
        """
        t = inputs_embeds.shape[1]
        if start is None:
            start = cache.length if cache is not None else 0
        if cache is not None and start + t > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; a call at {start} of length {t} overflows it")
        positions = torch.arange(start, start + t, device=inputs_embeds.device)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype)
        h = inputs_embeds
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            tap(f"hidden.{i:02d}", h)
            h = layer(h, cos, sin, cache, i, start)
        h = self.norm(h)
        tap(f"hidden.{n:02d}", h)
        if cache is not None:
            cache.length = start + t
        return h


class Qwen2ForCausalLM(nn.Module):
    """Qwen2 trunk + (tied) ``lm_head``; CosyVoice3 uses only the trunk and ``embed_tokens``."""

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.config = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def num_parameters(self) -> int:
        """Parameter count with tied tensors counted once (as HF counts them)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def init_qwen2_weights(model: nn.Module, std: float = 0.02, generator: Optional[torch.Generator] = None) -> None:
    """Random init in HF's style (normal(0, std) linears/embeddings, ones for norms)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.data.normal_(0.0, std, generator=generator)
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.data.normal_(0.0, std, generator=generator)
        elif isinstance(m, Qwen2RMSNorm):
            m.weight.data.fill_(1.0)
