"""A region: one matched computation (attention, mlp, block, block pair) and where it sits in the model."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Region:
    """A matched computation. JSON-serializable: the manifest stores it, so loading needs no re-trace."""

    kind: str  # attention | mlp | block | block_pair
    index: int  # position among regions of its kind, execution order
    fqn: str  # smallest module enclosing the whole region
    cover: list[str]  # modules that compute exactly this region, in execution order ([] if inline)
    roles: dict[str, str] = field(default_factory=dict)  # role -> Linear fqn (q, k, v, o, w_in, w_out, ...)
    params: int = 0
    flops: int = 0
    input_shape: list[int] = field(default_factory=list)
    output_shape: list[int] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)  # heads, kv_heads, head_dim, hidden, pattern, ...

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Region":
        return cls(**data)
