"""Checkpoint readers (``.pt`` / ``.safetensors``) and strict, explanatory state-dict loading.

Weight normalisation comes in three spellings (``weight_g``/``weight_v``,
``weight.original0/1``, ``parametrizations.weight.original0/1``) or already folded into a
plain ``weight``; :func:`adapt_weight_norm` maps whatever a file has onto what the module holds.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import CheckpointError

__all__ = ["read_state_dict", "write_state_dict", "adapt_weight_norm", "load_checkpoint_into",
           "fold_weight_norm", "count_parameters"]

_WN = ".parametrizations.weight.original"


def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Read a state dict from ``.pt``/``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: {msg}. The file is truncated, corrupt or not a "
            f"{'safetensors' if path.suffix == '.safetensors' else 'torch.save'} state dict; "
            "re-download or re-export it.") from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"checkpoint {path} is not a state dict (a mapping of names to tensors)")
    return dict(sd)


def write_state_dict(sd: Mapping[str, torch.Tensor], path: Union[str, Path]) -> None:
    """Write a state dict as ``.pt`` or ``.safetensors`` (tied tensors stored as copies there)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(path))
    else:
        torch.save(dict(sd), str(path))


def _norm_except_dim0(v: torch.Tensor) -> torch.Tensor:
    return v.norm(2, dim=tuple(range(1, v.dim())), keepdim=True)


def adapt_weight_norm(sd: Mapping[str, torch.Tensor], expected: Iterable[str]) -> Dict[str, torch.Tensor]:
    """Rename/convert weight-norm entries of ``sd`` to the spelling the module expects."""
    expected = set(expected)
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith(".weight_g"):
            k = k[: -len(".weight_g")] + _WN + "0"
        elif k.endswith(".weight_v"):
            k = k[: -len(".weight_v")] + _WN + "1"
        elif (k.endswith(".weight.original0") or k.endswith(".weight.original1")) and _WN not in k:
            k = k[: -len(".weight.originalX")] + _WN + k[-1]
        out[k] = v
    for k in list(out):
        if k.endswith(_WN + "0") and k not in expected:  # module holds a plain weight: fold
            base = k[: -len(_WN + "0")]
            if base + ".weight" in expected and base + _WN + "1" in out:
                g, v = out.pop(k), out.pop(base + _WN + "1")
                out[base + ".weight"] = v * (g / _norm_except_dim0(v))
        elif k.endswith(".weight") and k not in expected:  # module is weight-normed: split
            base = k[: -len(".weight")]
            if base + _WN + "0" in expected:
                w = out.pop(k)
                out[base + _WN + "0"] = _norm_except_dim0(w)
                out[base + _WN + "1"] = w
    return out


def load_checkpoint_into(module: nn.Module, sd: Mapping[str, torch.Tensor], file: Union[str, Path],
                         optional: Iterable[str] = ()) -> None:
    """``load_state_dict(strict=True)`` with an error that names the file, the keys and the shapes.

    ``optional`` keys may be absent from the file (e.g. a tied ``lm_head.weight``).
    """
    own = module.state_dict()
    sd = adapt_weight_norm(sd, own.keys())
    optional = set(optional)
    missing = [k for k in own if k not in sd and k not in optional]
    unexpected = [k for k in sd if k not in own]
    mismatched = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own
                  if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        lines: List[str] = [f"checkpoint {file} does not fit the {type(module).__name__} built from the model config:"]
        if mismatched:
            lines.append("  shape mismatch: " + "; ".join(f"{k}: file has {list(a)}, model expects {list(b)}"
                                                          for k, a, b in mismatched[:8])
                         + (f" (+{len(mismatched) - 8} more)" if len(mismatched) > 8 else ""))
        if missing:
            lines.append("  missing in file: " + ", ".join(f"{k} {list(own[k].shape)}" for k in missing[:8])
                         + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
        if unexpected:
            lines.append("  not in the model: " + ", ".join(f"{k} {list(sd[k].shape)}" for k in unexpected[:8])
                         + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))
        lines.append("  Check that the yaml / config.json sizes match the weights, and that the file is the "
                     "right component (llm / flow / hift).")
        raise CheckpointError("\n".join(lines))
    full = {k: (sd[k] if k in sd else own[k]) for k in own}
    module.load_state_dict(full, strict=True)


def fold_weight_norm(module: nn.Module) -> nn.Module:
    """Replace weight-norm parametrizations by the plain weight they compute (same values)."""
    for m in module.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return module


def count_parameters(module: nn.Module) -> int:
    """Number of parameters, tied tensors counted once."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
