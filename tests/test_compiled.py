"""The ``compiled`` backend on CPU (tiny fixture model).

Compile time on two CPU cores is the constraint, so each test picks the cheapest build that
shows its point: ``compile_backend='none'`` runs the backend's static-shape code (buckets,
static KV cache, device sampling) without torch.compile; ``aot_eager`` adds Dynamo's full-graph
capture (every compiled region traced with ``fullgraph=True``) without code generation; one
test runs real inductor (LLM prefill + decode step: tokens and logits vs the dumps).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import backends
from backends.compiled import CompiledBackend
from backends.compiled_llm import consume_blocks, hash_exponential, ras_sample_device
from backends.compiled_util import as_tuple, bucket, parse_option_string, pow2_bucket
from cosytools.cli import main
from cosytools.errors import ConfigError
from cosytools.loading import load_model
from cosytools.models.dit import dit_attention_mask, grouped_conv1d_as_matmul
from cosytools.models.sampling import ras_sampling
from parity.dump import read_dump
from parity.metrics import compare_tensor, default_tolerance
from parity.report import build_report
from parity.runners import _flow_args, _flow_noise, run_dump

CHEAP = dict(compile_backend="none", prefill_buckets=(64,), flow_buckets=(128, 256, 512))


def _dump(fixtures, name):
    return read_dump(fixtures / "refs" / f"{name}.safetensors")


def _llm_args(d):
    i = d.inputs
    return tuple(i[k].long().reshape(1, -1) for k in ("text", "prompt_text", "prompt_speech_token"))


@pytest.fixture(scope="module")
def llm_model(fixture_model_dir):
    return load_model(fixture_model_dir, components=("llm",))


@pytest.fixture(scope="module")
def t2w_model(fixture_model_dir):
    return load_model(fixture_model_dir, components=("flow", "hift"))


def _passes(backend, dump):
    rep = build_report(dump, run_dump(backend, dump), default_tolerance(dump.stage))
    return rep, [(t.name, t.max_abs, t.max_rel) for t in rep.tensors if not t.passed]


# ----------------------------------------------------------------------------- parity


def test_cli_parity_run_passes_every_dump(capsys, fixtures, monkeypatch):
    """`cosytools parity run refs --backend compiled` at the default float32 tolerances
    (options through $COSYTOOLS_COMPILED; the inductor build of the same run is in the report)."""
    monkeypatch.setenv("COSYTOOLS_COMPILED", "compile_backend=none,prefill_buckets=64,flow_buckets=128:256:512")
    code = main(["parity", "run", str(fixtures / "refs"), "--model", str(fixtures / "model"),
                 "--backend", "compiled", "--json"])
    res = json.loads(capsys.readouterr().out)
    failed = [(r["ref"], r["first_divergence"]) for r in res["reports"] if not r["passed"]]
    assert not failed, failed
    assert code == 0 and res["passed"]
    assert {r["backend"] for r in res["reports"] if r["stage"] in ("llm", "flow", "hift", "e2e")} == {"compiled"}
    assert {"llm", "flow", "hift", "e2e"} <= {r["stage"] for r in res["reports"]}


def test_inductor_llm_exact_tokens_and_logits(llm_model, fixtures):
    """Real inductor: exact sampling reproduces llm_sample's tokens (and every id drawn), and the
    KV-cached step logits match llm_teacher at the float32 tolerance."""
    be = backends.create("compiled", llm_model, capture=False, compile_backend="inductor", prefill_buckets=(64,))
    assert be.opts["exact_sampling"]  # the CPU default
    d = _dump(fixtures, "llm_sample")
    sampled = []
    gen = torch.Generator().manual_seed(int(d.flag("seed")))
    toks = list(be.llm_generate(*_llm_args(d), min_len=int(d.flag("min_len")), max_len=int(d.flag("max_len")),
                                generator=gen, sampled=sampled))
    assert toks == d.tensors["llm.out.tokens"].reshape(-1).tolist()
    assert sampled == d.tensors["llm.tap.sampled"].reshape(-1).tolist()

    t = _dump(fixtures, "llm_teacher")
    forced = t.inputs["forced_tokens"].reshape(-1).tolist()
    # same prefill bucket and cache length as above: no new compilation
    s = be.llm_session(*_llm_args(t), max_new_tokens=int(d.flag("max_len")))
    rows = [s.logp] + [s.step(x).clone() for x in forced]
    rep = compare_tensor("llm.out.logp", t.tensors["llm.out.logp"], torch.stack(rows), default_tolerance("llm"),
                         logits=True)
    assert rep.passed, rep


def test_dynamo_full_graph_capture_flow_and_hift(t2w_model, fixtures):
    """aot_eager: the flow step (streaming chunk mask, look-ahead context; traced with a symbolic
    length, ``flow_dynamic``, which is the harder case of the default per-bucket static trace) and
    the HiFT conv stack / F0 predictor (streaming call, dynamic length) trace as full graphs and
    pass their dumps."""
    be = backends.create("compiled", t2w_model, capture=False, compile_backend="aot_eager", flow_buckets=(256,),
                         flow_dynamic=True)
    for name in ("flow_stream_0", "hift_chunk_0"):
        rep, bad = _passes(be, _dump(fixtures, name))
        assert rep.passed and not bad, (name, bad)


def test_regional_compilation_traces_one_layer_and_passes(llm_model, t2w_model, fixtures):
    """``regional=True``: the decoder layer and the DiT block are compiled as functions of the
    layer (full graphs under aot_eager), shared by every layer, and the stage dumps still pass."""
    from torch._dynamo.testing import CompileCounter

    from backends.compiled_llm import StaticLM, decode_layer
    from cosytools.models.qwen2 import rope_cos_sin

    be = backends.create("compiled", llm_model, capture=False, compile_backend="aot_eager", regional=True,
                         prefill_buckets=(64,), exact_sampling=True)
    rep, bad = _passes(be, _dump(fixtures, "llm_teacher"))
    assert rep.passed and not bad, bad
    assert be.llm_runner._layer_fns is not None
    # the layer function compiled once serves every layer (the layer is an input, not a constant)
    st = StaticLM(be.llm_runner.lm, 256)
    assert len(st.trunk.layers) > 1
    cnt = CompileCounter()
    fn = torch.compile(decode_layer, backend=cnt, fullgraph=True)
    with torch.inference_mode():
        h = torch.randn(1, 1, st.hidden.shape[0])
        cos, sin = rope_cos_sin(st.pos, st.head_dim, st.theta, h.dtype)
        mask = (torch.arange(st.S) <= st.pos).view(1, 1, 1, st.S)
        for layer, c in zip(st.trunk.layers, st.caches):
            h = fn(layer, c, h, st.pos, cos, sin, mask)
    assert cnt.frame_count == 1
    fb = backends.create("compiled", t2w_model, capture=False, compile_backend="aot_eager", regional=True,
                         flow_buckets=(256,))
    assert fb.flow_runner._block is not None
    rep, bad = _passes(fb, _dump(fixtures, "flow_stream_0"))
    assert rep.passed and not bad, bad


def test_regional_option_per_part(llm_model, t2w_model):
    """``regional`` = true / false / llm / flow picks which parts compile one layer or block."""
    cases = {True: (True, True), False: (False, False), "llm": (True, False), "flow": (False, True)}
    for value, (want_llm, want_flow) in cases.items():
        lb = backends.create("compiled", llm_model, capture=False, compile_backend="aot_eager", regional=value)
        fb = backends.create("compiled", t2w_model, capture=False, compile_backend="aot_eager", regional=value)
        assert lb.llm_runner.regional == want_llm and fb.flow_runner.regional == want_flow, value
    assert backends.create("compiled", llm_model, regional="llm").describe()["regional"] == "llm"
    with pytest.raises(ConfigError, match="regional"):
        backends.create("compiled", llm_model, regional="dit")


def test_conv_pos_as_matmul_passes_flow_dumps(t2w_model, fixtures):
    """``conv_pos=matmul`` (the CUDA default) meets the eager flow tolerances on the dumps."""
    be = backends.create("compiled", t2w_model, capture=False, conv_pos="matmul", **CHEAP)
    assert be.flow_runner._conv_fn is not None
    for name in ("flow_full", "flow_stream_0"):
        rep, bad = _passes(be, _dump(fixtures, name))
        assert rep.passed and not bad, (name, bad)
    with pytest.raises(ConfigError, match="conv_pos"):
        backends.create("compiled", t2w_model, conv_pos="fft")
    # regional: the im2col convolution is compiled as its own region, and still passes
    from torch._dynamo.testing import CompileCounter

    rb = backends.create("compiled", t2w_model, capture=False, compile_backend="aot_eager", regional=True,
                         conv_pos="matmul", flow_buckets=(256,))
    assert rb.flow_runner._conv_fn is not grouped_conv1d_as_matmul
    rep, bad = _passes(rb, _dump(fixtures, "flow_stream_0"))
    assert rep.passed and not bad, bad
    cnt = CompileCounter()
    fn = torch.compile(grouped_conv1d_as_matmul, backend=cnt, fullgraph=True)
    pe = t2w_model.flow.decoder.estimator.input_embed.conv_pos_embed
    with torch.inference_mode():
        x = torch.randn(2, pe.conv1[0].in_channels, 40 + pe.kernel_size - 1)
        for conv in (pe.conv1[0], pe.conv2[0]):
            torch.testing.assert_close(fn(x, conv), conv(x), rtol=1e-5, atol=1e-5)
    assert cnt.frame_count == 1  # one graph serves both convolutions


def test_hift_whole_call_matches_eager(t2w_model):
    """The function the CUDA backend captures as one HiFT graph (source noise as inputs, iSTFT
    written out) gives eager's waveform and source, both finalize modes."""
    be = backends.create("compiled", t2w_model, capture=False, compile_backend="none")
    h = t2w_model.hift
    r = be.hift_runner
    with torch.inference_mode():
        for finalize in (True, False):
            mel = torch.randn(1, 80, 40, generator=torch.Generator().manual_seed(3)) - 4.0
            want, want_s = h.inference(mel, finalize=finalize)
            tables = h.source_noise(mel.shape[-1], finalize, None, mel.device)
            got, got_s = r.whole_call(mel, *tables, finalize=finalize)
            assert got.shape == want.shape and got_s.shape == want_s.shape
            torch.testing.assert_close(got_s, want_s, rtol=0, atol=0)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_hift_whole_call_capture_failure_falls_back(t2w_model, caplog):
    """If the whole-call graph cannot be captured (forced here on CPU, where any capture fails),
    the runner warns once, turns the whole-call graph off and returns the per-part result."""
    be = backends.create("compiled", t2w_model, capture=False, compile_backend="none", hift_graph_after=1)
    r = be.hift_runner
    r.full_graph = True
    mel = torch.randn(1, 80, 30, generator=torch.Generator().manual_seed(4)) - 4.0
    with caplog.at_level("WARNING", logger="backends.compiled_flow"):
        got, _ = be.hift(mel)
    assert not r.full_graph and "capturing the whole call" in caplog.text
    want, _ = t2w_model.hift.inference(mel)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_conv_pos_triton_op_traces_and_passes(t2w_model, fixtures):
    """``conv_pos=triton``: the custom op traces as one opaque call under a full-graph compile and,
    where the kernel does not run (no Triton, or the tiny model's 4-channel groups), computes the
    same convolution as the im2col path: the flow dumps pass."""
    from torch._dynamo.testing import CompileCounter

    from backends.triton_conv import conv_fn, grouped_conv1d

    be = backends.create("compiled", t2w_model, capture=False, compile_backend="aot_eager", conv_pos="triton",
                         flow_buckets=(256,))
    assert be.flow_runner._conv_fn is conv_fn
    rep, bad = _passes(be, _dump(fixtures, "flow_stream_0"))
    assert rep.passed and not bad, bad
    conv = torch.nn.Conv1d(64, 64, 31, groups=4)
    x = torch.randn(2, 64, 50)
    cnt = CompileCounter()
    fn = torch.compile(lambda a: grouped_conv1d(a, conv.weight, conv.bias, 4) * 2.0, backend=cnt, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(fn(x), conv(x) * 2.0, rtol=1e-5, atol=1e-5)
    assert cnt.frame_count == 1


def test_triton_grouped_conv_kernel_interpreted():
    """The Triton kernel itself, run by Triton's CPU interpreter (skipped where Triton is absent):
    equal to conv1d up to float32 round-off for group widths 16-64, with and without bias."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import torch\n"
        "from backends.triton_conv import grouped_conv1d, kernel_available\n"
        "torch.manual_seed(0)\n"
        "for g, cin, k, n, b, bias in [(16, 16, 31, 70, 2, True), (4, 32, 3, 5, 1, False), (2, 64, 31, 97, 1, True)]:\n"
        "    conv = torch.nn.Conv1d(g * cin, g * cin, k, groups=g, bias=bias)\n"
        "    x = torch.randn(b, g * cin, n + k - 1)\n"
        "    assert kernel_available(x, conv.weight, g)\n"
        "    with torch.no_grad():\n"
        "        want = conv(x)\n"
        "        got = grouped_conv1d(x, conv.weight, conv.bias, g)\n"
        "    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))\n"
        "print('ok')\n")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_hift_graph_cache_holds_a_streamed_utterance(t2w_model):
    """Repeating a streamed utterance (4 chunk lengths + the final call, which the non-streaming
    call shares) captures each length once: the HiFT graph caches hold more graphs than one
    utterance has lengths (with 4, LRU eviction re-captured on every call)."""
    from backends.compiled_util import GraphCache

    r = backends.create("compiled", t2w_model, capture=False, compile_backend="none").hift_runner
    for cache in (r.graphs, r.full_graphs):
        assert cache.max_size >= 8

    def captures(max_size):
        c, made = GraphCache(max_size=max_size, after=2), []
        for _ in range(4):  # warm-up + 3 timed repetitions, as `bench --stream`
            for key in ("full", "c1", "c2", "c3", "c4", "full"):
                c.get(key, lambda: made.append(1) or object())
        return len(made)

    assert captures(r.full_graphs.max_size) == 5
    assert captures(4) > 10


# ----------------------------------------------------------------------------- padding


def test_prefill_padding_leaves_logits_unchanged(llm_model, fixtures):
    """A prompt padded on the right to a bucket gives the logits of the unpadded prompt, and
    the decode steps after it are unaffected by the padded cache entries."""
    d = _dump(fixtures, "llm_teacher")
    forced = d.inputs["forced_tokens"].reshape(-1).tolist()[:4]
    runs = {}
    for buckets in ((), (64,), (128,)):
        be = backends.create("compiled", llm_model, capture=False, compile_backend="none", prefill_buckets=buckets)
        s = be.llm_session(*_llm_args(d), max_new_tokens=len(forced))
        runs[buckets] = [s.logp.clone()] + [s.step(x).clone() for x in forced]
    prompt_len = 1 + sum(x.shape[1] for x in _llm_args(d)) + 1
    assert prompt_len not in (64, 128)  # really padded
    for buckets in ((64,), (128,)):  # round-off only (matmuls of another row count)
        for a, b in zip(runs[()], runs[buckets]):
            torch.testing.assert_close(b, a, atol=1e-6 * float(a.abs().max()), rtol=0)


def test_fused_projection_decode_equals_module_weights(llm_model, fixtures):
    """The decode step with the CUDA layout (q|k|v and gate|up fused into one matrix each) gives
    the logits of the module's own projections, and samples the same device-sampling tokens."""
    from backends.compiled_llm import StaticLM

    d = _dump(fixtures, "llm_teacher")
    be = backends.create("compiled", llm_model, capture=False, compile_backend="none", prefill_buckets=(64,))
    lm_input = be._lm_input(*_llm_args(d))
    forced = d.inputs["forced_tokens"].reshape(-1).tolist()[:6]
    rows = {}
    with torch.inference_mode():
        for fuse in (False, True):
            st = StaticLM(be.llm_runner.lm, 256, fuse=fuse)
            assert st.fused is fuse and all(c.fused is fuse for c in st.caches)
            emb = F.pad(lm_input, (0, 0, 0, 64 - lm_input.shape[1]))
            out = [st.prefill(emb, torch.tensor([lm_input.shape[1] - 1]))[0].clone()]
            for t in forced:
                st.tok_in.fill_(t)
                out.append(st.step_exact()[0].clone())
            st.seed.fill_(7)
            st.min_len.fill_(0)
            toks = [int(st.step_device()) for _ in range(8)]
            rows[fuse] = (out, toks)
    for a, b in zip(rows[False][0], rows[True][0]):
        torch.testing.assert_close(b, a, atol=1e-6 * float(a.abs().max()), rtol=0)
    assert rows[False][1] == rows[True][1]


@pytest.mark.parametrize("streaming", [False, True])
def test_dit_padding_keeps_valid_frames(t2w_model, streaming):
    """The DiT on a right-padded bucket (zero frames, zero frame mask) reproduces the unpadded
    output on the valid frames: causal position convs, key masking, per-frame rest."""
    est = t2w_model.flow.decoder.estimator
    g = torch.Generator().manual_seed(0)
    n, pad = 70, 58  # crosses the 50-frame chunk boundary; bucket 128
    x, mu, cond = (torch.randn(2, 80, n, generator=g) for _ in range(3))
    spks, t = torch.randn(2, 80, generator=g), torch.rand(2, generator=g)
    mask = torch.ones(2, 1, n)
    with torch.inference_mode():
        ref = est(x, mask, mu, t, spks, cond, streaming=streaming)
        out = est(F.pad(x, (0, pad)), F.pad(mask, (0, pad)), F.pad(mu, (0, pad)), t, spks, F.pad(cond, (0, pad)),
                  streaming=streaming)
    torch.testing.assert_close(out[:, :, :n], ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
    # and the mask really hides the padding from valid queries
    am = dit_attention_mask(F.pad(mask, (0, pad)), streaming, est.static_chunk_size)
    assert not bool(am[:, :, :n, n:].any())


def test_flow_bucket_padding_equals_exact_length(t2w_model, fixtures):
    """Backend level: the mel of a bucketed (padded) ODE equals the exact-length one, streaming too."""
    for name, streaming in (("flow_full", False), ("flow_stream_1", True)):
        d = _dump(fixtures, name)
        args, noise = _flow_args(d), _flow_noise(d)
        kw = dict(streaming=streaming, finalize=bool(d.flag("finalize", True)), noise=noise)
        exact = backends.create("compiled", t2w_model, capture=False, compile_backend="none", flow_buckets=())
        padded = backends.create("compiled", t2w_model, capture=False, compile_backend="none", flow_buckets=(512,))
        a, b = exact.flow(*args, **kw), padded.flow(*args, **kw)
        assert padded.flow_runner.bucket_len(a.shape[-1] + 2 * d.inputs["prompt_token"].shape[1]) == 512
        torch.testing.assert_close(b, a, atol=1e-5 * float(a.abs().max()), rtol=0)


# ----------------------------------------------------------------------------- device sampling


def test_consume_blocks_discards_after_stop():
    pulled = []

    def blocks():
        for b in ([1, 2, 3], [4, 9001, 5], [6, 7]):
            pulled.append(b)
            yield b

    sampled = []
    out = list(consume_blocks(blocks(), lambda t: t >= 9000, sampled))
    assert out == [1, 2, 3, 4] and sampled == [1, 2, 3, 4, 9001]
    assert len(pulled) == 2  # the block after the stop is never run


def _stop_prone(model_dir, device="cpu"):
    """The fixture LLM with a bias that makes eos (6562) likely, so generations stop early."""
    m = load_model(model_dir, components=("llm",), device=device)
    old = m.llm.llm_decoder
    new = torch.nn.Linear(old.in_features, old.out_features, bias=True, device=old.weight.device)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.bias.zero_()
        new.bias[m.llm.speech_token_size + 1] = 5.0
    m.llm.llm_decoder = new
    return m


def test_parity_replays_rng_with_device_sampler(llm_model, fixtures):
    """A backend that samples on the device (the CUDA default) still meets the llm_sample dump:
    parity asks for ``exact=True``, which draws from the dump's generator as ras_sampling does."""
    be = backends.create("compiled", llm_model, capture=False, exact_sampling=False, **CHEAP)
    d = _dump(fixtures, "llm_sample")
    rep = build_report(d, run_dump(be, d), default_tolerance("llm"))
    assert rep.passed, rep.first_divergence
    toks = list(be.llm_generate(*_llm_args(d), min_len=int(d.flag("min_len")), max_len=int(d.flag("max_len")),
                                generator=torch.Generator().manual_seed(int(d.flag("seed")))))
    assert toks != d.tensors["llm.out.tokens"].reshape(-1).tolist()  # its own sampler draws differently


def test_stop_check_every_k(fixture_model_dir, fixtures):
    """Device sampling: the tokens do not depend on how many steps run between host stop checks;
    steps run after the stop are discarded; exact mode equals eager on the same model."""
    m = _stop_prone(fixture_model_dir)
    args = _llm_args(_dump(fixtures, "llm_sample"))
    max_len = 60

    def run(k, seed, **kw):
        be = backends.create("compiled", m, capture=False, exact_sampling=False, stop_check_every=k,
                             **{**CHEAP, **kw})
        sampled = []
        toks = list(be.llm_generate(*args, min_len=10, max_len=max_len, generator=torch.Generator().manual_seed(seed),
                                    sampled=sampled))
        return toks, sampled, be.llm_runner.steps_run

    for seed in range(12):  # the first seed whose generation stops before max_len
        toks, sampled, steps = run(1, seed)
        if len(sampled) < max_len:
            break
    n = len(sampled)
    assert n < max_len and m.llm.is_stop_token(sampled[-1]) and sampled[:-1] == toks
    assert not any(m.llm.is_stop_token(t) for t in toks) and steps == n
    k = 4 if n % 4 else 3
    for kk, kw in ((k, {}), (n + 2, {"compile_backend": "aot_eager"})):
        t2, s2, steps2 = run(kk, seed, **kw)
        assert (t2, s2) == (toks, sampled)
        assert steps2 == min(-(-n // kk) * kk, max_len) > n  # ran past the stop, discarded

    eager = backends.create("eager", m, capture=False)
    for seed in (0, 1):
        ref_s, ours_s = [], []
        ref = list(eager.llm_generate(*args, min_len=10, max_len=max_len, generator=torch.Generator().manual_seed(seed),
                                      sampled=ref_s))
        exact = backends.create("compiled", m, capture=False, **CHEAP)
        ours = list(exact.llm_generate(*args, min_len=10, max_len=max_len,
                                       generator=torch.Generator().manual_seed(seed), sampled=ours_s))
        assert (ours, ours_s) == (ref, ref_s)

    for exact_sampling in (False, True):  # strict_min_len: exactly min_len tokens
        be = backends.create("compiled", m, capture=False, exact_sampling=exact_sampling, **CHEAP)
        out = list(be.llm_generate(*args, min_len=20, max_len=20, generator=torch.Generator().manual_seed(0),
                                   strict_min_len=True))
        assert len(out) == 20


def _ras_distribution(logp: torch.Tensor, window: list, top_p: float = 0.8, top_k: int = 25) -> torch.Tensor:
    """The exact distribution of one RAS draw (nucleus; full distribution minus the id when it repeats)."""
    probs = logp.softmax(-1)
    v, i = probs.sort(descending=True)
    keep = ((v.cumsum(0) - v) < top_p) & (torch.arange(len(v)) < top_k)
    nuc = torch.zeros_like(probs).scatter(0, i[keep], v[keep] / v[keep].sum())
    out = nuc.clone()
    for t in set(window):  # window = ids repeated often enough to fire the rule
        full = probs.clone()
        full[t] = 0
        out[t] = 0
        out += nuc[t] * full / full.sum()
    return out


def test_device_sampler_follows_ras():
    """The device sampler draws from the RAS distribution (nucleus; full distribution without the
    repeated id when the repetition rule fires).  Deterministic: the noise is a hash of fixed seeds."""
    g = torch.Generator().manual_seed(0)
    V, N = 300, 4000
    logp = (torch.randn(V, generator=g) * 2).log_softmax(-1)
    top = int(logp.argmax())
    for window in ([], [top, top]):
        p = _ras_distribution(logp, window)
        dev = torch.zeros(V)
        w = torch.tensor(([-1] * 10 + window)[-10:])
        for i in range(N):
            seed, step = torch.tensor([i]), torch.tensor([i % 7])
            dev[int(ras_sample_device(logp.clone(), w, hash_exponential(seed, step, 0, V),
                                      hash_exponential(seed, step, 1, V)))] += 1
        dev /= N
        assert bool((dev[p == 0] == 0).all())  # never outside the support (nucleus / minus the repeat)
        order = p.argsort(descending=True)
        head, rest = order[:12], order[12:]
        grouped = lambda q: torch.cat([q[head], q[rest].sum().reshape(1)])  # noqa: E731
        tv = 0.5 * float((grouped(dev) - grouped(p)).abs().sum())
        assert tv < 0.05, (window, tv)
    # eager's sampler has the same distribution (sanity of the reference formula)
    gen = torch.Generator().manual_seed(1)
    eager = torch.zeros(V)
    for _ in range(1000):
        eager[ras_sampling(logp.clone(), [], generator=gen)] += 1
    assert bool((eager[_ras_distribution(logp, []) == 0] == 0).all())


def test_hash_noise_is_exponential_and_deterministic():
    e = hash_exponential(torch.tensor([7]), torch.tensor([3]), 0, 20000)
    assert torch.equal(e, hash_exponential(torch.tensor([7]), torch.tensor([3]), 0, 20000))
    assert not torch.equal(e, hash_exponential(torch.tensor([7]), torch.tensor([4]), 0, 20000))
    assert abs(float(e.mean()) - 1) < 0.03 and abs(float(e.var()) - 1) < 0.06 and bool((e > 0).all())


# ----------------------------------------------------------------------------- API


def test_options_env_and_describe(llm_model, monkeypatch):
    assert parse_option_string("a=1, b=true,c=16:32,d=inductor,e=none") == \
        {"a": 1, "b": True, "c": (16, 32), "d": "inductor", "e": "none"}
    assert as_tuple("64:16") == (16, 64) and as_tuple("exact") == () and as_tuple(None) == ()
    assert bucket(70, (64, 128), 128) == 128 and bucket(300, (64, 128), 128) == 384 and bucket(70, (), 1) == 70
    assert pow2_bucket(283) == 512 and pow2_bucket(3) == 256
    monkeypatch.setenv("COSYTOOLS_COMPILED", "stop_check_every=5,compile_backend=none")
    be = backends.create("compiled", llm_model, capture=False, stop_check_every=3)
    assert isinstance(be, CompiledBackend) and be.opts["stop_check_every"] == 3  # keyword beats env
    assert be.opts["compile_backend"] == "none" and not be.opts["cuda_graphs"] and be.opts["exact_sampling"]
    # CPU defaults: both parts regional (compile time), the module's conv, a stop check every 4 tokens
    monkeypatch.delenv("COSYTOOLS_COMPILED")
    plain = backends.create("compiled", llm_model, capture=False)
    assert plain.opts["regional"] == ("llm", "flow") and plain.opts["conv_pos"] == "conv"
    assert plain.opts["stop_check_every"] == 4
    desc = be.describe()
    assert desc["backend"] == "compiled" and desc["prefill_buckets"].startswith("32:64")
    with pytest.raises(ConfigError, match="unknown option"):
        backends.create("compiled", llm_model, capture=False, cuda_graph=True)
    monkeypatch.setenv("COSYTOOLS_COMPILED", "bogus=1")
    with pytest.raises(ConfigError, match="COSYTOOLS_COMPILED"):
        backends.create("compiled", llm_model, capture=False)


def test_session_cache_ownership_and_overflow(llm_model, fixtures):
    be = backends.create("compiled", llm_model, capture=False, **CHEAP)
    args = _llm_args(_dump(fixtures, "llm_teacher"))
    s1 = be.llm_session(*args, max_new_tokens=2)
    for t in (5, 6, 7):  # as eager: the cache holds prompt + max_new_tokens + 1 positions
        s1.step(t)
    with pytest.raises(ValueError, match="overflows"):
        s1.step(8)
    s2 = be.llm_session(*args, max_new_tokens=2)  # same cache length: takes the static cache over
    with pytest.raises(RuntimeError, match="taken over"):
        s1.step(5)
    assert torch.isfinite(s2.step(5)).all()


def test_warmup_reports_seconds_per_part(fixture_model_dir):
    m = load_model(fixture_model_dir)
    be = backends.create("compiled", m, capture=False, **CHEAP)
    parts = be.warmup(prompt_len=20, max_new_tokens=16, flow_frames=(100,), hift_frames=(20,))
    assert set(parts) == {"llm", "flow", "hift", "total"}
    assert all(v >= 0 and math.isfinite(v) for v in parts.values())


class _FakeGraph:
    """CPU stand-in for GraphedCall with the same contract: warm-up runs at capture, static input
    buffers, and outputs that are the *same* tensors on every replay (overwritten in place)."""

    captures = 0

    def __init__(self, fn, example_inputs, warmup=2, on_warm=None):
        self.fn = fn
        self.static_in = [t.detach().clone() for t in example_inputs]
        for _ in range(max(1, warmup)):
            fn(*self.static_in)
        self.static_out = None
        type(self).captures += 1

    def __call__(self, *inputs):
        for buf, x in zip(self.static_in, inputs):
            assert buf.shape == x.shape
            buf.copy_(x)
        out = self.fn(*self.static_in)
        if self.static_out is None:
            self.static_out = out
        else:
            flat_new = out if isinstance(out, tuple) else (out,)
            flat_old = self.static_out if isinstance(self.static_out, tuple) else (self.static_out,)
            for o, n in zip(flat_old, flat_new):
                o.copy_(n)
        return self.static_out


def test_graph_management_logic_with_fake_graphs(fixture_model_dir, fixtures, monkeypatch):
    """The CUDA-graph bookkeeping (capture warm-ups scribbling on the static cache and state,
    static inputs/outputs reused across replays, lazy capture mid-session) leaves every result
    unchanged: exercised on CPU with a stand-in graph that has the same contract."""
    import backends.compiled_flow as cf
    import backends.compiled_llm as cl

    monkeypatch.setattr(cl, "GraphedCall", _FakeGraph)
    monkeypatch.setattr(cf, "GraphedCall", _FakeGraph)
    m = load_model(fixture_model_dir)

    def make(**kw):
        be = backends.create("compiled", m, capture=False, **{**CHEAP, **kw})
        for r in (be.llm_runner, be.flow_runner, be.hift_runner):
            r.graphs_on = True
        return be

    d = _dump(fixtures, "llm_sample")
    be = make()
    sampled = []
    toks = list(be.llm_generate(*_llm_args(d), min_len=24, max_len=240,
                                generator=torch.Generator().manual_seed(1234), sampled=sampled))
    assert toks == d.tensors["llm.out.tokens"].reshape(-1).tolist()
    rep, bad = _passes(be, _dump(fixtures, "llm_teacher"))
    assert rep.passed, bad
    # device sampling, with its step graph captured lazily in the middle of a session
    plain = backends.create("compiled", m, capture=False, exact_sampling=False, stop_check_every=5, **CHEAP)
    ref = list(plain.llm_generate(*_llm_args(d), min_len=5, max_len=30, generator=torch.Generator().manual_seed(3)))
    be = make(exact_sampling=True, stop_check_every=5)
    be.llm_session(*_llm_args(d), max_new_tokens=30)  # exact graphs only
    ours = list(be.llm_runner.generate(be._lm_input(*_llm_args(d)), 5, 30, torch.Generator().manual_seed(3), None,
                                       exact=False))
    assert ours == ref
    for name in ("flow_full", "flow_stream_0", "hift_chunk_0", "hift_chunk_0", "e2e"):
        rep, bad = _passes(be, _dump(fixtures, name))
        assert rep.passed, (name, bad)
    assert be.hift_runner.graphs.graphs  # lengths seen twice were captured
    assert _FakeGraph.captures >= 6


# ----------------------------------------------------------------------------- CUDA (GPU machine only)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on the GPU machine")


@pytest.fixture(scope="module")
def cuda_model(fixture_model_dir):
    return load_model(fixture_model_dir, device="cuda")


@cuda
def test_cuda_graphs_pass_the_dumps(cuda_model, fixtures):
    """Defaults on CUDA (inductor, manual CUDA graphs, device sampling, TF32 off) pass the float32
    dumps; every part really replays captured graphs."""
    be = backends.create("compiled", cuda_model, capture=False)
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert be.opts["cuda_graphs"] and not be.opts["exact_sampling"] and be.opts["async_stop"]
    # CUDA defaults: the flow compiled as whole steps, the im2col matmul position-embedding conv
    assert be.opts["regional"] == ("llm",) and be.opts["conv_pos"] == "matmul"
    for name in ("llm_teacher", "flow_full", "flow_stream_0", "flow_stream_1", "flow_stream_full",
                 "hift_full", "hift_chunk_0", "hift_chunk_0", "hift_chunk_1", "hift_chunk_1", "e2e"):
        rep, bad = _passes(be, _dump(fixtures, name))
        assert rep.passed, (name, bad)
    assert be.llm_runner.graphs.graphs and be.flow_runner.graphs.graphs and be.hift_runner.graphs.graphs


@cuda
def test_cuda_graphs_equal_no_graphs(cuda_model, fixtures):
    """Graph replay runs the compiled kernels of the un-captured run: same outputs (to round-off
    at most — cuBLAS may pick another algorithm under capture; usually bit-identical)."""
    a = backends.create("compiled", cuda_model, capture=False)
    b = backends.create("compiled", cuda_model, capture=False, cuda_graphs=False)

    def close(x, y, rel):
        torch.testing.assert_close(x, y, atol=rel * float(y.abs().max()), rtol=0)

    d = _dump(fixtures, "flow_full")
    args, noise = [x.cuda() for x in _flow_args(d)], _flow_noise(d).cuda()
    mels = [be.flow(*args, noise=noise) for be in (a, b, a)]
    close(mels[0], mels[1], 1e-5)
    assert torch.equal(mels[0], mels[2])  # replay vs replay: bit-identical
    h = _dump(fixtures, "hift_chunk_0")
    noise = {k[len("noise."):]: v.cuda() for k, v in h.inputs.items() if k.startswith("noise.")}
    outs = [be.hift(h.inputs["mel"].cuda(), finalize=False, noise=noise)[0] for be in (a, a, b, a)]
    for o in outs[1:]:
        close(o, outs[0], 1e-4)
    t = _dump(fixtures, "llm_teacher")
    forced = t.inputs["forced_tokens"].reshape(-1).tolist()
    rows = [be.llm_teacher_force(*_llm_args(t), forced).logp for be in (a, b)]
    close(rows[0], rows[1], 1e-6)


@cuda
def test_cuda_exact_sampling_matches_eager(cuda_model, fixtures):
    d = _dump(fixtures, "llm_sample")
    args = _llm_args(d)

    def run(be):
        gen = torch.Generator(device="cuda").manual_seed(1234)
        return list(be.llm_generate(*args, min_len=24, max_len=240, generator=gen))

    assert run(backends.create("compiled", cuda_model, capture=False, exact_sampling=True)) == \
        run(backends.create("eager", cuda_model, capture=False))


@cuda
def test_cuda_device_sampling_schemes_agree(fixture_model_dir, fixtures):
    """Device sampling on CUDA: same tokens with any stop-check interval, async or not, graphs or
    not; generation stops; after the stop the already-queued steps are discarded."""
    m = _stop_prone(fixture_model_dir, "cuda")
    args = _llm_args(_dump(fixtures, "llm_sample"))

    def run(k, async_stop, graphs, seed):
        be = backends.create("compiled", m, capture=False, stop_check_every=k, async_stop=async_stop,
                             cuda_graphs=graphs)
        sampled = []
        toks = list(be.llm_generate(*args, min_len=10, max_len=100, generator=torch.Generator("cuda").manual_seed(seed),
                                    sampled=sampled))
        assert be.llm_runner.steps_run >= len(sampled)
        return toks, sampled

    for seed in range(12):  # the first seed whose generation stops before max_len
        first = run(1, False, True, seed)
        if len(first[1]) < 100:
            break
    assert m.llm.is_stop_token(first[1][-1]) and len(first[1]) < 100
    for k, async_stop, graphs in ((16, False, True), (16, True, True), (7, True, False)):
        assert run(k, async_stop, graphs, seed) == first, (k, async_stop, graphs)


@cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cuda_half_precision(fixture_model_dir, fixtures, dtype):
    """bf16/fp16: LLM logits and flow mel within the dtype's default tolerance of the float32 dumps
    (as eager); HiFT stays float32 (F0 float64) and passes its dump too."""
    m = load_model(fixture_model_dir, device="cuda", dtype=dtype)
    assert m.hift.dtype == torch.float32
    be = backends.create("compiled", m, capture=False)
    for name in ("llm_teacher", "flow_full", "flow_stream_0", "hift_full"):
        d = _dump(fixtures, name)
        tol = default_tolerance(d.stage, str(m.dtype).replace("torch.", ""))
        rep = build_report(d, run_dump(be, d), tol)
        assert rep.passed, (name, [(t.name, t.max_rel) for t in rep.tensors if not t.passed])
    h = _dump(fixtures, "hift_full")
    speech, _ = be.hift(h.inputs["mel"].cuda())
    assert bool(torch.isfinite(speech).all())


@cuda
def test_cuda_hift_full_graph_replays_eager(fixture_model_dir):
    """The whole-call HiFT graph (captured on the second call of a length) gives eager's waveform,
    default noise tables and given noise alike, finalize true and false."""
    m = load_model(fixture_model_dir, components=("hift",), device="cuda")
    be = backends.create("compiled", m, capture=False, hift_graph_after=2)
    assert be.hift_runner.full_graph
    g = torch.Generator().manual_seed(5)
    for finalize in (True, False):
        mel = (torch.randn(1, 80, 48, generator=g) - 4.0).cuda()
        want, _ = m.hift.inference(mel, finalize=finalize)
        for _ in range(3):  # eager path, capture, replay
            got, _ = be.hift(mel, finalize=finalize)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()))
    assert len(be.hift_runner.full_graphs.graphs) == 2


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_grouped_conv_kernel(dtype):
    """The Triton position-embedding kernel on the GPU at the full model's shape (16 groups of 64,
    31 taps, 650 frames, CFG batch 2) against cuDNN's conv1d (float32 IEEE / bf16)."""
    from backends.triton_conv import grouped_conv1d, kernel_available

    torch.backends.cudnn.allow_tf32 = False
    conv = torch.nn.Conv1d(1024, 1024, 31, groups=16).cuda().to(dtype)
    x = torch.randn(2, 1024, 650 + 30, device="cuda", dtype=dtype)
    assert kernel_available(x, conv.weight, 16)
    with torch.no_grad():
        want = conv(x).float()
        got = grouped_conv1d(x, conv.weight, conv.bias, 16).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=0, atol=tol * float(want.abs().max()))
