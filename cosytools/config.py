"""Model configuration: the hyper-parameters of a CosyVoice3 model dir, and building its modules.

``cosyvoice3.yaml`` is read as data (:mod:`cosytools.hyperyaml`); each ``!new:`` node names an
upstream class that maps to the cosytools module of the same name, built with the same keyword
arguments.  The Qwen2 sizes come from ``CosyVoice-BlankEN/config.json``.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

from torch import nn

from .errors import ConfigError
from .hyperyaml import Tagged, load_hyperyaml, loads_hyperyaml
from .models.qwen2 import Qwen2Config

__all__ = ["ModelConfig", "SUPPORTED_CLASSES", "build_component"]

# upstream dotted path -> "cosytools module:attribute"
SUPPORTED_CLASSES: Dict[str, str] = {
    "cosyvoice.llm.llm.CosyVoice3LM": "cosytools.models.llm:CosyVoice3LM",
    "cosyvoice.llm.llm.Qwen2Encoder": "cosytools.models.llm:Qwen2Encoder",
    "cosyvoice.utils.common.ras_sampling": "cosytools.models.sampling:ras_sampling",
    "cosyvoice.utils.common.nucleus_sampling": "cosytools.models.sampling:nucleus_sampling",
    "cosyvoice.flow.flow.CausalMaskedDiffWithDiT": "cosytools.models.flow:CausalMaskedDiffWithDiT",
    "cosyvoice.transformer.upsample_encoder.PreLookaheadLayer": "cosytools.models.flow:PreLookaheadLayer",
    "cosyvoice.flow.flow_matching.CausalConditionalCFM": "cosytools.models.flow:CausalConditionalCFM",
    "cosyvoice.flow.DiT.dit.DiT": "cosytools.models.dit:DiT",
    "cosyvoice.hifigan.generator.CausalHiFTGenerator": "cosytools.models.hift:CausalHiFTGenerator",
    "cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor": "cosytools.models.f0_predictor:CausalConvRNNF0Predictor",
}


def _import(spec: str) -> Any:
    mod, _, attr = spec.partition(":")
    return getattr(importlib.import_module(mod), attr)


def build_component(node: Any, qwen2: Optional[Qwen2Config], where: str, path: str = "") -> Any:
    """Instantiate a resolved yaml node with cosytools classes (recursively)."""
    if isinstance(node, list):
        return [build_component(v, qwen2, where, f"{path}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, dict):
        return {k: build_component(v, qwen2, where, f"{path}.{k}" if path else k) for k, v in node.items()}
    if not isinstance(node, Tagged):
        return node
    if node.target in ("omegaconf.DictConfig", "dict"):
        content = node.kwargs().get("content", node.kwargs())
        return build_component(content, qwen2, where, path)
    spec = SUPPORTED_CLASSES.get(node.target)
    if spec is None:
        raise ConfigError(
            f"{where}: '{path}' uses {node.target}, which cosytools does not implement. "
            f"Supported model classes: {', '.join(sorted(k.rsplit('.', 1)[-1] for k in SUPPORTED_CLASSES))}. "
            "cosytools runs CosyVoice3 (Fun-CosyVoice3-0.5B) model dirs only.")
    target = _import(spec)
    kwargs = {k: build_component(v, qwen2, where, f"{path}.{k}") for k, v in node.kwargs().items()}
    if node.target.endswith("Qwen2Encoder"):
        if qwen2 is None:
            raise ConfigError(f"{where}: '{path}' needs the Qwen2 config (CosyVoice-BlankEN/config.json)")
        return target(qwen2)
    if node.kind == "name":
        return functools.partial(target, **kwargs)
    try:
        return target(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: cannot build '{path}' ({node.class_name}) from its yaml arguments: {e}") from None


@dataclass
class ModelConfig:
    """Hyper-parameters of one model: the resolved yaml tree and the Qwen2 config."""

    doc: Dict[str, Any]
    qwen2: Qwen2Config
    source: str = "<preset>"

    @classmethod
    def from_model_dir(cls, model_dir: Union[str, Path]) -> "ModelConfig":
        model_dir = Path(model_dir)
        yaml_path = model_dir / "cosyvoice3.yaml"
        if not yaml_path.is_file():
            others = sorted(p.name for p in model_dir.glob("*.yaml")) if model_dir.is_dir() else []
            hint = f" (found {', '.join(others)}; cosytools supports CosyVoice3 only)" if others else ""
            raise ConfigError(f"{model_dir}: no cosyvoice3.yaml{hint}. Point --model at a CosyVoice3 model dir, "
                              "or create one with `cosytools init-model --preset tiny DIR`.")
        qwen_json = model_dir / "CosyVoice-BlankEN" / "config.json"
        if not qwen_json.is_file():
            raise ConfigError(f"{model_dir}: missing CosyVoice-BlankEN/config.json (the Qwen2 sizes of the LLM)")
        cfg = cls(load_hyperyaml(yaml_path), Qwen2Config.from_json(qwen_json), str(yaml_path))
        cfg.validate()
        return cfg

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        from .presets import get_preset, render_yaml
        p = get_preset(name)
        return cls(loads_hyperyaml(render_yaml(p), f"<preset {name}>"), p.qwen2, f"<preset {name}>")

    def validate(self) -> None:
        for key in ("llm", "flow", "hift"):
            node = self.doc.get(key)
            if not isinstance(node, Tagged):
                raise ConfigError(f"{self.source}: no '{key}: !new:...' model definition")
            if node.target not in SUPPORTED_CLASSES:
                build_component(node, self.qwen2, self.source, key)  # raises the explanatory error
        llm_size = self.doc["llm"].kwargs().get("llm_input_size")
        if llm_size is not None and llm_size != self.qwen2.hidden_size:
            raise ConfigError(f"{self.source}: llm_input_size {llm_size} differs from the Qwen2 hidden_size "
                              f"{self.qwen2.hidden_size} in CosyVoice-BlankEN/config.json")

    def get(self, key: str, default: Any = None) -> Any:
        return self.doc.get(key, default)

    @property
    def sample_rate(self) -> int:
        return int(self.doc.get("sample_rate", 24000))

    @property
    def token_mel_ratio(self) -> int:
        return int(self.doc.get("token_mel_ratio", 2))

    @property
    def chunk_size(self) -> int:
        return int(self.doc.get("chunk_size", 25))

    def sampling_kwargs(self) -> Dict[str, Any]:
        node = self.doc["llm"].kwargs().get("sampling")
        return node.kwargs() if isinstance(node, Tagged) else {}

    def build(self, name: str) -> nn.Module:
        """Build the ``llm`` / ``flow`` / ``hift`` module with random (uninitialised) weights."""
        return build_component(self.doc[name], self.qwen2, self.source, name)

    def builder(self, name: str) -> Callable[[], nn.Module]:
        return functools.partial(self.build, name)
