"""Experiments built from runs: compare, sweep, the twin chain, bench, gpu-smoke; their pages in report.py."""
