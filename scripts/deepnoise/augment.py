"""Batched augmentation on the device: dihedral flips/rotations, random scale/crop, random erasing.

All functions take a float ``(B, C, H, W)`` batch and a ``torch.Generator`` on the batch's device,
so augmentation is reproducible from the trainer's seed and costs a few kernels per batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th (0..7) element of the dihedral group applied to square images: bit 0 flips W,
    bit 1 flips H, bit 2 transposes (with the flips this gives the 90 degree rotations)."""
    if k & 1:
        x = x.flip(-1)
    if k & 2:
        x = x.flip(-2)
    if k & 4:
        x = x.transpose(-1, -2)
    return x


def _rand(n: int, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device)


def random_dihedral(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random flip / 90 degree rotation per sample (uniform over the 8 dihedral elements)."""
    b = x.shape[0]
    draws = _rand(3 * b, gen, x.device).view(3, b) < 0.5
    x = torch.where(draws[0].view(b, 1, 1, 1), x.flip(-1), x)
    x = torch.where(draws[1].view(b, 1, 1, 1), x.flip(-2), x)
    if x.shape[-1] == x.shape[-2]:
        x = torch.where(draws[2].view(b, 1, 1, 1), x.transpose(-1, -2), x)
    return x


def random_resized_crop(
    x: torch.Tensor, size: int, gen: torch.Generator, scale: tuple[float, float] = (0.6, 1.0)
) -> torch.Tensor:
    """A random square crop per sample whose side is ``sqrt(u)`` of the image side with ``u`` uniform in
    ``scale`` (area fraction), at a random position, bilinearly resampled to ``size`` x ``size``."""
    b = x.shape[0]
    r = _rand(3 * b, gen, x.device).view(3, b)
    side = (scale[0] + (scale[1] - scale[0]) * r[0]).sqrt()  # fraction of the image side
    tx = (1.0 - side) * (2.0 * r[1] - 1.0)  # centre offset, crop stays inside
    ty = (1.0 - side) * (2.0 * r[2] - 1.0)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = side
    theta[:, 1, 1] = side
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Whole image to ``size`` x ``size`` (identity when already that size)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def random_erasing(
    x: torch.Tensor,
    gen: torch.Generator,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.2),
    value: float = 0.0,
) -> torch.Tensor:
    """With probability ``p`` per sample, set one random rectangle (area fraction in ``area``, aspect
    ratio in [1/3, 3]) of all channels to ``value`` (0 = the normalised mean)."""
    b, _, h, w = x.shape
    r = _rand(5 * b, gen, x.device).view(5, b)
    frac = area[0] + (area[1] - area[0]) * r[0]
    log_ratio = (r[1] * 2.0 - 1.0) * math.log(3.0)
    ratio = log_ratio.exp()
    eh = (frac * ratio).sqrt().clamp(max=1.0) * h
    ew = (frac / ratio).sqrt().clamp(max=1.0) * w
    y0 = r[2] * (h - eh)
    x0 = r[3] * (w - ew)
    on = r[4] < p
    ys = torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1)
    xs = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w)
    inside = (
        (ys >= y0.view(b, 1, 1))
        & (ys < (y0 + eh).view(b, 1, 1))
        & (xs >= x0.view(b, 1, 1))
        & (xs < (x0 + ew).view(b, 1, 1))
        & on.view(b, 1, 1)
    )
    return x.masked_fill(inside.unsqueeze(1), value)


def augment_batch(
    x: torch.Tensor,
    gen: torch.Generator,
    size: int,
    flips: bool = True,
    crop_scale: tuple[float, float] | None = (0.6, 1.0),
    erase_p: float = 0.0,
) -> torch.Tensor:
    """Training augmentation: random scale/crop to ``size`` (or a resize when ``crop_scale`` is
    None), random dihedral transform, random erasing."""
    if crop_scale is not None:
        x = random_resized_crop(x, size, gen, crop_scale)
    else:
        x = resize(x, size)
    if flips:
        x = random_dihedral(x, gen)
    if erase_p > 0:
        x = random_erasing(x, gen, erase_p)
    return x
