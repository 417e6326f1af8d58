"""One shape for every kernel family: a torch custom op declared from its implementations.

A family is one op, `torch.ops.graftc.<name>`, and up to four implementations ("paths") of the same maths:

    reference  the naive definition, beside the fast paths in kernels/<op>/naive.py (GRAFTC_KERNELS=reference)
    torch      the PyTorch path: wherever no other path applies
    cpu        optional: a forward-only PyTorch fast path for CPU tensors (GRAFTC_KERNELS=auto); gradients are
               recomputed through `torch`
    triton     optional: Triton kernels for CUDA tensors (auto), or for every tensor (GRAFTC_KERNELS=triton; CPU
               tensors then need TRITON_INTERPRET=1)

`Family` registers the op from its schema, with `fake` (output shapes, for export and FakeTensor), `flops`
(FlopCounterMode's formula, called with shapes for tensor arguments) and `backward`, and dispatches every call
by the device of its first tensor and the GRAFTC_KERNELS mode (graftc.kernels.dispatch). A family is then a
declaration, e.g. with a chunked PyTorch path and the naive reference:

    retention = Family(
        "retention", "(Tensor q, Tensor k, Tensor v, Tensor decay, int chunk) -> Tensor",
        reference=naive.retention, torch=chunked.retention,
        fake=lambda q, k, v, decay, chunk: torch.empty_like(v),
        flops=lambda q, k, v, decay, chunk, **kwargs: 4 * math.prod(q) * v[-1],  # shapes, not tensors
        backward=recompute)
    y = retention(q, k, v, decay, 64)   # torch.ops.graftc.retention: one call in exported graphs

A path is called with the op's arguments (or through `call(path, *arguments)` where a family's paths are objects).
`backward(family, inputs, outputs, *grads)` returns one gradient per op argument (None where there is none);
`recompute` is the usual one. It gets the outputs only with `save_outputs` (else ()); `nondifferentiable` lists
the outputs that get no gradient. A backward with kernels of its own is a family of its own (without `backward`)
that the forward family's `backward` calls: kernels/hyena and kernels/local_attention do that.

Tests and benchmarks run one path with `only(path, fn)`: a path name, or a path object (a tuned tile size).
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
from typing import Any, Callable

import torch
from torch import Tensor, ops
from torch.library import custom_op

from graftc.kernels import dispatch
from graftc.kernels.flops import formula

HAS_TRITON = importlib.util.find_spec("triton") is not None  # not imported here: TRITON_INTERPRET is read then

_FORCED: contextvars.ContextVar = contextvars.ContextVar("graftc_forced_path", default=None)


class Family:
    def __init__(self, name: str, schema: str, *, reference, torch, fake: Callable, flops: Callable | None = None,
                 backward: Callable | None = None, cpu=None, triton=None, call: Callable | None = None,
                 save_outputs: bool = False, nondifferentiable: tuple[int, ...] = ()):
        # (`torch` names the PyTorch path here: this method uses the module only through `custom_op` and `ops`)
        self.paths = {"reference": reference, "torch": torch, "cpu": cpu, "triton": triton}
        self.call = call or (lambda path, *args: path(*args))
        self.backward, self.save_outputs, self.nondifferentiable = backward, save_outputs, nondifferentiable
        self.op = custom_op(f"graftc::{name}", self._run, mutates_args=(), schema=schema)
        self.op.register_fake(fake)
        if backward is not None:
            self.op.register_autograd(self._backward, setup_context=self._setup)
        if flops is not None:  # none for elementwise ops: FlopCounterMode counts only matmul-like work
            formula(getattr(ops.graftc, name))(flops)

    def pick(self, x: Tensor, differentiable: bool = False) -> Any:
        """The path a call on tensor x runs: forced (`only`), else by GRAFTC_KERNELS and x's device."""
        forced = _FORCED.get()
        if forced is not None:
            if not isinstance(forced, str):
                return forced
            if self.paths.get(forced) is not None:
                return self.paths[forced]
        mode = dispatch.mode()
        if mode == "reference":
            return self.paths["reference"]
        # triton forced without triton installed: the path itself says what is missing
        if self.paths["triton"] is not None and dispatch.use_triton(x) and (HAS_TRITON or mode == "triton"):
            return self.paths["triton"]
        if self.paths["cpu"] is not None and not differentiable and mode == "auto" and x.device.type == "cpu":
            return self.paths["cpu"]
        return self.paths["torch"]

    def _run(self, *args):
        return self.call(self.pick(_first_tensor(args)), *args)

    def __call__(self, *args):
        """The op; a plain eager call (no autograd needed, no tracing or dispatch mode) runs the path directly,
        skipping the custom-op dispatcher, whose cost per call is that of a small kernel on a GPU."""
        if dispatch.plain_eager(args):
            return self._run(*args)
        return self.op(*args)

    def _setup(self, ctx, inputs, output):
        outputs = output if isinstance(output, tuple) else (output,)
        is_saved = [x is None or isinstance(x, Tensor) for x in inputs]
        ctx.save_for_backward(*(x for x, saved in zip(inputs, is_saved) if saved),
                              *(outputs if self.save_outputs else ()))
        ctx.others = [None if saved else x for x, saved in zip(inputs, is_saved)]
        ctx.is_saved, ctx.forced = is_saved, _FORCED.get()
        ctx.mark_non_differentiable(*(outputs[i] for i in self.nondifferentiable))

    def _backward(self, ctx, *grads):
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved) if is_saved else x for x, is_saved in zip(ctx.others, ctx.is_saved)]
        with _forcing(ctx.forced):
            return tuple(self.backward(self, inputs, tuple(saved), *grads))


def recompute(family: Family, inputs, outputs, *grads):
    """Gradients by recomputing the forward under torch.func.vjp, through the path dispatch picks for it (never
    the forward-only `cpu` path): nothing but the inputs is kept from forward to backward, like activation
    checkpointing, at the price of one more forward."""
    where = [i for i, x in enumerate(inputs) if isinstance(x, Tensor)]
    path = family.pick(inputs[where[0]], differentiable=True)

    def forward(*tensors):
        args = list(inputs)
        for i, tensor in zip(where, tensors):
            args[i] = tensor
        return family.call(path, *args)

    recomputed, vjp = torch.func.vjp(forward, *(inputs[i] for i in where))
    recomputed = recomputed if isinstance(recomputed, tuple) else (recomputed,)
    grads = [torch.zeros_like(out) if grad is None else grad for grad, out in zip(grads, recomputed)]
    input_grads = dict(zip(where, vjp(tuple(grads) if len(grads) > 1 else grads[0])))
    return [input_grads.get(i) for i in range(len(inputs))]


def only(path, fn: Callable) -> Callable:
    """fn with every family it calls run on one path, forward and backward: a path name (families without that
    path dispatch as usual) or a path object. For tests and benchmarks."""
    def run(*args, **kwargs):
        with _forcing(path):
            return fn(*args, **kwargs)
    return run


@contextlib.contextmanager
def _forcing(path):
    token = _FORCED.set(path)
    try:
        yield
    finally:
        _FORCED.reset(token)


def _first_tensor(args) -> Tensor:
    return next(x for x in args if isinstance(x, Tensor))
