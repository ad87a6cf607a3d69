"""PCA start for the linear block path (`ModelConfig.linear_path`).

The best linear codec that keeps C numbers per 8x8 RGB block is the projection onto the C
leading principal components of such blocks. Measured on our data (24 of 192 components,
fitted on train, scored on val, no quantization): 36.8 dB, against 29.8 dB for the `lite`
network without the path after 100 CPU minutes of training. So a model with the path starts
there: the encoder's stride-8 conv projects onto the components, the decoder's 1x1 conv +
pixel shuffle maps back, and the convolutional paths (zero at start) learn the rest.
"""

from __future__ import annotations

import numpy as np
import torch

from streamer.codec import CompressiveAutoencoder
from streamer.codec.presets import STRIDE


def block_vectors(frames: np.ndarray, block: int = STRIDE) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float64 (N*H/b*W/b, 3*b*b) in [-0.5, 0.5], each row ordered
    (channel, row, column): the order of a conv kernel and of nn.PixelShuffle's input channels."""
    n, h, w, c = frames.shape
    h, w = h // block * block, w // block * block
    x = frames[:, :h, :w].astype(np.float64) / 255.0 - 0.5
    x = x.reshape(n, h // block, block, w // block, block, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(-1, c * block * block)


def principal_components(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (d,), components (k, d)), the leading `k` by variance."""
    mean = vectors.mean(axis=0)
    cov = np.cov(vectors - mean, rowvar=False)
    values, vecs = np.linalg.eigh(cov)  # ascending
    return mean, vecs[:, ::-1][:, :k].T.copy()


@torch.no_grad()
def init_linear_path(model: CompressiveAutoencoder, frames: np.ndarray) -> float:
    """Set the model's block transforms to the PCA of `frames`' 8x8 blocks. Returns the share
    of the blocks' variance (about their mean) the kept components explain."""
    enc, dec = model.encoder.linear, model.decoder.linear
    if enc is None or dec is None:
        raise ValueError("the model has no linear path (ModelConfig.linear_path = 0)")
    k = model.cfg.latent_channels
    v = block_vectors(np.asarray(frames))
    if len(v) <= v.shape[1]:
        raise ValueError(f"{len(v)} blocks are too few for a PCA of {v.shape[1]} dimensions")
    mean, comps = principal_components(v, k)
    explained = float(((v - mean) @ comps.T).var(axis=0).sum() / v.var(axis=0).sum())
    w = torch.from_numpy(comps).float()  # (k, 3*8*8)
    m = torch.from_numpy(mean).float()
    enc.weight.copy_(w.view(k, 3, STRIDE, STRIDE))  # latent = W (x - 0.5 - mean)
    enc.bias.copy_(-(w @ m))
    up = dec[0]
    up.weight.copy_(w.t().reshape(3 * STRIDE * STRIDE, k, 1, 1))  # x - 0.5 = W^T latent + mean
    up.bias.copy_(m)
    return explained
