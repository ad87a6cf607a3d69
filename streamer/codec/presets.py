"""Model presets by name (CompressAI-style zoo). A preset is data: its fields go straight to
`CompressiveAutoencoder(**fields)`, so a config file can name a preset and override any field."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..errors import ConfigError

STRIDE = 8  # three stride-2 stages: every frame side must be a multiple of this


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
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model field(s) {sorted(unknown)}; valid: {sorted(known)}")
        try:
            cfg = cls(**{k: int(v) for k, v in d.items()})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"bad model config {d}: {e}") from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < (0 if f.name in ("res_blocks", "linear_path") else 1):
                raise ConfigError(f"model field {f.name} must be positive, got {getattr(self, f.name)}")
        if self.linear_path not in (0, 1):
            raise ConfigError(f"model field linear_path must be 0 or 1, got {self.linear_path}")
        if self.kernel % 2 == 0 or self.res_kernel % 2 == 0:
            raise ConfigError("kernel sizes must be odd (symmetric replicate padding)")


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
