"""Neural video-call codec: frames travel as quantized latents of a compressive autoencoder.

The path of one frame: capture (`sources`) → downsample (`antialias`) → encode (`codec.model`)
→ quantize (`codec.quantizer`) → pack (`codec.bitstream`) → send (`transport`) → unpack →
decode → show (`receive`, browser client).
"""

__version__ = "0.1.0"
