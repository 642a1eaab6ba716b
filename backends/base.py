"""The stage interface every cosytools backend implements.

A backend executes the three model stages of one loaded model on one device and dtype.
The pipeline, the parity harness and the benchmark only talk to this interface.

Stage calls (all tensors batch 1, token tensors integer, on any device):

``llm_session(text, prompt_text, prompt_speech_token, max_new_tokens) -> LLMSession``
    prefill; the session exposes ``logp`` (float32 log-probs over ``speech_token_size+200``
    ids for the next token) and ``step(token)`` which feeds one token back (KV-cached).
``llm_generate(text, prompt_text, prompt_speech_token, *, min_len, max_len, generator, sampled, strict_min_len, exact)``
    yields speech tokens (stop token excluded) with RAS sampling, upstream's length rules.
    ``exact=True`` asks for draws made exactly as the model's ``ras_sampling`` makes them from
    ``generator`` (tokens == eager's for a seed: parity replays a dump's RNG this way); a backend
    that always samples so ignores it, one with a faster sampler of its own (compiled on CUDA) honours it.
    ``strict_min_len=True`` masks *every* stop id (not only upstream's 6561) before ``min_len``,
    so a random-weight model produces exactly ``min_len`` tokens (benchmarks, ``--min-tokens``).
``llm_teacher_force(text, prompt_text, prompt_speech_token, forced_tokens)``
    -> ``TeacherForcedResult(logp [K+1,V], step_hidden [K+1,H])``.
``flow(token, prompt_token, prompt_feat, embedding, *, streaming, finalize, noise)``
    -> mel ``[1, 80, 2*T]`` (float32), prompt frames removed.
``hift(mel, *, finalize, noise)`` -> ``(speech [1, samples], source [1, 1, N])`` float32.

Taps (``cosytools.taps``) are emitted by the model code; a backend that cannot expose some
intermediate simply does not emit it, and the parity harness compares what exists.
"""
from __future__ import annotations

import abc
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from cosytools.loading import CosyVoice3Model

__all__ = ["Backend", "LLMSession", "as_ids"]


def as_ids(t: Any, device: torch.device) -> torch.Tensor:
    """Token ids as a ``[1, N]`` long tensor on ``device`` (accepts ``[N]``, lists, int32)."""
    t = torch.as_tensor(t)
    if t.dim() == 1:
        t = t[None]
    return t.to(device=device, dtype=torch.long)


class LLMSession(abc.ABC):
    """A prefilled LLM with its KV cache; ``logp`` predicts the next token."""

    logp: torch.Tensor
    hidden: torch.Tensor

    @abc.abstractmethod
    def step(self, token: int) -> torch.Tensor:
        """Feed ``token``; return (and store in ``self.logp``) the next log-probs."""


class Backend(abc.ABC):
    """Base class of execution backends (see the module docstring for the stage interface)."""

    name: str = "?"

    def __init__(self, model: CosyVoice3Model, **options: Any) -> None:
        self.model = model
        self.options = options

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def _need(self, comp: str) -> Any:
        """The loaded module of ``comp`` (``llm``/``flow``/``hift``), or a clear error."""
        from cosytools.errors import InputError

        m = getattr(self.model, comp)
        if m is None:
            raise InputError(f"the {comp} stage was not loaded for this run")
        return m

    def _flow_inputs(self, token: Any, prompt_token: Any, prompt_feat: torch.Tensor,
                     embedding: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flow inputs on the backend's device/dtype: ids [1,T], [1,Tp], prompt_feat [1,2Tp,80], embedding [1,192]."""
        d, dt = self.device, self.dtype
        prompt_feat = prompt_feat.to(d, dt)
        if prompt_feat.dim() == 2:
            prompt_feat = prompt_feat[None]
        return as_ids(token, d), as_ids(prompt_token, d), prompt_feat, embedding.to(d, dt).reshape(1, -1)

    def _lm_input(self, text: Any, prompt_text: Any, prompt_speech_token: Any) -> torch.Tensor:
        """The LM's input embeddings [1, T, H] for these ids (``CosyVoice3LM.build_lm_input`` on the
        backend's device)."""
        lm, d = self._need("llm"), self.device
        with torch.inference_mode():
            return lm.build_lm_input(as_ids(text, d), as_ids(prompt_text, d), as_ids(prompt_speech_token, d))

    @staticmethod
    def _lengths(*ts: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``[T]`` int32 length tensors of the given ``[1, T, …]`` tensors (upstream's *_len arguments)."""
        return tuple(torch.tensor([t.shape[1]], dtype=torch.int32, device=t.device) for t in ts)

    @property
    def token_block(self) -> int:
        """How many tokens ``llm_generate`` hands over at once (1: each as it is sampled).  A backend
        that samples on the device and checks for the stop every k tokens delivers k at a time;
        ``bench`` uses it to time decoding from the first delivery on."""
        return 1

    def describe(self) -> Dict[str, Any]:
        """Settings worth printing next to results (backend name, device, dtype, options)."""
        return {"backend": self.name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                **{k: v for k, v in self.options.items() if isinstance(v, (str, int, float, bool))}}

    # -- LLM --------------------------------------------------------------------------------
    @abc.abstractmethod
    def llm_session(self, text: torch.Tensor, prompt_text: torch.Tensor, prompt_speech_token: torch.Tensor,
                    max_new_tokens: int) -> LLMSession:
        ...

    @abc.abstractmethod
    def llm_generate(self, text: torch.Tensor, prompt_text: torch.Tensor, prompt_speech_token: torch.Tensor, *,
                     min_len: Optional[int] = None, max_len: Optional[int] = None,
                     generator: Optional[torch.Generator] = None,
                     sampled: Optional[List[int]] = None, strict_min_len: bool = False,
                     exact: bool = False) -> Iterator[int]:
        ...

    @abc.abstractmethod
    def llm_teacher_force(self, text: torch.Tensor, prompt_text: torch.Tensor, prompt_speech_token: torch.Tensor,
                          forced_tokens: Sequence[int]) -> Any:
        ...

    # -- flow / hift ----------------------------------------------------------------------
    @abc.abstractmethod
    def flow(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
             embedding: torch.Tensor, *, streaming: bool = False, finalize: bool = True,
             noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def hift(self, mel: torch.Tensor, *, finalize: bool = True,
             noise: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        ...

    def warmup(self) -> None:
        """Compile / capture whatever the backend needs before timing (no-op for eager)."""
