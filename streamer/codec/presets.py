"""Model presets by name (CompressAI-style zoo). A preset is data: its fields go straight to
`CompressiveAutoencoder(**fields)`, so a config file can name a preset and override any field."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..errors import ConfigError

STRIDE = 8  # three stride-2 stages: every frame side must be a multiple of this

# Sane bounds on every field (min, max), far above any preset (the largest has 128 channels, 5x5
# kernels, 3 blocks): a weights file is untrusted input, and without bounds one JSON number can ask
# torch for terabytes or hours. `streamer.codec.weights` also caps the total parameter count.
LIMITS: dict[str, tuple[int, int]] = {
    "latent_channels": (1, 256), "width1": (1, 1024), "width2": (1, 1024), "res_blocks": (0, 64),
    "kernel": (1, 15), "res_kernel": (1, 15), "linear_path": (0, 1),
}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one compressive autoencoder (Theis et al. 2017 + batch norm + sub-pixel)."""

    latent_channels: int = 24  # C: 96 / 48 / 24 keep 1/2, 1/4, 1/8 of the input's dimensions
    width1: int = 64  # channels after the first stride-2 conv
    width2: int = 128  # channels after the second stride-2 conv (residual blocks run here)
    res_blocks: int = 3
    kernel: int = 5  # the stride-2 convs (the seed: 5x5)
    res_kernel: int = 3
    # 1: a linear 8x8 block transform (encoder: one stride-8 conv; decoder: a 1x1 conv + pixel
    # shuffle by 8) runs beside the convolutional path, which then learns only a correction.
    # Training starts it from the PCA of 8x8 training blocks (see training.pca): at step 0 the
    # codec is already the best linear one, 36.8 dB unquantized on val vs 29.8 dB for `lite`
    # without it after 100 CPU minutes.
    linear_path: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Strict: an object of known fields holding JSON integers (no strings, floats or
        booleans); missing fields take the defaults (older files lack `linear_path`)."""
        if not isinstance(d, dict):
            raise ConfigError(f"model config must be an object, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = set(d) - set(known)
        if unknown:
            raise ConfigError(f"unknown model field(s) {sorted(unknown)[:8]}; valid: {', '.join(known)}")
        for k, v in d.items():
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"model field {k} must be an integer, got {repr(v)[:40]}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for f in fields(self):
            v, (lo, hi) = getattr(self, f.name), LIMITS[f.name]
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"model field {f.name} must be an integer, got {repr(v)[:40]}")
            if not lo <= v <= hi:
                raise ConfigError(f"model field {f.name} must be in {lo}..{hi}, got {repr(v)[:40]}")
        if self.kernel % 2 == 0 or self.res_kernel % 2 == 0:
            raise ConfigError("kernel sizes must be odd (symmetric replicate padding)")

    def parameter_count(self) -> int:
        """Learned parameters of `CompressiveAutoencoder(self)`, by arithmetic (nothing is built):
        lets a loader refuse a model too big to build. Mirrors model.py (a test checks it)."""
        c, w1, w2, k, rk = self.latent_channels, self.width1, self.width2, self.kernel, self.res_kernel

        def conv(cin: int, cout: int, kk: int) -> int:
            return cin * cout * kk * kk + cout

        res = self.res_blocks * 2 * (conv(w2, w2, rk) + 2 * w2)  # two convs + two batch norms each
        enc = conv(3, w1, k) + 2 * w1 + conv(w1, w2, k) + 2 * w2 + res + conv(w2, c, k)
        dec = (conv(c, 4 * w2, rk) + 2 * w2 + res + conv(w2, 4 * w1, rk) + 2 * w1 + conv(w1, 12, rk))
        lin = conv(3, c, STRIDE) + conv(c, 3 * STRIDE * STRIDE, 1) if self.linear_path else 0
        return enc + dec + lin


PRESETS: dict[str, ModelConfig] = {
    # The seed report's model: 3->64->128, 3 residual blocks at 128, 5x5 stride-2 to C.
    "facecompressor": ModelConfig(latent_channels=24),
    "facecompressor-48": ModelConfig(latent_channels=48),
    "facecompressor-96": ModelConfig(latent_channels=96),
    # Light enough for a 30 fps call on a 2-core laptop CPU (encode + decode <= 33 ms at 224).
    "lite": ModelConfig(latent_channels=24, width1=24, width2=48, res_blocks=1, linear_path=1),
    # `lite` as first trained (session 2's default, 29.6 dB on val): no linear block path.
    "lite-v1": ModelConfig(latent_channels=24, width1=24, width2=48, res_blocks=1),
}


def get_preset(name: str, **overrides: int) -> ModelConfig:
    """The preset `name`, with any field overridden (e.g. latent_channels=48)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    cfg = replace(PRESETS[name], **overrides) if overrides else PRESETS[name]
    cfg.validate()
    return cfg
