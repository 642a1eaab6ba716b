"""WAV reading and writing (PCM 16/24/32-bit and float, any channel count)."""
from __future__ import annotations

import struct
import wave
from pathlib import Path
from typing import Tuple, Union

import numpy as np

from .errors import InputError

__all__ = ["write_wav", "read_wav"]


def write_wav(path: Union[str, Path], audio: np.ndarray, sample_rate: int) -> None:
    """Write mono float audio in [-1, 1] as 16-bit PCM."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(audio)):
        raise InputError(f"refusing to write {path}: the audio contains NaN or Inf samples")
    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype("<i2")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())


def _chunks(data: bytes) -> dict:
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        raise InputError("not a RIFF/WAVE file")
    out, pos = {}, 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        out.setdefault(cid, data[pos + 8:pos + 8 + size])
        pos += 8 + size + (size & 1)
    return out


def read_wav(path: Union[str, Path]) -> Tuple[np.ndarray, int]:
    """Read a WAV file as mono float32 in [-1, 1] (channels averaged) and its sample rate."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read audio {path}: {e.strerror}") from None
    try:
        ch = _chunks(data)
    except InputError as e:
        raise InputError(f"{path}: {e}; cosytools reads WAV (PCM 16/24/32-bit or float). Convert it first, "
                         "e.g. `sox in.mp3 -r 24000 out.wav`.") from None
    if b"fmt " not in ch or b"data" not in ch:
        raise InputError(f"{path}: WAV without a fmt or data chunk")
    fmt = ch[b"fmt "]
    tag, nch, sr, _, _, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag is in the sub-format GUID
        tag = struct.unpack("<H", fmt[24:26])[0]
    raw = ch[b"data"]
    if tag == 1 and bits == 16:
        x = np.frombuffer(raw[: len(raw) // 2 * 2], "<i2").astype(np.float32) / 32768.0
    elif tag == 1 and bits == 24:
        b = np.frombuffer(raw[: len(raw) // 3 * 3], np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        x = v.astype(np.float32) / float(1 << 23)
    elif tag == 1 and bits == 32:
        x = (np.frombuffer(raw[: len(raw) // 4 * 4], "<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
    elif tag == 3 and bits in (32, 64):
        x = np.frombuffer(raw[: len(raw) // (bits // 8) * (bits // 8)], "<f4" if bits == 32 else "<f8").astype(np.float32)
    else:
        raise InputError(f"{path}: unsupported WAV encoding (format tag {tag}, {bits} bits); use PCM 16/24/32-bit "
                         "or float32/64")
    if nch < 1:
        raise InputError(f"{path}: WAV header says {nch} channels")
    x = x[: len(x) // nch * nch].reshape(-1, nch).mean(axis=1)
    return x.astype(np.float32), int(sr)
