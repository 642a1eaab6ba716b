"""The ``cosytools`` command line.  Every command has ``--help`` with an example.

Exit codes: 0 success, 1 a parity mismatch (parity commands), 2 bad input (a clear message,
never a traceback; ``COSYTOOLS_DEBUG=1`` shows the traceback of unexpected errors).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import click

from .errors import CosyToolsError

log = logging.getLogger("cosytools")


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def cli(verbose: int) -> None:
    """cosytools: run, compare and benchmark CosyVoice3 implementations stage by stage.

    \b
    Examples:
      cosytools synth "Hello there." -o hello.wav          # built-in tiny random model
      cosytools init-model --preset full ./cv3-full        # real sizes, random weights
      cosytools inspect ../shared/fixtures/cv3-tiny/model
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


MODEL_HELP = "Model dir (upstream layout), or 'tiny' / 'full' for a built-in random-weight model (created on first use)."


# ---------------------------------------------------------------------------------------------
@cli.command("synth")
@click.argument("text", required=False)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="out.wav", show_default=True,
              help="WAV file to write (24 kHz, 16-bit).")
@click.option("--mode", type=click.Choice(["sft", "zero_shot", "cross_lingual", "instruct", "vc"]), default="sft",
              show_default=True, help="Synthesis mode, as upstream CosyVoice3's inference_* methods.")
@click.option("--model", default="tiny", show_default=True, help=MODEL_HELP)
@click.option("--backend", default="eager", show_default=True, help="Execution backend (see `cosytools backends`).")
@click.option("--device", default=None, help="cpu or cuda (default: $COSYTOOLS_DEVICE or cpu).")
@click.option("--dtype", default=None, help="float32, bf16 or fp16 (default: $COSYTOOLS_DTYPE or float32).")
@click.option("--seed", default=0, show_default=True, help="Sampling seed.")
@click.option("--max-tokens", type=int, default=None,
              help="Upper bound on speech tokens per text segment (25 per second).")
@click.option("--min-tokens", type=int, default=None,
              help="Lower bound on speech tokens per segment (all stop ids are masked until then).")
@click.option("--speaker", default=None, help="Speaker id from spk2info.pt. sft: its embedding (default: zero "
              "embedding); zero_shot / cross_lingual: a speaker saved with `cosytools speaker add`, instead of "
              "--prompt-wav (and --prompt-text).")
@click.option("--prompt-text", default=None, help="zero_shot: instruction, <|endofprompt|> and the transcript of "
              "--prompt-wav. sft: optional LLM prompt text.")
@click.option("--prompt-wav", type=click.Path(dir_okay=False), default=None,
              help="Recording of the target voice, 3-10 s, >= 16 kHz WAV (zero_shot, cross_lingual, instruct, vc).")
@click.option("--instruct", "instruct_text", default=None,
              help="instruct: the instruction, e.g. 'Speak as loudly as possible.' (wrapped as 'You are a helpful "
              "assistant. ...<|endofprompt|>' unless it has <|endofprompt|>).")
@click.option("--source-wav", type=click.Path(dir_okay=False), default=None, help="vc: the speech to convert.")
@click.option("--stream", is_flag=True, help="Streaming synthesis; chunks are appended to the WAV as they come.")
@click.option("--speed", type=float, default=1.0, show_default=True, help="Speaking rate (non-streaming only).")
@click.option("--no-text-frontend", is_flag=True, help="Do not normalise or split TEXT.")
@click.option("--strict-prompt", is_flag=True, help="Fail when no <|endofprompt|> is given instead of adding "
              "the default instruction (sft, cross_lingual).")
@click.option("--format", "fmt", type=click.Choice(["auto", "pt", "safetensors"]), default="auto", show_default=True)
@click.option("--rl", "llm_rl", is_flag=True, help="Use llm.rl.pt instead of llm.pt.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("--max-silent-tokens", type=int, default=5, show_default=True,
              help="Keep at most this many silence/breath tokens in a row (upstream's rule); -1 keeps all.")
def synth_cmd(text: Optional[str], output: str, mode: str, model: str, backend: str, device: Optional[str],
              dtype: Optional[str], seed: int, max_tokens: Optional[int], min_tokens: Optional[int],
              speaker: Optional[str], prompt_text: Optional[str], prompt_wav: Optional[str],
              instruct_text: Optional[str], source_wav: Optional[str], stream: bool, speed: float,
              no_text_frontend: bool, strict_prompt: bool, fmt: str, llm_rl: bool, as_json: bool,
              max_silent_tokens: int) -> None:
    """Synthesise TEXT to a WAV file in one of CosyVoice3's modes.

    TEXT is normalised and split into pieces as upstream does (numbers spelled out, ~80 tokens per
    piece), unless it holds <|...|> markup. With random weights (the default tiny model) the
    result is noise-like audio; point --model at a real Fun-CosyVoice3-0.5B dir for speech.

    \b
    Examples:
      cosytools synth "Hello, world." -o hello.wav --max-tokens 100
      cosytools synth "Hi there." --speaker spk1 --model ./cv3                      # sft
      cosytools synth "Nice to meet you." --mode zero_shot --prompt-wav me.wav \\
          --prompt-text "You are a helpful assistant.<|endofprompt|>Transcript of me.wav."
      cosytools synth "Nice to meet you again." --mode zero_shot --speaker me   # saved: `speaker add`
      cosytools synth "You are a helpful assistant.<|endofprompt|>Bonjour." --mode cross_lingual --prompt-wav me.wav
      cosytools synth "Good news!" --mode instruct --instruct "Speak cheerfully." --prompt-wav me.wav
      cosytools synth --mode vc --source-wav src.wav --prompt-wav me.wav -o converted.wav
      cosytools synth "A long story ..." --mode zero_shot ... --stream -o live.wav
    """
    import time

    from .errors import InputError
    from .pipeline import Pipeline
    from .wav import write_wav

    _check_synth_args(mode, text, speaker, prompt_text, prompt_wav, instruct_text, source_wav, strict_prompt)
    pipe = Pipeline.from_model(model, backend=backend, device=device, dtype=dtype, fmt=fmt, llm_rl=llm_rl,
                               max_silent_tokens=None if max_silent_tokens < 0 else max_silent_tokens)
    gen = dict(seed=seed, min_tokens=min_tokens, max_tokens=max_tokens)
    tf = not no_text_frontend
    t_start = time.perf_counter()
    if mode == "sft":
        out = pipe.sft(text, speaker, stream=stream, speed=speed, text_frontend=tf, prompt_text=prompt_text,
                       add_default_instruction=not strict_prompt, **gen)
    elif mode == "zero_shot":
        out = pipe.zero_shot(text, prompt_text, prompt_wav, speaker=speaker, stream=stream, speed=speed,
                             text_frontend=tf, **gen)
    elif mode == "cross_lingual":
        out = pipe.cross_lingual(text, prompt_wav, speaker=speaker, stream=stream, speed=speed, text_frontend=tf,
                                 add_default_instruction=not strict_prompt, **gen)
    elif mode == "instruct":
        out = pipe.instruct(text, instruct_text, prompt_wav, stream=stream, speed=speed, text_frontend=tf, **gen)
    else:
        out = pipe.vc(source_wav, prompt_wav, stream=stream, speed=speed)
    summary = {"output": output, "mode": mode, "model": str(pipe.model.model_dir), "backend": backend,
               "llm_weights": pipe.model.files.get("llm")}
    if stream:
        import wave

        import numpy as np

        Path(output).parent.mkdir(parents=True, exist_ok=True)
        n_samples, n_chunks, first = 0, 0, None
        with wave.open(str(output), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(pipe.sample_rate)
            for chunk in out:
                audio = chunk.speech.numpy().reshape(-1)
                if not np.all(np.isfinite(audio)):
                    raise InputError(f"chunk {n_chunks} of the stream contains NaN or Inf samples")
                w.writeframes(np.clip(np.round(audio * 32767.0), -32768, 32767).astype("<i2").tobytes())
                if first is None:
                    first = chunk.t_ready - t_start
                n_samples += audio.shape[0]
                n_chunks += 1
        seconds = n_samples / pipe.sample_rate
        total = time.perf_counter() - t_start
        summary.update({"stream": True, "chunks": n_chunks, "seconds": round(seconds, 3),
                        "first_chunk_s": round(first or 0.0, 4), "total_s": round(total, 4)})
        msg = (f"wrote {output}: {seconds:.2f} s of audio in {n_chunks} chunks, first after {first or 0:.2f} s, "
               f"total {total:.2f} s")
    else:
        write_wav(output, out.speech.numpy(), out.sample_rate)
        summary.update({"segments": len(out.segments), "speech_tokens": len(out.tokens),
                        "seconds": round(out.seconds, 3), **{k: round(v, 4) for k, v in out.timings.items()}})
        msg = (f"wrote {output}: {out.seconds:.2f} s of audio from {len(out.tokens)} speech tokens "
               f"in {out.timings['total_s']:.2f} s (RTF {out.timings['rtf']:.3f})")
    if as_json:
        _emit_json(summary)
    else:
        click.echo(msg)


def _check_synth_args(mode: str, text: Optional[str], speaker: Optional[str], prompt_text: Optional[str],
                      prompt_wav: Optional[str], instruct_text: Optional[str], source_wav: Optional[str],
                      strict_prompt: bool) -> None:
    """Usage errors (exit 2) for option combinations a mode does not take."""
    given = {"--speaker": speaker, "--prompt-text": prompt_text, "--prompt-wav": prompt_wav,
             "--instruct": instruct_text, "--source-wav": source_wav}
    saved = speaker is not None and mode in ("zero_shot", "cross_lingual")  # a saved zero-shot speaker
    allowed = {"sft": {"--speaker", "--prompt-text"},
               "zero_shot": {"--speaker"} if saved else {"--prompt-text", "--prompt-wav", "--speaker"},
               "cross_lingual": {"--speaker"} if saved else {"--prompt-wav", "--speaker"},
               "instruct": {"--instruct", "--prompt-wav"}, "vc": {"--prompt-wav", "--source-wav"}}[mode]
    required = {"sft": set(), "zero_shot": set() if saved else {"--prompt-text", "--prompt-wav"},
                "cross_lingual": set() if saved else {"--prompt-wav"},
                "instruct": {"--instruct", "--prompt-wav"}, "vc": {"--prompt-wav", "--source-wav"}}[mode]
    extra = sorted(k for k, v in given.items() if v is not None and k not in allowed)
    if extra and saved:
        raise click.UsageError(f"--mode {mode} with --speaker (a saved zero-shot speaker) does not take "
                               f"{', '.join(extra)}: the speaker carries its prompt")
    if extra:
        raise click.UsageError(f"--mode {mode} does not take {', '.join(extra)} (it takes "
                               f"{', '.join(sorted(allowed)) or 'no prompt options'})")
    missing = sorted(k for k in required if given[k] is None)
    if missing:
        raise click.UsageError(f"--mode {mode} needs {', '.join(missing)}")
    if mode == "vc" and text is not None:
        raise click.UsageError("--mode vc converts --source-wav and takes no TEXT")
    if mode != "vc" and text is None:
        raise click.UsageError(f"--mode {mode} needs TEXT")
    if strict_prompt and mode not in ("sft", "cross_lingual"):
        raise click.UsageError("--strict-prompt applies to --mode sft and cross_lingual only")


# ---------------------------------------------------------------------------------------------
@cli.command("init-model")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--preset", type=click.Choice(["tiny", "full"]), default="tiny", show_default=True)
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option("--format", "formats", type=click.Choice(["pt", "safetensors"]), multiple=True,
              default=("pt",), show_default=True, help="Weight file format(s); repeat for both.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def init_model_cmd(out_dir: str, preset: str, seed: int, formats: tuple, overwrite: bool) -> None:
    """Write a random-weight CosyVoice3 model dir in the upstream layout.

    \b
    Example:
      cosytools init-model --preset tiny ./cv3-tiny
      cosytools init-model --preset full --format pt --format safetensors ./cv3-full
    """
    from .init_model import init_model

    path = init_model(out_dir, preset=preset, seed=seed, formats=formats, overwrite=overwrite)
    click.echo(f"wrote {preset} model (seed {seed}) to {path}")


# ---------------------------------------------------------------------------------------------
@cli.command("inspect")
@click.argument("model", default="tiny")
@click.option("--format", "fmt", type=click.Choice(["auto", "pt", "safetensors"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def inspect_cmd(model: str, fmt: str, as_json: bool) -> None:
    """Load MODEL (dir, or tiny/full) and print its sizes, files and parameter counts.

    \b
    Example:
      cosytools inspect ../shared/fixtures/cv3-tiny/model --json
    """
    from .inspect import describe_model

    info = describe_model(model, fmt=fmt)
    if as_json:
        _emit_json(info)
        return
    click.echo(f"model dir: {info['model_dir']}")
    for comp, c in info["components"].items():
        click.echo(f"  {comp:5s} {c['class']:<26s} {c['parameters']:>13,d} params  {c['file']}")
    for k, v in info["hyperparameters"].items():
        click.echo(f"  {k}: {v}")


@cli.group("speaker")
def speaker_group() -> None:
    """Saved zero-shot speakers (the model dir's spk2info.pt, upstream's add_zero_shot_spk)."""


@speaker_group.command("add")
@click.argument("name")
@click.option("--prompt-wav", type=click.Path(dir_okay=False), required=True,
              help="Recording of the voice, 3-10 s, >= 16 kHz WAV.")
@click.option("--prompt-text", required=True,
              help="Instruction, <|endofprompt|> and the transcript of --prompt-wav.")
@click.option("--model", default="tiny", show_default=True, help=MODEL_HELP)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="File to write (default: the model dir's spk2info.pt, whose speakers are kept).")
@click.option("--no-text-frontend", is_flag=True, help="Do not normalise --prompt-text.")
def speaker_add_cmd(name: str, prompt_wav: str, prompt_text: str, model: str, output: Optional[str],
                    no_text_frontend: bool) -> None:
    """Compute the zero-shot prompt of a recording once and save it as speaker NAME.

    Then `synth --mode zero_shot --speaker NAME` (or cross_lingual) reuses it without the audio,
    as upstream's inference_zero_shot(..., zero_shot_spk_id=NAME). An existing NAME is replaced.

    \b
    Example:
      cosytools speaker add me --prompt-wav me.wav --prompt-text "You are a helpful assistant.<|endofprompt|>Transcript."
    """
    from .frontend.frontend import Frontend
    from .loading import resolve_model_dir

    fe = Frontend(resolve_model_dir(model))
    text = fe.normalize(prompt_text, split=False, text_frontend=not no_text_frontend)
    entry = fe.add_speaker(name, text, prompt_wav)
    path = fe.save_speakers(output)
    tokens = entry["flow_prompt_speech_token"].shape[1]
    click.echo(f"saved speaker {name!r} ({tokens} prompt speech tokens, {tokens / 25:.2f} s) to {path}; "
               f"speakers there: {', '.join(fe.speakers())}")


@speaker_group.command("list")
@click.option("--model", default="tiny", show_default=True, help=MODEL_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def speaker_list_cmd(model: str, as_json: bool) -> None:
    """List the speakers of the model dir's spk2info.pt (sft: embedding only; zero-shot: with prompt)."""
    from .frontend.frontend import Frontend
    from .loading import resolve_model_dir

    fe = Frontend(resolve_model_dir(model))
    rows = []
    for name in fe.speakers():
        entry = fe.spk2info[name]
        kind = "zero_shot" if isinstance(entry, dict) and "prompt_speech_feat" in entry else "sft"
        rows.append({"speaker": name, "kind": kind})
    if as_json:
        _emit_json({"model_dir": str(fe.model_dir), "speakers": rows})
        return
    if not rows:
        click.echo(f"no speakers in {fe.model_dir / 'spk2info.pt'}")
    for r in rows:
        click.echo(f"{r['speaker']}\t{r['kind']}")


@cli.command("backends")
@click.option("--json", "as_json", is_flag=True)
def backends_cmd(as_json: bool) -> None:
    """List the registered execution backends (built-in and plugins)."""
    import backends

    names = backends.available()
    if as_json:
        _emit_json(names)
    else:
        for n in names:
            click.echo(n)


def _register_optional_commands() -> None:
    """Commands living in other modules (parity, dump, bench, export) add themselves here."""
    import importlib
    import importlib.util

    for mod in ("parity.cli", "cosytools.export_cli", "cosytools.bench", "cosytools.evaluate"):
        if importlib.util.find_spec(mod) is None:
            continue
        importlib.import_module(mod).register(cli)


def main(argv: Optional[list] = None) -> int:
    """Console-script entry point: runs the CLI and maps errors to exit codes."""
    _register_optional_commands()
    try:
        cli.main(args=argv, prog_name="cosytools", standalone_mode=False)
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    except click.ClickException as e:
        e.show()
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except CosyToolsError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as e:  # never a bare traceback for a user; keep it one env var away
        if os.environ.get("COSYTOOLS_DEBUG"):
            traceback.print_exc()
        click.echo(f"internal error: {type(e).__name__}: {e}\n(set COSYTOOLS_DEBUG=1 for the traceback; "
                   "please report it with the command you ran)", err=True)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
