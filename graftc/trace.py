"""Trace a model to an FX graph whose every node knows its module path.

torch.export (non-strict) is the one tracer that handles every family graftc supports; its nodes carry
`nn_module_stack`, which we turn into plain module paths. The graph is used to *find* regions; rewriting
happens on the user's modules, so the model keeps its class, config and pipeline.
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from graftc.errors import GraftError, one_line


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Example inputs are a tuple of positional args or a dict of keyword args."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    return tuple(example_inputs), {}


@dataclass
class Traced:
    """An exported graph plus the lookups the matcher needs."""

    graph: fx.Graph
    params: dict[str, str]  # placeholder name -> parameter/buffer fqn
    _stack: dict[fx.Node, tuple[str, ...]] = field(default_factory=dict)

    @property
    def nodes(self) -> list[fx.Node]:
        return list(self.graph.nodes)

    def stack(self, node: fx.Node) -> tuple[str, ...]:
        """Module paths enclosing `node`, outermost first ('' is the root)."""
        if node not in self._stack:
            meta = node.meta.get("nn_module_stack") or {}
            self._stack[node] = ("",) + tuple(_clean_fqn(path) for path, _cls in meta.values())
        return self._stack[node]

    def module(self, node: fx.Node) -> str:
        return self.stack(node)[-1]

    def param_fqn(self, node: Any) -> str | None:
        return self.params.get(node.name) if isinstance(node, fx.Node) else None


def _clean_fqn(path: str) -> str:
    # Older torch versions spell paths as "L['self'].blocks[0].attn"; normalize to "blocks.0.attn".
    for junk in ("L['self'].", "L['self']", "L__self__."):
        path = path.replace(junk, "")
    return path.replace("[", ".").replace("]", "").replace("'", "").strip(".")


def trace(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None) -> Traced:
    """Export `model` on its example inputs (non-strict, so ordinary Python control flow just runs)."""
    kwargs = dict(kwargs or {})
    # On failure torch.export logs warnings and prints the partial graph to stderr; our one error line says it all.
    noise, muted = io.StringIO(), logging.root.manager.disable
    try:
        logging.disable(logging.ERROR)
        with torch.no_grad(), contextlib.redirect_stderr(noise):
            program = torch.export.export(model, tuple(args), kwargs, strict=False)
    except GraftError:
        raise
    except Exception as exc:  # torch raises many exception types here; report the construct and where
        raise GraftError(f"cannot trace {type(model).__name__}: {describe_failure(exc)}") from exc
    finally:
        logging.disable(muted)
    sys.stderr.write(noise.getvalue())
    params = {spec.arg.name: spec.target for spec in program.graph_signature.input_specs if spec.target is not None}
    return Traced(graph=program.graph, params=params)


def describe_failure(exc: Exception) -> str:
    """The first line of torch's message plus the innermost user frame, which names the module and line."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}: {frames[-1].line})" if frames else ""
    return f"{one_line(exc, 300)}{where}"
