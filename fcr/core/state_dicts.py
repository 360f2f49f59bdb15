"""Comparing a state dict with a module's own: what a strict load would reject, in words."""

from __future__ import annotations

import torch

__all__ = ["state_dict_mismatch"]


def state_dict_mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """Describe how ``state`` fails to fit a module's ``own`` state dict (None when it fits)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if not (missing or unexpected or wrong):
        return None
    return f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]} (first three of each)"
