"""Which stop-check scheme is faster for the compiled backend's device sampling (issue 5).

One compiled backend, one warm-up; then the same 250-token generation (stop ids masked until
the end, as ``cosytools bench``) with each scheme: the host reads the sampled ids every ``k``
tokens, either synchronously (the GPU idles while the host checks) or asynchronously (block
b is read while block b+1 runs).  The decode graph is the same for all schemes (only the
Python loop around it changes), so nothing recompiles between rows.  Prints one line per
scheme and, with ``--json``, writes them.

    python docs/scripts/stop_check.py --model /tmp/cv3-full --device cuda --dtype bf16
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import backends
from cosytools.bench import make_inputs
from cosytools.loading import load_model

SCHEMES = ((1, False), (4, False), (16, False), (64, False), (4, True), (16, True), (64, True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--tokens", type=int, default=250)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--option", action="append", default=[], help="compiled backend option k=v")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from backends.compiled_util import parse_option_string

    opts = parse_option_string(",".join(a.option))
    opts.setdefault("exact_sampling", False)
    m = load_model(a.model, components=("llm",), device=a.device, dtype=a.dtype)
    be = backends.create("compiled", m, capture=False, **opts)
    inp = make_inputs(60, a.tokens, 3.0)
    cuda = be.device.type == "cuda"
    runner = be.llm_runner

    def generate() -> float:
        g = torch.Generator(device=be.device if cuda else "cpu").manual_seed(0)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        toks = list(be.llm_generate(inp.text, inp.prompt_text, inp.prompt_speech_token, min_len=a.tokens,
                                    max_len=a.tokens, generator=g, strict_min_len=True))
        dt = time.perf_counter() - t0
        assert len(toks) == a.tokens, len(toks)
        return dt

    t0 = time.perf_counter()
    generate()  # compile + capture
    warm = time.perf_counter() - t0
    rows = []
    for k, async_stop in SCHEMES:
        if async_stop and not cuda:
            continue
        runner.stop_check_every, runner.async_stop = k, async_stop
        generate()
        times = [generate() for _ in range(a.repeat)]
        ms = statistics.median(times) * 1000.0 / a.tokens
        rows.append({"stop_check_every": k, "async_stop": async_stop, "ms_per_token": ms,
                     "tokens_per_s": 1000.0 / ms, "runs": len(times)})
        print(f"k={k:3d} async={str(async_stop):5s}  {ms:8.3f} ms/token  {1000.0 / ms:8.1f} tokens/s "
              f"(prefill included, median of {len(times)})", flush=True)
    info = {"device": torch.cuda.get_device_name(be.device) if cuda else "cpu", "dtype": str(m.dtype),
            "tokens": a.tokens, "warmup_s": warm, "options": opts, "torch": torch.__version__, "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
