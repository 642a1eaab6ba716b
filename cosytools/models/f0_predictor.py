"""CosyVoice3 causal F0 predictor (``CausalConvRNNF0Predictor``): mel -> F0 in Hz per frame.

Five weight-normed convolutions with ELU (the first looks 3 frames ahead, the others
are causal) and a linear read-out; the output is ``|linear|``.  Names follow the
upstream checkpoint keys (``condnet.{0,2,4,6,8}``, ``classifier``).  The HiFT generator
runs this module in float64, as upstream does.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from cosytools.models.hift import CausalConv1d

__all__ = ["CausalConvRNNF0Predictor"]


def _conv_weight(conv: nn.Conv1d) -> torch.Tensor:
    """The convolution's weight, with weight norm evaluated as ``v * (g / ||v||)`` here.

    Same value as the parametrization's, but exact in float64 on every device: CUDA's fused
    weight-norm kernel computes the norm to only ~1e-8 relative accuracy even for float64
    (seen with torch 2.11), which moves f0 by ~4e-5 Hz and the waveform by ~1e-2 against the
    CPU reference.  Plain (folded) weights are used as they are.
    """
    if parametrize.is_parametrized(conv, "weight"):
        plist = conv.parametrizations.weight
        if len(plist) == 1 and getattr(plist[0], "dim", None) == 0:
            g, v = plist.original0, plist.original1
            norm = torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)
            return v * (g / norm)
    return conv.weight


class CausalConvRNNF0Predictor(nn.Module):
    """Causal conv F0 predictor; keyword arguments are upstream's."""

    def __init__(self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512) -> None:
        super().__init__()
        self.num_class = num_class
        layers: list[nn.Module] = [
            weight_norm(CausalConv1d(in_channels, cond_channels, kernel_size=4, causal_type="right")),
            nn.ELU(),
        ]
        for _ in range(4):
            layers += [weight_norm(CausalConv1d(cond_channels, cond_channels, kernel_size=3, causal_type="left")),
                       nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_features=cond_channels, out_features=num_class)

    @property
    def look_ahead(self) -> int:
        """Mel frames of right context the first convolution needs (3)."""
        return self.condnet[0].causal_padding

    def forward(self, x: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        """mel [B, 80, T] -> f0 [B, T] (``finalize=True``) or [B, T - look_ahead].

        With ``finalize=False`` the last ``look_ahead`` frames are context only (they
        replace the zero padding of the first convolution).
        """
        h = x
        for i, layer in enumerate(self.condnet):
            if isinstance(layer, CausalConv1d):
                if i == 0 and not finalize:
                    t = h.shape[2] - layer.causal_padding
                    h = layer.causal_pad(h[:, :, :t], h[:, :, t:])
                else:
                    h = layer.causal_pad(h)
                h = F.conv1d(h, _conv_weight(layer), layer.bias, 1, 0, layer.dilation, layer.groups)
            else:
                h = layer(h)
        return torch.abs(self.classifier(h.transpose(1, 2)).squeeze(-1))
