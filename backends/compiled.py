"""The ``compiled`` backend: torch.compile (inductor) + CUDA graphs, static KV cache, shape buckets.

Same weights and stage interface as ``eager`` (the modules of the loaded model are used in
place, nothing is copied).  What runs how:

===========  ==========================================================================
LLM          static pre-allocated KV cache (length: next power of two >= prompt bucket +
             max tokens + 1, min 256); prefill compiled per prompt-length bucket (right
             padding; causal attention keeps it invisible); one-token decode step compiled
             with static shapes (position in a tensor, in-place cache writes) and on CUDA
             captured in a CUDA graph.  Sampling: *exact* (the model's ``ras_sampling`` on
             the host, RNG consumed as eager -> eager's tokens) or *device* (RAS inside the
             graphed step, stop checked every ``stop_check_every`` tokens).
             See :mod:`backends.compiled_llm`.
flow         pre-decoder part as written; the Euler step (CFG batch 2 + DiT + update)
             compiled per length bucket (right padding, masked) and streaming flag; on CUDA
             the 10 steps captured as one graph per bucket.  See :mod:`backends.compiled_flow`.
HiFT         conv stack compiled (dynamic length); F0 predictor compiled in float64; source,
             STFT/iSTFT eager on the device; on CUDA the whole call captured as one graph
             per repeated mel length (``hift_full_graph``).
===========  ==========================================================================

Options (keyword arguments of ``backends.create("compiled", model, **options)``, or the
environment variable ``COSYTOOLS_COMPILED="key=value,key=value"`` for commands that take no
options, e.g. ``COSYTOOLS_COMPILED="compile_backend=aot_eager" cosytools parity run …``;
explicit keyword arguments win; tuples are written ``16:32:64``):

``mode``               inductor mode: ``default`` (default), ``max-autotune-no-cudagraphs``,
                       ``reduce-overhead`` (then torch.compile's own CUDA graphs are used
                       instead of the backend's manual capture), ``max-autotune``.
``compile_backend``    ``inductor`` (default), ``aot_eager``/``eager`` (Dynamo only, quick
                       to build: tests, debugging), ``none`` (no torch.compile; static
                       shapes and graphs still apply).
``cuda_graphs``        capture CUDA graphs (default: True on CUDA; ignored on CPU).
``exact_sampling``     default True on CPU (tokens == eager's for a seed), **False on CUDA**
                       (device sampling, no per-token host sync).
``stop_check_every``   device sampling: tokens per host stop check (default 4: read asynchronously
                       it cost nothing measurable on the H100 against 16 or 64 — 1.300 against
                       1.297 ms/token, docs/benchmarks.md — and a stream's first chunk of 25 + 3
                       tokens is ready after 28 tokens instead of 32).
``async_stop``         device sampling on CUDA: read block b while block b+1 runs (default True).
``tf32``               allow TF32 for float32 matmuls and convolutions on CUDA (default False:
                       IEEE float32, although cuDNN convolutions default to TF32 in torch).
                       Sets the process-wide ``torch.backends`` flags when the backend is
                       created, as the eager backend does.
``prefill_buckets``    prompt-length buckets (default 32:64:128:256:512:1024:2048; longer
                       prompts round up to a multiple of the largest).
``flow_buckets``       mel-length buckets of the flow (default 128 … 3072, see
                       ``DEFAULT_FLOW_BUCKETS``; longer: multiples of 256; ``()`` = exact
                       lengths, no padding).
``flow_dynamic``       compile the flow step once with a symbolic length instead of once per
                       bucket (default False); padding and per-bucket graphs stay.  H100, whole
                       steps: one build for streaming and one for whole calls (55 / 64 s, then
                       0.3 s a bucket) against ~30 s a bucket static; flow 3 % slower.
``regional``           compile one decoder layer (LLM prefill and decode) and one DiT block, each
                       reused by all 24 / 22 of them, instead of whole steps (default ``llm`` on
                       CUDA: the flow compiled as whole Euler steps ran 32.2 ms against 37.5 ms
                       regional on the H100, bf16; ``true`` on CPU, where compile time rules).
                       Cuts compile time roughly by the layer count (H100, full model, bf16:
                       warm-up 70 s against 195 s for whole steps); loses fusion across layer
                       boundaries and leaves the glue between layers uncompiled (inside the CUDA
                       graph on GPU).  ``False``: whole steps compiled; ``llm`` / ``flow``: only
                       that part regional, the other compiled as whole steps (the LLM's whole
                       decode step is the slow one to build: 134 s of 195 s on the H100).
``conv_pos``           the DiT position embedding's two grouped convolutions (16 groups, 31 taps):
                       ``matmul`` (im2col + one batched matmul, default on CUDA: cuDNN's grouped
                       kernel took ~580 us per call on an H100 in bf16), ``conv`` (the module's
                       conv1d, default on CPU) or ``triton`` (a direct Triton kernel that reads the
                       input once instead of writing the 31-tap im2col copy; falls back to
                       ``matmul`` where Triton or the group width does not suit, see
                       :mod:`backends.triton_conv`; H100, bf16: flow 35.8 against 37.5 ms for
                       ``matmul`` regional, 30.8 against 33.0 ms as whole steps; not the default
                       until its streaming first chunk is measured).
                       Same sum in another order (round-off only).
                       Under ``regional`` the im2col function is compiled as a region of its own.
``compile_f0``         compile the float64 F0 predictor (default True).
``hift_graph_after``   capture a HiFT graph for a mel length once seen this often (default 2).
``hift_full_graph``    on CUDA, capture the whole vocoder call — F0 predictor, harmonic source,
                       STFT, conv stack, iSTFT (written out without ``torch.istft``'s host-side
                       window check) — as one graph per mel length and finalize flag, not only
                       the conv stack (default True; off while taps are captured).

dtypes: the model's dtype (``load_model(dtype=…)``): float32, bf16, fp16 for the LLM and the flow;
HiFT's conv stack stays float32 unless ``hift_dtype`` says otherwise.  The model code keeps the
DiT softmax (fp16: the whole attention; bf16: inside the fused attention kernels), the RMSNorm
statistics, the rotary angles, the flow ODE state and the HiFT source/iSTFT in float32 (F0 in
float64) whatever the dtype; inductor computes LayerNorm statistics in float32 for half inputs.

Compile time and caching: :meth:`CompiledBackend.warmup` compiles (and captures) the shapes a
run will use and returns the seconds per part.  Inductor's FX graph cache (on) keeps compiled
kernels on disk across processes — ``TORCHINDUCTOR_CACHE_DIR`` (default
``/tmp/torchinductor_$USER``) — so a second process with the same shapes mostly skips
inductor's code generation; Dynamo tracing and CUDA-graph capture are redone per process.
"""
from __future__ import annotations

import collections
import logging
import os
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from cosytools.errors import ConfigError
from cosytools.models.llm import TeacherForcedResult

from .base import Backend, LLMSession, as_ids
from .compiled_flow import CONV_POS, FlowRunner, HiftRunner
from .compiled_llm import LLMRunner
from .compiled_util import Compiler, Timer, as_tuple, parse_option_string, sync

__all__ = ["CompiledBackend", "DEFAULT_PREFILL_BUCKETS", "DEFAULT_FLOW_BUCKETS", "OPTION_DEFAULTS"]

DEFAULT_PREFILL_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)
DEFAULT_FLOW_BUCKETS = (128, 256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048, 2560, 3072)

#: option -> default; ``None`` = depends on the device (see the module docstring)
OPTION_DEFAULTS: Dict[str, Any] = {
    "mode": "default", "compile_backend": "inductor", "cuda_graphs": None, "exact_sampling": None,
    "stop_check_every": 4, "async_stop": None, "tf32": False, "prefill_buckets": DEFAULT_PREFILL_BUCKETS,
    "flow_buckets": DEFAULT_FLOW_BUCKETS, "flow_dynamic": False, "compile_f0": True, "hift_graph_after": 2,
    "regional": None, "conv_pos": None, "hift_full_graph": True,
}

ENV_OPTIONS = "COSYTOOLS_COMPILED"

log = logging.getLogger(__name__)



def _regional_parts(value: Any) -> Tuple[str, ...]:
    """The ``regional`` option as the parts it applies to: True -> (llm, flow), False -> ()."""
    if isinstance(value, str) and value.lower() in ("llm", "flow"):
        return (value.lower(),)
    if isinstance(value, (bool, int)) and not isinstance(value, str):
        return ("llm", "flow") if value else ()
    if isinstance(value, (tuple, list)) and set(value) <= {"llm", "flow"}:
        return tuple(value)
    raise ConfigError(f"compiled backend: regional must be true, false, llm or flow, got {value!r}")


class CompiledBackend(Backend):
    """torch.compile + CUDA graphs over the model's own modules (options: see the module docstring)."""

    name = "compiled"

    def __init__(self, model: Any, **options: Any) -> None:
        env = parse_option_string(os.environ.get(ENV_OPTIONS, ""))
        merged = {**env, **options}
        unknown = sorted(set(merged) - set(OPTION_DEFAULTS))
        if unknown:
            src = f" (from ${ENV_OPTIONS})" if set(unknown) & set(env) else ""
            raise ConfigError(f"compiled backend: unknown option(s) {', '.join(unknown)}{src}; "
                              f"known: {', '.join(OPTION_DEFAULTS)}")
        cuda = model.device.type == "cuda"
        o = {k: merged.get(k, v) for k, v in OPTION_DEFAULTS.items()}
        o["cuda_graphs"] = bool(cuda if o["cuda_graphs"] is None else o["cuda_graphs"]) and cuda
        o["exact_sampling"] = bool((not cuda) if o["exact_sampling"] is None else o["exact_sampling"])
        o["async_stop"] = bool(cuda if o["async_stop"] is None else o["async_stop"]) and cuda
        o["regional"] = _regional_parts(("llm" if cuda else True) if o["regional"] is None else o["regional"])
        o["conv_pos"] = str(o["conv_pos"] or ("matmul" if cuda else "conv"))
        if o["conv_pos"] not in CONV_POS:
            raise ConfigError(f"compiled backend: conv_pos must be one of {', '.join(CONV_POS)}, "
                              f"got {o['conv_pos']!r}")
        o["prefill_buckets"] = as_tuple(o["prefill_buckets"])
        o["flow_buckets"] = as_tuple(o["flow_buckets"])
        o["stop_check_every"] = int(o["stop_check_every"])
        if o["stop_check_every"] < 1:
            raise ConfigError(f"compiled backend: stop_check_every must be >= 1, got {o['stop_check_every']}")
        super().__init__(model, **o)
        self.opts = o
        if cuda:
            # as the eager backend: cuDNN convolutions default to TF32, which moves float32 HiFT
            # speech by ~5e-3; float32 stays IEEE unless asked (process-wide torch flags, set here
            # once: the pipeline runs the LLM in a second thread, so no per-call toggling)
            torch.backends.cudnn.allow_tf32 = bool(o["tf32"])
            torch.backends.cuda.matmul.allow_tf32 = bool(o["tf32"])
        self.compiler = Compiler(o["compile_backend"], o["mode"], self.device)
        self._llm: Optional[LLMRunner] = None
        self._flow: Optional[FlowRunner] = None
        self._hift: Optional[HiftRunner] = None

    def describe(self) -> Dict[str, Any]:
        d = super().describe()
        for k in ("prefill_buckets", "flow_buckets"):
            d[k] = ":".join(str(x) for x in self.opts[k]) or "exact"
        d["regional"] = ",".join(self.opts["regional"]) or "off"
        return d

    # -- parts (built on first use) -------------------------------------------------------
    @property
    def llm_runner(self) -> LLMRunner:
        if self._llm is None:
            o = self.opts
            self._llm = LLMRunner(self._need("llm"), self.compiler, prefill_buckets=o["prefill_buckets"],
                                  cuda_graphs=o["cuda_graphs"], exact_sampling=o["exact_sampling"],
                                  stop_check_every=o["stop_check_every"], async_stop=o["async_stop"],
                                  regional="llm" in o["regional"])
        return self._llm

    @property
    def flow_runner(self) -> FlowRunner:
        if self._flow is None:
            self._flow = FlowRunner(self._need("flow"), self.compiler, buckets=self.opts["flow_buckets"],
                                    cuda_graphs=self.opts["cuda_graphs"], dynamic=bool(self.opts["flow_dynamic"]),
                                    regional="flow" in self.opts["regional"], conv_pos=self.opts["conv_pos"])
        return self._flow

    @property
    def hift_runner(self) -> HiftRunner:
        if self._hift is None:
            self._hift = HiftRunner(self._need("hift"), self.compiler, cuda_graphs=self.opts["cuda_graphs"],
                                    compile_f0=bool(self.opts["compile_f0"]),
                                    graph_after=int(self.opts["hift_graph_after"]),
                                    full_graph=bool(self.opts["hift_full_graph"]))
        return self._hift

    # -- LLM --------------------------------------------------------------------------------
    @property
    def token_block(self) -> int:
        return 1 if self.opts["exact_sampling"] else int(self.opts["stop_check_every"])

    def llm_session(self, text: torch.Tensor, prompt_text: torch.Tensor, prompt_speech_token: torch.Tensor,
                    max_new_tokens: int) -> LLMSession:
        return self.llm_runner.session(self._lm_input(text, prompt_text, prompt_speech_token), max_new_tokens)

    def llm_generate(self, text: torch.Tensor, prompt_text: torch.Tensor, prompt_speech_token: torch.Tensor, *,
                     min_len: Optional[int] = None, max_len: Optional[int] = None,
                     generator: Optional[torch.Generator] = None,
                     sampled: Optional[List[int]] = None, strict_min_len: bool = False,
                     exact: bool = False) -> Iterator[int]:
        lm = self._need("llm")
        text = as_ids(text, self.device)
        lo, hi = lm.length_limits(text.shape[1])
        min_len = lo if min_len is None else int(min_len)
        max_len = hi if max_len is None else int(max_len)
        lm_input = self._lm_input(text, prompt_text, prompt_speech_token)
        yield from self.llm_runner.generate(lm_input, min_len, max_len, generator, sampled, strict_min_len,
                                            exact=True if exact else None)

    def llm_teacher_force(self, text: torch.Tensor, prompt_text: torch.Tensor, prompt_speech_token: torch.Tensor,
                          forced_tokens: Sequence[int]) -> TeacherForcedResult:
        return self.llm_runner.teacher_force(self._lm_input(text, prompt_text, prompt_speech_token),
                                             [int(t) for t in forced_tokens])

    # -- flow / hift ----------------------------------------------------------------------
    def flow(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
             embedding: torch.Tensor, *, streaming: bool = False, finalize: bool = True,
             noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        runner = self.flow_runner
        d, dt = self.device, runner.dtype
        prompt_feat = prompt_feat.to(d, dt)
        if prompt_feat.dim() == 2:
            prompt_feat = prompt_feat[None]
        return runner(as_ids(token, d), as_ids(prompt_token, d), prompt_feat, embedding.to(d, dt).reshape(1, -1),
                      streaming=streaming, finalize=finalize, noise=noise)

    def hift(self, mel: torch.Tensor, *, finalize: bool = True,
             noise: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        d = self.device
        if noise is not None:
            noise = {k: v.to(d) for k, v in noise.items()}
        # float32 mel into the float64 F0 predictor, as the eager backend
        speech, source = self.hift_runner(mel.to(d, torch.float32), finalize=finalize, noise=noise)
        return speech.float(), source.float()

    # -- warm-up ---------------------------------------------------------------------------
    def warmup(self, prompt_len: int = 146, max_new_tokens: int = 250, flow_frames: Sequence[int] = (650,),
               hift_frames: Sequence[int] = (500,), streaming: Sequence[bool] = (False,)) -> Dict[str, float]:
        """Compile (and on CUDA capture) the shapes of a run: the prefill bucket of ``prompt_len``
        (LLM input positions), the decode step(s) of its cache, the flow buckets of ``flow_frames``
        (total mel frames, prompt included) for each ``streaming`` flag, HiFT at ``hift_frames``.
        The defaults are the shapes of ``cosytools bench``'s defaults (60 text tokens, 3 s prompt,
        250 speech tokens).  Returns wall seconds per part (``llm``, ``flow``, ``hift``) and
        ``total``; parts whose model component is not loaded are skipped."""
        timer = Timer(self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            if self.model.llm is not None:
                with timer.part("llm"):
                    self._warm_llm(prompt_len, max_new_tokens)
            if self.model.flow is not None:
                with timer.part("flow"):
                    for frames in flow_frames:
                        for s in streaming:
                            self._warm_flow(int(frames), bool(s))
            if self.model.hift is not None:
                with timer.part("hift"):
                    for frames in hift_frames:
                        for _ in range(max(1, int(self.opts["hift_graph_after"]))):
                            self.hift(torch.zeros(1, 80, int(frames)), finalize=True)
        sync(self.device)
        out = dict(timer.seconds)
        out["total"] = time.perf_counter() - t0
        log.info("compiled warm-up: %s", ", ".join(f"{k} {v:.1f} s" for k, v in out.items()))
        return out

    def _warm_llm(self, prompt_len: int, max_new_tokens: int) -> None:
        runner = self.llm_runner
        lm = runner.lm
        w = lm.llm_decoder.weight
        lm_input = torch.zeros(1, prompt_len, lm.llm_input_size, device=w.device, dtype=w.dtype)
        s = runner.session(lm_input, max_new_tokens)  # prefill + exact decode step
        s.step(0)
        if not self.opts["exact_sampling"]:
            gen = torch.Generator(device=self.device).manual_seed(0)
            warm = runner.generate(lm_input, 0, min(max_new_tokens, 2 * runner.stop_check_every), gen, None,
                                   exact=False)
            collections.deque(warm, maxlen=0)  # run the generator to its end

    def _warm_flow(self, frames: int, streaming: bool) -> None:
        r = self.flow_runner
        lb = r.bucket_len(frames)
        dt, d = r.dtype, self.device
        mel_dim, mu_dim = r.flow.output_size, r.flow.input_size
        z = torch.zeros(1, mel_dim, lb, device=d)
        mu_in = torch.zeros(2, mu_dim, lb, device=d, dtype=dt)
        cond_in = torch.zeros(2, mel_dim, lb, device=d, dtype=dt)
        mask_in = torch.ones(2, 1, lb, device=d, dtype=dt)
        spks_in = torch.zeros(2, r.flow.spk_embed_affine_layer.out_features, device=d, dtype=dt)
        r.solve(z, mu_in, mask_in, spks_in, cond_in, streaming)
