"""Cost measurement: FLOP counting (also weight-free, on the meta device), timing, peak memory.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode``: matrix products,
convolutions and attention, 2 FLOPs per multiply-accumulate, from shapes only. Normalisations,
activations and other element-wise work count zero (the usual convention). Because the counts
depend on shapes only, the real Stable Diffusion UNets can be counted on the meta device without
weights (:data:`SD15_UNET_CONFIG`, :data:`SD21_UNET_CONFIG`).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from fcr.machine import cpu_model
from fcr.core import unet as fcr_unet

__all__ = [
    "FLOP_FORMULAS",
    "SD15_UNET_CONFIG",
    "SD21_UNET_CONFIG",
    "Timer",
    "count_flops",
    "count_training_flops",
    "deep_cache_flops",
    "deep_cache_flops_ratio",
    "environment_info",
    "peak_memory",
    "sampling_flops",
    "sampling_flops_ratio",
    "time_fn",
    "unet_flops",
]

# Public UNet configs of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1
# (the fields that shape the cost; the rest are diffusers defaults). ``attention_head_dim`` is
# diffusers' historical name for the number of heads; FLOPs do not depend on the head split.
_SD_COMMON: dict[str, Any] = dict(
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1.0,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
)
SD15_UNET_CONFIG: dict[str, Any] = dict(
    _SD_COMMON, sample_size=64, cross_attention_dim=768, attention_head_dim=8
)  # 512 px -> 64x64 latent
SD21_UNET_CONFIG: dict[str, Any] = dict(
    _SD_COMMON,
    sample_size=96,  # 768 px -> 96x96 latent
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    upcast_attention=True,
)
SD_TEXT_SEQ_LEN = 77  # CLIP context length


# FlopCounterMode has no formula for the fused CPU attention kernels and would count them as zero
# (on the meta device and on CUDA, attention is counted): map them to the standard SDPA forward /
# backward formulas so counts do not depend on the device.
FLOP_FORMULAS: dict[Any, Callable[..., int]] = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    FLOP_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = (
        lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v))
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
    FLOP_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
        lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v))


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Total FLOPs of ``fn(*args, **kwargs)`` (run once under ``FlopCounterMode``, no grad)."""
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    with torch.no_grad(), counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def count_training_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Total FLOPs of ``fn(*args, **kwargs)`` with autograd on, so a backward pass it runs is counted
    too (a training step's cost)."""
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    with torch.enable_grad(), counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def _unet_inputs(
    unet: UNet2DConditionModel, sample_shape: Sequence[int], seq_len: int, batch: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    sample_shape = tuple(sample_shape)
    if len(sample_shape) == 2:  # (H, W): channels from the config
        sample_shape = (unet.config.in_channels, *sample_shape)
    sample = torch.randn(batch, *sample_shape, device=device, dtype=dtype)
    cond = torch.randn(batch, seq_len, unet.config.cross_attention_dim, device=device, dtype=dtype)
    timestep = torch.full((batch,), 500, device=device, dtype=torch.long)
    return sample, timestep, cond


def unet_flops(
    unet: UNet2DConditionModel, sample_shape: Sequence[int], seq_len: int, batch: int = 1
) -> dict[str, float]:
    """FLOPs of one UNet pass at ``batch``: ``full``, ``encoder``, ``decoder``, ``encoder_share``.

    ``sample_shape`` is (C, H, W) or (H, W). Works with a meta-device UNet (no weights needed).
    ``encoder + decoder`` exceeds ``full`` by the time-embedding MLP, which each half computes.
    """
    sample, timestep, cond = _unet_inputs(unet, sample_shape, seq_len, batch)
    with torch.no_grad():
        full = count_flops(unet, sample, timestep, encoder_hidden_states=cond)
        encoder = count_flops(fcr_unet.encode, unet, sample, timestep, cond)
        features = fcr_unet.encode(unet, sample, timestep, cond)
        decoder = count_flops(fcr_unet.decode, unet, features, timestep, cond)
    return dict(full=full, encoder=encoder, decoder=decoder, encoder_share=encoder / full)


def deep_cache_flops(
    unet: UNet2DConditionModel, sample_shape: Sequence[int], seq_len: int, branch_id: int, batch: int = 1
) -> dict[str, float]:
    """FLOPs of one full UNet pass and of one DeepCache shallow pass at skip branch ``branch_id``
    (:func:`fcr.core.unet.shallow_forward`): ``full``, ``shallow``, ``shallow_share``. Works with
    a meta-device UNet."""
    sample, timestep, cond = _unet_inputs(unet, sample_shape, seq_len, batch)
    branch = fcr_unet.deep_branch(unet, branch_id)
    with torch.no_grad():
        full = count_flops(unet, sample, timestep, encoder_hidden_states=cond)
        _, deep = fcr_unet.deep_forward(unet, sample, timestep, cond, branch)
        shallow = count_flops(fcr_unet.shallow_forward, unet, sample, timestep, cond, deep, branch)
    return dict(full=full, shallow=shallow, shallow_share=shallow / full)


def deep_cache_flops_ratio(shallow_share: float, num_steps: int, key_steps: Sequence[int] | int) -> float:
    """DeepCache sampling FLOPs relative to plain sampling: ``(|K| + (n - |K|) * shallow_share) / n``."""
    k = _num_keys(num_steps, key_steps)
    return (k + (num_steps - k) * shallow_share) / num_steps


def sd_unet_on_meta(config: dict[str, Any]) -> UNet2DConditionModel:
    """A weight-free (meta-device) ``UNet2DConditionModel`` for FLOP counting."""
    with torch.device("meta"):
        return UNet2DConditionModel(**config).eval()


def _num_keys(num_steps: int, key_steps: Sequence[int] | int | None) -> int:
    if key_steps is None:
        return num_steps
    if isinstance(key_steps, int):
        k = key_steps
    else:
        keys = set(int(s) for s in key_steps)
        if any(s < 0 or s >= num_steps for s in keys):
            raise ValueError(f"key steps must lie in [0, {num_steps}); got {sorted(keys)}")
        k = len(keys)
    if not 1 <= k <= num_steps:
        raise ValueError(f"need 1 <= number of key steps <= {num_steps}; got {k}")
    return k


def sampling_flops_ratio(enc_share: float, num_steps: int, key_steps: Sequence[int] | int | None) -> float:
    """FD sampling FLOPs relative to plain sampling: ``1 - (n - |K|) / n * enc_share``.

    ``key_steps``: key-step indices, or their number; ``None`` means plain (ratio 1).
    """
    k = _num_keys(num_steps, key_steps)
    return 1.0 - (num_steps - k) / num_steps * enc_share


def sampling_flops(
    flops: dict[str, float],
    num_steps: int,
    key_steps: Sequence[int] | int | None,
    guidance: bool = True,
    batch: int = 1,
) -> float:
    """UNet FLOPs per generated image of a whole sampling run.

    ``flops``: :func:`unet_flops` output measured at ``batch``; key steps run the full UNet,
    the others the decoder only; classifier-free guidance doubles the UNet batch.
    """
    k = _num_keys(num_steps, key_steps)
    per_sample = (k * flops["full"] + (num_steps - k) * flops["decoder"]) / batch
    return per_sample * (2 if guidance else 1)


def _is_cuda(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type == "cuda"


class Timer:
    """Times one region: CUDA events on a CUDA device, ``time.perf_counter`` otherwise.

    CPU ops are synchronous, so perf_counter needs no synchronisation; on CUDA the stream is
    synchronised before reading the events (kernels are launched asynchronously).
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.cuda = _is_cuda(device)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.elapsed_s: float = float("nan")

    def __enter__(self) -> "Timer":
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self._end.record()
            torch.cuda.synchronize(self.device)
            self.elapsed_s = self._start.elapsed_time(self._end) / 1000.0
        else:
            self.elapsed_s = time.perf_counter() - self._t0


def time_fn(
    fn: Callable[[], Any],
    warmup: int = 1,
    repeats: int = 5,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Wall time of ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    Returns ``median_s``, ``min_s`` and ``all_s`` (every repeat, in order).
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        with Timer(device) as t:
            fn()
        times.append(t.elapsed_s)
    return dict(median_s=statistics.median(times), min_s=min(times), all_s=times)


def _rss_high_water_bytes() -> int:
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Linux reports KiB, macOS bytes.
        return int(peak) if platform.system() == "Darwin" else int(peak) * 1024
    except ImportError:  # Windows: psutil exposes the peak working set
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))


def peak_memory(fn: Callable[[], Any], device: torch.device | str | None = None) -> int:
    """Peak memory in bytes while running ``fn()``.

    CUDA: peak of ``torch.cuda.max_memory_allocated`` after resetting the peak stats (includes
    tensors already resident, e.g. weights). CPU: the process's RSS high-water mark after ``fn``
    (``ru_maxrss``). That mark is process-wide and never decreases, so it bounds the peak of
    ``fn`` from above and includes everything the process ever held before; compare runs in
    fresh processes for per-configuration CPU peaks.
    """
    if _is_cuda(device):
        dev = torch.device(device)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return int(torch.cuda.max_memory_allocated(dev))
    fn()
    return _rss_high_water_bytes()


def environment_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Where a measurement ran: versions, threads, CPU/GPU model, platform, timestamp."""
    import diffusers

    cuda = torch.cuda.is_available()
    dev = torch.device(device) if device is not None else torch.device("cuda" if cuda else "cpu")
    return dict(
        device=str(dev),
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model(),
        cuda_device=torch.cuda.get_device_name(0) if cuda else None,
        cpu_model=cpu_model(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        diffusers_version=diffusers.__version__,
        python_version=platform.python_version(),
        platform=platform.platform(),
        # Other processes share the CPU: the 1/5/15-min load average says how contended it was.
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
