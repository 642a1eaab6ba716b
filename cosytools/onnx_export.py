"""``cosytools export onnx``: write the model stages as ONNX files for onnxruntime / TensorRT.

Files written (``OUT_DIR/``), each checked with ``onnx.checker`` and compared with the eager
model on seeded random inputs before the export counts as done:

``llm.prefill.onnx``
    ``inputs_embeds`` [1, T, H] float32 (the prompt embeddings, built in torch by the caller so
    that the ``<|endofprompt|>`` check and the text embedding stay in Python) ->
    ``logp`` [1, V] float32 (log-softmax of ``llm_decoder`` at the last position),
    ``hidden`` [1, T, H] float32 (after the final RMSNorm), ``present_key.N`` /
    ``present_value.N`` [1, kv_heads, T, head_dim] for every layer N, then ``hidden.01`` …
    (the output of each decoder layer but the last, for debugging).
``llm.decode.onnx``
    ``token`` [1] int64 (a speech token: the ``speech_embedding`` lookup is in the graph),
    ``position`` [1] int64 (its RoPE position = number of cached positions),
    ``past_key.N`` / ``past_value.N`` [1, kv_heads, P, head_dim] ->
    ``logp`` [1, V], ``hidden`` [1, H], ``present_key.N`` / ``present_value.N`` [1, kv_heads, P+1, head_dim].
    The KV tensors are in the export dtype (float32, or float16 with ``--dtype fp16``).
``flow.decoder.estimator.fp32.onnx``
    The DiT velocity estimator with upstream's export contract (``cosyvoice/bin/export_onnx.py``):
    inputs ``x`` [2, 80, seq_len], ``mask`` [2, 1, seq_len], ``mu`` [2, 80, seq_len], ``t`` [2],
    ``spks`` [2, 80], ``cond`` [2, 80, seq_len], all float32, output ``estimator_out``
    [2, 80, seq_len]; only the time axis is dynamic (named ``seq_len``).  Non-streaming (the
    estimator's default path), as upstream exports it.  With ``--dtype fp16`` the file is
    ``flow.decoder.estimator.fp16.onnx``: same float32 inputs/outputs, float16 weights and compute
    inside (attention scores and softmax stay float32, as in the torch model).
``flow.decoder.estimator.streaming.fp32.onnx``
    The same contract with the streaming chunk attention mask built in (cosytools' own file;
    upstream has no streaming estimator export).
``hift.onnx``
    The HiFT convolution stack in its streaming form: ``mel`` [1, 80, T+R] whose last
    R = ``conv_pre_look_right`` frames are right context only (the caller appends R zero frames at
    the end of a stream), ``s_stft_real`` / ``s_stft_imag`` [1, n_fft/2+1, F] (STFT of the NSF
    source, F = 120·T + 1 + 120·R frames; the graph drops the last 120·R) -> ``magnitude`` and
    ``phase`` [1, n_fft/2+1, 120·T+1] float32, then every intermediate the torch model taps
    (``tap.conv_pre``, ``tap.ups.0``, ``tap.source_downs.0`` …) for localising a divergence.

What stays in torch, and why:

* the HiFT **F0 predictor** (float64): it exports, but onnxruntime has no float64 ``Conv``
  kernel (CPU or CUDA), and upstream requires float64 there;
* the HiFT **source** (SineGen2: a float64-accumulated phase sum over fixed noise tables), the
  source **STFT** and the final **iSTFT** (ONNX has no ISTFT operator);
* the flow's token embedding, pre-lookahead convolution and speaker projection (tiny, run once
  per call), the Euler loop with classifier-free guidance and the fixed start noise;
* the LLM's text embedding of the prompt and the RAS sampling.

A ``cosytools-onnx.json`` manifest beside the files records the model, dtype, opset, the
role of each file and the errors measured against eager.  The exporter is torch's TorchScript
exporter (``dynamo=False``), so the opset is limited to what it supports (14 … 20).
Files over protobuf's 2 GB limit (the full-size LLM) get an external ``.data`` file.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import click
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosytools import taps
from cosytools.errors import CosyToolsError
from cosytools.models.qwen2 import apply_rope, rope_cos_sin

__all__ = [
    "export_onnx", "export_stage", "onnx_command", "OnnxError", "OnnxContractError", "OnnxExportError",
    "ESTIMATOR_INPUT_NAMES", "ESTIMATOR_OUTPUT_NAMES", "ESTIMATOR_DYNAMIC_AXES", "check_estimator_contract",
    "estimator_file_name", "MANIFEST", "STAGES", "DEFAULT_OPSET", "MIN_OPSET", "max_opset",
]

log = logging.getLogger(__name__)

STAGES = ("llm", "flow", "hift")
MANIFEST = "cosytools-onnx.json"
#: bump when a graph's contents or IO change: part of the backend's export-cache key
EXPORT_FORMAT = 1
DEFAULT_OPSET = 17
MIN_OPSET = 14  # scaled_dot_product_attention needs 14

# upstream's contract (cosyvoice/bin/export_onnx.py): names, order, and the dynamic time axis
ESTIMATOR_INPUT_NAMES = ("x", "mask", "mu", "t", "spks", "cond")
ESTIMATOR_OUTPUT_NAMES = ("estimator_out",)
ESTIMATOR_DYNAMIC_AXES = {"x": {2: "seq_len"}, "mask": {2: "seq_len"}, "mu": {2: "seq_len"},
                          "cond": {2: "seq_len"}, "estimator_out": {2: "seq_len"}}

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}


class OnnxError(CosyToolsError):
    """An ONNX file, provider or runtime problem (the message names the file)."""


class OnnxContractError(OnnxError):
    """An ONNX file whose inputs/outputs do not fit what cosytools (or upstream) expects."""


class OnnxExportError(OnnxError):
    """Export failed, or the exported file does not reproduce the eager model."""


def max_opset() -> int:
    """The highest opset torch's TorchScript exporter writes (and the installed onnx knows)."""
    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as m
    except ImportError:  # pragma: no cover - older/newer torch layout
        m = 20
    import onnx
    return min(int(m), int(onnx.defs.onnx_opset_version()))


def _dtype_tag(dtype: Union[str, torch.dtype]) -> str:
    if isinstance(dtype, torch.dtype):
        if dtype == torch.float32:
            return "fp32"
        if dtype == torch.float16:
            return "fp16"
        raise OnnxExportError(f"ONNX export supports float32 and float16 models, not {dtype}")
    d = str(dtype).lower()
    if d not in _DTYPES:
        raise OnnxExportError(f"unknown ONNX export dtype {dtype!r}; use fp32 or fp16")
    return "fp32" if _DTYPES[d] == torch.float32 else "fp16"


def estimator_file_name(dtype: Union[str, torch.dtype] = "fp32", streaming: bool = False) -> str:
    """``flow.decoder.estimator.fp32.onnx`` (upstream's name) / ``...streaming.fp32.onnx`` / fp16."""
    tag = _dtype_tag(dtype)
    return f"flow.decoder.estimator.{'streaming.' if streaming else ''}{tag}.onnx"


# ------------------------------------------------------------------------------------------ graphs


def _attention(attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, past_k: Optional[Tensor],
               past_v: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Qwen2 attention with the KV cache as explicit tensors (same ops as ``Qwen2Attention``)."""
    b, t, _ = x.shape
    nh, nkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(b, t, nh, hd).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, nkv, hd).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, nkv, hd).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if past_k is not None:
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
    present_k, present_v = k, v
    rep = nh // nkv
    if rep > 1:  # = repeat_interleave(rep, dim=1), written so that the exporter keeps dynamic shapes
        k = k.unsqueeze(2).expand(b, nkv, rep, k.shape[2], hd).reshape(b, nh, k.shape[2], hd)
        v = v.unsqueeze(2).expand(b, nkv, rep, v.shape[2], hd).reshape(b, nh, v.shape[2], hd)
    # prefill (no past): causal; a decode step (one query) sees every cached position
    out = F.scaled_dot_product_attention(q, k, v, is_causal=past_k is None)
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, nh * hd)), present_k, present_v


class _LLMGraph(nn.Module):
    """Prefill (``decode=False``) or one decode step of ``CosyVoice3LM`` with an explicit KV cache."""

    def __init__(self, lm: nn.Module, decode: bool) -> None:
        super().__init__()
        self.lm = lm
        self.decode = decode

    def _trunk(self, h: Tensor, positions: Tensor, past: Sequence[Tensor]) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
        qm = self.lm.llm.model.model
        cfg = qm.config
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, h.dtype)
        presents: List[Tensor] = []
        layer_out: List[Tensor] = []
        for i, layer in enumerate(qm.layers):
            pk, pv = (past[2 * i], past[2 * i + 1]) if past else (None, None)
            a, k, v = _attention(layer.self_attn, layer.input_layernorm(h), cos, sin, pk, pv)
            h = h + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            presents += [k, v]
            layer_out.append(h)
        return qm.norm(h), presents, layer_out

    def forward(self, *args: Tensor) -> Tuple[Tensor, ...]:
        dtype = self.lm.llm_decoder.weight.dtype
        if not self.decode:
            emb = args[0].to(dtype)
            positions = torch.arange(emb.shape[1], device=emb.device)
            h, presents, layer_out = self._trunk(emb, positions, ())
            logp = self.lm.logp(h[:, -1])
            return (logp, h.float(), *presents, *[x.float() for x in layer_out[:-1]])
        token, position, past = args[0], args[1], args[2:]
        emb = self.lm.speech_embedding.weight[token].reshape(1, 1, -1)
        h, presents, _ = self._trunk(emb, position.reshape(-1), past)
        return (self.lm.logp(h[:, -1]), h[:, -1].float(), *presents)


class _EstimatorGraph(nn.Module):
    """The DiT with float32 inputs/outputs whatever its dtype, non-streaming or streaming."""

    def __init__(self, dit: nn.Module, streaming: bool) -> None:
        super().__init__()
        self.dit = dit
        self.streaming = streaming

    def forward(self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor) -> Tensor:
        dt = self.dit.proj_out.weight.dtype
        if dt == torch.float32:  # no casts at all: the graph upstream's exporter writes
            return self.dit(x, mask, mu, t, spks, cond, streaming=self.streaming)
        out = self.dit(x.to(dt), mask.to(dt), mu.to(dt), t.to(dt), spks.to(dt), cond.to(dt), streaming=self.streaming)
        return out.float()


def _pin_estimator_shapes(path: Path, mel_dim: int, spk_dim: int) -> None:
    """Write the contract's shapes into the graph's IO (the exporter can lose the static batch of 2
    through a Cast); values are unchanged."""
    import onnx
    model = onnx.load(str(path))
    want = estimator_contract(mel_dim, spk_dim)
    changed = False
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name not in want:
            continue
        dims = vi.type.tensor_type.shape.dim
        for d, w in zip(dims, want[vi.name][1]):
            if isinstance(w, int) and not (d.HasField("dim_value") and d.dim_value == w):
                d.Clear()
                d.dim_value = w
                changed = True
            elif isinstance(w, str) and not (d.HasField("dim_param") and d.dim_param == w):
                d.Clear()
                d.dim_param = w
                changed = True
    if changed:
        onnx.save(model, str(path))


def _hift_tap_names(hift: nn.Module) -> List[str]:
    """The taps ``decode_body`` emits, in execution order (found by one small eager call)."""
    r = hift.conv_pre_look_right
    frames = 2 + r
    f = hift.upsample_prod * frames + 1
    nb = hift.n_fft // 2 + 1
    with torch.inference_mode(), taps.capture("hift") as rec:
        dev = hift.conv_pre.weight.device
        hift.decode_body(torch.zeros(1, hift.conv_pre.in_channels, frames, device=dev),
                         torch.zeros(1, nb, f, device=dev), torch.zeros(1, nb, f, device=dev), finalize=False)
    return [k[len("hift.tap."):] for k in rec.order]


class _HiftGraph(nn.Module):
    """``CausalHiFTGenerator.decode_body`` in its streaming form; taps become extra outputs."""

    def __init__(self, hift: nn.Module, tap_names: Sequence[str]) -> None:
        super().__init__()
        self.hift = hift
        self.tap_names = list(tap_names)

    def forward(self, mel: Tensor, s_real: Tensor, s_imag: Tensor) -> Tuple[Tensor, ...]:
        with taps.capture("hift", include=self.tap_names) as rec:
            magnitude, phase = self.hift.decode_body(mel, s_real, s_imag, finalize=False)
        return (magnitude, phase, *[rec.tensors[f"hift.tap.{n}"].float() for n in self.tap_names])


# ------------------------------------------------------------------------------------------ export


@dataclass
class ExportedFile:
    role: str               # llm.prefill, llm.decode, flow.estimator, flow.estimator.streaming, hift
    path: Path
    max_abs: float = float("nan")
    max_rel: float = float("nan")   # max |onnx - eager| / max |eager|
    checked: str = ""       # what the parity check compared
    details: Optional[Dict[str, List[float]]] = None  # output -> [max_abs, max_rel]

    def to_dict(self) -> Dict[str, Any]:
        return {"role": self.role, "file": self.path.name, "bytes": _file_bytes(self.path),
                "max_abs": self.max_abs, "max_rel": self.max_rel, "checked": self.checked,
                "details": self.details or {}}

    def record(self, errs: Dict[str, List[Tuple[float, float]]], checked: str) -> None:
        self.details = {k: list(_merge(v)) for k, v in errs.items()}
        self.max_abs, self.max_rel = _merge(self.details.values())
        self.checked = checked


def _file_bytes(p: Path) -> int:
    n = p.stat().st_size if p.exists() else 0
    for extra in p.parent.glob(p.name + ".data"):
        n += extra.stat().st_size
    return n


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the exporter's deprecation / tracer chatter (it is not actionable for a user)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prev = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch.onnx").setLevel(prev)


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in module.parameters()}.values())


def _export(module: nn.Module, args: Tuple[Tensor, ...], path: Path, input_names: Sequence[str],
            output_names: Sequence[str], dynamic_axes: Dict[str, Dict[int, str]], opset: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + ".data")):
        if stale.exists():
            stale.unlink()
    module.eval()
    big = _param_bytes(module) > 1_800_000_000  # protobuf's 2 GB limit, with room for the graph
    with _quiet_export(), torch.no_grad():
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
                              input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=dynamic_axes, export_params=True)
        except Exception as e:
            raise OnnxExportError(f"exporting {path.name} failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    module.eval()
    if big and not path.with_name(path.name + ".data").exists():
        _externalize(path)


def _externalize(path: Path) -> None:
    """Move the weights of ``path`` into ``path.data`` (one file), the layout onnxruntime and TensorRT read."""
    import onnx
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def _check_file(path: Path) -> None:
    import onnx
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as e:
        raise OnnxExportError(f"{path}: onnx.checker rejects the exported file: {str(e).splitlines()[0]}") from e


def _cpu_session(path: Path) -> Any:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise OnnxExportError(f"{path}: onnxruntime {ort.__version__} cannot load the exported file: "
                              f"{str(e).splitlines()[0]}") from e


def _err(ref: Tensor, out: Any) -> Tuple[float, float]:
    o = torch.as_tensor(out).detach().double().cpu()  # numpy output or a tensor on the model's device
    r = ref.detach().double().cpu()
    if o.shape != r.shape:
        raise OnnxExportError(f"exported graph returns shape {list(o.shape)} where eager gives {list(r.shape)}")
    d = float((o - r).abs().max()) if r.numel() else 0.0
    peak = float(r.abs().max()) if r.numel() else 0.0
    return d, d / peak if peak > 0 else d


def _merge(errs: Iterable[Tuple[float, float]]) -> Tuple[float, float]:
    errs = list(errs)
    return max(e[0] for e in errs), max(e[1] for e in errs)


def _np(t: Tensor) -> Any:
    return t.detach().cpu().contiguous().numpy()


# per-dtype limit of max |onnx - eager| / peak |eager| for the post-export check.  float32 graphs
# measure ~3e-7 (LLM, DiT) and ~1.5e-5 (HiFT) on the tiny model; float16 ones ~5e-4 (LLM, DiT) and
# up to ~4.5e-2 (HiFT phase; fp16 eager HiFT itself is far from fp32 there)
VERIFY_LIMITS = {"fp32": 1e-4, "fp16": 1e-1}


def _export_llm(lm: nn.Module, out_dir: Path, tag: str, opset: int, verify: bool, seed: int) -> List[ExportedFile]:
    cfg = lm.llm.config
    n = cfg.num_hidden_layers
    dev = lm.llm_decoder.weight.device
    dtype = lm.llm_decoder.weight.dtype
    kv_names = [f"{kind}.{i}" for i in range(n) for kind in ("key", "value")]
    present = [f"present_{k}" for k in kv_names]
    past = [f"past_{k}" for k in kv_names]
    hidden_taps = [f"hidden.{i:02d}" for i in range(1, n)]

    g = torch.Generator().manual_seed(seed)
    t0 = 7
    emb = (torch.randn(1, t0, cfg.hidden_size, generator=g) * 0.5).to(dev)
    prefill_path = out_dir / "llm.prefill.onnx"
    _export(_LLMGraph(lm, decode=False), (emb,), prefill_path, ["inputs_embeds"],
            ["logp", "hidden", *present, *hidden_taps],
            {"inputs_embeds": {1: "seq_len"}, "hidden": {1: "seq_len"},
             **{p: {2: "seq_len"} for p in present}, **{h: {1: "seq_len"} for h in hidden_taps}}, opset)
    kv_shape = (1, cfg.num_key_value_heads, t0, cfg.head_dim)
    past_args = tuple(torch.randn(kv_shape, generator=g).to(dev, dtype) for _ in past)
    decode_path = out_dir / "llm.decode.onnx"
    _export(_LLMGraph(lm, decode=True),
            (torch.tensor([5], device=dev), torch.tensor([t0], device=dev), *past_args), decode_path,
            ["token", "position", *past], ["logp", "hidden", *present],
            {**{p: {2: "past_len"} for p in past}, **{p: {2: "total_len"} for p in present}}, opset)
    files = [ExportedFile("llm.prefill", prefill_path), ExportedFile("llm.decode", decode_path)]
    for f in files:
        _check_file(f.path)
    if not verify:
        return files

    # parity: prefill a random prompt, then three decode steps, against the eager KV-cache path
    from cosytools.models.qwen2 import KVCache
    sp, sd = _cpu_session(prefill_path), _cpu_session(decode_path)
    t = 11
    x = (torch.randn(1, t, cfg.hidden_size, generator=g) * 0.5).to(dev, dtype)
    toks = torch.randint(0, lm.speech_token_size, (3,), generator=g).tolist()
    with torch.inference_mode():
        cache = KVCache(cfg, t + len(toks) + 1, 1, dev, dtype)
        ref_logp, ref_h = lm.prefill(x, cache)
        res = dict(zip([o.name for o in sp.get_outputs()], sp.run(None, {"inputs_embeds": _np(x.float())})))
        e_pre = {"logp": [_err(ref_logp[None], res["logp"])], "hidden": [_err(ref_h[None], res["hidden"][:, -1])],
                 "present_kv": [_err(c[i][:, :, :t], res[f"present_{kind}.{i}"])
                                for i in range(n) for kind, c in (("key", cache.k), ("value", cache.v))]}
        kv = {f"past_{k}": res[f"present_{k}"] for k in kv_names}
        e_dec: Dict[str, List[Tuple[float, float]]] = {"logp": [], "hidden": []}
        for j, tok in enumerate(toks):
            ref_logp, ref_h = lm.step(tok, cache)
            feed = {"token": torch.tensor([tok]).numpy(), "position": torch.tensor([t + j]).numpy(), **kv}
            r2 = dict(zip([o.name for o in sd.get_outputs()], sd.run(None, feed)))
            e_dec["logp"].append(_err(ref_logp[None], r2["logp"]))
            e_dec["hidden"].append(_err(ref_h[None], r2["hidden"]))
            kv = {f"past_{k}": r2[f"present_{k}"] for k in kv_names}
    files[0].record(e_pre, f"logp, last hidden, KV of a random {t}-position prompt")
    files[1].record(e_dec, f"logp and hidden of {len(toks)} KV-cached steps after that prompt")
    return files


def _export_flow(flow: nn.Module, out_dir: Path, tag: str, opset: int, verify: bool, seed: int) -> List[ExportedFile]:
    dit = flow.decoder.estimator
    mel = dit.proj_out.out_features
    spk = flow.spk_embed_affine_layer.out_features
    dev = dit.proj_out.weight.device
    g = torch.Generator().manual_seed(seed)

    def dummy(length: int) -> Tuple[Tensor, ...]:
        # upstream's get_dummy_input: uniform [0, 1) tensors, all-ones mask, batch 2
        return tuple(v.to(dev) for v in (torch.rand(2, mel, length, generator=g), torch.ones(2, 1, length),
                                          torch.rand(2, mel, length, generator=g), torch.rand(2, generator=g),
                                          torch.rand(2, spk, generator=g), torch.rand(2, mel, length, generator=g)))

    files = []
    for streaming in (False, True):
        path = out_dir / estimator_file_name(tag, streaming)
        graph = _EstimatorGraph(dit, streaming)
        _export(graph, dummy(64), path, ESTIMATOR_INPUT_NAMES, ESTIMATOR_OUTPUT_NAMES,
                ESTIMATOR_DYNAMIC_AXES, opset)
        _pin_estimator_shapes(path, mel, spk)
        _check_file(path)
        check_estimator_contract(path, mel_dim=mel, spk_dim=spk)
        f = ExportedFile("flow.estimator.streaming" if streaming else "flow.estimator", path)
        if verify:
            sess = _cpu_session(path)
            errs: List[Tuple[float, float]] = []
            # lengths across the 50-frame chunk boundary; the last frames masked out in one case
            for length in (37, 131):
                args = dummy(length)
                if length == 131:
                    args[1][:, :, -5:] = 0
                with torch.inference_mode():
                    ref = graph(*args)
                out = sess.run(None, dict(zip(ESTIMATOR_INPUT_NAMES, (_np(a.float()) for a in args))))[0]
                errs.append(_err(ref, out))
            f.record({"estimator_out": errs}, "estimator_out on upstream-style random inputs, seq_len 37 and 131")
        files.append(f)
    return files


def _export_hift(hift: nn.Module, out_dir: Path, tag: str, opset: int, verify: bool, seed: int) -> List[ExportedFile]:
    names = _hift_tap_names(hift)
    dev = hift.conv_pre.weight.device
    r = hift.conv_pre_look_right
    nb = hift.n_fft // 2 + 1
    g = torch.Generator().manual_seed(seed)
    frames = 12
    f = hift.upsample_prod * (frames + r) + 1
    args = (torch.randn(1, hift.conv_pre.in_channels, frames + r, generator=g).to(dev),
            torch.randn(1, nb, f, generator=g).to(dev), torch.randn(1, nb, f, generator=g).to(dev))
    path = out_dir / "hift.onnx"
    outs = ["magnitude", "phase", *[f"tap.{n}" for n in names]]
    dyn = {"mel": {2: "frames"}, "s_stft_real": {2: "stft_frames"}, "s_stft_imag": {2: "stft_frames"},
           **{o: {2: f"{o}_len"} for o in outs}}
    _export(_HiftGraph(hift, names), args, path, ["mel", "s_stft_real", "s_stft_imag"], outs, dyn, opset)
    _check_file(path)
    out = ExportedFile("hift", path)
    if not verify:
        return [out]
    # parity: the whole vocoder call, eager vs the same call with the ONNX body, both finalize modes
    sess = _cpu_session(path)
    errs: Dict[str, List[Tuple[float, float]]] = {"magnitude": [], "phase": [], "speech": []}
    with torch.inference_mode():
        for finalize in (True, False):
            mel = (torch.randn(1, hift.conv_pre.in_channels, 24, generator=g) * 1.5 - 4.0).to(dev)
            ref_speech, _ = hift.inference(mel, finalize=finalize)
            mel_d, s = hift.source_excitation(mel, finalize=finalize)
            s_real, s_imag = hift._stft(s.squeeze(1).float())
            mel_x, s_real, s_imag = hift_graph_inputs(hift, mel_d, s_real, s_imag, finalize)
            mag, ph = sess.run(["magnitude", "phase"], {"mel": _np(mel_x.float()), "s_stft_real": _np(s_real),
                                                       "s_stft_imag": _np(s_imag)})
            ref_mag, ref_ph = hift.decode_body(mel_d.to(hift.dtype), *hift._stft(s.squeeze(1).float()), finalize=finalize)
            errs["magnitude"].append(_err(ref_mag, mag))
            errs["phase"].append(_err(ref_ph, ph))
            wav = hift._istft(torch.from_numpy(mag).to(dev), torch.from_numpy(ph).to(dev))
            if not finalize:
                wav = wav[:, :wav.shape[1] - hift.upsample_scale]
            errs["speech"].append(_err(ref_speech, torch.clamp(wav, -hift.audio_limit, hift.audio_limit)))
    out.record(errs, "magnitude, phase and waveform of a random 24-frame mel, finalize true and false")
    return [out]


def hift_graph_inputs(hift: nn.Module, mel: Tensor, s_real: Tensor, s_imag: Tensor,
                      finalize: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The ``hift.onnx`` inputs for one ``decode`` call: at the end of a stream (``finalize``) the
    mel gets R zero frames of right context and the STFT R·upsample_prod frames the graph drops."""
    if finalize:
        r = hift.conv_pre_look_right
        mel = F.pad(mel, (0, r))
        extra = hift.upsample_prod * r
        s_real, s_imag = F.pad(s_real, (0, extra)), F.pad(s_imag, (0, extra))
    return mel, s_real.contiguous(), s_imag.contiguous()


_EXPORTERS: Dict[str, Callable[..., List[ExportedFile]]] = {"llm": _export_llm, "flow": _export_flow, "hift": _export_hift}


def export_stage(module: nn.Module, stage: str, out_dir: Union[str, Path], dtype: Union[str, torch.dtype] = "fp32",
                 opset: int = DEFAULT_OPSET, verify: bool = True, seed: int = 0) -> List[ExportedFile]:
    """Export one loaded stage module (``llm``/``flow``/``hift``, in ``dtype``) into ``out_dir``;
    with ``verify`` each file is run against the module on seeded random inputs."""
    if stage not in _EXPORTERS:
        raise OnnxExportError(f"unknown stage {stage!r}; use {', '.join(STAGES)}")
    _check_opset(opset)
    tag = _dtype_tag(dtype)
    files = _EXPORTERS[stage](module, Path(out_dir), tag, opset, verify, seed)
    if verify:
        limit = VERIFY_LIMITS[tag]
        for f in files:
            if not f.max_rel <= limit:
                raise OnnxExportError(f"{f.path}: the exported graph differs from eager by {f.max_abs:.3g} "
                                      f"({f.max_rel:.3g} of the peak; limit {limit:g}) on {f.checked}")
    return files


def _check_opset(opset: int) -> None:
    hi = max_opset()
    if not MIN_OPSET <= int(opset) <= hi:
        raise OnnxExportError(f"opset {opset} is not supported: torch's TorchScript exporter with onnx "
                              f"installed here writes opsets {MIN_OPSET}..{hi}")


def read_manifest(folder: Union[str, Path]) -> Dict[str, Any]:
    """The ``cosytools-onnx.json`` of an export dir (``{}`` when there is none)."""
    p = Path(folder) / MANIFEST
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise OnnxError(f"{p}: unreadable manifest ({e})") from None


def write_manifest(folder: Union[str, Path], files: Sequence[ExportedFile], info: Dict[str, Any]) -> Path:
    """Add ``files`` to the manifest of ``folder`` (roles already there are replaced)."""
    folder = Path(folder)
    m = read_manifest(folder) or {"format": f"cosytools-onnx/{EXPORT_FORMAT}"}
    m.update(info)
    entries = {e["role"]: e for e in m.get("files", [])}
    for f in files:
        entries[f.role] = f.to_dict()
    m["files"] = list(entries.values())
    p = folder / MANIFEST
    p.write_text(json.dumps(m, indent=2), encoding="utf-8")
    return p


def _versions() -> Dict[str, str]:
    import onnx
    out = {"torch": torch.__version__, "onnx": onnx.__version__}
    import onnxruntime as ort  # a dependency of cosytools

    out["onnxruntime"] = ort.__version__
    return out


def export_model(model: Any, out_dir: Union[str, Path], stages: Sequence[str] = STAGES, opset: int = DEFAULT_OPSET,
                 verify: bool = True, seed: int = 0) -> List[ExportedFile]:
    """Export the given stages of a loaded :class:`~cosytools.loading.CosyVoice3Model` (its dtype)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = _dtype_tag(model.dtype)
    files: List[ExportedFile] = []
    for stage in stages:
        module = getattr(model, stage, None)
        if module is None:
            raise OnnxExportError(f"the {stage} stage is not loaded; cannot export it")
        t = time.perf_counter()
        files += export_stage(module, stage, out_dir, tag, opset, verify, seed)
        log.info("exported %s in %.1f s", stage, time.perf_counter() - t)
    write_manifest(out_dir, files, {"dtype": tag, "opset": int(opset),
                                    "model": str(Path(model.model_dir).resolve()) if model.model_dir else None,
                                    "weights": dict(model.files), "versions": _versions()})
    return files


def export_onnx(model_dir: Union[str, Path], out_dir: Union[str, Path], dtype: str = "fp32", opset: int = DEFAULT_OPSET,
                stages: Sequence[str] = STAGES, verify: bool = True) -> Dict[str, Path]:
    """Load ``model_dir`` on CPU and export ``stages`` to ``out_dir``; returns role -> file.

    Roles: ``llm.prefill``, ``llm.decode``, ``flow.estimator`` (upstream's contract),
    ``flow.estimator.streaming``, ``hift``.  Raises :class:`OnnxExportError` when a file fails
    the checker or the parity check against eager.
    """
    from cosytools.loading import load_model
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise OnnxExportError(f"unknown stage(s) {', '.join(bad) or '(none given)'}; use {', '.join(STAGES)}")
    _check_opset(opset)
    tag = _dtype_tag(dtype)
    model = load_model(model_dir, components=tuple(stages), device="cpu", dtype=_DTYPES[tag])
    files = export_model(model, out_dir, stages, opset, verify)
    return {f.role: f.path for f in files}


# ------------------------------------------------------------------------------------------ contract


def _dims(value_info: Any) -> List[Union[int, str, None]]:
    shape = value_info.type.tensor_type.shape
    out: List[Union[int, str, None]] = []
    for d in shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def estimator_contract(mel_dim: int = 80, spk_dim: int = 80) -> Dict[str, Tuple[str, Tuple[Union[int, str], ...]]]:
    """name -> (dtype, shape) of upstream's estimator export (``seq_len`` = the dynamic axis)."""
    return {"x": ("float32", (2, mel_dim, "seq_len")), "mask": ("float32", (2, 1, "seq_len")),
            "mu": ("float32", (2, mel_dim, "seq_len")), "t": ("float32", (2,)),
            "spks": ("float32", (2, spk_dim)), "cond": ("float32", (2, mel_dim, "seq_len")),
            "estimator_out": ("float32", (2, mel_dim, "seq_len"))}


def check_estimator_contract(path: Union[str, Path], mel_dim: int = 80, spk_dim: int = 80) -> None:
    """Raise :class:`OnnxContractError` (naming ``path`` and the mismatch) unless the ONNX file has
    upstream's estimator interface: inputs x, mask, mu, t, spks, cond (that order), output
    estimator_out, float32, the shapes above with a dynamic (symbolic) time axis."""
    import onnx
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise OnnxContractError(f"{path}: not a readable ONNX file ({str(e).splitlines()[0]})") from None
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    outputs = list(model.graph.output)
    want = estimator_contract(mel_dim, spk_dim)
    got_in = [i.name for i in inputs]
    got_out = [o.name for o in outputs]
    hint = ("expected upstream's flow estimator interface (cosyvoice/bin/export_onnx.py): inputs "
            f"{', '.join(ESTIMATOR_INPUT_NAMES)} -> output {', '.join(ESTIMATOR_OUTPUT_NAMES)}")
    if tuple(got_in) != ESTIMATOR_INPUT_NAMES:
        raise OnnxContractError(f"{path}: inputs are {got_in or '(none)'}; {hint}")
    if tuple(got_out) != ESTIMATOR_OUTPUT_NAMES:
        raise OnnxContractError(f"{path}: outputs are {got_out or '(none)'}; {hint}")
    for vi in inputs + outputs:
        dtype, shape = want[vi.name]
        et = vi.type.tensor_type.elem_type
        name = onnx.helper.tensor_dtype_to_np_dtype(et).name if et else "undefined"
        if name != dtype:
            raise OnnxContractError(f"{path}: {vi.name} is {name}, expected {dtype} ({hint})")
        dims = _dims(vi)
        if len(dims) != len(shape):
            raise OnnxContractError(f"{path}: {vi.name} has rank {len(dims)} {dims}, expected {list(shape)}")
        for axis, (d, w) in enumerate(zip(dims, shape)):
            if isinstance(w, str):
                if isinstance(d, int):
                    raise OnnxContractError(f"{path}: {vi.name} axis {axis} (time) is fixed at {d}; the estimator "
                                            f"needs a dynamic time axis, expected {list(shape)}")
            elif isinstance(d, int) and d != w:
                raise OnnxContractError(f"{path}: {vi.name} has shape {dims}, expected {list(shape)} "
                                        f"(axis {axis}: {d} != {w})")


# ------------------------------------------------------------------------------------------ CLI


@click.command("onnx", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_dir", required=True,
              help="Model dir (upstream layout), or 'tiny' / 'full' for a built-in random-weight model.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder to write the ONNX files (and cosytools-onnx.json) into.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Weights and compute dtype of the graphs (estimator inputs stay float32).")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ONNX opset (14..20).")
@click.option("--stage", "stages", type=click.Choice(list(STAGES)), multiple=True,
              help="Export only this stage (repeatable; default: all).")
@click.option("--no-verify", is_flag=True, help="Skip the parity check against eager (not recommended).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def onnx_command(model_dir: str, out_dir: str, dtype: str, opset: int, stages: Tuple[str, ...], no_verify: bool,
                 as_json: bool) -> None:
    """Export the LLM (prefill + decode with explicit KV cache), the flow estimator (upstream's
    flow.decoder.estimator.fp32.onnx interface) and the HiFT vocoder body to ONNX.

    Every file is checked with onnx.checker and run with onnxruntime against the eager model on
    seeded random inputs; the command prints the max abs error per file and fails (exit 2) when
    a file does not reproduce eager.  The F0 predictor, the NSF source and the (i)STFTs of HiFT
    stay in torch (see `cosytools.onnx_export`).

    \b
    Example:
      cosytools export onnx --model ./cv3 -o ./cv3-onnx
      cosytools export onnx --model tiny -o /tmp/tiny-onnx --stage flow --opset 18
      cosytools synth "Hi" --backend onnx      # the onnx backend exports into its cache itself
    """
    t = time.perf_counter()
    sel = tuple(stages) or STAGES
    _check_opset(opset)
    from cosytools.loading import load_model

    model = load_model(model_dir, components=sel, device="cpu", dtype=_DTYPES[dtype])
    files: List[ExportedFile] = []
    for stage in sel:
        if not as_json:
            click.echo(f"exporting {stage} ...", err=True)
        files += export_stage(getattr(model, stage), stage, out_dir, dtype, opset, verify=not no_verify)
    write_manifest(out_dir, files, {"dtype": dtype, "opset": int(opset), "model": str(Path(model.model_dir).resolve()),
                                    "weights": dict(model.files), "versions": _versions()})
    took = time.perf_counter() - t
    if as_json:
        click.echo(json.dumps({"output": str(out_dir), "dtype": dtype, "opset": opset, "seconds": round(took, 2),
                               "files": [f.to_dict() for f in files]}, indent=2))
        return
    for f in files:
        if no_verify:
            err = "not verified"
        else:
            err = "max abs err vs eager: " + ", ".join(f"{k} {v[0]:.2e} (rel {v[1]:.1e})"
                                                       for k, v in (f.details or {}).items())
        click.echo(f"  {f.path.name:<44s} {_file_bytes(f.path) / 1e6:8.1f} MB  {err}")
    click.echo(f"wrote {len(files)} files to {out_dir} in {took:.1f} s")
