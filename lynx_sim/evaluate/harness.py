"""EleutherAI lm-evaluation-harness with a policy inside the model (when lm_eval is installed).

    python -m lynx_sim.evaluate.harness --policy lynx \\
        --model_args pretrained=mistralai/Mixtral-8x7B-Instruct-v0.1,dtype=bfloat16 \\
        --tasks gsm8k --batch_size 16 --device cuda:0 --output_path results/
    HF_ALLOW_CODE_EVAL=1 python -m lynx_sim.evaluate.harness --policy lynx \\
        --model_args pretrained=Qwen/Qwen3-30B-A3B,dtype=bfloat16 \\
        --tasks humaneval --confirm_run_unsafe_code --batch_size 16 --device cuda:0

Everything after our own options (--policy, --conf-model, --set, --hardware, --calib-trace,
--calib-prompts, --calib-tokens: as in `python -m lynx_sim.evaluate`) goes to lm_eval's
command line unchanged; the model is lm_eval's Hugging Face model (`HFLM`) with `PolicyPatch`
applied, registered as `lynx_hf`. Run the same command with `--policy vanilla` for the
baseline. Decode-only rules (Lynx, batch_budget, ...) act only in decode steps: generative
tasks (GSM8K, HumanEval) exercise them; log-likelihood tasks run whole sequences in one forward
(prefill) and leave such rules idle. The harness batches requests with left padding, so
batch-aware rules see real batches. Tested with lm_eval 0.4.13 on a tiny local model and local
tasks (tests/test_evaluate.py); not run here on a real checkpoint.
"""

from __future__ import annotations

import argparse
import sys


def model_class():
    """lm_eval's HFLM with a policy patched into the loaded model."""
    from lm_eval.models.huggingface import HFLM

    from ..traces.record import eos_ids, read_prompts, tokenize
    from . import calibrate
    from .__main__ import build_policy_for
    from .patch import PolicyPatch

    class PolicyHFLM(HFLM):
        def __init__(self, policy: str = "lynx", conf_model: str | None = None, policy_set: tuple = (),
                     hardware: str = "h100_sxm", calib_trace: str | None = None, calib_prompts: str | None = None,
                     calib_tokens: int = 4096, **kwargs):
            super().__init__(**kwargs)
            from ..policies import POLICIES

            eos = eos_ids(self.model) | ({self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())
            calib = None
            if policy in POLICIES and POLICIES[policy].needs_calibration:
                if calib_trace:
                    calib = calibrate.from_trace(calib_trace, self.model, calib_tokens)
                elif calib_prompts:
                    pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
                    calib = calibrate.from_model(self.model, tokenize(self.tokenizer, read_prompts(calib_prompts)),
                                                 batch_size=8, max_new_tokens=64, pad=pad, eos=eos, held_out=True,
                                                 max_tokens=calib_tokens)
            self.policy = build_policy_for(self.model, policy, conf_model, list(policy_set), calib, hardware)
            self.patch = PolicyPatch(self.model, self.policy, eos).__enter__()

    return PolicyHFLM


OPTIONS: dict = {}  # our options of the current run, read by the registered model class
_registered: list = []  # lm_eval's registry refuses a second class under one name: register once


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lynx_sim.evaluate.harness", add_help=False)
    ap.add_argument("--policy", default="lynx")
    ap.add_argument("--conf-model")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--hardware", default="h100_sxm")
    ap.add_argument("--calib-trace")
    ap.add_argument("--calib-prompts")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    return ap


def main(argv: list[str] | None = None) -> int:
    ours, rest = parser().parse_known_args(argv)
    try:
        from lm_eval.__main__ import cli_evaluate
        from lm_eval.api.registry import register_model
    except ImportError:
        print("error: lm-evaluation-harness is not installed (pip install lm_eval)", file=sys.stderr)
        return 2
    from ..policies import POLICIES

    if ours.policy not in POLICIES:
        print(f"error: unknown policy '{ours.policy}': registered policies are {sorted(POLICIES)}", file=sys.stderr)
        return 2
    if POLICIES[ours.policy].needs_calibration and not (ours.calib_trace or ours.calib_prompts):
        print(f"error: policy '{ours.policy}' learns per-layer statistics: give --calib-trace or --calib-prompts",
              file=sys.stderr)
        return 2
    OPTIONS.clear()
    OPTIONS.update(policy=ours.policy, conf_model=ours.conf_model, policy_set=tuple(ours.set), hardware=ours.hardware,
                   calib_trace=ours.calib_trace, calib_prompts=ours.calib_prompts, calib_tokens=ours.calib_tokens)
    if not _registered:
        base = model_class()

        class Registered(base):
            def __init__(self, **kwargs):
                super().__init__(**OPTIONS, **kwargs)

        register_model("lynx_hf")(Registered)
        _registered.append(Registered)
    argv0 = sys.argv
    sys.argv = ["lm_eval", "--model", "lynx_hf", *rest]
    try:
        cli_evaluate()
    finally:
        sys.argv = argv0
    return 0


if __name__ == "__main__":
    sys.exit(main())
