"""Adversarial initial noise: projected signed-gradient ascent on z_T that maximises the gap
between cached and full predictions over the first key interval."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fcr.core.sampler import apply_guidance, guidance_context
from fcr.core.unet import decode, encode

ATTACK_CHUNK = 8  # images per adversarial-attack chunk (memory of the backward pass; images are independent)
ATTACK_STEP_FACTOR = 2.5  # PGD step size = ATTACK_STEP_FACTOR * epsilon / steps


# ----------------------------------------------------------------------------- adversarial noise


@contextlib.contextmanager
def _frozen(module: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients inside (the attack differentiates with respect to the input only)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def cache_error(
    unet: torch.nn.Module,
    make_scheduler: Callable[[], Any],
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    guidance_scale: float,
    num_inference_steps: int,
    stride: int,
) -> torch.Tensor:
    """Per-image cache error ``(B,)`` of the first key interval, differentiable in ``noise``.

    Along the plain-sampling trajectory from ``noise`` (z_T), steps ``i = 1 .. stride-1``: the mean
    over elements of ``(cached_i - full_i)^2``, averaged over those steps, where ``full_i`` is the
    whole UNet's (guided) prediction on the trajectory's latent at step ``i`` and ``cached_i`` the
    decoder's prediction at step ``i`` from the encoder features of step 0 (what encoder caching
    with key steps ``0, stride, ...`` uses). Step 0 is a key step (error zero); the full-UNet
    prediction there is ``decode(encode(.))``, the same function.
    """
    if stride < 2:
        raise ValueError(f"the cache error needs a key interval of at least 2 steps; got stride {stride}")
    batch = noise.shape[0]
    do_cfg = uncond is not None and guidance_scale > 1
    context = guidance_context(cond, uncond, batch, guidance_scale)

    def guide(pred: torch.Tensor) -> torch.Tensor:
        return apply_guidance(pred, guidance_scale) if do_cfg else pred

    scheduler = make_scheduler()
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    timesteps = scheduler.timesteps
    latents = noise * scheduler.init_noise_sigma
    last = min(stride, num_inference_steps)
    error = noise.new_zeros(batch)
    features = None
    for i in range(last):
        t = timesteps[i]
        x = torch.cat([latents, latents]) if do_cfg else latents
        x = scheduler.scale_model_input(x, t)
        if i == 0:
            features = encode(unet, x, t, context)
            full = guide(decode(unet, features, t, context))
        else:
            full = guide(unet(x, t, context).sample)
            cached = guide(decode(unet, features, t, context))
            error = error + (cached - full).pow(2).flatten(1).mean(dim=1)
        if i < last - 1:
            latents = scheduler.step(full, t, latents, return_dict=False)[0]
    return error / max(last - 1, 1)


def adversarial_noise(
    unet: torch.nn.Module,
    make_scheduler: Callable[[], Any],
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    guidance_scale: float,
    num_inference_steps: int,
    stride: int,
    epsilon: float,
    steps: int,
    chunk_size: int = ATTACK_CHUNK,
) -> tuple[torch.Tensor, dict[str, float]]:
    """z_T + delta with ``|delta|_inf <= epsilon`` maximising :func:`cache_error` (projected signed
    gradient ascent, PGD): ``delta_0 = 0``; ``steps`` times ``delta <- clip(delta + a sign(grad),
    -epsilon, epsilon)`` with step size ``a = 2.5 epsilon / steps`` (one step: ``a`` is clipped to
    ``epsilon``, i.e. FGSM). ``epsilon`` is in units of the noise std (z_T has unit variance).
    The last iterate is returned. Images are attacked in chunks of ``chunk_size`` (each image's
    objective depends on its own z_T only). Returns the perturbed noise and the mean cache error
    before and after the attack (``attack_error_clean``, ``attack_error_attacked``).
    """
    if epsilon < 0 or steps < 1:
        raise ValueError(f"need epsilon >= 0 and steps >= 1; got {epsilon}, {steps}")
    step_size = ATTACK_STEP_FACTOR * float(epsilon) / steps
    kwargs = dict(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, stride=stride)
    out, clean, attacked = [], [], []
    with _frozen(unet):
        for start in range(0, noise.shape[0], chunk_size):
            z = noise[start : start + chunk_size]
            c = cond[start : start + chunk_size] if cond.shape[0] == noise.shape[0] else cond
            u = None
            if uncond is not None:
                u = uncond[start : start + chunk_size] if uncond.shape[0] == noise.shape[0] else uncond
            delta = torch.zeros_like(z)
            for k in range(steps):
                x = (z + delta).detach().requires_grad_(True)
                with torch.enable_grad():
                    err = cache_error(unet, make_scheduler, x, c, u, **kwargs)
                    (grad,) = torch.autograd.grad(err.sum(), x)
                if k == 0:
                    clean.append(err.detach())
                delta = (delta + step_size * grad.sign()).clamp(-epsilon, epsilon)
            with torch.no_grad():
                attacked.append(cache_error(unet, make_scheduler, z + delta, c, u, **kwargs))
            out.append((z + delta).detach())
    info = {
        "attack_error_clean": float(torch.cat(clean).mean()),
        "attack_error_attacked": float(torch.cat(attacked).mean()),
    }
    return torch.cat(out), info
