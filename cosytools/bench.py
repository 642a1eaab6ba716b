"""``cosytools bench``: per-stage timings of one or more backends on the same seeded inputs.

Stages timed separately (CUDA-synchronised at stage boundaries on the GPU,
``time.perf_counter`` everywhere): frontend features, LLM prefill, LLM decode (per token and
tokens/s), flow (per call and per Euler step), HiFT, end to end (wall, RTF) and, with
``--stream``, first-chunk latency and the gaps between chunks.  With random weights the LLM
would stop at random, so exactly ``--speech-tokens`` tokens are generated (all stop ids masked).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import click
import torch

from .errors import InputError
from .models.llm import ENDOFPROMPT_ID
from .progress import Progress

__all__ = ["BenchInputs", "make_inputs", "bench_backend", "run_bench", "SCHEMA_VERSION", "register"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
EULER_STEPS = 10


@dataclass
class BenchInputs:
    text: torch.Tensor
    prompt_text: torch.Tensor
    prompt_speech_token: torch.Tensor
    prompt_feat: torch.Tensor
    embedding: torch.Tensor
    prompt_wav: torch.Tensor
    speech_tokens: int


def make_inputs(text_tokens: int = 60, speech_tokens: int = 250, prompt_seconds: float = 3.0,
                seed: int = 0) -> BenchInputs:
    """Seeded synthetic inputs: random text ids, a prompt of ``prompt_seconds`` (tokens, mel, wav)."""
    g = torch.Generator().manual_seed(seed)
    n_prompt_tok = int(round(prompt_seconds * 25))
    prompt_text = torch.cat([torch.randint(0, 2000, (1, 8), generator=g), torch.tensor([[ENDOFPROMPT_ID]])], dim=1)
    t = torch.arange(int(prompt_seconds * 24000)) / 24000.0
    wav = 0.3 * torch.sin(2 * torch.pi * 220 * t) * (1 + 0.5 * torch.sin(2 * torch.pi * 3 * t))
    wav = wav + 0.01 * torch.randn(t.shape, generator=g)
    return BenchInputs(
        text=torch.randint(0, 2000, (1, text_tokens), generator=g),
        prompt_text=prompt_text,
        prompt_speech_token=torch.randint(0, 6561, (1, n_prompt_tok), generator=g),
        prompt_feat=torch.randn(1, n_prompt_tok * 2, 80, generator=g) * 2 - 6,
        embedding=torch.randn(1, 192, generator=g),
        prompt_wav=wav[None].float(),
        speech_tokens=speech_tokens,
    )


class _Timer:
    """Wall time of a block; synchronises CUDA before and after so stage times do not overlap."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.last_peak_mb: Optional[float] = None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        dt = time.perf_counter() - t0
        self.last_peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20 if self.cuda else None
        return dt, out


def _frontend(inp: BenchInputs) -> Any:
    from .frontend.features import campplus_features, prompt_mel, resample, whisper_log_mel

    mel = prompt_mel(inp.prompt_wav)
    wav16 = resample(inp.prompt_wav, 24000, 16000)
    return mel, whisper_log_mel(wav16), campplus_features(wav16)


def _generate(backend: Any, inp: BenchInputs, seed: int) -> tuple[List[int], float, float]:
    """All tokens, the time at which the first of them reached the host (prefill + one step, or
    one block of steps, see ``Backend.token_block``) and the total generation time."""
    timer = _Timer(backend.device)
    gen_dev = backend.device if backend.device.type == "cuda" else "cpu"
    gen = torch.Generator(device=gen_dev).manual_seed(seed)
    n = inp.speech_tokens
    toks: List[int] = []
    timer.sync()
    t0 = time.perf_counter()
    t_first = None
    for tok in backend.llm_generate(inp.text, inp.prompt_text, inp.prompt_speech_token, min_len=n, max_len=n,
                                    generator=gen, strict_min_len=True):
        if t_first is None:
            t_first = time.perf_counter() - t0
        toks.append(tok)
    timer.sync()
    total = time.perf_counter() - t0
    return toks, (t_first if t_first is not None else total), total


def _decode_rates(backend: Any, n: int, t_first: float, t_total: float) -> Dict[str, float]:
    """Decode time per token and tokens/s after the first delivery.  That delivery carries
    ``backend.token_block`` tokens (device sampling hands them over per stop check), so only the
    tokens that came after it count, in the time after it."""
    first_block = min(max(1, int(getattr(backend, "token_block", 1))), n)
    after = max(n - first_block, 1)
    return {"llm_decode_per_token_s": (t_total - t_first) / after,
            "llm_tokens_per_s": after / max(t_total - t_first, 1e-12)}


def _one_run(backend: Any, inp: BenchInputs, seed: int, stream: bool) -> tuple[Dict[str, float], Dict[str, Any]]:
    timer = _Timer(backend.device)
    r: Dict[str, float] = {}
    r["frontend_s"], _ = timer(lambda: _frontend(inp))
    r["llm_prefill_s"], _ = timer(lambda: backend.llm_session(inp.text, inp.prompt_text, inp.prompt_speech_token,
                                                              max_new_tokens=inp.speech_tokens))
    if timer.cuda:
        torch.cuda.reset_peak_memory_stats()
    toks, t_first, t_total = _generate(backend, inp, seed)
    if timer.cuda:
        r["llm_peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    n = len(toks)
    r["llm_first_token_s"] = t_first
    r["llm_total_s"] = t_total
    r.update(_decode_rates(backend, n, t_first, t_total))
    token = torch.tensor([toks], dtype=torch.long)
    r["flow_s"], mel = timer(lambda: backend.flow(token, inp.prompt_speech_token, inp.prompt_feat, inp.embedding,
                                                  streaming=False, finalize=True))
    r["flow_per_step_s"] = r["flow_s"] / EULER_STEPS
    if timer.last_peak_mb is not None:
        r["flow_peak_mem_mb"] = timer.last_peak_mb
    r["hift_s"], (speech, _) = timer(lambda: backend.hift(mel, finalize=True))
    if timer.last_peak_mb is not None:
        r["hift_peak_mem_mb"] = timer.last_peak_mb
    r["e2e_s"] = r["frontend_s"] + r["llm_total_s"] + r["flow_s"] + r["hift_s"]
    audio_s = speech.shape[-1] / 24000.0
    r["audio_s"] = audio_s
    r["rtf"] = r["e2e_s"] / audio_s
    outputs = {"tokens": toks, "mel": mel.detach().cpu(), "speech": speech.detach().cpu()}
    if stream:
        from .pipeline import Pipeline

        pipe = Pipeline(backend, None, progress=False)
        timer.sync()
        t0 = time.perf_counter()
        gen_dev = backend.device if backend.device.type == "cuda" else "cpu"
        g = torch.Generator(device=gen_dev).manual_seed(seed)
        tok_iter = backend.llm_generate(inp.text, inp.prompt_text, inp.prompt_speech_token, min_len=n, max_len=n,
                                        generator=g, strict_min_len=True)
        ready = []
        # a chunk's samples are on the host when it is yielded (t_ready); no device-wide sync here:
        # that would also wait for the LLM thread's queued decode steps, which the listener does not
        for ch in pipe.token2wav_stream(tok_iter, inp.prompt_speech_token, inp.prompt_feat, inp.embedding):
            ready.append(ch.t_ready - t0)
        timer.sync()
        r["stream_first_chunk_s"] = ready[0]
        gaps = [b - a for a, b in zip(ready, ready[1:])]
        r["stream_max_gap_s"] = max(gaps) if gaps else 0.0
        r["stream_total_s"] = ready[-1]
        r["stream_chunks"] = float(len(ready))
    return r, outputs


def _kernel_summary(prof: Any, cuda: bool) -> Dict[str, Any]:
    """Busy time of the device (sum of kernel times; CPU: self CPU time) and the top kernels."""
    rows = []
    for e in prof.key_averages():
        if cuda:
            if str(getattr(e, "device_type", "")).endswith("CUDA"):
                t = getattr(e, "device_time_total", None)
                if t is None:
                    t = e.cuda_time_total
                rows.append((e.key, t, e.count))
        else:
            rows.append((e.key, e.self_cpu_time_total, e.count))
    rows.sort(key=lambda r: -r[1])
    busy_us = sum(r[1] for r in rows)
    return {"busy_ms": busy_us / 1000.0, "kernels": len(rows), "launches": sum(r[2] for r in rows),
            "top": [{"name": k[:120], "ms": t / 1000.0, "count": c} for k, t, c in rows[:15]]}


def profile_run(backend: Any, inp: BenchInputs, seed: int, out_dir: Path) -> Dict[str, Any]:
    """One run of each stage under ``torch.profiler`` (after the timed runs): per stage the wall
    time under the profiler, the device busy time (sum of kernel times) and the top kernels,
    plus the full ``key_averages`` table in ``out_dir/<backend>.<stage>.txt``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = backend.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = _Timer(backend.device)
    state: Dict[str, Any] = {}
    n = inp.speech_tokens

    def llm() -> Any:
        toks, _, _ = _generate(backend, inp, seed)
        state["tokens"] = toks
        return toks

    def flow() -> Any:
        state["mel"] = backend.flow(torch.tensor([state["tokens"]], dtype=torch.long), inp.prompt_speech_token,
                                    inp.prompt_feat, inp.embedding, streaming=False, finalize=True)
        return state["mel"]

    summary: Dict[str, Any] = {}
    for stage, fn in (("llm", llm), ("flow", flow), ("hift", lambda: backend.hift(state["mel"], finalize=True))):
        with profile(activities=acts) as prof:
            wall, _ = timer(fn)
        table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                          row_limit=40, max_name_column_width=90)
        (out_dir / f"{backend.name}.{stage}.txt").write_text(table)
        summary[stage] = {"wall_ms_under_profiler": wall * 1000.0, **_kernel_summary(prof, cuda)}
    summary["llm"]["tokens"] = n
    summary["llm"]["busy_ms_per_token"] = summary["llm"]["busy_ms"] / max(n, 1)
    return summary


def _peak_memory(device: torch.device, stages: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    if device.type == "cuda":  # stages reset the peak counter: the run's peak is the largest stage peak
        peaks = [v["max"] for k, v in stages.items() if k.endswith("_peak_mem_mb")]
        return {"peak_gpu_mem_mb": max(peaks + [torch.cuda.max_memory_allocated(device) / 2 ** 20])}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_mb": rss_kb / 1024.0}


def _summary(values: List[float]) -> Dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def bench_backend(name: str, model: Any, inp: BenchInputs, warmup: int, repeat: int, seed: int, stream: bool,
                  progress: Optional[Progress] = None, options: Optional[Dict[str, Any]] = None,
                  profile_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Warm up, then time ``repeat`` runs of every stage on one backend."""
    import backends

    backend = backends.create(name, model, capture=False, **(options or {}))
    if backend.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(backend.device)
    t0 = time.perf_counter()
    warm_parts = backend.warmup() if hasattr(backend, "warmup") else None
    for _ in range(warmup):
        _one_run(backend, inp, seed, stream)
        if progress:
            progress.update()
    warmup_s = time.perf_counter() - t0
    runs: List[Dict[str, float]] = []
    outputs: Dict[str, Any] = {}
    log.info("bench %s: warm-up %.1f s", name, warmup_s)
    for _ in range(repeat):
        r, outputs = _one_run(backend, inp, seed, stream)
        log.info("bench %s run: llm %.3f s, flow %.3f s, hift %.3f s", name, r["llm_total_s"], r["flow_s"],
                 r["hift_s"])
        runs.append(r)
        if progress:
            progress.update()
    stages = {k: _summary([r[k] for r in runs]) for k in runs[0]}
    res = {"backend": name, "settings": backend.describe(),
           "warmup_s": warmup_s, "warmup_parts": warm_parts if isinstance(warm_parts, dict) else None,
           "stages": stages, **_peak_memory(backend.device, stages), "_outputs": outputs}
    if profile_dir is not None:
        res["profile"] = profile_run(backend, inp, seed, profile_dir)
    return res


def _parity(ref: Dict[str, Any], ours: Dict[str, Any], dtype: str) -> Dict[str, Any]:
    from parity.metrics import compare_tensor, default_tolerance

    res = {}
    rt, ot = torch.tensor(ref["tokens"]), torch.tensor(ours["tokens"])
    res["tokens"] = compare_tensor("tokens", rt, ot, default_tolerance("llm", dtype)).to_dict()
    if res["tokens"]["passed"]:
        for key, stage in (("mel", "flow"), ("speech", "e2e")):
            res[key] = compare_tensor(key, ref[key], ours[key], default_tolerance(stage, dtype)).to_dict()
    else:
        res["note"] = "tokens differ, so mel/speech are not comparable"
    return res


def run_bench(backends_: List[str], model: str = "tiny", device: Optional[str] = None, dtype: Optional[str] = None,
              text_tokens: int = 60, speech_tokens: int = 250, prompt_seconds: float = 3.0, stream: bool = False,
              warmup: int = 1, repeat: int = 3, seed: int = 0, check_parity: bool = False, show_progress: bool = True,
              options: Optional[Dict[str, Any]] = None, profile_dir: Optional[Path] = None,
              on_partial: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Benchmark every backend in ``backends_`` on the same inputs; returns the JSON document."""
    from .loading import load_model

    if speech_tokens < 2:
        raise InputError("--speech-tokens must be at least 2")
    m = load_model(model, device=device, dtype=dtype)
    inp = make_inputs(text_tokens, speech_tokens, prompt_seconds, seed)
    results = []
    with Progress("bench", total=len(backends_) * (warmup + repeat), unit="runs", enabled=show_progress) as bar:
        for name in backends_:
            bar.set_label(name)
            results.append(bench_backend(name, m, inp, warmup, repeat, seed, stream, bar, options, profile_dir))
            log.info("bench %s: %s", name, ", ".join(f"{k} {v['median']:.4g}" for k, v in results[-1]["stages"].items()))
            if on_partial is not None:  # a later backend that fails or hangs loses nothing measured so far
                on_partial({"partial": True, "results": [{k: v for k, v in r.items() if k != "_outputs"}
                                                         for r in results]})
    base = results[0]
    for r in results:
        # speed-up against the first backend: >1 means faster (rates are inverted accordingly)
        ratios: Dict[str, Optional[float]] = {}
        for k, v in r["stages"].items():
            if k not in base["stages"] or k in ("audio_s", "stream_chunks"):
                continue
            a, b = base["stages"][k]["median"], v["median"]
            higher_is_better = k.endswith("_per_s")
            ratios[k] = (b / a if a > 0 else None) if higher_is_better else (a / b if b > 0 else None)
        r["ratio_vs_first"] = ratios
        if check_parity and r is not base:
            r["parity_vs_first"] = _parity(base["_outputs"], r["_outputs"], str(m.dtype).replace("torch.", ""))
    for r in results:
        r.pop("_outputs")
    dev = m.device
    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:  # pragma: no cover
        ort_version = None
    return {
        "schema": "cosytools-bench", "version": SCHEMA_VERSION,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": str(m.model_dir), "llm_weights": m.files.get("llm"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "dtype": str(m.dtype).replace("torch.", ""),
        "torch_version": torch.__version__, "onnxruntime_version": ort_version, "python": sys.version.split()[0],
        "inputs": {"text_tokens": text_tokens, "speech_tokens": speech_tokens, "prompt_seconds": prompt_seconds,
                   "seed": seed, "stream": stream},
        "warmup": warmup, "repeat": repeat,
        "results": results,
    }


_ROWS = [("frontend_s", "frontend"), ("llm_prefill_s", "llm prefill"), ("llm_decode_per_token_s", "llm decode/token"),
         ("llm_tokens_per_s", "llm tokens/s"), ("llm_total_s", "llm total"), ("flow_s", "flow"),
         ("flow_per_step_s", "flow/Euler step"), ("hift_s", "hift"), ("e2e_s", "end to end"), ("rtf", "RTF"),
         ("stream_first_chunk_s", "first chunk"), ("stream_max_gap_s", "max chunk gap")]


def render_table(doc: Dict[str, Any]) -> str:
    res = doc["results"]
    lines = [f"cosytools bench  model={doc['model']}  device={doc['device']}  dtype={doc['dtype']}  "
             f"torch {doc['torch_version']}",
             f"inputs: {doc['inputs']['text_tokens']} text tokens, {doc['inputs']['speech_tokens']} speech tokens, "
             f"{doc['inputs']['prompt_seconds']} s prompt; median of {doc['repeat']} after {doc['warmup']} warm-up"]
    head = f"  {'stage':<18}" + "".join(f"{r['backend']:>16}" for r in res)
    if len(res) > 1:
        head += "".join(f"{'speed-up':>12}" for r in res[1:])
    lines += [head, "  " + "-" * (len(head) - 2)]
    for key, label in _ROWS:
        if key not in res[0]["stages"]:
            continue
        vals = []
        for r in res:
            v = r["stages"][key]["median"]
            vals.append(f"{v:>16.2f}" if key in ("llm_tokens_per_s", "rtf") else f"{v * 1000:>13.2f} ms")
        line = f"  {label:<18}" + "".join(vals)
        for r in res[1:]:
            ratio = r["ratio_vs_first"].get(key)
            line += f"{ratio:>11.2f}x" if ratio else f"{'':>12}"
        lines.append(line)
    for r in res:
        mem = r.get("peak_gpu_mem_mb") or r.get("peak_rss_mb")
        what = "GPU peak" if "peak_gpu_mem_mb" in r else "RSS peak"
        lines.append(f"  {r['backend']}: warm-up {r['warmup_s']:.2f} s, {what} {mem:.0f} MB")
        if "parity_vs_first" in r:
            p = r["parity_vs_first"]
            parts = [f"{k} {'ok' if v.get('passed') else 'DIFF'} (max_abs {v.get('max_abs', 0):.2e})"
                     for k, v in p.items() if isinstance(v, dict)]
            lines.append(f"    parity vs {res[0]['backend']}: " + ", ".join(parts) + (f"; {p['note']}" if "note" in p else ""))
        if "profile" in r:
            for stage in ("llm", "flow", "hift"):
                pr = r["profile"][stage]
                top = pr["top"][0] if pr["top"] else {"name": "-", "ms": 0.0}
                lines.append(f"    profile {stage}: wall {pr['wall_ms_under_profiler']:.1f} ms (profiled), busy "
                             f"{pr['busy_ms']:.1f} ms in {pr['launches']} launches; top {top['name'][:60]} "
                             f"{top['ms']:.1f} ms")
    return "\n".join(lines)


def plot_bench(doc: Dict[str, Any], out: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = doc["results"]
    parts = [("frontend_s", "frontend"), ("llm_total_s", "llm"), ("flow_s", "flow"), ("hift_s", "hift")]
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(res), 4.5))
    bottoms = [0.0] * len(res)
    for key, label in parts:
        vals = [r["stages"][key]["median"] for r in res]
        ax.bar(range(len(res)), vals, bottom=bottoms, label=label)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    for i, r in enumerate(res):
        ax.text(i, bottoms[i], f"RTF {r['stages']['rtf']['median']:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(res)))
    ax.set_xticklabels([r["backend"] for r in res])
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"{doc['device']} {doc['dtype']}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _partial_writer(json_out: Optional[str]) -> Optional[Callable[[Dict[str, Any]], None]]:
    """Write each backend's results to ``json_out`` as soon as they exist (replaced by the full
    document at the end)."""
    if not json_out or json_out == "-":
        return None

    def write(doc: Dict[str, Any]) -> None:
        with open(json_out, "w") as f:
            json.dump(doc, f, indent=2)
    return write


@click.command("bench")
@click.option("--backend", "backends_", multiple=True, default=("eager",), show_default=True,
              help="Backend to time; repeat to compare (ratios are against the first).")
@click.option("--model", default="tiny", show_default=True, help="Model dir, or tiny / full (random weights).")
@click.option("--device", default=None, help="cpu or cuda.")
@click.option("--dtype", default=None, help="float32, bf16 or fp16.")
@click.option("--text-tokens", default=60, show_default=True)
@click.option("--speech-tokens", default=250, show_default=True, help="Tokens generated (25 per second of audio).")
@click.option("--prompt-seconds", default=3.0, show_default=True)
@click.option("--stream", is_flag=True, help="Also time streaming synthesis (first-chunk latency, chunk gaps).")
@click.option("--warmup", default=1, show_default=True)
@click.option("--repeat", default=3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--check-parity", is_flag=True, help="Compare each backend's outputs with the first backend's.")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False),
              help="Write the results as JSON to this file ('-' for stdout).")
@click.option("--plot", default=None, type=click.Path(dir_okay=False), help="Stacked bar chart per backend (PNG).")
@click.option("--option", "opts", multiple=True, help="Backend option KEY=VALUE (e.g. mode=reduce-overhead).")
@click.option("--profile", "profile_dir", default=None, type=click.Path(file_okay=False),
              help="After the timed runs, profile one more run per stage with torch.profiler: tables in "
                   "this folder, device busy time and top kernels in the JSON ('profile').")
def bench_cmd(backends_: tuple, model: str, device: Optional[str], dtype: Optional[str], text_tokens: int,
              speech_tokens: int, prompt_seconds: float, stream: bool, warmup: int, repeat: int, seed: int,
              check_parity: bool, json_out: Optional[str], plot: Optional[str], opts: tuple,
              profile_dir: Optional[str]) -> None:
    """Time every stage of one or more backends on the same seeded inputs.

    \b
    Examples:
      cosytools bench --backend eager --model tiny
      cosytools bench --backend eager --backend compiled --model full --device cuda --stream --json out.json
    """
    options: Dict[str, Any] = {}
    for o in opts:
        k, _, v = o.partition("=")
        options[k] = {"true": True, "false": False}.get(v.lower(), int(v) if v.isdigit() else v)
    doc = run_bench(list(backends_), model, device, dtype, text_tokens, speech_tokens, prompt_seconds, stream,
                    warmup, repeat, seed, check_parity, options=options,
                    profile_dir=Path(profile_dir) if profile_dir else None,
                    on_partial=_partial_writer(json_out))
    if json_out == "-":
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(render_table(doc))
        if json_out:
            with open(json_out, "w") as f:
                json.dump(doc, f, indent=2)
            click.echo(f"wrote {json_out}", err=True)
    if plot:
        plot_bench(doc, plot)
        click.echo(f"wrote {plot}", err=True)


def register(cli: click.Group) -> None:
    cli.add_command(bench_cmd)
