"""``cosytools dump``: one stage call on seeded random inputs, recorded as a dump."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

__all__ = ["record_stage"]


def record_stage(stage: str, output: str, model: Optional[str] = None, backend: str = "eager",
                 device: Optional[str] = None, dtype: Optional[str] = None, seed: int = 0, tokens: int = 40,
                 all_steps: bool = False) -> Path:
    """Run ``stage`` once with inputs drawn from ``seed`` and write inputs/outputs/taps to ``output``."""
    import backends
    from cosytools.loading import load_model
    from cosytools.models.llm import ENDOFPROMPT_ID

    from .capture import DEFAULT_TAP_FILTER, CapturingBackend
    from .runners import STAGE_COMPONENTS

    comps = STAGE_COMPONENTS[stage]
    m = load_model(model, components=comps, device=device, dtype=dtype)
    out_dir = Path(output).parent
    filt = dict(DEFAULT_TAP_FILTER)
    if all_steps:
        filt["flow"] = None
    cap = CapturingBackend(backends.create(backend, m, capture=False), str(out_dir), tap_filter=filt)
    g = torch.Generator().manual_seed(seed)
    prompt_tokens = max(2, tokens // 4)
    if stage == "llm":
        text = torch.randint(0, 2000, (1, 12), generator=g)
        prompt_text = torch.cat([torch.randint(0, 2000, (1, 7), generator=g),
                                 torch.tensor([[ENDOFPROMPT_ID]])], dim=1)
        prompt_speech = torch.randint(0, 6561, (1, 20), generator=g)
        forced = torch.randint(0, 6561, (tokens,), generator=g).tolist()
        cap.llm_teacher_force(text, prompt_text, prompt_speech, forced)
    elif stage in ("flow", "e2e"):
        token = torch.randint(0, 6561, (1, tokens), generator=g)
        prompt_token = torch.randint(0, 6561, (1, prompt_tokens), generator=g)
        prompt_feat = torch.randn(1, prompt_tokens * m.config.token_mel_ratio, 80, generator=g) * 2 - 6
        emb = torch.randn(1, 192, generator=g)
        if stage == "flow":
            cap.flow(token, prompt_token, prompt_feat, emb)
        else:
            inner = cap.inner
            mel = inner.flow(token, prompt_token, prompt_feat, emb)
            noise = m.hift.default_noise.get(mel.shape[-1] * 480)
            speech, _ = inner.hift(mel, noise=noise)
            from .dump import write_dump
            t = {"e2e.in.token": token.int(), "e2e.in.prompt_token": prompt_token.int(),
                 "e2e.in.prompt_feat": prompt_feat, "e2e.in.embedding": emb,
                 **{f"e2e.in.noise.{k}": v for k, v in noise.items()},
                 "e2e.tap.mel": mel, "e2e.out.speech": speech}
            write_dump(output, "e2e", t, cap._meta(), producer=f"cosytools {backend}")
            return Path(output)
    elif stage == "hift":
        mel = torch.randn(1, 80, tokens * 2, generator=g) * 2 - 6
        cap.hift(mel)
    written = cap.written[-1]
    target = Path(output)
    if written != target:
        written.replace(target)
    return target
