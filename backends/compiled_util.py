"""Helpers shared by the parts of the ``compiled`` backend: compiler settings, buckets, CUDA graphs.

Nothing here knows about CosyVoice3.  ``Compiler`` wraps ``torch.compile`` with the backend's
options; ``GraphedCall`` captures a callable into one ``torch.cuda.CUDAGraph`` over static input
buffers (CUDA only); ``GraphCache`` keeps a bounded set of them keyed by shape.
"""
from __future__ import annotations

import contextlib

import bisect
import logging
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, Hashable, Optional, Sequence, Tuple

import torch

from cosytools.errors import ConfigError

__all__ = ["Compiler", "GraphedCall", "GraphCache", "bucket", "pow2_bucket", "sync", "Timer",
           "configure_dynamo", "parse_option_string", "as_tuple"]

log = logging.getLogger(__name__)

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "none")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def configure_dynamo(recompile_limit: int = 64) -> None:
    """Raise Dynamo's per-function recompile limit (one specialisation per bucket is expected)
    and make sure inductor's on-disk FX graph cache is on."""
    import torch._dynamo.config as dc
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dc, name) and getattr(dc, name) < recompile_limit:
            setattr(dc, name, recompile_limit)
    if hasattr(dc, "accumulated_recompile_limit") and dc.accumulated_recompile_limit < 4 * recompile_limit:
        dc.accumulated_recompile_limit = 4 * recompile_limit
    with contextlib.suppress(Exception):  # inductor missing in an odd build
        import torch._inductor.config as ic
        ic.fx_graph_cache = True


def bucket(n: int, buckets: Optional[Sequence[int]], step: int) -> int:
    """The smallest bucket >= n; past the largest, n rounded up to a multiple of ``step``
    (``buckets`` empty or None: n itself, no padding)."""
    if not buckets:
        return n
    i = bisect.bisect_left(list(buckets), n)
    if i < len(buckets):
        return int(buckets[i])
    return -(-n // step) * step


def pow2_bucket(n: int, minimum: int = 256) -> int:
    """The smallest power of two >= max(n, minimum)."""
    m = max(n, minimum)
    return 1 << (m - 1).bit_length()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Accumulates wall seconds per part (with a device sync at both ends)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: Dict[str, float] = {}

    def part(self, name: str) -> "_Part":
        return _Part(self, name)


class _Part:
    def __init__(self, timer: Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        sync(self.timer.device)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        sync(self.timer.device)
        self.timer.seconds[self.name] = self.timer.seconds.get(self.name, 0.0) + time.perf_counter() - self.t0


class Compiler:
    """``torch.compile`` with the backend's settings.

    ``backend``: ``inductor`` (default), ``aot_eager`` / ``eager`` (Dynamo tracing only: fast to
    build, for tests and debugging) or ``none`` (no ``torch.compile`` at all: the same static-shape
    code runs eagerly).  ``mode`` is inductor's mode; on CPU the CUDA-graph part of
    ``reduce-overhead`` is meaningless and it is passed as ``default``.
    """

    def __init__(self, backend: str, mode: str, device: torch.device, fullgraph: bool = True) -> None:
        if backend not in COMPILE_BACKENDS:
            raise ConfigError(f"compiled backend: compile_backend {backend!r} unknown; "
                              f"use {', '.join(COMPILE_BACKENDS)}")
        if mode not in MODES:
            raise ConfigError(f"compiled backend: mode {mode!r} unknown; use {', '.join(MODES)}")
        self.backend, self.mode, self.device, self.fullgraph = backend, mode, device, fullgraph
        if backend != "none":
            configure_dynamo()

    def __call__(self, fn: Callable, dynamic: Optional[bool] = False) -> Callable:
        if self.backend == "none":
            return fn
        kw: Dict[str, Any] = {"dynamic": dynamic, "fullgraph": self.fullgraph}
        if self.backend == "inductor":
            mode = self.mode
            if self.device.type != "cuda" and mode in ("reduce-overhead", "max-autotune"):
                mode = "default" if mode == "reduce-overhead" else "max-autotune-no-cudagraphs"
            kw["mode"] = None if mode == "default" else mode
        else:
            kw["backend"] = self.backend
        return torch.compile(fn, **kw)

    @property
    def inductor_cudagraphs(self) -> bool:
        """Whether torch.compile itself records CUDA graphs (cudagraph trees)."""
        return self.backend == "inductor" and self.device.type == "cuda" and self.mode in ("reduce-overhead",
                                                                                            "max-autotune")


class GraphedCall:
    """``fn(*inputs)`` captured once in a CUDA graph over static copies of ``example_inputs``.

    Calling copies the new inputs into the static buffers (shapes must match), replays the graph
    and returns the static outputs (overwritten by the next replay: clone what you keep).
    ``fn`` is warmed up ``warmup`` times on a side stream first (this is where torch.compile
    compiles); anything ``fn`` mutates besides its outputs must tolerate those extra runs.
    """

    def __init__(self, fn: Callable, example_inputs: Sequence[torch.Tensor], warmup: int = 2,
                 on_warm: Optional[Callable[[], None]] = None) -> None:
        self.static_in = [t.detach().clone() for t in example_inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(max(1, warmup)):
                fn(*self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        if on_warm is not None:
            on_warm()
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the pipeline's LLM thread may launch work while another part captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_out = fn(*self.static_in)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        for buf, x in zip(self.static_in, inputs):
            if buf.shape != x.shape:
                raise ValueError(f"graphed call: input of shape {list(x.shape)} where the graph was captured "
                                 f"with {list(buf.shape)}")
            if buf.data_ptr() != x.data_ptr():
                buf.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_out


class GraphCache:
    """Captured graphs keyed by shape; least recently used dropped beyond ``max_size``.

    ``after`` = how many calls with a key run un-captured before that key is captured (1: capture
    on first use; 2: only shapes seen twice, e.g. repeated streaming chunk lengths).
    """

    def __init__(self, max_size: int = 8, after: int = 1, name: str = "") -> None:
        self.max_size, self.after, self.name = max_size, after, name
        self.graphs: "OrderedDict[Hashable, GraphedCall]" = OrderedDict()
        self.seen: Dict[Hashable, int] = {}
        self.capture_seconds = 0.0

    def get(self, key: Hashable, make: Callable[[], GraphedCall]) -> Optional[GraphedCall]:
        """The graph for ``key``, capturing it (via ``make``) when due; None while not yet due."""
        g = self.graphs.get(key)
        if g is not None:
            self.graphs.move_to_end(key)
            return g
        self.seen[key] = self.seen.get(key, 0) + 1
        if self.seen[key] < self.after:
            return None
        t0 = time.perf_counter()
        g = make()
        dt = time.perf_counter() - t0
        self.capture_seconds += dt
        # a first use compiles too (whole-step flow builds take ~30 s per bucket on an H100):
        # say what the wait was for
        log.info("captured %s graph %s in %.1f s (compilation on first use included)", self.name or "a", key, dt)
        self.graphs[key] = g
        while len(self.graphs) > self.max_size:
            self.graphs.popitem(last=False)
        return g

    def clear(self) -> None:
        self.graphs.clear()
        self.seen.clear()


def parse_option_string(text: str) -> Dict[str, Any]:
    """``"a=1,b=true,c=16:32:64,d=inductor"`` -> ``{'a': 1, 'b': True, 'c': (16, 32, 64), 'd': 'inductor'}``."""
    out: Dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"option {item!r}: expected key=value")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _parse_value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if ":" in v or low == "()":
        return tuple(int(x) for x in v.strip("()").split(":") if x)
    try:
        return int(v)
    except ValueError:
        return v


def as_tuple(v: Any) -> Tuple[int, ...]:
    """Buckets from None, an int, a sequence or a string ``"16:32:64"`` / ``"16,32"`` -> sorted tuple."""
    if v is None:
        return ()
    if isinstance(v, int):
        return (v,)
    if isinstance(v, str):
        if v.strip().lower() in ("none", "exact", ""):
            return ()
        v = [x for x in v.replace(",", ":").strip("()").split(":") if x.strip()]
    return tuple(sorted(int(x) for x in v))
