"""The two networks, and the wrappers that put post-processing into the exported graphs."""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models

CLASSIFIER_ARCH = "mobilenet_v3_small"
AUTOENCODER_ARCH = "conv_ae4"


def make_classifier(num_classes: int) -> nn.Module:
    net: nn.Module = models.mobilenet_v3_small(weights=None, num_classes=num_classes)
    return net


class ConvAutoencoder(nn.Module):
    """4-level convolutional autoencoder: 256² → 16² → 256², RGB in [0, 1].

    No batch norm: with a few dozen good images its running statistics are
    unreliable, and the reconstruction must not depend on batch composition.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), latent: int = 64) -> None:
        super().__init__()
        enc: list[nn.Module] = []
        c_in = 3
        for w in widths:
            enc += [nn.Conv2d(c_in, w, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),
                    nn.Conv2d(w, w, 3, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            c_in = w
        enc += [nn.Conv2d(c_in, latent, 1)]
        dec: list[nn.Module] = [nn.Conv2d(latent, c_in, 1), nn.LeakyReLU(0.2, inplace=True)]
        for w in (*reversed(widths[:-1]), widths[0]):
            dec += [nn.ConvTranspose2d(c_in, w, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),
                    nn.Conv2d(w, w, 3, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            c_in = w
        dec += [nn.Conv2d(c_in, 3, 3, padding=1), nn.Sigmoid()]
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.decoder(self.encoder(x))
        return out


class ClassifierExport(nn.Module):
    """Exported classifier: outputs class probabilities, so every backend agrees on softmax."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


class AutoencoderExport(nn.Module):
    """Exported autoencoder: outputs the per-pixel error map (N, 1, H, W), mean |x − x̂| over channels."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        error: torch.Tensor = (x - self.net(x)).abs().mean(dim=1, keepdim=True)
        return error
