"""Parity reports: compare a run with its reference dump, find the first divergence, render."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from .dump import Dump
from .metrics import TensorReport, Tolerance, compare_tensor
from .runners import StageRun

__all__ = ["ParityReport", "build_report", "diff_dumps", "render_table", "render_summary", "plot_report"]


@dataclass
class ParityReport:
    stage: str
    ref: str
    layout: str
    tolerance: Tolerance
    tensors: List[TensorReport] = field(default_factory=list)
    not_produced: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    settings: Dict[str, Any] = field(default_factory=dict)
    first_nan: Optional[str] = None

    @property
    def gated(self) -> List[TensorReport]:
        """The tensors that decide pass/fail (see ``metrics.ungated_tensors``)."""
        return [t for t in self.tensors if t.gated]

    @property
    def informational(self) -> bool:
        """Tensors were compared, none of them gated (e.g. sampled tokens in bf16): neither pass nor fail."""
        return bool(self.tensors) and not self.gated and self.first_nan is None

    @property
    def passed(self) -> bool:
        """Every gated tensor within tolerance and no NaN; an informational report counts as passed."""
        return bool(self.tensors) and all(t.passed for t in self.gated) and self.first_nan is None

    @property
    def first_divergence(self) -> Optional[TensorReport]:
        return next((t for t in self.gated if not t.passed), None)

    def to_dict(self) -> Dict[str, Any]:
        fd = self.first_divergence
        return {
            "passed": self.passed,
            "informational": self.informational,
            "stage": self.stage,
            "ref": self.ref,
            "layout": self.layout,
            **self.settings,
            "tolerance": {"atol": self.tolerance.atol, "rtol": self.tolerance.rtol,
                          "rule": "|ours-ref| <= atol*max|ref| + rtol*|ref| (integers: exact)"},
            "first_divergence": None if fd is None else fd.name,
            "first_nan": self.first_nan,
            "compared": len(self.tensors),
            "failed": sum(not t.passed for t in self.gated),
            "ungated": [t.name for t in self.tensors if not t.gated],
            "tensors": [t.to_dict() for t in self.tensors],
            "not_produced": self.not_produced,
            "notes": self.notes,
        }


def _is_logits(name: str) -> bool:
    return name.endswith(".logp") or name.endswith(".logits")


def build_report(dump: Dump, run: StageRun, tol: Tolerance, settings: Optional[Dict[str, Any]] = None,
                 ungated: Optional[Dict[str, str]] = None) -> ParityReport:
    """Compare every ``out`` and ``tap`` tensor present in both, in our execution order.
    ``ungated``: name -> reason for tensors that are reported but do not decide pass/fail."""
    rep = ParityReport(dump.stage, str(dump.path or "<dump>"), dump.layout, tol, settings=dict(settings or {}),
                       notes=list(run.notes))
    ref = {k: v for k, v in dump.tensors.items() if k.startswith(f"{dump.stage}.out.") or
           k.startswith(f"{dump.stage}.tap.")}
    for key in run.order:
        ours = run.tensors[key]
        if rep.first_nan is None and ours.is_floating_point() and not bool(torch.isfinite(ours).all()):
            if not (key in ref and not bool(torch.isfinite(ref[key]).all())):
                rep.first_nan = key
        if key in ref:
            t = compare_tensor(key, ref[key], ours, tol, logits=_is_logits(key))
            if ungated and key in ungated:
                t.gated = False
                t.note = f"not gated: {ungated[key]}" + (f"; {t.note}" if t.note else "")
            rep.tensors.append(t)
    for name, (r, o) in run.strings.items():
        t = TensorReport(name, [len(r)], "str", passed=(r == o))
        if r != o:
            i = next((j for j, (a, b) in enumerate(zip(r, o)) if a != b), min(len(r), len(o)))
            t.first_mismatch = [i]
            t.note = f"strings differ at char {i}: reference {r[i:i + 12]!r}, ours {o[i:i + 12]!r}"
        rep.tensors.append(t)
    rep.not_produced = [k for k in ref if k not in run.tensors]
    if rep.first_nan:
        rep.notes.append(f"first NaN/Inf appears in {rep.first_nan}")
    return rep


def diff_dumps(a: Dump, b: Dump, tol: Tolerance) -> ParityReport:
    """Compare two dumps tensor by tensor (A is the reference), no model involved."""
    run = StageRun()
    for k, v in b.tensors.items():
        run.add(k, v)
    order_a = list(a.tensors)
    run.order.sort(key=lambda k: order_a.index(k) if k in order_a else len(order_a))
    rep = build_report(a, run, tol)
    extra_in = [k for k in a.tensors if k.split(".")[1] == "in" and k in b.tensors]
    for k in extra_in:  # inputs too: a port's inputs may already differ
        t = compare_tensor(k, a.tensors[k], b.tensors[k], tol)
        rep.tensors.insert(0, t)
    rep.notes.append(f"layouts: A {a.layout}, B {b.layout}")
    rep.not_produced = [k for k in a.tensors if k not in b.tensors and k.split(".")[1] != "in"]
    return rep


def _fmt(x: Optional[float], spec: str = ".2e") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def render_table(rep: ParityReport, verbose: bool = True) -> str:
    """A terminal table in execution order with the first divergence called out."""
    fd = rep.first_divergence
    lines = [f"parity {rep.stage}: {rep.ref}  [{rep.layout}]"]
    if rep.settings:
        lines.append("  " + ", ".join(f"{k}={v}" for k, v in rep.settings.items()))
    lines.append(f"  tolerance: atol {rep.tolerance.atol:g} (x peak |ref|), rtol {rep.tolerance.rtol:g}; integers exact")
    header = f"  {'tensor':<34} {'shape':<16} {'max_abs':>9} {'max_rel':>9} {'cosine':>10} {'snr_dB':>7}  result"
    lines += [header, "  " + "-" * (len(header) - 2)]
    for t in rep.tensors:
        if not verbose and t.passed and t is not fd:
            continue
        cos = "-" if t.cosine is None else f"{t.cosine:.7f}"
        snr = "inf" if (t.snr_db is None and t.passed and t.max_abs == 0) else _fmt(t.snr_db, ".1f")
        res = "ok" if t.passed else "FAIL" if t.gated else "differs (not gated)"
        if t is fd:
            res += "  <- first divergence"
        name = t.name.split(".", 1)[1] if t.name.count(".") >= 2 else t.name
        lines.append(f"  {name:<34} {str(t.shape):<16} {_fmt(t.max_abs):>9} {_fmt(t.max_rel):>9} {cos:>10} {snr:>7}  {res}")
        if t.top1_agreement is not None:
            lines.append(f"  {'':<34} top-1 agreement {t.top1_agreement:.3f}")
        if t.note and (not t.passed or not t.gated):
            lines.append(f"  {'':<34} {t.note}")
    if rep.not_produced:
        lines.append(f"  not produced by this backend ({len(rep.not_produced)}): "
                     + ", ".join(k.split(".", 1)[1] for k in rep.not_produced[:10])
                     + (" …" if len(rep.not_produced) > 10 else ""))
    for n in rep.notes:
        lines.append(f"  note: {n}")
    n_fail = sum(not t.passed for t in rep.gated)
    if rep.informational:
        lines.append(f"  INFO: {len(rep.tensors)} tensors compared, none gated at this dtype")
    elif rep.passed:
        n_ung = len(rep.tensors) - len(rep.gated)
        lines.append(f"  PASS: {len(rep.gated)} tensors within tolerance"
                     + (f" ({n_ung} more reported, not gated)" if n_ung else ""))
    else:
        what = f"first divergence: {fd.name}" if fd is not None else (
            f"NaN in {rep.first_nan}" if rep.first_nan else "nothing compared")
        lines.append(f"  FAIL: {n_fail}/{len(rep.gated)} gated tensors out of tolerance; {what}")
    return "\n".join(lines)


def render_summary(reports: List[ParityReport]) -> str:
    """One line per dump (for ``parity run``)."""
    lines = [f"  {'dump':<28} {'stage':<9} {'tensors':>7} {'worst max_rel':>13}  result"]
    for r in reports:
        worst = max((t.max_rel for t in r.tensors if t.max_rel is not None), default=None)
        fd = r.first_divergence
        res = "PASS" if r.passed else f"FAIL (first: {fd.name if fd else r.first_nan or 'nothing compared'})"
        n_ung = len(r.tensors) - len(r.gated)
        if r.informational:
            res = "INFO (not gated at this dtype)"
        elif r.passed and n_ung:
            res += f" ({n_ung} not gated)"
        name = r.ref.rsplit("/", 1)[-1]
        lines.append(f"  {name:<28} {r.stage:<9} {len(r.tensors):>7} {_fmt(worst):>13}  {res}")
    n_info = sum(r.informational for r in reports)
    n_ok = sum(r.passed for r in reports) - n_info
    lines.append(f"{n_ok} passed, {len(reports) - n_ok - n_info} failed"
                 + (f", {n_info} informational" if n_info else ""))
    return "\n".join(lines)


def plot_report(rep: ParityReport, dump: Dump, run: StageRun, out: str) -> str:
    """Error per tap (log scale) and reference-vs-ours of the final output; writes ``out``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 10))
    grid = fig.add_gridspec(4, 1, height_ratios=[1.3, 1, 1, 1])
    ts = [t for t in rep.tensors if t.max_rel is not None]
    names = [t.name.split(".", 2)[-1] for t in ts]
    vals = [max(t.max_rel, 1e-12) for t in ts]
    colors = ["tab:green" if t.passed else "tab:red" for t in ts]
    ax = fig.add_subplot(grid[0])
    ax.bar(range(len(vals)), vals, color=colors)
    ax.set_yscale("log")
    ax.axhline(max(rep.tolerance.atol, 1e-12), color="k", ls="--", lw=0.8, label="atol")
    ax.set_xticks(range(len(vals)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("max |ours-ref| / peak |ref|")
    fd = rep.first_divergence
    ax.set_title(f"parity {rep.stage}: {rep.ref.rsplit('/', 1)[-1]} — "
                 + ("PASS" if rep.passed else f"FAIL, first divergence {fd.name if fd else rep.first_nan}"))
    ax.legend(fontsize=7)
    outs = [k for k in run.order if k.startswith(f"{rep.stage}.out.") and k in dump.tensors
            and run.tensors[k].is_floating_point()]
    if outs:
        key = outs[-1]
        r, o = dump.tensors[key].float().squeeze(), run.tensors[key].float().squeeze()
        if r.shape == o.shape and r.dim() == 2:
            lo, hi = float(r.min()), float(r.max())
            for i, (img, title) in enumerate(((r, "reference"), (o, "ours"))):
                a = fig.add_subplot(grid[1 + i])
                im = a.imshow(img.numpy(), aspect="auto", origin="lower", cmap="magma", vmin=lo, vmax=hi)
                a.set_title(f"{key}: {title}", fontsize=9)
                fig.colorbar(im, ax=a)
            d = (o - r).numpy()
            lim = max(abs(float(d.min())), abs(float(d.max())), 1e-12)
            a = fig.add_subplot(grid[3])
            im = a.imshow(d, aspect="auto", origin="lower", cmap="coolwarm", vmin=-lim, vmax=lim)
            a.set_title(f"{key}: ours - reference", fontsize=9)
            fig.colorbar(im, ax=a)
        elif r.shape == o.shape:
            r1, o1 = r.reshape(-1).numpy(), o.reshape(-1).numpy()
            a = fig.add_subplot(grid[1:3])
            a.plot(r1, lw=0.6, label="reference")
            a.plot(o1, lw=0.6, alpha=0.7, label="ours")
            a.set_title(key, fontsize=9)
            a.legend(fontsize=7)
            a = fig.add_subplot(grid[3])
            a.plot(o1 - r1, lw=0.6, color="tab:red")
            a.set_title(f"{key}: ours - reference", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
