"""Does the model fit, and how many KV-cache tokens are left: the memory plan of one deployment.

Per GPU: weights (tensor parallel splits all of them over `gpus`; expert parallel splits the
routed experts and replicates the rest), then `gpu_memory_utilization` of the memory for
weights plus KV cache (vLLM's rule; activations and CUDA graphs live in the remainder). The KV
capacity is the whole deployment's, in tokens: under expert parallelism each rank caches the
KV of its own data-parallel share of the requests. GQA heads fewer than `gpus` would be
replicated by a real engine; that waste is not modelled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..model import ModelSpec
from .hardware import HardwareSpec
from .parallel import Parallel

GIB = 2**30


class DoesNotFitError(ValueError):
    """The model's weights do not fit the GPUs (`memory_check=error`)."""


@dataclass(frozen=True)
class MemoryPlan:
    weights_gib_per_gpu: float
    usable_gib_per_gpu: float  # memory_gib x gpu_memory_utilization
    kv_bytes_per_token: float  # one cached token, all layers, on the GPU that holds it
    kv_capacity_tokens: int  # the deployment's total; 0 when the weights do not fit
    fits: bool

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def explain(self, model: str, hw: str, parallel: Parallel) -> str:
        return (f"model {model} needs {self.weights_gib_per_gpu:.1f} GiB of weights per GPU, and {hw} offers "
                f"{self.usable_gib_per_gpu:.1f} GiB per GPU for weights and KV cache (parallel.gpus={parallel.gpus}, "
                f"expert_parallel={parallel.expert_parallel}, serving.gpu_memory_utilization): choose more GPUs "
                f"(parallel.gpus=...), larger hardware, or memory_check=warn to simulate it anyway (flagged)")


def plan(model: ModelSpec, hw: HardwareSpec, parallel: Parallel, kv_bytes_per_token_layer: float,
         utilisation: float = 0.9) -> MemoryPlan:
    """`kv_bytes_per_token_layer`: one token's cache at one layer on one rank
    (Roofline.kv_bytes_per_token_rank: replicated KV heads and MLA latents counted in full)."""
    if not 0 < utilisation <= 1:
        raise ValueError(f"serving.gpu_memory_utilization: expected a number in (0, 1], found {utilisation!r}")
    parts, g = model.weight_bytes_total(), parallel.gpus
    weights = (parts["experts"] + parts["other"]) / g if not parallel.expert_parallel else parts["experts"] / g + parts["other"]
    usable = hw.memory_gib * GIB * utilisation
    per_token = model.num_layers * kv_bytes_per_token_layer
    free = usable - weights
    ranks = g if parallel.expert_parallel else 1  # data-parallel KV caches under EP
    capacity = int(max(free, 0) // per_token) * ranks
    return MemoryPlan(weights / GIB, usable / GIB, float(per_token), capacity, free > 0)
