"""A direct grouped conv1d kernel in Triton for the DiT position embedding (``conv_pos=triton``).

The DiT's causal position embedding is two grouped Conv1d (16 groups of 64 channels, 31 taps)
per Euler step.  cuDNN's grouped kernel took ~580 us per call on an H100 in bf16; im2col + one
batched matmul (``conv_pos=matmul``) removes most of that but writes a 31-times copy of the
input (~97 MB per call at 650 frames) — ~3.4 ms of the flow's 36 ms.  This kernel reads the
input once: one program computes a [C_out/G, BLOCK_T] tile of one group as 31 shifted
[C_out/G x C_in/G] @ [C_in/G x BLOCK_T] products accumulated in float32.

It is a ``torch.library`` custom op (``cosytools::grouped_conv1d``) so that torch.compile and
CUDA graphs treat it as one opaque call.  The op runs the kernel on CUDA tensors when Triton is
importable and the group widths suit ``tl.dot`` (16, 32, 64 or 128 channels); otherwise — and on
the CPU, unless ``TRITON_INTERPRET=1`` was set before this module was imported (Triton's
interpreter, which the tests use) — it computes the same convolution with
:func:`cosytools.models.dit.grouped_conv1d_im2col`.  float32 inputs use IEEE products in the
kernel (no TF32), half inputs accumulate in float32 as cuBLAS does.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from torch import Tensor

from cosytools.models.dit import grouped_conv1d_im2col

__all__ = ["grouped_conv1d", "kernel_available", "conv_fn"]

log = logging.getLogger(__name__)

try:  # Triton ships with CUDA builds of torch; CPU builds usually lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_WIDTHS = (16, 32, 64, 128)

if triton is not None:
    @triton.jit
    def _grouped_conv1d_kernel(x_ptr, w_ptr, b_ptr, y_ptr, L, stride_xb, stride_xc, stride_yb, stride_yc,
                               CIN: tl.constexpr, COUT: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr,
                               HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
        pid_t = tl.program_id(0)
        g = tl.program_id(1)
        b = tl.program_id(2)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_ci = tl.arange(0, CIN)
        offs_co = tl.arange(0, COUT)
        t_ok = offs_t < L  # t < L  =>  t + k < L + K - 1, the padded input length
        x_rows = x_ptr + b * stride_xb + (g * CIN + offs_ci)[:, None] * stride_xc
        w_grp = w_ptr + g * (K * COUT * CIN)  # weight prepared as [G, K, COUT, CIN]
        acc = tl.zeros((COUT, BLOCK_T), dtype=tl.float32)
        for k in range(K):
            xk = tl.load(x_rows + (offs_t + k)[None, :], mask=t_ok[None, :], other=0.0)
            wk = tl.load(w_grp + k * (COUT * CIN) + offs_co[:, None] * CIN + offs_ci[None, :])
            if IEEE:
                acc += tl.dot(wk, xk, input_precision="ieee")
            else:
                acc += tl.dot(wk, xk)
        if HAS_BIAS:
            acc += tl.load(b_ptr + g * COUT + offs_co).to(tl.float32)[:, None]
        y_ptrs = y_ptr + b * stride_yb + (g * COUT + offs_co)[:, None] * stride_yc + offs_t[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=t_ok[None, :])


def kernel_available(x: Tensor, weight: Tensor, groups: int) -> bool:
    """Whether :func:`grouped_conv1d` runs the Triton kernel for these arguments."""
    if triton is None or not (x.is_cuda or _INTERPRET):
        return False
    cin, cout = weight.shape[1], weight.shape[0] // groups
    return cin in _WIDTHS and cout in _WIDTHS and x.dtype in (torch.float32, torch.float16, torch.bfloat16)


_WARNED = False


def _warn_fallback(x: Tensor, weight: Tensor, groups: int) -> None:
    global _WARNED
    _WARNED = True
    why = ("Triton is not installed" if triton is None else
           f"group widths {weight.shape[1]} -> {weight.shape[0] // groups} / dtype {x.dtype} do not suit the kernel "
           f"(widths {', '.join(map(str, _WIDTHS))}; float32, float16, bfloat16)")
    log.warning("conv_pos=triton: %s; using im2col + batched matmul instead", why)


@torch.library.custom_op("cosytools::grouped_conv1d", mutates_args=())
def grouped_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int) -> Tensor:
    """Unpadded, stride-1 grouped conv1d: x [B, C_in, L + K - 1], weight [C_out, C_in/G, K] ->
    [B, C_out, L] (see the module docstring for where it runs the Triton kernel)."""
    if not kernel_available(x, weight, groups):
        if x.is_cuda and not _WARNED:
            _warn_fallback(x, weight, groups)
        return grouped_conv1d_im2col(x, weight, bias, groups)
    x = x.contiguous()
    bsz, _, lp = x.shape
    cout_all, cin, k = weight.shape
    cout = cout_all // groups
    length = lp - k + 1
    w = weight.reshape(groups, cout, cin, k).permute(0, 3, 1, 2).contiguous()  # [G, K, COUT, CIN]
    y = torch.empty(bsz, cout_all, length, device=x.device, dtype=x.dtype)
    block_t = 64
    grid = (triton.cdiv(length, block_t), groups, bsz)
    _grouped_conv1d_kernel[grid](x, w, bias if bias is not None else w, y, length, x.stride(0), x.stride(1),
                                 y.stride(0), y.stride(1), CIN=cin, COUT=cout, K=k, BLOCK_T=block_t,
                                 HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32)
    return y


@grouped_conv1d.register_fake
def _grouped_conv1d_fake(x: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0], x.shape[2] - weight.shape[2] + 1)


def conv_fn(x: Tensor, conv: torch.nn.Conv1d) -> Tensor:
    """``conv_fn`` hook of the DiT position embedding (``conv_pos=triton``)."""
    return grouped_conv1d(x, conv.weight, conv.bias, conv.groups)
