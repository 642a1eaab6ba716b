"""GGUF weights for the Qwen2 trunk of the CosyVoice3 LLM: read, validate, run dequantizing per layer.

A GGUF file (llama.cpp's format, read with its ``gguf`` python package) holds the Qwen2 part of
``CosyVoice3LM`` only: ``token_embd``, ``blk.N.*``, ``output_norm`` (and an optional ``output``).
``speech_embedding`` and ``llm_decoder`` always come from the float ``llm.pt`` /
``llm.safetensors`` beside it.

Two spellings of the metadata are read:

* ``general.architecture = qwen2`` (keys ``qwen2.*``), what llama.cpp's ``convert_hf_to_gguf.py``
  writes for ``Qwen2ForCausalLM``; q/k rows are in Hugging Face order (that converter permutes
  nothing for qwen2, and llama.cpp runs qwen2 with rotate-half ("neox") RoPE);
* ``general.architecture = llama`` (keys ``llama.*``).  llama.cpp runs ``llama`` with
  interleaved-pair RoPE, so a llama-named file that llama.cpp computes correctly has the q/k
  rows (and biases) permuted per head as its converter's ``LlamaModel.permute`` does; they are
  un-permuted on load.  ``qk_layout="hf"`` (or ``COSYVOICE_LLM_GGUF_QK=hf``) reads a llama-named
  file whose q/k rows were left in Hugging Face order.

GGUF stores dimensions fastest-first (``ne``); the reader's numpy arrays are already
``[rows, cols]`` (or ``[rows, bytes]`` of quantized blocks), i.e. torch order.

Memory: the reader memory-maps the file; :class:`GGUFLinear` / :class:`GGUFEmbedding` keep
views of the mapped quantized blocks and dequantize when they run (one layer at a time), so a
loaded model holds the quantized bytes (page cache, shared with other readers), not a float copy.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, ConfigError
from .models.qwen2 import Qwen2Config

__all__ = ["GGUF_ENV", "GGUF_QK_ENV", "GGUF_FILENAME", "ARCHITECTURES", "HF_TO_GGUF", "GGUFTensor", "GGUFModelFile",
           "read_gguf", "dequantize", "dequantizable_types", "check_qwen2_gguf", "llama_permute_rows",
           "GGUFLinear", "GGUFEmbedding", "attach_gguf_qwen2", "load_llm_gguf", "resolve_llm_gguf",
           "set_gguf_cache", "gguf_summary", "GGUF_TOLERANCES", "gguf_tolerance"]

log = logging.getLogger(__name__)

GGUF_ENV = "COSYVOICE_LLM_GGUF"          # path to a GGUF, or OFF
GGUF_QK_ENV = "COSYVOICE_LLM_GGUF_QK"    # auto (default), hf or llama: q/k row order of the file
GGUF_FILENAME = "llm.gguf"
ARCHITECTURES = ("qwen2", "llama")
_OFF = {"off", "0", "false", "no", "none", "disable", "disabled"}

# Hugging Face name inside Qwen2ForCausalLM  ->  GGUF tensor name ("{i}" = layer index)
HF_TO_GGUF: Dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "blk.{i}.attn_q.bias",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.k_proj.bias": "blk.{i}.attn_k.bias",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.v_proj.bias": "blk.{i}.attn_v.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# metadata key (after "{arch}.")  ->  Qwen2Config field
_META_FIELDS: Tuple[Tuple[str, str], ...] = (
    ("embedding_length", "hidden_size"),
    ("block_count", "num_hidden_layers"),
    ("attention.head_count", "num_attention_heads"),
    ("attention.head_count_kv", "num_key_value_heads"),
    ("feed_forward_length", "intermediate_size"),
    ("rope.freq_base", "rope_theta"),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
)
_REQUIRED_META = ("embedding_length", "block_count", "attention.head_count")


def _gguf():
    try:
        import gguf  # noqa: F401
    except ImportError:  # pragma: no cover - gguf is a dependency of the GGUF path only
        raise CheckpointError("reading or writing GGUF files needs the 'gguf' package (pip install gguf)") from None
    return gguf


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _reader_class():
    gguf = _gguf()
    from gguf.constants import GGUFValueType

    class _Reader(gguf.GGUFReader):
        """``GGUFReader`` that takes array fields in one piece.

        The stock reader makes a numpy view per array element: a Qwen2 tokenizer (152k tokens,
        151k merges, 152k token types) costs ~12 s and ~470 MB to parse that way.  Numeric arrays
        become one array; string arrays are skipped (length only: cosytools needs no vocabulary
        from the file).
        """

        def _get_field_parts(self, orig_offs: int, raw_type: int):  # type: ignore[override]
            if GGUFValueType(raw_type) != GGUFValueType.ARRAY or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            offs = orig_offs
            raw_itype = self._get(offs, np.uint32)
            offs += int(raw_itype.nbytes)
            alen = self._get(offs, np.uint64)
            offs += int(alen.nbytes)
            itype = GGUFValueType(raw_itype[0])
            n = int(alen[0])
            nptype = self.gguf_scalar_to_np.get(itype)
            if nptype is not None:
                arr = self._get(offs, nptype, n)
                if len(arr) != n:
                    raise ValueError(f"array field at offset {orig_offs} runs past the end of the file")
                return offs + int(arr.nbytes) - orig_offs, [raw_itype, alen, arr], [2], [GGUFValueType.ARRAY, itype]
            if itype == GGUFValueType.STRING:
                buf, end, o = self.data, len(self.data), offs
                unpack = struct.Struct("<Q").unpack_from
                for _ in range(n):
                    if o + 8 > end:
                        raise ValueError(f"string array at offset {orig_offs} runs past the end of the file")
                    o += 8 + unpack(buf, o)[0]
                if o > end:
                    raise ValueError(f"string array at offset {orig_offs} runs past the end of the file")
                return o - orig_offs, [raw_itype, alen, self.data[offs:o]], [], [GGUFValueType.ARRAY, itype]
            return super()._get_field_parts(orig_offs, raw_type)

    return _Reader


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file: its raw (possibly quantized) data, memory-mapped."""

    name: str
    qtype: Any                 # gguf.GGMLQuantizationType
    shape: Tuple[int, ...]     # torch order (rows first)
    data: np.ndarray           # F32/F16: float array of ``shape``; otherwise uint8 blocks [rows, bytes/row]

    @property
    def type_name(self) -> str:
        return self.qtype.name

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def dequantize(self) -> torch.Tensor:
        """The float32 tensor (a new copy, ``shape``)."""
        return dequantize(self.data, self.qtype, self.shape, self.name)


@dataclass
class GGUFModelFile:
    """A parsed GGUF file: architecture, scalar metadata, tensors (memory-mapped)."""

    path: Path
    architecture: str
    metadata: Dict[str, Any]
    tensors: Dict[str, GGUFTensor]
    array_lengths: Dict[str, int] = field(default_factory=dict)

    def key(self, suffix: str) -> str:
        return f"{self.architecture}.{suffix}"

    def get(self, suffix: str, default: Any = None) -> Any:
        """``{arch}.suffix`` from the metadata (e.g. ``get("attention.head_count")``)."""
        return self.metadata.get(self.key(suffix), default)

    def type_counts(self) -> Dict[str, int]:
        """Number of tensors per storage type."""
        return dict(Counter(t.type_name for t in self.tensors.values()))

    @property
    def main_type(self) -> str:
        """The storage type holding most weight elements of the 2-D tensors (e.g. ``Q4_0``)."""
        c: Counter = Counter()
        for t in self.tensors.values():
            if len(t.shape) >= 2:
                c[t.type_name] += math.prod(t.shape)
        return c.most_common(1)[0][0] if c else "none"

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def read_gguf(path: Union[str, Path]) -> GGUFModelFile:
    """Parse a GGUF file (header, metadata, tensor table); tensor data stay memory-mapped.

    Raises :class:`CheckpointError` for a missing, truncated or non-GGUF file, and for an
    architecture other than ``qwen2`` / ``llama``.
    """
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    size = path.stat().st_size
    try:
        reader = _reader_class()(str(path), mode="r")  # read-only memory map
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, struct.error, OSError, UnicodeDecodeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "GGMLQuantizationType" in msg:
            raise CheckpointError(f"{path}: a tensor uses a GGML type the installed gguf library does not know "
                                  f"({msg}); upgrade the gguf package or re-quantize the file") from None
        raise CheckpointError(f"cannot read GGUF file {path} ({size} bytes): {msg}. The file is truncated, corrupt "
                              "or not a GGUF file; re-export it (cosytools export gguf) or re-download it.") from None
    metadata: Dict[str, Any] = {}
    arrays: Dict[str, int] = {}
    from gguf.constants import GGUFValueType
    for name, fld in reader.fields.items():
        if not fld.types:
            continue
        if fld.types[0] == GGUFValueType.ARRAY:
            arrays[name] = int(fld.parts[4][0]) if len(fld.parts) > 4 else 0
            if fld.types[-1] != GGUFValueType.STRING and arrays[name] <= 64:
                metadata[name] = fld.contents()
            continue
        try:
            metadata[name] = fld.contents()
        except (ValueError, UnicodeDecodeError):
            metadata[name] = None
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: general.architecture is {arch!r}; cosytools reads the Qwen2 trunk of the "
                              f"CosyVoice3 LLM written as {' or '.join(ARCHITECTURES)}")
    tensors: Dict[str, GGUFTensor] = {}
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise CheckpointError(f"{path}: tensor {t.name} ends at byte {end} but the file has {size} bytes; "
                                  "the file is truncated. Re-export or re-download it.")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        tensors[t.name] = GGUFTensor(t.name, t.tensor_type, shape, t.data)
    return GGUFModelFile(path, arch, metadata, tensors, arrays)


# ---------------------------------------------------------------------------------------------
# dequantization
# ---------------------------------------------------------------------------------------------
def dequantize(data: np.ndarray, qtype: Any, shape: Tuple[int, ...], name: str = "tensor") -> torch.Tensor:
    """Raw GGUF tensor data -> a new float32 torch tensor of ``shape``, decoded by
    ``gguf.quants.dequantize`` (any type the installed library implements)."""
    gguf = _gguf()
    if qtype == gguf.GGMLQuantizationType.F32:
        return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)
    try:
        out = gguf.quants.dequantize(np.asarray(data), qtype)
    except NotImplementedError:
        raise CheckpointError(_unsupported_msg(name, qtype)) from None
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)


_DEQ_OK: Dict[int, bool] = {}


def _can_dequantize(qtype: Any) -> bool:
    if int(qtype) not in _DEQ_OK:
        gguf = _gguf()
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                ok = True
            else:
                gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
                ok = True
        except (NotImplementedError, KeyError):
            ok = False
        except Exception:  # a grid-based type that chokes on zeros is still implemented
            ok = True
        _DEQ_OK[int(qtype)] = ok
    return _DEQ_OK[int(qtype)]


def dequantizable_types() -> List[str]:
    """Names of the GGML types this cosytools + gguf library can dequantize."""
    gguf = _gguf()
    return [t.name for t in gguf.GGMLQuantizationType if _can_dequantize(t)]


def _unsupported_msg(name: str, qtype: Any) -> str:
    return (f"tensor {name} is stored as {qtype.name} (GGML type {int(qtype)}), which the installed gguf library "
            f"cannot dequantize; supported types: {', '.join(dequantizable_types())}. Re-quantize the file to one "
            "of those (e.g. cosytools export gguf --type Q8_0).")


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _expected_shapes(cfg: Qwen2Config) -> Dict[str, Tuple[int, ...]]:
    h, hd, i_ = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes: Dict[str, Tuple[int, ...]] = {"token_embd.weight": (cfg.vocab_size, h), "output_norm.weight": (h,)}
    per = {"attn_norm.weight": (h,), "attn_q.weight": (q, h), "attn_q.bias": (q,), "attn_k.weight": (kv, h),
           "attn_k.bias": (kv,), "attn_v.weight": (kv, h), "attn_v.bias": (kv,), "attn_output.weight": (h, q),
           "ffn_norm.weight": (h,), "ffn_gate.weight": (i_, h), "ffn_up.weight": (i_, h), "ffn_down.weight": (h, i_)}
    for layer in range(cfg.num_hidden_layers):
        for k, s in per.items():
            shapes[f"blk.{layer}.{k}"] = s
    return shapes


def _close(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-5, abs_tol=0.0)


def check_qwen2_gguf(gf: GGUFModelFile, cfg: Qwen2Config, config_name: str = "CosyVoice-BlankEN/config.json") -> None:
    """Check a GGUF against the model's Qwen2 config: metadata, tensor names, shapes and types.

    Raises :class:`CheckpointError` naming the key / tensor and both values.
    """
    p = gf.path
    for suffix in _REQUIRED_META:
        if gf.get(suffix) is None:
            raise CheckpointError(f"{p}: metadata key {gf.key(suffix)} is missing; is this a {gf.architecture} "
                                  "model written by llama.cpp's converter or cosytools export gguf?")
    for suffix, attr in _META_FIELDS:
        want = getattr(cfg, attr)
        got = gf.get(suffix)
        if got is None:
            if suffix == "attention.head_count_kv":
                got = gf.get("attention.head_count")  # llama.cpp's default when the key is absent
            else:
                log.warning("%s: no %s in the metadata; using %s = %s from %s", p, gf.key(suffix), attr, want,
                            config_name)
                continue
        if isinstance(got, list) and got and all(v == got[0] for v in got):
            got = got[0]  # a per-layer array with one value
        try:
            same = _close(got, want) if isinstance(want, float) or isinstance(got, float) else int(got) == int(want)
        except (TypeError, ValueError):
            raise CheckpointError(f"{p}: metadata {gf.key(suffix)} is {got!r}; expected a number like "
                                  f"{config_name}'s {attr} = {want}") from None
        if not same:
            raise CheckpointError(f"{p}: metadata {gf.key(suffix)} is {got}, but {config_name} has {attr} = {want}. "
                                  "The GGUF was made from a different model; export it from this model dir "
                                  "(cosytools export gguf --model DIR) or point --model at the matching dir.")
    emb = gf.tensors.get("token_embd.weight")
    if emb is not None and len(emb.shape) == 2 and emb.shape[0] != cfg.vocab_size:
        raise CheckpointError(f"{p}: token_embd.weight has {emb.shape[0]} rows (vocabulary size), but {config_name} "
                              f"has vocab_size = {cfg.vocab_size}")
    expected = _expected_shapes(cfg)
    missing = [k for k in expected if k not in gf.tensors]
    if missing:
        raise CheckpointError(f"{p}: {len(missing)} tensor(s) missing from the GGUF: {', '.join(missing[:8])}"
                              + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
                              + f". A Qwen2 GGUF of this model has {len(expected)} tensors (token_embd, "
                              "blk.N.attn_q/k/v (+ .bias), attn_output, ffn_gate/up/down, attn_norm, ffn_norm, "
                              "output_norm).")
    bad = [(k, gf.tensors[k].shape, s) for k, s in expected.items() if gf.tensors[k].shape != s]
    out = gf.tensors.get("output.weight")
    if out is not None and out.shape != (cfg.vocab_size, cfg.hidden_size):
        bad.append(("output.weight", out.shape, (cfg.vocab_size, cfg.hidden_size)))
    if bad:
        raise CheckpointError(f"{p}: tensor shape mismatch with {config_name}: "
                              + "; ".join(f"{k}: file has {list(a)}, model expects {list(b)}" for k, a, b in bad[:8]))
    for k in list(expected) + (["output.weight"] if out is not None else []):
        t = gf.tensors[k]
        if not _can_dequantize(t.qtype):
            raise CheckpointError(f"{p}: " + _unsupported_msg(k, t.qtype))
    extra = [k for k in gf.tensors if k not in expected and k != "output.weight"]
    if extra:
        log.debug("%s: ignoring %d tensor(s) the Qwen2 trunk does not use: %s", p, len(extra), ", ".join(extra[:8]))


# ---------------------------------------------------------------------------------------------
# q/k row order of llama-named files
# ---------------------------------------------------------------------------------------------
def llama_permute_rows(rows: int, n_head: int) -> np.ndarray:
    """Row order that llama.cpp's converter gives q/k of a ``llama`` model.

    ``permuted[p] = hf[order[p]]``: within each head, the rotate-half pairs (i, i + d/2) of a
    Hugging Face checkpoint become adjacent rows (2i, 2i+1), which is what llama.cpp's
    interleaved RoPE for ``llama`` expects.
    """
    if rows % (2 * n_head):
        raise ConfigError(f"cannot permute {rows} rows into {n_head} heads of even size")
    idx = np.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def _qk_layout(gf: GGUFModelFile, qk_layout: Optional[str]) -> str:
    layout = (qk_layout or os.environ.get(GGUF_QK_ENV) or "auto").lower()
    if layout not in ("auto", "hf", "llama"):
        raise ConfigError(f"q/k layout {layout!r} (from {GGUF_QK_ENV} or qk_layout): use auto, hf or llama")
    if layout == "auto":
        layout = "llama" if gf.architecture == "llama" else "hf"
    return layout


# ---------------------------------------------------------------------------------------------
# modules that dequantize when they run
# ---------------------------------------------------------------------------------------------
class GGUFLinear(nn.Module):
    """``nn.Linear`` whose weight stays in GGUF blocks and is dequantized at each forward.

    ``cache=True`` keeps the dequantized float weight after the first call (fast, but a float
    copy of that layer).  ``bias`` is a regular float parameter.
    """

    def __init__(self, tensor: GGUFTensor, bias: Optional[torch.Tensor] = None, cache: bool = False,
                 rows: Optional[np.ndarray] = None) -> None:
        super().__init__()
        self.out_features, self.in_features = tensor.shape
        self.qtype = tensor.qtype
        self.gguf_name = tensor.name
        # the mapped blocks; ``rows`` reorders them (a copy of this tensor's quantized bytes only)
        self._data = tensor.data if rows is None else np.ascontiguousarray(tensor.data[rows])
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone().float(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.cache = cache
        self._cached: Optional[torch.Tensor] = None

    @property
    def type_name(self) -> str:
        return self.qtype.name

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight ``[out, in]`` (a fresh tensor unless cached)."""
        if self._cached is not None:
            return self._cached
        w = dequantize(self._data, self.qtype, (self.out_features, self.in_features), self.gguf_name)
        if self.cache:
            self._cached = w
        return w

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight (materialises a float copy: for inspection, not the hot path)."""
        return self.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(device=x.device, dtype=x.dtype)
        b = None if self.bias is None else self.bias.to(dtype=x.dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"gguf={self.gguf_name}:{self.type_name}, cache={self.cache}")


class GGUFEmbedding(nn.Module):
    """``nn.Embedding`` over a GGUF table: only the looked-up rows are dequantized.

    Its output dtype/device follow the module (``.to(...)``), like a float embedding's would.
    """

    def __init__(self, tensor: GGUFTensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = tensor.shape
        self.qtype = tensor.qtype
        self.gguf_name = tensor.name
        self._data = tensor.data
        self.register_buffer("_like", torch.zeros(0), persistent=False)  # follows .to(dtype/device)

    @property
    def type_name(self) -> str:
        return self.qtype.name

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to("cpu", torch.long)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range [0, {self.num_embeddings}) in {self.gguf_name}: "
                             f"min {int(flat.min())}, max {int(flat.max())}")
        uniq, inv = torch.unique(flat, return_inverse=True)
        rows = self._data[uniq.numpy()]
        w = dequantize(rows, self.qtype, (len(uniq), self.embedding_dim), self.gguf_name)
        out = w[inv].reshape(*ids.shape, self.embedding_dim)
        return out.to(device=self._like.device, dtype=self._like.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, gguf={self.gguf_name}:{self.type_name}"


def _float_param(t: GGUFTensor) -> nn.Parameter:
    return nn.Parameter(t.dequantize(), requires_grad=False)


def attach_gguf_qwen2(model: nn.Module, gf: GGUFModelFile, cfg: Qwen2Config, *, qk_layout: Optional[str] = None,
                      cache: bool = False) -> nn.Module:
    """Put the GGUF weights into a ``Qwen2ForCausalLM`` (built on the meta device or not).

    Linear layers become :class:`GGUFLinear`, ``embed_tokens`` a :class:`GGUFEmbedding`, norms
    and biases float parameters.  ``lm_head`` uses ``output.weight`` or, when absent, the tied
    ``token_embd.weight`` (CosyVoice3 does not use it).  Call :func:`check_qwen2_gguf` first.
    """
    layout = _qk_layout(gf, qk_layout)
    T = gf.tensors
    q_rows = k_rows = None
    if layout == "llama":
        hd = cfg.head_dim
        # file row p holds HF row order[p]; HF row r is file row argsort(order)[r]
        q_rows = np.argsort(llama_permute_rows(cfg.num_attention_heads * hd, cfg.num_attention_heads))
        k_rows = np.argsort(llama_permute_rows(cfg.num_key_value_heads * hd, cfg.num_key_value_heads))
    inner = model.model
    inner.embed_tokens = GGUFEmbedding(T["token_embd.weight"])
    for i, layer in enumerate(inner.layers):
        pre = f"blk.{i}."
        at, mlp = layer.self_attn, layer.mlp

        def lin(name: str, biased: bool = False, rows: Optional[np.ndarray] = None) -> GGUFLinear:
            bias = T[pre + name + ".bias"].dequantize() if biased else None
            if bias is not None and rows is not None:
                bias = bias[torch.from_numpy(rows)]
            return GGUFLinear(T[pre + name + ".weight"], bias, cache=cache, rows=rows)

        at.q_proj = lin("attn_q", True, q_rows)
        at.k_proj = lin("attn_k", True, k_rows)
        at.v_proj = lin("attn_v", True)
        at.o_proj = lin("attn_output")
        mlp.gate_proj = lin("ffn_gate")
        mlp.up_proj = lin("ffn_up")
        mlp.down_proj = lin("ffn_down")
        layer.input_layernorm.weight = _float_param(T[pre + "attn_norm.weight"])
        layer.post_attention_layernorm.weight = _float_param(T[pre + "ffn_norm.weight"])
    inner.norm.weight = _float_param(T["output_norm.weight"])
    model.lm_head = GGUFLinear(T.get("output.weight", T["token_embd.weight"]), cache=False)
    return model


def set_gguf_cache(module: nn.Module, enabled: bool) -> None:
    """Turn the dequantized-weight cache of every :class:`GGUFLinear` in ``module`` on or off."""
    for m in module.modules():
        if isinstance(m, GGUFLinear):
            m.cache = enabled
            if not enabled:
                m._cached = None


# ---------------------------------------------------------------------------------------------
# the CosyVoice3 LLM from a GGUF + the float heads
# ---------------------------------------------------------------------------------------------
def resolve_llm_gguf(model_dir: Optional[Path], gguf: Union[bool, str, Path, None] = None) -> Optional[Path]:
    """Which GGUF (if any) to load the LLM trunk from.

    ``gguf=False``: none.  A path: that file.  ``None`` (auto) / ``True``: ``$COSYVOICE_LLM_GGUF``
    (a path, or ``OFF`` for none), else ``llm.gguf`` in the model dir; ``True`` makes "none found"
    an error.
    """
    if gguf is False:
        return None
    if isinstance(gguf, (str, Path)) and not isinstance(gguf, bool):
        p = Path(gguf)
        if not p.is_file():
            raise CheckpointError(f"GGUF file {p} does not exist")
        return p
    env = os.environ.get(GGUF_ENV, "").strip()
    if env:
        if env.lower() in _OFF:
            if gguf is True:
                raise ConfigError(f"a GGUF was requested but {GGUF_ENV}={env} disables GGUF weights")
            return None
        p = Path(env)
        if not p.is_file():
            raise CheckpointError(f"{GGUF_ENV}={env}: no such GGUF file (set it to a GGUF path, or OFF)")
        return p
    if model_dir is not None and (Path(model_dir) / GGUF_FILENAME).is_file():
        return Path(model_dir) / GGUF_FILENAME
    if gguf is True:
        raise CheckpointError(f"no GGUF for the LLM: {GGUF_FILENAME} is not in {model_dir} and {GGUF_ENV} is unset")
    return None


def _read_keys(path: Path, keys: Iterable[str]) -> Dict[str, torch.Tensor]:
    """Only ``keys`` of a float checkpoint (safetensors: lazily; .pt: memory-mapped when possible)."""
    keys = list(keys)
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open
            with safe_open(str(path), "pt") as f:
                have = set(f.keys())
                return {k: f.get_tensor(k) for k in keys if k in have}
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy (non-zip) .pt files cannot be mapped: read them whole
        from .checkpoint import read_state_dict
        sd = read_state_dict(path)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"checkpoint {path} is not a state dict (a mapping of names to tensors)")
    out = {k: sd[k].detach().clone() for k in keys if k in sd and isinstance(sd[k], torch.Tensor)}
    del sd
    return out


def load_llm_gguf(cfg: Any, model_dir: Path, gguf_path: Union[str, Path], fmt: str = "auto", llm_rl: bool = False, *,
                  qk_layout: Optional[str] = None, cache: bool = False) -> Tuple[nn.Module, Dict[str, str]]:
    """Build ``CosyVoice3LM`` with its Qwen2 trunk from ``gguf_path`` (dequantized per layer) and
    ``speech_embedding`` / ``llm_decoder`` from the float checkpoint in ``model_dir``.

    Returns ``(module in eval mode, files)`` where ``files`` has ``llm`` (the GGUF path),
    ``llm_gguf_type`` (main storage type) and ``llm_float`` (the checkpoint the heads came from).
    """
    from .loading import find_checkpoint

    gf = read_gguf(gguf_path)
    check_qwen2_gguf(gf, cfg.qwen2)
    with torch.device("meta"):
        lm = cfg.build("llm")
    attach_gguf_qwen2(lm.llm.model, gf, cfg.qwen2, qk_layout=qk_layout, cache=cache)
    needed = [k for k, v in list(lm.named_parameters()) + list(lm.named_buffers()) if v.is_meta]
    try:
        float_path = find_checkpoint(Path(model_dir), "llm", fmt, llm_rl)
    except CheckpointError as e:
        raise CheckpointError(f"{e}. The GGUF {gguf_path} holds only the Qwen2 trunk; "
                              f"{', '.join(k.rsplit('.', 1)[0] for k in needed)} come from llm.pt / llm.safetensors "
                              "in the model dir") from None
    sd = _read_keys(float_path, needed)
    missing = [k for k in needed if k not in sd]
    own = dict(lm.named_parameters())
    own.update(dict(lm.named_buffers()))
    wrong = [(k, list(sd[k].shape), list(own[k].shape)) for k in needed if k in sd and sd[k].shape != own[k].shape]
    if missing or wrong:
        parts = []
        if missing:
            parts.append("missing: " + ", ".join(missing))
        if wrong:
            parts.append("shape mismatch: " + "; ".join(f"{k}: file has {a}, model expects {b}" for k, a, b in wrong))
        raise CheckpointError(f"checkpoint {float_path} cannot supply the LLM heads next to the GGUF trunk ("
                              + "; ".join(parts) + ")")
    lm.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=False, assign=True)
    still = [k for k, v in list(lm.named_parameters()) + list(lm.named_buffers()) if v.is_meta]
    if still:  # pragma: no cover - a module the GGUF path does not know about
        raise CheckpointError(f"internal: parameters left unloaded on the GGUF path: {', '.join(still)}")
    for p in lm.parameters():
        p.requires_grad_(False)
    files = {"llm": str(gguf_path), "llm_gguf_type": gf.main_type, "llm_float": str(float_path)}
    log.info("LLM trunk from %s (%s, %s), heads from %s", gguf_path, gf.architecture, gf.main_type, float_path)
    return lm.eval(), files


def gguf_summary(gf: GGUFModelFile) -> Dict[str, Any]:
    """A JSON-friendly description of a GGUF file (architecture, sizes, types, key metadata)."""
    keys = [k for k in gf.metadata if k.startswith(gf.architecture + ".") or k.startswith("general.")]
    return {"path": str(gf.path), "architecture": gf.architecture, "main_type": gf.main_type,
            "file_bytes": gf.path.stat().st_size, "tensor_bytes": gf.nbytes, "tensors": len(gf.tensors),
            "types": gf.type_counts(), "metadata": {k: gf.metadata[k] for k in keys},
            "arrays": dict(gf.array_lengths)}


# Parity tolerance of a run on GGUF weights, per storage type: atol (x peak |ref|, the rule of
# parity.metrics), rtol.  About 1.5x the largest max_rel over every tap and the log-probs measured
# on the random-weight tiny and full models (docs/quantization.md): a guard against broken
# loading, not a quality bar.  Unlisted types (F32, K-quants, ...) keep the float tolerance.
GGUF_TOLERANCES: Dict[str, Tuple[float, float]] = {
    "F16": (3e-3, 0.0),
    "BF16": (2e-2, 0.0),
    "Q8_0": (7e-2, 0.0),
    "Q5_1": (0.5, 0.0),
    "Q5_0": (0.5, 0.0),
    "Q4_1": (0.8, 0.0),
    "Q4_0": (1.0, 0.0),
}


def gguf_tolerance(type_name: str, atol: float, rtol: float) -> Tuple[float, float]:
    """(atol, rtol) for a parity run whose LLM trunk is stored as ``type_name``: the larger of the
    type's documented bound and the given (compute-dtype) tolerance."""
    ta, tr = GGUF_TOLERANCES.get(type_name, (0.0, 0.0))
    return max(atol, ta), max(rtol, tr)
