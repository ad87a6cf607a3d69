"""Scale-out: the training script under torchrun with 2 CPU processes (gloo) keeps ranks equal."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "training" / "configs" / "tiny-test.toml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_end_with_identical_weights(tmp_path):
    out = (tmp_path / "run").as_posix()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "training.train", "--config", str(TINY), "--set", f'out_dir="{out}"', "--set", f'log_dir="{out}/runs"',
           "--set", "stage1.max_steps=8", "--set", "stage2.max_steps=4", "--set", "dump_rank_weights=true"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "world size 2" in p.stdout
    out = tmp_path / "run"
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert r0.keys() == r1.keys()
    for k in r0:  # weights and batch-norm statistics alike
        assert torch.equal(r0[k], r1[k]), f"ranks differ in {k}"
    # and they trained: the weights moved away from the seed's initial ones
    torch.manual_seed(0)
    from streamer.codec import CompressiveAutoencoder, get_preset
    init = CompressiveAutoencoder(get_preset("lite", latent_channels=8, width1=8, width2=16, res_blocks=1)).state_dict()
    assert any(not torch.equal(init[k], r0[k]) for k in r0 if k.endswith("weight"))
