"""Inference-only rewrite of the autoencoder: batch norm folded into the convs, constants folded.

Training keeps BatchNorm as separate layers; at inference an eval-mode BN is an affine map per
channel, so it folds into the weights and bias of the conv before it. That removes one pass over
every activation (a memory-bound op that costs as much as a small conv on a CPU) and gives
backends a plain conv / ReLU / pixel-shuffle graph, which is what int8 quantizers and TensorRT
fuse best. Two more constants fold the same way: the encoder's ``x - 0.5`` input centring goes
into the first conv's bias (exact, since replicate padding commutes with a constant shift) and
the decoder's ``+ 0.5`` into the last conv's bias (a pixel shuffle only moves values).

Replicate padding is explicit (`ReplicatePad`), with two implementations: ``"native"``
(``F.pad(mode="replicate")``, fastest in eager) and ``"cat"`` (edge slices concatenated). The
second exists because TorchInductor in torch 2.13 fails to compile a replicate pad that reads a
pixel shuffle's output ("vr must not be None for symbol q1"); the cat form compiles.

Pixel shuffles come in two forms too: ``"standard"`` (``nn.PixelShuffle``) and ``"block"``
(`BlockPixelShuffle`, with the conv before it writing its output channels in sub-pixel-major
order). Both compute the same picture; in a channels-last graph the block form reads each output
pixel's channels contiguously instead of with a stride of r*r, which lets inductor vectorize the
fused shuffle / pad / quantize loops of the int8 decoder (0.7 ms of its ~11 ms at 224x224 on the
build machine). Eager PyTorch is faster with ``nn.PixelShuffle``.

The folded model computes the same function as the original in eval mode, to float rounding.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..codec.model import CompressiveAutoencoder
from ..errors import StreamerError

PAD_MODES = ("native", "cat")
SHUFFLE_MODES = ("standard", "block")


class FoldError(StreamerError):
    """The model holds a layer sequence the folder does not know how to rewrite."""


class ReplicatePad(nn.Module):
    """Replicate padding of ``p`` pixels on every side."""

    def __init__(self, p: int, mode: str = "native") -> None:
        super().__init__()
        if mode not in PAD_MODES:
            raise ValueError(f"pad mode {mode!r}; valid: {', '.join(PAD_MODES)}")
        self.p = p
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        p = self.p
        if p == 0:
            return x
        if self.mode == "native":
            return F.pad(x, (p, p, p, p), mode="replicate")
        left = x[:, :, :, :1].expand(-1, -1, -1, p)
        right = x[:, :, :, -1:].expand(-1, -1, -1, p)
        x = torch.cat([left, x, right], dim=3)
        top = x[:, :, :1, :].expand(-1, -1, p, -1)
        bottom = x[:, :, -1:, :].expand(-1, -1, p, -1)
        return torch.cat([top, x, bottom], dim=2)

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}"


class PaddedConv(nn.Sequential):
    """Explicit replicate pad, then an unpadded conv (the conv holds any folded BN)."""

    def __init__(self, pad: ReplicatePad, conv: nn.Conv2d) -> None:
        super().__init__(pad, conv)


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class BlockPixelShuffle(nn.Module):
    """Pixel shuffle by ``r`` of input channels ordered (i, j, c) instead of nn.PixelShuffle's
    (c, i, j): output[n, c, r*h + i, r*w + j] = input[n, (i*r + j)*C + c, h, w]."""

    def __init__(self, r: int) -> None:
        super().__init__()
        self.r = r

    def forward(self, x: Tensor) -> Tensor:
        n, crr, h, w = x.shape
        r = self.r
        return x.view(n, r, r, crr // (r * r), h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, crr // (r * r), h * r, w * r)

    def extra_repr(self) -> str:
        return f"r={self.r}"


def to_block_shuffles(layers: nn.Sequential) -> nn.Sequential:
    """In place: every (PaddedConv, PixelShuffle) pair of `layers` becomes the conv with its output
    channels reordered (c, i, j) -> (i, j, c) followed by a `BlockPixelShuffle`: the same function."""
    items = list(layers)
    for i, m in enumerate(items):
        if isinstance(m, nn.PixelShuffle):
            prev = items[i - 1] if i else None
            if not isinstance(prev, PaddedConv):
                raise FoldError("a pixel shuffle that does not follow a conv cannot take the block form")
            conv, r = prev[1], m.upscale_factor
            c = conv.out_channels // (r * r)
            # new channel (i*r + j)*C + c reads old channel c*r*r + (i*r + j)
            order = torch.arange(conv.out_channels).view(c, r * r).t().reshape(-1)
            with torch.no_grad():
                conv.weight.copy_(conv.weight[order])
                conv.bias.copy_(conv.bias[order])
            layers[i] = BlockPixelShuffle(r)
    return layers


def _plain_conv(conv: nn.Conv2d, pad_mode: str) -> tuple[PaddedConv, nn.Conv2d]:
    """A copy of `conv` with padding moved into a `ReplicatePad` (or a zero pad kept in the conv)."""
    if conv.groups != 1 or conv.dilation != (1, 1):
        raise FoldError(f"cannot fold {conv}: grouped or dilated convs are not used by this model")
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                    padding=0 if conv.padding_mode == "replicate" else conv.padding, bias=True)
    with torch.no_grad():
        new.weight.copy_(conv.weight)
        new.bias.copy_(conv.bias if conv.bias is not None else torch.zeros(conv.out_channels))
    ph, pw = conv.padding if isinstance(conv.padding, tuple) else (conv.padding, conv.padding)
    if conv.padding_mode == "replicate":
        if ph != pw:
            raise FoldError(f"cannot fold {conv}: asymmetric replicate padding")
        pad = ReplicatePad(int(ph), pad_mode)
    elif conv.padding_mode == "zeros":
        pad = ReplicatePad(0, pad_mode)
    else:
        raise FoldError(f"cannot fold {conv}: padding mode {conv.padding_mode!r}")
    return PaddedConv(pad, new), new


@torch.no_grad()
def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, shuffle: int = 1) -> None:
    """conv -> [PixelShuffle(shuffle)] -> bn  becomes one conv. A pixel shuffle by r sends conv
    output channel j to picture channel j // r**2, so that channel's BN scale applies to it."""
    if bn.running_mean is None or bn.running_var is None or not bn.track_running_stats:
        raise FoldError("cannot fold a BatchNorm without running statistics")
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
    scale = scale.repeat_interleave(shuffle * shuffle)
    shift = torch.as_tensor(shift).repeat_interleave(shuffle * shuffle)
    if scale.numel() != conv.out_channels:
        raise FoldError(f"BatchNorm of {bn.num_features} channels after a conv of {conv.out_channels}")
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    conv.bias.mul_(scale).add_(shift)


def _fold_sequence(mods: list[nn.Module], pad_mode: str) -> tuple[list[nn.Module], list[nn.Conv2d]]:
    """Rewrite a flat layer list: (new layers, every conv in order). A BatchNorm right after a conv
    (or after a conv + pixel shuffle) is folded into that conv and dropped."""
    out: list[nn.Module] = []
    convs: list[nn.Conv2d] = []
    last_conv: nn.Conv2d | None = None  # the conv whose output reaches the next layer unchanged
    shuffle = 1
    for m in mods:
        if isinstance(m, nn.Conv2d):
            padded, last_conv = _plain_conv(m, pad_mode)
            shuffle = 1
            out.append(padded)
            convs.append(last_conv)
        elif isinstance(m, nn.PixelShuffle):
            out.append(nn.PixelShuffle(m.upscale_factor))
            shuffle = shuffle * m.upscale_factor if last_conv is not None else 1
        elif isinstance(m, nn.BatchNorm2d):
            if last_conv is None:
                raise FoldError("a BatchNorm that does not follow a conv cannot be folded")
            _fold_bn(last_conv, m, shuffle)
            last_conv = None
        elif isinstance(m, nn.ReLU):
            out.append(nn.ReLU())  # not in-place: export and int8 graphs prefer functional ops
            last_conv = None
        elif isinstance(m, nn.Sequential):  # e.g. SubPixelUp: splice its layers in
            inner, inner_convs = _fold_sequence(list(m), pad_mode)
            out.extend(inner)
            convs.extend(inner_convs)
            # the spliced sequence may end in conv [+ shuffle]: keep folding a BN that follows
            last_conv, shuffle = _trailing_conv(list(m), inner_convs)
        elif type(m).__name__ == "ResidualBlock" and hasattr(m, "body"):
            inner, inner_convs = _fold_sequence(list(m.body), pad_mode)
            out.append(Residual(nn.Sequential(*inner)))
            convs.extend(inner_convs)
            last_conv = None
        else:
            raise FoldError(f"cannot fold layer {type(m).__name__}")
    return out, convs


def _trailing_conv(mods: list[nn.Module], convs: list[nn.Conv2d]) -> tuple[nn.Conv2d | None, int]:
    shuffle = 1
    for m in reversed(mods):
        if isinstance(m, nn.PixelShuffle):
            shuffle *= m.upscale_factor
        elif isinstance(m, nn.Conv2d):
            return convs[-1], shuffle
        else:
            return None, 1
    return None, 1


class FoldedEncoder(nn.Module):
    """The encoder as conv / ReLU / residual layers (`net`), plus the linear block path's conv
    when the model has one; the input centring folded into the first conv of each."""

    def __init__(self, net: nn.Sequential, linear: nn.Module | None = None) -> None:
        super().__init__()
        self.net, self.linear = net, linear

    def forward(self, x: Tensor) -> Tensor:
        y = self.net(x)
        return y if self.linear is None else y + self.linear(x)


class FoldedDecoder(nn.Module):
    """The decoder as conv / ReLU / pixel-shuffle layers (`net`), plus the linear block path when
    the model has one, then the clamp to [0, 1]; the output's + 0.5 folded into `net`."""

    def __init__(self, net: nn.Sequential, linear: nn.Sequential | None = None) -> None:
        super().__init__()
        self.net, self.linear = net, linear

    def forward(self, y: Tensor) -> Tensor:
        x = self.net(y)
        if self.linear is not None:
            x = x + self.linear(y)
        return x.clamp(0.0, 1.0)


def _centre_input(conv: nn.Conv2d) -> None:
    """conv(x - 0.5) = conv(x) - 0.5 * sum of the kernel, per output channel (exact under
    replicate or no padding: both commute with a constant shift)."""
    conv.bias.sub_(0.5 * conv.weight.sum(dim=(1, 2, 3)))


@torch.no_grad()
def fold_encoder(model: CompressiveAutoencoder, pad_mode: str = "native") -> FoldedEncoder:
    """An inference copy of `model.encoder` with BN and the ``- 0.5`` folded; `model` is untouched."""
    src = copy.deepcopy(model.encoder).eval()
    layers, convs = _fold_sequence(list(src.net), pad_mode)
    _centre_input(convs[0])
    linear = None
    if getattr(src, "linear", None) is not None:
        (linear,), (lconv,) = _fold_sequence([src.linear], pad_mode)
        _centre_input(lconv)
    return FoldedEncoder(nn.Sequential(*layers), linear).eval()


@torch.no_grad()
def fold_decoder(model: CompressiveAutoencoder, pad_mode: str = "native",
                 shuffle: str = "standard") -> FoldedDecoder:
    """An inference copy of `model.decoder` with BN and the ``+ 0.5`` folded; `model` is untouched.
    shuffle: "standard" (nn.PixelShuffle) or "block" (`to_block_shuffles`)."""
    if shuffle not in SHUFFLE_MODES:
        raise ValueError(f"shuffle mode {shuffle!r}; valid: {', '.join(SHUFFLE_MODES)}")
    src = copy.deepcopy(model.decoder).eval()
    layers, convs = _fold_sequence(list(src.net), pad_mode)
    if not isinstance(layers[-1], (PaddedConv, nn.PixelShuffle)):
        raise FoldError("the decoder does not end in a conv (+ pixel shuffle); cannot fold its + 0.5")
    convs[-1].bias.add_(0.5)
    net = nn.Sequential(*layers)
    linear = None
    if getattr(src, "linear", None) is not None:
        linear = nn.Sequential(*_fold_sequence(list(src.linear), pad_mode)[0])
    if shuffle == "block":
        to_block_shuffles(net)
        if linear is not None:
            to_block_shuffles(linear)
    return FoldedDecoder(net, linear).eval()


def count_batchnorm(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
