"""CosyVoice3LM: a Qwen2 trunk that reads text ids and emits 25 Hz speech tokens.

Input layout of the prefill (as upstream): ``[speech_embedding[sos], embed_tokens(prompt_text ++
text), speech_embedding[task_id], speech_embedding(prompt_speech_token)]``.  Each step feeds
back ``speech_embedding[token]``.  Generation stops on any id in ``[speech_token_size,
speech_token_size + 200)``; during the first ``min_len`` steps id ``speech_token_size`` (the
*sos* id — upstream masks it, not eos) is set to -inf before sampling.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence

import torch
from torch import nn

from ..errors import InputError
from ..taps import paused, tap
from .qwen2 import KVCache, Qwen2Config, Qwen2ForCausalLM
from .sampling import ras_sampling

__all__ = ["ENDOFPROMPT_ID", "Qwen2Encoder", "CosyVoice3LM", "TeacherForcedResult"]

ENDOFPROMPT_ID = 151646  # <|endofprompt|> in the CosyVoice3 tokenizer


class Qwen2Encoder(nn.Module):
    """Holds the HF-layout ``Qwen2ForCausalLM`` under ``.model`` (keys ``llm.model.model.*``)."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.model = Qwen2ForCausalLM(config)

    @property
    def config(self) -> Qwen2Config:
        return self.model.config

    def forward(self, inputs_embeds: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        return self.model.model(inputs_embeds, cache)


@dataclass
class TeacherForcedResult:
    logp: torch.Tensor         # [K+1, V] log-probs given to the sampler at each step
    step_hidden: torch.Tensor  # [K+1, H] last hidden state of each call


class CosyVoice3LM(nn.Module):
    """The CosyVoice3 speech-token LM (constructor arguments as upstream's yaml gives them)."""

    def __init__(self, llm_input_size: int, llm_output_size: int, speech_token_size: int,
                 llm: Qwen2Encoder, sampling: Optional[Callable] = None, length_normalized_loss: bool = True,
                 lsm_weight: float = 0.0, mix_ratio: Sequence[int] = (5, 15)) -> None:
        super().__init__()
        self.llm_input_size = llm_input_size
        self.llm_output_size = llm_output_size
        self.speech_token_size = speech_token_size
        self.sos = speech_token_size
        self.eos_token = speech_token_size + 1
        self.task_id = speech_token_size + 2
        self.fill_token = speech_token_size + 3
        self.llm = llm
        self.llm_decoder = nn.Linear(llm_output_size, speech_token_size + 200, bias=False)
        self.speech_embedding = nn.Embedding(speech_token_size + 200, llm_input_size)
        self.sampling = sampling if sampling is not None else functools.partial(ras_sampling)
        self.mix_ratio = list(mix_ratio)

    # -- building blocks ------------------------------------------------------------------
    def is_stop_token(self, token: int) -> bool:
        return self.speech_token_size <= token < self.speech_token_size + 200

    def build_lm_input(self, text: torch.Tensor, prompt_text: torch.Tensor,
                       prompt_speech_token: torch.Tensor) -> torch.Tensor:
        """The prefill embeddings ``[1, 1+Np+Nt+1+Ns, H]``; needs ``<|endofprompt|>`` in the text."""
        all_text = torch.cat([prompt_text.long(), text.long()], dim=1)
        if not bool((all_text == ENDOFPROMPT_ID).any()):
            raise InputError(
                "CosyVoice3 needs <|endofprompt|> (id 151646) in the text or the prompt text, and neither has it. "
                "Put the instruction or prompt transcript before '<|endofprompt|>', e.g. "
                "'You are a helpful assistant.<|endofprompt|>Hello'.")
        emb = self.llm.model.model.embed_tokens(all_text)
        w = self.speech_embedding.weight
        sos = w[self.sos].reshape(1, 1, -1)
        task = w[self.task_id].reshape(1, 1, -1)
        if prompt_speech_token.shape[1] > 0:
            prompt_speech = self.speech_embedding(prompt_speech_token.long())
        else:
            prompt_speech = emb.new_zeros(1, 0, self.llm_input_size)
        lm_input = torch.cat([sos.to(emb.dtype), emb, task.to(emb.dtype), prompt_speech.to(emb.dtype)], dim=1)
        tap("lm_input", lm_input)
        return lm_input

    def new_cache(self, max_len: int, device: torch.device | str, dtype: torch.dtype) -> KVCache:
        return KVCache(self.llm.config, max_len, 1, device, dtype)

    def logp(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """Log-probs over ``speech_token_size + 200`` ids, computed in float32."""
        return self.llm_decoder(hidden_last).float().log_softmax(dim=-1)

    def prefill(self, lm_input: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prompt; returns (log-probs [V], last hidden [H])."""
        h = self.llm(lm_input, cache)
        tap("final_hidden", h)
        last = h[:, -1]
        return self.logp(last)[0], last[0]

    def step(self, token: int, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one speech token back; returns (log-probs [V], hidden [H])."""
        x = self.speech_embedding.weight[token].reshape(1, 1, -1)
        h = self.llm(x, cache)
        last = h[:, -1]
        return self.logp(last)[0], last[0]

    @staticmethod
    def length_limits(num_text_tokens: int, min_token_text_ratio: float = 2,
                      max_token_text_ratio: float = 20) -> tuple[int, int]:
        """Upstream's ``(min_len, max_len)`` from the number of tts text tokens (prompt excluded)."""
        return int(num_text_tokens * min_token_text_ratio), int(num_text_tokens * max_token_text_ratio)

    # -- generation ---------------------------------------------------------------------------
    @torch.inference_mode()
    def inference(self, text: torch.Tensor, prompt_text: torch.Tensor, prompt_speech_token: torch.Tensor,
                  sampling: int = 25, max_token_text_ratio: float = 20, min_token_text_ratio: float = 2,
                  min_len: Optional[int] = None, max_len: Optional[int] = None,
                  generator: Optional[torch.Generator] = None,
                  sampled: Optional[List[int]] = None, strict_min_len: bool = False) -> Iterator[int]:
        """Yield speech tokens one by one (stop token excluded), as upstream's non-vLLM path.

        ``min_len``/``max_len`` override the ratio rules.  Every id drawn (including a final
        stop id) is appended to ``sampled`` when a list is given.  ``strict_min_len`` masks all
        200 stop ids (not just upstream's 6561) during the first ``min_len`` steps.
        """
        lo, hi = self.length_limits(text.shape[1], min_token_text_ratio, max_token_text_ratio)
        min_len = lo if min_len is None else min_len
        max_len = hi if max_len is None else max_len
        lm_input = self.build_lm_input(text, prompt_text, prompt_speech_token)
        cache = self.new_cache(lm_input.shape[1] + max_len + 1, lm_input.device, lm_input.dtype)
        logp, _ = self.prefill(lm_input, cache)
        with paused():
            yield from self.sampling_loop(logp, lambda tok: self.step(tok, cache)[0], min_len, max_len,
                                          generator, sampled, strict_min_len, sampling)

    def sampling_loop(self, first_logp: torch.Tensor, step: Callable[[int], torch.Tensor], min_len: int,
                      max_len: int, generator: Optional[torch.Generator] = None,
                      sampled: Optional[List[int]] = None, strict_min_len: bool = False,
                      sampling: int = 25) -> Iterator[int]:
        """Upstream's decode loop over any executor: ``step(token)`` feeds a token back and returns
        the next log-probs.  Applies the min-length mask, samples, stops on a stop id."""
        out: List[int] = []
        logp = first_logp
        for i in range(max_len):
            if i > 0:
                logp = step(out[-1])
            if i < min_len:
                if strict_min_len:
                    logp[self.speech_token_size:] = -float("inf")
                else:  # upstream masks only id speech_token_size (its sos), not eos
                    logp[self.speech_token_size] = -float("inf")
            top = self.sampling(logp, out, sampling, generator=generator)
            if sampled is not None:
                sampled.append(top)
            if self.is_stop_token(top):
                break
            out.append(top)
            yield top

    @torch.inference_mode()
    def teacher_force(self, text: torch.Tensor, prompt_text: torch.Tensor, prompt_speech_token: torch.Tensor,
                      forced_tokens: Sequence[int]) -> TeacherForcedResult:
        """Prefill, then feed ``forced_tokens`` one by one; collect each step's log-probs.

        Rows are the raw log-probs (before any min-length masking).
        """
        lm_input = self.build_lm_input(text, prompt_text, prompt_speech_token)
        cache = self.new_cache(lm_input.shape[1] + len(forced_tokens) + 1, lm_input.device, lm_input.dtype)
        logp, h = self.prefill(lm_input, cache)
        rows, hiddens = [logp], [h]
        with paused():
            for t in forced_tokens:
                logp, h = self.step(int(t), cache)
                rows.append(logp)
                hiddens.append(h)
        res = TeacherForcedResult(torch.stack(rows), torch.stack(hiddens))
        tap("step_hidden", res.step_hidden)
        return res
