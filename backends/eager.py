"""The ``eager`` backend: the cosytools model modules run as written, in PyTorch eager mode."""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from cosytools.models.llm import TeacherForcedResult
from cosytools.models.qwen2 import KVCache
from cosytools.taps import paused

from .base import Backend, LLMSession, as_ids

__all__ = ["EagerBackend"]



class _EagerSession(LLMSession):
    def __init__(self, lm: Any, lm_input: torch.Tensor, max_new_tokens: int) -> None:
        self.lm = lm
        self.cache: KVCache = lm.new_cache(lm_input.shape[1] + max_new_tokens + 1, lm_input.device, lm_input.dtype)
        self.logp, self.hidden = lm.prefill(lm_input, self.cache)
        self.prompt_len = lm_input.shape[1]

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        with paused():
            self.logp, self.hidden = self.lm.step(int(token), self.cache)
        return self.logp


class EagerBackend(Backend):
    """Reference execution of the model definition (CPU or CUDA, float32/bf16/fp16)."""

    name = "eager"

    def __init__(self, model: Any, **options: Any) -> None:
        super().__init__(model, **options)
        if self.device.type == "cuda":
            # cuDNN convolutions default to TF32, which moves float32 HiFT speech by ~5e-3;
            # keep float32 exact unless asked (process-wide torch flags)
            tf32 = bool(options.get("tf32", False))
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32

    # -- LLM --------------------------------------------------------------------------------
    @torch.inference_mode()
    def llm_session(self, text: torch.Tensor, prompt_text: torch.Tensor, prompt_speech_token: torch.Tensor,
                    max_new_tokens: int) -> LLMSession:
        return _EagerSession(self._need("llm"), self._lm_input(text, prompt_text, prompt_speech_token), max_new_tokens)

    def llm_generate(self, text: torch.Tensor, prompt_text: torch.Tensor, prompt_speech_token: torch.Tensor, *,
                     min_len: Optional[int] = None, max_len: Optional[int] = None,
                     generator: Optional[torch.Generator] = None,
                     sampled: Optional[List[int]] = None, strict_min_len: bool = False,
                     exact: bool = False) -> Iterator[int]:
        lm = self._need("llm")
        d = self.device
        yield from lm.inference(as_ids(text, d), as_ids(prompt_text, d), as_ids(prompt_speech_token, d),
                                min_len=min_len, max_len=max_len, generator=generator, sampled=sampled,
                                strict_min_len=strict_min_len)

    def llm_teacher_force(self, text: torch.Tensor, prompt_text: torch.Tensor, prompt_speech_token: torch.Tensor,
                          forced_tokens: Sequence[int]) -> TeacherForcedResult:
        lm = self._need("llm")
        d = self.device
        return lm.teacher_force(as_ids(text, d), as_ids(prompt_text, d), as_ids(prompt_speech_token, d),
                                [int(t) for t in forced_tokens])

    # -- flow / hift ----------------------------------------------------------------------
    @torch.inference_mode()
    def flow(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
             embedding: torch.Tensor, *, streaming: bool = False, finalize: bool = True,
             noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        flow = self._need("flow")
        token, prompt_token, prompt_feat, embedding = self._flow_inputs(token, prompt_token, prompt_feat, embedding)
        token_len, prompt_token_len, prompt_feat_len = self._lengths(token, prompt_token, prompt_feat)
        mel, _ = flow.inference(token=token, token_len=token_len, prompt_token=prompt_token,
                                prompt_token_len=prompt_token_len, prompt_feat=prompt_feat,
                                prompt_feat_len=prompt_feat_len, embedding=embedding,
                                streaming=streaming, finalize=finalize,
                                noise=None if noise is None else noise.to(self.device))
        return mel.float()

    @torch.inference_mode()
    def hift(self, mel: torch.Tensor, *, finalize: bool = True,
             noise: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        hift = self._need("hift")
        d = self.device
        if noise is not None:
            noise = {k: v.to(d) for k, v in noise.items()}
        # the mel stays float32: the float64 F0 predictor reads it at full precision (a half-precision
        # mel moves f0, and the integrated source phase then drifts); decode casts to the conv dtype
        speech, source = hift.inference(mel.to(d, torch.float32), finalize=finalize, noise=noise)
        return speech.float(), source.float()
