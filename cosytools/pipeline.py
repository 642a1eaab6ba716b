"""The synthesis pipeline: text ids -> LLM speech tokens -> flow mel -> HiFT waveform.

The pipeline holds one backend and never asks which one it is.  Prompt inputs (prompt
text ids, prompt speech tokens, prompt mel, speaker embedding) are tensors here; the
frontend (:class:`cosytools.frontend.frontend.Frontend`) turns raw text and prompt audio into
them.  The mode methods (:meth:`Pipeline.sft`, :meth:`~Pipeline.zero_shot`,
:meth:`~Pipeline.cross_lingual`, :meth:`~Pipeline.instruct`, :meth:`~Pipeline.vc`) do both, as
upstream's ``CosyVoice3.inference_*``: normalise and split the text, build each segment's
inputs, synthesise the segments one after the other.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .errors import InputError
from .models.llm import ENDOFPROMPT_ID
from .progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    from .frontend.frontend import AudioInput, Frontend, ModelInput, PromptAudio

__all__ = ["SynthResult", "StreamChunk", "Pipeline", "DEFAULT_INSTRUCTION", "TOKEN_HOP_LEN", "TOKEN_MAX_HOP_LEN",
           "STREAM_SCALE_FACTOR", "MODES", "TokenProducer", "HiftStream"]

#: synthesis modes of :class:`Pipeline` (upstream ``inference_sft/zero_shot/cross_lingual/instruct2/vc``)
MODES = ("sft", "zero_shot", "cross_lingual", "instruct", "vc")

log = logging.getLogger(__name__)

# what upstream's CosyVoice3 examples put before <|endofprompt|> when nothing else is given
DEFAULT_INSTRUCTION = "You are a helpful assistant.<|endofprompt|>"


@dataclass
class SynthResult:
    speech: torch.Tensor            # [1, samples] float32, 24 kHz
    sample_rate: int
    tokens: List[int]
    mel: torch.Tensor               # [1, 80, frames]
    timings: Dict[str, float] = field(default_factory=dict)
    segments: List[str] = field(default_factory=list)   # text pieces synthesised (mode methods)

    @property
    def seconds(self) -> float:
        return self.speech.shape[-1] / self.sample_rate


# upstream CosyVoice3Model streaming schedule: 25 tokens (= the DiT's training chunk), doubling
# per chunk up to 100.  Upstream keeps the grown hop on the model object across requests; here
# every request starts again at 25.
TOKEN_HOP_LEN = 25
TOKEN_MAX_HOP_LEN = 4 * TOKEN_HOP_LEN
STREAM_SCALE_FACTOR = 2


@dataclass
class StreamChunk:
    speech: torch.Tensor     # [1, samples] of this chunk
    tokens: int              # speech tokens consumed so far
    final: bool
    t_ready: float           # perf_counter() when the chunk was ready
    segment: int = 0         # index of the text segment (mode methods); final is set on the last one only


def _empty_ids() -> torch.Tensor:
    return torch.zeros(1, 0, dtype=torch.long)


class TokenProducer:
    """Runs a speech-token iterator (the LLM) in a background thread that fills a queue, as
    upstream's ``llm_job`` thread does, so that token2wav can work while tokens are generated.

    Iterating over the producer yields the tokens in order; an exception raised by the iterator
    is re-raised in the consumer. :meth:`close` (also on leaving a ``with`` block) asks the thread
    to stop after the token in progress, closes the iterator in that thread and waits for it.
    ``cuda_device``: run the iterator on its own CUDA stream of that device (upstream's
    ``llm_context``). The consumer's grad / inference mode is carried into the thread.
    """

    _END = object()

    def __init__(self, tokens: Iterable[int], cuda_device: Optional[torch.device] = None,
                 name: str = "cosytools-llm") -> None:
        self._it = iter(tokens)
        self._q: "queue.Queue[tuple]" = queue.Queue()
        self._stop = threading.Event()
        self._cuda_stream = None
        if cuda_device is not None and torch.device(cuda_device).type == "cuda":
            # the LLM's own stream starts after whatever the caller queued (e.g. its input tensors)
            self._cuda_stream = torch.cuda.Stream(cuda_device)
            self._cuda_stream.wait_stream(torch.cuda.current_stream(cuda_device))
        self._modes = (torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        self.produced = 0                       # tokens put on the queue so far
        self.t_end: Optional[float] = None      # perf_counter() when the iterator ended (or failed)
        self._finished = False                  # the consumer has seen the end
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        inference, grad = self._modes
        try:
            stream_ctx: Any = contextlib.nullcontext() if self._cuda_stream is None else torch.cuda.stream(
                self._cuda_stream)
            with stream_ctx, torch.inference_mode(inference), torch.set_grad_enabled(grad):
                for tok in self._it:
                    if self._stop.is_set():
                        break
                    self._q.put((int(tok), None))
                    self.produced += 1
                    if self._stop.is_set():
                        break
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._q.put((self._END, e))
        else:
            self._q.put((self._END, None))
        finally:
            self.t_end = time.perf_counter()
            close = getattr(self._it, "close", None)
            if close is not None:  # a generator's cleanup runs in the thread that ran it
                try:
                    close()
                except Exception:  # pragma: no cover - cleanup failure after the end
                    log.debug("closing the token iterator failed", exc_info=True)

    def __iter__(self) -> Iterator[int]:
        while not self._finished:
            tok, err = self._q.get()
            if tok is self._END:
                self._finished = True
                self._thread.join()
                if err is not None:
                    raise err
                return
            yield tok

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop the thread after the token in progress and wait for it (``timeout`` None: as long as it takes)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> "TokenProducer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HiftStream:
    """The vocoder half of upstream's streaming token2wav: :meth:`push` appends a mel chunk to
    the mel cache, vocodes the whole cache (``finalize=False`` until the last chunk) and returns
    only the samples not returned before (upstream's ``hift_cache_dict`` ``mel`` / ``speech_offset``)."""

    def __init__(self, backend: Any, noise: Optional[Dict[str, torch.Tensor]] = None) -> None:
        self.backend = backend
        self.noise = noise
        self.mel: Optional[torch.Tensor] = None    # [1, 80, frames] every frame pushed so far
        self.speech_offset = 0                     # samples returned so far

    def push(self, mel: torch.Tensor, finalize: bool = False) -> torch.Tensor:
        """Add ``mel`` [1, 80, frames]; the new samples [1, n] (all that remain when ``finalize``)."""
        self.mel = mel if self.mel is None else torch.cat([self.mel, mel.to(self.mel.device)], dim=2)
        speech, _ = self.backend.hift(self.mel, finalize=finalize, noise=self.noise)
        new = speech[:, self.speech_offset:]
        self.speech_offset += new.shape[1]
        return new


# upstream's CosyVoice3Model: the FSQ ids of silence and breath; its llm_job keeps at most 5 of
# them in a row (the LLM still sees every sampled id; only what reaches the flow is filtered)
SILENT_TOKENS = frozenset((1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323))
MAX_SILENT_RUN = 5


def limit_silent_runs(tokens: Iterable[int], max_run: Optional[int] = MAX_SILENT_RUN,
                      silent: frozenset = SILENT_TOKENS) -> Iterator[int]:
    """Drop silent/breath ids beyond ``max_run`` in a row, as upstream's ``llm_job`` (None: keep all)."""
    run = 0
    for t in tokens:
        if max_run is not None:
            if int(t) in silent:
                run += 1
                if run > max_run:
                    continue
            else:
                run = 0
        yield t


class Pipeline:
    """End-to-end synthesis over one backend.

    ``max_silent_tokens``: keep at most this many silent/breath ids in a row in what goes to the
    flow (upstream's rule, default 5; None keeps every sampled id).
    ``chunk_priority``: on CUDA, when streaming runs the LLM in its own thread, run each chunk's
    flow + HiFT on a high-priority CUDA stream (the LLM's stream has the lowest priority), so
    that a chunk is not queued behind decode steps (default True)."""

    def __init__(self, backend: Any, tokenizer: Any = None, progress: bool = True,
                 max_silent_tokens: Optional[int] = MAX_SILENT_RUN, chunk_priority: bool = True) -> None:
        self.backend = backend
        self.chunk_priority = chunk_priority
        self.model = backend.model
        self.tokenizer = tokenizer
        self.progress = progress
        self.max_silent_tokens = max_silent_tokens

    @classmethod
    def from_model(cls, model: Union[str, Path, None] = None, backend: str = "eager", device: Optional[str] = None,
                   dtype: Optional[str] = None, fmt: str = "auto", llm_rl: bool = False, progress: bool = True,
                   **backend_options: Any) -> "Pipeline":
        import backends
        from .frontend.tokenizer import CosyVoice3Tokenizer
        from .loading import load_model

        m = load_model(model, fmt=fmt, llm_rl=llm_rl, device=device, dtype=dtype)
        tok = CosyVoice3Tokenizer.from_dir(m.model_dir / "CosyVoice-BlankEN")
        silent = backend_options.pop("max_silent_tokens", MAX_SILENT_RUN)
        return cls(backends.create(backend, m, **backend_options), tok, progress=progress, max_silent_tokens=silent)

    @property
    def sample_rate(self) -> int:
        return self.model.config.sample_rate

    # -- text -----------------------------------------------------------------------------
    def encode(self, text: str) -> torch.Tensor:
        if self.tokenizer is None:
            raise InputError("this pipeline has no tokenizer; pass token ids instead of text")
        return torch.tensor([self.tokenizer.encode(text)], dtype=torch.long)

    def speaker_embedding(self, speaker: Optional[str]) -> torch.Tensor:
        """The embedding of ``speaker`` from ``spk2info.pt``, or zeros when ``speaker`` is None."""
        if speaker is None:
            return torch.zeros(1, 192)
        path = (self.model.model_dir or Path(".")) / "spk2info.pt"
        if not path.is_file():
            raise InputError(f"--speaker {speaker!r} needs {path}, which does not exist")
        info = torch.load(str(path), map_location="cpu", weights_only=True)
        if speaker not in info:
            raise InputError(f"speaker {speaker!r} is not in {path}; known speakers: {', '.join(sorted(info))}")
        emb = info[speaker]["embedding"] if isinstance(info[speaker], dict) else info[speaker]
        return torch.as_tensor(emb, dtype=torch.float32).reshape(1, -1)

    # -- stages -----------------------------------------------------------------------------
    def generate_tokens(self, text_ids: torch.Tensor, prompt_text_ids: Optional[torch.Tensor] = None,
                        prompt_speech_token: Optional[torch.Tensor] = None, seed: int = 0,
                        min_tokens: Optional[int] = None, max_tokens: Optional[int] = None) -> List[int]:
        """Sample speech tokens; ``seed`` seeds a private generator (same stream as ``torch.manual_seed``).

        An explicit ``min_tokens`` is strict: every stop id is masked until then (upstream's own
        rule, used when ``min_tokens`` is None, masks only id 6561)."""
        prompt_text_ids = _empty_ids() if prompt_text_ids is None else prompt_text_ids
        prompt_speech_token = _empty_ids() if prompt_speech_token is None else prompt_speech_token
        if max_tokens is not None and min_tokens is not None and min_tokens > max_tokens:
            min_tokens = max_tokens
        gen_device = self.backend.device if self.backend.device.type == "cuda" else "cpu"
        gen = torch.Generator(device=gen_device).manual_seed(seed)
        total = max_tokens if max_tokens is not None else int(text_ids.shape[1] * 20)
        out: List[int] = []
        with Progress("llm", total=total, unit="tokens", enabled=self.progress) as bar:
            def counted() -> Iterator[int]:
                for tok in self.backend.llm_generate(text_ids, prompt_text_ids, prompt_speech_token,
                                                     min_len=min_tokens, max_len=max_tokens, generator=gen,
                                                     strict_min_len=min_tokens is not None):
                    bar.update()
                    yield tok
            out.extend(limit_silent_runs(counted(), self.max_silent_tokens))
        return out

    def token2wav(self, tokens: Union[List[int], torch.Tensor], prompt_token: Optional[torch.Tensor] = None,
                  prompt_feat: Optional[torch.Tensor] = None, embedding: Optional[torch.Tensor] = None,
                  flow_noise: Optional[torch.Tensor] = None,
                  hift_noise: Optional[Dict[str, torch.Tensor]] = None,
                  speed: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Speech tokens -> (waveform [1, samples], mel [1, 80, frames]), non-streaming.

        ``speed`` != 1 stretches the mel linearly to ``int(frames / speed)`` frames before the
        vocoder, as upstream; the returned mel is the stretched one."""
        token = torch.as_tensor(tokens, dtype=torch.long).reshape(1, -1)
        if token.shape[1] == 0:
            raise InputError("no speech tokens to synthesise (the LLM stopped at once); try another seed or "
                             "set a minimum number of tokens")
        prompt_token = _empty_ids() if prompt_token is None else prompt_token
        prompt_feat = torch.zeros(1, 0, 80) if prompt_feat is None else prompt_feat
        embedding = torch.zeros(1, 192) if embedding is None else embedding
        mel = self.backend.flow(token, prompt_token, prompt_feat, embedding, streaming=False, finalize=True,
                                noise=flow_noise)
        if not bool(torch.isfinite(mel).all()):
            raise InputError("the flow stage produced NaN/Inf mel frames. Under fp16 the DiT softmax can overflow: "
                             "run the flow in float32 or bf16 (--dtype float32), and check the weights with "
                             "`cosytools parity flow`.")
        if speed != 1.0:
            mel = F.interpolate(mel, size=int(mel.shape[2] / speed), mode="linear")
        speech, _ = self.backend.hift(mel, finalize=True, noise=hift_noise)
        return speech, mel

    def token2wav_stream(self, tokens: Iterable[int], prompt_token: Optional[torch.Tensor] = None,
                         prompt_feat: Optional[torch.Tensor] = None, embedding: Optional[torch.Tensor] = None,
                         flow_noise: Optional[torch.Tensor] = None,
                         hift_noise: Optional[Dict[str, torch.Tensor]] = None, *,
                         concurrent: Optional[bool] = None, token_hop_len: int = TOKEN_HOP_LEN,
                         token_max_hop_len: int = TOKEN_MAX_HOP_LEN, stream_scale_factor: float = STREAM_SCALE_FACTOR,
                         last_call_streaming: bool = False) -> Iterator[StreamChunk]:
        """Upstream's streaming token2wav (``CosyVoice3Model.tts(stream=True)``).

        As tokens arrive, every ``hop + 3`` new tokens (3 = the flow's pre-lookahead; the first hop
        is padded so that prompt tokens + hop fill whole hops) run the flow with the chunk mask
        (``streaming=True, finalize=False``) over all tokens so far; the mel from the token offset
        on is appended to the mel cache, the cache is vocoded with ``finalize=False`` and the new
        samples are yielded. The hop grows ×``stream_scale_factor`` per chunk up to
        ``token_max_hop_len``. When the tokens end, one last call over all tokens with
        ``finalize=True`` flushes the rest; upstream makes that call with ``stream=False`` (no
        chunk mask), ``last_call_streaming=True`` keeps the mask (the protocol of upstream's
        ``flow.py`` ``__main__`` that the ``flow_stream_*`` fixtures follow).

        ``tokens``: a list / tensor of speech tokens, or any iterator of them (e.g.
        ``backend.llm_generate(...)``). An iterator is consumed in a background thread
        (:class:`TokenProducer`, upstream's ``llm_job``) so that token2wav runs while tokens are
        generated (``concurrent``: None = for iterators, unless a tap capture is active or the
        backend sets ``supports_concurrent_llm = False``; True / False to force). Closing this
        generator early stops that thread.
        """
        prompt_token = _empty_ids() if prompt_token is None else prompt_token
        prompt_feat = torch.zeros(1, 0, 80) if prompt_feat is None else prompt_feat
        embedding = torch.zeros(1, 192) if embedding is None else embedding
        if token_hop_len < 1 or token_max_hop_len < token_hop_len or stream_scale_factor < 1:
            raise InputError(f"bad streaming schedule: hop {token_hop_len}, max hop {token_max_hop_len}, scale "
                             f"{stream_scale_factor} (need hop >= 1, max hop >= hop, scale >= 1)")
        ratio = self.model.config.token_mel_ratio
        lookahead = int(getattr(self.model.flow, "pre_lookahead_len", 3))
        hop = token_hop_len
        prompt_pad = -(-prompt_token.shape[1] // hop) * hop - prompt_token.shape[1]
        got: List[int] = []
        offset = 0
        vocoder = HiftStream(self.backend, noise=hift_noise)

        chunk_stream: Optional[torch.cuda.Stream] = None

        def run(upto: int, finalize: bool, streaming: bool) -> torch.Tensor:
            if chunk_stream is None:
                return vocode(upto, finalize, streaming)
            # the chunk's flow + HiFT on a high-priority stream: the GPU schedules its kernels ahead
            # of the LLM thread's queued decode steps (lowest priority), which only wait a little
            caller = torch.cuda.current_stream(chunk_stream.device)
            chunk_stream.wait_stream(caller)
            with torch.cuda.stream(chunk_stream):
                speech = vocode(upto, finalize, streaming)
            caller.wait_stream(chunk_stream)
            speech.record_stream(caller)
            return speech

        def vocode(upto: int, finalize: bool, streaming: bool) -> torch.Tensor:
            tok = torch.tensor([got[:upto]], dtype=torch.long)
            mel = self.backend.flow(tok, prompt_token, prompt_feat, embedding, streaming=streaming,
                                    finalize=finalize, noise=flow_noise)[:, :, offset * ratio:]
            return vocoder.push(mel, finalize)

        if concurrent is None:
            concurrent = (not isinstance(tokens, (list, tuple, torch.Tensor)) and iter(tokens) is tokens
                          and not self._taps_in_use()
                          and bool(getattr(self.backend, "supports_concurrent_llm", True)))
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.flatten().tolist()
        producer: Optional[TokenProducer] = None
        if concurrent:
            dev = self.backend.device
            producer = TokenProducer(tokens, cuda_device=dev if dev.type == "cuda" else None)
            if dev.type == "cuda" and self.chunk_priority:
                chunk_stream = torch.cuda.Stream(dev, priority=-1)  # lower number = higher priority
            it: Iterator[int] = iter(producer)
        else:
            it = iter(tokens)
        try:
            done = False
            while not done:
                this_hop = hop + prompt_pad if offset == 0 else hop
                need = offset + this_hop + lookahead
                while len(got) < need:
                    try:
                        got.append(int(next(it)))
                    except StopIteration:
                        done = True
                        break
                if not done:
                    speech = run(need, finalize=False, streaming=True)
                    offset += this_hop
                    hop = min(token_max_hop_len, int(hop * stream_scale_factor))
                    yield StreamChunk(speech.cpu(), len(got), False, time.perf_counter())
            if producer is not None:
                producer.close()  # ended: join the thread before the last call (upstream: p.join())
            if not got:
                raise InputError("no speech tokens to synthesise (the LLM stopped at once)")
            last = run(len(got), finalize=True, streaming=last_call_streaming)
            yield StreamChunk(last.cpu(), len(got), True, time.perf_counter())
        finally:
            if producer is not None:
                producer.close()

    def _taps_in_use(self) -> bool:
        """True when tap captures may run: their recorder is process-global, so the LLM stays in this thread."""
        from . import taps

        if taps.enabled():
            return True
        try:
            from parity.capture import CapturingBackend
        except ImportError:  # pragma: no cover
            return False
        return isinstance(self.backend, CapturingBackend)

    def tts_stream(self, text: Union[str, torch.Tensor], prompt_text: Union[str, torch.Tensor, None] = None,
                   prompt_speech_token: Optional[torch.Tensor] = None, prompt_feat: Optional[torch.Tensor] = None,
                   embedding: Optional[torch.Tensor] = None, seed: int = 0, min_tokens: Optional[int] = None,
                   max_tokens: Optional[int] = None, add_default_instruction: bool = True) -> Iterator[StreamChunk]:
        """Streaming synthesis: yields :class:`StreamChunk` audio as soon as each chunk is ready."""
        text_ids, prompt_ids = self._prepare_text(text, prompt_text, add_default_instruction)
        prompt_speech_token = _empty_ids() if prompt_speech_token is None else prompt_speech_token
        gen_device = self.backend.device if self.backend.device.type == "cuda" else "cpu"
        gen = torch.Generator(device=gen_device).manual_seed(seed)
        token_iter = limit_silent_runs(
            self.backend.llm_generate(text_ids, prompt_ids, prompt_speech_token, min_len=min_tokens,
                                      max_len=max_tokens, generator=gen, strict_min_len=min_tokens is not None),
            self.max_silent_tokens)
        stream = self.token2wav_stream(token_iter, prompt_speech_token, prompt_feat, embedding)
        with contextlib.closing(stream) as chunks:
            yield from chunks

    def _prepare_text(self, text: Union[str, torch.Tensor], prompt_text: Union[str, torch.Tensor, None],
                      add_default_instruction: bool) -> tuple[torch.Tensor, torch.Tensor]:
        text_ids = self.encode(text) if isinstance(text, str) else torch.as_tensor(text).reshape(1, -1)
        if prompt_text is None:
            prompt_ids = _empty_ids()
        else:
            prompt_ids = self.encode(prompt_text) if isinstance(prompt_text, str) else torch.as_tensor(prompt_text).reshape(1, -1)
        has_eop = bool((text_ids == ENDOFPROMPT_ID).any()) or bool((prompt_ids == ENDOFPROMPT_ID).any())
        if not has_eop and add_default_instruction and self.tokenizer is not None:
            log.info("no <|endofprompt|> in the input: using %r as prompt text", DEFAULT_INSTRUCTION)
            prompt_ids = torch.cat([self.encode(DEFAULT_INSTRUCTION), prompt_ids], dim=1)
        return text_ids, prompt_ids

    def tts(self, text: Union[str, torch.Tensor], prompt_text: Union[str, torch.Tensor, None] = None,
            prompt_speech_token: Optional[torch.Tensor] = None, prompt_feat: Optional[torch.Tensor] = None,
            embedding: Optional[torch.Tensor] = None, seed: int = 0, min_tokens: Optional[int] = None,
            max_tokens: Optional[int] = None, add_default_instruction: bool = True) -> SynthResult:
        """Synthesise ``text`` (string or ids).  Without any ``<|endofprompt|>`` in text or prompt,
        the default instruction is used as prompt text (``add_default_instruction``) or an error raised."""
        text_ids, prompt_ids = self._prepare_text(text, prompt_text, add_default_instruction)
        # the length rules count the text tokens only (upstream: text_len - prompt_text_len)
        t0 = time.perf_counter()
        tokens = self.generate_tokens(text_ids, prompt_ids, prompt_speech_token, seed, min_tokens, max_tokens)
        t1 = time.perf_counter()
        speech, mel = self.token2wav(tokens, prompt_speech_token, prompt_feat, embedding)
        t2 = time.perf_counter()
        res = SynthResult(speech.cpu(), self.sample_rate, tokens, mel.cpu(),
                          {"llm_s": t1 - t0, "token2wav_s": t2 - t1, "total_s": t2 - t0})
        res.timings["rtf"] = res.timings["total_s"] / max(res.seconds, 1e-9)
        return res

    # -- modes (upstream CosyVoice3.inference_*) ----------------------------------------------
    @property
    def frontend(self) -> "Frontend":
        """The model dir's :class:`~cosytools.frontend.frontend.Frontend` (created on first use)."""
        fe = getattr(self, "_frontend", None)
        if fe is None:
            from .frontend.frontend import Frontend
            if self.model.model_dir is None:
                raise InputError("this pipeline's model has no model dir; set pipeline.frontend = Frontend(dir)")
            fe = Frontend(self.model.model_dir, tokenizer=self.tokenizer)
            self._frontend = fe
        return fe

    @frontend.setter
    def frontend(self, fe: "Frontend") -> None:
        self._frontend = fe

    def sft(self, text: str, speaker: Optional[str] = None, *, stream: bool = False, speed: float = 1.0,
            seed: int = 0, min_tokens: Optional[int] = None, max_tokens: Optional[int] = None,
            text_frontend: bool = True, prompt_text: Optional[str] = None,
            add_default_instruction: bool = True) -> Union[SynthResult, Iterator[StreamChunk]]:
        """Text with a stored speaker (``spk2info.pt``; ``None``: zero embedding).

        The CosyVoice3 LLM needs ``<|endofprompt|>``; when neither the text nor ``prompt_text`` has it,
        ``"You are a helpful assistant.<|endofprompt|>"`` is used as prompt text (as :meth:`tts`), or an
        InputError is raised when ``add_default_instruction`` is false."""
        from .frontend.frontend import ModelInput

        fe = self.frontend
        t0 = time.perf_counter()
        emb = fe.speaker_embedding(speaker) if speaker is not None else torch.zeros(1, 192)
        inputs = []
        for seg in fe.segments(text, text_frontend):
            text_ids, prompt_ids = self._prepare_text(seg, prompt_text, add_default_instruction)
            if not bool((text_ids == ENDOFPROMPT_ID).any()) and not bool((prompt_ids == ENDOFPROMPT_ID).any()):
                raise InputError("CosyVoice3 needs <|endofprompt|> in the text or the prompt text, and neither has "
                                 "it. Put an instruction before it, e.g. 'You are a helpful assistant."
                                 "<|endofprompt|>Hello', or allow the default instruction.")
            inputs.append(ModelInput("sft", text=text_ids, prompt_text=prompt_ids, llm_embedding=emb,
                                     flow_embedding=emb, segment=seg))
        return self._run_inputs(inputs, stream, speed, seed, min_tokens, max_tokens, time.perf_counter() - t0)

    def zero_shot(self, text: str, prompt_text: Optional[str] = None,
                  prompt_wav: "Optional[Union[AudioInput, PromptAudio]]" = None, *, speaker: Optional[str] = None,
                  stream: bool = False, speed: float = 1.0, seed: int = 0, min_tokens: Optional[int] = None,
                  max_tokens: Optional[int] = None,
                  text_frontend: bool = True) -> Union[SynthResult, Iterator[StreamChunk]]:
        """Clone the voice of ``prompt_wav``; ``prompt_text`` is an instruction, ``<|endofprompt|>`` and the
        prompt's transcript (``'You are a helpful assistant.<|endofprompt|>' + transcript``).  Or, instead
        of both, ``speaker``: a zero-shot speaker saved in ``spk2info.pt`` (upstream ``zero_shot_spk_id``)."""
        from .frontend.frontend import check_prompt_text

        fe = self.frontend
        t0 = time.perf_counter()
        if speaker is not None:
            if prompt_text is not None or prompt_wav is not None:
                raise InputError("zero-shot: give either a saved speaker or prompt text + prompt audio, not both")
            inputs = [fe.frontend_zero_shot_speaker(seg, speaker) for seg in fe.segments(text, text_frontend)]
            return self._run_inputs(inputs, stream, speed, seed, min_tokens, max_tokens, time.perf_counter() - t0)
        if prompt_text is None or prompt_wav is None:
            raise InputError("zero-shot needs prompt text and prompt audio (or a saved speaker)")
        check_prompt_text(prompt_text)
        prompt_text = fe.normalize(prompt_text, split=False, text_frontend=text_frontend)
        segs = fe.segments(text, text_frontend)
        prompt = fe.prompt_audio(prompt_wav)
        inputs = []
        for seg in segs:
            if len(seg) < 0.5 * len(prompt_text):
                log.warning("synthesis text %r is much shorter than the prompt text %r; this may sound worse",
                            seg, prompt_text)
            inputs.append(fe.frontend_zero_shot(seg, prompt_text, prompt))
        return self._run_inputs(inputs, stream, speed, seed, min_tokens, max_tokens, time.perf_counter() - t0)

    def cross_lingual(self, text: str, prompt_wav: "Optional[Union[AudioInput, PromptAudio]]" = None, *,
                      speaker: Optional[str] = None, stream: bool = False,
                      speed: float = 1.0, seed: int = 0, min_tokens: Optional[int] = None,
                      max_tokens: Optional[int] = None, text_frontend: bool = True,
                      add_default_instruction: bool = True) -> Union[SynthResult, Iterator[StreamChunk]]:
        """Speak ``text`` (any language) in the voice of ``prompt_wav`` — or of a saved zero-shot
        ``speaker`` (its prompt audio features) —; the LLM sees no prompt.

        CosyVoice3 carries the instruction in the text (``'You are a helpful assistant.<|endofprompt|>...'``,
        which upstream neither normalises nor splits). Text without ``<|endofprompt|>`` is normalised and
        split, and each piece gets that default instruction in front (``add_default_instruction``;
        upstream would fail its assertion instead)."""
        fe = self.frontend
        t0 = time.perf_counter()
        segs = fe.segments(text, text_frontend)
        if "<|endofprompt|>" not in text:
            if not add_default_instruction:
                raise InputError("cross-lingual text needs '<|endofprompt|>' after an instruction, e.g. "
                                 "'You are a helpful assistant.<|endofprompt|>' + your text")
            log.info("no <|endofprompt|> in the cross-lingual text: prefixing %r", DEFAULT_INSTRUCTION)
            segs = [DEFAULT_INSTRUCTION + s for s in segs]
        if (speaker is None) == (prompt_wav is None):
            raise InputError("cross-lingual needs exactly one of prompt audio and a saved speaker")
        prompt = fe.prompt_audio(prompt_wav) if speaker is None else fe.speaker_prompt(speaker)[1]
        inputs = [fe.frontend_cross_lingual(seg, prompt) for seg in segs]
        return self._run_inputs(inputs, stream, speed, seed, min_tokens, max_tokens, time.perf_counter() - t0)

    def instruct(self, text: str, instruct_text: str, prompt_wav: "Union[AudioInput, PromptAudio]", *,
                 stream: bool = False, speed: float = 1.0, seed: int = 0, min_tokens: Optional[int] = None,
                 max_tokens: Optional[int] = None,
                 text_frontend: bool = True) -> Union[SynthResult, Iterator[StreamChunk]]:
        """Upstream ``inference_instruct2``: speak ``text`` in the voice of ``prompt_wav`` following an
        instruction. ``instruct_text`` with ``<|endofprompt|>`` is used as is; otherwise it becomes
        ``'You are a helpful assistant. <instruct_text><|endofprompt|>'``."""
        from .frontend.frontend import compose_instruction

        fe = self.frontend
        t0 = time.perf_counter()
        instr = compose_instruction(instruct_text)
        segs = fe.segments(text, text_frontend)
        prompt = fe.prompt_audio(prompt_wav)
        inputs = [fe.frontend_instruct2(seg, instr, prompt) for seg in segs]
        return self._run_inputs(inputs, stream, speed, seed, min_tokens, max_tokens, time.perf_counter() - t0)

    def vc(self, source_wav: "AudioInput", prompt_wav: "Union[AudioInput, PromptAudio]", *, stream: bool = False,
           speed: float = 1.0) -> Union[SynthResult, Iterator[StreamChunk]]:
        """Voice conversion: the speech tokens of ``source_wav`` rendered in the voice of ``prompt_wav``
        (no LLM)."""
        t0 = time.perf_counter()
        inp = self.frontend.frontend_vc(source_wav, prompt_wav)
        return self._run_inputs([inp], stream, speed, 0, None, None, time.perf_counter() - t0)

    # -- mode machinery --------------------------------------------------------------------------
    def _generator(self, seed: int) -> torch.Generator:
        gen_device = self.backend.device if self.backend.device.type == "cuda" else "cpu"
        return torch.Generator(device=gen_device).manual_seed(seed)

    def _segment_tokens(self, inp: "ModelInput", gen: torch.Generator, min_tokens: Optional[int],
                        max_tokens: Optional[int]) -> Iterator[int]:
        if not inp.uses_llm:
            return iter(inp.source_speech_token.flatten().tolist())
        if max_tokens is not None and min_tokens is not None and min_tokens > max_tokens:
            min_tokens = max_tokens
        return limit_silent_runs(
            self.backend.llm_generate(inp.text, inp.prompt_text, inp.llm_prompt_speech_token,
                                      min_len=min_tokens, max_len=max_tokens, generator=gen,
                                      strict_min_len=min_tokens is not None),
            self.max_silent_tokens)

    @staticmethod
    def _flow_embedding(inp: "ModelInput") -> Optional[torch.Tensor]:
        return inp.flow_embedding if inp.flow_embedding.numel() else None

    def _run_inputs(self, inputs: Sequence["ModelInput"], stream: bool, speed: float, seed: int,
                    min_tokens: Optional[int], max_tokens: Optional[int],
                    frontend_s: float) -> Union[SynthResult, Iterator[StreamChunk]]:
        if not inputs:
            raise InputError("nothing to synthesise")
        if not speed > 0:
            raise InputError(f"speed must be > 0, got {speed}")
        if stream:
            if speed != 1.0:
                raise InputError(f"speed {speed:g} works only without streaming: drop --stream (stream=True) or use "
                                 "speed 1.0 (upstream: 'speed change only support non-stream inference mode')")
            return self._stream_inputs(list(inputs), seed, min_tokens, max_tokens)
        return self._synth_inputs(list(inputs), speed, seed, min_tokens, max_tokens, frontend_s)

    def _synth_inputs(self, inputs: List["ModelInput"], speed: float, seed: int, min_tokens: Optional[int],
                      max_tokens: Optional[int], frontend_s: float) -> SynthResult:
        gen = self._generator(seed)
        speeches, mels, all_tokens = [], [], []
        t_llm = t_t2w = 0.0
        for k, inp in enumerate(inputs):
            t0 = time.perf_counter()
            total = max_tokens if max_tokens is not None else int(max(inp.text.shape[1], 1) * 20)
            tokens: List[int] = []
            label = "llm" if len(inputs) == 1 else f"llm {k + 1}/{len(inputs)}"
            with Progress(label, total=total, unit="tokens", enabled=self.progress and inp.uses_llm) as bar:
                for tok in self._segment_tokens(inp, gen, min_tokens, max_tokens):
                    tokens.append(int(tok))
                    bar.update()
            t1 = time.perf_counter()
            speech, mel = self.token2wav(tokens, inp.flow_prompt_speech_token, inp.prompt_speech_feat,
                                         self._flow_embedding(inp), speed=speed)
            t2 = time.perf_counter()
            t_llm += t1 - t0
            t_t2w += t2 - t1
            speeches.append(speech.cpu())
            mels.append(mel.cpu())
            all_tokens.extend(tokens)
        total_s = frontend_s + t_llm + t_t2w
        res = SynthResult(torch.cat(speeches, dim=1), self.sample_rate, all_tokens, torch.cat(mels, dim=2),
                          {"frontend_s": frontend_s, "llm_s": t_llm, "token2wav_s": t_t2w, "total_s": total_s},
                          segments=[inp.segment for inp in inputs])
        res.timings["rtf"] = total_s / max(res.seconds, 1e-9)
        return res

    def _stream_inputs(self, inputs: List["ModelInput"], seed: int, min_tokens: Optional[int],
                       max_tokens: Optional[int]) -> Iterator[StreamChunk]:
        gen = self._generator(seed)
        last = len(inputs) - 1
        for k, inp in enumerate(inputs):
            # closing: a consumer that stops early stops this segment's LLM thread at once
            with contextlib.closing(self.token2wav_stream(self._segment_tokens(inp, gen, min_tokens, max_tokens),
                                                          inp.flow_prompt_speech_token, inp.prompt_speech_feat,
                                                          self._flow_embedding(inp))) as chunks:
                for chunk in chunks:
                    chunk.segment = k
                    chunk.final = chunk.final and k == last
                    yield chunk
