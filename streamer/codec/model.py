"""The compressive autoencoder: Theis et al. 2017 with batch norm and sub-pixel upsampling.

Encoder: 5x5 stride-2 convs 3->w1->w2, residual blocks at w2, 5x5 stride-2 conv to C latent
channels (total stride 8). Decoder mirrors it with sub-pixel (PixelShuffle) upsampling, which
avoids the checkerboard artefacts of transposed convolutions. Replicate padding everywhere so
frame borders are not darkened by zeros. Pictures are float tensors in [0, 1], (N, 3, H, W).

With `linear_path` a linear 8x8 block transform runs beside each path (encoder: a stride-8 conv,
decoder: a 1x1 conv and a pixel shuffle by 8) and the convolutional paths' last convs start at
zero: training initialises the block transform from the PCA of training blocks, so the codec
starts as the best linear block codec and the convolutions learn what a linear one cannot.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import FrameSizeError
from .presets import STRIDE, ModelConfig


def conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, padding_mode="replicate")


@torch.no_grad()
def zero_last_conv(net: nn.Module) -> None:
    """Zero the last conv of `net`: a path added to another then starts as "no correction"."""
    last = [m for m in net.modules() if isinstance(m, nn.Conv2d)][-1]
    last.weight.zero_()
    if last.bias is not None:
        last.bias.zero_()


class ResidualBlock(nn.Module):
    def __init__(self, ch: int, k: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv(ch, ch, k), nn.BatchNorm2d(ch), nn.ReLU(inplace=True),
            conv(ch, ch, k), nn.BatchNorm2d(ch),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(
            conv(3, cfg.width1, cfg.kernel, 2), nn.BatchNorm2d(cfg.width1), nn.ReLU(inplace=True),
            conv(cfg.width1, cfg.width2, cfg.kernel, 2), nn.BatchNorm2d(cfg.width2), nn.ReLU(inplace=True),
            *[ResidualBlock(cfg.width2, cfg.res_kernel) for _ in range(cfg.res_blocks)],
            conv(cfg.width2, cfg.latent_channels, cfg.kernel, 2),
        )
        self.linear = nn.Conv2d(3, cfg.latent_channels, STRIDE, stride=STRIDE) if cfg.linear_path else None
        if self.linear is not None:
            zero_last_conv(self.net)

    def forward(self, x: Tensor) -> Tensor:
        x = x - 0.5  # centre the input: the first conv then needs no large bias
        y = self.net(x)
        return y if self.linear is None else y + self.linear(x)


class SubPixelUp(nn.Sequential):
    """conv to 4x the channels, then PixelShuffle(2): a learned 2x upsampling."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__(conv(cin, cout * 4, k), nn.PixelShuffle(2))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        k = cfg.res_kernel
        self.net = nn.Sequential(
            SubPixelUp(cfg.latent_channels, cfg.width2, k), nn.BatchNorm2d(cfg.width2), nn.ReLU(inplace=True),
            *[ResidualBlock(cfg.width2, k) for _ in range(cfg.res_blocks)],
            SubPixelUp(cfg.width2, cfg.width1, k), nn.BatchNorm2d(cfg.width1), nn.ReLU(inplace=True),
            SubPixelUp(cfg.width1, 3, k),
        )
        self.linear = None
        if cfg.linear_path:
            self.linear = nn.Sequential(nn.Conv2d(cfg.latent_channels, 3 * STRIDE * STRIDE, 1), nn.PixelShuffle(STRIDE))
            zero_last_conv(self.net)

    def forward(self, y: Tensor) -> Tensor:
        x = self.net(y)
        if self.linear is not None:
            x = x + self.linear(y)
        # clamp, not sigmoid: keeps the output linear (and its gradient alive) inside [0, 1]
        return (x + 0.5).clamp(0.0, 1.0)


class CompressiveAutoencoder(nn.Module):
    """Encoder + decoder. Quantization sits between them and lives in `quantizer.py`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def check_size(self, height: int, width: int) -> None:
        if height % STRIDE or width % STRIDE or height <= 0 or width <= 0:
            raise FrameSizeError(
                f"frame size {width}x{height} is not a multiple of {STRIDE}; crop or resize it "
                f"(e.g. to {max(STRIDE, width // STRIDE * STRIDE)}x{max(STRIDE, height // STRIDE * STRIDE)})"
            )

    def encode(self, x: Tensor) -> Tensor:
        self.check_size(x.shape[-2], x.shape[-1])
        return self.encoder(x)

    def decode(self, y: Tensor) -> Tensor:
        return self.decoder(y)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def latent_shape(cfg: ModelConfig, height: int, width: int) -> tuple[int, int, int]:
    return (cfg.latent_channels, height // STRIDE, width // STRIDE)
