"""The synthesis pipeline: text ids -> LLM speech tokens -> flow mel -> HiFT waveform.

The pipeline holds one backend and never asks which one it is.  Prompt inputs (prompt
text ids, prompt speech tokens, prompt mel, speaker embedding) are tensors here; the
frontend turns raw text and prompt audio into them.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Union

import torch

from .errors import InputError
from .models.llm import ENDOFPROMPT_ID
from .progress import Progress

__all__ = ["SynthResult", "StreamChunk", "Pipeline", "DEFAULT_INSTRUCTION", "TOKEN_HOP_LEN", "TOKEN_MAX_HOP_LEN"]

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


def _empty_ids() -> torch.Tensor:
    return torch.zeros(1, 0, dtype=torch.long)


class Pipeline:
    """End-to-end synthesis over one backend."""

    def __init__(self, backend: Any, tokenizer: Any = None, progress: bool = True) -> None:
        self.backend = backend
        self.model = backend.model
        self.tokenizer = tokenizer
        self.progress = progress

    @classmethod
    def from_model(cls, model: Union[str, Path, None] = None, backend: str = "eager", device: Optional[str] = None,
                   dtype: Optional[str] = None, fmt: str = "auto", llm_rl: bool = False, progress: bool = True,
                   **backend_options: Any) -> "Pipeline":
        import backends
        from .frontend.tokenizer import CosyVoice3Tokenizer
        from .loading import load_model

        m = load_model(model, fmt=fmt, llm_rl=llm_rl, device=device, dtype=dtype)
        tok = CosyVoice3Tokenizer.from_dir(m.model_dir / "CosyVoice-BlankEN")
        return cls(backends.create(backend, m, **backend_options), tok, progress=progress)

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
            for tok in self.backend.llm_generate(text_ids, prompt_text_ids, prompt_speech_token,
                                                 min_len=min_tokens, max_len=max_tokens, generator=gen,
                                                 strict_min_len=min_tokens is not None):
                out.append(tok)
                bar.update()
        return out

    def token2wav(self, tokens: Union[List[int], torch.Tensor], prompt_token: Optional[torch.Tensor] = None,
                  prompt_feat: Optional[torch.Tensor] = None, embedding: Optional[torch.Tensor] = None,
                  flow_noise: Optional[torch.Tensor] = None,
                  hift_noise: Optional[Dict[str, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Speech tokens -> (waveform [1, samples], mel [1, 80, frames]), non-streaming."""
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
        speech, _ = self.backend.hift(mel, finalize=True, noise=hift_noise)
        return speech, mel

    def token2wav_stream(self, tokens: Iterable[int], prompt_token: Optional[torch.Tensor] = None,
                         prompt_feat: Optional[torch.Tensor] = None, embedding: Optional[torch.Tensor] = None,
                         flow_noise: Optional[torch.Tensor] = None,
                         hift_noise: Optional[Dict[str, torch.Tensor]] = None) -> Iterator[StreamChunk]:
        """Upstream's streaming token2wav: as tokens arrive, every ``hop + 3`` new tokens run the
        flow (chunk mask, ``finalize=False``) over all tokens so far, keep the new mel frames,
        vocode the accumulated mel with ``finalize=False`` and yield the new samples; the rest
        is flushed with ``finalize=True`` when the tokens end."""
        prompt_token = _empty_ids() if prompt_token is None else prompt_token
        prompt_feat = torch.zeros(1, 0, 80) if prompt_feat is None else prompt_feat
        embedding = torch.zeros(1, 192) if embedding is None else embedding
        ratio = self.model.config.token_mel_ratio
        lookahead = int(getattr(self.model.flow, "pre_lookahead_len", 3))
        hop = TOKEN_HOP_LEN
        prompt_pad = -(-prompt_token.shape[1] // hop) * hop - prompt_token.shape[1]
        got: List[int] = []
        offset, speech_offset = 0, 0
        mel_cache: Optional[torch.Tensor] = None

        def run(upto: int, finalize: bool) -> torch.Tensor:
            nonlocal mel_cache, speech_offset
            tok = torch.tensor([got[:upto]], dtype=torch.long)
            mel = self.backend.flow(tok, prompt_token, prompt_feat, embedding, streaming=True, finalize=finalize,
                                    noise=flow_noise)[:, :, offset * ratio:]
            mel_cache = mel if mel_cache is None else torch.cat([mel_cache, mel], dim=2)
            speech, _ = self.backend.hift(mel_cache, finalize=finalize, noise=hift_noise)
            new = speech[:, speech_offset:]
            speech_offset += new.shape[1]
            return new

        it = iter(tokens)
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
                speech = run(need, finalize=False)
                offset += this_hop
                hop = min(TOKEN_MAX_HOP_LEN, hop * STREAM_SCALE_FACTOR)
                yield StreamChunk(speech.cpu(), len(got), False, time.perf_counter())
        if not got:
            raise InputError("no speech tokens to synthesise (the LLM stopped at once)")
        yield StreamChunk(run(len(got), finalize=True).cpu(), len(got), True, time.perf_counter())

    def tts_stream(self, text: Union[str, torch.Tensor], prompt_text: Union[str, torch.Tensor, None] = None,
                   prompt_speech_token: Optional[torch.Tensor] = None, prompt_feat: Optional[torch.Tensor] = None,
                   embedding: Optional[torch.Tensor] = None, seed: int = 0, min_tokens: Optional[int] = None,
                   max_tokens: Optional[int] = None, add_default_instruction: bool = True) -> Iterator[StreamChunk]:
        """Streaming synthesis: yields :class:`StreamChunk` audio as soon as each chunk is ready."""
        text_ids, prompt_ids = self._prepare_text(text, prompt_text, add_default_instruction)
        prompt_speech_token = _empty_ids() if prompt_speech_token is None else prompt_speech_token
        gen_device = self.backend.device if self.backend.device.type == "cuda" else "cpu"
        gen = torch.Generator(device=gen_device).manual_seed(seed)
        token_iter = self.backend.llm_generate(text_ids, prompt_ids, prompt_speech_token, min_len=min_tokens,
                                               max_len=max_tokens, generator=gen,
                                               strict_min_len=min_tokens is not None)
        yield from self.token2wav_stream(token_iter, prompt_speech_token, prompt_feat, embedding)

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
