"""Simulated anomalies for training the anomaly model on good bottles only (DRAEM, Zavrtanik et al. 2021).

The autoencoder learns to restore a good bottle from an input with anomalies
pasted in, and the segmentation head learns where input and restoration
differ. Nothing is downloaded: every anomaly is made on the fly from noise,
geometry and the bottle itself, in the polar view (rows are angles, columns
radii out to ``radius_margin`` × the rim). The kinds are deliberately not the
classifier's classes: the point is to fire on what no class names.

- ``blob``: a Perlin-like noise mask (smooth random field, thresholded) filled
  with a foreign colour and texture, blended at a random opacity;
- ``crack``: a thin dark or bright random-walk line across the glass;
- ``chip``: a notch in the rim, where the glass is replaced by what lies
  beyond it (the background);
- ``spot``: a small dark or bright soft-edged spot;
- ``patch``: a piece of the same bottle from another radius (and angle),
  pasted where it does not belong;
- ``tint``: a patch of another glass colour at the same brightness.

Each batch item gets one or two anomalies with probability ``p``; the mask
marks exactly the pixels that changed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: a pixel counts as changed (and is marked) when a channel moved more than this
MIN_CHANGE = 0.02
#: an anomaly that changes fewer pixels is drawn again, up to MAX_ATTEMPTS times
MIN_PIXELS = 4
MAX_ATTEMPTS = 8

KINDS = ("blob", "crack", "chip", "spot", "patch", "tint")


def _rand(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """Uniform in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (), generator=gen))


def noise_field(h: int, w: int, gen: torch.Generator, octaves: int = 3) -> torch.Tensor:
    """A smooth random field in [0, 1] (fractal value noise: random grids upsampled, summed)."""
    field = torch.zeros(1, 1, h, w)
    amplitude, total = 1.0, 0.0
    for octave in range(octaves):
        cells = 2 ** (octave + 1)
        grid = torch.rand(1, 1, cells + 1, max(2, cells // 2 + 1), generator=gen)
        field += amplitude * F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=True)
        total += amplitude
        amplitude *= 0.5
    field = field / total
    lo, hi = field.min(), field.max()
    return ((field - lo) / (hi - lo + 1e-6))[0, 0]


def _box(h: int, w: int, gen: torch.Generator, rim_col: int, rows: tuple[int, int], cols: tuple[int, int]
         ) -> tuple[int, int, int, int]:
    """A (row, col, height, width) box near the lip: anomalies sit where the other defects do."""
    bh, bw = _randint(gen, *rows), _randint(gen, *cols)
    r0 = _randint(gen, 0, h - bh)
    centre = rim_col - _randint(gen, 0, max(1, rim_col // 2))
    c0 = min(max(0, centre - bw // 2), w - bw)
    return r0, c0, bh, bw


def _ellipse(bh: int, bw: int) -> torch.Tensor:
    """1 at the centre of a bh × bw box, 0 on the inscribed ellipse, negative outside it."""
    yy = torch.linspace(-1, 1, bh).view(-1, 1)
    xx = torch.linspace(-1, 1, bw).view(1, -1)
    return 1 - (yy**2 + xx**2)


def _noise_region(h: int, w: int, gen: torch.Generator, rim_col: int, rows: tuple[int, int],
                  cols: tuple[int, int], level: tuple[float, float]) -> torch.Tensor:
    """An irregular region in a box near the lip: smooth noise inside an elliptical window, thresholded."""
    r0, c0, bh, bw = _box(h, w, gen, rim_col, rows, cols)
    local = (noise_field(bh, bw, gen) * _ellipse(bh, bw).clamp(min=0)) > _rand(gen, *level)
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[r0 : r0 + bh, c0 : c0 + bw] = local
    return mask


def _blob(x: torch.Tensor, gen: torch.Generator, rim_col: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, h, w = x.shape
    mask = _noise_region(h, w, gen, rim_col, (8, 48), (6, 28), (0.15, 0.35))
    colour = torch.rand(3, 1, 1, generator=gen)
    texture = colour + (noise_field(h, w, gen, 2) - 0.5) * _rand(gen, 0.0, 0.6) + torch.randn(3, h, w,
                                                                                              generator=gen) * 0.03
    return mask, texture.clamp(0, 1)


def _crack(x: torch.Tensor, gen: torch.Generator, rim_col: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, h, w = x.shape
    mask = torch.zeros(h, w, dtype=torch.bool)
    row, col = _rand(gen, 0, h), _rand(gen, rim_col * 0.4, rim_col + 2)
    heading = _rand(gen, 0, 2 * math.pi)
    length = _randint(gen, 15, 80)
    width = _randint(gen, 1, 2)
    for _ in range(length):
        r, c = int(row) % h, int(col)
        if 0 <= c < w:
            mask[r : r + width, c : c + width] = True
        heading += _rand(gen, -0.5, 0.5)
        row += math.sin(heading)
        col = min(max(col + math.cos(heading) * 0.6, 0), min(w - 1, rim_col + 2))
    level = _rand(gen, 0.0, 0.15) if float(torch.rand((), generator=gen)) < 0.7 else _rand(gen, 0.8, 1.0)
    texture = torch.full_like(x, level) + torch.randn(x.shape, generator=gen) * 0.02
    return mask, texture.clamp(0, 1)


def _chip(x: torch.Tensor, gen: torch.Generator, rim_col: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, h, w = x.shape
    depth = _randint(gen, 2, max(3, rim_col // 6))
    span = _randint(gen, 3, 24)
    r0 = _randint(gen, 0, h - span)
    mask = torch.zeros(h, w, dtype=torch.bool)
    # A notch: deepest in the middle of its span, ragged.
    profile = torch.sin(torch.linspace(0.2, math.pi - 0.2, span)) * depth
    profile = profile * (0.6 + 0.4 * noise_field(span, 2, gen)[:, 0])
    for i in range(span):
        d = max(1, int(profile[i]))
        mask[r0 + i, max(0, rim_col - d) : min(w, rim_col + 2)] = True
    # What lies beyond the rim (the background), moved inward: the glass is gone.
    background = x[:, :, min(w - 1, rim_col + 4) :].mean(dim=2, keepdim=True).expand(-1, -1, w)
    texture = background + torch.randn(x.shape, generator=gen) * 0.02
    return mask, texture.clamp(0, 1)


def _spot(x: torch.Tensor, gen: torch.Generator, rim_col: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, h, w = x.shape
    r0, c0, bh, bw = _box(h, w, gen, rim_col, (3, 12), (2, 8))
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[r0 : r0 + bh, c0 : c0 + bw] = _ellipse(bh, bw) >= 0
    level = _rand(gen, 0.0, 0.2) if float(torch.rand((), generator=gen)) < 0.5 else _rand(gen, 0.75, 1.0)
    texture = torch.full_like(x, level) * torch.rand(3, 1, 1, generator=gen).clamp(min=0.6)
    return mask, texture.clamp(0, 1)


def _patch(x: torch.Tensor, gen: torch.Generator, rim_col: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, h, w = x.shape
    r0, c0, bh, bw = _box(h, w, gen, rim_col, (8, 40), (6, 24))
    shift_c = _randint(gen, 8, max(9, w // 3)) * (1 if c0 < w // 2 else -1)
    source = torch.roll(x, shifts=(_randint(gen, 0, h - 1), shift_c), dims=(1, 2))
    if float(torch.rand((), generator=gen)) < 0.5:
        source = torch.flip(source, dims=(2,))  # the radius profile reversed
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[r0 : r0 + bh, c0 : c0 + bw] = True
    return mask, source


def _tint(x: torch.Tensor, gen: torch.Generator, rim_col: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, h, w = x.shape
    mask = _noise_region(h, w, gen, rim_col, (12, 60), (8, 32), (0.1, 0.3))
    # Another glass colour at the same brightness: the channels mixed, the luminance kept.
    mix = torch.rand(3, 3, generator=gen)
    mix = mix / mix.sum(dim=1, keepdim=True)
    tinted = torch.einsum("ij,jhw->ihw", mix, x)
    luma = x.mean(dim=0, keepdim=True)
    tinted = tinted * (luma / (tinted.mean(dim=0, keepdim=True) + 1e-3))
    return mask, tinted.clamp(0, 1)


_MAKERS = {"blob": _blob, "crack": _crack, "chip": _chip, "spot": _spot, "patch": _patch, "tint": _tint}


def simulate(x: torch.Tensor, gen: torch.Generator, rim_col: int, p: float = 0.5,
             kinds: tuple[str, ...] = KINDS) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (N, 3, H, W) RGB polar views in [0, 1] → (anomalous copy, mask (N, 1, H, W) in {0, 1}).

    ``rim_col``: the column of the rim (the glass lies inside it). The mask is
    1 exactly where the image changed: a blend that leaves a pixel as it was
    (a foreign colour equal to the glass) is not marked.
    """
    out = x.clone()
    masks = torch.zeros(x.shape[0], 1, x.shape[2], x.shape[3])
    for i in range(x.shape[0]):
        if float(torch.rand((), generator=gen)) >= p:
            continue
        for _ in range(_randint(gen, 1, 2)):
            # A draw can change nothing (a patch from an even stretch of glass, a tint of grey glass):
            # draw again, so an image meant to be anomalous is.
            for _attempt in range(MAX_ATTEMPTS):
                kind = kinds[_randint(gen, 0, len(kinds) - 1)]
                mask, texture = _MAKERS[kind](out[i], gen, rim_col)
                opacity = _rand(gen, 0.5, 1.0) if kind in ("blob", "patch") else _rand(gen, 0.7, 1.0)
                blended = out[i] * (1 - opacity) + texture * opacity
                changed = mask & ((blended - out[i]).abs().amax(dim=0) > MIN_CHANGE)
                if int(changed.sum()) >= MIN_PIXELS:
                    break
            out[i] = torch.where(changed.unsqueeze(0), blended, out[i])
            masks[i, 0] = torch.maximum(masks[i, 0], changed.float())
    return out, masks
