"""Evaluation: demo, metrics, sweeps and benchmarks (the library never imports this package)."""
