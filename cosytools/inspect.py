"""Describe a model: files, hyper-parameters and parameter counts (as upstream counts them)."""
from __future__ import annotations

from typing import Any, Dict, Union
from pathlib import Path

from torch import nn

from .checkpoint import count_parameters
from .config import ModelConfig

__all__ = ["parameter_counts", "describe_model"]


def parameter_counts(cfg: ModelConfig) -> Dict[str, int]:
    """Parameter counts of a config's modules as upstream builds them (weight-norm
    magnitude vectors included, the tied Qwen2 embedding counted once).  Builds on the meta
    device, so even the full model costs no memory."""
    import torch

    with torch.device("meta"):
        llm, flow, hift = (cfg.build(c) for c in ("llm", "flow", "hift"))
    qwen = count_parameters(llm.llm)
    return {
        "llm.qwen2": qwen,
        "llm.speech_embedding+llm_decoder": count_parameters(llm) - qwen,
        "llm": count_parameters(llm),
        "flow.decoder.estimator": count_parameters(flow.decoder.estimator),
        "flow": count_parameters(flow),
        "hift": count_parameters(hift),
    }


def describe_model(model: Union[str, Path], fmt: str = "auto") -> Dict[str, Any]:
    """Files, classes, parameter counts and the main sizes of a model dir (weights not loaded)."""
    from .loading import find_checkpoint, resolve_model_dir

    model_dir = resolve_model_dir(model)
    cfg = ModelConfig.from_model_dir(model_dir)
    counts = parameter_counts(cfg)
    comps = {}
    for comp in ("llm", "flow", "hift"):
        try:
            f = str(find_checkpoint(model_dir, comp, fmt))
        except Exception as e:  # describe what is there even when a file is missing
            f = f"missing ({e})"
        comps[comp] = {"class": cfg.doc[comp].class_name, "parameters": counts[comp], "file": f}
    est = cfg.doc["flow"].kwargs()["decoder"].kwargs()["estimator"].kwargs()
    q = cfg.qwen2
    return {
        "model_dir": str(model_dir),
        "components": comps,
        "parameter_counts": counts,
        "hyperparameters": {
            "qwen2": f"{q.hidden_size} hidden, {q.num_hidden_layers} layers, {q.num_attention_heads} heads / "
                     f"{q.num_key_value_heads} kv, {q.intermediate_size} ffn, rope theta {q.rope_theta:g}",
            "dit": f"{est.get('dim')} dim, {est.get('depth')} blocks, {est.get('heads')} heads x {est.get('dim_head')}, "
                   f"static chunk {est.get('static_chunk_size')} frames",
            "hift": f"{cfg.doc['hift'].kwargs().get('base_channels')} base channels, "
                    f"upsample {cfg.doc['hift'].kwargs().get('upsample_rates')}",
            "sample_rate": cfg.sample_rate,
        },
    }

