"""A model's shape, read from `conf/model/*.yaml`: what the cost model and generator need.

Byte and FLOP counts per expert live here once, so the cost model, the kernels' references and
the benchmarks agree (STYLE.md item 7).
"""

from __future__ import annotations

from dataclasses import dataclass

from .routing import RouterSpec


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    weight_bytes: float  # bytes per weight of the expert matrices
    dense_weight_bytes: float  # bytes per weight of attention, dense FFN and LM head
    attention: dict  # kind (gqa|mla), num_heads, num_kv_heads, head_dim, [MLA ranks]
    dense_intermediate_size: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    shared_experts: int
    shared_intermediate_size: int
    moe_layers: tuple[int, ...]
    router: RouterSpec
    lynx_alpha: float
    lynx_beta: int | None

    @classmethod
    def from_cfg(cls, m) -> "ModelSpec":
        moe = m.moe
        first, step = int(moe.get("first_dense_layers", 0)), int(moe.get("layer_step", 1))
        layers = tuple(range(first, int(m.num_layers), step))
        return cls(
            name=str(m.name), num_layers=int(m.num_layers), hidden_size=int(m.hidden_size),
            vocab_size=int(m.vocab_size), weight_bytes=float(m.weight_bytes),
            dense_weight_bytes=float(m.get("dense_weight_bytes", m.weight_bytes)), attention=dict(m.attention),
            dense_intermediate_size=int(m.dense_intermediate_size), num_experts=int(moe.num_experts),
            top_k=int(moe.top_k), expert_intermediate_size=int(moe.intermediate_size),
            shared_experts=int(moe.shared_experts), shared_intermediate_size=int(moe.shared_intermediate_size),
            moe_layers=layers, router=RouterSpec.from_cfg(moe),
            lynx_alpha=float(m.lynx.alpha), lynx_beta=None if m.lynx.beta is None else int(m.lynx.beta),
        )

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def expert_params(self) -> int:
        """Weights of one routed expert: gate and up [H, I] plus down [I, H]."""
        return 3 * self.hidden_size * self.expert_intermediate_size

    @property
    def expert_bytes(self) -> float:
        return self.expert_params * self.weight_bytes

    @property
    def shared_expert_bytes(self) -> float:
        """All shared-expert weights of one MoE layer (read every step)."""
        return 3 * self.hidden_size * self.shared_intermediate_size * self.weight_bytes

    def expert_flops(self, tokens) -> float:
        """FLOPs of one expert on `tokens` tokens: 2 x params x tokens (multiply-add)."""
        return 2.0 * self.expert_params * tokens
