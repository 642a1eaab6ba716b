"""The eager LLM against upstream's llm_teacher / llm_sample dumps."""
from __future__ import annotations

import pytest
import torch

from cosytools.errors import InputError
from cosytools.loading import load_model
from cosytools.taps import capture


@pytest.fixture(scope="module", params=["pt", "safetensors"])
def llm(request, fixture_model_dir):
    return load_model(fixture_model_dir, components=["llm"], fmt=request.param).llm


def test_teacher_forced_logp_and_taps(llm, load_ref):
    d, meta = load_ref("llm_teacher")
    with capture("llm") as rec:
        res = llm.teacher_force(d["llm.in.text"], d["llm.in.prompt_text"], d["llm.in.prompt_speech_token"],
                                d["llm.in.forced_tokens"][0].tolist())
    ref = d["llm.out.logp"]
    assert res.logp.shape == ref.shape
    # log-probs of ~-9 in magnitude: float32 round-off of the whole stack
    assert (res.logp - ref).abs().max().item() < 1e-4
    assert torch.equal(res.logp.argmax(-1), ref.argmax(-1))
    got = rec.tensors
    compared = 0
    for key in d:
        if key.startswith("llm.tap."):
            assert key in got, f"tap {key} not emitted"
            assert got[key].shape == d[key].shape, key
            assert (got[key] - d[key]).abs().max().item() < 1e-5, key
            compared += 1
    assert compared >= 5


def test_sampling_reproduces_upstream_tokens(llm, load_ref):
    d, meta = load_ref("llm_sample")
    gen = torch.Generator().manual_seed(int(meta["seed"]))
    sampled: list[int] = []
    tokens = list(llm.inference(d["llm.in.text"], d["llm.in.prompt_text"], d["llm.in.prompt_speech_token"],
                                generator=gen, sampled=sampled))
    assert tokens == d["llm.out.tokens"][0].tolist()
    assert sampled == d["llm.tap.sampled"][0].tolist()


def test_length_rules(llm, load_ref):
    d, meta = load_ref("llm_teacher")
    lo, hi = llm.length_limits(d["llm.in.text"].shape[1], float(meta["min_token_text_ratio"]),
                               float(meta["max_token_text_ratio"]))
    assert (lo, hi) == (int(meta["min_len"]), int(meta["max_len"]))


def test_stop_ids(llm):
    assert not llm.is_stop_token(6560)
    assert all(llm.is_stop_token(t) for t in (6561, 6562, 6700, 6760))
    assert not llm.is_stop_token(6761)


def test_endofprompt_required(llm):
    with pytest.raises(InputError, match="endofprompt"):
        llm.build_lm_input(torch.tensor([[1, 2, 3]]), torch.zeros(1, 0, dtype=torch.long),
                           torch.zeros(1, 0, dtype=torch.long))


def test_min_len_masks_sos_not_eos(llm, load_ref):
    """During the first min_len steps only id 6561 is masked: with a forced-high eos it can still be drawn."""
    d, _ = load_ref("llm_sample")
    with torch.no_grad():
        old = llm.llm_decoder.weight.data.clone()
        llm.llm_decoder.weight.data[6562] = 0
        llm.llm_decoder.weight.data[6562, :] = llm.llm.model.model.norm.weight.sign() * 50.0
    try:
        toks = list(llm.inference(d["llm.in.text"], d["llm.in.prompt_text"], d["llm.in.prompt_speech_token"],
                                  min_len=5, max_len=10, generator=torch.Generator().manual_seed(0)))
    finally:
        llm.llm_decoder.weight.data.copy_(old)
    assert len(toks) < 5  # eos (6562) was allowed to stop generation before min_len
