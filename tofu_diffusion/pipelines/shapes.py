"""Procedural image dataset: coloured shapes of six kinds over textured backgrounds, generated from a seed.

Every image has structure (a shape of one of ``CLASSES`` at a random position, size and rotation, solid
or striped) and texture (a gradient, stripe, checker or noise background, plus pixel noise), so token
reduction that blurs detail or moves edges visibly degrades it. Generation is vectorised over the batch
and reproducible: the same (count, seed, size) always gives the same images and labels.
"""

from __future__ import annotations

import math

import torch

IMAGE_SIZE = 32
HELD_OUT_SEED = 987_654_321  # evaluation images: training draws seed * 1e6 + step, never this one
CLASSES = ("disc", "square", "triangle", "ring", "cross", "diamond")


def _uniform(g: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _colours(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.rand(n, 3, generator=g)


def _shape_masks(kind: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside-masks (N, H, W) of each image's shape in its own normalised, rotated coordinates."""
    au, av = u.abs(), v.abs()
    r = torch.sqrt(u * u + v * v)
    masks = torch.stack([
        r <= 1.0,                                                    # disc
        torch.maximum(au, av) <= 0.7,                                # square
        (v <= 0.75) & (v >= 2.0 * au - 1.05),                        # triangle (apex up in v)
        (r <= 1.0) & (r >= 0.55),                                    # ring
        ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0)),   # cross
        au + av <= 1.05,                                             # diamond
    ], dim=1)  # (N, K, H, W)
    return masks.gather(1, kind.view(-1, 1, 1, 1).expand(-1, 1, *u.shape[1:])).squeeze(1)


def _backgrounds(g: torch.Generator, n: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1]: gradient, stripes, checker or noise, each between two random colours."""
    h, w = x.shape[-2:]
    kind = torch.randint(4, (n,), generator=g)
    a, b = _colours(g, n), _colours(g, n)
    angle = _uniform(g, n, 0, math.pi).view(n, 1, 1)
    along = x * torch.cos(angle) + y * torch.sin(angle)  # (N, H, W) in about [-1.4, 1.4]
    freq = _uniform(g, n, 2.0, 5.0).view(n, 1, 1)
    cells = torch.randint(3, 7, (n,), generator=g).view(n, 1, 1).float()
    noise = torch.rand(n, h, w, generator=g)
    mix = torch.stack([
        (along + 1.4) / 2.8,                                                        # gradient
        (torch.sin(freq * math.pi * along) > 0).float(),                            # stripes
        ((torch.floor((x + 1) * cells / 2) + torch.floor((y + 1) * cells / 2)) % 2),  # checker
        noise,                                                                      # noise
    ], dim=1)
    mix = mix.gather(1, kind.view(-1, 1, 1, 1).expand(-1, 1, h, w))  # (N, 1, H, W)
    return a.view(n, 3, 1, 1) * (1 - mix) + b.view(n, 3, 1, 1) * mix


def _pixel_grid(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres x, y in [-1, 1], each (N, size, size)."""
    coords = (torch.arange(size) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return x.expand(n, size, size), y.expand(n, size, size)


def _fill(g: torch.Generator, n: int) -> tuple:
    """Solid or striped fill: two colours, whether striped, the stripes' frequency (drawn in this order)."""
    fill_a, fill_b = _colours(g, n), _colours(g, n)
    striped = (torch.rand(n, generator=g) < 0.5).view(n, 1, 1)
    return fill_a, fill_b, striped, _uniform(g, n, 3, 6).view(n, 1, 1)


def _paint(image, labels, x, y, cx, cy, radius, theta, fill) -> torch.Tensor:
    """``image`` with each item's shape drawn at centre (cx, cy), in its own rotated coordinates u, v.

    An outline-free shape on any background stays visible by contrast."""
    fill_a, fill_b, striped, frequency = fill
    n = image.shape[0]
    dx, dy = (x - cx) / radius, (y - cy) / radius
    u = dx * torch.cos(theta) + dy * torch.sin(theta)
    v = -dx * torch.sin(theta) + dy * torch.cos(theta)
    mask = _shape_masks(labels, u, v).unsqueeze(1).float()
    stripe = (torch.sin(frequency * math.pi * u) > 0) & striped
    colour = torch.where(stripe.unsqueeze(1), fill_b.view(n, 3, 1, 1), fill_a.view(n, 3, 1, 1))
    return image * (1 - mask) + colour * mask


def generate(count: int, seed: int = 0, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images (N, 3, size, size) in [-1, 1] and their class labels (N,)."""
    g = torch.Generator().manual_seed(seed)
    n = count
    labels = torch.randint(len(CLASSES), (n,), generator=g)
    x, y = _pixel_grid(n, size)
    image = _backgrounds(g, n, x, y)
    # The shape: centre, radius, rotation.
    radius = _uniform(g, n, 0.45, 0.8).view(n, 1, 1)
    cx = _uniform(g, n, -1, 1).view(n, 1, 1) * (1 - radius)
    cy = _uniform(g, n, -1, 1).view(n, 1, 1) * (1 - radius)
    # Small tilts only: a square turned by 45 degrees would be a diamond.
    theta = _uniform(g, n, -0.35, 0.35).view(n, 1, 1)
    fill = _fill(g, n)
    image = _paint(image, labels, x, y, cx, cy, radius, theta, fill)
    image = image + 0.04 * torch.randn(image.shape, generator=g)
    return (image.clamp(0, 1) * 2 - 1), labels


FRAMES = 8  # frames of a moving-shapes clip


def generate_clips(count: int, seed: int = 0, frames: int = FRAMES,
                   size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` clips (N, F, 3, size, size) in [-1, 1] of one shape moving at constant velocity over a still
    background, their labels (N,) and the shape's centre in each frame (N, F, 2) as (x, y) in [-1, 1].

    The shape's size, tilt and fill stay; it moves in a straight line between two random positions that
    keep it inside the frame, so motion is learnable from any two frames. Each frame has its own pixel noise.
    """
    g = torch.Generator().manual_seed(seed)
    n = count
    labels = torch.randint(len(CLASSES), (n,), generator=g)
    x, y = _pixel_grid(n, size)
    background = _backgrounds(g, n, x, y)
    radius = _uniform(g, n, 0.45, 0.7).view(n, 1, 1)  # a little smaller than the stills: room to move
    start = (torch.rand(n, 2, generator=g) * 2 - 1) * (1 - radius.view(n, 1))
    end = (torch.rand(n, 2, generator=g) * 2 - 1) * (1 - radius.view(n, 1))
    theta = _uniform(g, n, -0.35, 0.35).view(n, 1, 1)
    fill = _fill(g, n)
    along = torch.linspace(0, 1, frames).view(1, frames, 1)
    centres = start.unsqueeze(1) + (end - start).unsqueeze(1) * along  # (N, F, 2)
    clips = []
    for f in range(frames):
        cx, cy = centres[:, f, 0].view(n, 1, 1), centres[:, f, 1].view(n, 1, 1)
        frame = _paint(background, labels, x, y, cx, cy, radius, theta, fill)
        frame = frame + 0.04 * torch.randn(background.shape, generator=g)
        clips.append(frame.clamp(0, 1) * 2 - 1)
    return torch.stack(clips, dim=1), labels, centres
