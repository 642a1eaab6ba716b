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
@click.argument("text")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="out.wav", show_default=True,
              help="WAV file to write (24 kHz, 16-bit).")
@click.option("--model", default="tiny", show_default=True, help=MODEL_HELP)
@click.option("--backend", default="eager", show_default=True, help="Execution backend (see `cosytools backends`).")
@click.option("--device", default=None, help="cpu or cuda (default: $COSYTOOLS_DEVICE or cpu).")
@click.option("--dtype", default=None, help="float32, bf16 or fp16 (default: $COSYTOOLS_DTYPE or float32).")
@click.option("--seed", default=0, show_default=True, help="Sampling seed.")
@click.option("--max-tokens", type=int, default=None, help="Upper bound on speech tokens (25 per second).")
@click.option("--min-tokens", type=int, default=None, help="Lower bound on speech tokens (all stop ids are masked until then).")
@click.option("--speaker", default=None, help="Speaker id from spk2info.pt (sft mode); default: zero embedding.")
@click.option("--prompt-text", default=None, help="Prompt / instruction text ending with <|endofprompt|>.")
@click.option("--strict-prompt", is_flag=True, help="Fail when no <|endofprompt|> is given instead of adding "
              "the default instruction.")
@click.option("--format", "fmt", type=click.Choice(["auto", "pt", "safetensors"]), default="auto", show_default=True)
@click.option("--rl", "llm_rl", is_flag=True, help="Use llm.rl.pt instead of llm.pt.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def synth_cmd(text: str, output: str, model: str, backend: str, device: Optional[str], dtype: Optional[str],
              seed: int, max_tokens: Optional[int], min_tokens: Optional[int], speaker: Optional[str],
              prompt_text: Optional[str], strict_prompt: bool, fmt: str, llm_rl: bool, as_json: bool) -> None:
    """Synthesise TEXT to a WAV file (sft path: text -> LLM -> flow -> HiFT).

    With random weights (the default tiny model) the result is noise-like audio; point --model
    at a real Fun-CosyVoice3-0.5B dir for speech.

    \b
    Example:
      cosytools synth "Hello, world." -o hello.wav --max-tokens 100
      cosytools synth "You are a helpful assistant.<|endofprompt|>Hi" --model ./cv3 --speaker spk1
    """
    from .pipeline import Pipeline
    from .wav import write_wav

    pipe = Pipeline.from_model(model, backend=backend, device=device, dtype=dtype, fmt=fmt, llm_rl=llm_rl)
    emb = pipe.speaker_embedding(speaker)
    res = pipe.tts(text, prompt_text=prompt_text, embedding=emb, seed=seed, min_tokens=min_tokens,
                   max_tokens=max_tokens, add_default_instruction=not strict_prompt)
    write_wav(output, res.speech.numpy(), res.sample_rate)
    summary = {"output": output, "model": str(pipe.model.model_dir), "backend": backend,
               "llm_weights": pipe.model.files.get("llm"), "speech_tokens": len(res.tokens),
               "seconds": round(res.seconds, 3), **{k: round(v, 4) for k, v in res.timings.items()}}
    if as_json:
        _emit_json(summary)
    else:
        click.echo(f"wrote {output}: {res.seconds:.2f} s of audio from {len(res.tokens)} speech tokens "
                   f"in {res.timings['total_s']:.2f} s (RTF {res.timings['rtf']:.3f})")


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

    for mod in ("parity.cli", "cosytools.export_cli", "cosytools.bench"):
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
