"""Metrics: the decode step recorder (decode_recorder.py), the serving recorder (serving_recorder.py),
the Chrome trace (chrome_trace.py), run plots (plots.py), output writing (output.py) and the console
(console.py: progress bar, summary table). Summary keys are defined in docs/metrics.md."""
