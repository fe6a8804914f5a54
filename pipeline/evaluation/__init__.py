"""Evaluation: held-out DPO numbers from the run, greedy answers to the fixed questions, style metrics."""
