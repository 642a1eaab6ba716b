"""Replay the call recorded in a dump on a backend, capturing the same outputs and taps."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from cosytools import taps

from .dump import REQUIRED_INPUTS, Dump, DumpError, read_dump

__all__ = ["StageRun", "run_dump", "STAGE_RUNNERS", "find_hift_noise"]

log = logging.getLogger(__name__)


@dataclass
class StageRun:
    """What our side produced for one dump: full keys -> tensors, in execution order."""

    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    order: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    strings: Dict[str, tuple] = field(default_factory=dict)  # name -> (reference, ours) for text outputs

    def add(self, key: str, value: torch.Tensor) -> None:
        if key not in self.tensors:
            self.order.append(key)
        self.tensors[key] = value.detach().cpu()

    def add_taps(self, rec: taps.TapRecorder) -> None:
        for k in rec.order:
            self.add(k, rec.tensors[k])


def _tokens(t: torch.Tensor) -> torch.Tensor:
    return t.long().reshape(1, -1)


def _check_ids(dump: Dump, name: str, t: torch.Tensor, limit: int) -> None:
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= limit):
        raise DumpError(f"{dump.name()}: {dump.stage}.in.{name} holds ids in [{int(t.min())}, {int(t.max())}], "
                        f"outside the model's range [0, {limit}); the dump is not for this model")


def find_hift_noise(dump: Dump, samples: int) -> Optional[Dict[str, torch.Tensor]]:
    """HiFT noise tables for an e2e dump: its own ``e2e.in.noise.*``, else the longest
    ``hift.in.noise.*`` of a sibling dump (upstream draws the tables once per model, so every
    call of a model uses prefixes of the same tables)."""
    own = {k[len("noise."):]: v for k, v in dump.inputs.items() if k.startswith("noise.")}
    if {"rand_ini", "sine", "uv"} <= set(own):
        return own
    if dump.path is None:
        return None
    best: Optional[Dict[str, torch.Tensor]] = None
    for p in sorted(dump.path.parent.glob("*.safetensors")):
        if p == dump.path:
            continue
        try:
            other = read_dump(p)
        except DumpError:
            continue
        if other.stage != "hift" or other.metadata.get("model") != dump.metadata.get("model"):
            continue
        n = {k[len("noise."):]: v for k, v in other.inputs.items() if k.startswith("noise.")}
        if {"rand_ini", "sine", "uv"} <= set(n) and n["sine"].shape[1] >= samples:
            if best is None or n["sine"].shape[1] > best["sine"].shape[1]:
                best = n
                best["_from"] = p.name  # type: ignore[assignment]
    return best


def _run_llm(backend: Any, dump: Dump, run: StageRun) -> None:
    i = dump.inputs
    lm = backend.model.llm
    for n in ("text", "prompt_text"):
        _check_ids(dump, n, i[n], lm.llm.config.vocab_size)
    _check_ids(dump, "prompt_speech_token", i["prompt_speech_token"], lm.speech_token_size)
    args = (_tokens(i["text"]), _tokens(i["prompt_text"]), _tokens(i["prompt_speech_token"]))
    if "forced_tokens" in i:
        with taps.capture("llm") as rec:
            res = backend.llm_teacher_force(*args, i["forced_tokens"].reshape(-1).tolist())
        run.add_taps(rec)
        run.add("llm.tap.step_hidden", res.step_hidden)
        run.add("llm.out.logp", res.logp)
        return
    seed = int(dump.flag("seed", 0))
    min_len, max_len = dump.flag("min_len"), dump.flag("max_len")
    # replay the dump's RNG: a CPU-made dump drew from torch's CPU generator, also when we run on a GPU
    made_on_cuda = str(dump.metadata.get("device", "cpu")).startswith("cuda")
    gen_dev = backend.device if (backend.device.type == "cuda" and made_on_cuda) else "cpu"
    gen = torch.Generator(device=gen_dev).manual_seed(seed)
    sampled: List[int] = []
    with taps.capture("llm") as rec:
        tokens = list(backend.llm_generate(*args, min_len=None if min_len is None else int(min_len),
                                           max_len=None if max_len is None else int(max_len),
                                           generator=gen, sampled=sampled, exact=True,
                                           strict_min_len=bool(dump.flag("strict_min_len", False))))
    run.add_taps(rec)
    run.add("llm.tap.sampled", torch.tensor([sampled], dtype=torch.int32))
    run.add("llm.out.tokens", torch.tensor([tokens], dtype=torch.int32))
    run.notes.append(f"sampling seed {seed} (torch generator on {gen_dev})")


def _flow_args(dump: Dump) -> tuple:
    i = dump.inputs
    feat = i["prompt_feat"]
    if feat.dim() == 3 and feat.shape[1] == 80 and feat.shape[2] != 80:
        feat = feat.transpose(1, 2)  # a port that stored [1, 80, T]
    return _tokens(i["token"]), _tokens(i["prompt_token"]), feat.float(), i["embedding"].float().reshape(1, -1)


def _flow_noise(dump: Dump) -> Optional[torch.Tensor]:
    """The dump's ODE start noise; the model uses its first L frames (flat dumps carry the whole buffer)."""
    noise = dump.inputs.get("noise")
    if noise is None:
        return None
    if noise.dim() == 2:
        noise = noise[None]
    return noise.float()


def _run_flow(backend: Any, dump: Dump, run: StageRun) -> None:
    token, prompt_token, feat, emb = _flow_args(dump)
    vocab = backend.model.flow.input_embedding.num_embeddings
    _check_ids(dump, "token", token, vocab)
    _check_ids(dump, "prompt_token", prompt_token, vocab)
    noise = _flow_noise(dump)
    if feat.shape[-1] != 80:
        raise DumpError(f"{dump.name()}: flow.in.prompt_feat has shape {list(feat.shape)}; expected [1, frames, 80]")
    with taps.capture("flow") as rec:
        mel = backend.flow(token, prompt_token, feat, emb, streaming=bool(dump.flag("streaming", False)),
                           finalize=bool(dump.flag("finalize", True)), noise=noise)
    run.add_taps(rec)
    run.add("flow.out.mel", mel)


def _hift_noise(inputs: Dict[str, torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
    n = {k[len("noise."):]: v for k, v in inputs.items() if k.startswith("noise.")}
    if not n:
        return None
    return {k: v for k, v in n.items() if k in ("rand_ini", "sine", "uv")}


def _run_hift(backend: Any, dump: Dump, run: StageRun) -> None:
    mel = dump.inputs["mel"].float()
    if mel.dim() != 3 or mel.shape[1] != 80:
        raise DumpError(f"{dump.name()}: hift.in.mel has shape {list(mel.shape)}; expected [1, 80, frames]")
    noise = _hift_noise(dump.inputs)
    if noise is None:
        run.notes.append("no hift.in.noise.* in the dump: the model's default noise tables were used, so "
                         "source/speech can only match a reference made with the same tables")
    with taps.capture("hift") as rec:
        speech, source = backend.hift(mel, finalize=bool(dump.flag("finalize", True)), noise=noise)
    run.add_taps(rec)
    run.add("hift.out.source", source)
    run.add("hift.out.speech", speech)


def _run_e2e(backend: Any, dump: Dump, run: StageRun) -> None:
    token, prompt_token, feat, emb = _flow_args(dump)
    noise = _flow_noise(dump)
    mel = backend.flow(token, prompt_token, feat, emb, streaming=False, finalize=True, noise=noise)
    run.add("e2e.tap.mel", mel)
    samples = mel.shape[-1] * 480
    hn = find_hift_noise(dump, samples)
    if hn is not None and "_from" in hn:
        run.notes.append(f"hift noise tables taken from sibling dump {hn.pop('_from')}")
    elif hn is None:
        run.notes.append("no hift noise tables found: default tables used (speech matches only the same tables)")
    speech, _ = backend.hift(mel, finalize=True, noise=hn)
    run.add("e2e.out.speech", speech)


def _run_tokenizer(backend: Any, dump: Dump, run: StageRun) -> None:
    from cosytools.frontend.tokenizer import CosyVoice3Tokenizer

    model_dir = backend.model.model_dir
    tok = CosyVoice3Tokenizer.from_dir(model_dir / "CosyVoice-BlankEN")
    strings = dump.flag("strings")
    if not isinstance(strings, list):
        raise DumpError(f"{dump.name()}: a tokenizer dump needs the list of input strings in its 'strings' metadata")
    decoded = dump.flag("decoded_skip_special")
    for i, s in enumerate(strings):
        ids = tok.encode(s)
        run.add(f"tokenizer.out.ids.{i:02d}", torch.tensor(ids, dtype=torch.int32))
        if isinstance(decoded, list) and i < len(decoded):
            run.strings[f"tokenizer.decode.{i:02d}"] = (decoded[i], tok.decode(ids, skip_special_tokens=True))


def _run_mel(backend: Any, dump: Dump, run: StageRun) -> None:
    from cosytools.frontend.features import prompt_mel

    wav = dump.inputs["wav"].float()
    kw = {}
    for k in ("n_fft", "num_mels", "sampling_rate", "hop_size", "win_size", "fmin"):
        v = dump.flag(k)
        if isinstance(v, (int, float)):
            kw[k] = v
    fmax = dump.flag("fmax")
    if isinstance(fmax, (int, float)):
        kw["fmax"] = fmax
    run.add("mel.out.feat", prompt_mel(wav, **kw))


STAGE_RUNNERS: Dict[str, Callable[[Any, Dump, StageRun], None]] = {
    "llm": _run_llm, "flow": _run_flow, "hift": _run_hift, "e2e": _run_e2e,
    "tokenizer": _run_tokenizer, "mel": _run_mel,
}

STAGE_COMPONENTS: Dict[str, tuple] = {
    "llm": ("llm",), "flow": ("flow",), "hift": ("hift",), "e2e": ("flow", "hift"), "tokenizer": (), "mel": (),
}


def run_dump(backend: Any, dump: Dump) -> StageRun:
    """Run the call recorded in ``dump`` on ``backend``; collect our outputs and taps."""
    if dump.stage not in STAGE_RUNNERS:
        raise DumpError(f"{dump.name()}: no parity runner for stage {dump.stage!r}; "
                        f"runnable stages: {', '.join(STAGE_RUNNERS)}")
    dump.require(REQUIRED_INPUTS.get(dump.stage, ()))
    run = StageRun()
    try:
        STAGE_RUNNERS[dump.stage](backend, dump, run)
    except RuntimeError as e:
        # shape errors inside the model mean the dump's tensors contradict the model's sizes
        first = str(e).splitlines()[0]
        raise DumpError(f"{dump.name()}: the {dump.stage} call failed on this model with the dump's inputs "
                        f"({first}). Check that the dump was made with this model's sizes "
                        f"({', '.join(f'{k} {list(v.shape)}' for k, v in dump.inputs.items())}).") from None
    return run

