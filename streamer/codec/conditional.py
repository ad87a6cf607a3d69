"""Learned conditional P-frames: a temporal prior and a conditional decoder in latent space.

The table-based P-frames (residual.py) code each latent's change on the intra quantizer's grid,
with tables that know nothing of the picture. This coder (the idea of DCVC-RT, Jia et al. 2025,
at CPU size) learns what the reference says about the next frame:

    ref    = moved(ref, shifts)                            block motion (motion.py): the sender
                                                           picks a shift per 32 x 32 px block,
                                                           both ends move their reference alike
    c      = context(ref)                                  features of the reference, both ends
    z      = (4 (y - ref) + encoder(y, y - ref, c)) / (4 step)   the sender's conditional transform
    mu, j  = prior(c)                 on the anchors       a mean and a scale index per latent:
           = prior2(c, anchors' update) on the others      two passes over a checkerboard
    k      = round(z - mu)                                 the integers that travel
    update = (k + mu) * step                               back in latent units
    y_hat  = ref + update + decoder(update, c)             the frame's latents, the next reference

The checkerboard's second pass sees what the first decoded nearby: the spatial context a prior
from the reference alone lacks (measured before: a scale prior from the reference alone spent
23-38 % more than today's tables, whose context is the row above; docs/results/
temporal-prior-study.md).

`k` is range-coded under a discretized Gaussian whose scale is SCALES[j] (a fixed table, as
CompressAI's `GaussianConditional`), so both ends build the same CDFs from an integer index.
The intra decoder (model.py) turns y_hat into the picture.

It starts as plain residual coding in latent space (the encoder's and decoder's last layers
are zero: y_hat = ref + the rounded change) and training (training/conditional.py) teaches the
three networks what to add.

Both ends run `context`, `prior` and `decoder`: they are integer networks (intnet.py) on an
integer reference (`REF_FRAC` fraction bits), so the scale indices, the means and the next
reference are the same integers at both ends on any CPU. The encoder runs at the sender only
and may be any float network.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file
from torch import Tensor, nn

from ..errors import WeightsError
from . import motion
from .gaussian import GaussianCoder, frequencies, half_widths
from .intnet import ACT_MAX, IntConv2d, quantize_activation, round_ste
from .weights import parse_json, read_capped

# What the range stream of a learned P-frame holds; part of `coder_id`, so a receiver that reads
# another layout refuses the packets by their header. "motion-1": the block shifts (motion.py)
# first (before it: the integers only, with the same coder's weights).
PAYLOAD_FORMAT = "motion-1"
REF_FRAC = 8  # the reference: latents as integers at scale 2^-8
CONTEXT_FRAC = 3  # the context network's input: 4 x latents at scale 2^-3 (|latent| < 8)
UPDATE_FRAC = 4  # the decoder network's input: 4 x the update at scale 2^-4
FEATURE_FRAC = 4  # hidden activations
MU_FRAC = 4  # means, in units of the quantizer step
DELTA_FRAC = 6  # the decoder's correction, latent units at scale 2^-6 (|delta| < 4)
SCALE_MIN = 0.11  # CompressAI's lower bound on a Gaussian's scale
SCALES_PER_OCTAVE = 4
SCALE_COUNT = 48
SCALES = SCALE_MIN * 2.0 ** (np.arange(SCALE_COUNT) / SCALES_PER_OCTAVE)  # 0.11 ... 380
K_MAX = 255  # the integers that travel lie in [-K_MAX, K_MAX]
SENDER_DEADZONE = 0.65  # the sender's RD decision, in steps (measured best of 0.5-1.2: docs/results/learned-p-frames.md)
HALF_WIDTHS = torch.from_numpy(np.minimum(half_widths(SCALES), K_MAX)).float()  # each table's range


@dataclass(frozen=True)
class ConditionalConfig:
    channels: int = 24
    features: int = 48


class ConditionalCoder(nn.Module):
    def __init__(self, steps: list[float], cfg: ConditionalConfig = ConditionalConfig()) -> None:
        super().__init__()
        c, f = cfg.channels, cfg.features
        self.cfg = cfg
        self.context = nn.ModuleList([IntConv2d(c, f, 3, CONTEXT_FRAC, FEATURE_FRAC, relu=True),
                                      IntConv2d(f, f, 3, FEATURE_FRAC, FEATURE_FRAC, relu=True)])
        # pass 1 (the anchors of a checkerboard) sees the reference's features; pass 2 (the
        # other half) also sees the anchors' decoded updates: the spatial context that the
        # reference alone lacks (measured: a prior from the reference alone loses to tables)
        self.prior = nn.ModuleList([IntConv2d(f, f, 3, FEATURE_FRAC, FEATURE_FRAC, relu=True),
                                    IntConv2d(f, c, 1, FEATURE_FRAC, MU_FRAC, relu=False),
                                    IntConv2d(f, c, 1, FEATURE_FRAC, 0, relu=False)])
        self.prior2 = nn.ModuleList([IntConv2d(f + c, f, 3, FEATURE_FRAC, FEATURE_FRAC, relu=True),
                                     IntConv2d(f, c, 1, FEATURE_FRAC, MU_FRAC, relu=False),
                                     IntConv2d(f, c, 1, FEATURE_FRAC, 0, relu=False)])
        self.encoder = nn.Sequential(_conv(2 * c + f, f), nn.ReLU(), _conv(f, f), nn.ReLU(), _zero(_conv(f, c)))
        self.decoder = nn.ModuleList([IntConv2d(c + f, f, 3, UPDATE_FRAC, FEATURE_FRAC, relu=True),
                                      IntConv2d(f, f, 3, FEATURE_FRAC, FEATURE_FRAC, relu=True),
                                      IntConv2d(f, c, 3, FEATURE_FRAC, DELTA_FRAC, relu=False)])
        _zero(self.decoder[-1].conv)
        # the step of each level and channel, latent units; starts at the intra quantizer's
        self.log_step = nn.Parameter(torch.log(torch.tensor(steps, dtype=torch.float32))[:, None].repeat(1, c))
        with torch.no_grad():  # scales start near the spread of 4 (y - ref) between two frames
            for prior in (self.prior, self.prior2):
                prior[2].conv.weight.mul_(0.1)
                prior[2].conv.bias.fill_(SCALES_PER_OCTAVE * math.log2(0.3 / SCALE_MIN))
                prior[1].conv.weight.mul_(0.1)
                prior[1].conv.bias.zero_()

    @property
    def levels(self) -> int:
        return self.log_step.shape[0]

    # -- the integer parts both ends run -----------------------------------------------------------
    def integer_steps(self) -> Tensor:
        """(levels, C) steps as integers at scale 2^-REF_FRAC (at least 1)."""
        return torch.clamp(torch.floor(torch.exp(self.log_step.detach()) * (1 << REF_FRAC) + 0.5), 1, 1 << 14)

    @torch.no_grad()
    def features(self, ref: Tensor) -> Tensor:
        """ref (1, C, H, W) integer latents at 2^-REF_FRAC -> the context features (integers)."""
        x = torch.clamp(torch.floor(ref * 4 * 2.0 ** (CONTEXT_FRAC - REF_FRAC) + 0.5), -ACT_MAX, ACT_MAX)
        for layer in self.context:
            x = layer.exact(x)
        return x

    @torch.no_grad()
    def anchor_parameters(self, features: Tensor, level: int) -> tuple[Tensor, Tensor]:
        """Pass 1: (mu at 2^-MU_FRAC in steps, scale index) of every latent (used at anchors)."""
        return self._heads(self.prior, self.prior[0].exact(features), level)

    @torch.no_grad()
    def second_parameters(self, features: Tensor, k: Tensor, mu: Tensor, level: int) -> tuple[Tensor, Tensor]:
        """Pass 2: (mu, scale index) of every latent (used at the others), from the features and
        the anchors' integers k (and their means mu; values at other positions are ignored)."""
        update = torch.where(anchors(k.shape, k.device), self._update(k, mu, level), torch.zeros((), dtype=torch.float64))
        x = torch.cat([self._update_input(update), features], 1)
        return self._heads(self.prior2, self.prior2[0].exact(x), level)

    def _heads(self, prior: nn.ModuleList, h: Tensor, level: int) -> tuple[Tensor, Tensor]:
        mu4 = prior[1].exact(h)  # 4 x latent units at 2^-MU_FRAC
        step = self.integer_steps()[level][None, :, None, None].double()
        mu = torch.floor(mu4.double() * (1 << REF_FRAC) / (4 * step) + 0.5).float()  # IEEE division: exact rounding
        index = torch.clamp(prior[2].exact(h) + self._index_shift(level), 0, SCALE_COUNT - 1)
        return torch.clamp(mu, -ACT_MAX, ACT_MAX), index

    @torch.no_grad()
    def entropy_parameters(self, ref: Tensor, k: Tensor, level: int) -> tuple[Tensor, Tensor, Tensor]:
        """(features, mu, scale index) of every latent of a frame whose integers are k, as the
        receiver has them once both passes are decoded."""
        features = self.features(ref)
        mu1, index1 = self.anchor_parameters(features, level)
        mu2, index2 = self.second_parameters(features, k, mu1, level)
        a = anchors(k.shape, k.device)
        return features, torch.where(a, mu1, mu2), torch.where(a, index1, index2)

    def _index_shift(self, level: int) -> Tensor:
        """Scale indices are predicted for 4 x latent units; in steps they shift by the gain."""
        step = self.integer_steps()[level].double() / (1 << REF_FRAC)
        return torch.floor(SCALES_PER_OCTAVE * torch.log2(1 / (4 * step)) + 0.5).float()[None, :, None, None]

    def _update(self, k: Tensor, mu: Tensor, level: int) -> Tensor:
        """(k + mu) * step: the change in latent units, integers at 2^-REF_FRAC (float64)."""
        step = self.integer_steps()[level][None, :, None, None].double()
        return torch.floor((k.double() * (1 << MU_FRAC) + mu.double()) * step / (1 << MU_FRAC) + 0.5)

    @staticmethod
    def _update_input(update: Tensor) -> Tensor:
        """An update as a network input: 4 x latent units at 2^-UPDATE_FRAC."""
        return torch.clamp(torch.floor(update * 4 * 2.0 ** (UPDATE_FRAC - REF_FRAC) + 0.5), -ACT_MAX, ACT_MAX).float()

    @torch.no_grad()
    def reconstruct(self, k: Tensor, mu: Tensor, features: Tensor, ref: Tensor, level: int) -> Tensor:
        """The integers k (1, C, H, W) -> the frame's latents, integers at 2^-REF_FRAC."""
        update = self._update(k, mu, level)
        x = torch.cat([self._update_input(update), features], 1)
        for layer in self.decoder:
            x = layer.exact(x)
        out = ref.double() + update + x.double() * 2.0 ** (REF_FRAC - DELTA_FRAC)
        return out.clamp_(-(1 << 15), 1 << 15).float()

    # -- the sender ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, y: Tensor, ref: Tensor, level: int,
               deadzone: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """y (1, C, H, W) float latents, ref integer latents -> (k, scale index, mu, features).
        deadzone: send 0 wherever z is within this many steps of its mean (the sender's RD
        decision, as decision.py's for table-based P-frames; at most 1/2: plain rounding)."""
        features = self.features(ref)
        z = self._transform(y, ref / (1 << REF_FRAC), features * 2.0 ** -FEATURE_FRAC, level)
        mu1, index1 = self.anchor_parameters(features, level)
        k1 = clamp_to_tables(_round(z - mu1 / (1 << MU_FRAC), deadzone), index1)
        mu2, index2 = self.second_parameters(features, k1, mu1, level)
        a = anchors(z.shape, z.device)
        mu, index = torch.where(a, mu1, mu2), torch.where(a, index1, index2)
        k = clamp_to_tables(_round(z - mu / (1 << MU_FRAC), deadzone), index)
        return k, index, mu, features

    def _step(self, level: int | Tensor) -> Tensor:
        """(N, C, 1, 1) steps in latent units, on the 2^-REF_FRAC grid the decoder uses."""
        step = torch.clamp(round_ste(torch.exp(self.log_step[level]) * (1 << REF_FRAC)), 1, 1 << 14) / (1 << REF_FRAC)
        return (step[None] if step.dim() == 1 else step)[:, :, None, None]

    def _transform(self, y: Tensor, ref: Tensor, features: Tensor, level: int | Tensor) -> Tensor:
        d = (y - ref) * 4
        return (d + self.encoder(torch.cat([y * 4, d, features], 1))) / (4 * self._step(level))

    # -- training ----------------------------------------------------------------------------------
    def forward(self, y: Tensor, ref: Tensor, level: Tensor, deadzone: float = 0.0) -> tuple[Tensor, Tensor]:
        """Training: y (N, C, H, W) float latents, ref (float latents, any values), level (N,)
        -> (y_hat float latents, bits of every element). Fake-quantized like the integer path.
        deadzone: 0 trains under additive noise (the rate of z + U(-1/2, 1/2)); above 1/2 it
        rounds as the sender does (`encode`'s dead zone) and counts the bits of the integers
        it sends, with straight-through gradients, so the networks learn the zeros the
        sender's decision leaves."""
        x = quantize_activation(ref * 4, CONTEXT_FRAC)
        for layer in self.context:
            x = layer(x)
        features = x
        step = self._step(level)
        shift = round_ste(SCALES_PER_OCTAVE * torch.log2(1 / (4 * step)))
        z = self._transform(y, ref, features * 2.0 ** -FEATURE_FRAC, level)

        def heads(prior: nn.ModuleList, h: Tensor) -> tuple[Tensor, Tensor]:
            mu = round_ste(prior[1](h) / (4 * step)) * 2.0 ** -MU_FRAC  # in steps, as _heads
            scale = SCALE_MIN * 2.0 ** (torch.clamp(round_ste(prior[2](h) + shift), 0, SCALE_COUNT - 1)
                                        / SCALES_PER_OCTAVE)
            return mu, scale

        a = anchors(z.shape, z.device)
        mu1, scale1 = heads(self.prior, self.prior[0](features))
        update1 = torch.where(a, (mu1 + _round_ste(z - mu1, deadzone)) * step, torch.zeros((), device=z.device))
        mu2, scale2 = heads(self.prior2, self.prior2[0](torch.cat([quantize_activation(update1 * 4, UPDATE_FRAC),
                                                                    features], 1)))
        mu, scale = torch.where(a, mu1, mu2), torch.where(a, scale1, scale2)
        k = mu + _round_ste(z - mu, deadzone)
        if deadzone > 0.5:
            bits = gaussian_bits(k - mu, scale)
        else:
            bits = gaussian_bits(z + torch.empty_like(z).uniform_(-0.5, 0.5) - mu, scale)
        update = k * step
        x = torch.cat([quantize_activation(update * 4, UPDATE_FRAC), features], 1)
        for layer in self.decoder:
            x = layer(x)
        return ref + update + x * 2.0 ** -DELTA_FRAC, bits


def _round(r: Tensor, deadzone: float) -> Tensor:
    k = torch.floor(r + 0.5)
    return torch.where(r.abs() <= deadzone, torch.zeros_like(k), k) if deadzone > 0.5 else k


def _round_ste(r: Tensor, deadzone: float) -> Tensor:
    """`_round` with the straight-through gradient (training)."""
    return r + (_round(r.detach(), deadzone) - r).detach()


def clamp_to_tables(k: Tensor, index: Tensor) -> Tensor:
    """k limited to the range of its table (a value beyond 12 scales: rare, and what both ends
    then reconstruct from)."""
    half = HALF_WIDTHS[index.long()]
    return torch.maximum(torch.minimum(k, half), -half)


def intra_reference(codes: np.ndarray, first: np.ndarray, step: float) -> Tensor:
    """The integer reference (1, C, H, W) that an I-frame's codes (C, H, W) leave at both ends
    (`first`, `step`: the level's grid, `Quantizer.grid`)."""
    latents = (codes.astype(np.float64) + np.asarray(first, np.float64)[:, None, None]) * step
    return torch.from_numpy(np.floor(latents * (1 << REF_FRAC) + 0.5).astype(np.float32))[None]


def reference_crc(ref: Tensor) -> int:
    """CRC32 of an integer reference. The sender sends it beside each P-frame (as it sends the
    CRC of its codes today); a receiver whose reference is not the sender's learns it from the
    mismatch, shows nothing of that frame and asks for an I-frame."""
    return zlib.crc32(ref.to(torch.int32).contiguous().numpy().tobytes())


def coder_id(model: ConditionalCoder, intra_model_id: int) -> int:
    """The id a learned P-frame's packet carries in its model_id field: CRC32 of the intra
    model's id, the coder's shape and its tensors. A receiver holding another coder (another
    release's weights) refuses such a frame by its header, with a message naming both ids,
    where decoding it would only fail the reference CRC, frame after frame."""
    crc = zlib.crc32(f"{intra_model_id & 0xFFFFFFFF:08x} {model.cfg.channels} {model.cfg.features} "
                     f"{model.levels} {PAYLOAD_FORMAT}".encode())
    for name, t in sorted(model.state_dict().items()):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes(), crc)
    return crc ^ 1 if crc == intra_model_id else crc  # never the intra model's own id


def gaussian_coder() -> GaussianCoder:
    return GaussianCoder(frequencies(SCALES, K_MAX))


def encode_frame(model: ConditionalCoder, coder: GaussianCoder, y: Tensor, ref: Tensor,
                 level: int, deadzone: float = 0.0, align: bool = True) -> tuple[bytes, Tensor]:
    """A P-frame: y (1, C, H, W) float latents against the integer reference -> (payload, the
    next reference). With `align` (the call's P-frames) the payload starts with a shift per block
    (motion.py) by which both ends move the reference first; then the anchors' integers, then
    the others'."""
    enc = coder.encoder()
    if align:
        shifts = motion.choose_shifts(ref, y * (1 << REF_FRAC))
        motion.encode_shifts(coder, enc, shifts)
        ref = motion.apply_shifts(ref, shifts)
    k, index, mu, features = model.encode(y, ref, level, deadzone)
    a = anchors(k.shape).expand_as(k)
    for half in (a, ~a):
        coder.encode_into(enc, k[half].numpy(), index[half].numpy())
    return coder.payload(enc), model.reconstruct(k, mu, features, ref, level)


def decode_frame(model: ConditionalCoder, coder: GaussianCoder, payload: bytes, ref: Tensor,
                 level: int, align: bool = True) -> Tensor:
    """The receiver's half of `encode_frame`: payload + the same reference -> the next reference
    (PacketError on a payload that does not decode)."""
    dec = coder.decoder(payload)
    if align:
        ref = motion.apply_shifts(ref, motion.decode_shifts(coder, dec, ref.shape))
    features = model.features(ref)
    mu1, index1 = model.anchor_parameters(features, level)
    a = anchors(ref.shape).expand_as(ref)
    k = torch.zeros_like(ref)
    k[a] = torch.from_numpy(coder.decode_from(dec, index1[a].numpy())).float()
    mu2, index2 = model.second_parameters(features, k, mu1, level)
    k[~a] = torch.from_numpy(coder.decode_from(dec, index2[~a].numpy())).float()
    return model.reconstruct(k, torch.where(a, mu1, mu2), features, ref, level)


def anchors(shape: torch.Size | tuple[int, ...], device: torch.device | None = None) -> Tensor:
    """The checkerboard's first half, (1, 1, H, W) bool: positions with row + column even."""
    h, w = shape[-2], shape[-1]
    i = torch.arange(h, device=device)[:, None] + torch.arange(w, device=device)[None, :]
    return (i % 2 == 0)[None, None]


def gaussian_bits(v: Tensor, scale: Tensor) -> Tensor:
    """-log2 of the probability of [v - 1/2, v + 1/2] under N(0, scale) (v: offset from the mean)."""
    v = v.abs()
    p = torch.special.ndtr((0.5 - v) / scale) - torch.special.ndtr((-0.5 - v) / scale)
    return -torch.log2(p.clamp_min(1e-9))


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, padding_mode="replicate")


def _zero(m: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(m.weight)
    nn.init.zeros_(m.bias)
    return m


# -- shipped weights -------------------------------------------------------------------------------
FORMAT = "neural-video-codec-conditional"
FORMAT_VERSION = 1
PACKAGED = Path(__file__).resolve().parents[1] / "weights" / "conditional"
MAX_BYTES = 16 << 20  # the shipped coder: under 1 MB


def save(base: str | Path, model: ConditionalCoder, intra_model_id: int, training: dict[str, Any]) -> tuple[Path, Path]:
    """`base`.safetensors (the coder's tensors) + `base`.json (its shape, the intra model it
    codes the latents of, how it was trained)."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    js, st = base.with_suffix(".json"), base.with_suffix(".safetensors")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(st))
    js.write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "channels": model.cfg.channels,
                              "features": model.cfg.features, "levels": model.levels,
                              "intra_model_id": f"{intra_model_id:08x}", "training": training}, indent=2) + "\n")
    return js, st


def shipped_for(intra_model_id: int) -> ConditionalCoder | None:
    """The packaged coder when it was trained for this intra model, else None."""
    try:
        return load("default", intra_model_id)
    except WeightsError:
        return None


def load(name_or_path: str | Path, intra_model_id: int) -> ConditionalCoder:
    """A saved coder (a packaged name such as 'default', or a path to either file), in eval mode.
    WeightsError when the files are missing, malformed, or made for another intra model (its
    latents would mean something else)."""
    p = Path(name_or_path)
    base = p.with_suffix("") if p.suffix in (".json", ".safetensors") else (
        PACKAGED / p if p.parent == Path(".") and not p.exists() else p)
    js, st = base.with_suffix(".json"), base.with_suffix(".safetensors")
    if not js.is_file() or not st.is_file():
        raise WeightsError(f"no conditional coder at {base} (need {js.name} and {st.name})")
    info = parse_json(read_capped(js, 1 << 20), str(js))
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise WeightsError(f"{js} is not a conditional coder's config (format {FORMAT!r})")
    if info.get("format_version") != FORMAT_VERSION:
        raise WeightsError(f"{js}: format_version {info.get('format_version')!r}, this program reads {FORMAT_VERSION}")
    if info.get("intra_model_id") != f"{intra_model_id:08x}":
        raise WeightsError(f"{js} was trained on intra model {info.get('intra_model_id')!r}, "
                           f"not the loaded one ({intra_model_id:08x})")
    if not isinstance(info.get("training", {}), dict):
        raise WeightsError(f"{js}: training must be an object")
    info.setdefault("training", {})
    shape = [info.get(k) for k in ("channels", "features", "levels")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 256 for v in shape):
        raise WeightsError(f"{js}: channels, features and levels must be integers 1..256, got {shape}")
    model = ConditionalCoder([1.0] * shape[2], ConditionalConfig(shape[0], shape[1]))
    data = read_capped(st, MAX_BYTES)
    try:
        state = safetensors_load(data)
    except Exception as e:  # noqa: BLE001 - a damaged file: one line, never a traceback
        raise WeightsError(f"{st}: not a safetensors file ({str(e)[:120]})") from None
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != want:
        odd = sorted(set(got.items()) ^ set(want.items()))[:3]
        raise WeightsError(f"{st} does not match {js.name}: {odd}")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.info = info  # type: ignore[attr-defined]
    return model.eval()
