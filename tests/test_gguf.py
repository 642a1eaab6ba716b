"""GGUF for the Qwen2 trunk of the CosyVoice3 LLM: export -> import parity, quant drift bounds,
llama-named files, error handling, selection (llm.gguf / $COSYVOICE_LLM_GGUF / OFF).

Tiny fixture model only.  Drift bounds below are the tiny-model measurements of
docs/quantization.md with margin (F16 measured 8.7e-3, Q8_0 1.5e-1 log-prob max abs).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from cosytools.cli import main  # noqa: E402
from cosytools.errors import CheckpointError  # noqa: E402
from cosytools.gguf_export import export_gguf  # noqa: E402
from cosytools.gguf_io import (GGUF_ENV, GGUF_QK_ENV, GGUFEmbedding, GGUFLinear, dequantize,  # noqa: E402
                               llama_permute_rows, read_gguf)
from cosytools.loading import load_model  # noqa: E402
from cosytools.models.qwen2 import apply_rope, rope_cos_sin  # noqa: E402

T = gguf.GGMLQuantizationType
REF = "llm_teacher"
BOUNDS = {  # log-prob max abs, cosine, top-1 agreement over the 25 teacher-forced steps
    "F16": (2e-2, 0.99999, 0.96),
    "Q8_0": (3e-1, 0.99999, 0.96),
}


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(GGUF_ENV, raising=False)
    monkeypatch.delenv(GGUF_QK_ENV, raising=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory, fixture_model_dir):
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for name, qtype, arch, vocab in (("F32", "F32", "qwen2", True), ("F16", "F16", "qwen2", False),
                                     ("Q8_0", "Q8_0", "qwen2", False), ("Q4_0", "Q4_0", "qwen2", False),
                                     ("llama-F32", "F32", "llama", False)):
        out[name] = Path(export_gguf(fixture_model_dir, d / f"{name}.gguf", qtype=qtype, arch=arch, vocab=vocab,
                                     progress=False)["output"])
    return out


def _teacher(model, load_ref):
    t, _ = load_ref(REF)
    args = [t[f"llm.in.{k}"].long().reshape(1, -1) for k in ("text", "prompt_text", "prompt_speech_token")]
    res = model.llm.teacher_force(*args, t["llm.in.forced_tokens"].reshape(-1).tolist())
    return res.logp, t["llm.out.logp"]


def _drift(ours, ref):
    d = float((ours - ref).abs().max())
    cos = float(torch.nn.functional.cosine_similarity(ours.double().reshape(1, -1), ref.double().reshape(1, -1)))
    top1 = float((ours.argmax(-1) == ref.argmax(-1)).double().mean())
    return d, cos, top1


# --- round trip and drift -----------------------------------------------------------------------
def test_f32_roundtrip_reproduces_reference(files, fixture_model_dir, load_ref):
    m = load_model(fixture_model_dir, components=("llm",), gguf=files["F32"])
    assert m.files["llm"] == str(files["F32"]) and m.files["llm_gguf_type"] == "F32"
    assert m.files["llm_float"].endswith(("llm.pt", "llm.safetensors"))
    ours, ref = _teacher(m, load_ref)
    assert float((ours - ref).abs().max()) <= 1e-4


@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_quantized_drift_within_documented_bounds(files, fixture_model_dir, load_ref, qtype):
    m = load_model(fixture_model_dir, components=("llm",), gguf=files[qtype])
    d, cos, top1 = _drift(*_teacher(m, load_ref))
    max_abs, min_cos, min_top1 = BOUNDS[qtype]
    assert 0 < d <= max_abs and cos >= min_cos and top1 >= min_top1, (d, cos, top1)


def test_q4_0_runs_and_is_only_quantization_error(files, fixture_model_dir, load_ref):
    """Q4_0 runs; and the per-layer GGUF path equals the float model holding the weights that
    gguf.quants.dequantize decodes (so all drift is the quantization itself)."""
    g = load_model(fixture_model_dir, components=("llm",), gguf=files["Q4_0"])
    ours, ref = _teacher(g, load_ref)
    assert bool(torch.isfinite(ours).all())
    d, cos, top1 = _drift(ours, ref)
    assert d < 10 and cos > 0.99 and top1 >= 0.5

    f = load_model(fixture_model_dir, components=("llm",), gguf=False)
    gf = read_gguf(files["Q4_0"])
    q = f.llm.llm.model
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(q.config.num_hidden_layers):
        for hf, gg in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                       ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                       ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
                       ("post_attention_layernorm", "ffn_norm")):
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    with torch.no_grad():
        for hf, gg in names.items():
            t = gf.tensors[gg]
            w = torch.from_numpy(np.array(gguf.quants.dequantize(np.asarray(t.data), t.qtype), dtype=np.float32))
            q.get_parameter(hf).copy_(w.reshape(t.shape))
    float_deq, _ = _teacher(f, load_ref)
    assert float((ours - float_deq).abs().max()) <= 1e-4


def test_loaded_model_holds_quantized_blocks_not_floats(files, fixture_model_dir):
    m = load_model(fixture_model_dir, components=("llm",), gguf=files["Q4_0"])
    mods = [x for x in m.llm.modules() if isinstance(x, (GGUFLinear, GGUFEmbedding))]
    assert len(mods) == 2 * 7 + 2  # 7 matrices per layer, embed_tokens, lm_head
    for x in mods:
        assert x.qtype == T.Q4_0 and x._data.dtype == np.uint8
        assert getattr(x, "_cached", None) is None
    emb = m.llm.llm.model.model.embed_tokens
    base = emb._data
    while getattr(base, "base", None) is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)  # a view of the mapped file, not a copy


# --- dequantization ---------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_dequantize_matches_gguf_library(qtype):
    qt = T[qtype]
    g = np.random.default_rng(0)
    w = (g.standard_normal((8, 64)) * np.array([1e-3, 1.0, 40.0, 0.0])[:, None].repeat(2, 0)).astype(np.float32)
    data = gguf.quants.quantize(w, qt)
    want = np.asarray(gguf.quants.dequantize(data, qt), dtype=np.float32)
    got = dequantize(data, qt, w.shape)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))
    rel = np.abs(want - w).max() / np.abs(w).max()
    assert rel <= {"F32": 0, "F16": 1e-3, "BF16": 4e-3, "Q8_0": 1e-2}.get(qtype, 0.1)


def test_types_without_a_writer_still_dequantize():
    bs, ts = gguf.GGML_QUANT_SIZES[T.Q6_K]
    raw = np.random.default_rng(1).integers(0, 255, (2, ts), dtype=np.uint8)
    raw[:, -2:] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # a sane scale
    want = np.asarray(gguf.quants.dequantize(raw, T.Q6_K), dtype=np.float32)
    assert torch.equal(dequantize(raw, T.Q6_K, (2, bs)), torch.from_numpy(want))
    with pytest.raises(CheckpointError, match="Q8_1"):
        dequantize(np.zeros((1, 36), np.uint8), T.Q8_1, (1, 32), "x")


# --- llama-named files ------------------------------------------------------------------------
def test_llama_named_file_loads_the_same(files, fixture_model_dir, load_ref):
    gl, gq = read_gguf(files["llama-F32"]), read_gguf(files["F32"])
    assert gl.architecture == "llama" and gl.get("attention.head_count") == 4 and gl.get("rope.freq_base") == 1e6
    assert gl.get("embedding_length") == 32 and gl.get("block_count") == 2 and gl.get("attention.head_count_kv") == 2
    assert "qwen2.embedding_length" not in gl.metadata
    # q/k rows (and biases) are stored in llama.cpp's llama order, v is not
    for n in ("blk.0.attn_q.weight", "blk.0.attn_k.bias"):
        assert not np.array_equal(gl.tensors[n].data, gq.tensors[n].data)
    assert np.array_equal(gl.tensors["blk.0.attn_v.weight"].data, gq.tensors["blk.0.attn_v.weight"].data)
    a, _ = _teacher(load_model(fixture_model_dir, components=("llm",), gguf=files["llama-F32"]), load_ref)
    b, _ = _teacher(load_model(fixture_model_dir, components=("llm",), gguf=files["F32"]), load_ref)
    assert torch.equal(a, b)


def test_llama_row_order_is_what_interleaved_rope_needs():
    """RoPE on HF-ordered q with rotate-half == interleaved-pair RoPE on the permuted rows."""
    n_head, hd, theta = 3, 8, 1e6
    q = torch.randn(n_head * hd, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(5)
    cos, sin = rope_cos_sin(pos, hd, theta, torch.float32)                 # [T, hd]
    neox = apply_rope(q.reshape(1, n_head, 1, hd), cos[None, None], sin[None, None])  # [1, H, T, hd]
    order = torch.from_numpy(llama_permute_rows(n_head * hd, n_head))
    qp = q[order].reshape(n_head, hd // 2, 2)                               # adjacent pairs
    ang = pos[:, None].float() * (1.0 / theta ** (torch.arange(0, hd, 2).float() / hd))[None]   # [T, hd/2]
    c, s = ang.cos()[None], ang.sin()[None]                                 # [1, T, hd/2]
    x0, x1 = qp[:, None, :, 0], qp[:, None, :, 1]
    inter = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).reshape(n_head, len(pos), hd)
    assert torch.allclose(inter, neox[0].reshape(n_head, len(pos), hd)[:, :, order.reshape(n_head, hd)[0]], atol=1e-6)


def test_qk_layout_override_matters(files, fixture_model_dir, load_ref, monkeypatch):
    monkeypatch.setenv(GGUF_QK_ENV, "hf")  # pretend the llama-named file kept HF row order
    d, _, _ = _drift(*_teacher(load_model(fixture_model_dir, components=("llm",), gguf=files["llama-F32"]), load_ref))
    assert d > 1e-3


# --- metadata --------------------------------------------------------------------------------
def test_written_metadata_and_types(files):
    g = read_gguf(files["Q8_0"])
    md = g.metadata
    assert md["general.architecture"] == "qwen2" and md["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert md["qwen2.context_length"] == 4096 and md["qwen2.feed_forward_length"] == 64
    assert md["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert md["tokenizer.ggml.model"] == "no_vocab"
    assert "output.weight" not in g.tensors  # tied embeddings: llama.cpp reuses token_embd
    for n, t in g.tensors.items():
        want = T.F32 if (n.endswith(".bias") or "norm" in n) else T.Q8_0
        assert t.qtype == want, n
    f32 = read_gguf(files["F32"])  # with the tokenizer, read fast (string arrays are skipped)
    assert f32.metadata["tokenizer.ggml.model"] == "gpt2" and f32.array_lengths["tokenizer.ggml.tokens"] == 151936


# --- errors: clear message, exit 2 ------------------------------------------------------------
def _rewrite(src: Path, dst: Path, drop=(), meta=None, retype=None) -> Path:
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        w.add_key_value(name, (meta or {}).get(name, f.contents()), f.types[0],
                        sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        if t.name in drop:
            continue
        if retype and t.name in retype:
            qt = retype[t.name]
            bs, ts = gguf.GGML_QUANT_SIZES[qt]
            rows, cols = (int(x) for x in reversed(t.shape.tolist()))
            w.add_tensor(t.name, np.zeros((rows, cols // bs * ts), np.uint8), raw_dtype=qt)
        else:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def f32_novocab(tmp_path_factory, fixture_model_dir):
    d = tmp_path_factory.mktemp("gguf_err")
    return Path(export_gguf(fixture_model_dir, d / "ok.gguf", qtype="F32", vocab=False, progress=False)["output"])


def _parity(fixture_model_dir, fixtures, path, capsys):
    rc = main(["parity", "llm", "--ref", str(fixtures / "refs" / f"{REF}.safetensors"),
               "--model", str(fixture_model_dir), "--gguf", str(path)])
    return rc, capsys.readouterr().err


def test_corrupt_and_truncated_files(tmp_path, f32_novocab, fixture_model_dir, fixtures, capsys):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a gguf file at all" * 10)
    rc, err = _parity(fixture_model_dir, fixtures, junk, capsys)
    assert rc == 2 and "cannot read GGUF file" in err and "junk.gguf" in err
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(f32_novocab.read_bytes()[: f32_novocab.stat().st_size // 2])
    rc, err = _parity(fixture_model_dir, fixtures, cut, capsys)
    assert rc == 2 and "truncated" in err and "cut.gguf" in err
    with pytest.raises(CheckpointError, match="does not exist"):
        read_gguf(tmp_path / "missing.gguf")


def test_unsupported_type(tmp_path, f32_novocab, fixture_model_dir, fixtures, capsys):
    bad = _rewrite(f32_novocab, tmp_path / "q81.gguf", retype={"blk.0.attn_q.weight": T.Q8_1})
    rc, err = _parity(fixture_model_dir, fixtures, bad, capsys)
    assert rc == 2 and "blk.0.attn_q.weight" in err and "Q8_1" in err and "cannot dequantize" in err


def test_missing_tensor(tmp_path, f32_novocab, fixture_model_dir, fixtures, capsys):
    bad = _rewrite(f32_novocab, tmp_path / "miss.gguf", drop={"blk.1.ffn_down.weight"})
    rc, err = _parity(fixture_model_dir, fixtures, bad, capsys)
    assert rc == 2 and "missing" in err and "blk.1.ffn_down.weight" in err


def test_wrong_head_count(tmp_path, f32_novocab, fixture_model_dir, fixtures, capsys):
    bad = _rewrite(f32_novocab, tmp_path / "heads.gguf", meta={"qwen2.attention.head_count": 8})
    rc, err = _parity(fixture_model_dir, fixtures, bad, capsys)
    assert rc == 2 and "qwen2.attention.head_count is 8" in err and "num_attention_heads = 4" in err


def test_export_cli(tmp_path, fixture_model_dir, capsys):
    out = tmp_path / "x.gguf"
    assert main(["export", "gguf", "--model", str(fixture_model_dir), "--type", "q4_1", "-o", str(out),
                 "--no-vocab", "--json"]) == 0
    assert '"type": "Q4_1"' in capsys.readouterr().out and read_gguf(out).main_type == "Q4_1"
    assert main(["export", "gguf", "--model", str(fixture_model_dir), "--type", "Q9_9", "-o", str(out)]) == 2


def test_parity_cli_reports_drift(files, fixture_model_dir, fixtures, capsys):
    ref = str(fixtures / "refs" / f"{REF}.safetensors")
    # exit 0: within the documented Q8_0 bound (GGUF_TOLERANCES), though far outside the float one
    assert main(["parity", "llm", "--ref", ref, "--model", str(fixture_model_dir), "--gguf", str(files["Q8_0"])]) == 0
    out = capsys.readouterr().out
    assert "GGUF Q8_0 drift over 25 teacher-forced steps: log-prob max abs" in out and "gguf_type=Q8_0" in out
    assert main(["parity", "llm", "--ref", ref, "--model", str(fixture_model_dir), "--gguf", str(files["F32"]),
                 "--no-gguf"]) == 2


# --- selection -------------------------------------------------------------------------------
def test_selection_dir_env_and_off(tmp_path, files, fixture_model_dir, monkeypatch):
    d = tmp_path / "model"
    d.mkdir()
    for p in fixture_model_dir.iterdir():
        if p.name != "llm.safetensors":
            os.symlink(p, d / p.name)
    os.symlink(files["Q8_0"], d / "llm.gguf")

    assert load_model(d, components=("llm",)).files["llm"] == str(d / "llm.gguf")
    assert load_model(d, components=("llm",), gguf=False).files["llm"] == str(d / "llm.pt")
    monkeypatch.setenv(GGUF_ENV, "OFF")
    m = load_model(d, components=("llm",))
    assert m.files["llm"] == str(d / "llm.pt") and "llm_gguf_type" not in m.files
    assert not any(isinstance(x, GGUFLinear) for x in m.llm.modules())
    monkeypatch.setenv(GGUF_ENV, str(files["F16"]))
    assert load_model(d, components=("llm",)).files["llm_gguf_type"] == "F16"
    monkeypatch.setenv(GGUF_ENV, str(tmp_path / "nope.gguf"))
    with pytest.raises(CheckpointError, match="COSYVOICE_LLM_GGUF"):
        load_model(d, components=("llm",))
