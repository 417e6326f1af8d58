"""Depth->width (`parallel`, METHOD.md): a pair of sequential blocks becomes one block of two parallel branches.

The matcher finds `block_pair` regions from the dataflow (graftc.match._block_pairs): blocks i and i+1 whose only
link is the residual stream i hands to i+1, conditioned alike. This rule replaces the pair's first block by a
parallel block and its second by `PairedAway`, a pass-through: the model's depth halves while its class, config
and call signature stay. The parallel block's two branches are the two blocks, each with its own norms and
modulation (DiT's adaLN), attention and MLP, both reading the pair's input x; their residual updates
u_g(x) = block_g(x) - x are merged by one linear projection W [D, 2D] with bias:

    out = x + W [u_0(x) | u_1(x)] + b.

**Merge init.** W = [I | I], b = 0, so the block starts as x + u_0(x) + u_1(x). The sequential pair computes
x + u_0(x) + u_1(x + u_0(x)); the two agree to first order in u_0 (the gap is u_1(x + u_0) - u_1(x), about
J_{u_1}(x) u_0). It needs no data, keeps both pretrained branches at their own scale, and is exact whenever the
second block does not react to the first's update; stage 1 (L1 onto the pair's output) then trains the merge with
the branches. Measured on demo:tiny-dit (`test_start_gap_on_demo`), |parallel - pair| / |pair - x| at the
teacher's inputs is 0.79 for blocks 0+1 (the first block rewrites the embedding heavily), 0.15 for 2+3 and 0.11
for 4+5, where simply dropping the second block of a pair is off by 0.52.

**Implementations** (`fused`, default true):
- graftc's DiT blocks (`graftc.models.dit.DiTBlock`, official-checkpoint names; and `demo:` models): a
  `ParallelDiTBlock` holding both branches' weights stacked [2, ...] and running them as one width-doubled
  computation, `graftc.kernels.parallel.parallel_dit_block` (one GEMM for both adaLN projections, batched GEMMs
  for qkv/proj/fc1/fc2, one SDPA over twice the heads, one GEMM for the merge; a fused modulated-LayerNorm
  prologue and merge-input epilogue, Triton on CUDA). GRAFTC_KERNELS=reference runs the unfused composition.
- every other family (diffusers DiT and PixArt, transformers LLMs and encoders, any block), or `fused: false`:
  `ParallelBlocks`, the two pretrained modules called side by side on the same arguments, then the merge.
Which argument is the hidden state and what the block returns (a tensor, or a tuple such as older transformers
decoder layers') come from graftc.site's probe of the first block; the second is called the same way (the
matcher pairs only blocks of one class fed the same conditioning). Model code that reaches into a block outside
its forward still works: `ParallelBlocks` answers attribute lookups with branch 0's (diffusers' DiT takes its
final conditioning from transformer_blocks[0].norm1.emb), and `PairedAway` keeps the plain settings (str, int,
float, bool) of the block it replaced.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from graftc.errors import GraftError
from graftc.kernels.parallel import PairWeights, parallel_dit_block
from graftc.match import Region
from graftc.rules import OpConfig, Rule, submodule


class ParallelConfig(OpConfig):
    op: Literal["parallel"] = "parallel"
    init: Literal["teacher", "random"] = Field(
        "teacher", description="teacher: branches copied from the pair's two blocks, merge [I | I] (starts as "
                               "x + u_0(x) + u_1(x)); random: every weight freshly initialized")
    unpairable: Literal["error", "skip"] = Field(
        "error", description="blocks that cannot pair (odd depth, side outputs, not adjacent in the dataflow, "
                             "conditioned differently): error = refuse, naming the block and why; skip = leave "
                             "them sequential and report them (pass report `left_sequential`, a warning)")
    fused: bool = Field(True, description="graftc DiT blocks: run both branches as one width-doubled computation "
                                          "(stacked weights); false (and every other family): call the two blocks "
                                          "side by side")


# ---------------------------------------------------------------- the call site, shared by both slots
def _hidden(site: dict, args: tuple, kwargs: dict, who: str) -> torch.Tensor:
    where = site["input"]
    if where["name"] is not None and where["name"] in kwargs:
        return kwargs[where["name"]]
    if where["position"] is not None and where["position"] < len(args):
        return args[where["position"]]
    raise GraftError(f"{who}: called without its hidden state (expected argument {where['name'] or where['position']})")


def _main_output(site: dict, output):
    return output if site["output"]["kind"] == "tensor" else output[site["output"]["at"]]


def _repack(site: dict, hidden: torch.Tensor, like=None):
    """`hidden` in the block's output structure; other tuple entries from `like` (the first branch's), else None."""
    returns = site["output"]
    if returns["kind"] == "tensor":
        return hidden
    rest = list(like) if like is not None else [None] * returns["length"]
    rest[returns["at"]] = hidden
    return type(like)(rest) if isinstance(like, tuple) else tuple(rest)


class PairedAway(nn.Identity):
    """Where the pair's second block was: the parallel block in the first's place already did its work, so this
    returns the hidden state it is given, in the block's output structure, whatever else it is called with.
    An nn.Identity, so stage 1 trains the parallel block on the teacher's input to the first block against the
    teacher's output of the second."""

    def __init__(self, site: dict, replaced: nn.Module | None = None):
        super().__init__()
        self.site = site
        # plain settings of the replaced block (e.g. a decoder layer's attention_type), for model code that reads them
        for name, value in (vars(replaced) if replaced is not None else {}).items():
            if not name.startswith("_") and name != "training" and isinstance(value, (str, int, float, bool)):
                setattr(self, name, value)

    def forward(self, *args, **kwargs):
        return _repack(self.site, _hidden(self.site, args, kwargs, "PairedAway"))

    def extra_repr(self) -> str:
        where = self.site["input"]
        return f"passes through argument {where['name'] or where['position']}"


def _merge_linear(width: int, init: str, like: torch.Tensor) -> nn.Linear:
    merge = nn.Linear(2 * width, width, device=like.device, dtype=like.dtype)
    if init == "teacher":
        with torch.no_grad():
            eye = torch.eye(width, device=like.device, dtype=like.dtype)
            merge.weight.copy_(torch.cat([eye, eye], dim=1))
            merge.bias.zero_()
    return merge


def _reset(module: nn.Module) -> None:
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()


class ParallelBlocks(nn.Module):
    """The general path: the two pretrained blocks, called side by side on the same arguments, merged."""

    def __init__(self, first: nn.Module, second: nn.Module, site: dict, width: int, init: str = "teacher"):
        super().__init__()
        self.branches = nn.ModuleList([first, second])
        if init == "random":
            for branch in self.branches:
                _reset(branch)
        self.merge = _merge_linear(width, init, next(first.parameters()))
        self.site = site

    def __getattr__(self, name: str):
        """Model code that reaches into the first block (diffusers' DiT reads transformer_blocks[0].norm1.emb for its
        final layer's conditioning) finds branch 0's, which is that block."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "branches" or "branches" not in self._modules:
                raise
            return getattr(self._modules["branches"][0], name)

    def forward(self, *args, **kwargs):
        x = _hidden(self.site, args, kwargs, "ParallelBlocks")
        outputs = [branch(*args, **kwargs) for branch in self.branches]
        updates = [_main_output(self.site, out) - x for out in outputs]
        out = x + self.merge(torch.cat(updates, dim=-1))
        return _repack(self.site, out, outputs[0])


# ---------------------------------------------------------------- graftc DiT: the width-doubled block
_PARTS = {  # PairWeights field -> (submodule path in a DiTBlock, attribute)
    "ada_w": ("adaLN_modulation.1", "weight"), "ada_b": ("adaLN_modulation.1", "bias"),
    "qkv_w": ("attn.qkv", "weight"), "qkv_b": ("attn.qkv", "bias"),
    "proj_w": ("attn.proj", "weight"), "proj_b": ("attn.proj", "bias"),
    "fc1_w": ("mlp.fc1", "weight"), "fc1_b": ("mlp.fc1", "bias"),
    "fc2_w": ("mlp.fc2", "weight"), "fc2_b": ("mlp.fc2", "bias"),
}


def _stacked(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Two nn.Linear weights/biases in the layout of graftc.kernels.parallel.PairWeights."""
    if name.startswith("ada"):
        return torch.cat(tensors)  # [2*6D, D], [2*6D]
    if name.endswith("_w"):
        return torch.stack([t.t() for t in tensors])  # [2, in, out]
    return torch.stack(tensors).unsqueeze(1)  # [2, 1, out]


def _dit_problem(first: nn.Module, second: nn.Module) -> str | None:
    """Why these two blocks are not a pair of unmodified graftc DiT blocks of one shape (None if they are)."""
    from graftc.models.dit import Attention, DiTBlock, Mlp

    for block in (first, second):
        if type(block) is not DiTBlock:
            return f"{type(block).__name__} is not graftc's DiTBlock"
        if type(block.attn) is not Attention or type(block.mlp) is not Mlp:
            return "its attention or MLP was rewritten"
        if getattr(block.mlp.act, "approximate", None) != "tanh":
            return "its MLP activation is not GELU-tanh"
        norms = (block.norm1, block.norm2)
        if any(not isinstance(n, nn.LayerNorm) or n.elementwise_affine for n in norms):
            return "its norms are not DiT's LayerNorms without affine weights"
        ada = block.adaLN_modulation
        if not (isinstance(ada, nn.Sequential) and len(ada) == 2 and isinstance(ada[0], nn.SiLU)
                and isinstance(ada[1], nn.Linear)):
            return "its adaLN modulation is not SiLU + Linear"
    shapes = [{k: tuple(getattr(b.get_submodule(m), a).shape) for k, (m, a) in _PARTS.items()} for b in (first, second)]
    if shapes[0] != shapes[1] or first.attn.num_heads != second.attn.num_heads or first.norm1.eps != second.norm1.eps:
        return "the two blocks differ in shape"
    return None


class ParallelDiTBlock(nn.Module):
    """Two graftc DiT blocks as one width-doubled block, forward = graftc.kernels.parallel.parallel_dit_block.
    Called like a DiTBlock: (x [B, N, D], c [B, D]). The branches' weights are stacked (branch 0 = the pair's first
    block) in the layout the fused computation reads without reshaping (`PairWeights`: GEMM operands input-major,
    i.e. qkv_w[g] is the first block's attn.qkv.weight transposed); merge_w [2D, D] and merge_b [D] are the merge
    projection (out = x + [u_0 | u_1] @ merge_w + merge_b)."""

    def __init__(self, width: int, heads: int, hidden: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.width, self.heads, self.hidden, self.eps = width, heads, hidden, eps
        like = {"device": device, "dtype": dtype}
        d, m = width, hidden
        shapes = {"ada_w": (12 * d, d), "ada_b": (12 * d,), "qkv_w": (2, d, 3 * d), "qkv_b": (2, 1, 3 * d),
                  "proj_w": (2, d, d), "proj_b": (2, 1, d), "fc1_w": (2, d, m), "fc1_b": (2, 1, m),
                  "fc2_w": (2, m, d), "fc2_b": (2, 1, d), "merge_w": (2 * d, d), "merge_b": (d,)}
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(*shape, **like)))

    @classmethod
    def from_blocks(cls, first: nn.Module, second: nn.Module, init: str = "teacher") -> "ParallelDiTBlock":
        ref = first.attn.qkv.weight
        block = cls(first.attn.qkv.in_features, first.attn.num_heads, first.mlp.fc1.out_features, first.norm1.eps,
                    device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for name, (path, attr) in _PARTS.items():
                parts = [getattr(b.get_submodule(path), attr) for b in (first, second)]
                if init == "random":  # nn.Linear's default init, branch by branch
                    fresh = [nn.Linear(p.shape[-1], p.shape[0], device=ref.device, dtype=ref.dtype) for p in
                             [getattr(b.get_submodule(path), "weight") for b in (first, second)]]
                    parts = [getattr(f, attr) for f in fresh]
                getattr(block, name).copy_(_stacked(name, parts))
            merge = _merge_linear(block.width, init, ref)  # nn.Linear(2D, D): weight [D, 2D]
            block.merge_w.copy_(merge.weight.t())
            block.merge_b.copy_(merge.bias)
        return block

    def weights(self) -> PairWeights:
        return PairWeights(self.ada_w, self.ada_b, self.qkv_w, self.qkv_b, self.proj_w, self.proj_b,
                           self.fc1_w, self.fc1_b, self.fc2_w, self.fc2_b, self.merge_w, self.merge_b)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return parallel_dit_block(x, c, self.weights(), self.heads, self.eps)

    def extra_repr(self) -> str:
        return f"branches=2, width={self.width}, heads={self.heads}, mlp_hidden={self.hidden}"


# ---------------------------------------------------------------- the rule
def guard_parallel(region: Region, config: ParallelConfig) -> str | None:
    unpaired = region.attrs.get("unpaired") or []
    if config.unpairable == "error" and unpaired:
        first = unpaired[0]
        more = f" (and {len(unpaired) - 1} more block(s))" if len(unpaired) > 1 else ""
        return (f"block {first['fqn']} cannot pair: {first['reason']}{more}; "
                "set unpairable: skip to leave such blocks sequential")
    if len(region.cover) != 2:
        return f"a block pair covers two blocks, this region covers {region.cover}"
    return None


def build_parallel(region: Region, config: ParallelConfig, model: nn.Module) -> dict[str, nn.Module]:
    first, second = (submodule(model, fqn) for fqn in region.cover)
    if type(first) is not type(second):
        raise GraftError(f"block pair {region.index}: {region.cover[0]} ({type(first).__name__}) and "
                         f"{region.cover[1]} ({type(second).__name__}) are different classes")
    site = region.attrs["site"]
    if config.fused and _dit_problem(first, second) is None:
        block = ParallelDiTBlock.from_blocks(first, second, config.init)
    else:
        block = ParallelBlocks(first, second, site, region.input_shape[-1], config.init)
    return {region.cover[0]: block, region.cover[1]: PairedAway(site, second)}


RULES = [
    Rule("parallel", ("block_pair",), ParallelConfig, build_parallel, guard_parallel,
         summary="depth->width: a pair of sequential blocks as two parallel branches merged by a linear projection "
                 "(`init: teacher`: the branches are the pair's blocks, the merge [I | I])",
         plugs_in=True, decode_state="the two blocks' KV", memory="as `self`, for both blocks"),
]
