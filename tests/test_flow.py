"""Flow stage (CausalMaskedDiffWithDiT + CFM + DiT) against the upstream reference dumps."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from cosytools.models.dit import DiT, chunk_attention_mask, dit_attention_mask
from cosytools.models.flow import (
    CausalConditionalCFM,
    CausalMaskedDiffWithDiT,
    PreLookaheadLayer,
    fixed_flow_noise,
)
from cosytools.taps import capture

ATOL = 1e-4
STREAM_DUMPS = ["flow_stream_0", "flow_stream_1", "flow_stream_2", "flow_stream_3", "flow_stream_full"]


def build_tiny_flow() -> CausalMaskedDiffWithDiT:
    """The tiny fixture flow, kwargs copied from model/cosyvoice3.yaml.

    Hard-coded for now; the config builder (reading the yaml) will replace this helper.
    """
    estimator = DiT(dim=64, depth=2, heads=2, dim_head=32, ff_mult=2, mel_dim=80, mu_dim=80, spk_dim=80,
                    out_channels=80, static_chunk_size=25 * 2, num_decoding_left_chunks=-1)
    decoder = CausalConditionalCFM(
        in_channels=240, n_spks=1, spk_emb_dim=80,
        cfm_params={"sigma_min": 1e-06, "solver": "euler", "t_scheduler": "cosine",
                    "training_cfg_rate": 0.2, "inference_cfg_rate": 0.7, "reg_loss_type": "l1"},
        estimator=estimator)
    pre = PreLookaheadLayer(in_channels=80, channels=64, pre_lookahead_len=3)
    return CausalMaskedDiffWithDiT(input_size=80, output_size=80, spk_embed_dim=192, output_type="mel",
                                   vocab_size=6561, input_frame_rate=25, only_mask_loss=True, token_mel_ratio=2,
                                   pre_lookahead_len=3, pre_lookahead_layer=pre, decoder=decoder)


@pytest.fixture(scope="module")
def flow(fixture_model_dir: Path) -> CausalMaskedDiffWithDiT:
    model = build_tiny_flow().eval()
    model.load_state_dict(torch.load(fixture_model_dir / "flow.pt", weights_only=True), strict=True)
    return model


def _flag(meta: dict, key: str) -> bool:
    return meta[key] == "true"


def _run(model: CausalMaskedDiffWithDiT, ref: dict, meta: dict, noise: bool = True):
    token = ref["flow.in.token"].long()
    prompt_token = ref["flow.in.prompt_token"].long()
    prompt_feat = ref["flow.in.prompt_feat"]
    with capture("flow") as rec:
        mel, extra = model.inference(
            token, torch.tensor([token.shape[1]], dtype=torch.int32),
            prompt_token, torch.tensor([prompt_token.shape[1]], dtype=torch.int32),
            prompt_feat, torch.tensor([prompt_feat.shape[1]], dtype=torch.int32),
            ref["flow.in.embedding"], streaming=_flag(meta, "streaming"), finalize=_flag(meta, "finalize"),
            noise=ref["flow.in.noise"] if noise else None)
    assert extra is None
    got = dict(rec.tensors)
    got["flow.out.mel"] = mel
    return got


def _compare(name: str, got: dict, ref: dict) -> None:
    """Every out/tap key of the dump must be produced and match within ATOL; prints the errors."""
    keys = sorted(k for k in ref if not k.startswith("flow.in."))
    failures = []
    for key in keys:
        assert key in got, f"{name}: {key} not produced (have {sorted(got)})"
        a, b = got[key].float(), ref[key].float()
        assert a.shape == b.shape, f"{name}: {key} shape {list(a.shape)} != reference {list(b.shape)}"
        diff = (a - b).abs()
        max_abs = diff.max().item() if diff.numel() else 0.0
        max_rel = (diff / b.abs().clamp_min(1e-3)).max().item() if diff.numel() else 0.0
        print(f"{name:18s} {key:34s} max_abs={max_abs:.3e} max_rel={max_rel:.3e}")
        if not max_abs <= ATOL:
            failures.append(f"{key}: max abs {max_abs:.3e} > {ATOL}")
    assert not failures, f"{name}: " + "; ".join(failures)


def test_state_dict_layouts(fixture_model_dir: Path) -> None:
    pt = torch.load(fixture_model_dir / "flow.pt", weights_only=True)
    st_ = load_file(str(fixture_model_dir / "flow.safetensors"))
    model = build_tiny_flow()
    assert set(model.state_dict()) == set(pt) == set(st_)
    assert "decoder.estimator.rotary_embed.inv_freq" in model.state_dict()
    assert "decoder.rand_noise" not in model.state_dict()
    model.load_state_dict(st_, strict=True)
    for key, value in pt.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_flow_full(flow: CausalMaskedDiffWithDiT, load_ref) -> None:
    ref, meta = load_ref("flow_full")
    got = _run(flow, ref, meta)
    _compare("flow_full", got, ref)
    # the DiT is tapped at every Euler step, not only the step the dump kept
    for step in range(10):
        for part in ("in.x", "time_embed", "input_embed", "block.00", "block.01", "norm_out", "out"):
            assert f"flow.tap.step{step:02d}.dit.{part}" in got
    assert flow.decoder.estimator.tap_prefix == "dit"


def test_flow_full_from_safetensors(fixture_model_dir: Path, load_ref) -> None:
    model = build_tiny_flow().eval()
    model.load_state_dict(load_file(str(fixture_model_dir / "flow.safetensors")), strict=True)
    ref, meta = load_ref("flow_full")
    got = _run(model, ref, meta)
    assert (got["flow.out.mel"] - ref["flow.out.mel"]).abs().max().item() <= ATOL


@pytest.mark.parametrize("name", STREAM_DUMPS)
def test_flow_stream(flow: CausalMaskedDiffWithDiT, load_ref, name: str) -> None:
    ref, meta = load_ref(name)
    assert _flag(meta, "streaming")
    _compare(name, _run(flow, ref, meta), ref)


def test_stream_chunks_agree_with_stream_full(flow: CausalMaskedDiffWithDiT, load_ref) -> None:
    full_ref, full_meta = load_ref("flow_stream_full")
    full = _run(flow, full_ref, full_meta)["flow.out.mel"]
    for name in STREAM_DUMPS[:-1]:
        ref, meta = load_ref(name)
        mel = _run(flow, ref, meta)["flow.out.mel"]
        off = int(meta["mel_offset"])
        part = mel[:, :, off:]
        assert (part - full[:, :, off:off + part.shape[2]]).abs().max().item() <= ATOL


def test_default_noise_is_upstream_fixed_buffer(flow: CausalMaskedDiffWithDiT, load_ref) -> None:
    noise = flow.decoder.rand_noise
    assert noise.shape == (1, 80, 15000) and noise.dtype == torch.float32
    assert torch.equal(noise, fixed_flow_noise())
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        assert torch.equal(noise, torch.randn(1, 80, 15000))
    finally:
        torch.random.set_rng_state(state)
    for name in ["flow_full", "flow_stream_full"]:
        ref, _ = load_ref(name)
        z = ref["flow.in.noise"]
        assert torch.equal(noise[:, :, :z.shape[2]], z), name
    ref, meta = load_ref("flow_full")
    with_noise = _run(flow, ref, meta)["flow.out.mel"]
    default = _run(flow, ref, meta, noise=False)["flow.out.mel"]
    assert torch.equal(with_noise, default)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs(fixture_model_dir: Path, load_ref, dtype: torch.dtype) -> None:
    model = build_tiny_flow().eval()
    model.load_state_dict(torch.load(fixture_model_dir / "flow.pt", weights_only=True), strict=True)
    model = model.to(dtype)
    assert model.decoder.rand_noise.dtype == torch.float32
    assert model.decoder.estimator.rotary_embed.inv_freq.dtype == torch.float32
    ref, meta = load_ref("flow_full")
    mel = _run(model, ref, meta)["flow.out.mel"]
    assert mel.dtype == torch.float32 and bool(mel.isfinite().all())
    assert (mel - ref["flow.out.mel"]).abs().max().item() < 0.5


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 160), chunk=st.integers(1, 60), left=st.integers(-1, 4))
def test_chunk_mask_is_causal_by_chunk(size: int, chunk: int, left: int) -> None:
    mask = chunk_attention_mask(size, chunk, left)
    assert mask.shape == (size, size) and mask.dtype == torch.bool
    i = torch.arange(size).unsqueeze(1)
    j = torch.arange(size).unsqueeze(0)
    end = (i // chunk + 1) * chunk
    expected = j < end
    if left >= 0:
        expected &= j >= ((i // chunk - left) * chunk).clamp(min=0)
    assert torch.equal(mask, expected)
    # every frame sees itself; no frame sees a later chunk
    assert bool(mask.diagonal().all())
    assert not bool((mask & (j // chunk > i // chunk)).any())


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 120), chunk=st.integers(1, 40), valid=st.integers(1, 120), streaming=st.booleans())
def test_dit_attention_mask(size: int, chunk: int, valid: int, streaming: bool) -> None:
    valid = min(valid, size)
    frames = (torch.arange(size) < valid).float().view(1, 1, size).expand(2, 1, size)
    mask = dit_attention_mask(frames, streaming, chunk)
    assert mask.shape == (2, 1, size, size)
    keys = torch.arange(size) < valid
    causal = chunk_attention_mask(size, chunk) if streaming else torch.ones(size, size, dtype=torch.bool)
    expected = keys.unsqueeze(0) & causal
    expected |= ~expected.any(dim=-1, keepdim=True)
    assert torch.equal(mask[0, 0], expected) and torch.equal(mask[1, 0], expected)


@settings(max_examples=30, deadline=None)
@given(groups=st.sampled_from([1, 2, 4, 16]), per_group=st.integers(1, 5), k=st.sampled_from([1, 3, 31]),
       length=st.integers(1, 40), batch=st.integers(1, 2), bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_grouped_conv1d_as_matmul_equals_conv1d(groups, per_group, k, length, batch, bias, seed):
    """im2col + batched matmul is the grouped conv1d (unpadded, stride 1) up to float32 round-off."""
    from cosytools.models.dit import grouped_conv1d_as_matmul

    g = torch.Generator().manual_seed(seed)
    c = groups * per_group
    conv = torch.nn.Conv1d(c, c, k, groups=groups, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        if bias:
            conv.bias.copy_(torch.randn(c, generator=g))
        x = torch.randn(batch, c, length + k - 1, generator=g)
        want = conv(x)
        got = grouped_conv1d_as_matmul(x, conv)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()) + 1e-6)
