"""Benchmarks of s2hpruner against DMP, its ablations and importance-based baselines.

``python -m benchmarks.compare --profile quick`` runs the comparison of BENCHMARK.md;
:mod:`benchmarks.baselines` holds the plain training loop and the torch-pruning baselines,
:mod:`benchmarks.report` turns the stored JSON into ``RESULTS.md`` and a plot.
``python -m benchmarks.speed`` measures step and inference speed.
"""
