"""Load a CosyVoice3 model dir (upstream layout, ``.pt`` or ``.safetensors``) into cosytools modules."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Optional, Union

import torch
from torch import nn

from .checkpoint import fold_weight_norm, load_checkpoint_into, read_state_dict
from .config import ModelConfig
from .errors import CheckpointError, ConfigError

__all__ = ["COMPONENTS", "CosyVoice3Model", "resolve_model_dir", "find_checkpoint", "load_model",
           "parse_dtype", "default_cache_dir"]

log = logging.getLogger(__name__)

COMPONENTS = ("llm", "flow", "hift")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: Union[str, torch.dtype, None]) -> torch.dtype:
    """``float32``/``fp32``, ``bf16``/``bfloat16``, ``fp16``/``float16`` -> torch dtype."""
    if name is None:
        name = os.environ.get("COSYTOOLS_DTYPE", "float32")
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; use one of float32, bf16, fp16") from None


def default_cache_dir() -> Path:
    return Path(os.environ.get("COSYTOOLS_CACHE", Path.home() / ".cache" / "cosytools"))


def resolve_model_dir(spec: Union[str, Path, None], seed: int = 0) -> Path:
    """A model dir path; ``None``/``"tiny"``/``"full"`` name a built-in random-weight model,
    created in the cache dir on first use."""
    if spec is None:
        spec = "tiny"
    if isinstance(spec, str) and spec in ("tiny", "full") and not Path(spec).exists():
        from .init_model import init_model
        out = default_cache_dir() / "models" / f"{spec}-seed{seed}"
        if not (out / "hift.pt").is_file():
            log.info("creating the built-in random-weight %s model in %s (first use)", spec, out)
            init_model(out, preset=spec, seed=seed, overwrite=True)
        return out
    path = Path(spec)
    if not path.is_dir():
        raise ConfigError(f"model dir {path} does not exist (use a CosyVoice3 model dir, or 'tiny' / 'full' "
                          "for a built-in random-weight model)")
    return path


def find_checkpoint(model_dir: Path, component: str, fmt: str = "auto", llm_rl: bool = False) -> Path:
    """The weight file of ``component`` in ``model_dir``; ``fmt`` is ``auto``, ``pt`` or ``safetensors``."""
    stem = "llm.rl" if (component == "llm" and llm_rl) else component
    exts = {"auto": (".pt", ".safetensors"), "pt": (".pt",), "safetensors": (".safetensors",)}.get(fmt)
    if exts is None:
        raise ConfigError(f"unknown checkpoint format {fmt!r}; use auto, pt or safetensors")
    for ext in exts:
        p = model_dir / f"{stem}{ext}"
        if p.is_file():
            return p
    tried = ", ".join(f"{stem}{e}" for e in exts)
    raise CheckpointError(f"{model_dir}: no {component} weights ({tried} not found)")


@dataclass
class CosyVoice3Model:
    """The three CosyVoice3 modules of one model dir, eval mode, on one device."""

    config: ModelConfig
    model_dir: Optional[Path]
    llm: Optional[nn.Module] = None
    flow: Optional[nn.Module] = None
    hift: Optional[nn.Module] = None
    files: Dict[str, str] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        return self.model_dir.name if self.model_dir is not None else self.config.source


def _build_and_load(cfg: ModelConfig, model_dir: Path, component: str, fmt: str, llm_rl: bool) -> tuple[nn.Module, str]:
    module = cfg.build(component)
    path = find_checkpoint(model_dir, component, fmt, llm_rl)
    sd = read_state_dict(path)
    optional = ()
    if component == "llm" and cfg.qwen2.tie_word_embeddings:
        optional = ("llm.model.lm_head.weight",)  # tied to embed_tokens; some exports drop it
    load_checkpoint_into(module, sd, path, optional=optional)
    fold_weight_norm(module)  # computes g*v/|v| once: the same values upstream computes per call
    return module.eval(), str(path)


def load_model(model: Union[str, Path, None] = None, components: Iterable[str] = COMPONENTS, fmt: str = "auto",
               llm_rl: bool = False, device: Union[str, torch.device, None] = None,
               dtype: Union[str, torch.dtype, None] = None,
               gguf: Union[bool, str, Path, None] = None,
               hift_dtype: Union[str, torch.dtype, None] = None) -> CosyVoice3Model:
    """Build and load the requested components of a model dir (or built-in ``tiny``/``full``).

    The LLM's Qwen2 trunk comes from a GGUF when one is selected (``gguf``: a path, ``False`` for
    float weights, ``None`` = ``$COSYVOICE_LLM_GGUF`` (path or ``OFF``) else ``llm.gguf`` in the
    dir); ``files['llm']`` then names the GGUF and ``files['llm_gguf_type']`` its type.

    ``dtype`` applies to the LLM and the flow.  HiFT's convolution stack runs in ``hift_dtype``
    (default ``$COSYTOOLS_HIFT_DTYPE``, else float32 whatever ``dtype`` is): the vocoder is the
    precision-sensitive stage — on the tiny fixture a bf16 conv stack moves the waveform by 18 %
    of its peak against 2e-5 in float32 — and it is a small share of the work.
    """
    model_dir = resolve_model_dir(model)
    cfg = ModelConfig.from_model_dir(model_dir)
    dev = torch.device(device or os.environ.get("COSYTOOLS_DEVICE", "cpu"))
    dt = parse_dtype(dtype)
    hift_dt = parse_dtype(hift_dtype or os.environ.get("COSYTOOLS_HIFT_DTYPE") or "float32")
    out = CosyVoice3Model(cfg, model_dir, device=dev, dtype=dt)
    for comp in components:
        if comp not in COMPONENTS:
            raise ConfigError(f"unknown component {comp!r}; use {', '.join(COMPONENTS)}")
        gguf_path = None
        if comp == "llm":
            from .gguf_io import resolve_llm_gguf
            gguf_path = resolve_llm_gguf(model_dir, gguf)
        if gguf_path is not None:
            from .gguf_io import load_llm_gguf
            module, files = load_llm_gguf(cfg, model_dir, gguf_path, fmt, llm_rl)
            out.files.update(files)
            path = files["llm"]
        else:
            module, path = _build_and_load(cfg, model_dir, comp, fmt, llm_rl)
        module = module.to(dev)
        comp_dt = hift_dt if comp == "hift" else dt
        if comp_dt != torch.float32:
            module = _cast(module, comp, comp_dt)
        setattr(out, comp, module)
        out.files[comp] = path
    return out


def _cast(module: nn.Module, component: str, dtype: torch.dtype) -> nn.Module:
    """Cast to a half dtype.  HiFT keeps its F0 predictor in float64 and its source module in
    float32 by itself (see ``CausalHiFTGenerator._apply``); the flow keeps softmax in float32."""
    return module.to(dtype)
