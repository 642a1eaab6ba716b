"""The ``cosytools-dump/1`` format: one safetensors file per stage call.

Keys are ``STAGE.in.NAME`` (inputs), ``STAGE.out.NAME`` (returned values) and
``STAGE.tap.NAME`` (intermediates); the metadata (all strings) holds ``format``, ``stage``,
``producer``, ``model`` and the call's flags.  The flat layout that native-port harnesses
write (``token``, ``prompt_feat``, ``python_flow_output`` …) is read too, by mapping its keys
onto the same names; :attr:`Dump.layout` says which layout a file had.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from cosytools.errors import CosyToolsError

__all__ = ["FORMAT", "STAGES", "FLAT_KEYS", "DumpError", "Dump", "read_dump", "write_dump", "REQUIRED_INPUTS"]

FORMAT = "cosytools-dump/1"
STAGES = ("llm", "flow", "hift", "e2e", "tokenizer", "mel")

# native-port flat names -> (stage, kind, name)
FLAT_KEYS: Dict[str, Tuple[str, str, str]] = {
    "text": ("llm", "in", "text"),
    "prompt_text": ("llm", "in", "prompt_text"),
    "llm_prompt_speech_token": ("llm", "in", "prompt_speech_token"),
    "llm_embedding": ("llm", "in", "embedding"),
    "speech_tokens": ("llm", "out", "tokens"),
    "token": ("flow", "in", "token"),
    "prompt_token": ("flow", "in", "prompt_token"),
    "prompt_feat": ("flow", "in", "prompt_feat"),
    "embedding": ("flow", "in", "embedding"),
    "rand_noise": ("flow", "in", "noise"),
    "python_flow_output": ("flow", "out", "mel"),
    "python_hift_source": ("hift", "out", "source"),
    "python_audio_output": ("hift", "out", "speech"),
    "speaker_embedding": ("frontend", "out", "embedding"),
    "speech_feat": ("frontend", "out", "speech_feat"),
    "whisper_mel": ("frontend", "out", "whisper_mel"),
}

# what a stage call cannot run without (the rest has defaults)
REQUIRED_INPUTS: Dict[str, Tuple[str, ...]] = {
    "llm": ("text", "prompt_text", "prompt_speech_token"),
    "flow": ("token", "prompt_token", "prompt_feat", "embedding"),
    "hift": ("mel",),
    "e2e": ("token", "prompt_token", "prompt_feat", "embedding"),
    "tokenizer": (),
    "mel": ("wav",),
}


class DumpError(CosyToolsError):
    """A dump file that cannot be read or used."""


@dataclass
class Dump:
    """One stage call: its tensors by full key, its metadata, and where it came from."""

    stage: str
    tensors: Dict[str, torch.Tensor]
    metadata: Dict[str, str] = field(default_factory=dict)
    layout: str = FORMAT
    path: Optional[Path] = None

    def _part(self, kind: str) -> Dict[str, torch.Tensor]:
        prefix = f"{self.stage}.{kind}."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    @property
    def inputs(self) -> Dict[str, torch.Tensor]:
        return self._part("in")

    @property
    def outputs(self) -> Dict[str, torch.Tensor]:
        return self._part("out")

    @property
    def taps(self) -> Dict[str, torch.Tensor]:
        return self._part("tap")

    def flag(self, name: str, default: Any = None) -> Any:
        """A call flag from the metadata, decoded (``"true"`` -> True, JSON lists, numbers)."""
        if name not in self.metadata:
            return default
        v = self.metadata[name]
        if v in ("true", "false"):
            return v == "true"
        if v == "None":
            return None
        try:
            return json.loads(v)
        except (json.JSONDecodeError, TypeError):
            return v

    def require(self, names: Iterable[str]) -> None:
        missing = [n for n in names if n not in self.inputs]
        if missing:
            where = self.path or "<dump>"
            raise DumpError(f"{where}: the {self.stage} stage needs input(s) {', '.join(missing)} "
                            f"(keys {', '.join(f'{self.stage}.in.{m}' for m in missing)}), which the dump lacks. "
                            f"It has: {', '.join(sorted(self.inputs)) or 'no inputs'}.")

    def name(self) -> str:
        return self.path.name if self.path is not None else f"<{self.stage} dump>"


def _infer_flat_stage(keys: Iterable[str]) -> str:
    keys = set(keys)
    if "python_flow_output" in keys and ("token" in keys or "python_audio_output" not in keys):
        return "flow"
    if "python_audio_output" in keys or "python_hift_source" in keys:
        return "hift"
    if "speech_tokens" in keys or "text" in keys:
        return "llm"
    if "token" in keys:
        return "flow"
    return "frontend"


def _from_flat(raw: Dict[str, torch.Tensor], stage: Optional[str], path: Path) -> Dump:
    unknown = [k for k in raw if k not in FLAT_KEYS]
    if unknown and len(unknown) == len(raw):
        raise DumpError(f"{path}: neither a {FORMAT} dump (no 'format' metadata and no STAGE.in/out/tap keys) "
                        f"nor the flat native layout (keys like token, prompt_feat, python_flow_output). "
                        f"Keys found: {', '.join(sorted(raw)[:12])}")
    stage = stage or _infer_flat_stage(raw)
    tensors: Dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        if k not in FLAT_KEYS:
            continue
        st, kind, name = FLAT_KEYS[k]
        tensors[f"{st}.{kind}.{name}"] = v
    # cross-stage wiring of the flat layout: the flow output is the vocoder's input
    if "flow.out.mel" in tensors:
        tensors.setdefault("hift.in.mel", tensors["flow.out.mel"])
        tensors.setdefault("e2e.tap.mel", tensors["flow.out.mel"])
    for n in ("token", "prompt_token", "prompt_feat", "embedding"):
        if f"flow.in.{n}" in tensors:
            tensors.setdefault(f"e2e.in.{n}", tensors[f"flow.in.{n}"])
    if "hift.out.speech" in tensors:
        tensors.setdefault("e2e.out.speech", tensors["hift.out.speech"])
    if "llm.in.embedding" in tensors:
        tensors.setdefault("llm.in.prompt_speech_token", torch.zeros(1, 0, dtype=torch.int32))
    return Dump(stage, tensors, {"format": "flat-native", "stage": stage}, "flat-native", path)


def read_dump(path: Union[str, Path], stage: Optional[str] = None) -> Dump:
    """Read a dump in either layout; ``stage`` picks the stage of a flat multi-stage file."""
    path = Path(path)
    if not path.is_file():
        raise DumpError(f"dump {path} does not exist")
    try:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for non-safetensors files
        raise DumpError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})."
                        f" cosytools dumps are safetensors files ({FORMAT}).") from None
    fmt = meta.get("format")
    if fmt is None and any(k.count(".") >= 2 and k.split(".")[1] in ("in", "out", "tap") for k in raw):
        fmt = FORMAT  # written without metadata but in our key layout
    if fmt is None:
        return _from_flat(raw, stage, path)
    if fmt != FORMAT:
        raise DumpError(f"{path}: metadata format is {fmt!r}; this cosytools reads {FORMAT!r} and the flat "
                        "native layout")
    # the stage is the key prefix (the module); metadata 'stage' may be a call label such as
    # 'flow_full' or 'hift_chunk_0'
    prefixes = sorted({k.split(".", 1)[0] for k in raw})
    if len(prefixes) > 1:
        raise DumpError(f"{path}: one dump holds one stage call, but keys start with {', '.join(prefixes)}")
    file_stage = prefixes[0] if prefixes else str(meta.get("stage", "")).split("_")[0]
    if stage is not None and file_stage != stage:
        raise DumpError(f"{path}: this is a {file_stage!r} dump, not {stage!r} "
                        f"(run `cosytools parity {file_stage} --ref {path}`)")
    if file_stage not in STAGES:
        raise DumpError(f"{path}: unknown stage {file_stage!r}; known stages: {', '.join(STAGES)}")
    bad = [k for k in raw if not (k.startswith(f"{file_stage}.") and k.split(".")[1] in ("in", "out", "tap"))]
    if bad:
        raise DumpError(f"{path}: keys outside '{file_stage}.in/out/tap.*': {', '.join(bad[:8])}")
    return Dump(file_stage, raw, meta, FORMAT, path)


def write_dump(path: Union[str, Path], stage: str, tensors: Mapping[str, torch.Tensor],
               metadata: Optional[Mapping[str, Any]] = None, producer: str = "cosytools") -> Path:
    """Write a ``cosytools-dump/1`` file; non-string metadata values are JSON-encoded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta: Dict[str, str] = {"format": FORMAT, "stage": stage, "producer": producer}
    for k, v in (metadata or {}).items():
        if isinstance(v, bool):
            meta[k] = "true" if v else "false"
        elif isinstance(v, str):
            meta[k] = v
        else:
            meta[k] = json.dumps(v)
    bad = [k for k in tensors if not (k.startswith(f"{stage}.") and k.split(".")[1] in ("in", "out", "tap"))]
    if bad:
        raise DumpError(f"cannot write {path}: keys {bad[:5]} are not '{stage}.in/out/tap.*'")
    from safetensors.torch import save_file
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def list_dumps(folder: Union[str, Path]) -> List[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DumpError(f"{folder} is not a directory of dumps")
    return sorted(folder.glob("*.safetensors"))
