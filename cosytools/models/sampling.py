"""Speech-token sampling as CosyVoice3 does it: RAS (repetition-aware nucleus sampling).

The random draws are the same calls on the same tensors as upstream
(``Tensor.multinomial(1, replacement=True)`` on the nucleus probabilities, then on the full
distribution when the repetition rule fires), so on CPU the same torch seed yields the same
tokens.  The nucleus is chosen with float32 running sums, in upstream's order, so that the
top-p boundary falls where upstream's does.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["nucleus_sampling", "random_sampling", "ras_sampling"]


def _nucleus(scores: torch.Tensor, top_p: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and ids of the nucleus: the longest prefix of the sorted distribution
    (at most ``top_k`` long) whose running float32 sum before each entry is below ``top_p``."""
    probs, ids = scores.softmax(dim=0).sort(descending=True, stable=True)
    head = probs[:top_k].detach().to("cpu", torch.float32).numpy()
    limit = np.float32(top_p)
    cum = np.float32(0.0)
    n = 0
    for v in head:
        if not cum < limit:  # upstream compares a float32 running sum with top_p (cast to float32)
            break
        cum = np.float32(cum + v)
        n += 1
    return probs[:n].to(scores.dtype), ids[:n]


def nucleus_sampling(weighted_scores: torch.Tensor, top_p: float = 0.8, top_k: int = 25,
                     generator: Optional[torch.Generator] = None) -> int:
    """Draw one id from the top-p / top-k nucleus of ``weighted_scores`` (log-probs or logits)."""
    prob, ids = _nucleus(weighted_scores, top_p, top_k)
    # upstream rebuilds the nucleus as a fresh tensor on the scores' device; sampling from a
    # contiguous copy consumes the generator the same way.  A generator on another device
    # (a CPU generator replaying a CPU-made dump on the GPU) draws where it lives.
    prob = _on_generator_device(prob.contiguous(), generator)
    pick = prob.multinomial(1, replacement=True, generator=generator)
    return int(ids[pick.to(ids.device)].item())


def _on_generator_device(t: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    if generator is not None and generator.device != t.device:
        return t.to(generator.device)
    return t


def random_sampling(weighted_scores: torch.Tensor, generator: Optional[torch.Generator] = None) -> int:
    """Draw one id from the full softmax of ``weighted_scores``."""
    probs = _on_generator_device(weighted_scores.softmax(dim=0), generator)
    return int(probs.multinomial(1, replacement=True, generator=generator).item())


def ras_sampling(weighted_scores: torch.Tensor, decoded_tokens: Sequence[int], sampling: int = 25,
                 top_p: float = 0.8, top_k: int = 25, win_size: int = 10, tau_r: float = 0.1,
                 generator: Optional[torch.Generator] = None) -> int:
    """Repetition-aware sampling: nucleus sampling, resampled from the full distribution
    (with the repeated id removed) when that id already fills ``tau_r`` of the last
    ``win_size`` decoded tokens.  ``sampling`` is upstream's unused top-k argument.

    ``weighted_scores`` is modified in place on resampling, as upstream does.
    """
    top_id = nucleus_sampling(weighted_scores, top_p=top_p, top_k=top_k, generator=generator)
    recent = list(decoded_tokens[-win_size:]) if win_size > 0 else []
    rep_num = sum(1 for t in recent if t == top_id)
    if rep_num >= win_size * tau_r:
        weighted_scores[top_id] = -float("inf")
        top_id = random_sampling(weighted_scores, generator=generator)
    return top_id
