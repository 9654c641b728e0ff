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

    @property
    def attention_params(self) -> int:
        """Attention projection weights of one layer (MLA: its low-rank projections)."""
        a, H = self.attention, self.hidden_size
        nh = a["num_heads"]
        if a["kind"] == "mla":
            q = H * nh * a["head_dim"] if not a.get("q_lora_rank") else H * a["q_lora_rank"] + a["q_lora_rank"] * nh * a["head_dim"]
            nope = a["head_dim"] - a["qk_rope_head_dim"]
            kv = H * (a["kv_lora_rank"] + a["qk_rope_head_dim"]) + a["kv_lora_rank"] * nh * (nope + a["v_head_dim"])
            return q + kv + nh * a["v_head_dim"] * H
        hd, nkv = a["head_dim"], a["num_kv_heads"]
        return H * nh * hd + 2 * H * nkv * hd + nh * hd * H

    def weight_bytes_total(self) -> dict[str, float]:
        """Bytes of every weight the model holds, by part: routed experts, the rest (attention,
        shared experts, dense FFNs, routers, embeddings and an untied LM head). Norms and biases
        are left out (under 0.1%)."""
        H, moe_n = self.hidden_size, self.num_moe_layers
        dense_n = self.num_layers - moe_n
        experts = moe_n * self.num_experts * self.expert_bytes
        rest = (self.num_layers * self.attention_params + dense_n * 3 * H * self.dense_intermediate_size
                + moe_n * H * self.num_experts + 2 * self.vocab_size * H) * self.dense_weight_bytes
        rest += moe_n * self.shared_expert_bytes
        return {"experts": float(experts), "other": float(rest)}

    def expert_flops(self, tokens) -> float:
        """FLOPs of one expert on `tokens` tokens: 2 x params x tokens (multiply-add)."""
        return 2.0 * self.expert_params * tokens
