"""``cosytools export {onnx,gguf}``: the subcommands live beside their writers."""
from __future__ import annotations

import importlib
import importlib.util

import click

# module -> name of the click command it defines
_SUBCOMMANDS = {"cosytools.onnx_export": "onnx_command", "cosytools.gguf_export": "gguf_command"}


@click.group("export", context_settings={"help_option_names": ["-h", "--help"]})
def export_group() -> None:
    """Export model stages to other formats (ONNX for onnxruntime/TensorRT, GGUF for the LLM).

    \b
    Examples:
      cosytools export onnx --model ./cv3 -o ./cv3-onnx
      cosytools export gguf --model ./cv3 --type Q8_0 -o ./cv3/llm.gguf
    """


def register(cli: click.Group) -> None:
    for mod, attr in _SUBCOMMANDS.items():
        if importlib.util.find_spec(mod) is not None:
            export_group.add_command(getattr(importlib.import_module(mod), attr))
    cli.add_command(export_group)
