"""Sharded per-image evaluation: a fixed split of an evaluation set into shards, each shard's
per-image tensors written as soon as it is finished, and a gather that reads them back in order.

The split depends on the set size and ``num_shards`` only, never on how many processes run it: a
process takes every ``world``-th shard, so 1, 2 or 8 processes compute the very same shards (and,
since image ``i``'s noise is seeded by ``(seed, i)``, the very same images). A shard file is
written atomically with its key in the metadata; a killed run resumes by skipping the shards whose
files are whole and were made with the same key. Set-level statistics are merged from the shards
(:class:`FeatureMoments`), never averaged over shards.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from fcr.eval.results import StaleResultError, save_safetensors_atomic
from fcr.paths import portable

__all__ = ["FeatureMoments", "ShardPlan", "ShardingError", "gather_shards", "read_shard", "run_shards", "shard_file"]


class ShardingError(ValueError):
    """A shard plan that cannot be run as configured (e.g. a process count that does not divide it)."""


@dataclass(frozen=True)
class ShardPlan:
    """``num_items`` images split into ``num_shards`` contiguous, near-equal index ranges."""

    num_items: int
    num_shards: int

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise ShardingError(f"nothing to evaluate: {self.num_items} items")
        if not 1 <= self.num_shards <= self.num_items:
            raise ShardingError(f"eval_shards must lie in [1, {self.num_items}] (one image per shard at least), "
                                f"got {self.num_shards}")

    def items(self, shard: int) -> range:
        """The image indices of ``shard`` (the first ``num_items % num_shards`` shards hold one more)."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} of {self.num_shards}")
        size, extra = divmod(self.num_items, self.num_shards)
        start = shard * size + min(shard, extra)
        return range(start, start + size + (shard < extra))

    def assigned(self, rank: int, world: int) -> list[int]:
        """The shards process ``rank`` of ``world`` computes: every ``world``-th one, so each process
        gets the same number; a ``world`` that does not divide ``num_shards`` is refused."""
        if world < 1 or not 0 <= rank < world:
            raise ShardingError(f"process {rank} of {world}")
        if self.num_shards % world:
            raise ShardingError(
                f"eval_shards={self.num_shards} is not divisible by the {world} launched processes: every process "
                f"must get the same number of shards; set eval_shards to a multiple of {world}"
            )
        return list(range(rank, self.num_shards, world))


def shard_file(folder: str | Path, shard: int) -> Path:
    return Path(folder) / f"shard_{shard:05d}.safetensors"


def _canonical(key: Mapping[str, Any]) -> str:
    # Paths as every machine spells them, so a clone elsewhere resumes the same shards.
    return json.dumps(portable(json.loads(json.dumps(key, default=str))), sort_keys=True)


def read_shard(path: str | Path, key: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """The tensors of a whole shard file made with ``key``; None when it is missing or cut short.
    A whole file made with another key raises :class:`StaleResultError` (never mixed in)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError):
        return None
    if meta.get("key") != _canonical(key):
        raise StaleResultError(f"{path} was made with other parameters; delete its folder or use another output_dir")
    return tensors


def run_shards(
    plan: ShardPlan,
    folder: str | Path,
    key: Mapping[str, Any],
    measure: Callable[[range], Mapping[str, torch.Tensor]],
    shards: Sequence[int],
    *,
    progress: bool = False,
    desc: str = "shards",
) -> int:
    """Compute and write each of ``shards`` whose file is not already whole (``measure(items)``
    returns per-image tensors, first dimension ``len(items)``); returns how many were computed."""
    computed = 0
    for shard in tqdm(shards, disable=not progress, desc=desc):
        path = shard_file(folder, shard)
        if read_shard(path, key) is not None:
            continue
        items = plan.items(shard)
        tensors = dict(measure(items))
        for name, tensor in tensors.items():
            if tensor.shape[:1] != (len(items),):
                raise ValueError(f"measure returned {name} of shape {tuple(tensor.shape)} for {len(items)} images")
        save_safetensors_atomic(tensors, path, {"key": _canonical(key), "shard": str(shard),
                                                "start": str(items.start), "stop": str(items.stop)})
        computed += 1
    return computed


def gather_shards(plan: ShardPlan, folder: str | Path, key: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Every shard's per-image tensors, concatenated in image order; missing shards are an error."""
    parts = [read_shard(shard_file(folder, s), key) for s in range(plan.num_shards)]
    missing = [s for s, part in enumerate(parts) if part is None]
    if missing:
        raise FileNotFoundError(f"{folder}: shards {missing[:8]}{'...' if len(missing) > 8 else ''} are not finished")
    return {name: torch.cat([part[name] for part in parts if part is not None]) for name in parts[0]}


@dataclass(frozen=True)
class FeatureMoments:
    """Count, mean and scatter (sum of centred outer products) of a feature set, in float64.

    Two sets' moments merge exactly (Chan, Golub and LeVeque's pairwise update), so FID statistics
    of a sharded evaluation equal those of the whole set, whatever the split.
    """

    count: int
    mean: np.ndarray
    scatter: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray | torch.Tensor) -> FeatureMoments:
        x = features.double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[0] < 1:
            raise ValueError(f"features must be (N >= 1, D); got shape {x.shape}")
        mean = x.mean(axis=0)
        centred = x - mean
        return cls(x.shape[0], mean, centred.T @ centred)

    def merge(self, other: FeatureMoments) -> FeatureMoments:
        if self.mean.shape != other.mean.shape:
            raise ValueError(f"feature dims differ: {self.mean.shape} vs {other.mean.shape}")
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        scatter = self.scatter + other.scatter + np.outer(delta, delta) * (self.count * other.count / n)
        return FeatureMoments(n, mean, scatter)

    @classmethod
    def merged(cls, parts: Iterable[np.ndarray | torch.Tensor]) -> FeatureMoments:
        """The moments of the union of feature blocks, merged block by block."""
        total: FeatureMoments | None = None
        for part in parts:
            moments = cls.of(part)
            total = moments if total is None else total.merge(moments)
        if total is None:
            raise ValueError("no feature blocks to merge")
        return total

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased covariance (``ddof=1``, as ``np.cov`` and clean-fid)."""
        if self.count < 2:
            raise ValueError("the covariance needs at least 2 features")
        return self.scatter / (self.count - 1)
