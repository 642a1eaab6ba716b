"""`cosytools bench` smoke test: runs on the CPU and writes the documented JSON schema (not a speed test)."""
from __future__ import annotations

import json

from cosytools.cli import main


def test_bench_eager_tiny_json_schema(tmp_path, capsys, fixture_model_dir):
    out = tmp_path / "bench.json"
    plot = tmp_path / "bench.png"
    code = main(["bench", "--backend", "eager", "--backend", "eager", "--model", str(fixture_model_dir),
                 "--speech-tokens", "30", "--text-tokens", "10", "--prompt-seconds", "1", "--warmup", "0",
                 "--repeat", "1", "--stream", "--check-parity", "--json", str(out), "--plot", str(plot)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "llm decode/token" in captured.out and "speed-up" in captured.out
    doc = json.loads(out.read_text())
    assert doc["schema"] == "cosytools-bench" and doc["version"] == 1
    for key in ("date", "model", "device", "dtype", "torch_version", "onnxruntime_version", "inputs", "results"):
        assert key in doc
    r0, r1 = doc["results"]
    stages = r0["stages"]
    for key in ("frontend_s", "llm_prefill_s", "llm_decode_per_token_s", "llm_tokens_per_s", "flow_s",
                "flow_per_step_s", "hift_s", "e2e_s", "rtf", "stream_first_chunk_s", "stream_max_gap_s"):
        assert set(stages[key]) == {"min", "median", "max"}, key
        assert stages[key]["min"] <= stages[key]["median"] <= stages[key]["max"]
    assert stages["audio_s"]["median"] == 30 / 25
    assert "peak_rss_mb" in r0 and r0["settings"]["backend"] == "eager"
    # same backend, same seed: identical outputs
    assert r1["parity_vs_first"]["tokens"]["passed"] and r1["parity_vs_first"]["speech"]["passed"]
    assert plot.stat().st_size > 0


def test_decode_rate_counts_tokens_after_the_first_block(monkeypatch, fixture_model_dir):
    """A backend that hands tokens over in blocks of k (device sampling): the decode rate is the
    n - k tokens after the first delivery over the time after it, not n - 1 over that time."""
    import itertools

    import backends
    from cosytools import bench
    from cosytools.loading import load_model

    be = backends.create("compiled", load_model(fixture_model_dir, components=("llm",)), capture=False,
                         compile_backend="none", exact_sampling=False, stop_check_every=5, prefill_buckets=(64,))
    assert be.token_block == 5
    assert backends.create("eager", be.model, capture=False).token_block == 1
    clock = itertools.count()  # every perf_counter() call advances one "second"
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))
    inp = bench.make_inputs(text_tokens=8, speech_tokens=20, prompt_seconds=1.0, seed=0)
    toks, t_first, t_total = bench._generate(be, inp, seed=0)
    assert len(toks) == 20
    r = bench._decode_rates(be, len(toks), t_first, t_total)
    assert r["llm_tokens_per_s"] == (20 - 5) / (t_total - t_first)
    assert r["llm_decode_per_token_s"] == (t_total - t_first) / (20 - 5)
