"""LLM part of the ``compiled`` backend: static KV cache, bucketed prefill, graphed decode step,
RAS sampling on the device.

Layout (after gpt-fast): :class:`StaticLM` holds the Qwen2 trunk of a loaded ``CosyVoice3LM``
(the same parameters, not a copy) plus pre-allocated per-layer K/V caches of a fixed length
``S`` and the decode state (position, step counter, repetition window, next-token log-probs)
as module buffers.  Every function it exposes has static shapes for a given ``S`` and prefill
bucket, keeps positions in tensors and updates the caches in place, so it compiles once and
can be replayed as a CUDA graph.

Two sampling modes:

* **exact** (``exact_sampling=True``): the decode step is compiled/graphed, the sampling is the
  model's own ``ras_sampling`` on the host side, consuming the torch generator exactly like
  the eager backend — same seed, same tokens (one host sync per token).
* **device** (``exact_sampling=False``): RAS sampling (top-p 0.8, top-k 25, window 10,
  tau_r 0.1, min-length masking of the sos id) runs inside the graphed step, followed by
  the next decode step; the host reads the tokens every ``stop_check_every`` steps (or,
  with ``async_stop``, one block late while the next block runs) and discards everything
  after the first stop id.  Its randomness is a counter-based hash of (seed, step, id) —
  the seed is drawn once from the caller's generator — so the tokens do not depend on
  ``stop_check_every``, on the stop-check scheme or on the device; they are a valid RAS draw
  but not eager's draw.
"""
from __future__ import annotations

import collections
import logging
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from cosytools.models.llm import CosyVoice3LM, TeacherForcedResult
from cosytools.models.qwen2 import apply_rope, rope_cos_sin
from cosytools.taps import paused, tap

from .base import LLMSession
from .compiled_util import Compiler, GraphCache, GraphedCall, bucket, pow2_bucket

__all__ = ["StaticLM", "LLMRunner", "ras_sample_device", "hash_exponential", "consume_blocks",
           "decode_layer", "prefill_layer"]

log = logging.getLogger(__name__)

_M32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------- device sampling

def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors holding values in [0, 2^32).

    Multipliers stay below 2^31 so that no int64 product overflows (identical on every device)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x68E31DA5) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 13)


def hash_exponential(seed: torch.Tensor, step: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """``n`` Exp(1) variates [n] float32, a pure function of (seed, step, stream, index).

    ``seed``, ``step``: int64 tensors [1].  Used instead of a stateful RNG inside the graphed step:
    nothing to register with CUDA graphs, the same numbers on CPU and GPU, and independent of
    how the steps are grouped between host syncs."""
    j = torch.arange(n, device=seed.device, dtype=torch.int64)
    s = _mix32((seed & _M32) ^ _mix32((step * 2 + stream) & _M32))
    x = _mix32(_mix32((j * 0x61C88647 + s) & _M32) ^ s)  # multiplier < 2^31: Triton folds it as int32
    u = ((x >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)  # (0, 1), 24 bits
    return -torch.log(u)


def ras_sample_device(logp: torch.Tensor, window: torch.Tensor, e1: torch.Tensor, e2: torch.Tensor,
                      top_p: float = 0.8, top_k: int = 25, win_size: int = 10, tau_r: float = 0.1) -> torch.Tensor:
    """Repetition-aware sampling without host sync: returns the id [1] int64.

    ``logp`` [V] float32 log-probs; ``window`` [win_size] int64 last decoded ids (-1 = empty);
    ``e1``, ``e2`` [V] Exp(1) noise.  Same rule as :func:`cosytools.models.sampling.ras_sampling`:
    nucleus = the longest prefix of the sorted distribution (at most ``top_k``) whose running sum
    before each entry is below ``top_p``; a draw from it (exponential race: argmax p_i / E_i is
    distributed as p); when that id already fills ``tau_r`` of the window, redraw from the full
    distribution with the id removed.
    """
    probs = logp.softmax(dim=-1)
    top_v, top_i = probs.topk(top_k)
    keep = (top_v.cumsum(0) - top_v) < top_p
    score = torch.where(keep, top_v / e1.gather(0, top_i), torch.full_like(top_v, -1.0))
    pick = top_i.gather(0, score.argmax(0, keepdim=True))  # [1]
    rep = (window == pick).sum()
    fire = rep.to(torch.float32) >= win_size * tau_r
    probs2 = logp.scatter(0, pick, float("-inf")).softmax(dim=-1)
    pick2 = (probs2 / e2).argmax(0, keepdim=True)
    return torch.where(fire, pick2, pick)


# ----------------------------------------------------------------------------- static model

class _LayerCache(nn.Module):
    """One layer's static K/V cache and, where the projections are fused (see :class:`StaticLM`),
    its q|k|v and gate|up weight copies — as buffers, so that a compiled per-layer function sees
    them as inputs and serves every layer with one compiled graph."""

    def __init__(self, shape: Tuple[int, ...], device: torch.device, dtype: torch.dtype,
                 layer: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.fused = layer is not None
        if layer is not None:
            a, m = layer.self_attn, layer.mlp
            with torch.no_grad():
                self.register_buffer("qkv_w", torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                                     persistent=False)
                self.register_buffer("qkv_b", torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
                                     persistent=False)
                self.register_buffer("gate_up_w", torch.cat([m.gate_proj.weight, m.up_proj.weight]),
                                     persistent=False)


def _heads(x: torch.Tensor, n: int, d: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.reshape(b, t, n, d).transpose(1, 2)


def layer_qkv(layer: nn.Module, c: _LayerCache, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Normed input x [1, T, H] -> rotated q [1, heads, T, D], rotated k and v [1, kv, T, D]."""
    a = layer.self_attn
    nq, nkv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    if c.fused:
        q, k, v = F.linear(x, c.qkv_w, c.qkv_b).split([nq, nkv, nkv], dim=-1)
    else:
        q, k, v = a.q_proj(x), a.k_proj(x), a.v_proj(x)
    q, k, v = _heads(q, a.num_heads, a.head_dim), _heads(k, a.num_kv_heads, a.head_dim), \
        _heads(v, a.num_kv_heads, a.head_dim)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def layer_mlp(layer: nn.Module, c: _LayerCache, x: torch.Tensor) -> torch.Tensor:
    if c.fused:
        gate, up = F.linear(x, c.gate_up_w).chunk(2, dim=-1)
        return layer.mlp.down_proj(F.silu(gate) * up)
    return layer.mlp(x)


def attend_one(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query position over the whole static cache, grouped-query without
    repeating K/V (the ``repeat_interleave`` of the prefill would copy the cache 7 times per
    layer and step); scores, softmax and weighted sum in float32.  q [1, H, 1, D],
    k/v [1, KV, S, D], mask [1, 1, 1, S] (True = visible)."""
    b, h, _, d = q.shape
    kvh = k.shape[1]
    # head i uses kv head i // (h // kvh), as repeat_interleave does
    qg = q.reshape(b, kvh, h // kvh, 1, d).float()
    # products and sums instead of matmuls: at one query the two tiny batched GEMMs cost more
    # than the work (measured on the H100: 17 us per layer in cuBLAS float32); inductor turns
    # these into two fused reductions that read the cache once
    scores = (qg * k.float().unsqueeze(2)).sum(-1) * (1.0 / math.sqrt(d))  # [1, KV, rep, S]
    p = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    out = (p.unsqueeze(-1) * v.float().unsqueeze(2)).sum(-2).to(q.dtype)  # [1, KV, rep, D]
    return attn.o_proj(out.reshape(b, 1, h * d))


def decode_layer(layer: nn.Module, c: _LayerCache, h: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One decoder layer at one position: writes K/V at ``pos`` into the cache, returns the new h.
    The same code for all layers (the layer's modules and buffers are its inputs), so compiled on
    its own it is one graph for the 24 layers (``regional`` compilation)."""
    q, k, v = layer_qkv(layer, c, layer.input_layernorm(h), cos, sin)
    c.k.index_copy_(2, pos, k)
    c.v.index_copy_(2, pos, v)
    h = h + attend_one(layer.self_attn, q, c.k, c.v, mask)
    return h + layer_mlp(layer, c, layer.post_attention_layernorm(h))


def prefill_layer(layer: nn.Module, c: _LayerCache, h: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
    """One decoder layer over a (padded) prompt with causal attention; fills cache positions [0, T)."""
    a = layer.self_attn
    t = h.shape[1]
    q, k, v = layer_qkv(layer, c, layer.input_layernorm(h), cos, sin)
    c.k[:, :, :t] = k
    c.v[:, :, :t] = v
    rep = a.num_heads // a.num_kv_heads
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    h = h + a.o_proj(out.transpose(1, 2).reshape(1, t, a.num_heads * a.head_dim))
    return h + layer_mlp(layer, c, layer.post_attention_layernorm(h))


class StaticLM(nn.Module):
    """The CosyVoice3 LM over a static KV cache of ``max_len`` positions (see the module docstring).

    Buffers: per-layer ``caches[i].k/v`` [1, kv_heads, S, head_dim]; ``pos`` [1] next write
    position; ``logp`` [V] / ``hidden`` [H] of the last call; device-sampling state ``step_i``,
    ``min_len``, ``strict`` (1: mask every stop id before ``min_len``), ``seed``, ``window``,
    ``tokens`` [S] (sampled ids by step), ``tok_in`` [1].
    """

    def __init__(self, lm: CosyVoice3LM, max_len: int, win_size: int = 10, top_p: float = 0.8,
                 top_k: int = 25, tau_r: float = 0.1, fuse: Optional[bool] = None) -> None:
        super().__init__()
        self.lm = lm
        cfg = lm.llm.config
        w = lm.llm_decoder.weight
        device, dtype = w.device, w.dtype
        self.S = int(max_len)
        self.head_dim, self.theta = cfg.head_dim, cfg.rope_theta
        self.sos = lm.speech_token_size
        self.top_p, self.top_k, self.win_size, self.tau_r = top_p, top_k, win_size, tau_r
        shape = (1, cfg.num_key_value_heads, self.S, cfg.head_dim)
        # decode-step projections fused per layer (q|k|v and gate|up: 4 matrix-vector products per
        # layer instead of 7; at batch 1 each is latency-bound).  Copies of the weights, so only where
        # it pays: on CUDA (+~0.5 GB in bf16 for the 0.5B model); elsewhere the module's own weights
        # (``fuse``: None = on CUDA only, True/False to force)
        self.fused = device.type == "cuda" if fuse is None else bool(fuse)
        has_bias = all(getattr(lm.llm.model.model.layers[0].self_attn, n).bias is not None
                       for n in ("q_proj", "k_proj", "v_proj"))
        self.fused = self.fused and has_bias  # Qwen2 always has q/k/v biases
        self.caches = nn.ModuleList(_LayerCache(shape, device, dtype, layer if self.fused else None)
                                    for layer in lm.llm.model.model.layers)
        V = lm.llm_decoder.out_features
        long = dict(device=device, dtype=torch.long)
        for name, t in (("pos", torch.zeros(1, **long)), ("step_i", torch.zeros(1, **long)),
                        ("min_len", torch.zeros(1, **long)), ("seed", torch.zeros(1, **long)),
                        ("strict", torch.zeros(1, **long)),
                        ("tok_in", torch.zeros(1, **long)), ("window", torch.full((win_size,), -1, **long)),
                        ("tokens", torch.zeros(self.S, **long)),
                        ("logp", torch.zeros(V, device=device, dtype=torch.float32)),
                        ("hidden", torch.zeros(cfg.hidden_size, device=device, dtype=dtype))):
            self.register_buffer(name, t, persistent=False)
        self.owner: Optional[object] = None  # the session whose state the buffers hold

    _STATE = ("pos", "step_i", "min_len", "seed", "strict", "tok_in", "window", "logp", "hidden", "tokens")

    def snapshot(self, tail: int = 0) -> Dict[str, Any]:
        """Copies of the decode state and of the last ``tail`` cache positions of every layer."""
        snap: Dict[str, Any] = {n: getattr(self, n).clone() for n in self._STATE}
        if tail:
            snap["_tail"] = [(c.k[:, :, -tail:].clone(), c.v[:, :, -tail:].clone()) for c in self.caches]
        return snap

    def restore(self, snap: Dict[str, Any]) -> None:
        for n, t in snap.items():
            if n == "_tail":
                for c, (k, v) in zip(self.caches, t):
                    c.k[:, :, -k.shape[2]:].copy_(k)
                    c.v[:, :, -v.shape[2]:].copy_(v)
            else:
                getattr(self, n).copy_(t)

    # -- pieces ----------------------------------------------------------------------------
    @property
    def trunk(self) -> nn.Module:
        return self.lm.llm.model.model

    # -- compiled entry points ---------------------------------------------------------------
    def prefill(self, emb: torch.Tensor, last: torch.Tensor,
                layer_fn: Optional[Callable] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """emb [1, Tb, H] (right-padded prompt), last [1] = true length - 1 -> (logp [V], hidden [H],
        final hidden states [1, Tb, H]); fills cache positions [0, Tb) and sets ``pos`` = last + 1.
        Causal attention makes the padding invisible to the valid positions; the padded cache
        entries lie beyond ``pos`` and are overwritten by the decode steps before anything reads them.
        ``layer_fn``: a compiled :func:`prefill_layer` (regional compilation), else the plain one."""
        layer_fn = layer_fn or prefill_layer
        t = emb.shape[1]
        cos, sin = rope_cos_sin(torch.arange(t, device=emb.device), self.head_dim, self.theta, emb.dtype)
        h = emb
        for layer, c in zip(self.trunk.layers, self.caches):
            h = layer_fn(layer, c, h, cos, sin)
        h = self.trunk.norm(h)
        last_h = h.index_select(1, last)[:, 0]
        logp = self.lm.logp(last_h)[0]
        self.logp.copy_(logp)
        self.hidden.copy_(last_h[0])
        self.pos.copy_(last + 1)
        return logp, last_h[0], h

    def _decode(self, emb: torch.Tensor, layer_fn: Optional[Callable] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """One position through the trunk (``layer_fn``: a compiled :func:`decode_layer`, or the plain
        one) -> (logp [V], hidden [H]); advances ``pos``."""
        layer_fn = layer_fn or decode_layer
        pos = self.pos
        cos, sin = rope_cos_sin(pos, self.head_dim, self.theta, emb.dtype)
        mask = (torch.arange(self.S, device=pos.device) <= pos).view(1, 1, 1, self.S)
        h = emb
        for layer, c in zip(self.trunk.layers, self.caches):
            h = layer_fn(layer, c, h, pos, cos, sin, mask)
        h = self.trunk.norm(h)
        last = h[:, -1]
        logp = self.lm.logp(last)[0]
        self.pos.add_(1)
        self.logp.copy_(logp)
        self.hidden.copy_(last[0])
        return logp, last[0]

    def embed(self, tok: torch.Tensor) -> torch.Tensor:
        """Speech-token embedding of ``tok`` [1] -> [1, 1, H] (the decode step's input)."""
        return self.lm.speech_embedding.weight.index_select(0, tok).view(1, 1, -1)

    def step_exact(self, decode: Optional[Callable] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Feed ``tok_in`` at ``pos`` -> (logp [V], hidden [H]) of the next token.  ``decode``: the
        (compiled) ``_decode`` to run, shared with :meth:`step_device` so that the 24-layer step is
        compiled once."""
        return (decode or self._decode)(self.embed(self.tok_in))

    def step_device(self, decode: Optional[Callable] = None, sample: Optional[Callable] = None) -> torch.Tensor:
        """Sample token ``step_i`` from ``logp`` (RAS, min-length mask), record it in ``tokens`` and
        the repetition window, and run the decode step on it.  Returns the token [1]."""
        tok = (sample or self.sample_device)()
        (decode or self._decode)(self.embed(tok))
        self.step_i.add_(1)
        return tok

    def sample_device(self) -> torch.Tensor:
        """The sampling half of :meth:`step_device` (no decode, ``step_i`` unchanged)."""
        i = self.step_i
        V = self.logp.shape[0]
        ids = torch.arange(V, device=i.device)
        # before min_len: upstream masks the sos id only; strict_min_len masks every stop id
        banned = (ids == self.sos) | ((self.strict > 0) & (ids >= self.sos))
        logp = torch.where(banned & (i < self.min_len), float("-inf"), self.logp)
        e1 = hash_exponential(self.seed, i, 0, V)
        e2 = hash_exponential(self.seed, i, 1, V)
        tok = ras_sample_device(logp, self.window, e1, e2, self.top_p, self.top_k, self.win_size, self.tau_r)
        self.tokens.index_copy_(0, i, tok)
        self.window.copy_(torch.cat([self.window[1:], tok]))
        return tok


# ----------------------------------------------------------------------------- host side

def consume_blocks(blocks: Iterator[List[int]], is_stop: Callable[[int], bool],
                   sampled: Optional[List[int]]) -> Iterator[int]:
    """Yield the ids of successive blocks up to (not including) the first stop id; ids after it
    are discarded.  Every id up to and including the stop goes to ``sampled``."""
    for block in blocks:
        for t in block:
            if sampled is not None:
                sampled.append(t)
            if is_stop(t):
                return
            yield t


class _Session(LLMSession):
    """A prefilled static cache; ``step`` runs the compiled (graphed) decode step."""

    def __init__(self, runner: "LLMRunner", static: StaticLM, prompt_len: int, capacity: int) -> None:
        self.runner, self.static = runner, static
        self.prompt_len, self.capacity = prompt_len, capacity
        self.length = prompt_len
        static.owner = self

    def _check(self) -> None:
        if self.static.owner is not self:
            raise RuntimeError("this LLM session's static KV cache was taken over by a newer session of the "
                               "same size on the same backend; keep one live session per backend")

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        self._check()
        if self.length + 1 > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; a call at {self.length} of length 1 "
                             "overflows it")
        self.static.tok_in.fill_(int(token))
        logp, hidden = self.runner.decode_exact(self.static)
        self.length += 1
        self.logp, self.hidden = logp.clone(), hidden.clone()
        return self.logp


class LLMRunner:
    """Static caches (one per cache length), their compiled functions and CUDA graphs."""

    def __init__(self, lm: CosyVoice3LM, compiler: Compiler, *, prefill_buckets: Sequence[int],
                 cuda_graphs: bool, exact_sampling: bool, stop_check_every: int, async_stop: bool,
                 min_cache: int = 256, regional: bool = False) -> None:
        self.lm, self.compiler = lm, compiler
        self.device = lm.llm_decoder.weight.device
        self.prefill_buckets = tuple(prefill_buckets)
        self.graphs_on = cuda_graphs and self.device.type == "cuda" and not compiler.inductor_cudagraphs
        self.exact_sampling = exact_sampling
        self.stop_check_every = max(1, int(stop_check_every))
        self.async_stop = async_stop and self.device.type == "cuda"
        self.min_cache = min_cache
        self.regional = bool(regional) and compiler.backend != "none"
        self._layer_fns: Optional[Tuple[Callable, Callable]] = None
        self.statics: Dict[int, StaticLM] = {}
        self.fns: Dict[int, Dict[str, Callable]] = {}
        self.graphs = GraphCache(max_size=64, after=1, name="LLM")
        self._pinned: Optional[torch.Tensor] = None
        self.steps_run = 0  # device-sampling steps executed (including the discarded ones after a stop)

    # -- caches and compiled functions ------------------------------------------------------
    def cache_len(self, prompt_len: int, max_new: int) -> int:
        tb = self.prefill_len(prompt_len)
        return pow2_bucket(max(tb, prompt_len + max_new + 1), self.min_cache)

    def prefill_len(self, prompt_len: int) -> int:
        step = max(self.prefill_buckets) if self.prefill_buckets else 1
        return bucket(prompt_len, self.prefill_buckets, step)

    def static(self, S: int) -> StaticLM:
        if S not in self.statics:
            with torch.inference_mode():
                st = StaticLM(self.lm, S)
            self.statics[S] = st
            c = self.compiler
            # one compiled decode body serves both sampling modes (a second copy would double the
            # compile time of the largest graph); the glue between the pieces is a few small ops,
            # captured into the same CUDA graph on GPU.  regional: one compiled layer for all layers
            # (shared by every cache length too), the glue around it uncompiled
            sample = c(st.sample_device)
            if self.regional:
                if self._layer_fns is None:
                    self._layer_fns = (c(prefill_layer), c(decode_layer))
                pf, dl = self._layer_fns
                decode = lambda emb: st._decode(emb, dl)  # noqa: E731
                prefill = lambda emb, last: st.prefill(emb, last, pf)  # noqa: E731
            else:
                decode, prefill = c(st._decode), c(st.prefill)
            self.fns[S] = {"prefill": prefill, "exact": lambda: st.step_exact(decode),
                           "device": lambda: st.step_device(decode, sample)}
        return self.statics[S]

    def _graph(self, st: StaticLM, name: str, *args: torch.Tensor) -> GraphedCall:
        """The CUDA graph of ``fns[S][name]`` for these input shapes, captured on first use.

        Capturing runs the function a few times (warm-up, compilation): the decode steps run at
        the last cache positions, which are saved and restored with the rest of the decode
        state, so capturing mid-session is safe (a prefill warm-up rewrites the cache from
        position 0, which is why prefill graphs are captured right before a prefill).  Capture
        itself only records: nothing runs on the state until the graph is replayed."""
        fn = self.fns[st.S][name]
        key = (name, st.S) + tuple(tuple(a.shape) for a in args)
        warm = 2

        def make() -> GraphedCall:
            snap = st.snapshot(tail=warm + 1)
            st.pos.fill_(st.S - warm - 1)
            st.step_i.zero_()
            try:
                with paused():
                    return GraphedCall(fn, args, warmup=warm)
            finally:
                st.restore(snap)

        return self.graphs.get(key, make)

    def _call(self, st: StaticLM, name: str, *args: torch.Tensor) -> Any:
        if self.graphs_on:
            return self._graph(st, name, *args)(*args)
        if self.compiler.inductor_cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with paused():
            return self.fns[st.S][name](*args)

    def decode_exact(self, st: StaticLM) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._call(st, "exact")

    def _prefill(self, st: StaticLM, lm_input: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = lm_input.shape[1]
        tb = self.prefill_len(T)
        emb = F.pad(lm_input, (0, 0, 0, tb - T))
        last = torch.tensor([T - 1], device=lm_input.device, dtype=torch.long)
        logp, hidden, h = self._call(st, "prefill", emb, last)
        return logp.clone(), hidden.clone(), h[:, :T].clone()

    def prepare(self, lm_input: torch.Tensor, max_new: int) -> Tuple[StaticLM, torch.Tensor, torch.Tensor]:
        """Allocate/reuse the cache for this call, make sure its graphs exist (their warm-up runs
        scribble on the state), then prefill.  Returns (static, logp, hidden)."""
        S = self.cache_len(lm_input.shape[1], max_new)
        st = self.static(S)
        if self.graphs_on:  # capture (not run) the step graphs before the prefill defines the state
            self._graph(st, "exact")
            if not self.exact_sampling:
                self._graph(st, "device")
        logp, hidden, h = self._prefill(st, lm_input)
        tap("final_hidden", h)
        return st, logp, hidden

    # -- stage calls ---------------------------------------------------------------------------
    @torch.inference_mode()
    def session(self, lm_input: torch.Tensor, max_new_tokens: int) -> _Session:
        st, logp, hidden = self.prepare(lm_input, max_new_tokens)
        s = _Session(self, st, lm_input.shape[1], lm_input.shape[1] + max_new_tokens + 1)
        s.logp, s.hidden = logp, hidden
        return s

    @torch.inference_mode()
    def teacher_force(self, lm_input: torch.Tensor, forced: Sequence[int]) -> TeacherForcedResult:
        s = self.session(lm_input, len(forced))
        rows, hiddens = [s.logp], [s.hidden]
        for t in forced:
            s.step(int(t))
            rows.append(s.logp)
            hiddens.append(s.hidden)
        res = TeacherForcedResult(torch.stack(rows), torch.stack(hiddens))
        tap("step_hidden", res.step_hidden)
        return res

    def generate(self, lm_input: torch.Tensor, min_len: int, max_len: int,
                 generator: Optional[torch.Generator], sampled: Optional[List[int]],
                 strict_min_len: bool = False, exact: Optional[bool] = None) -> Iterator[int]:
        exact = self.exact_sampling if exact is None else exact
        if exact:
            yield from self._generate_exact(lm_input, min_len, max_len, generator, sampled, strict_min_len)
        else:
            yield from self._generate_device(lm_input, min_len, max_len, generator, sampled, strict_min_len)

    def _generate_exact(self, lm_input: torch.Tensor, min_len: int, max_len: int,
                        generator: Optional[torch.Generator], sampled: Optional[List[int]],
                        strict_min_len: bool = False) -> Iterator[int]:
        lm = self.lm
        with torch.inference_mode():
            s = self.session(lm_input, max_len)
        loop = lm.sampling_loop(s.logp, s.step, min_len, max_len, generator, sampled, strict_min_len)
        while True:  # inference mode around each step only, never across a yield
            with torch.inference_mode():
                top = next(loop, None)
            if top is None:
                return
            yield top

    def _generate_device(self, lm_input: torch.Tensor, min_len: int, max_len: int,
                         generator: Optional[torch.Generator], sampled: Optional[List[int]],
                         strict_min_len: bool = False) -> Iterator[int]:
        lm = self.lm
        with torch.inference_mode():
            st, _, _ = self.prepare(lm_input, max_len)
            owner = st.owner = object()
            gdev = generator.device if generator is not None else torch.device("cpu")
            seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator, device=gdev))
            st.seed.fill_(seed)
            st.min_len.fill_(int(min_len))
            st.strict.fill_(1 if strict_min_len else 0)
            st.step_i.zero_()
            st.window.fill_(-1)
        yield from consume_blocks(self._blocks(st, max_len, owner), lm.is_stop_token, sampled)

    def _blocks(self, st: StaticLM, max_len: int, owner: object) -> Iterator[List[int]]:
        """Run the device-sampling steps in blocks of ``stop_check_every``; yield each block's ids.

        With ``async_stop`` (CUDA) block b+1 is queued before block b's ids are read (through a
        pinned buffer), so the GPU never waits for the host's stop check."""
        k = self.stop_check_every
        depth = 2 if self.async_stop else 1
        if self.async_stop and (self._pinned is None or self._pinned.numel() < st.S):
            self._pinned = torch.empty(st.S, dtype=torch.long, pin_memory=True)
        pending: collections.deque = collections.deque()
        launched = 0
        while True:
            with torch.inference_mode():
                while launched < max_len and len(pending) < depth:
                    if st.owner is not owner:
                        raise RuntimeError("the static KV cache was taken over by another call during generation")
                    n = min(k, max_len - launched)
                    for _ in range(n):
                        self._call(st, "device")
                    self.steps_run += n
                    ev = None
                    if self.async_stop:
                        self._pinned[launched:launched + n].copy_(st.tokens[launched:launched + n], non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record()
                    pending.append((launched, n, ev))
                    launched += n
                if not pending:
                    return
                start, n, ev = pending.popleft()
                if ev is not None:
                    ev.synchronize()
                    block = self._pinned[start:start + n].tolist()
                else:
                    block = st.tokens[start:start + n].tolist()
            yield block
