"""``cosytools parity …`` and ``cosytools dump …`` commands."""
from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List, Optional

import click

from .dump import STAGES, Dump, DumpError, list_dumps, read_dump
from .metrics import Tolerance, default_tolerance, ungated_tensors
from .report import ParityReport, build_report, diff_dumps, plot_report, render_summary, render_table
from .runners import STAGE_COMPONENTS, run_dump

__all__ = ["register", "run_parity"]

EXIT_MISMATCH = 1


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def _tolerance(stage: str, dtype: str, atol: Optional[float], rtol: Optional[float]) -> Tolerance:
    d = default_tolerance(stage, dtype)
    return Tolerance(d.atol if atol is None else atol, d.rtol if rtol is None else rtol)


class _Models:
    """Loads each (model dir, backend, device, dtype, components) once per command."""

    def __init__(self, model: Optional[str], backend: str, device: Optional[str], dtype: Optional[str],
                 fmt: str, gguf: Any = None, components: Optional[Iterable[str]] = None) -> None:
        self.model, self.backend, self.device, self.dtype, self.fmt = model, backend, device, dtype, fmt
        self.gguf = gguf  # LLM trunk: a GGUF path, False (float weights) or None (auto: env / llm.gguf)
        # components: load these once and serve every stage from one backend (a compiled backend
        # then compiles each part once for the whole folder, not once per stage)
        self.components = tuple(sorted(set(components))) if components else None
        self._cache: Dict[tuple, Any] = {}

    def get(self, comps: tuple) -> Any:
        import backends
        from cosytools.loading import load_model

        key = tuple(sorted(comps))
        if self.components is not None and set(key) <= set(self.components):
            key = self.components
        if key not in self._cache:
            m = load_model(self.model, components=key, fmt=self.fmt, device=self.device, dtype=self.dtype,
                           gguf=self.gguf)
            self._cache[key] = backends.create(self.backend, m, capture=False)
        return self._cache[key]


def run_parity(dump: Dump, models: _Models, atol: Optional[float] = None, rtol: Optional[float] = None) -> tuple:
    """Run one dump on the backend; returns (report, run)."""
    backend = models.get(STAGE_COMPONENTS.get(dump.stage, ()))
    dtype = str(backend.dtype).replace("torch.", "")
    files = getattr(backend.model, "files", {}) if dump.stage == "llm" else {}
    gtype = files.get("llm_gguf_type")
    if gtype:  # quantized trunk: the documented drift bound of its type (docs/quantization.md)
        from cosytools.gguf_io import gguf_tolerance
        d = default_tolerance(dump.stage, dtype)
        ga, gr = gguf_tolerance(gtype, d.atol, d.rtol)
        atol, rtol = (ga if atol is None else atol), (gr if rtol is None else rtol)
    tol = _tolerance(dump.stage, dtype, atol, rtol)
    run = run_dump(backend, dump)
    settings = {"backend": backend.name, "device": str(backend.device), "dtype": dtype,
                "model": str(backend.model.model_dir)}
    if files.get("llm"):
        settings["llm_weights"] = files["llm"]
    if gtype:
        settings["gguf_type"] = gtype
    return build_report(dump, run, tol, settings, ungated=ungated_tensors(dtype)), run


def _gguf_drift(rep: ParityReport) -> Optional[Dict[str, Any]]:
    """Log-prob drift of a run on GGUF weights (None for float weights)."""
    t = next((t for t in rep.tensors if t.name.endswith(".out.logp")), None)
    if "gguf_type" not in rep.settings or t is None:
        return None
    return {"file": rep.settings.get("llm_weights"), "type": rep.settings["gguf_type"], "steps": t.shape[0],
            "logp_max_abs": t.max_abs, "cosine": t.cosine, "top1_agreement": t.top1_agreement}


def _model_option(f):
    f = click.option("--format", "fmt", type=click.Choice(["auto", "pt", "safetensors"]), default="auto",
                     show_default=True, help="Checkpoint format to load.")(f)
    f = click.option("--rtol", type=float, default=None, help="Override the relative tolerance.")(f)
    f = click.option("--atol", type=float, default=None,
                     help="Override the absolute tolerance (in units of the reference's peak magnitude).")(f)
    f = click.option("--dtype", default=None, help="float32, bf16 or fp16 (tolerances follow the dtype).")(f)
    f = click.option("--device", default=None, help="cpu or cuda.")(f)
    f = click.option("--backend", default="eager", show_default=True, help="Backend to check.")(f)
    f = click.option("--model", default=None, help="Model dir the dump was made with (default: the built-in tiny).")(f)
    return f


def _emit(rep: ParityReport, as_json: bool, quiet: bool) -> None:
    if as_json:
        click.echo(json.dumps(rep.to_dict(), indent=2))
    else:
        click.echo(render_table(rep, verbose=not quiet))


def _stage_command(stage: str) -> click.Command:
    @click.command(stage, help=f"""Run the {stage} call recorded in a reference dump on a backend and compare
every output and tap.

\b
Exit code: 0 all within tolerance, 1 mismatch, 2 bad input.
Example:
  cosytools parity {stage} --ref ../shared/fixtures/cv3-tiny/refs/{ {'llm': 'llm_teacher', 'flow': 'flow_full', 'hift': 'hift_full', 'e2e': 'e2e', 'tokenizer': 'tokenizer', 'mel': 'mel'}[stage]}.safetensors \\
      --model ../shared/fixtures/cv3-tiny/model --backend eager
""")
    @click.option("--ref", "ref", required=True, type=click.Path(), help="Reference dump (safetensors).")
    @_model_option
    @click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
    @click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write a PNG: error per tap + output overlay.")
    @click.option("-q", "--quiet", is_flag=True, help="Table rows for failures only.")
    def cmd(ref: str, model: Optional[str], backend: str, device: Optional[str], dtype: Optional[str],
            atol: Optional[float], rtol: Optional[float], fmt: str, as_json: bool, plot: Optional[str],
            quiet: bool, gguf: Optional[str] = None, no_gguf: bool = False) -> None:
        if gguf and no_gguf:
            raise click.UsageError("--gguf and --no-gguf exclude each other")
        dump = read_dump(ref, stage=stage)
        models = _Models(model, backend, device, dtype, fmt, False if no_gguf else gguf)
        rep, run = run_parity(dump, models, atol, rtol)
        drift = _gguf_drift(rep)
        if as_json and drift:
            click.echo(json.dumps({**rep.to_dict(), "gguf_drift": drift}, indent=2))
        else:
            _emit(rep, as_json, quiet)
            if drift:
                click.echo(f"  GGUF {drift['type']} drift over {drift['steps']} teacher-forced steps: log-prob max abs "
                           f"{drift['logp_max_abs']:.3e}, cosine {drift['cosine']:.7f}, "
                           f"top-1 agreement {drift['top1_agreement']:.3f}")
        if plot:
            plot_report(rep, dump, run, plot)
            click.echo(f"wrote {plot}", err=True)
        if not rep.passed:
            raise _Exit(EXIT_MISMATCH)
    if stage == "llm":
        cmd = click.option("--no-gguf", is_flag=True, help="Float LLM weights even if llm.gguf / $COSYVOICE_LLM_GGUF "
                           "is there.")(cmd)
        cmd = click.option("--gguf", type=click.Path(dir_okay=False), default=None,
                           help="Run the Qwen2 trunk from this GGUF (heads from the model's llm.pt) and report the "
                           "drift; the tolerance is that GGUF type's documented bound.")(cmd)
    return cmd


@click.group("parity", context_settings={"help_option_names": ["-h", "--help"]})
def parity_group() -> None:
    """Compare a backend (or a port's dump) with reference dumps, stage by stage, tap by tap.

    \b
    Examples:
      cosytools parity flow --ref refs/flow_full.safetensors --model MODEL --backend eager
      cosytools parity run refs/ --model MODEL            # every dump in a folder
      cosytools parity diff python.safetensors port.safetensors   # no model needed
    """


for _s in STAGES:
    parity_group.add_command(_stage_command(_s))


@parity_group.command("run")
@click.argument("folder", type=click.Path())
@_model_option
@click.option("--json", "as_json", is_flag=True, help="Print all reports as one JSON object.")
@click.option("-v", "--verbose", is_flag=True, help="Print every report's table, not just the summary.")
def parity_run(folder: str, model: Optional[str], backend: str, device: Optional[str], dtype: Optional[str],
               atol: Optional[float], rtol: Optional[float], fmt: str, as_json: bool, verbose: bool) -> None:
    """Run every dump in FOLDER (the stage comes from each file) and print one summary.

    \b
    Example:
      cosytools parity run ../shared/fixtures/cv3-tiny/refs --model ../shared/fixtures/cv3-tiny/model
    """
    paths = list_dumps(folder)
    if not paths:
        raise DumpError(f"{folder}: no *.safetensors dumps")
    dumps = [read_dump(p) for p in paths]
    comps = {c for d in dumps for c in STAGE_COMPONENTS.get(d.stage, ())}
    models = _Models(model, backend, device, dtype, fmt, components=comps)
    reports: List[ParityReport] = []
    for dump in dumps:
        rep, _ = run_parity(dump, models, atol, rtol)
        reports.append(rep)
        if verbose and not as_json:
            click.echo(render_table(rep, verbose=True))
            click.echo()
    if as_json:
        click.echo(json.dumps({"passed": all(r.passed for r in reports), "reports": [r.to_dict() for r in reports]},
                              indent=2))
    else:
        click.echo(render_summary(reports))
    if not all(r.passed for r in reports):
        raise _Exit(EXIT_MISMATCH)


@parity_group.command("diff")
@click.argument("ref", type=click.Path())
@click.argument("other", type=click.Path())
@click.option("--stage", type=click.Choice(list(STAGES)), default=None, help="Stage of a flat multi-stage dump.")
@click.option("--atol", type=float, default=None, help="Absolute tolerance (x peak |ref|).")
@click.option("--rtol", type=float, default=None)
@click.option("--dtype", default="float32", show_default=True, help="Tolerance table to use.")
@click.option("--json", "as_json", is_flag=True)
@click.option("-q", "--quiet", is_flag=True)
def parity_diff(ref: str, other: str, stage: Optional[str], atol: Optional[float], rtol: Optional[float],
                dtype: str, as_json: bool, quiet: bool) -> None:
    """Compare two dumps tensor by tensor with no model (REF is the reference).

    \b
    Example:
      cosytools parity diff refs/flow_full.safetensors my_port_flow.safetensors
    """
    a = read_dump(ref, stage=stage)
    b = read_dump(other, stage=stage or a.stage)
    if a.stage != b.stage:
        raise DumpError(f"{ref} is a {a.stage} dump and {other} a {b.stage} dump")
    rep = diff_dumps(a, b, _tolerance(a.stage, dtype, atol, rtol))
    _emit(rep, as_json, quiet)
    if not rep.passed:
        raise _Exit(EXIT_MISMATCH)


@click.command("dump")
@click.argument("stage", type=click.Choice(["llm", "flow", "hift", "e2e"]))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Dump file to write.")
@click.option("--model", default=None, help="Model dir or tiny/full (default tiny).")
@click.option("--backend", default="eager", show_default=True)
@click.option("--device", default=None)
@click.option("--dtype", default=None)
@click.option("--seed", default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--tokens", default=40, show_default=True, help="Speech tokens of the call (flow/e2e/llm).")
@click.option("--all-steps", is_flag=True, help="flow: keep DiT taps of every Euler step (default: step 0).")
def dump_cmd(stage: str, output: str, model: Optional[str], backend: str, device: Optional[str],
             dtype: Optional[str], seed: int, tokens: int, all_steps: bool) -> None:
    """Record one STAGE call with seeded random inputs (inputs, outputs and taps) to a dump.

    \b
    Example:
      cosytools dump flow --model tiny -o flow_tiny.safetensors
      cosytools parity flow --ref flow_tiny.safetensors --model tiny     # round trip: passes
    """
    from .standalone import record_stage

    path = record_stage(stage, output, model=model, backend=backend, device=device, dtype=dtype, seed=seed,
                        tokens=tokens, all_steps=all_steps)
    click.echo(f"wrote {path}")


def register(cli: click.Group) -> None:
    """Attach the parity and dump commands to the main CLI."""
    cli.add_command(parity_group)
    cli.add_command(dump_cmd)
    # the group's exit code 1 for mismatches: map our private exception
    original = cli.main

    def main(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except _Exit as e:
            raise click.exceptions.Exit(e.code)
    cli.main = main  # type: ignore[method-assign]

