"""Evaluation: metrics, statistics, the evaluation classifier, cost profiling, result files."""
