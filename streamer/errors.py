"""Typed errors. Every user mistake or bad input surfaces as one of these, with a message that
says what was wrong and what to do, never as a bare traceback from deep inside the stack."""


class StreamerError(Exception):
    """Base class of every error the project raises on purpose."""


class ConfigError(StreamerError):
    """A configuration file or option is invalid (unknown preset, bad value, missing key)."""


class FrameSizeError(StreamerError, ValueError):
    """A frame's size does not suit the model (e.g. not a multiple of the model's stride)."""


class WeightsError(StreamerError):
    """Weights are missing, unsafe (pickle), corrupt, or do not match their config."""


class PacketError(StreamerError):
    """A received packet is truncated, corrupt, foreign, oversized or from another version/model."""


class SourceError(StreamerError):
    """A frame source cannot be opened (missing or busy webcam, unreadable file)."""
