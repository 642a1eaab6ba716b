"""``cosytools eval``: synthesise every line of a test list, write the WAVs and a report.

A list is JSONL, one utterance per line::

    {"id": "utt1", "text": "Hello.", "prompt_text": "Transcript of the prompt.", "prompt_wav": "prompts/a.wav"}
    {"id": "utt2", "mode": "instruct", "text": "Hi.", "instruct": "Speak softly.", "prompt_wav": "prompts/a.wav"}

(``mode``: ``zero_shot`` — the default when ``prompt_wav`` is given, else ``sft`` —,
``cross_lingual``, ``instruct``, ``sft`` (optional ``speaker``), ``vc`` (``source_wav``)), or
Seed-TTS-eval lines ``id|prompt_text|prompt_wav|text`` (zero-shot; fields after the fourth are
ignored). Both kinds may be mixed; blank lines and ``#`` comments are skipped. Relative WAV
paths are resolved against the list's folder. A zero-shot prompt text without
``<|endofprompt|>`` gets upstream's ``"You are a helpful assistant.<|endofprompt|>"`` in front.

Output: ``OUT_DIR/wavs/ID.wav``, ``OUT_DIR/report.json`` (schema ``cosytools-eval`` v1),
``OUT_DIR/report.md`` and, with ``plots``, ``OUT_DIR/plots/ID.png``. One failing line never stops
the run; its error is in the report. The report is rewritten after every utterance, so a run can
be resumed: lines whose WAV exists and whose previous entry succeeded are kept, the rest is
(re)done. Every utterance is synthesised with the same ``seed``, so a resumed line gives the
audio it would have given in one run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import click

from .errors import CosyToolsError, InputError
from .progress import Progress

__all__ = ["EvalItem", "read_list", "evaluate", "render_markdown", "register", "SCHEMA", "SCHEMA_VERSION"]

log = logging.getLogger(__name__)

SCHEMA = "cosytools-eval"
SCHEMA_VERSION = 1
DEFAULT_PROMPT_PREFIX = "You are a helpful assistant.<|endofprompt|>"
MODES = ("sft", "zero_shot", "cross_lingual", "instruct", "vc")
_MODE_ALIASES = {"instruct2": "instruct", "zeroshot": "zero_shot", "crosslingual": "cross_lingual"}
# what each mode needs from a line (besides id)
_REQUIRED = {"sft": ("text",), "zero_shot": ("text", "prompt_text", "prompt_wav"),
             "cross_lingual": ("text", "prompt_wav"), "instruct": ("text", "instruct", "prompt_wav"),
             "vc": ("source_wav", "prompt_wav")}
_WAV_FIELDS = ("prompt_wav", "source_wav")


@dataclass
class EvalItem:
    """One line of a test list; ``error`` is set when the line itself is unusable."""

    id: str
    line: int
    mode: str = "zero_shot"
    fields: Dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None

    @property
    def file_stem(self) -> str:
        return _safe_name(self.id)


def _safe_name(item_id: str) -> str:
    """A file name for ``item_id``: path separators and odd characters become ``_``."""
    name = re.sub(r"[^\w.\-]", "_", item_id).lstrip(".")
    return name or "_"


def _parse_line(raw: str, lineno: int, base: Path) -> EvalItem:
    if raw.lstrip().startswith("{"):
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            return EvalItem(f"line-{lineno}", lineno, "?", {}, f"line {lineno} is not valid JSON: {e.msg} "
                                                                  f"(column {e.colno})")
        if not isinstance(rec, dict):
            return EvalItem(f"line-{lineno}", lineno, "?", {}, f"line {lineno}: expected a JSON object")
    else:
        parts = raw.split("|")
        if len(parts) < 4:
            return EvalItem(f"line-{lineno}", lineno, "?", {},
                            f"line {lineno}: expected 'id|prompt_text|prompt_wav|text' (Seed-TTS-eval) or a JSON "
                            f"object, got {len(parts)} '|'-separated field(s)")
        rec = {"id": parts[0].strip(), "prompt_text": parts[1].strip(), "prompt_wav": parts[2].strip(),
               "text": parts[3].strip(), "mode": "zero_shot"}
    item_id = rec.get("id")
    if item_id is None or str(item_id).strip() == "":
        return EvalItem(f"line-{lineno}", lineno, "?", rec, f"line {lineno} has no 'id'")
    item_id = str(item_id).strip()
    mode = str(rec.get("mode") or ("zero_shot" if rec.get("prompt_wav") else "sft")).strip().lower()
    mode = _MODE_ALIASES.get(mode.replace("-", "_"), mode.replace("-", "_"))
    item = EvalItem(item_id, lineno, mode, dict(rec))
    if mode not in MODES:
        item.error = f"line {lineno} (id {item_id}): unknown mode {rec.get('mode')!r}; use one of {', '.join(MODES)}"
        return item
    missing = [k for k in _REQUIRED[mode] if not str(rec.get(k) or "").strip()]
    if missing:
        item.error = f"line {lineno} (id {item_id}): mode {mode} needs {', '.join(missing)}"
        return item
    for k in _WAV_FIELDS:
        if rec.get(k):
            p = Path(os.path.expanduser(str(rec[k])))
            item.fields[k] = str(p if p.is_absolute() else (base / p))
    return item


def read_list(path: Union[str, Path]) -> List[EvalItem]:
    """Parse a JSONL / Seed-TTS-eval test list. Raises :class:`InputError` when the file is unusable
    (missing, unreadable, empty, duplicate ids); a bad *line* becomes an item with ``error`` set."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"test list {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read test list {path}: {e}") from None
    base = path.resolve().parent
    items = [_parse_line(raw, i, base) for i, raw in enumerate(text.splitlines(), 1)
             if raw.strip() and not raw.lstrip().startswith("#")]
    if not items:
        raise InputError(f"test list {path} has no utterances (expected JSONL lines or "
                         "'id|prompt_text|prompt_wav|text')")
    if all(it.error for it in items):
        raise InputError(f"no line of {path} is usable; first problem: {items[0].error}")
    seen: Dict[str, int] = {}
    dups = []
    for it in items:
        stem = it.file_stem
        if stem in seen:
            dups.append(f"{it.id!r} (lines {seen[stem]} and {it.line})")
        else:
            seen[stem] = it.line
    if dups:
        raise InputError(f"test list {path} has duplicate ids (their WAVs would overwrite each other): "
                         + ", ".join(dups[:5]) + (" ..." if len(dups) > 5 else ""))
    return items


# ---------------------------------------------------------------------------------------------
def _prompt_text(text: str) -> str:
    return text if "<|endofprompt|>" in text else DEFAULT_PROMPT_PREFIX + text


def _synthesise(pipe: Any, item: EvalItem, stream: bool, gen: Dict[str, Any]) -> Tuple[Any, Dict[str, Any]]:
    """Run one utterance; (waveform [1, n] float32 tensor, facts for the report)."""
    import torch

    f = item.fields
    for k in _WAV_FIELDS:
        if f.get(k) and not Path(f[k]).is_file():
            raise InputError(f"{k} {f[k]} does not exist")
    t0 = time.perf_counter()
    if item.mode == "sft":
        out = pipe.sft(f["text"], f.get("speaker"), stream=stream, prompt_text=f.get("prompt_text"), **gen)
    elif item.mode == "zero_shot":
        out = pipe.zero_shot(f["text"], _prompt_text(str(f["prompt_text"])), f["prompt_wav"], stream=stream, **gen)
    elif item.mode == "cross_lingual":
        out = pipe.cross_lingual(f["text"], f["prompt_wav"], stream=stream, **gen)
    elif item.mode == "instruct":
        out = pipe.instruct(f["text"], f["instruct"], f["prompt_wav"], stream=stream, **gen)
    else:
        out = pipe.vc(f["source_wav"], f["prompt_wav"], stream=stream)
    facts: Dict[str, Any] = {}
    if stream:
        pieces, first, per_segment = [], None, {}
        for chunk in out:
            if first is None:
                first = chunk.t_ready - t0
            pieces.append(chunk.speech)
            per_segment[chunk.segment] = chunk.tokens
        speech = torch.cat(pieces, dim=1) if pieces else torch.zeros(1, 0)
        wall = time.perf_counter() - t0
        facts.update(speech_tokens=sum(per_segment.values()), segments=len(per_segment), chunks=len(pieces),
                     first_chunk_s=first)
    else:
        speech = out.speech
        wall = time.perf_counter() - t0
        facts.update(speech_tokens=len(out.tokens), segments=len(out.segments),
                     timings={k: v for k, v in out.timings.items() if k != "rtf"})
    facts["synth_s"] = wall
    return speech, facts


def _plot_mel(speech: Any, sample_rate: int, out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .frontend.features import prompt_mel

    mel = prompt_mel(speech.reshape(1, -1).float())[0].numpy() if speech.numel() >= 1920 else None
    fig, ax = plt.subplots(figsize=(8, 3))
    if mel is not None:
        im = ax.imshow(mel, origin="lower", aspect="auto", interpolation="nearest",
                       extent=(0, speech.numel() / sample_rate, 0, mel.shape[0]))
        fig.colorbar(im, ax=ax, label="log mel")
    ax.set_xlabel("seconds")
    ax.set_ylabel("mel bin")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _load_previous(out_dir: Path) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Any]]:
    path = out_dir / "report.json"
    if not path.is_file():
        return {}, {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("schema") != SCHEMA:
            raise ValueError(f"schema {doc.get('schema')!r}")
        return {u["id"]: u for u in doc.get("utterances", []) if "id" in u}, doc.get("settings", {})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("ignoring the unreadable previous report %s (%s); everything is done again", path, e)
        return {}, {}


def _median(values: List[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def _summary(entries: List[Dict[str, Any]]) -> Dict[str, Any]:
    ok = [e for e in entries if e["status"] == "ok"]
    audio = sum(e.get("duration_s") or 0.0 for e in ok)
    synth = sum(e.get("synth_s") or 0.0 for e in ok)
    firsts = [e["first_chunk_s"] for e in ok if e.get("first_chunk_s") is not None]
    return {
        "total": len(entries), "ok": len(ok), "failed": len(entries) - len(ok),
        "done_this_run": sum(1 for e in entries if e.get("this_run")),
        "reused": sum(1 for e in entries if not e.get("this_run")),
        "audio_s": round(audio, 3), "synth_s": round(synth, 3),
        "rtf": round(synth / audio, 4) if audio > 0 else None,
        "rtf_median": _median([e["rtf"] for e in ok if e.get("rtf") is not None]),
        "first_chunk_s_median": _median(firsts),
        "first_chunk_s_max": max(firsts) if firsts else None,
    }


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def render_markdown(doc: Dict[str, Any]) -> str:
    """``report.md``: settings, summary, a table of every utterance and the failures with their errors."""
    s, st = doc["summary"], doc["settings"]
    lines = [f"# cosytools eval: {Path(doc['list']).name}", "",
             f"- list: `{doc['list']}`", f"- model: `{st.get('model')}` (backend {st.get('backend')}, device "
             f"{st.get('device')}, dtype {st.get('dtype')})",
             f"- streaming: {'yes' if st.get('stream') else 'no'}; seed {st.get('seed')}; max tokens "
             f"{st.get('max_tokens')}; min tokens {st.get('min_tokens')}",
             f"- date: {doc['date']}", "",
             f"**{s['ok']} of {s['total']} synthesised, {s['failed']} failed** "
             f"({s['done_this_run']} this run, {s['reused']} kept from an earlier run). "
             f"{s['audio_s']:.2f} s of audio in {s['synth_s']:.2f} s, RTF {_fmt(s['rtf'], '.3f')}"
             + (f", first chunk median {_fmt(s['first_chunk_s_median'], '.3f')} s" if st.get("stream") else "")
             + ".", "",
             "| id | mode | status | audio (s) | tokens | RTF | first chunk (s) | synth (s) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for e in doc["utterances"]:
        lines.append(f"| {e['id']} | {e.get('mode', '?')} | {e['status']} | {_fmt(e.get('duration_s'), '.2f')} | "
                     f"{_fmt(e.get('speech_tokens'), 'd')} | {_fmt(e.get('rtf'), '.3f')} | "
                     f"{_fmt(e.get('first_chunk_s'), '.3f')} | {_fmt(e.get('synth_s'), '.2f')} |")
    failed = [e for e in doc["utterances"] if e["status"] != "ok"]
    if failed:
        lines += ["", "## Failures", ""]
        for e in failed:
            err = str(e.get("error", "")).replace("\n", " ")
            lines.append(f"- `{e['id']}` (line {e.get('line')}): {err}")
    return "\n".join(lines) + "\n"


def evaluate(list_path: Union[str, Path], out_dir: Union[str, Path], model: Union[str, Path] = "tiny",
             backend: str = "eager", stream: bool = False, plots: bool = False, device: Optional[str] = None,
             dtype: Optional[str] = None, seed: int = 0, max_tokens: Optional[int] = None,
             min_tokens: Optional[int] = None, redo: bool = False, progress: bool = True,
             pipeline: Any = None) -> Dict[str, Any]:
    """Synthesise every line of ``list_path`` into ``out_dir``; returns the report document.

    ``pipeline``: an existing :class:`~cosytools.pipeline.Pipeline` (then ``model``, ``backend``,
    ``device``, ``dtype`` only label the report). ``redo``: ignore an earlier report in ``out_dir``.
    """
    from .wav import write_wav

    items = read_list(list_path)
    out = Path(out_dir)
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    if pipeline is None:
        from .pipeline import Pipeline
        pipeline = Pipeline.from_model(model, backend=backend, device=device, dtype=dtype, progress=False)
    desc = pipeline.backend.describe() if hasattr(pipeline.backend, "describe") else {}
    settings = {"model": str(getattr(pipeline.model, "model_dir", model)), "backend": desc.get("backend", backend),
                "device": desc.get("device", device), "dtype": desc.get("dtype", dtype), "stream": stream,
                "seed": seed, "max_tokens": max_tokens, "min_tokens": min_tokens}
    previous, prev_settings = ({}, {}) if redo else _load_previous(out)
    changed = {k: (prev_settings.get(k), v) for k, v in settings.items()
               if k in prev_settings and prev_settings[k] != v}
    if previous and changed:
        log.warning("the earlier report in %s was made with other settings (%s); its finished lines are kept — "
                    "pass --redo to synthesise everything again", out,
                    ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()))

    entries: Dict[str, Dict[str, Any]] = {}
    todo: List[EvalItem] = []
    for it in items:
        prev = previous.get(it.id)
        wav = out / "wavs" / f"{it.file_stem}.wav"
        if prev is not None and prev.get("status") == "ok" and wav.is_file():
            entries[it.id] = {**prev, "line": it.line, "this_run": False}
        else:
            todo.append(it)

    doc: Dict[str, Any] = {"schema": SCHEMA, "version": SCHEMA_VERSION, "list": str(Path(list_path).resolve()),
                           "out_dir": str(out.resolve()), "settings": settings}

    def save() -> None:
        ordered = [entries[it.id] for it in items if it.id in entries]
        doc["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        doc["summary"] = _summary(ordered)
        doc["utterances"] = ordered
        _write_atomic(out / "report.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        _write_atomic(out / "report.md", render_markdown(doc))

    gen = {"seed": seed, "max_tokens": max_tokens, "min_tokens": min_tokens}
    sr = pipeline.sample_rate
    if len(todo) < len(items):
        log.info("%d of %d utterances are done already (%s); doing %d", len(items) - len(todo), len(items), out,
                 len(todo))
    if any(it.error is None and any(it.fields.get(k) for k in _WAV_FIELDS) for it in todo):
        # open the frontend's ONNX sub-models now, so the first utterance's RTF does not include it
        # (a failure here shows up again, and is reported, with the lines that need them)
        try:
            pipeline.frontend.speech_tokenizer
            pipeline.frontend.campplus
        except Exception as e:  # noqa: BLE001
            log.debug("frontend sub-models not opened up front: %s", e)
    with Progress("eval", total=len(todo), unit="utts", enabled=progress, eta=True) as bar:
        for it in todo:
            bar.set_postfix(it.id[:40])
            entry: Dict[str, Any] = {"id": it.id, "line": it.line, "mode": it.mode, "this_run": True,
                                     "text": it.fields.get("text")}
            wav = out / "wavs" / f"{it.file_stem}.wav"
            try:
                if it.error:
                    raise InputError(it.error)
                speech, facts = _synthesise(pipeline, it, stream, gen)
                audio = speech.reshape(-1).float().numpy()
                tmp = wav.with_name(wav.stem + ".partial.wav")
                write_wav(tmp, audio, sr)
                os.replace(tmp, wav)
                dur = audio.shape[0] / sr
                entry.update(status="ok", wav=str(wav.relative_to(out)), duration_s=round(dur, 4), **facts)
                entry["rtf"] = facts["synth_s"] / dur if dur > 0 else None
                if plots:
                    png = out / "plots" / f"{it.file_stem}.png"
                    text = str(it.fields.get("text") or "")[:80]
                    _plot_mel(speech, sr, png, f"{it.id} ({it.mode}, {dur:.2f} s): {text}")
                    entry["plot"] = str(png.relative_to(out))
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - one bad line never stops the run
                kind = "" if isinstance(e, CosyToolsError) else f"{type(e).__name__}: "
                entry.update(status="failed", error=f"{kind}{e}", error_type=type(e).__name__)
                if wav.is_file():  # a stale WAV of an earlier success must not pass for this run's
                    wav.unlink()
                log.warning("%s (line %d) failed: %s", it.id, it.line, entry["error"])
                if not isinstance(e, CosyToolsError):
                    log.debug("traceback of %s", it.id, exc_info=True)
            entries[it.id] = entry
            save()
            bar.update()
    if not todo:
        save()
    return doc


# ---------------------------------------------------------------------------------------------
@click.command("eval")
@click.option("--list", "list_path", required=True, type=click.Path(dir_okay=False),
              help="Test list: JSONL ({\"id\", \"text\", \"prompt_text\", \"prompt_wav\", \"mode\"?, \"instruct\"?}) "
                   "or Seed-TTS-eval lines 'id|prompt_text|prompt_wav|text'.")
@click.option("--model", default="tiny", show_default=True,
              help="Model dir (upstream layout), or 'tiny' / 'full' for a built-in random-weight model.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder: wavs/ID.wav, report.json, report.md (and plots/ID.png).")
@click.option("--backend", default="eager", show_default=True, help="Execution backend (see `cosytools backends`).")
@click.option("--stream", is_flag=True, help="Streaming synthesis; the report has first-chunk latencies.")
@click.option("--plots", is_flag=True, help="Also write a mel-spectrogram PNG per utterance (plots/ID.png).")
@click.option("--device", default=None, help="cpu or cuda (default: $COSYTOOLS_DEVICE or cpu).")
@click.option("--dtype", default=None, help="float32, bf16 or fp16 (default: $COSYTOOLS_DTYPE or float32).")
@click.option("--seed", default=0, show_default=True, help="Sampling seed (the same for every utterance).")
@click.option("--max-tokens", type=int, default=None, help="Upper bound on speech tokens per text segment.")
@click.option("--min-tokens", type=int, default=None,
              help="Lower bound on speech tokens per segment (all stop ids masked until then).")
@click.option("--redo", is_flag=True, help="Ignore an earlier report in OUT_DIR and synthesise every line again.")
@click.option("--json", "as_json", is_flag=True, help="Print the report's summary as JSON on stdout.")
def eval_cmd(list_path: str, model: str, out_dir: str, backend: str, stream: bool, plots: bool,
             device: Optional[str], dtype: Optional[str], seed: int, max_tokens: Optional[int],
             min_tokens: Optional[int], redo: bool, as_json: bool) -> None:
    """Synthesise every line of a test list into OUT_DIR and report duration, tokens, RTF and errors.

    One bad line never stops the run; the exit code is 1 when any line failed, 0 otherwise, 2 for a
    list that cannot be used. Rerunning into the same OUT_DIR skips the lines already done (their
    WAV exists and their report entry succeeded) and redoes the failed ones.

    \b
    Examples:
      cosytools eval --list seedtts/en/meta.lst --model ./Fun-CosyVoice3-0.5B -o runs/en
      cosytools eval --list my.jsonl --model ./cv3 -o runs/stream --stream --plots --device cuda
    """
    if max_tokens is not None and max_tokens < 1:
        raise click.BadParameter("must be at least 1", param_hint="--max-tokens")
    doc = evaluate(list_path, out_dir, model=model, backend=backend, stream=stream, plots=plots, device=device,
                   dtype=dtype, seed=seed, max_tokens=max_tokens, min_tokens=min_tokens, redo=redo)
    s = doc["summary"]
    if as_json:
        click.echo(json.dumps({"report": str(Path(out_dir) / "report.json"), **s}, indent=2))
    else:
        click.echo(f"{s['ok']}/{s['total']} ok, {s['failed']} failed ({s['done_this_run']} this run, {s['reused']} "
                   f"kept); {s['audio_s']:.2f} s of audio, RTF {_fmt(s['rtf'], '.3f')}; report: "
                   f"{Path(out_dir) / 'report.md'}")
        for e in doc["utterances"]:
            if e["status"] != "ok":
                click.echo(f"  failed: {e['id']} (line {e.get('line')}): {e.get('error')}", err=True)
    if s["failed"]:
        raise _Failed(EXIT_FAILED)


EXIT_FAILED = 1


class _Failed(Exception):
    """Carries exit code 1 out of click (``standalone_mode=False`` would swallow a click ``Exit``)."""

    def __init__(self, code: int) -> None:
        self.code = code


def register(cli: click.Group) -> None:
    """Attach ``eval`` to the main CLI; a run with failed lines exits with code 1."""
    cli.add_command(eval_cmd)
    if getattr(cli.main, "_cosytools_eval_exit", False):
        return
    original = cli.main

    def main(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except _Failed as e:
            raise click.exceptions.Exit(e.code) from None

    main._cosytools_eval_exit = True  # type: ignore[attr-defined]
    cli.main = main  # type: ignore[method-assign]
