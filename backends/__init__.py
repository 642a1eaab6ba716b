"""Backend registry: ``register``, ``get``, ``available``, ``create``.

Built-in backends register here; third-party packages add theirs through the
``cosytools.backends`` entry-point group (``name = "package.module:BackendClass"``), which
is read the first time the registry is queried.
"""
from __future__ import annotations

import importlib
import logging
from importlib import metadata
from typing import Any, Callable, Dict, List, Union

from cosytools.errors import CosyToolsError

from .base import Backend, LLMSession

__all__ = ["Backend", "LLMSession", "register", "get", "available", "create"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "cosytools.backends"

# name -> a Backend subclass, or "module:attr" imported on first use
_REGISTRY: Dict[str, Union[type, str]] = {
    "eager": "backends.eager:EagerBackend",
    "compiled": "backends.compiled:CompiledBackend",
    "onnx": "backends.onnx:OnnxBackend",
}
_entry_points_loaded = False


def register(name: str, backend: Union[type, str, None] = None) -> Callable:
    """Register a backend class under ``name`` (usable as a decorator)."""
    def deco(cls: Union[type, str]) -> Union[type, str]:
        _REGISTRY[name] = cls
        return cls
    return deco(backend) if backend is not None else deco


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    try:
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception as e:  # a broken environment must not break the built-ins
        log.warning("cannot read %s entry points: %s", ENTRY_POINT_GROUP, e)
        return
    for ep in eps:
        _REGISTRY.setdefault(ep.name, ep.value)


def available() -> List[str]:
    """Names of all registered backends (built-in and plugins)."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get(name: str) -> type:
    """The backend class registered under ``name``."""
    _load_entry_points()
    if name not in _REGISTRY:
        raise CosyToolsError(f"unknown backend {name!r}; available: {', '.join(available())}")
    entry = _REGISTRY[name]
    if isinstance(entry, str):
        mod, _, attr = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise CosyToolsError(f"backend {name!r} ({_REGISTRY[name]}) cannot be loaded: {e}") from None
        _REGISTRY[name] = entry
    if not (isinstance(entry, type) and issubclass(entry, Backend)):
        raise CosyToolsError(f"backend {name!r} is registered as {entry!r}, which is not a Backend subclass")
    return entry


def create(name: str, model: Any, capture: bool = True, **options: Any) -> Backend:
    """Instantiate backend ``name`` over a loaded :class:`cosytools.loading.CosyVoice3Model`.

    With ``COSYTOOLS_DUMP`` / ``FLOW_DEBUG_LOG_V`` set (and ``capture``), the backend comes
    wrapped so that its stage calls are recorded (see :mod:`parity.capture`).
    """
    backend = get(name)(model, **options)
    if capture:
        from parity.capture import maybe_wrap
        backend = maybe_wrap(backend)
    return backend
