"""GPU executor: replays traces and policies through `kernels/` on a real GPU and checks the
simulator against it.

Not written yet: it arrives with the kernels-and-executor issue. It will import `kernels` and
`lynx_sim` (never the other way round) and write the calibration JSON the cost model loads
(`conf/hardware/*.yaml: calibration`).
"""
