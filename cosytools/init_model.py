"""Write a random-weight CosyVoice3 model dir in the exact upstream layout.

The dir holds ``cosyvoice3.yaml``, ``llm.pt``, ``flow.pt``, ``hift.pt`` (optionally the
``*.safetensors`` twins), ``spk2info.pt`` with a few random speakers,
``CosyVoice-BlankEN/`` (Qwen2 ``config.json`` and a small byte-level BPE tokenizer), and
stand-in ``speech_tokenizer_v3.onnx`` / ``campplus.onnx`` with the real models' inputs and
outputs (so every synthesis mode, prompt audio included, runs without a download).
The audio such a model makes is noise; every number in it is reproducible from the seed.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Iterable, Union

import torch

from .checkpoint import write_state_dict
from .config import ModelConfig
from .errors import ConfigError
from .models.qwen2 import init_qwen2_weights
from .presets import get_preset, render_yaml

__all__ = ["init_model", "SPEAKERS"]

log = logging.getLogger(__name__)

SPEAKERS = ("random_female", "random_male")


def init_model(out_dir: Union[str, Path], preset: str = "tiny", seed: int = 0,
               formats: Iterable[str] = ("pt",), overwrite: bool = False) -> Path:
    """Create a random-weight model dir at ``out_dir`` and return its path."""
    from .frontend.bpe_writer import write_tiny_bpe
    from .frontend.features import make_standin_onnx_models

    p = get_preset(preset)
    out = Path(out_dir)
    formats = tuple(formats)
    bad = [f for f in formats if f not in ("pt", "safetensors")]
    if bad:
        raise ConfigError(f"unknown weight format(s) {bad}; use pt and/or safetensors")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; pass --overwrite or choose another directory")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "CosyVoice-BlankEN").mkdir(parents=True)
    (tmp / "cosyvoice3.yaml").write_text(render_yaml(p), encoding="utf-8")
    (tmp / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps(p.qwen2.to_dict(), indent=2) + "\n",
                                                         encoding="utf-8")
    write_tiny_bpe(tmp / "CosyVoice-BlankEN", seed=seed)
    cfg = ModelConfig.from_model_dir(tmp)

    gen = torch.Generator().manual_seed(seed)
    for i, comp in enumerate(("llm", "flow", "hift")):
        torch.manual_seed(seed * 1000 + i)  # module default inits draw from the global RNG
        module = cfg.build(comp)
        if comp == "llm":
            init_qwen2_weights(module, std=0.02, generator=gen)
        sd = module.state_dict()
        for fmt in formats:
            write_state_dict(sd, tmp / f"{comp}.{fmt}")
        log.info("wrote %s (%d tensors)", comp, len(sd))
        del module, sd
    spk2info = {name: {"embedding": torch.randn(1, 192, generator=gen)} for name in SPEAKERS}
    torch.save(spk2info, tmp / "spk2info.pt")
    make_standin_onnx_models(tmp, seed=seed)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
