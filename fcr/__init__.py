"""Feature Consistency Regularization (FCR) for Faster-Diffusion-style encoder caching."""

__version__ = "0.1.0"
