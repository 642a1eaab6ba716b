"""``cosytools eval``: test lists (JSONL and Seed-TTS-eval lines), per-line failures, the report, exit
codes, resuming, streaming latencies and plots — on a tiny random model with stand-in ONNX sub-models."""
from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from cosytools.cli import main
from cosytools.errors import InputError
from cosytools.evaluate import read_list
from cosytools.init_model import init_model
from cosytools.progress import Progress
from cosytools.wav import read_wav, write_wav

GEN = ["--min-tokens", "12", "--max-tokens", "12"]


def _tone(seconds: float, sr: int = 16000, f0: float = 180.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * f0 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (x + 0.01 * np.random.default_rng(0).standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return init_model(tmp_path_factory.mktemp("eval_model") / "tiny", "tiny")


@pytest.fixture
def test_list(tmp_path) -> Path:
    """5 lines: 3 JSONL (zero-shot, instruct, sft), 1 Seed-TTS-eval line, 1 pointing at a missing wav."""
    (tmp_path / "prompts").mkdir()
    write_wav(tmp_path / "prompts" / "spk1.wav", _tone(2.0), 16000)
    lines = [
        json.dumps({"id": "zs_1", "text": "Hello there, how are you?", "prompt_text": "This is my voice.",
                    "prompt_wav": "prompts/spk1.wav"}),
        "seed_2|This is my voice.|prompts/spk1.wav|Good morning, everyone.",
        json.dumps({"id": "missing_3", "text": "Nobody hears this.", "prompt_text": "Gone.",
                    "prompt_wav": "prompts/gone.wav"}),
        json.dumps({"id": "instr_4", "mode": "instruct", "text": "Speak now.", "instruct": "Speak softly.",
                    "prompt_wav": "prompts/spk1.wav"}),
        json.dumps({"id": "sft_5", "mode": "sft", "text": "Plain text, no prompt."}),
    ]
    path = tmp_path / "list.jsonl"
    path.write_text("# a comment\n" + "\n".join(lines) + "\n\n", encoding="utf-8")
    return path


def test_five_lines_one_missing_wav_then_resume(model_dir, test_list, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    rc = main(["eval", "--list", str(test_list), "--model", str(model_dir), "-o", str(out), *GEN])
    assert rc == 1
    wavs = sorted(p.name for p in (out / "wavs").iterdir())
    assert wavs == ["instr_4.wav", "seed_2.wav", "sft_5.wav", "zs_1.wav"]
    doc = json.loads((out / "report.json").read_text())
    assert doc["schema"] == "cosytools-eval" and doc["version"] == 1
    assert doc["summary"]["total"] == 5 and doc["summary"]["ok"] == 4 and doc["summary"]["failed"] == 1
    by_id = {u["id"]: u for u in doc["utterances"]}
    assert [u["id"] for u in doc["utterances"]] == ["zs_1", "seed_2", "missing_3", "instr_4", "sft_5"]
    bad = by_id["missing_3"]
    assert bad["status"] == "failed" and bad["line"] == 4  # line 1 is the comment
    assert "prompt_wav" in bad["error"] and "gone.wav" in bad["error"] and "does not exist" in bad["error"]
    for uid in ("zs_1", "seed_2", "instr_4", "sft_5"):
        u = by_id[uid]
        assert u["status"] == "ok" and u["speech_tokens"] == 12 and u["duration_s"] == pytest.approx(0.48)
        assert u["rtf"] > 0 and u["synth_s"] > 0 and "first_chunk_s" not in u
        audio, sr = read_wav(out / u["wav"])
        assert sr == 24000 and audio.shape[0] == 12 * 960
    assert by_id["seed_2"]["mode"] == "zero_shot" and by_id["instr_4"]["mode"] == "instruct"
    md = (out / "report.md").read_text()
    assert "4 of 5 synthesised, 1 failed" in md and "## Failures" in md
    assert "`missing_3` (line 4)" in md and "gone.wav does not exist" in md
    assert "failed: missing_3" in capsys.readouterr().err

    # rerun: only the failed line is done again (and fails again)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "wavs").iterdir()}
    time.sleep(0.01)
    rc = main(["eval", "--list", str(test_list), "--model", str(model_dir), "-o", str(out), *GEN, "--json"])
    assert rc == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["done_this_run"] == 1 and summary["reused"] == 4 and summary["failed"] == 1
    assert {p.name: p.stat().st_mtime_ns for p in (out / "wavs").iterdir()} == mtimes
    doc2 = json.loads((out / "report.json").read_text())
    assert [u["this_run"] for u in doc2["utterances"]] == [False, False, True, False, False]

    # the wav turns up: the rerun does that line only and the run is clean
    write_wav(test_list.parent / "prompts" / "gone.wav", _tone(2.0, f0=220.0), 16000)
    rc = main(["eval", "--list", str(test_list), "--model", str(model_dir), "-o", str(out), *GEN])
    assert rc == 0
    doc3 = json.loads((out / "report.json").read_text())
    assert doc3["summary"]["ok"] == 5 and doc3["summary"]["done_this_run"] == 1
    assert (out / "wavs" / "missing_3.wav").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in (out / "wavs").iterdir() if p.name in mtimes} == mtimes


def test_streaming_with_plots(model_dir, test_list, tmp_path) -> None:
    lst = tmp_path / "two.txt"  # Seed-TTS-eval style only, absolute and relative wav paths
    wav = test_list.parent / "prompts" / "spk1.wav"
    lst.write_text(f"a|This is my voice.|{wav}|First sentence here.\n"
                   f"b|This is my voice.|{wav.relative_to(tmp_path)}|Second one.\n")
    out = tmp_path / "stream"
    rc = main(["eval", "--list", str(lst), "--model", str(model_dir), "-o", str(out), "--stream", "--plots",
               "--min-tokens", "30", "--max-tokens", "30"])
    assert rc == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["settings"]["stream"] is True
    for u in doc["utterances"]:
        assert u["status"] == "ok" and u["chunks"] == 2 and u["speech_tokens"] == 30
        assert 0 < u["first_chunk_s"] <= u["synth_s"]
        png = out / u["plot"]
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert doc["summary"]["first_chunk_s_median"] is not None
    assert "first chunk median" in (out / "report.md").read_text()


def test_bad_list_files_exit_2(model_dir, tmp_path, capsys) -> None:
    out = str(tmp_path / "o")
    assert main(["eval", "--list", str(tmp_path / "nope.jsonl"), "--model", str(model_dir), "-o", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n# only a comment\n")
    assert main(["eval", "--list", str(empty), "--model", str(model_dir), "-o", out]) == 2
    assert "no utterances" in capsys.readouterr().err
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "x", "mode": "sft", "text": "a"}\n{"id": "x", "mode": "sft", "text": "b"}\n')
    assert main(["eval", "--list", str(dup), "--model", str(model_dir), "-o", out]) == 2
    assert "duplicate ids" in capsys.readouterr().err
    assert not (tmp_path / "o" / "report.json").exists()


def test_read_list_lines(tmp_path) -> None:
    lst = tmp_path / "sub" / "l.lst"
    lst.parent.mkdir()
    lst.write_text('u1|Prompt words.|p/a.wav|Text one.|extra/field.wav\n'
                   '{"id": "u2", "text": "x", "prompt_text": "y", "prompt_wav": "/abs/b.wav"}\n'
                   '{"id": "u3", "mode": "vc", "prompt_wav": "a.wav"}\n'
                   '{"id": "u4", "mode": "dance", "text": "x"}\n'
                   '{"id": "u5", "text": broken json}\n'
                   'only|three|fields\n'
                   '{"id": "u/7", "mode": "zero-shot", "text": "t", "prompt_text": "p", "prompt_wav": "w.wav"}\n')
    items = read_list(lst)
    assert [i.id for i in items] == ["u1", "u2", "u3", "u4", "line-5", "line-6", "u/7"]
    assert items[0].mode == "zero_shot" and items[0].fields["prompt_wav"] == str(lst.parent / "p" / "a.wav")
    assert items[0].fields["text"] == "Text one." and items[0].error is None
    assert items[1].fields["prompt_wav"] == "/abs/b.wav"
    assert "mode vc needs source_wav" in items[2].error
    assert "unknown mode 'dance'" in items[3].error
    assert "not valid JSON" in items[4].error
    assert "expected 'id|prompt_text|prompt_wav|text'" in items[5].error
    assert items[6].mode == "zero_shot" and items[6].file_stem == "u_7"
    with pytest.raises(InputError, match="no line"):
        bad = tmp_path / "bad.lst"
        bad.write_text("a|b\nc|d\n")
        read_list(bad)


def test_progress_eta() -> None:
    buf = io.StringIO()
    with Progress("eval", total=4, unit="utts", force=True, stream=buf, eta=True) as bar:
        assert bar.eta_seconds() is None
        for i in range(2):
            time.sleep(0.01)
            bar.set_postfix(f"utt{i}")
            bar.update()
        left = bar.eta_seconds()
        assert left is not None and left > 0
    text = buf.getvalue()
    assert "eta ?" in text and re.search(r"eta \d+s", text) and "utt1" in text and "2/4 utts" in text
