"""Metrics: the decode step recorder (decode_recorder.py), the serving recorder (serving_recorder.py)
and the summary they write (names defined in docs/metrics.md)."""
