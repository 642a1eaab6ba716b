"""Flow and HiFT parts of the ``compiled`` backend (token -> mel -> waveform).

Flow: the pre-decoder part (token embedding, pre-lookahead convs, conditions) runs as written
(cheap, and it emits the stage taps).  The ODE runs on a length *bucket*: every [.., L] input
is padded on the right to the bucket length Lb with zero frames and a zero frame mask.  That
leaves the L valid frames unchanged: the DiT's position convolutions are causal (left-padded),
its rotary angles depend on the absolute position only, the attention mask hides padded keys
from every valid query (the chunk mask too, when streaming), and everything else is per frame;
the padded frames' own values are garbage that nothing valid reads, and they are cut off at
the end.  One Euler step (CFG batch of 2, the DiT, the CFG combination, the update) is one
compiled function with static shapes per (bucket, streaming); on CUDA the 10 steps are
captured as one CUDA graph per (bucket, streaming).

HiFT: the convolution stack (``CausalHiFTGenerator.decode_body``: conv_pre … conv_post, exp/sin)
is compiled (automatic dynamic shapes: one graph for all lengths after the second length);
the F0 predictor is compiled too and stays float64 (``compile_f0=False`` keeps it eager); the
harmonic source (float64-accumulated phase, device-independent by design) and the STFT/iSTFT
(complex tensors, which inductor does not lower) run eagerly on the model's device.  On CUDA,
once a mel length has been seen ``hift_graph_after`` times (streaming chunks repeat lengths;
one-off lengths are not worth a capture and its memory pool), the whole call — F0, source,
STFT, conv stack and an iSTFT written out without ``torch.istft``'s host-side check — is
captured as one CUDA graph for that length (``hift_full_graph``; off: only the conv stack).
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from cosytools.models.dit import grouped_conv1d_as_matmul
from cosytools.models.flow import euler_schedule
from cosytools.taps import enabled, paused, tap

from .compiled_util import Compiler, GraphCache, GraphedCall, bucket

__all__ = ["FlowRunner", "HiftRunner", "CONV_POS"]

#: how the DiT position embedding's grouped convolutions run (option ``conv_pos``)
CONV_POS = ("conv", "matmul", "triton")

log = logging.getLogger(__name__)


def _run_block(block: torch.nn.Module, h: Tensor, temb: Tensor, mask: Tensor, rope: Tensor) -> Tensor:
    """One DiT block (the block is an input: compiled once, it serves every block)."""
    return block(h, temb, mask=mask, rope=rope)


class FlowRunner:
    """Bucketed, compiled (and on CUDA graphed) flow-matching decoder of a ``CausalMaskedDiffWithDiT``."""

    def __init__(self, flow: torch.nn.Module, compiler: Compiler, *, buckets: Sequence[int], cuda_graphs: bool,
                 n_timesteps: int = 10, dynamic: bool = False, regional: bool = False,
                 conv_pos: str = "conv") -> None:
        self.flow = flow
        self.cfm = flow.decoder
        self.est = self.cfm.estimator
        w = flow.spk_embed_affine_layer.weight
        self.device, self.dtype = w.device, w.dtype
        self.buckets = tuple(buckets)
        self.compiler = compiler
        t_span = self.cfm.t_span(n_timesteps, device=self.device)
        t_seq, dt_seq = euler_schedule(t_span)
        self.t_seq = t_seq
        # separate 0-d tensors: one compiled step serves every step (no per-step specialisation)
        self.ts = [t_seq[i].clone() for i in range(n_timesteps)]
        self.dts = [dt_seq[i].clone() for i in range(n_timesteps)]
        self.cfg_rate = float(self.cfm.inference_cfg_rate)
        self.graphs_on = cuda_graphs and self.device.type == "cuda" and not compiler.inductor_cudagraphs
        # dynamic: one compiled step for every bucket (the length axis symbolic), graphs still per bucket
        self.dynamic = dynamic and compiler.backend != "none"
        # regional: one compiled DiT block for the 22 blocks, the rest of the step uncompiled (on
        # CUDA it is inside the same captured graph anyway); else the whole Euler step compiled
        self.regional = regional and compiler.backend != "none"
        dyn = None if self.dynamic else False
        self._block = compiler(_run_block, dynamic=dyn) if self.regional else None
        self._step = self.euler_step if self.regional else compiler(self.euler_step, dynamic=dyn)
        if conv_pos not in CONV_POS:
            raise ValueError(f"conv_pos must be one of {', '.join(CONV_POS)}, got {conv_pos!r}")
        # the DiT position embedding's grouped convs: cuDNN's kernel, or im2col + one batched matmul;
        # under regional compilation the glue around the blocks is not compiled, so the im2col
        # function is a region of its own (one graph for both convs: the conv is an input)
        self._conv_fn = None
        if conv_pos == "matmul":
            self._conv_fn = compiler(grouped_conv1d_as_matmul, dynamic=dyn) if self.regional else grouped_conv1d_as_matmul
        elif conv_pos == "triton":  # a direct kernel, one opaque custom op (backends.triton_conv)
            from .triton_conv import conv_fn as triton_conv_fn
            self._conv_fn = triton_conv_fn
        self.graphs = GraphCache(max_size=32, after=1, name="flow (mel bucket, streaming)")

    def bucket_len(self, length: int) -> int:
        return bucket(length, self.buckets, 256)

    # -- compiled pieces ----------------------------------------------------------------------
    def euler_step(self, x: Tensor, mu_in: Tensor, mask_in: Tensor, spks_in: Tensor, cond_in: Tensor,
                   t: Tensor, dt: Tensor, streaming: bool) -> Tensor:
        """One Euler step with classifier-free guidance (as ``CausalConditionalCFM.solve_euler``)."""
        dtype = mu_in.dtype
        x_in = torch.cat([x, x], dim=0).to(dtype)
        t_in = t.expand(2).to(dtype)
        out = self.est(x_in, mask_in, mu_in, t_in, spks_in, cond_in, streaming=streaming, block_fn=self._block,
                       conv_fn=self._conv_fn).float()
        v_cond, v_uncond = out[:1], out[1:]
        dphi = (1.0 + self.cfg_rate) * v_cond - self.cfg_rate * v_uncond
        return x + dt * dphi

    def _solve(self, z: Tensor, mu_in: Tensor, mask_in: Tensor, spks_in: Tensor, cond_in: Tensor,
               streaming: bool, on_step: Optional[Callable[[int, Tensor], None]] = None) -> Tensor:
        x = z
        if self.dynamic:
            for t in (x, mu_in, mask_in, cond_in):
                torch._dynamo.mark_dynamic(t, 2)
        with paused():
            for i in range(len(self.ts)):
                x = self._step(x, mu_in, mask_in, spks_in, cond_in, self.ts[i], self.dts[i], streaming)
                if on_step is not None:
                    on_step(i, x)
        return x

    def solve(self, z: Tensor, mu_in: Tensor, mask_in: Tensor, spks_in: Tensor, cond_in: Tensor,
              streaming: bool, on_step: Optional[Callable[[int, Tensor], None]] = None) -> Tensor:
        """The 10 Euler steps on bucket-length inputs; one graph replay on CUDA (``on_step`` is then
        not called: the steps are not observable inside the graph)."""
        if self.compiler.inductor_cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        if not self.graphs_on:
            return self._solve(z, mu_in, mask_in, spks_in, cond_in, streaming, on_step)
        args = (z, mu_in, mask_in, spks_in, cond_in)
        key = (z.shape[-1], streaming)
        g = self.graphs.get(key, lambda: GraphedCall(
            lambda *a: self._solve(*a, streaming=streaming), args))
        return g(*args).clone()

    # -- stage call ---------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, token: Tensor, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor, *,
                 streaming: bool, finalize: bool, noise: Optional[Tensor]) -> Tensor:
        d = self.device
        n = lambda x: torch.tensor([x.shape[1]], dtype=torch.int32, device=d)  # noqa: E731
        mu, mask, spk, conds, mel_len1 = self.flow.prepare_decoder_inputs(
            token, n(token), prompt_token, n(prompt_token), prompt_feat, embedding, finalize)
        z = self.cfm.initial_state(mu, None if noise is None else noise.to(d))
        length = mu.shape[2]
        pad = self.bucket_len(length) - length
        dtype = mu.dtype
        mask_in = torch.cat([mask, mask], dim=0).to(dtype)
        mu_in = torch.cat([mu, torch.zeros_like(mu)], dim=0)
        spks_in = torch.cat([spk, torch.zeros_like(spk)], dim=0).to(dtype)
        cond_in = torch.cat([conds, torch.zeros_like(conds)], dim=0).to(dtype)
        if pad:
            z, mu_in, mask_in, cond_in = (F.pad(t, (0, pad)) for t in (z, mu_in, mask_in, cond_in))
        tap("t", self.t_seq)
        on_step = None
        if enabled():
            def on_step(i: int, x: Tensor) -> None:
                tap(f"step{i:02d}.x", x[:, :, :length])
        x = self.solve(z.contiguous(), mu_in.contiguous(), mask_in.contiguous(), spks_in.contiguous(),
                       cond_in.contiguous(), streaming, on_step)
        return x[:, :, mel_len1:length].float()


class HiftRunner:
    """Compiled HiFT decode (see the module docstring for what is compiled, graphed or eager)."""

    def __init__(self, hift: torch.nn.Module, compiler: Compiler, *, cuda_graphs: bool, compile_f0: bool = True,
                 graph_after: int = 2, graph_max: int = 16, full_graph: bool = True) -> None:
        self.hift = hift
        self.device = hift.conv_pre.weight.device
        self.compiler = compiler
        # the time axis is marked dynamic on every call: one compiled graph per finalize flag
        self._f0 = compiler(hift.f0_predictor.forward, dynamic=None) if compile_f0 else None
        self._body = compiler(hift.decode_body, dynamic=None)
        self._dynamic = compiler.backend != "none"
        self.graphs_on = cuda_graphs and self.device.type == "cuda" and not compiler.inductor_cudagraphs
        # graph_max: a streamed utterance makes ~5 vocoder calls of distinct lengths (4 chunks + the
        # final call); with fewer graphs than that, LRU eviction re-captured a graph on every call of
        # every repetition (each capture: two warm-up runs and a device-wide sync)
        self.graphs = GraphCache(max_size=graph_max, after=graph_after, name="HiFT conv stack")
        # full_graph: the whole call (F0, source, STFT, conv stack, iSTFT) as one graph per mel
        # length; without it only the conv stack is captured and the rest launches from Python
        self.full_graph = bool(full_graph) and self.graphs_on
        self.full_graphs = GraphCache(max_size=graph_max, after=graph_after, name="HiFT whole call (mel frames, finalize)")

    def _mark(self, *ts: Tensor) -> None:
        if self._dynamic:
            for t in ts:
                torch._dynamo.mark_dynamic(t, t.dim() - 1)

    def _f0_call(self, x: Tensor, finalize: bool = True) -> Tensor:
        self._mark(x)
        with paused():
            return self._f0(x, finalize=finalize)

    def _body_dyn(self, mel: Tensor, s_real: Tensor, s_imag: Tensor, finalize: bool) -> Tuple[Tensor, Tensor]:
        self._mark(mel, s_real, s_imag)
        return self._body(mel, s_real, s_imag, finalize)

    def _body_call(self, mel: Tensor, s_real: Tensor, s_imag: Tensor, finalize: bool) -> Tuple[Tensor, Tensor]:
        if self.compiler.inductor_cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with paused():
            args = (mel, s_real, s_imag)
            g = None
            if self.graphs_on:
                key = (mel.shape[-1], s_real.shape[-1], finalize)
                g = self.graphs.get(key, lambda: GraphedCall(lambda *a: self._body_dyn(*a, finalize), args))
            if g is None:
                return self._body_dyn(mel, s_real, s_imag, finalize)
            mag, ph = g(*args)
            return mag.clone(), ph.clone()

    def whole_call(self, mel: Tensor, rand_ini: Tensor, sine: Tensor, uv: Tensor,
                   finalize: bool) -> Tuple[Tensor, Tensor]:
        """mel + source-noise tables -> (waveform, source): the vocoder call with no host sync (the
        iSTFT written out, :func:`istft_overlap_add`), so that it can be captured as one graph."""
        h = self.hift
        f0 = self._f0_call if self._f0 is not None else None
        mel_dec, s = h.source_excitation(mel, finalize=finalize, noise={"rand_ini": rand_ini, "sine": sine, "uv": uv},
                                         f0_predictor=f0)
        s_real, s_imag = h.source_stft(s)
        magnitude, phase = self._body_dyn(mel_dec.to(h.dtype).contiguous(), s_real.contiguous(), s_imag.contiguous(),
                                          finalize)
        return h.synthesize(magnitude, phase, finalize, graph_safe=True), s

    @torch.inference_mode()
    def __call__(self, mel: Tensor, *, finalize: bool, noise: Optional[Dict[str, Tensor]]) -> Tuple[Tensor, Tensor]:
        h = self.hift
        if not mel.is_inference():  # one kind of tensor for the compiled code (no guard failure)
            mel = mel.clone()
        if self.full_graph and not enabled():
            tables = h.source_noise(mel.shape[-1], finalize, noise, mel.device)  # checks the input too
            args = (mel.contiguous(), *(t.contiguous() for t in tables))
            with paused():
                try:
                    g = self.full_graphs.get((mel.shape[-1], finalize), lambda: GraphedCall(
                        lambda *a: self.whole_call(*a, finalize=finalize), args))
                except RuntimeError as e:  # an op that cannot be captured here: keep the per-part path
                    log.warning("HiFT: capturing the whole call as one CUDA graph failed (%s); capturing only "
                                "the convolution stack from now on (hift_full_graph=False)", str(e).splitlines()[0])
                    self.full_graph = False
                    g = None
                if g is not None:
                    speech, s = g(*args)
                    return speech.clone(), s.clone()
        f0 = self._f0_call if self._f0 is not None else None
        mel_dec, s = h.source_excitation(mel, finalize=finalize, noise=noise, f0_predictor=f0)
        s_real, s_imag = h.source_stft(s)
        magnitude, phase = self._body_call(mel_dec.to(h.dtype).contiguous(), s_real.contiguous(),
                                           s_imag.contiguous(), finalize)
        return h.synthesize(magnitude, phase, finalize), s
