"""The two networks, and the wrappers that put post-processing into the exported graphs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models

from station.errors import DatasetError

BACKBONES = ("mobilenet_v3_small", "resnet18", "efficientnet_b0")
AUTOENCODER_ARCH = "polar_conv_ae3"
#: what the networks see of the polar view: "raw" (each image standardised as a whole) or "residual" (each
#: radius column's mean over all angles taken away, see angular_residual)
INPUT_VIEWS = ("raw", "residual")
#: the classifier sees the RGB polar view and the autoencoder's anomaly map as a 4th channel
CLASSIFIER_CHANNELS = 4


class PretrainedWeightsError(DatasetError):
    """A --pretrained file that is missing or does not fit the chosen backbone."""


def _first_conv(net: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    if isinstance(net, models.ResNet):
        return net, "conv1", net.conv1
    features: Any = net.features  # MobileNetV3, EfficientNet: stem is a Conv2dNormActivation
    stem: Any = features[0]
    conv = stem[0]
    assert isinstance(conv, nn.Conv2d)
    return stem, "0", conv


def _replace_head(net: nn.Module, num_classes: int) -> None:
    if isinstance(net, models.ResNet):
        net.fc = nn.Linear(net.fc.in_features, num_classes)
        return
    head: Any = net.classifier
    last = head[-1]
    assert isinstance(last, nn.Linear)
    head[-1] = nn.Linear(last.in_features, num_classes)


def make_classifier(arch: str, num_classes: int, in_channels: int = CLASSIFIER_CHANNELS,
                    pretrained: Path | None = None, view: str = "raw") -> nn.Module:
    """A torchvision backbone with ``in_channels`` inputs and ``num_classes`` outputs.

    ``pretrained`` is a torchvision state-dict file the user provides (nothing
    is downloaded); its first convolution's RGB weights are kept and the extra
    channel starts at zero, so the pretrained features are intact at step 0.
    """
    if arch not in BACKBONES:
        raise DatasetError(f"unknown backbone {arch!r}; choose one of {', '.join(BACKBONES)}")
    check_view(view)
    net: nn.Module = getattr(models, arch)(weights=None)
    if pretrained is not None:
        if not pretrained.is_file():
            raise PretrainedWeightsError(f"pretrained weights {pretrained} do not exist")
        try:
            state = torch.load(pretrained, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            net.load_state_dict(state)
        except Exception as exc:  # unpickling and shape errors come in many types
            raise PretrainedWeightsError(
                f"pretrained weights {pretrained} do not fit torchvision's {arch}: {str(exc)[:300]}"
            ) from exc
    _replace_head(net, num_classes)
    parent, name, conv = _first_conv(net)
    if in_channels != conv.in_channels:
        wider = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride,  # type: ignore[arg-type]
                          conv.padding, conv.dilation, conv.groups, conv.bias is not None)  # type: ignore[arg-type]
        with torch.no_grad():
            wider.weight.zero_()
            wider.weight[:, : conv.in_channels] = conv.weight
            if conv.bias is not None and wider.bias is not None:
                wider.bias.copy_(conv.bias)
        setattr(parent, name, wider)
    return ResidualView(net) if view == "residual" else net


def angular_residual(x: torch.Tensor) -> torch.Tensor:
    """The polar view less what every angle of the mouth has in common, in units of the image's contrast.

    A good mouth is nearly the same at every angle, so each radius column's mean over angles is the lip's
    profile: how bright the glass, the edges, the opening and the background are, which is what a light,
    a glass colour or a renderer changes. What is left is what differs between angles: a chip, a speck, a
    highlight, a lighting gradient. Dividing by the image's own spread (per channel) puts a dim dome-lit
    lip and a bright ring-lit one on one scale.
    """
    residual = x - x.mean(dim=2, keepdim=True)
    return residual / (x.std(dim=(2, 3), keepdim=True) + 1e-3)


class ResidualView(nn.Module):
    """A classifier that sees the angular residual of the RGB channels, the evidence channel as it is."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(torch.cat([angular_residual(x[:, :3]), x[:, 3:]], dim=1))
        return out


def arch_name(base: str, view: str) -> str:
    """The manifest's ``arch`` of a network: its base name, with ``+residual`` when it sees that view."""
    return base if view == "raw" else f"{base}+{view}"


def check_view(view: str) -> None:
    if view not in INPUT_VIEWS:
        raise DatasetError(f"unknown input view {view!r}; choose one of {', '.join(INPUT_VIEWS)}")


def evidence(anomaly_map: torch.Tensor, pool: int) -> torch.Tensor:
    """The anomaly map as a classifier input channel: full polar resolution, clipped and scaled."""
    up = torch.nn.functional.interpolate(anomaly_map, scale_factor=float(pool), mode="nearest")
    return torch.clamp(up, 0.0, 50.0) / 10.0


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

    def __init__(self, pool: int = 2, latent: int = 32, view: str = "raw") -> None:
        super().__init__()
        check_view(view)
        self.view = view
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
        if self.view == "residual":
            return angular_residual(x)
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
    """Exported classifier: (image, anomaly map) → class probabilities (softmax in the graph)."""

    def __init__(self, net: nn.Module, pool: int) -> None:
        super().__init__()
        self.net = net
        self.pool = pool

    def forward(self, x: torch.Tensor, anomaly_map: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(torch.cat([x, evidence(anomaly_map, self.pool)], dim=1)), dim=1)


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


DRAEM_ARCH = "draem_polar_ae3_unet"


class SegmentationHead(nn.Module):
    """Where a bottle and its restoration differ: a small U-Net on (standardised input, restoration,
    their absolute difference).

    DRAEM's discriminative sub-network, cut to what a CPU serves beside the
    autoencoder: two stride-2 levels, 1×1 convolutions on the way up (the skip
    connections carry the detail a 3–5 px defect needs). Rows wrap around like
    the autoencoder's, so angle 0 is no seam. The difference channel is what
    the plain autoencoder scored; handing it over lets the head start from it
    and learn which differences are defects and which are glass. Outputs logits.
    """

    WRAP = 8  # rows; a multiple of the head's total stride (4)

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        c = width
        self.enc1 = nn.Sequential(nn.Conv2d(7, c, 3, 1, 1), _act())
        self.enc2 = nn.Sequential(nn.Conv2d(c, 2 * c, 4, 2, 1), _act(), nn.Conv2d(2 * c, 2 * c, 3, 1, 1), _act())
        self.enc3 = nn.Sequential(nn.Conv2d(2 * c, 4 * c, 4, 2, 1), _act(),
                                  nn.Conv2d(4 * c, 4 * c, 3, 1, 1), _act())
        self.up2 = nn.Sequential(nn.ConvTranspose2d(4 * c, 2 * c, 4, 2, 1), _act())
        self.dec2 = nn.Sequential(nn.Conv2d(4 * c, 2 * c, 1), _act())
        self.up1 = nn.Sequential(nn.ConvTranspose2d(2 * c, c, 4, 2, 1), _act())
        self.dec1 = nn.Sequential(nn.Conv2d(2 * c, c, 1), _act(), nn.Conv2d(c, 1, 1))
        # Start by calling every bin good (p ≈ 0.01): anomalies are a fraction of a percent of a bottle,
        # and a head starting at p = 0.5 spends its first hundreds of steps unlearning that.
        last = self.dec1[-1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        nn.init.constant_(last.bias, -4.6)

    def forward(self, z: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
        w = self.WRAP
        x = torch.cat([z, restored, (z - restored).abs().mean(dim=1, keepdim=True)], dim=1)
        x = torch.cat([x[:, :, -w:], x, x[:, :, :w]], dim=2)
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([self.up2(e3), e2], dim=1))
        out: torch.Tensor = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return out[:, :, w:-w]


class DraemModel(nn.Module):
    """The reconstruction autoencoder and its segmentation head, trained together on simulated anomalies."""

    def __init__(self, head_width: int = 16, view: str = "raw") -> None:
        super().__init__()
        self.autoencoder = ConvAutoencoder(view=view)
        self.head = SegmentationHead(head_width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(standardised input, restoration, head logits) for raw polar views ``x``."""
        z = self.autoencoder.standardise(x)
        restored = self.autoencoder(z)
        return z, restored, self.head(z, restored)


#: the head's probability × this is the exported map, so the map reads on the scale of the
#: reconstruction-error maps before it (the classifier's evidence channel and the overlays expect it)
DRAEM_MAP_SCALE = 10.0


class DraemExport(nn.Module):
    """Exported anomaly model: the map is the head's probability that a bin is anomalous, × DRAEM_MAP_SCALE."""

    def __init__(self, model: DraemModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, logits = self.model(x)
        return torch.sigmoid(logits) * DRAEM_MAP_SCALE
