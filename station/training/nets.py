"""The two networks, and the wrappers that put post-processing into the exported graphs."""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models

CLASSIFIER_ARCH = "mobilenet_v3_small"
AUTOENCODER_ARCH = "polar_conv_ae3"


def make_classifier(num_classes: int) -> nn.Module:
    net: nn.Module = models.mobilenet_v3_small(weights=None, num_classes=num_classes)
    return net


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2, inplace=True)


class ConvAutoencoder(nn.Module):
    """Convolutional autoencoder on the polar view, at half its resolution.

    Each image is standardised per channel before encoding, so glass colour
    and lighting, which vary from bottle to bottle, are not what the network
    spends its few training steps on: it learns the rim's structure, and a
    chip or a speck is what it cannot reproduce. No batch norm: with a few
    dozen good images its statistics are unreliable. No output sigmoid: a
    saturated sigmoid stops the gradient and the network collapses to a
    constant picture.
    """

    WRAP = 16  # rows; a multiple of the encoder's total stride (8)

    def __init__(self, pool: int = 2, latent: int = 32) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(pool) if pool > 1 else nn.Identity()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 4, 2, 1), _act(),
            nn.Conv2d(32, 64, 4, 2, 1), _act(), nn.Conv2d(64, 64, 3, 1, 1), _act(),
            nn.Conv2d(64, 128, 4, 2, 1), _act(), nn.Conv2d(128, 128, 3, 1, 1), _act(),
            nn.Conv2d(128, latent, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent, 128, 1), _act(),
            nn.ConvTranspose2d(128, 64, 4, 2, 1), _act(), nn.Conv2d(64, 64, 3, 1, 1), _act(),
            nn.ConvTranspose2d(64, 32, 4, 2, 1), _act(),
            nn.ConvTranspose2d(32, 3, 4, 2, 1),
        )

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True) + 1e-3
        return (x - mean) / std

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``z``. Rows are angles, so the first and last rows are neighbours:
        the input is wrapped around by ``WRAP`` rows on both sides before the
        convolutions, which would otherwise see a seam at angle 0 in every bottle."""
        w = self.WRAP
        padded = torch.cat([z[:, :, -w:], z, z[:, :, :w]], dim=2)
        out: torch.Tensor = self.decoder(self.encoder(padded))[:, :, w:-w]
        return out

    def error_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H/pool, W/pool) mean |z − ẑ| over channels of the standardised image."""
        z = self.standardise(x)
        err: torch.Tensor = (z - self(z)).abs().mean(dim=1, keepdim=True)
        return err


class ClassifierExport(nn.Module):
    """Exported classifier: outputs class probabilities, so every backend agrees on softmax."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


class AutoencoderExport(nn.Module):
    """Exported autoencoder: outputs the anomaly map (N, 1, H/pool, W/pool).

    The reconstruction error is z-scored per radius column against good
    images' errors: the rim's bright edges are always reconstructed less well
    than the dark opening, and without this their ordinary error would hide a
    speck in the opening. The statistics are constants in the graph, so every
    backend computes the same map.
    """

    column_mean: torch.Tensor
    column_std: torch.Tensor

    def __init__(self, net: ConvAutoencoder, column_mean: torch.Tensor, column_std: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("column_mean", column_mean.reshape(1, 1, 1, -1).clone())
        self.register_buffer("column_std", column_std.reshape(1, 1, 1, -1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z: torch.Tensor = (self.net.error_map(x) - self.column_mean) / self.column_std
        return z


def error_column_stats(net: ConvAutoencoder, x: torch.Tensor, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the reconstruction error per radius column over good images ``x``."""
    with torch.no_grad():
        maps = torch.cat([net.error_map(x[i : i + batch]) for i in range(0, len(x), batch)])
    mean = maps.mean(dim=(0, 1, 2))
    std = maps.std(dim=(0, 1, 2)) + 1e-3
    return mean, std
