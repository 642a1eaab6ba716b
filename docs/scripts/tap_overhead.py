"""Measure what the debug taps cost when no capture is active.

Times the eager flow and HiFT stages of a model three ways: as shipped (``tap()`` calls that
find no active capture), with ``tap`` replaced by an empty function (the floor: the call
alone), and with a capture active that records nothing (``include=[]``).

    python docs/scripts/tap_overhead.py --model tiny --repeat 30
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import backends
import cosytools.models.dit as dit
import cosytools.models.flow as flow
import cosytools.models.hift as hift
import cosytools.models.qwen2 as qwen2
from cosytools import taps
from cosytools.bench import make_inputs
from cosytools.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=100)
    a = ap.parse_args()
    be = backends.create("eager", load_model(a.model, components=("flow", "hift")), capture=False)
    inp = make_inputs(20, a.tokens, 3.0)
    tok = torch.randint(0, 6561, (1, a.tokens), generator=torch.Generator().manual_seed(0))
    mel = be.flow(tok, inp.prompt_speech_token, inp.prompt_feat, inp.embedding)

    def run():
        be.flow(tok, inp.prompt_speech_token, inp.prompt_feat, inp.embedding)
        be.hift(mel)

    mods = (dit, flow, hift, qwen2)
    saved = [m.tap for m in mods]

    def stubbed():
        for m in mods:
            m.tap = lambda name, t: None
        try:
            run()
        finally:
            for m, s in zip(mods, saved):
                m.tap = s

    def active():
        with taps.capture("x", include=[]):
            run()

    # interleave the variants so that machine noise hits all three alike
    times = {"off": [], "stub": [], "on": []}
    for fn in (run, stubbed, active):
        fn()
    for _ in range(a.repeat):
        for key, fn in (("off", run), ("stub", stubbed), ("on", active)):
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    shipped, floor, active_t = (statistics.median(times[k]) for k in ("off", "stub", "on"))
    print(f"flow+hift median over {a.repeat}: capture off {shipped * 1e3:.2f} ms | tap() stubbed out "
          f"{floor * 1e3:.2f} ms | capture on, recording nothing {active_t * 1e3:.2f} ms")
    print(f"capture off vs stubbed: {100 * (shipped - floor) / floor:+.2f} %")


if __name__ == "__main__":
    main()
