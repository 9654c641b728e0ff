"""Metrics: the step recorder and the summary it writes (names defined in docs/metrics.md)."""
