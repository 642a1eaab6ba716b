"""The ``onnx`` backend: the model stages exported to ONNX and run with onnxruntime.

What runs where (see :mod:`cosytools.onnx_export` for the files):

* **LLM** — onnxruntime: the Qwen2 trunk, the speech-token embedding of each fed-back token,
  ``llm_decoder`` and the log-softmax (``llm.prefill.onnx`` once per call, then
  ``llm.decode.onnx`` per token with the KV cache passed as tensors).  Torch: the prompt
  embeddings (``build_lm_input``: text embedding, sos/task ids, the ``<|endofprompt|>`` check)
  and RAS sampling with the model's length and stop rules, so tokens match eager on a seed.
* **flow** — onnxruntime: the DiT estimator (``flow.decoder.estimator.fp32.onnx``, upstream's
  interface; streaming calls use ``flow.decoder.estimator.streaming.fp32.onnx``).  Torch: token
  embedding, pre-lookahead layer, speaker projection, the fixed start noise and the 10-step
  Euler loop with classifier-free guidance around the estimator session.
* **hift** — onnxruntime: the convolution stack (``hift.onnx``: conv_pre … conv_post,
  magnitude, phase).  Torch: the float64 F0 predictor (onnxruntime has no float64 Conv), the
  NSF source, the source STFT and the iSTFT (no ONNX operator).

Files come from ``onnx_dir=`` (a folder written by ``cosytools export onnx``; also
``$COSYTOOLS_ONNX_DIR``), else the backend exports the loaded modules on first use into
``$COSYTOOLS_CACHE/onnx/`` (key: model dir, weight/config file sizes and mtimes, dtype, opset,
exporter version) and reuses them afterwards.  A model dir that contains upstream's
``flow.decoder.estimator.fp32.onnx`` (real CosyVoice3 releases ship it) has that file used for
the non-streaming estimator (``estimator='auto'``, unless ``onnx_dir`` holds its own estimator;
``'export'`` ignores it; a path selects that file); its inputs and outputs are checked against
upstream's contract first, and a mismatch is an error naming the file.

Options (``backends.create("onnx", model, **options)``):
``onnx_dir``; ``estimator`` (``auto``/``export``/path); ``intra_op_threads`` (int, 0 = onnxruntime's
default; ``$COSYTOOLS_ORT_THREADS``); ``providers`` (list or comma string, e.g.
``"CUDAExecutionProvider"``; ``$COSYTOOLS_ORT_PROVIDERS``; default: CUDA when the model is on a GPU
and onnxruntime has the CUDA provider — with IO binding, so tensors stay on the device — else
CPU); ``graph_optimization`` (``all``/``extended``/``basic``/``disable``); ``opset`` (export opset);
``verify_export`` (check fresh exports against eager, default true); ``io_binding`` (default: on
with the CUDA provider on a CUDA device; ``true`` binds CPU tensors as well — the same code path).

Sessions are created once per stage and reused.  Taps: LLM prefill (``lm_input``,
``hidden.NN``, ``final_hidden``, ``step_hidden``), flow (``mu``, ``cond``, ``spk_proj`` … from torch;
per step ``stepNN.dit.in.*``, ``stepNN.dit.out``, ``stepNN.x``), HiFT (``f0``, ``s_stft_*``, every
tap of the convolution stack, ``magnitude``, ``phase``, ``istft``).  The DiT's internal taps
(blocks, time embedding) are not available from the estimator file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from cosytools import taps
from cosytools.errors import InputError
from cosytools.models.flow import euler_schedule
from cosytools.models.llm import TeacherForcedResult
from cosytools.onnx_export import (DEFAULT_OPSET, EXPORT_FORMAT, MANIFEST, OnnxContractError, OnnxError,
                                   check_estimator_contract, estimator_file_name, export_stage,
                                   hift_graph_inputs, read_manifest, write_manifest)
from cosytools.taps import paused, tap

from .base import Backend, LLMSession, as_ids

__all__ = ["OnnxBackend", "OrtSession", "UPSTREAM_ESTIMATOR"]

log = logging.getLogger(__name__)

UPSTREAM_ESTIMATOR = "flow.decoder.estimator.fp32.onnx"

_ORT_TO_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
                 "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool}
_OPT_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
               "disable": "ORT_DISABLE_ALL"}


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise OnnxError("the onnx backend needs onnxruntime: pip install onnxruntime "
                        "(or onnxruntime-gpu for the CUDA provider)") from None
    return onnxruntime



def _file_opsets(path: Path) -> Dict[str, int]:
    try:
        import onnx
        m = onnx.load(str(path), load_external_data=False)
        return {(o.domain or "ai.onnx"): int(o.version) for o in m.opset_import}
    except Exception:  # the runtime's own message is reported then
        return {}


class OrtSession:
    """One onnxruntime session with torch tensors in and out.

    On the CUDA provider inputs and (pre-allocated) outputs are bound with IO binding, so
    nothing leaves the GPU; on the CPU provider tensors go through zero-copy numpy views.
    """

    def __init__(self, path: Path, providers: List[Any], threads: int = 0, opt_level: str = "all",
                 device: torch.device = torch.device("cpu"), io_binding: Optional[bool] = None) -> None:
        ort = _ort()
        self.path = Path(path)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[opt_level])
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        # torch runs between the session calls (Euler loop, sampling, STFTs): idle onnxruntime
        # workers must not spin on the cores torch needs (spinning made torch ops ~5x slower on 2 cores)
        so.add_session_config_entry("session.intra_op.allow_spinning", os.environ.get("COSYTOOLS_ORT_SPIN", "0"))
        if not self.path.is_file():
            raise OnnxError(f"{self.path}: no such ONNX file")
        try:
            self.sess = ort.InferenceSession(str(self.path), sess_options=so, providers=providers)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "opset" in msg.lower() or "ValidateOpsetForDomain" in msg:
                ops = ", ".join(f"{d} {v}" for d, v in _file_opsets(self.path).items()) or "unknown"
                raise OnnxError(f"{self.path}: onnxruntime {ort.__version__} cannot run this file's opset ({ops}): "
                                f"{msg}. Re-export with a lower --opset or upgrade onnxruntime.") from None
            raise OnnxError(f"{self.path}: onnxruntime {ort.__version__} cannot load this file: {msg}") from None
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.outputs = {o.name: o for o in self.sess.get_outputs()}
        self.input_names = [i.name for i in self.sess.get_inputs()]
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.provider = self.sess.get_providers()[0]
        self.device = device
        # IO binding: torch tensors handed to onnxruntime by pointer, outputs written into torch
        # tensors.  Default: with the CUDA provider on a CUDA device (nothing leaves the GPU);
        # ``io_binding=True`` also binds CPU tensors (the same code path, testable without a GPU)
        on_cuda = self.provider == "CUDAExecutionProvider" and device.type == "cuda"
        self.binding = on_cuda if io_binding is None else bool(io_binding) and (on_cuda or device.type == "cpu")

    def input_dtype(self, name: str) -> torch.dtype:
        return _ORT_TO_TORCH.get(self.inputs[name].type, torch.float32)

    def output_dtype(self, name: str) -> torch.dtype:
        return _ORT_TO_TORCH.get(self.outputs[name].type, torch.float32)

    def run(self, feeds: Dict[str, torch.Tensor], outputs: Sequence[str],
            shapes: Optional[Dict[str, Sequence[int]]] = None) -> Dict[str, torch.Tensor]:
        """Run; ``feeds`` are cast to the graph's input dtypes; results are torch tensors on the
        backend's device.  ``shapes`` (output -> shape) lets IO binding pre-allocate outputs."""
        feeds = {k: v.to(self.input_dtype(k)) for k, v in feeds.items()}
        if self.binding:
            return self._run_bound(feeds, outputs, shapes or {})
        arrays = {k: v.detach().to("cpu").contiguous().numpy() for k, v in feeds.items()}
        res = self.sess.run(list(outputs), arrays)
        out = {k: torch.from_numpy(r) for k, r in zip(outputs, res)}
        if self.device.type != "cpu":
            out = {k: v.to(self.device) for k, v in out.items()}
        return out

    def _run_bound(self, feeds: Dict[str, torch.Tensor], outputs: Sequence[str],
                   shapes: Dict[str, Sequence[int]]) -> Dict[str, torch.Tensor]:
        import numpy as np
        cuda = self.device.type == "cuda"
        kind = "cuda" if cuda else "cpu"
        dev_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if cuda else 0
        io = self.sess.io_binding()
        keep = []
        for k, v in feeds.items():
            v = v.to(self.device).contiguous()
            keep.append(v)
            io.bind_input(k, kind, dev_id, _np_dtype(v.dtype), list(v.shape), v.data_ptr())
        out: Dict[str, torch.Tensor] = {}
        for k in outputs:
            if k in shapes:
                t = torch.empty(tuple(shapes[k]), dtype=self.output_dtype(k), device=self.device)
                io.bind_output(k, kind, dev_id, _np_dtype(t.dtype), list(t.shape), t.data_ptr())
                out[k] = t
            else:
                io.bind_output(k, kind, dev_id)
        if cuda:
            torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch must be complete
        io.synchronize_inputs()
        self.sess.run_with_iobinding(io)
        io.synchronize_outputs()
        if len(out) < len(outputs):
            got = io.get_outputs()
            for k, v in zip(outputs, got):
                if k not in out:  # shape unknown beforehand: onnxruntime allocated it; one copy
                    out[k] = torch.from_numpy(np.asarray(v.numpy())).to(self.device)
        del keep
        return out


def _np_dtype(dt: torch.dtype) -> Any:
    import numpy as np
    return {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
            torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_}[dt]


class _OrtLLMSession(LLMSession):
    def __init__(self, backend: "OnnxBackend", lm_input: torch.Tensor) -> None:
        self.backend = backend
        res = backend._llm_prefill(lm_input)
        n = backend.model.llm.llm.config.num_hidden_layers
        self.kv = [res[f"present_{kind}.{i}"] for i in range(n) for kind in ("key", "value")]
        self.length = lm_input.shape[1]
        self.logp = res["logp"][0]
        self.hidden = res["hidden"][0, -1]

    def step(self, token: int) -> torch.Tensor:
        res = self.backend._llm_decode(int(token), self.length, self.kv)
        n = len(self.kv) // 2
        self.kv = [res[f"present_{kind}.{i}"] for i in range(n) for kind in ("key", "value")]
        self.length += 1
        self.logp = res["logp"][0]
        self.hidden = res["hidden"][0]
        return self.logp


# roles each stage needs, and the file that holds each role in an export dir
_STAGE_ROLES = {"llm": ("llm.prefill", "llm.decode"), "flow": ("flow.estimator", "flow.estimator.streaming"),
                "hift": ("hift",)}


def _role_file(role: str, tag: str) -> str:
    return {"llm.prefill": "llm.prefill.onnx", "llm.decode": "llm.decode.onnx", "hift": "hift.onnx",
            "flow.estimator": estimator_file_name(tag), "flow.estimator.streaming": estimator_file_name(tag, True)}[role]


class OnnxBackend(Backend):
    """Stages exported to ONNX, run with onnxruntime (CPU, or CUDA with IO binding)."""

    name = "onnx"

    def __init__(self, model: Any, **options: Any) -> None:
        super().__init__(model, **options)
        if self.dtype not in (torch.float32, torch.float16):
            raise InputError(f"the onnx backend runs float32 or float16 models, not {self.dtype}; "
                             "load the model with --dtype float32 (or fp16)")
        self._ort = _ort()
        env_dir = os.environ.get("COSYTOOLS_ONNX_DIR")
        d = options.get("onnx_dir", env_dir)
        self.onnx_dir: Optional[Path] = Path(d) if d else None
        if self.onnx_dir is not None and not self.onnx_dir.is_dir():
            raise OnnxError(f"onnx_dir {self.onnx_dir} is not a folder (write one with `cosytools export onnx`)")
        self.estimator_choice = str(options.get("estimator", "auto"))
        self.threads = int(options.get("intra_op_threads", os.environ.get("COSYTOOLS_ORT_THREADS", 0)) or 0)
        self.opt_level = str(options.get("graph_optimization", "all"))
        if self.opt_level not in _OPT_LEVELS:
            raise InputError(f"graph_optimization must be one of {', '.join(_OPT_LEVELS)}, got {self.opt_level!r}")
        self.opset = int(options.get("opset", DEFAULT_OPSET))
        self.verify_export = bool(options.get("verify_export", True))
        self.providers = self._select_providers(options.get("providers", os.environ.get("COSYTOOLS_ORT_PROVIDERS")))
        ib = options.get("io_binding")
        self.io_binding: Optional[bool] = None if ib is None else bool(ib)
        self._sessions: Dict[str, OrtSession] = {}
        self._files: Dict[str, Path] = {}
        self._warned_stream_fallback = False
        self._hift_taps: Optional[List[str]] = None

    # -- setup -------------------------------------------------------------------------------
    def _select_providers(self, requested: Any) -> List[Any]:
        avail = list(self._ort.get_available_providers())
        if requested:
            req = [p.strip() for p in requested.split(",")] if isinstance(requested, str) else list(requested)
            missing = [p for p in req if p not in avail]
            if missing:
                hint = (" (the CUDA provider comes with the onnxruntime-gpu package, installed instead of onnxruntime)"
                        if any("CUDA" in p or "Tensorrt" in p for p in missing) else "")
                raise OnnxError(f"onnxruntime {self._ort.__version__} has no {', '.join(missing)} here; "
                                f"available providers: {', '.join(avail)}{hint}")
            return req
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" in avail:
                idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
                # TF32 off: torch's float32 matmuls (the parity reference) do not use it either
                return [("CUDAExecutionProvider", {"device_id": idx, "use_tf32": 0}), "CPUExecutionProvider"]
            log.warning("the model is on %s but onnxruntime %s has no CUDAExecutionProvider (available: %s); "
                        "the ONNX graphs run on the CPU provider (install onnxruntime-gpu for CUDA)",
                        self.device, self._ort.__version__, ", ".join(avail))
        return ["CPUExecutionProvider"]

    def describe(self) -> Dict[str, Any]:
        d = super().describe()
        d["providers"] = ",".join(p[0] if isinstance(p, tuple) else p for p in self.providers)
        d["onnxruntime"] = self._ort.__version__
        if self.onnx_dir is not None:
            d["onnx_dir"] = str(self.onnx_dir)
        if "flow.estimator" in self._files:
            d["estimator_file"] = str(self._files["flow.estimator"])
        return d

    def _cache_dir(self, stage: str) -> Path:
        """Export cache folder of one stage: keyed by what the exported graph depends on."""
        from cosytools.loading import default_cache_dir
        model_dir = self.model.model_dir
        key: Dict[str, Any] = {"format": EXPORT_FORMAT, "stage": stage, "dtype": str(self.dtype), "opset": self.opset,
                               "torch": torch.__version__, "model_dir": str(Path(model_dir).resolve()) if model_dir else None}
        files = [self.model.files.get(stage)]
        if model_dir is not None:
            files += [Path(model_dir) / "cosyvoice3.yaml", Path(model_dir) / "CosyVoice-BlankEN" / "config.json"]
        for f in files:
            if f and Path(f).is_file():
                st = Path(f).stat()
                key[str(Path(f).resolve())] = [st.st_size, st.st_mtime_ns]
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        name = Path(model_dir).name if model_dir else "model"
        return default_cache_dir() / "onnx" / f"{name}-{stage}-{digest}"

    def _stage_files(self, stage: str) -> Dict[str, Path]:
        """role -> ONNX file for ``stage``: from ``onnx_dir``, or the export cache (exporting on a miss)."""
        roles = _STAGE_ROLES[stage]
        tag = "fp16" if self.dtype == torch.float16 else "fp32"
        override = self._estimator_override() if stage == "flow" else None  # checked before any export
        if self.onnx_dir is not None:
            folder = self.onnx_dir
            tag = read_manifest(folder).get("dtype", tag)
            found = {r: folder / _role_file(r, tag) for r in roles}
            if stage == "flow":
                explicit = self.estimator_choice != "auto"
                if override is not None and (explicit or not found["flow.estimator"].is_file()):
                    found["flow.estimator"] = override
                if not found["flow.estimator.streaming"].is_file():
                    found.pop("flow.estimator.streaming")  # optional: streaming calls fall back to torch
            missing = [str(p) for p in found.values() if not p.is_file()]
            if missing:
                raise OnnxError(f"{folder}: the {stage} stage needs {', '.join(missing)}, which is missing; "
                                f"write it with `cosytools export onnx --model {self.model.model_dir} -o {folder}`")
            return found
        folder = self._cache_dir(stage)
        found = {r: folder / _role_file(r, tag) for r in roles}
        if not ((folder / MANIFEST).is_file() and all(p.is_file() for p in found.values())):
            self._export_to(stage, folder, tag)
        if override is not None:
            found["flow.estimator"] = override
        return found

    def _export_to(self, stage: str, folder: Path, tag: str) -> None:
        """Export ``stage`` into ``folder`` atomically (a temp folder renamed into place)."""
        module = self._need(stage)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            log.info("exporting the %s stage to ONNX (first use) in %s", stage, folder)
            exported = export_stage(module, stage, tmp, tag, self.opset, verify=self.verify_export)
            write_manifest(tmp, exported, {"dtype": tag, "opset": self.opset, "model": str(self.model.model_dir),
                                           "weights": dict(self.model.files)})
            if folder.exists():  # an incomplete earlier attempt
                shutil.rmtree(folder, ignore_errors=True)
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished the same export first: use theirs
                if not (folder / MANIFEST).is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _estimator_override(self) -> Optional[Path]:
        """The estimator file to use instead of cosytools' own export (contract-checked), or None."""
        choice = self.estimator_choice
        if choice == "export":
            return None
        if choice != "auto":
            p = Path(choice)
            if not p.is_file():
                raise OnnxError(f"estimator file {p} does not exist")
        else:
            if self.model.model_dir is None:
                return None
            p = Path(self.model.model_dir) / UPSTREAM_ESTIMATOR
            if not p.is_file():
                return None
        flow = self._need("flow")
        check_estimator_contract(p, mel_dim=flow.decoder.estimator.proj_out.out_features,
                                 spk_dim=flow.spk_embed_affine_layer.out_features)
        log.info("flow estimator: using %s", p)
        return p

    def _session(self, role: str) -> OrtSession:
        if role in self._sessions:
            return self._sessions[role]
        stage = role.split(".")[0]
        if not any(r.startswith(stage) for r in self._files):
            self._files.update(self._stage_files(stage))
        if role not in self._files:
            raise OnnxError(f"no ONNX file for {role}")
        sess = OrtSession(self._files[role], self.providers, self.threads, self.opt_level, self.device,
                          io_binding=self.io_binding)
        self._check_io(role, sess)
        self._sessions[role] = sess
        return sess

    def _check_io(self, role: str, s: OrtSession) -> None:
        """Inputs/outputs of a loaded file against what this model needs (wrong-model files fail here)."""
        def fail(what: str) -> None:
            raise OnnxContractError(f"{s.path}: {what}; was it exported from another model? Re-export it with "
                                    f"`cosytools export onnx --model {self.model.model_dir} -o DIR`")

        def dims(name: str, outs: bool = False) -> list:
            return list((s.outputs if outs else s.inputs)[name].shape)

        if role.startswith("flow."):
            flow = self._need("flow")
            check_estimator_contract(s.path, mel_dim=flow.decoder.estimator.proj_out.out_features,
                                     spk_dim=flow.spk_embed_affine_layer.out_features)
            return
        if role == "hift":
            hift = self._need("hift")
            want = ["mel", "s_stft_real", "s_stft_imag"]
            if s.input_names != want or s.output_names[:2] != ["magnitude", "phase"]:
                fail(f"inputs {s.input_names} -> outputs {s.output_names[:2]}..., expected {want} -> "
                     "['magnitude', 'phase', ...]")
            nb = hift.n_fft // 2 + 1
            if dims("mel")[1] != hift.conv_pre.in_channels or dims("s_stft_real")[1] != nb:
                fail(f"mel {dims('mel')} / s_stft_real {dims('s_stft_real')}, the model needs "
                     f"[1, {hift.conv_pre.in_channels}, T] / [1, {nb}, F]")
            return
        lm = self._need("llm")
        cfg = lm.llm.config
        n = cfg.num_hidden_layers
        kv = [f"{k}.{i}" for i in range(n) for k in ("key", "value")]
        if role == "llm.prefill":
            if s.input_names != ["inputs_embeds"] or s.output_names[:2 + 2 * n] != ["logp", "hidden"] + [
                    f"present_{k}" for k in kv]:
                fail(f"inputs {s.input_names} -> outputs {s.output_names[:4]}..., expected ['inputs_embeds'] -> "
                     f"['logp', 'hidden', present_key.0 … present_value.{n - 1}]")
            if dims("inputs_embeds")[-1] != cfg.hidden_size:
                fail(f"inputs_embeds is {dims('inputs_embeds')}, the model's hidden size is {cfg.hidden_size}")
        else:
            want = ["token", "position"] + [f"past_{k}" for k in kv]
            if s.input_names != want:
                fail(f"inputs {s.input_names[:4]}... ({len(s.input_names)}), expected token, position, "
                     f"past_key.0 … past_value.{n - 1} ({len(want)})")
            if dims("past_key.0")[1] != cfg.num_key_value_heads or dims("past_key.0")[3] != cfg.head_dim:
                fail(f"past_key.0 is {dims('past_key.0')}, the model needs [1, {cfg.num_key_value_heads}, P, "
                     f"{cfg.head_dim}]")
        v = dims("logp", outs=True)[-1]
        if v != lm.speech_token_size + 200:
            fail(f"logp has {v} ids, the model {lm.speech_token_size + 200}")

    def warmup(self) -> None:
        """Export (first use) and open the sessions of every loaded stage (the streaming estimator
        stays lazy: it is a second copy of the DiT weights, needed only by streaming calls)."""
        for stage, roles in _STAGE_ROLES.items():
            if getattr(self.model, stage) is not None:
                for r in roles:
                    if r != "flow.estimator.streaming":
                        self._session(r)

    # -- LLM --------------------------------------------------------------------------------
    def _llm_prefill(self, lm_input: torch.Tensor) -> Dict[str, torch.Tensor]:
        s = self._session("llm.prefill")
        cfg = self.model.llm.llm.config
        n = cfg.num_hidden_layers
        t = lm_input.shape[1]
        extra = [f"hidden.{i:02d}" for i in range(1, n)] if taps.enabled() else []
        kvs = (1, cfg.num_key_value_heads, t, cfg.head_dim)
        shapes = {"logp": (1, self.model.llm.speech_token_size + 200), "hidden": (1, t, cfg.hidden_size),
                  **{f"present_{k}.{i}": kvs for i in range(n) for k in ("key", "value")},
                  **{h: (1, t, cfg.hidden_size) for h in extra}}
        outs = ["logp", "hidden", *[f"present_{k}.{i}" for i in range(n) for k in ("key", "value")], *extra]
        res = s.run({"inputs_embeds": lm_input}, outs, shapes)
        if taps.enabled():
            tap("hidden.00", lm_input)
            for h in extra:
                tap(h, res[h])
            tap(f"hidden.{n:02d}", res["hidden"])
            tap("final_hidden", res["hidden"])
        return res

    def _llm_decode(self, token: int, position: int, kv: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        s = self._session("llm.decode")
        cfg = self.model.llm.llm.config
        n = cfg.num_hidden_layers
        names = [f"{k}.{i}" for i in range(n) for k in ("key", "value")]
        dev = self.device
        feeds = {"token": torch.tensor([token], dtype=torch.long, device=dev),
                 "position": torch.tensor([position], dtype=torch.long, device=dev),
                 **{f"past_{k}": v for k, v in zip(names, kv)}}
        kvs = (1, cfg.num_key_value_heads, position + 1, cfg.head_dim)
        shapes = {"logp": (1, self.model.llm.speech_token_size + 200), "hidden": (1, cfg.hidden_size),
                  **{f"present_{k}": kvs for k in names}}
        return s.run(feeds, ["logp", "hidden", *[f"present_{k}" for k in names]], shapes)

    @torch.inference_mode()
    def llm_session(self, text: torch.Tensor, prompt_text: torch.Tensor, prompt_speech_token: torch.Tensor,
                    max_new_tokens: int) -> LLMSession:
        return _OrtLLMSession(self, self._lm_input(text, prompt_text, prompt_speech_token))

    def llm_generate(self, text: torch.Tensor, prompt_text: torch.Tensor, prompt_speech_token: torch.Tensor, *,
                     min_len: Optional[int] = None, max_len: Optional[int] = None,
                     generator: Optional[torch.Generator] = None,
                     sampled: Optional[List[int]] = None, strict_min_len: bool = False,
                     exact: bool = False) -> Iterator[int]:
        """As ``CosyVoice3LM.inference``: same length rules, sos masking (every stop id with
        ``strict_min_len``), RAS sampling and stop rule."""
        lm = self._need("llm")
        text = as_ids(text, self.device)
        lo, hi = lm.length_limits(text.shape[1])
        min_len = lo if min_len is None else min_len
        max_len = hi if max_len is None else max_len
        with torch.inference_mode():
            sess = self.llm_session(text, prompt_text, prompt_speech_token, max_len)
        with paused(), torch.inference_mode():
            yield from lm.sampling_loop(sess.logp, sess.step, min_len, max_len, generator, sampled, strict_min_len)

    @torch.inference_mode()
    def llm_teacher_force(self, text: torch.Tensor, prompt_text: torch.Tensor, prompt_speech_token: torch.Tensor,
                          forced_tokens: Sequence[int]) -> TeacherForcedResult:
        sess = self.llm_session(text, prompt_text, prompt_speech_token, len(forced_tokens))
        rows, hiddens = [sess.logp.clone()], [sess.hidden.clone()]
        with paused():
            for t in forced_tokens:
                sess.step(int(t))
                rows.append(sess.logp.clone())
                hiddens.append(sess.hidden.clone())
        res = TeacherForcedResult(torch.stack(rows).float(), torch.stack(hiddens).float())
        tap("step_hidden", res.step_hidden)
        return res

    # -- flow ---------------------------------------------------------------------------------
    def _estimate(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, spks: torch.Tensor,
                  cond: torch.Tensor, streaming: bool, prefix: str) -> torch.Tensor:
        """One estimator call (CFG batch of 2) on the ONNX session; float32 [2, 80, L]."""
        if taps.enabled():
            for k, v in (("x", x), ("mask", mask), ("mu", mu), ("t", t), ("spks", spks), ("cond", cond)):
                tap(f"{prefix}.in.{k}", v)
        sess: Optional[OrtSession] = None
        if streaming:
            try:
                sess = self._session("flow.estimator.streaming")
            except OnnxError as e:
                if not self._warned_stream_fallback:
                    log.warning("no streaming estimator file (%s): streaming flow calls run the DiT in torch", e)
                    self._warned_stream_fallback = True
        else:
            sess = self._session("flow.estimator")
        if sess is None:
            out = self.model.flow.decoder.estimator(x, mask, mu, t, spks, cond, streaming=True).float()
        else:
            feeds = {"x": x, "mask": mask, "mu": mu, "t": t, "spks": spks, "cond": cond}
            out = sess.run(feeds, ["estimator_out"], {"estimator_out": tuple(x.shape)})["estimator_out"].float()
        if taps.enabled():
            tap(f"{prefix}.out", out)
        return out

    @torch.inference_mode()
    def flow(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
             embedding: torch.Tensor, *, streaming: bool = False, finalize: bool = True,
             noise: Optional[torch.Tensor] = None, n_timesteps: int = 10) -> torch.Tensor:
        flow = self._need("flow")
        d, dt = self.device, self.dtype
        token, prompt_token, prompt_feat, embedding = self._flow_inputs(token, prompt_token, prompt_feat, embedding)
        token_len, prompt_token_len = self._lengths(token, prompt_token)
        mu, mask, spks, cond, mel_len1 = flow.prepare_decoder_inputs(
            token, token_len, prompt_token, prompt_token_len, prompt_feat, embedding, finalize)
        dec = flow.decoder
        x = dec.initial_state(mu, None if noise is None else noise.to(d))
        t_seq, dt_seq = euler_schedule(dec.t_span(n_timesteps, device=d))
        tap("t", t_seq)
        # the CFG batch as CausalConditionalCFM.solve_euler builds it: row 0 conditional, row 1 zeros
        mask_in = torch.cat([mask, mask], dim=0).to(dt)
        mu_in = torch.cat([mu, torch.zeros_like(mu)], dim=0)
        spks_in = torch.cat([spks, torch.zeros_like(spks)], dim=0).to(dt)
        cond_in = torch.cat([cond, torch.zeros_like(cond)], dim=0).to(dt)
        cfg = dec.inference_cfg_rate
        for i in range(t_seq.shape[0]):
            x_in = torch.cat([x, x], dim=0).to(dt)
            t_in = t_seq[i].expand(2).to(dt)
            out = self._estimate(x_in, mask_in, mu_in, t_in, spks_in, cond_in, streaming, f"step{i:02d}.dit")
            dphi = (1.0 + cfg) * out[:1] - cfg * out[1:]
            x = x + dt_seq[i] * dphi
            if taps.enabled():
                tap(f"step{i:02d}.x", x)
        return x.float()[:, :, mel_len1:]

    # -- hift ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def hift(self, mel: torch.Tensor, *, finalize: bool = True,
             noise: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        hift = self._need("hift")
        d = self.device
        sess = self._session("hift")
        if noise is not None:
            noise = {k: v.to(d) for k, v in noise.items()}
        mel_d, s = hift.source_excitation(mel.to(d, torch.float32), finalize=finalize, noise=noise)
        s_real, s_imag = hift.source_stft(s)
        x, s_real, s_imag = hift_graph_inputs(hift, mel_d, s_real, s_imag, finalize)
        frames = hift.upsample_prod * (x.shape[2] - hift.conv_pre_look_right) + 1
        nb = hift.n_fft // 2 + 1
        extra = [o for o in sess.output_names[2:]] if taps.enabled() else []
        res = sess.run({"mel": x.float(), "s_stft_real": s_real, "s_stft_imag": s_imag}, ["magnitude", "phase", *extra],
                       {"magnitude": (1, nb, frames), "phase": (1, nb, frames)})
        for o in extra:
            tap(o[len("tap."):] if o.startswith("tap.") else o, res[o])
        speech = hift.synthesize(res["magnitude"], res["phase"], finalize)
        return speech.float(), s.float()
