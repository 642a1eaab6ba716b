"""Streaming synthesis (upstream ``CosyVoice3Model.tts(stream=True)``): the chunk protocol against the
fixture dumps, against a call-by-call reference implementation, against non-streaming synthesis, and
the LLM producer thread (concurrency, errors, early stop)."""
from __future__ import annotations

import math
import threading
import time
from typing import Any, Dict, Iterator, List

import pytest
from hypothesis import given, strategies as st
import torch

from cosytools import taps
from cosytools.cli import main
from cosytools.errors import InputError
from cosytools.pipeline import HiftStream, Pipeline, TokenProducer
from parity.metrics import compare_tensor, default_tolerance

THREAD = "cosytools-llm"


# ----------------------------------------------------------------------------- helpers
class Spy:
    """Records every flow / hift / llm_generate call of the wrapped backend."""

    def __init__(self, inner: Any, stub_hift: bool = False) -> None:
        self.inner = inner
        self.stub_hift = stub_hift
        self.flow_calls: List[Dict[str, Any]] = []
        self.hift_calls: List[Dict[str, Any]] = []
        self.llm_threads: List[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def flow(self, token, prompt_token, prompt_feat, embedding, *, streaming=False, finalize=True, noise=None):
        mel = self.inner.flow(token, prompt_token, prompt_feat, embedding, streaming=streaming, finalize=finalize,
                              noise=noise)
        self.flow_calls.append({"token": token.clone(), "streaming": streaming, "finalize": finalize, "mel": mel})
        return mel

    def hift(self, mel, *, finalize=True, noise=None):
        if self.stub_hift:  # the shapes of the real call, no vocoder (keeps flow-only tests fast)
            n = (mel.shape[2] - (0 if finalize else 3)) * 480
            out = (torch.zeros(1, n), torch.zeros(1, 1, mel.shape[2] * 480))
        else:
            out = self.inner.hift(mel, finalize=finalize, noise=noise)
        self.hift_calls.append({"frames": mel.shape[2], "finalize": finalize, "speech": out[0]})
        return out

    def llm_generate(self, *args, **kwargs) -> Iterator[int]:
        for tok in self.inner.llm_generate(*args, **kwargs):
            self.llm_threads.append(threading.current_thread().name)
            yield tok


class SlowStub:
    """A backend without a model behind it: zero mel / audio of the right sizes, each flow call taking
    ``delay`` seconds; records how many tokens the LLM had produced when each flow call began and ended."""

    def __init__(self, model: Any, produced: List[float], delay: float = 0.2) -> None:
        self.model, self.produced, self.delay = model, produced, delay
        self.device = torch.device("cpu")
        self.during_flow: List[tuple] = []

    def flow(self, token, prompt_token, prompt_feat, embedding, *, streaming=False, finalize=True, noise=None):
        before = len(self.produced)
        time.sleep(self.delay)
        self.during_flow.append((before, len(self.produced)))
        n = token.shape[1] - (0 if finalize else 3)
        return torch.zeros(1, 80, 2 * n)

    def hift(self, mel, *, finalize=True, noise=None):
        return torch.zeros(1, (mel.shape[2] - (0 if finalize else 3)) * 480), torch.zeros(1, 1, 0)


def _llm_threads_alive() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD and t.is_alive()]


def reference_stream(backend: Any, tokens: List[int], prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                     embedding: torch.Tensor, hop: int = 25, max_hop: int = 100, scale: int = 2,
                     lookahead: int = 3, ratio: int = 2) -> tuple[torch.Tensor, torch.Tensor, List[tuple]]:
    """Upstream ``CosyVoice2Model.tts(stream=True)`` + ``CosyVoice3Model.token2wav``, written out call by
    call on a finished token list: (concatenated speech, the mel handed to the vocoder, [(offset, hop)])."""
    pad = math.ceil(prompt_token.shape[1] / hop) * hop - prompt_token.shape[1]
    offset, mel_cache, speech_offset, pieces, plan = 0, None, 0, [], []

    def token2wav(tok: List[int], finalize: bool, stream: bool) -> None:
        nonlocal mel_cache, speech_offset
        mel = backend.flow(torch.tensor([tok]), prompt_token, prompt_feat, embedding, streaming=stream,
                           finalize=finalize)[:, :, offset * ratio:]
        mel_cache = mel if mel_cache is None else torch.cat([mel_cache, mel], dim=2)
        speech, _ = backend.hift(mel_cache, finalize=finalize)
        pieces.append(speech[:, speech_offset:])
        speech_offset += pieces[-1].shape[1]

    while True:
        this_hop = hop + pad if offset == 0 else hop
        if len(tokens) - offset < this_hop + lookahead:
            break  # the LLM has ended and too few tokens are left for another chunk
        token2wav(tokens[:offset + this_hop + lookahead], finalize=False, stream=True)
        plan.append((offset, this_hop))
        offset += this_hop
        hop = min(max_hop, hop * scale)
    token2wav(tokens, finalize=True, stream=False)  # upstream's last call: stream left at False
    plan.append((offset, None))
    return torch.cat(pieces, dim=1), mel_cache, plan


def _snr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    err = (ref - x).double().pow(2).sum()
    return float("inf") if err == 0 else 10 * math.log10(float(ref.double().pow(2).sum() / err))


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pipe(fixture_model_dir) -> Pipeline:
    return Pipeline.from_model(fixture_model_dir, progress=False, capture=False)


@pytest.fixture(scope="module")
def seq(load_ref) -> Dict[str, Any]:
    """A 150-token sequence and two prompts: 10 tokens (first hop padded to 40) and 50 tokens (no pad)."""
    fs, _ = load_ref("flow_stream_full")
    ff, _ = load_ref("flow_full")
    return {
        "tokens": fs["flow.in.token"][0, :150].long().tolist(),
        "prompts": {
            "prompt10": (ff["flow.in.prompt_token"].long(), ff["flow.in.prompt_feat"], ff["flow.in.embedding"]),
            "prompt50": (fs["flow.in.prompt_token"].long(), fs["flow.in.prompt_feat"], fs["flow.in.embedding"]),
        },
    }


@pytest.fixture(scope="module")
def reference(pipe, seq) -> Dict[str, tuple]:
    """The call-by-call reference of the 150-token sequence per prompt (computed once)."""
    cache: Dict[str, tuple] = {}

    class _Lazy(dict):
        def __missing__(self, prompt: str) -> tuple:
            pt, pf, emb = seq["prompts"][prompt]
            self[prompt] = reference_stream(pipe.backend, seq["tokens"], pt, pf, emb)
            return self[prompt]

    return _Lazy(cache)


# ----------------------------------------------------------------------------- fixture dumps, call by call
def test_flow_calls_match_flow_stream_dumps(pipe, load_ref) -> None:
    """The fixtures' chunk protocol (50-token hops, 3 context tokens, 50 prompt tokens, the last call
    with the chunk mask) through ``token2wav_stream``: every flow call matches ``flow_stream_K``."""
    full, _ = load_ref("flow_stream_full")
    spy = Spy(pipe.backend, stub_hift=True)
    p = Pipeline(spy, progress=False)
    p.model = pipe.model
    chunks = list(p.token2wav_stream(full["flow.in.token"][0].tolist(), full["flow.in.prompt_token"],
                                     full["flow.in.prompt_feat"], full["flow.in.embedding"],
                                     flow_noise=full["flow.in.noise"], token_hop_len=50, token_max_hop_len=50,
                                     last_call_streaming=True))
    assert [c.final for c in chunks] == [False, False, False, True]
    assert len(spy.flow_calls) == 4
    tol = default_tolerance("flow")
    for k, call in enumerate(spy.flow_calls):
        ref, meta = load_ref(f"flow_stream_{k}")
        assert torch.equal(call["token"].int(), ref["flow.in.token"]), f"call {k}: token prefix"
        assert call["streaming"] == (meta["streaming"] == "true")
        assert call["finalize"] == (meta["finalize"] == "true"), f"call {k}: finalize"
        rep = compare_tensor(f"flow_stream_{k}.mel", ref["flow.out.mel"], call["mel"], tol)
        assert rep.passed, rep.to_dict()
    # the vocoder got each call's mel from the token offset on, appended to the cache
    assert [c["frames"] for c in spy.hift_calls] == [100, 200, 300, 400]


def test_hift_calls_match_hift_chunk_dumps(pipe, load_ref) -> None:
    """The vocoder half (:class:`HiftStream`) fed ``hift_full``'s mel in the fixtures' pieces (30 frames
    + 8 context, then 30, then the rest): each HiFT call matches ``hift_chunk_K``, and the samples it
    hands out are each call's output from ``speech_offset`` on."""
    full, _ = load_ref("hift_full")
    mel = full["hift.in.mel"]
    noise = {n: full[f"hift.in.noise.{n}"] for n in ("rand_ini", "sine", "uv")}
    spy = Spy(pipe.backend)
    vocoder = HiftStream(spy, noise=noise)
    edges = [0, 38, 68, mel.shape[2]]
    pieces = [vocoder.push(mel[:, :, a:b], finalize=b == mel.shape[2]) for a, b in zip(edges, edges[1:])]
    tol = default_tolerance("hift")
    expected = []
    for k, call in enumerate(spy.hift_calls):
        ref, meta = load_ref(f"hift_chunk_{k}")
        assert call["frames"] == ref["hift.in.mel"].shape[2]
        assert call["finalize"] == (meta["finalize"] == "true")
        rep = compare_tensor(f"hift_chunk_{k}.speech", ref["hift.out.speech"], call["speech"], tol)
        assert rep.passed, rep.to_dict()
        expected.append(ref["hift.out.speech"][:, int(meta["speech_offset"]):])
    assert [p.shape[1] for p in pieces] == [e.shape[1] for e in expected] == [14400, 14400, 9600]
    rep = compare_tensor("hift_stream", torch.cat(expected, 1), torch.cat(pieces, 1), tol)
    assert rep.passed, rep.to_dict()
    # and, as upstream's generator.py __main__ checks, the chunked audio is the one-call audio
    rep = compare_tensor("hift_stream_vs_full", full["hift.out.speech"], torch.cat(pieces, 1), tol)
    assert rep.passed, rep.to_dict()


# ----------------------------------------------------------------------------- whole stream vs call by call
@pytest.mark.parametrize("prompt,source", [("prompt10", "list"), ("prompt50", "iterator")])
def test_stream_equals_call_by_call_protocol(pipe, seq, reference, prompt, source) -> None:
    """The whole streaming output of a 150-token sequence equals upstream's chunk protocol run call by
    call; fed as a list (no thread) or as an LLM-like iterator (consumed in the producer thread)."""
    pt, pf, emb = seq["prompts"][prompt]
    tokens = seq["tokens"]
    ref, _, plan = reference[prompt]
    # prompt10: the first hop is padded to 40 so that 10 + 40 fills two hops of 25; then 50 (100 would need 153)
    assert plan == {"prompt10": [(0, 40), (40, 50), (90, None)], "prompt50": [(0, 25), (25, 50), (75, None)]}[prompt]

    def slow_tokens() -> Iterator[int]:
        for t in tokens:
            time.sleep(0.0005)
            yield t

    chunks = list(pipe.token2wav_stream(tokens if source == "list" else slow_tokens(), pt, pf, emb))
    got = torch.cat([c.speech for c in chunks], dim=1)
    assert [c.final for c in chunks] == [False, False, True]
    assert [c.tokens for c in chunks][:2] == [plan[0][1] + 3, plan[1][0] + plan[1][1] + 3]
    assert chunks[-1].tokens == 150
    assert got.shape == ref.shape == (1, 150 * 2 * 480)
    assert torch.equal(got, ref), f"max |diff| {(got - ref).abs().max():.3e}"


def test_stream_vs_non_stream_distance(pipe, seq, reference, record_property) -> None:
    """Not identical by design: every chunk but the last is made with the DiT's chunk mask. The last
    call runs without it (upstream passes stream=False), so the last segment's mel equals the
    non-streaming mel exactly; the vocoder's causal f0 / harmonic phase carry the earlier
    differences into the last segment's audio anyway. Numbers: docs/streaming.md."""
    pt, pf, emb = seq["prompts"]["prompt10"]
    stream, stream_mel, _ = reference["prompt10"]  # == the pipeline's stream (test above)
    speech, mel = pipe.token2wav(seq["tokens"], pt, pf, emb)
    assert stream.shape == speech.shape and stream_mel.shape == mel.shape

    d = (stream_mel - mel).abs()
    assert torch.equal(stream_mel[:, :, 180:], mel[:, :, 180:])  # the last call is the non-streaming call
    assert 1e-3 < float(d[:, :, :180].max()) < 1.0                # chunk mask: small but real differences
    # the vocoder's own chunking costs next to nothing: the non-streaming mel in the same pieces ~= one call
    voc = HiftStream(pipe.backend)
    parts = [voc.push(mel[:, :, a:b], finalize=b == 300) for a, b in ((0, 80), (80, 180), (180, 300))]
    hift_only = (torch.cat(parts, 1) - speech).abs().max()
    assert float(hift_only) < 1e-4
    props = {"mel_max_abs": float(d.max()), "mel_mean_abs": float(d.mean()),
             "wav_max_abs": float((stream - speech).abs().max()), "wav_snr_db": _snr_db(speech, stream),
             "hift_chunking_only_max_abs": float(hift_only)}
    for k, v in props.items():
        record_property(k, v)


# ----------------------------------------------------------------------------- the producer thread
def test_llm_runs_concurrently_with_token2wav(pipe, seq) -> None:
    """Tokens keep coming while the flow works on a chunk and while the consumer is busy with one."""
    produced: List[float] = []
    threads = set()

    def llm() -> Iterator[int]:
        for t in seq["tokens"]:
            threads.add(threading.current_thread().name)
            produced.append(time.perf_counter())
            time.sleep(0.002)
            yield t

    stub = SlowStub(pipe.model, produced, delay=0.2)
    p = Pipeline(stub, progress=False)
    stream = p.token2wav_stream(llm())
    first = next(stream)
    assert first.tokens == 28 and not first.final
    before, after = stub.during_flow[0]
    assert before >= 28 and after > before + 10, f"no tokens were generated during the flow call {stub.during_flow}"
    time.sleep(0.5)  # the consumer plays the chunk; the producer needs ~0.3 s for everything
    assert len(produced) == 150, "the LLM thread did not run while the consumer was busy"
    rest = list(stream)
    assert rest[-1].final and rest[-1].tokens == 150
    assert threads == {THREAD} and not _llm_threads_alive()

    # the synchronous protocol (concurrent=False) pulls tokens only between stage calls
    produced.clear()
    stub.during_flow.clear()
    list(p.token2wav_stream(llm(), concurrent=False))
    assert all(a == b for a, b in stub.during_flow)


def test_mode_methods_run_the_llm_in_the_thread(pipe) -> None:
    spy = Spy(pipe.backend)
    p = Pipeline(spy, pipe.tokenizer, progress=False)
    p.model = pipe.model
    chunks = list(p.sft("Hello there.", None, stream=True, min_tokens=60, max_tokens=60))
    assert len(spy.llm_threads) == 60 and set(spy.llm_threads) == {THREAD}
    assert [c.final for c in chunks] == [False, True] and chunks[-1].tokens == 60
    res = p.sft("Hello there.", None, min_tokens=60, max_tokens=60)
    assert set(spy.llm_threads[60:]) == {"MainThread"}  # non-streaming: no thread
    stream_audio = torch.cat([c.speech for c in chunks], 1)
    assert stream_audio.shape == res.speech.shape
    # the same tokens as a list give the same stream (the thread changes timing, not results)
    again = torch.cat([c.speech for c in p.token2wav_stream(res.tokens)], 1)
    assert torch.allclose(again, stream_audio, atol=1e-2 * float(stream_audio.abs().max()))


def test_producer_exception_reaches_the_consumer(pipe, seq) -> None:
    def broken() -> Iterator[int]:
        yield from seq["tokens"][:40]
        raise RuntimeError("boom in the LLM")

    stream = pipe.token2wav_stream(broken())
    with pytest.raises(RuntimeError, match="boom in the LLM"):
        list(stream)
    assert not _llm_threads_alive()

    def broken_at_once() -> Iterator[int]:
        raise ValueError("prefill failed")
        yield 0  # pragma: no cover

    with pytest.raises(ValueError, match="prefill failed"):
        list(pipe.token2wav_stream(broken_at_once()))
    with pytest.raises(InputError, match="no speech tokens"):
        list(pipe.token2wav_stream(iter([])))
    assert not _llm_threads_alive()


def test_consumer_stopping_early_stops_the_thread(pipe) -> None:
    state = {"n": 0, "closed_in": None}

    def endless() -> Iterator[int]:
        try:
            while True:
                state["n"] += 1
                time.sleep(0.001)
                yield state["n"] % 6561
        finally:
            state["closed_in"] = threading.current_thread().name

    stream = pipe.token2wav_stream(endless())
    first = next(stream)
    assert not first.final
    stream.close()  # what a consumer's `break` / garbage collection does
    assert not _llm_threads_alive()
    n = state["n"]
    time.sleep(0.05)
    assert state["n"] == n and state["closed_in"] == THREAD


def test_mode_stream_closed_early_stops_the_thread(pipe) -> None:
    spy = Spy(pipe.backend)
    p = Pipeline(spy, pipe.tokenizer, progress=False)
    stream = p.sft("Hello there.", None, stream=True, min_tokens=400, max_tokens=400)
    first = next(stream)
    assert first.tokens == 28
    stream.close()
    assert not _llm_threads_alive() and len(spy.llm_threads) < 400


def test_backend_can_refuse_concurrency(pipe, seq) -> None:
    """A backend whose stage calls must not overlap (e.g. lazy CUDA-graph capture) opts out."""
    seen = set()

    def llm() -> Iterator[int]:
        for t in seq["tokens"][:30]:
            seen.add(threading.current_thread().name)
            yield t

    spy = Spy(pipe.backend, stub_hift=True)
    spy.supports_concurrent_llm = False
    list(Pipeline(spy, progress=False).token2wav_stream(llm()))
    assert seen == {threading.current_thread().name}


def test_producer_direct_use() -> None:
    with TokenProducer(iter(range(10))) as prod:
        assert list(prod) == list(range(10))
    assert not prod.alive and prod.produced == 10

    def slow() -> Iterator[int]:
        for i in range(1000):
            time.sleep(0.001)
            yield i

    prod = TokenProducer(slow())
    it = iter(prod)
    assert next(it) == 0
    prod.close()
    assert not prod.alive and prod.produced < 1000


def test_lists_and_tap_captures_stay_in_this_thread(pipe, seq) -> None:
    seen = set()

    def llm() -> Iterator[int]:
        for t in seq["tokens"][:30]:
            seen.add(threading.current_thread().name)
            yield t

    p = Pipeline(Spy(pipe.backend, stub_hift=True), progress=False)
    # tap recorders are process-global: with a capture active the LLM must not run beside the flow
    with taps.capture("flow"):
        list(p.token2wav_stream(llm()))
    assert seen == {threading.current_thread().name}
    seen.clear()
    list(p.token2wav_stream(seq["tokens"][:30]))  # a list: no thread either
    assert not seen
    list(p.token2wav_stream(llm(), concurrent=True))
    assert seen == {THREAD}


def test_speed_is_refused_in_streaming(pipe, fixture_model_dir, capsys) -> None:
    with pytest.raises(InputError, match="non-stream"):
        pipe.sft("Hello there.", None, stream=True, speed=1.5)
    rc = main(["synth", "Hello there.", "--model", str(fixture_model_dir), "--stream", "--speed", "1.5",
               "-o", "/dev/null"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "speed 1.5 works only without streaming" in err and "--stream" in err


def test_bad_schedule_is_refused(pipe) -> None:
    with pytest.raises(InputError, match="streaming schedule"):
        list(pipe.token2wav_stream([1, 2, 3], token_hop_len=0))


@given(st.lists(st.sampled_from([1, 2, 28, 7, 100, 2323, 5]), max_size=60), st.sampled_from([None, 0, 1, 5]))
def test_silent_runs_are_limited_as_upstream(tokens, max_run):
    """Upstream's llm_job rule: a silent/breath id is dropped when it would be the (max_run+1)-th in
    a row; any other id resets the run; nothing else changes."""
    from cosytools.pipeline import SILENT_TOKENS, limit_silent_runs

    out = list(limit_silent_runs(tokens, max_run))
    if max_run is None:
        assert out == tokens
        return
    kept, run = [], 0
    for t in tokens:  # the rule written out a second way: keep unless the run is already full
        run = run + 1 if t in SILENT_TOKENS else 0
        if not (t in SILENT_TOKENS and run > max_run):
            kept.append(t)
    assert out == kept
    assert [t for t in out if t not in SILENT_TOKENS] == [t for t in tokens if t not in SILENT_TOKENS]
    longest = cur = 0
    for t in out:
        cur = cur + 1 if t in SILENT_TOKENS else 0
        longest = max(longest, cur)
    assert longest <= max_run
