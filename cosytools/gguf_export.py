"""``cosytools export gguf``: write the Qwen2 trunk of the CosyVoice3 LLM as a GGUF file.

What is written (as llama.cpp's ``convert_hf_to_gguf.py`` writes a ``Qwen2ForCausalLM``):

* tensors ``token_embd``, ``blk.N.{attn_norm, attn_q, attn_k, attn_v (+ .bias), attn_output,
  ffn_norm, ffn_gate, ffn_up, ffn_down}``, ``output_norm``; ``output`` only when the config does
  not tie the embeddings.  2-D weights in the requested type; norms and biases stay F32.  A
  matrix whose rows do not split into the type's blocks falls back to F16 (llama.cpp does the
  same) and the summary lists it.
* metadata ``general.architecture/type/name/description/file_type/quantization_version``,
  ``{arch}.context_length, embedding_length, block_count, feed_forward_length,
  attention.head_count, attention.head_count_kv, rope.freq_base,
  attention.layer_norm_rms_epsilon`` (+ ``rope.dimension_count``, ``vocab_size`` for ``llama``);
* the tokenizer as llama.cpp's gpt2-style BPE (``tokenizer.ggml.model = gpt2``, ``pre = qwen2``,
  ``tokens`` padded to the embedding rows with ``[PADn]``, ``token_type``, ``merges``,
  bos/eos/pad ids from ``config.json``) read from ``CosyVoice-BlankEN/vocab.json`` +
  ``merges.txt`` + ``tokenizer_config.json``; ``--no-vocab`` writes ``tokenizer.ggml.model =
  no_vocab`` instead.  CosyVoice3's own special tokens (``<|endofprompt|>``, phonemes…) are added
  by its frontend, not by these files, so they appear as ``[PADn]`` rows.

``speech_embedding`` and ``llm_decoder`` are not in the file: the loader takes them from the
float checkpoint beside it.  ``--arch-name llama`` writes the ``llama.*`` spelling with q/k rows
(and biases) permuted per head as llama.cpp's converter permutes a ``llama`` model, so that
llama.cpp's interleaved RoPE computes the same attention; cosytools un-permutes them on load.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import click
import numpy as np

from .errors import CheckpointError, ConfigError
from .gguf_io import ARCHITECTURES, HF_TO_GGUF, _gguf, llama_permute_rows

__all__ = ["writable_types", "export_gguf", "gguf_command"]

log = logging.getLogger(__name__)

_WRITABLE: Optional[List[str]] = None


def writable_types() -> List[str]:
    """GGML type names the installed ``gguf`` library can quantize to (F32, F16, BF16, Q8_0, Q4_0…)."""
    global _WRITABLE
    if _WRITABLE is None:
        gguf = _gguf()
        names = []
        for t in gguf.GGMLQuantizationType:
            try:
                gguf.quants.quantize(np.zeros((1, 256), dtype=np.float32), t)
                names.append(t.name)
            except NotImplementedError:
                continue
            except Exception:  # implemented, merely unhappy with zeros
                names.append(t.name)
        _WRITABLE = names
    return list(_WRITABLE)


def _parse_type(name: str) -> Any:
    gguf = _gguf()
    ok = writable_types()
    key = name.strip().upper()
    if key not in ok:
        raise ConfigError(f"cannot write GGUF type {name!r}; the installed gguf library quantizes to: {', '.join(ok)}")
    return gguf.GGMLQuantizationType[key]


def _file_type(qtype: Any) -> int:
    gguf = _gguf()
    F = gguf.LlamaFileType
    if qtype.name == "F32":
        return int(F.ALL_F32)
    for cand in (f"MOSTLY_{qtype.name}", f"MOSTLY_{qtype.name}_MOE"):
        if cand in F.__members__:
            return int(F[cand])
    return int(F.GUESSED)


def _hf_tensors(sd: Dict[str, Any], qcfg: Any, ckpt: Path) -> List[Tuple[str, str]]:
    """(checkpoint key, GGUF name) pairs in llama.cpp's order."""
    pre = "llm.model."
    pairs: List[Tuple[str, str]] = [(pre + "model.embed_tokens.weight", "token_embd.weight")]
    for i in range(qcfg.num_hidden_layers):
        for hf, gg in HF_TO_GGUF.items():
            if "{i}" in hf:
                pairs.append((pre + hf.format(i=i), gg.format(i=i)))
    pairs.append((pre + "model.norm.weight", "output_norm.weight"))
    if not qcfg.tie_word_embeddings:
        key = pre + "lm_head.weight"
        pairs.append((key if key in sd else pre + "model.embed_tokens.weight", "output.weight"))
    missing = [k for k, _ in pairs if k not in sd]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} lacks {len(missing)} Qwen2 tensor(s) needed for the GGUF: "
                              + ", ".join(missing[:8]) + (" …" if len(missing) > 8 else ""))
    return pairs


def _add_tokenizer(w: Any, tok_dir: Path, n_rows: int, qjson: Dict[str, Any]) -> bool:
    """gpt2-style BPE metadata from vocab.json/merges.txt; False (no_vocab) when they are absent."""
    gguf = _gguf()
    vocab_p, merges_p = tok_dir / "vocab.json", tok_dir / "merges.txt"
    if not (vocab_p.is_file() and merges_p.is_file()):
        return False
    vocab: Dict[str, int] = json.loads(vocab_p.read_text(encoding="utf-8"))
    special: Dict[int, str] = {}
    tc = tok_dir / "tokenizer_config.json"
    if tc.is_file():
        for k, v in (json.loads(tc.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}).items():
            if isinstance(v, dict) and "content" in v:
                special[int(k)] = v["content"]
                vocab.setdefault(v["content"], int(k))
    tokens = [f"[PAD{i}]" for i in range(n_rows)]
    types = [int(gguf.TokenType.UNUSED)] * n_rows
    for tok, i in vocab.items():
        if 0 <= i < n_rows:
            tokens[i] = tok
            types[i] = int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    merges = [ln for ln in merges_p.read_text(encoding="utf-8").splitlines() if ln and not ln.startswith("#version")]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, fn in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
        if isinstance(qjson.get(key), int):
            fn(int(qjson[key]))
    if isinstance(qjson.get("eos_token_id"), int):
        w.add_pad_token_id(int(qjson["eos_token_id"]))
    w.add_add_bos_token(False)
    return True


def export_gguf(model: Union[str, Path, None], output: Union[str, Path], qtype: str = "F16", arch: str = "qwen2",
                fmt: str = "auto", llm_rl: bool = False, vocab: bool = True, name: Optional[str] = None,
                progress: bool = True) -> Dict[str, Any]:
    """Write the Qwen2 trunk of the model's LLM to ``output`` as GGUF; returns a summary dict."""
    gguf = _gguf()
    from .checkpoint import read_state_dict
    from .config import ModelConfig
    from .loading import find_checkpoint, resolve_model_dir
    from .progress import Progress

    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown GGUF architecture name {arch!r}; use {' or '.join(ARCHITECTURES)}")
    qt = _parse_type(qtype)
    t0 = time.perf_counter()
    model_dir = resolve_model_dir(model)
    cfg = ModelConfig.from_model_dir(model_dir)
    q = cfg.qwen2
    ckpt = find_checkpoint(model_dir, "llm", fmt, llm_rl)
    sd = read_state_dict(ckpt)
    pairs = _hf_tensors(sd, q, ckpt)
    qjson_path = model_dir / "CosyVoice-BlankEN" / "config.json"
    qjson = json.loads(qjson_path.read_text(encoding="utf-8"))

    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_type("model")
    w.add_name(name or f"CosyVoice3 LLM Qwen2 trunk ({model_dir.name})")
    w.add_description("Qwen2 trunk of the CosyVoice3 speech-token LM (cosytools export gguf); speech_embedding "
                      "and llm_decoder stay in llm.pt / llm.safetensors")
    w.add_context_length(q.max_position_embeddings)
    w.add_embedding_length(q.hidden_size)
    w.add_block_count(q.num_hidden_layers)
    w.add_feed_forward_length(q.intermediate_size)
    w.add_head_count(q.num_attention_heads)
    w.add_head_count_kv(q.num_key_value_heads)
    w.add_rope_freq_base(q.rope_theta)
    w.add_layer_norm_rms_eps(q.rms_norm_eps)
    if arch == "llama":
        w.add_rope_dimension_count(q.head_dim)
        w.add_vocab_size(q.vocab_size)
    w.add_file_type(_file_type(qt))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab_written = vocab and _add_tokenizer(w, model_dir / "CosyVoice-BlankEN", q.vocab_size, qjson)
    if not vocab_written:
        w.add_tokenizer_model("no_vocab")

    perm = {}
    if arch == "llama":
        perm = {"attn_q": llama_permute_rows(q.num_attention_heads * q.head_dim, q.num_attention_heads),
                "attn_k": llama_permute_rows(q.num_key_value_heads * q.head_dim, q.num_key_value_heads)}
    F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16
    counts: Dict[str, int] = {}
    fallbacks: List[str] = []
    with Progress(f"GGUF {qt.name}", total=len(pairs), unit="tensors", enabled=progress) as bar:
        for key, gname in pairs:
            arr = sd[key].detach().float().cpu().numpy()
            kind = gname.split(".")[-2]
            if kind in perm:
                arr = np.ascontiguousarray(arr[perm[kind]])
            t = F32 if arr.ndim == 1 else qt
            try:
                data = gguf.quants.quantize(arr, t)
            except (gguf.quants.QuantError, ValueError):
                t = F32 if qt == F32 else F16
                data = gguf.quants.quantize(arr, t)
                fallbacks.append(f"{gname} {list(arr.shape)} -> {t.name}")
            if t in (F32, F16):
                w.add_tensor(gname, data)
            else:
                w.add_tensor(gname, data, raw_dtype=t)
            counts[t.name] = counts.get(t.name, 0) + 1
            bar.update()
    del sd
    if fallbacks:
        log.warning("%d tensor(s) cannot be stored as %s (row length not a multiple of its block) and were "
                    "written as F16: %s", len(fallbacks), qt.name, "; ".join(fallbacks[:4]))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
    finally:
        w.close()
    os.replace(tmp, out)
    return {"output": str(out), "bytes": out.stat().st_size, "architecture": arch, "type": qt.name,
            "source": str(ckpt), "tensors": counts, "fallbacks": fallbacks, "vocab": bool(vocab_written),
            "seconds": round(time.perf_counter() - t0, 2)}


@click.command("gguf")
@click.option("--model", default="tiny", show_default=True,
              help="Model dir (upstream layout), or 'tiny' / 'full' for a built-in random-weight model.")
@click.option("--type", "qtype", default="F16", show_default=True,
              help="Storage type of the 2-D weights: F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 (or any type "
                   "the installed gguf library can quantize to, e.g. TQ2_0, MXFP4). Norms and biases stay F32.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="GGUF file to write.")
@click.option("--arch-name", "arch", type=click.Choice(list(ARCHITECTURES)), default="qwen2", show_default=True,
              help="Metadata spelling: qwen2 (llama.cpp's converter) or llama (qwen2 weights under llama.* keys, "
                   "q/k permuted for llama.cpp's llama RoPE).")
@click.option("--format", "fmt", type=click.Choice(["auto", "pt", "safetensors"]), default="auto", show_default=True,
              help="Which float LLM checkpoint to read.")
@click.option("--rl", "llm_rl", is_flag=True, help="Read llm.rl.pt instead of llm.pt.")
@click.option("--no-vocab", is_flag=True, help="Write no tokenizer (tokenizer.ggml.model = no_vocab).")
@click.option("--name", default=None, help="general.name of the file.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def gguf_command(model: str, qtype: str, output: str, arch: str, fmt: str, llm_rl: bool, no_vocab: bool,
                 name: Optional[str], as_json: bool) -> None:
    """Write the Qwen2 part of the CosyVoice3 LLM as a GGUF file (llama.cpp's format).

    Put the file in the model dir as llm.gguf (or point COSYVOICE_LLM_GGUF at it) and cosytools
    runs the LLM trunk from it, dequantizing per layer; speech_embedding and llm_decoder still
    come from llm.pt.  Measure the drift with `cosytools parity llm --gguf FILE`.

    \b
    Example:
      cosytools export gguf --model ./cv3 --type Q8_0 -o ./cv3/llm.gguf
      cosytools parity llm --ref refs/llm_teacher.safetensors --model ./cv3 --gguf ./cv3/llm.gguf
    """
    if qtype.strip().upper() not in writable_types():
        raise click.BadParameter(f"{qtype!r}; choose one of {', '.join(writable_types())}", param_hint="--type")
    res = export_gguf(model, output, qtype=qtype, arch=arch, fmt=fmt, llm_rl=llm_rl, vocab=not no_vocab, name=name,
                      progress=not as_json)
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        kinds = ", ".join(f"{n} {k}" for k, n in res["tensors"].items())
        click.echo(f"wrote {res['output']}: {res['bytes'] / 2**20:.1f} MiB, {res['architecture']} {res['type']} "
                   f"({kinds}) in {res['seconds']:.1f} s")
        if res["fallbacks"]:
            click.echo(f"  {len(res['fallbacks'])} tensor(s) written as F16 (rows not a multiple of the "
                       f"{res['type']} block): " + "; ".join(res["fallbacks"][:4]), err=True)
