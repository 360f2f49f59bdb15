"""Experiments: stride sweep, robustness, mechanistic regression (each a runner over configurations)."""
