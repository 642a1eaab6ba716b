"""Comparison metrics for one tensor and the tolerance policy.

Pass rule for floating tensors, element by element::

    |ours - ref| <= atol * peak(ref) + rtol * |ref|,   peak(ref) = max |ref|  (1 if all zero)

``atol`` is relative to the reference's peak magnitude, so a decision never depends on the
units of a tensor (log-probs, mel, waveform) and does not flip when both tensors are scaled
by the same power of two.  Integer tensors (tokens, ids) must match exactly.  NaN in either
tensor fails; an infinity passes only where the reference has the same infinity.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

import torch

__all__ = ["Tolerance", "TensorReport", "compare_tensor", "default_tolerance", "DEFAULT_TOLERANCES",
           "ungated_tensors"]


@dataclass(frozen=True)
class Tolerance:
    atol: float  # relative to the reference's peak magnitude
    rtol: float  # relative to each reference element


# (dtype, stage) -> tolerance.  float32 values are the measured round-off of the eager model
# against upstream dumps on CPU with margin (see README "Tolerances"); half precision is looser.
DEFAULT_TOLERANCES: Dict[str, Dict[str, Tolerance]] = {
    "float32": {"llm": Tolerance(2e-5, 1e-4), "flow": Tolerance(2e-5, 1e-4), "hift": Tolerance(1e-4, 1e-3),
                # e2e: the vocoder amplifies flow round-off (2.9e-6 in mel -> 1.4e-4 Hz in f0 ->
                # 3.9e-3 in the waveform on the tiny fixture); each stage alone is pinned tighter
                "e2e": Tolerance(1e-2, 1e-3), "mel": Tolerance(2e-5, 1e-4), "tokenizer": Tolerance(0, 0),
                "*": Tolerance(2e-5, 1e-4)},
    "bfloat16": {"llm": Tolerance(5e-2, 5e-2), "flow": Tolerance(5e-2, 5e-2), "hift": Tolerance(5e-2, 5e-2),
                 "e2e": Tolerance(5e-2, 5e-2), "*": Tolerance(5e-2, 5e-2)},
    "float16": {"llm": Tolerance(1e-2, 1e-2), "flow": Tolerance(2e-2, 2e-2), "hift": Tolerance(2e-2, 2e-2),
                "e2e": Tolerance(5e-2, 5e-2), "*": Tolerance(2e-2, 2e-2)},
}


# Tensors that a half-precision run cannot match sample by sample against a float32 reference,
# whatever the tolerance: reported, not gated (each stage stays gated by another tensor).
HALF_PRECISION_UNGATED: Dict[str, str] = {
    "llm.tap.sampled": "a draw depends on the exact logits; in half precision the LLM is gated by the "
                       "teacher-forced log-probs (llm_teacher)",
    "llm.out.tokens": "a draw depends on the exact logits; in half precision the LLM is gated by the "
                      "teacher-forced log-probs (llm_teacher)",
    "e2e.out.speech": "the vocoder integrates F0 into the source phase, so a half-precision mel (~1e-2) "
                      "drifts the waveform's phase; e2e is gated by its mel, HiFT by its own dumps",
}


def ungated_tensors(dtype: str) -> Dict[str, str]:
    """name -> reason for the tensors reported but not gated at ``dtype`` (none in float32)."""
    return {} if dtype.replace("torch.", "") == "float32" else dict(HALF_PRECISION_UNGATED)


def default_tolerance(stage: str, dtype: str = "float32") -> Tolerance:
    table = DEFAULT_TOLERANCES.get(dtype.replace("torch.", ""), DEFAULT_TOLERANCES["float32"])
    return table.get(stage, table["*"])


@dataclass
class TensorReport:
    """How one tensor of ours compares with the reference."""

    name: str
    shape: list
    dtype: str
    passed: bool
    max_abs: Optional[float] = None
    max_rel: Optional[float] = None   # max |d| / peak(|ref|)
    mean_abs: Optional[float] = None
    cosine: Optional[float] = None
    snr_db: Optional[float] = None    # None when the difference is exactly zero (infinite SNR)
    mismatches: Optional[int] = None  # elements outside tolerance (or unequal, for integers)
    first_mismatch: Optional[list] = None
    top1_agreement: Optional[float] = None
    nonfinite: int = 0                # NaN/Inf elements in ours where the reference is finite
    note: str = ""
    gated: bool = True                # False: reported, not part of the pass/fail decision
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        return {k: v for k, v in d.items() if v is not None and v != {} and v != "" and not (k == "gated" and v)}


def _index(flat_idx: int, shape: torch.Size) -> list:
    idx = []
    for s in reversed(shape):
        idx.append(flat_idx % s)
        flat_idx //= s
    return list(reversed(idx))


def _finite_or_none(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None


def compare_tensor(name: str, ref: torch.Tensor, ours: torch.Tensor, tol: Tolerance,
                   logits: bool = False) -> TensorReport:
    """Compare ``ours`` with ``ref`` (shapes must agree; size-1 dims are not broadcast)."""
    ref = ref.detach().cpu()
    ours = ours.detach().cpu()
    rep = TensorReport(name, list(ref.shape), str(ref.dtype).replace("torch.", ""), passed=False)
    if tuple(ref.shape) != tuple(ours.shape):
        rep.note = f"shape differs: reference {list(ref.shape)}, ours {list(ours.shape)}"
        return rep
    if ref.numel() == 0:
        rep.passed = True
        rep.note = "empty"
        return rep
    if not ref.is_floating_point() and not ours.is_floating_point():
        neq = (ref.long() != ours.long()).reshape(-1)
        n = int(neq.sum())
        rep.mismatches = n
        rep.max_abs = float((ref.long() - ours.long()).abs().max())
        rep.passed = n == 0
        if n:
            rep.first_mismatch = _index(int(neq.nonzero()[0]), ref.shape)
            rep.note = (f"{n}/{ref.numel()} differ; first at {rep.first_mismatch}: "
                        f"reference {int(ref.reshape(-1)[int(neq.nonzero()[0])])}, "
                        f"ours {int(ours.reshape(-1)[int(neq.nonzero()[0])])}")
        return rep
    r = ref.double()
    o = ours.double()
    both_inf = torch.isinf(r) & torch.isinf(o) & (torch.sign(r) == torch.sign(o))
    finite_ref = torch.isfinite(r)
    bad_ours = (~torch.isfinite(o)) & ~both_inf
    rep.nonfinite = int((bad_ours & finite_ref).sum())
    d = torch.where(both_inf, torch.zeros_like(r), (o - r).abs())
    d = torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)
    rmag = torch.where(finite_ref, r.abs(), torch.zeros_like(r))
    peak = float(rmag.max()) if rmag.numel() else 0.0
    if peak == 0:  # an all-zero reference: measure against our own magnitude (keeps decisions scale-free)
        omag = torch.where(torch.isfinite(o), o.abs(), torch.zeros_like(o))
        peak = float(omag.max()) if omag.numel() else 0.0
    scale = peak if peak > 0 else 1.0
    limit = tol.atol * scale + tol.rtol * rmag
    bad = (d > limit) | bad_ours | (torch.isnan(r) & ~torch.isnan(o))
    rep.mismatches = int(bad.sum())
    rep.passed = rep.mismatches == 0
    rep.max_abs = _finite_or_none(float(d.max()))
    rep.mean_abs = _finite_or_none(float(d.mean()))
    rep.max_rel = _finite_or_none(float(d.max()) / scale)
    fin = torch.isfinite(r) & torch.isfinite(o)
    rf, of = r[fin], o[fin]
    nr, no = float(rf.norm()), float(of.norm())
    rep.cosine = 1.0 if nr == 0 and no == 0 else (float((rf * of).sum()) / (nr * no) if nr > 0 and no > 0 else 0.0)
    err = float(((of - rf) ** 2).sum())
    sig = float((rf ** 2).sum())
    rep.snr_db = None if err == 0 else (10 * math.log10(sig / err) if sig > 0 else -math.inf)
    if rep.snr_db is not None and not math.isfinite(rep.snr_db):
        rep.snr_db = None
    if not rep.passed:
        first = int(bad.reshape(-1).nonzero()[0])
        rep.first_mismatch = _index(first, ref.shape)
        if rep.nonfinite:
            rep.note = f"{rep.nonfinite} NaN/Inf element(s) in ours"
    if logits and ref.dim() >= 1 and ref.shape[-1] > 1:
        a = r.reshape(-1, ref.shape[-1]).argmax(-1)
        b = o.reshape(-1, ref.shape[-1]).argmax(-1)
        rep.top1_agreement = float((a == b).double().mean())
    return rep
