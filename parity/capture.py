"""Capture: record a backend's stage calls (inputs, outputs, taps) as dumps.

``COSYTOOLS_DUMP=DIR`` wraps the backend of any command (synth, bench, …) so that every
stage call is written to ``DIR/<stage>_<index>.safetensors``.  ``FLOW_DEBUG_LOG_V=1`` logs
per-Euler-step / per-DiT-block statistics of the flow and reports the first NaN.
Without these variables nothing is wrapped, so capture costs nothing.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from cosytools import taps

from .dump import write_dump

__all__ = ["CapturingBackend", "maybe_wrap", "flow_debug_logger", "DEFAULT_TAP_FILTER"]

log = logging.getLogger("cosytools.capture")

# per-step DiT internals are large at full size: by default keep them for Euler step 0 only
DEFAULT_TAP_FILTER: Dict[str, Optional[List[str]]] = {
    "flow": ["token_emb*", "pre_lookahead", "spk_proj", "mu", "cond", "mask", "t", "step??.x", "step00.dit.*"],
}


def _stats(t: torch.Tensor) -> str:
    x = t.detach().float()
    fin = torch.isfinite(x)
    nn = int((~fin).sum())
    xf = x[fin]
    if xf.numel() == 0:
        return f"all {x.numel()} values non-finite"
    return (f"mean {float(xf.mean()):+.4e} std {float(xf.std()) if xf.numel() > 1 else 0.0:.4e} "
            f"min {float(xf.min()):+.4e} max {float(xf.max()):+.4e} nan/inf {nn}")


class _FlowDebug:
    """``on_tap`` callback logging flow statistics and remembering the first NaN."""

    pattern = re.compile(r"^(step\d\d\.(x|dit\.block\.\d\d|dit\.out)|mu|pre_lookahead)$")

    def __init__(self) -> None:
        self.first_nan: Optional[str] = None

    def __call__(self, name: str, t: torch.Tensor) -> None:
        if self.first_nan is None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            self.first_nan = name
            log.warning("flow: first NaN/Inf at tap %s", name)
        if self.pattern.match(name):
            log.info("flow %-22s %s", name, _stats(t))


def flow_debug_logger() -> Optional[_FlowDebug]:
    return _FlowDebug() if os.environ.get("FLOW_DEBUG_LOG_V", "") not in ("", "0") else None


class CapturingBackend:
    """Wraps a backend; stage calls are recorded to ``out_dir`` (one file per call)."""

    def __init__(self, inner: Any, out_dir: Optional[str], tap_filter: Optional[Dict[str, Optional[List[str]]]] = None,
                 flow_debug: bool = False) -> None:
        self.inner = inner
        self.out_dir = Path(out_dir) if out_dir else None
        self.tap_filter = DEFAULT_TAP_FILTER if tap_filter is None else tap_filter
        self.flow_debug = flow_debug
        self.counts: Dict[str, int] = {}
        self.written: List[Path] = []

    def __getattr__(self, name: str) -> Any:  # everything else behaves like the wrapped backend
        return getattr(self.inner, name)

    def _meta(self, **flags: Any) -> Dict[str, Any]:
        d = self.inner.describe()
        return {"model": str(self.inner.model.name), "backend": d.get("backend"), "device": d.get("device"),
                "dtype": d.get("dtype"), "torch_version": torch.__version__, **flags}

    def _write(self, stage: str, tensors: Dict[str, torch.Tensor], flags: Dict[str, Any]) -> None:
        if self.out_dir is None:
            return
        i = self.counts.get(stage, 0)
        self.counts[stage] = i + 1
        path = self.out_dir / f"{stage}_{i:03d}.safetensors"
        write_dump(path, stage, tensors, self._meta(call_index=i, **flags), producer=f"cosytools {self.inner.name}")
        self.written.append(path)
        log.info("captured %s", path)

    def _capture(self, stage: str):
        on_tap = flow_debug_logger() if (stage == "flow" and self.flow_debug) else None
        include = self.tap_filter.get(stage) if self.out_dir is not None else []
        return taps.capture(stage, include=include, on_tap=on_tap), on_tap

    # -- stages ---------------------------------------------------------------------------
    def flow(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
             embedding: torch.Tensor, *, streaming: bool = False, finalize: bool = True,
             noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        ctx, dbg = self._capture("flow")
        with ctx as rec:
            mel = self.inner.flow(token, prompt_token, prompt_feat, embedding, streaming=streaming,
                                  finalize=finalize, noise=noise)
        if dbg is not None and dbg.first_nan:
            log.warning("flow produced NaN/Inf; first at tap %s", dbg.first_nan)
        if self.out_dir is not None:
            frames = (token.shape[-1] + prompt_token.shape[-1]) * self.inner.model.config.token_mel_ratio
            if noise is None:
                noise = self.inner.model.flow.decoder.rand_noise[:, :, :frames]
            t = {"flow.in.token": token.int(), "flow.in.prompt_token": prompt_token.int(),
                 "flow.in.prompt_feat": prompt_feat.float(), "flow.in.embedding": embedding.float(),
                 "flow.in.noise": noise.float(), **rec.tensors, "flow.out.mel": mel}
            self._write("flow", t, {"streaming": streaming, "finalize": finalize})
        return mel

    def hift(self, mel: torch.Tensor, *, finalize: bool = True,
             noise: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        ctx, _ = self._capture("hift")
        with ctx as rec:
            speech, source = self.inner.hift(mel, finalize=finalize, noise=noise)
        if self.out_dir is not None:
            if noise is None and hasattr(self.inner.model.hift, "default_noise"):
                noise = self.inner.model.hift.default_noise.get(source.shape[-1])
            t = {"hift.in.mel": mel.float(), **rec.tensors, "hift.out.source": source, "hift.out.speech": speech}
            for k, v in (noise or {}).items():
                t[f"hift.in.noise.{k}"] = v.float()
            self._write("hift", t, {"finalize": finalize})
        return speech, source

    def llm_generate(self, text: torch.Tensor, prompt_text: torch.Tensor, prompt_speech_token: torch.Tensor, *,
                     min_len: Optional[int] = None, max_len: Optional[int] = None,
                     generator: Optional[torch.Generator] = None,
                     sampled: Optional[List[int]] = None, strict_min_len: bool = False,
                     exact: bool = False) -> Iterator[int]:
        sampled = [] if sampled is None else sampled
        seed = generator.initial_seed() if generator is not None else None
        ctx, _ = self._capture("llm")
        tokens: List[int] = []
        with ctx as rec:
            for t in self.inner.llm_generate(text, prompt_text, prompt_speech_token, min_len=min_len,
                                             max_len=max_len, generator=generator, sampled=sampled,
                                             strict_min_len=strict_min_len, exact=exact):
                tokens.append(t)
                yield t
        if self.out_dir is not None:
            tt = {"llm.in.text": torch.as_tensor(text).int().reshape(1, -1),
                  "llm.in.prompt_text": torch.as_tensor(prompt_text).int().reshape(1, -1),
                  "llm.in.prompt_speech_token": torch.as_tensor(prompt_speech_token).int().reshape(1, -1),
                  **rec.tensors, "llm.tap.sampled": torch.tensor([sampled], dtype=torch.int32),
                  "llm.out.tokens": torch.tensor([tokens], dtype=torch.int32)}
            flags: Dict[str, Any] = {"num_tokens": len(tokens)}
            if seed is not None:
                flags["seed"] = seed
            if min_len is not None:
                flags["min_len"] = min_len
            if max_len is not None:
                flags["max_len"] = max_len
            if strict_min_len:
                flags["strict_min_len"] = True
            self._write("llm", tt, flags)

    def llm_teacher_force(self, text: torch.Tensor, prompt_text: torch.Tensor, prompt_speech_token: torch.Tensor,
                          forced_tokens: Sequence[int]) -> Any:
        ctx, _ = self._capture("llm")
        with ctx as rec:
            res = self.inner.llm_teacher_force(text, prompt_text, prompt_speech_token, forced_tokens)
        if self.out_dir is not None:
            tt = {"llm.in.text": torch.as_tensor(text).int().reshape(1, -1),
                  "llm.in.prompt_text": torch.as_tensor(prompt_text).int().reshape(1, -1),
                  "llm.in.prompt_speech_token": torch.as_tensor(prompt_speech_token).int().reshape(1, -1),
                  "llm.in.forced_tokens": torch.tensor([list(forced_tokens)], dtype=torch.int32),
                  **rec.tensors, "llm.out.logp": res.logp}
            self._write("llm", tt, {})
        return res


def maybe_wrap(backend: Any) -> Any:
    """Wrap ``backend`` for capture when ``COSYTOOLS_DUMP`` or ``FLOW_DEBUG_LOG_V`` is set."""
    out = os.environ.get("COSYTOOLS_DUMP") or None
    dbg = os.environ.get("FLOW_DEBUG_LOG_V", "") not in ("", "0")
    if out is None and not dbg:
        return backend
    return CapturingBackend(backend, out, flow_debug=dbg)
