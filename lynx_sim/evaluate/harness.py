"""EleutherAI lm-evaluation-harness with a policy inside the model (when lm_eval is installed).

    python -m lynx_sim.evaluate.harness --policy lynx \\
        --model_args pretrained=mistralai/Mixtral-8x7B-Instruct-v0.1,dtype=bfloat16 \\
        --tasks gsm8k --batch_size 16 --device cuda:0 --output_path results/
    python -m lynx_sim.evaluate.harness --policy lynx --model_args pretrained=Qwen/Qwen3-30B-A3B,dtype=bfloat16 \\
        --tasks humaneval --confirm_run_unsafe_code --batch_size 16 --device cuda:0

Everything after our own options (--policy, --conf-model, --set) goes to lm_eval's command
line unchanged; the model is lm_eval's Hugging Face model (`HFLM`) with `PolicyPatch` applied,
registered as `lynx_hf`. Decode-only rules (Lynx, batch_budget, ...) act only in decode steps:
generative tasks (GSM8K, HumanEval) exercise them; log-likelihood tasks run whole sequences in
one forward (prefill) and leave such rules idle. The harness batches requests with left
padding, so batch-aware rules see real batches. Not exercised in our test suite (lm_eval is not
a dependency); the patch and the measures it relies on are (tests/test_evaluate.py).
"""

from __future__ import annotations

import argparse
import sys


def model_class():
    """lm_eval's HFLM with a policy patched into the loaded model."""
    from lm_eval.models.huggingface import HFLM

    from .__main__ import build_policy_for
    from .patch import PolicyPatch

    class PolicyHFLM(HFLM):
        def __init__(self, policy: str = "lynx", conf_model: str | None = None, policy_set: tuple = (), **kwargs):
            super().__init__(**kwargs)
            self.policy = build_policy_for(self.model, policy, conf_model, list(policy_set))
            self.patch = PolicyPatch(self.model, self.policy).__enter__()

    return PolicyHFLM


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lynx_sim.evaluate.harness", add_help=False)
    ap.add_argument("--policy", default="lynx")
    ap.add_argument("--conf-model")
    ap.add_argument("--set", action="append", default=[])
    ours, rest = ap.parse_known_args(argv)
    try:
        from lm_eval.__main__ import cli_evaluate
        from lm_eval.api.registry import register_model
    except ImportError:
        print("error: lm-evaluation-harness is not installed (pip install lm_eval)", file=sys.stderr)
        return 2
    base = model_class()

    class Registered(base):
        def __init__(self, **kwargs):
            super().__init__(policy=ours.policy, conf_model=ours.conf_model, policy_set=tuple(ours.set), **kwargs)

    register_model("lynx_hf")(Registered)
    sys.argv = ["lm_eval", "--model", "lynx_hf", *rest]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
