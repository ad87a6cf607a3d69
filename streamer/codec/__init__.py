"""The codec: model presets, quantizer, packet format and weights, behind `NeuralCodec`."""

from .bitstream import Packet, PacketHeader, compression_ratio, pack_frame, unpack
from .codec import NeuralCodec, to_tensor, to_uint8
from .model import CompressiveAutoencoder
from .presets import PRESETS, ModelConfig, get_preset
from .quantizer import Quantized, Quantizer, QuantizerConfig, dequantize

__all__ = [
    "NeuralCodec", "CompressiveAutoencoder", "ModelConfig", "PRESETS", "get_preset", "Quantizer",
    "QuantizerConfig", "Quantized", "dequantize", "Packet", "PacketHeader", "pack_frame", "unpack",
    "compression_ratio", "to_tensor", "to_uint8",
]
