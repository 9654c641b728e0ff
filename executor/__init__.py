"""GPU executor: replays the simulator's decode steps and policies through `kernels/` on a real
GPU and checks the simulator against it.

`python -m executor policy=lynx batch=64` (or `executor.device=cpu`: tiny sizes under the Triton
interpreter, a check only). `run.py` is the replay: per MoE layer the policy's and vanilla's
selections through the fused MoE kernels, timed as CUDA-graph replays beside the roofline's
prediction; `device.py` picks the GPU, `weights.py` seeds layer weights, `timing.py` times,
`calibrate.py` fits the calibration JSON that `conf/hardware/*.yaml: calibration` loads, and
`aot.py` compiles every kernel launch for sm_90 without a GPU. It imports `kernels` and
`lynx_sim`, never the other way round (STYLE.md layering).
"""
