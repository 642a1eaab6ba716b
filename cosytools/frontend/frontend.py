"""The CosyVoice3 frontend of one model dir: text normalisation and tokenisation, prompt audio
features, the two ONNX sub-models, and the per-mode model inputs that upstream's
``CosyVoiceFrontEnd.frontend_*`` functions build.

Mode inputs (upstream ``cosyvoice/cli/frontend.py`` with CosyVoice3's 24 kHz resample rate):

==============  =====================================================================
mode            what reaches the LLM / the flow
==============  =====================================================================
sft             LLM: text.  Flow: the speaker's ``spk2info.pt`` embedding, no prompt.
zero_shot       LLM: prompt text + text, prompt speech tokens.  Flow: prompt tokens,
                prompt mel, CAM++ embedding (tokens/mel aligned to 2 mel frames per token).
cross_lingual   LLM: text only (CosyVoice3 carries its instruction in the text).
                Flow: as zero_shot.
instruct2       LLM: instruction (``...<|endofprompt|>``) as prompt text + text, no prompt
                speech tokens.  Flow: as zero_shot.
vc              no LLM: the source audio's speech tokens go to the flow with the prompt's
                tokens, mel and embedding (upstream does not align them in this mode).
==============  =====================================================================

Prompt audio is read at 16 kHz for the speech tokenizer and CAM++ and at 24 kHz for the prompt
mel, resampled like upstream's ``load_wav`` (torchaudio's sinc/Hann resampler). The ONNX files
are opened on first use, so text-only (sft) synthesis works without them.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import ConfigError, InputError
from .features import (MAX_TOKENIZER_SECONDS, MIN_PROMPT_SAMPLE_RATE, CampPlusONNX, SpeechTokenizerONNX,
                       load_prompt_wav, make_standin_onnx_models, prompt_mel, resample)
from .text import is_only_punctuation, text_normalize
from .tokenizer import ENDOFPROMPT_TOKEN, CosyVoice3Tokenizer

__all__ = [
    "Frontend",
    "ModelInput",
    "PromptAudio",
    "AudioInput",
    "SPEECH_TOKENIZER_FILE",
    "CAMPPLUS_FILE",
    "SPK2INFO_FILE",
    "DEFAULT_SYSTEM_PROMPT",
    "align_prompt",
    "check_prompt_text",
    "compose_instruction",
]

log = logging.getLogger(__name__)

SPEECH_TOKENIZER_FILE = "speech_tokenizer_v3.onnx"
CAMPPLUS_FILE = "campplus.onnx"
SPK2INFO_FILE = "spk2info.pt"
#: what upstream's CosyVoice3 examples put before ``<|endofprompt|>``
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

TOKENIZER_SR = 16000
MEL_SR = 24000

#: a prompt as a WAV path, or a waveform (numpy/torch, [N] or [C, N]) with its sample rate
AudioInput = Union[str, os.PathLike, Tuple[Any, int]]

# keys of upstream's model_input dict per mode (``*_len`` companions are added by as_dict)
_UPSTREAM_KEYS: Dict[str, Tuple[str, ...]] = {
    "sft": ("text", "llm_embedding", "flow_embedding"),
    "zero_shot": ("text", "prompt_text", "llm_prompt_speech_token", "flow_prompt_speech_token",
                  "prompt_speech_feat", "llm_embedding", "flow_embedding"),
    "cross_lingual": ("text", "flow_prompt_speech_token", "prompt_speech_feat", "llm_embedding", "flow_embedding"),
    "instruct2": ("text", "prompt_text", "flow_prompt_speech_token", "prompt_speech_feat", "llm_embedding",
                  "flow_embedding"),
    "vc": ("source_speech_token", "flow_prompt_speech_token", "prompt_speech_feat", "flow_embedding"),
}


def _ids() -> torch.Tensor:
    return torch.zeros(1, 0, dtype=torch.long)


@dataclass
class PromptAudio:
    """Features of one prompt recording (computed once, reused for every text segment)."""

    speech_token: torch.Tensor   # [1, Ns] int64, 25 Hz speech tokens of the 16 kHz audio
    speech_feat: torch.Tensor    # [1, T, 80] float32 log-mel of the 24 kHz audio
    embedding: torch.Tensor      # [1, 192] float32 CAM++ speaker embedding
    aligned: bool = True         # T == 2 * Ns after upstream's trimming

    @property
    def seconds(self) -> float:
        return self.speech_feat.shape[1] / 50.0


@dataclass
class ModelInput:
    """What the model stages get for one text segment (upstream's ``model_input`` dict).

    Token tensors are int64 ``[1, N]`` (empty ``[1, 0]`` when absent), ``prompt_speech_feat`` is
    ``[1, T, 80]``, embeddings ``[1, 192]``. ``llm_embedding`` is carried for upstream's layout;
    the CosyVoice3 LLM does not read it.
    """

    mode: str
    text: torch.Tensor = field(default_factory=_ids)
    prompt_text: torch.Tensor = field(default_factory=_ids)
    llm_prompt_speech_token: torch.Tensor = field(default_factory=_ids)
    flow_prompt_speech_token: torch.Tensor = field(default_factory=_ids)
    prompt_speech_feat: torch.Tensor = field(default_factory=lambda: torch.zeros(1, 0, 80))
    llm_embedding: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 192))
    flow_embedding: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 192))
    source_speech_token: torch.Tensor = field(default_factory=_ids)
    segment: str = ""            # the text this input synthesises ("" for vc)

    @property
    def uses_llm(self) -> bool:
        return self.mode != "vc"

    def as_dict(self) -> Dict[str, torch.Tensor]:
        """Upstream's ``model_input`` dict for this mode: same keys, int32 ids and lengths."""
        out: Dict[str, torch.Tensor] = {}
        for key in _UPSTREAM_KEYS[self.mode]:
            v = getattr(self, key)
            if key.endswith("embedding"):
                out[key] = v
                continue
            if not v.is_floating_point():
                v = v.to(torch.int32)
            out[key] = v
            out[f"{key}_len"] = torch.tensor([v.shape[1]], dtype=torch.int32)
        return out


def align_prompt(speech_token: torch.Tensor, speech_feat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Upstream's zero-shot alignment for a 24 kHz model: ``n = min(T // 2, Ns)``, keep the first
    ``n`` tokens and the first ``2 n`` mel frames (``speech_feat`` is ``[1, T, 80]``)."""
    n = min(int(speech_feat.shape[1] / 2), int(speech_token.shape[1]))
    return speech_token[:, :n], speech_feat[:, : 2 * n]


def check_prompt_text(prompt_text: str, what: str = "prompt text") -> None:
    """InputError unless ``prompt_text`` holds ``<|endofprompt|>`` (the CosyVoice3 LLM needs it)."""
    if not isinstance(prompt_text, str) or not prompt_text.strip():
        raise InputError(f"the {what} is empty; CosyVoice3 zero-shot needs the prompt's transcript after an "
                         f"instruction, e.g. '{DEFAULT_SYSTEM_PROMPT}{ENDOFPROMPT_TOKEN}Hello, this is my voice.'")
    if ENDOFPROMPT_TOKEN not in prompt_text:
        raise InputError(
            f"the {what} {prompt_text[:60]!r} has no {ENDOFPROMPT_TOKEN}; CosyVoice3 needs an instruction and "
            f"{ENDOFPROMPT_TOKEN} before the transcript of the prompt audio. Prepend "
            f"'{DEFAULT_SYSTEM_PROMPT}{ENDOFPROMPT_TOKEN}', e.g. "
            f"'{DEFAULT_SYSTEM_PROMPT}{ENDOFPROMPT_TOKEN}{prompt_text.strip()[:40]}'")


def compose_instruction(instruct_text: str) -> str:
    """The instruct2 prompt text: ``instruct_text`` as given when it holds ``<|endofprompt|>``, else
    ``"You are a helpful assistant. <instruct_text><|endofprompt|>"`` (the form of upstream's
    CosyVoice3 instruction list)."""
    if not isinstance(instruct_text, str) or not instruct_text.strip():
        raise InputError("the instruction is empty; give e.g. 'Please speak as loudly as possible.' or "
                         f"'{DEFAULT_SYSTEM_PROMPT} 请用广东话表达。{ENDOFPROMPT_TOKEN}'")
    if ENDOFPROMPT_TOKEN in instruct_text:
        return instruct_text
    body = instruct_text.strip()
    if not body.startswith(DEFAULT_SYSTEM_PROMPT.rstrip(".")):
        body = f"{DEFAULT_SYSTEM_PROMPT} {body}"
    return body + ENDOFPROMPT_TOKEN


class Frontend:
    """Text and prompt-audio frontend of one CosyVoice3 model dir (upstream ``CosyVoiceFrontEnd``).

    ``Frontend(model_dir)`` reads ``CosyVoice-BlankEN/`` for the tokenizer; ``speech_tokenizer_v3.onnx``,
    ``campplus.onnx`` and ``spk2info.pt`` are opened when first needed. ``providers`` is the
    onnxruntime provider list for the speech tokenizer (default: CUDA when torch and onnxruntime both
    have it, else CPU); CAM++ runs on CPU as upstream.
    """

    def __init__(self, model_dir: Union[str, os.PathLike], tokenizer: Optional[CosyVoice3Tokenizer] = None,
                 providers: Optional[Sequence[str]] = None) -> None:
        self.model_dir = Path(model_dir)
        self.tokenizer = tokenizer if tokenizer is not None else CosyVoice3Tokenizer.from_dir(
            self.model_dir / "CosyVoice-BlankEN")
        self.providers = list(providers) if providers else None
        self._speech_tokenizer: Optional[SpeechTokenizerONNX] = None
        self._campplus: Optional[CampPlusONNX] = None
        self._spk2info: Optional[Dict[str, Any]] = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Frontend({str(self.model_dir)!r})"

    # -- sub-models ---------------------------------------------------------------------------
    def _onnx_path(self, name: str, what: str) -> Path:
        path = self.model_dir / name
        if path.is_file():
            return path
        if self._is_builtin_model_dir():
            log.warning("%s: writing stand-in ONNX sub-models (this built-in random-weight model predates them)",
                        self.model_dir)
            make_standin_onnx_models(self.model_dir)
            return path
        raise ConfigError(
            f"{what} not found: {path}. Prompt audio (zero_shot, cross_lingual, instruct and vc modes) needs "
            f"{SPEECH_TOKENIZER_FILE} and {CAMPPLUS_FILE} in the model dir. A real CosyVoice3 model dir ships "
            f"them; for a random-weight dir, `cosytools init-model` writes stand-ins with the same inputs and "
            f"outputs (or call cosytools.frontend.features.make_standin_onnx_models('{self.model_dir}')).")

    def _is_builtin_model_dir(self) -> bool:
        from ..loading import default_cache_dir
        try:
            root = (default_cache_dir() / "models").resolve()
            here = self.model_dir.resolve()
        except OSError:
            return False
        return here.parent == root and here.name.split("-")[0] in ("tiny", "full")

    def _default_providers(self) -> List[str]:
        if self.providers:
            return self.providers
        import onnxruntime as ort  # a dependency of cosytools

        if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    @property
    def speech_tokenizer(self) -> SpeechTokenizerONNX:
        """``speech_tokenizer_v3.onnx`` (opened on first use)."""
        with self._lock:
            if self._speech_tokenizer is None:
                path = self._onnx_path(SPEECH_TOKENIZER_FILE, "speech tokenizer")
                self._speech_tokenizer = SpeechTokenizerONNX(path, providers=self._default_providers())
            return self._speech_tokenizer

    @property
    def campplus(self) -> CampPlusONNX:
        """``campplus.onnx`` (opened on first use, CPU as upstream)."""
        with self._lock:
            if self._campplus is None:
                path = self._onnx_path(CAMPPLUS_FILE, "CAM++ speaker encoder")
                self._campplus = CampPlusONNX(path, providers=["CPUExecutionProvider"])
            return self._campplus

    @property
    def spk2info(self) -> Dict[str, Any]:
        """``spk2info.pt`` (speaker id -> dict with ``embedding`` and, for saved zero-shot speakers,
        upstream's prompt inputs); ``{}`` when the file does not exist."""
        if self._spk2info is None:
            path = self.model_dir / SPK2INFO_FILE
            if not path.is_file():
                self._spk2info = {}
            else:
                try:
                    info = torch.load(str(path), map_location="cpu", weights_only=True)
                except Exception as e:  # torch raises several types for a bad pickle
                    raise ConfigError(f"cannot read {path}: {e}") from None
                if not isinstance(info, dict):
                    raise ConfigError(f"{path}: expected a dict speaker id -> info, got {type(info).__name__}")
                self._spk2info = info
        return self._spk2info

    def speakers(self) -> List[str]:
        """The speaker ids of ``spk2info.pt``."""
        return sorted(self.spk2info)

    def _speaker(self, speaker: str) -> Any:
        info = self.spk2info
        if speaker not in info:
            path = self.model_dir / SPK2INFO_FILE
            if not info:
                raise InputError(f"speaker {speaker!r}: {path} does not exist or has no speakers")
            raise InputError(f"speaker {speaker!r} is not in {path}; known speakers: {', '.join(sorted(info))}")
        return info[speaker]

    def speaker_embedding(self, speaker: str) -> torch.Tensor:
        """``spk2info.pt``'s embedding of ``speaker`` -> float32 [1, D]."""
        entry = self._speaker(speaker)
        emb = entry.get("embedding", entry.get("flow_embedding")) if isinstance(entry, dict) else entry
        if emb is None:
            raise ConfigError(f"{self.model_dir / SPK2INFO_FILE}: speaker {speaker!r} has no 'embedding'")
        return torch.as_tensor(emb, dtype=torch.float32).detach().cpu().reshape(1, -1)

    # -- text -------------------------------------------------------------------------------
    def normalize(self, text: str, split: bool = True, text_frontend: bool = True) -> Union[List[str], str]:
        """Upstream ``text_normalize`` (see :mod:`cosytools.frontend.text`)."""
        if not isinstance(text, str):
            raise InputError(f"text must be a str, got {type(text).__name__}")
        return text_normalize(text, self.tokenizer.encode, split=split, text_frontend=text_frontend)

    def segments(self, text: str, text_frontend: bool = True) -> List[str]:
        """The pieces ``text`` is synthesised as; InputError when nothing speakable is left."""
        if not isinstance(text, str) or not text.strip():
            raise InputError("the text to synthesise is empty")
        # upstream's punctuation filter does not strip, so "... !!" leaves " !" to synthesise; drop those too
        pieces = [p for p in self.normalize(text, split=True, text_frontend=text_frontend)
                  if p.strip() and not is_only_punctuation(p.strip())]
        if not pieces:
            raise InputError(f"the text {text[:60]!r} has nothing to speak (only punctuation or symbols)")
        return pieces

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` -> int64 [1, N] (special tokens such as ``<|endofprompt|>`` matched)."""
        return torch.tensor([self.tokenizer.encode(text)], dtype=torch.long).reshape(1, -1)

    # -- audio ------------------------------------------------------------------------------
    def load_audio(self, audio: AudioInput, target_sr: int) -> torch.Tensor:
        """Mono float32 [1, N] at ``target_sr`` from a WAV path or ``(waveform, sample_rate)``, with the
        checks of upstream's ``load_wav`` and speech tokenizer (>= 16 kHz, <= 30 s, not silent)."""
        if isinstance(audio, (str, os.PathLike)):
            return load_prompt_wav(audio, target_sr)
        if not (isinstance(audio, tuple) and len(audio) == 2):
            raise InputError("audio must be a WAV path or a (waveform, sample_rate) tuple, got "
                             f"{type(audio).__name__}")
        wav, sr = audio
        x = wav.detach().cpu().float() if isinstance(wav, torch.Tensor) else torch.from_numpy(
            np.asarray(wav, dtype=np.float32))
        if x.dim() == 2:
            x = x.mean(dim=0)
        if x.dim() != 1:
            raise InputError(f"waveform must be [N] or [channels, N], got shape {list(x.shape)}")
        sr = int(sr)
        if x.numel() == 0:
            raise InputError("the prompt waveform is empty")
        if sr < MIN_PROMPT_SAMPLE_RATE:
            raise InputError(f"the prompt waveform is {sr} Hz; CosyVoice3 needs at least "
                             f"{MIN_PROMPT_SAMPLE_RATE // 1000} kHz")
        if not bool(torch.isfinite(x).all()):
            raise InputError("the prompt waveform contains NaN or Inf samples")
        if x.numel() / sr > MAX_TOKENIZER_SECONDS:
            raise InputError(f"the prompt waveform is {x.numel() / sr:.2f} s long; CosyVoice3's speech tokenizer "
                             f"accepts at most {MAX_TOKENIZER_SECONDS} s. Cut a 3-10 s clip.")
        if x.numel() / sr < 0.1:
            raise InputError(f"the prompt waveform is {x.numel() / sr * 1000:.0f} ms long; at least 0.1 s is needed "
                             "(3-10 s works best)")
        if float(x.abs().max()) <= 1e-4:
            raise InputError("the prompt waveform is silent; give a recording of the prompt speaker")
        return resample(x.unsqueeze(0).contiguous(), sr, target_sr, method="sinc_hann")

    def extract_speech_token(self, audio: AudioInput) -> torch.Tensor:
        """Speech tokens int64 [1, Ns] of the audio at 16 kHz (upstream ``_extract_speech_token``)."""
        return self.speech_tokenizer.tokenize(self.load_audio(audio, TOKENIZER_SR))

    def extract_spk_embedding(self, audio: AudioInput) -> torch.Tensor:
        """CAM++ embedding float32 [1, 192] of the audio at 16 kHz (upstream ``_extract_spk_embedding``)."""
        return self.campplus.embed(self.load_audio(audio, TOKENIZER_SR))

    def extract_speech_feat(self, audio: AudioInput) -> torch.Tensor:
        """Prompt mel float32 [1, T, 80] of the audio at 24 kHz (upstream ``_extract_speech_feat``)."""
        return prompt_mel(self.load_audio(audio, MEL_SR)).squeeze(0).transpose(0, 1).unsqueeze(0).contiguous()

    def prompt_audio(self, audio: Union[AudioInput, PromptAudio], align: bool = True) -> PromptAudio:
        """Tokens, mel and embedding of a prompt recording; ``align`` applies upstream's zero-shot
        trimming (:func:`align_prompt`). A :class:`PromptAudio` is returned as is."""
        if isinstance(audio, PromptAudio):
            return audio
        wav16 = self.load_audio(audio, TOKENIZER_SR)
        wav24 = self.load_audio(audio, MEL_SR)
        token = self.speech_tokenizer.tokenize(wav16)
        feat = prompt_mel(wav24).squeeze(0).transpose(0, 1).unsqueeze(0).contiguous()
        emb = self.campplus.embed(wav16)
        if align:
            token, feat = align_prompt(token, feat)
        if token.shape[1] == 0:
            raise InputError("the prompt audio gave no speech tokens; use a 3-10 s recording")
        return PromptAudio(token, feat, emb, aligned=align)

    # -- per-mode inputs (upstream frontend_*) ---------------------------------------------------
    def frontend_sft(self, text: str, speaker: str) -> ModelInput:
        """Inputs of one sft segment: text ids and the speaker's ``spk2info.pt`` embedding."""
        emb = self.speaker_embedding(speaker)
        return ModelInput("sft", text=self.encode(text), llm_embedding=emb, flow_embedding=emb, segment=text)

    def frontend_zero_shot(self, text: str, prompt_text: str, prompt: Union[AudioInput, PromptAudio]) -> ModelInput:
        """Inputs of one zero-shot segment; ``prompt_text`` must hold ``<|endofprompt|>``."""
        check_prompt_text(prompt_text)
        p = self.prompt_audio(prompt, align=True)
        return ModelInput("zero_shot", text=self.encode(text), prompt_text=self.encode(prompt_text),
                          llm_prompt_speech_token=p.speech_token, flow_prompt_speech_token=p.speech_token,
                          prompt_speech_feat=p.speech_feat, llm_embedding=p.embedding, flow_embedding=p.embedding,
                          segment=text)

    def frontend_cross_lingual(self, text: str, prompt: Union[AudioInput, PromptAudio]) -> ModelInput:
        """Inputs of one cross-lingual segment: no prompt text and no prompt speech tokens for the LLM
        (the text itself must hold the instruction and ``<|endofprompt|>`` for CosyVoice3)."""
        p = self.prompt_audio(prompt, align=True)
        return ModelInput("cross_lingual", text=self.encode(text), flow_prompt_speech_token=p.speech_token,
                          prompt_speech_feat=p.speech_feat, llm_embedding=p.embedding, flow_embedding=p.embedding,
                          segment=text)

    def frontend_instruct2(self, text: str, instruct_text: str,
                           prompt: Union[AudioInput, PromptAudio]) -> ModelInput:
        """Inputs of one instruct2 segment: the instruction (with ``<|endofprompt|>``) as the LLM's
        prompt text, no prompt speech tokens for the LLM; the flow gets the prompt audio."""
        check_prompt_text(instruct_text, "instruction")
        p = self.prompt_audio(prompt, align=True)
        return ModelInput("instruct2", text=self.encode(text), prompt_text=self.encode(instruct_text),
                          flow_prompt_speech_token=p.speech_token, prompt_speech_feat=p.speech_feat,
                          llm_embedding=p.embedding, flow_embedding=p.embedding, segment=text)

    def frontend_vc(self, source: AudioInput, prompt: Union[AudioInput, PromptAudio]) -> ModelInput:
        """Inputs of voice conversion: the source's speech tokens go straight to the flow; the prompt's
        tokens and mel are *not* aligned (upstream ``frontend_vc`` does not trim them)."""
        p = prompt if isinstance(prompt, PromptAudio) else self.prompt_audio(prompt, align=False)
        src = self.extract_speech_token(source)
        if src.shape[1] == 0:
            raise InputError("the source audio gave no speech tokens")
        return ModelInput("vc", source_speech_token=src, flow_prompt_speech_token=p.speech_token,
                          prompt_speech_feat=p.speech_feat, flow_embedding=p.embedding)

    def speaker_entry(self, prompt_text: str, prompt: Union[AudioInput, PromptAudio]) -> Dict[str, torch.Tensor]:
        """A ``spk2info.pt`` entry for a zero-shot speaker in upstream's layout (``add_zero_shot_spk``:
        the zero-shot model input without ``text``/``text_len``)."""
        d = self.frontend_zero_shot("", prompt_text, prompt).as_dict()
        d.pop("text")
        d.pop("text_len")
        return d

    # -- saved zero-shot speakers (upstream add_zero_shot_spk / save_spkinfo / zero_shot_spk_id) -----
    def add_speaker(self, speaker: str, prompt_text: str, prompt: Union[AudioInput, PromptAudio]) -> Dict[str, Any]:
        """Compute the zero-shot prompt inputs of ``prompt`` once and keep them under ``speaker`` in
        :attr:`spk2info` (in memory; :meth:`save_speakers` writes the file).  An existing entry of
        that name is replaced."""
        if not isinstance(speaker, str) or not speaker.strip():
            raise InputError("a speaker id must be a non-empty string")
        entry = self.speaker_entry(prompt_text, prompt)
        self.spk2info[speaker] = entry
        return entry

    def save_speakers(self, path: Union[str, os.PathLike, None] = None) -> Path:
        """Write :attr:`spk2info` (the file's speakers plus those added) to ``path`` (default: the
        model dir's ``spk2info.pt``, as upstream's ``save_spkinfo``), through a temporary file so a
        failed write leaves the old file intact."""
        out = Path(path) if path is not None else self.model_dir / SPK2INFO_FILE
        info = self.spk2info
        tmp = out.with_name(out.name + ".tmp")
        try:
            torch.save(info, str(tmp))
            os.replace(tmp, out)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise InputError(f"cannot write {out}: {e.strerror or e}") from None
        return out

    def speaker_prompt(self, speaker: str) -> Tuple[torch.Tensor, PromptAudio]:
        """A saved zero-shot speaker's prompt text ids [1, N] and prompt audio features."""
        entry = self._speaker(speaker)
        need = ("prompt_text", "flow_prompt_speech_token", "prompt_speech_feat", "flow_embedding")
        if not isinstance(entry, dict) or any(k not in entry for k in need):
            raise InputError(
                f"speaker {speaker!r} in {self.model_dir / SPK2INFO_FILE} has only an embedding (an sft speaker); "
                "zero-shot and cross-lingual synthesis need a speaker saved with its prompt "
                "(`cosytools speaker add NAME --prompt-wav W --prompt-text T`), or --prompt-wav")
        tok = torch.as_tensor(entry["flow_prompt_speech_token"]).long().reshape(1, -1)
        feat = torch.as_tensor(entry["prompt_speech_feat"]).float().reshape(1, -1, 80)
        emb = torch.as_tensor(entry["flow_embedding"]).float().reshape(1, -1)
        prompt_ids = torch.as_tensor(entry["prompt_text"]).long().reshape(1, -1)
        return prompt_ids, PromptAudio(tok, feat, emb, aligned=feat.shape[1] == 2 * tok.shape[1])

    def frontend_zero_shot_speaker(self, text: str, speaker: str) -> ModelInput:
        """Inputs of one zero-shot segment from a saved speaker (upstream ``frontend_zero_shot`` with
        ``zero_shot_spk_id``: the stored prompt text and prompt audio features, the new text)."""
        prompt_ids, p = self.speaker_prompt(speaker)
        return ModelInput("zero_shot", text=self.encode(text), prompt_text=prompt_ids,
                          llm_prompt_speech_token=p.speech_token, flow_prompt_speech_token=p.speech_token,
                          prompt_speech_feat=p.speech_feat, llm_embedding=p.embedding, flow_embedding=p.embedding,
                          segment=text)
