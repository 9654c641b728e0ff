"""Closed-loop evaluation: a policy applied inside a Hugging Face MoE model (`patch.py`),
measured against the model's own routing (`compare.py`); `python -m lynx_sim.evaluate`."""
