"""Read HyperPyYAML files (``cosyvoice3.yaml``) as plain data, never executing them.

HyperPyYAML tags are kept as :class:`Tagged` nodes (``!new:``, ``!name:``, ``!apply:``) and
``!ref <x>`` references are resolved against the top level of the document, including simple
arithmetic such as ``<chunk_size> * <token_mel_ratio>``.  Nothing is imported or called.
"""
from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Union

import yaml

from .errors import ConfigError

__all__ = ["Tagged", "Ref", "load_hyperyaml", "loads_hyperyaml"]


@dataclass
class Tagged:
    """A HyperPyYAML object node: ``kind`` is ``new``/``name``/``apply``, ``target`` the dotted path."""

    kind: str
    target: str
    args: Any = field(default_factory=dict)

    @property
    def class_name(self) -> str:
        return self.target.rsplit(".", 1)[-1]

    def kwargs(self) -> Dict[str, Any]:
        return dict(self.args) if isinstance(self.args, dict) else {}


@dataclass
class Ref:
    """An unresolved ``!ref`` expression."""

    expr: str


class _Loader(yaml.SafeLoader):
    """SafeLoader that turns HyperPyYAML tags into data nodes."""


def _construct_tagged(loader: _Loader, tag_suffix: str, node: yaml.Node) -> Tagged:
    kind, _, target = tag_suffix.partition(":")
    if isinstance(node, yaml.MappingNode):
        args: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        args = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
        args = {} if value in ("", None) else [value]
    return Tagged(kind, target, args)


def _construct_ref(loader: _Loader, node: yaml.Node) -> Ref:
    return Ref(str(loader.construct_scalar(node)))


for _kind in ("new", "name", "apply"):
    _Loader.add_multi_constructor(f"!{_kind}:", lambda l, s, n, k=_kind: _construct_tagged(l, f"{k}:{s}", n))
_Loader.add_constructor("!ref", _construct_ref)
# `!copy` / `!include` appear in some HyperPyYAML files; treat !copy like !ref, refuse !include.
_Loader.add_constructor("!copy", _construct_ref)

_REF = re.compile(r"<([A-Za-z_][A-Za-z0-9_.\[\]]*)>")
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}


def _eval_arith(expr: str, where: str) -> Any:
    """Evaluate a numeric expression made only of literals and + - * / // % ** ()."""
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise ConfigError(f"{where}: cannot parse !ref expression {expr!r}: {e.msg}") from None

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        raise ConfigError(f"{where}: !ref expression {expr!r} is not simple arithmetic")

    return ev(tree)


def _lookup(doc: Dict[str, Any], name: str, where: str) -> Any:
    parts = re.split(r"[.\[\]]+", name.strip("]"))
    value: Any = doc
    for p in parts:
        if not p:
            continue
        if isinstance(value, dict) and p in value:
            value = value[p]
        elif isinstance(value, Tagged) and isinstance(value.args, dict) and p in value.args:
            value = value.args[p]
        else:
            raise ConfigError(f"{where}: !ref <{name}> names a key that is not defined in the yaml")
    return value


def _resolve(value: Any, doc: Dict[str, Any], where: str, depth: int = 0) -> Any:
    if depth > 50:
        raise ConfigError(f"{where}: !ref chain too deep (circular reference?)")
    if isinstance(value, Ref):
        expr = value.expr.strip()
        m = _REF.fullmatch(expr)
        if m:
            return _resolve(_lookup(doc, m.group(1), where), doc, where, depth + 1)
        substituted = []

        def repl(mm: re.Match) -> str:
            v = _resolve(_lookup(doc, mm.group(1), where), doc, where, depth + 1)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ConfigError(f"{where}: !ref {expr!r} does arithmetic on <{mm.group(1)}>={v!r}, not a number")
            substituted.append(v)
            return repr(v)

        text = _REF.sub(repl, expr)
        if not substituted:
            return expr  # a plain string after !ref
        return _eval_arith(text, where)
    if isinstance(value, Tagged):
        return Tagged(value.kind, value.target, _resolve(value.args, doc, where, depth))
    if isinstance(value, dict):
        return {k: _resolve(v, doc, where, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, doc, where, depth) for v in value]
    return value


def loads_hyperyaml(text: str, where: str = "<string>") -> Dict[str, Any]:
    """Parse HyperPyYAML text into plain data with :class:`Tagged` nodes and resolved refs."""
    try:
        doc = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(doc).__name__}")
    return _resolve(doc, doc, where)


def load_hyperyaml(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a HyperPyYAML file from disk as data (see :func:`loads_hyperyaml`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read model config {path}: {e.strerror}") from None
    return loads_hyperyaml(text, str(path))
