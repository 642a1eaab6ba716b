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
