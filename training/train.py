"""Two-stage training of the compressive autoencoder (the seed's method), top to bottom.

    python -m training.train --config training/configs/cpu-lite.toml [--resume]
    torchrun --nproc_per_node 2 -m training.train --config training/configs/cpu-lite.toml

Stage 1 trains encoder + decoder with the quantizer bypassed. Stage 2 loads the best stage-1
model (by validation PSNR), freezes the encoder (eval mode, so its batch-norm statistics stay put,
and requires_grad False), calibrates the per-channel quantizer range on training latents
and fine-tunes the decoder through the quantizer (straight-through estimator). With a step-mode
quantizer (several step sizes, entropy-coded) each batch goes through a random level, so one
decoder serves them all, and every export carries entropy tables fitted on training latents.

The config is a TOML file whose sections go straight to constructors:
  [model] -> streamer.codec.get_preset(**)   [quantizer] -> bits, mode, steps, level, coverage
  [data]  -> DataConfig(**)                  [stage1], [stage2] -> StageConfig(**)
Top-level keys: name, seed, threads, out_dir, log_dir, export, frame_size, stages, machine,
init_from (stage-1 codec weights for a stage-2-only run, e.g. the seed's experiments 3, 5, 7).
training/config.py holds DataConfig and StageConfig and checks every key, type, preset and data
folder before any slow work: `main` prints a mistake as one line on stderr and exits 2.

Outputs (out_dir): ckpt.safetensors + ckpt.json (resumable, pickle-free), best-stage1.* and
best.* (codec weights via streamer.codec.weights.save, best by validation PSNR); `export`
(optional) gets a copy of best.* each time it improves. TensorBoard logs go to log_dir. The run
ends by listing where these went.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from streamer.codec import CompressiveAutoencoder, Quantizer, QuantizerConfig, get_preset, to_uint8
from streamer.codec import weights as codec_weights
from streamer.errors import ConfigError, StreamerError

from . import data as D
from .checkpoint import has_checkpoint, load_checkpoint, restore_optimizer, save_checkpoint
from .config import DataConfig, StageConfig, load_config, require_extra  # noqa: F401 (re-exported)


# -----------------------------------------------------------------------------------------------
# the network being trained: encoder -> quantizer -> decoder

class LaplaceRate(nn.Module):
    """A training-time stand-in for the entropy coder: each channel's latents as a zero-mean
    Laplace with a learned scale, integrated over the quantization bin of width `step` around
    the noisy latent. Its bits are differentiable; the shipped coder's tables (fitted after
    training) code better, as they also see context, but both reward the same thing: latents
    that are zero, or small, where the picture allows."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(channels))

    def forward(self, y: torch.Tensor, step: float) -> torch.Tensor:
        b = self.log_scale.exp().view(1, -1, 1, 1)
        v = -y.abs()  # the density is symmetric: work on the left tail, where the CDF is exp(v/b)/2
        upper = v + step / 2
        cdf_up = torch.where(upper < 0, 0.5 * torch.exp(upper / b), 1 - 0.5 * torch.exp(-upper / b))
        p = cdf_up - 0.5 * torch.exp((v - step / 2) / b)
        return -torch.log2(p.clamp_min(1e-9)).sum()


class Autoencoder(nn.Module):
    def __init__(self, model: CompressiveAutoencoder, quantizer: Quantizer) -> None:
        super().__init__()
        self.model, self.quantizer = model, quantizer
        self.rate = LaplaceRate(model.cfg.latent_channels)
        self.bits: torch.Tensor | None = None  # the last forward's estimated bits (noise_step > 0)

    def forward(self, x: torch.Tensor, level: int | None = None, noise_step: float = 0.0) -> torch.Tensor:
        y = self.model.encoder(x)
        if noise_step > 0:  # rate-distortion training: uniform noise stands in for rounding
            y = y + (torch.rand_like(y) - 0.5) * noise_step
            self.bits = self.rate(y, noise_step)
        return self.model.decoder(self.quantizer(y, level))


def set_train_mode(net: Autoencoder, stage: int, freeze_bn: bool = False) -> None:
    """Stage 1: everything trains. Stage 2: the encoder stays in eval mode (frozen BN stats);
    with freeze_bn the decoder's BN layers too (their weights still learn, their statistics stay)."""
    net.train()
    if stage == 2:
        net.model.encoder.eval()
        if freeze_bn:
            for m in net.model.decoder.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()


def synthetic_frames(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random pictures (sums of blurred blobs and gradients), uint8 (n, size, size, 3)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, max(2, size // 16), max(2, size // 16), generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    ramp = torch.linspace(0, 1, size).view(1, 1, 1, size) * torch.rand(n, 3, 1, 1, generator=g)
    x = (0.7 * x + 0.3 * ramp).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def lr_at(sc: StageConfig, step: int, progress: float) -> float:
    """Linear warmup, then cosine decay from lr to min_lr over `progress` in [0, 1]."""
    if step < sc.warmup_steps:
        return sc.lr * (step + 1) / sc.warmup_steps
    return sc.min_lr + 0.5 * (sc.lr - sc.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def validate(net: Autoencoder, val_frames: list[torch.Tensor], batch: int = 16,
             levels: list[int] | None = None) -> dict[str, float]:
    """PSNR on 8-bit outputs over the val frames: the mean of per-frame PSNRs and the PSNR of the
    mean MSE. Frames may differ in size; each size group runs in batches. `levels` (step mode):
    every frame at each of these quantizer levels, pooled (None: the quantizer's own level)."""
    was_training = net.training
    net.eval()
    mses = []
    for level in levels or [None]:
        for x in val_frames:  # tensors (N, 3, H, W) of one size each
            for i in range(0, len(x), batch):
                xb = x[i:i + batch]
                y = to_uint8(net(xb, level)).astype(np.float64)
                ref = to_uint8(xb).astype(np.float64)
                mses.extend(((y - ref) ** 2).reshape(len(xb), -1).mean(1).tolist())
    net.train(was_training)
    mses_a = np.maximum(np.array(mses), 1e-10)
    return {"psnr": float(np.mean(10 * np.log10(255.0 ** 2 / mses_a))),
            "psnr_of_mean_mse": float(10 * np.log10(255.0 ** 2 / mses_a.mean())), "frames": len(mses)}


def all_average_buffers(module: nn.Module, world: int) -> None:
    """Average float buffers (batch-norm running stats) across ranks so every rank ends equal."""
    if world == 1:
        return
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b, op=dist.ReduceOp.SUM)
            b.div_(world)


def print_outputs(cfg: dict[str, Any], dc: DataConfig) -> None:
    """Where this run's files went (only those that exist)."""
    out_dir, log_dir = Path(cfg["out_dir"]), Path(cfg["log_dir"])
    lines = [("codec weights", out_dir / "best.json", "+ .safetensors, best by val PSNR"),
             ("exported copy", Path(cfg["export"]).with_suffix(".json") if cfg.get("export") else None, ""),
             ("stage-1 weights", out_dir / "best-stage1.json", "unquantized, what stage 2 starts from"),
             ("checkpoint", out_dir / "ckpt.json", "continue with --resume"),
             ("frame cache", None if dc.synthetic else Path(dc.cache_dir), "reused by later runs"),
             ("TensorBoard", log_dir, f"tensorboard --logdir {log_dir}")]
    print("outputs:", flush=True)
    for what, path, note in lines:
        if path is not None and path.exists():
            print(f"  {what + ':':17s}{path}" + (f" ({note})" if note else ""), flush=True)


def main(argv: list[str] | None = None) -> int:
    """The command line: a mistake (config, data, a missing extra) is one line on stderr, status 2."""
    try:
        train(argv)
    except StreamerError as e:
        print(f"train: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


def train(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the training the command line describes; returns the final state (metrics, history)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="TOML config (training/configs/*.toml)")
    ap.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.* if present")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value (VALUE is TOML; a bare word where a string goes), "
                         "e.g. --set stage1.max_minutes=1")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)  # every mistake found here, before any slow work
    require_extra("tqdm", "tensorboard")

    # -- distributed setup (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK) -------------------------
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world, local_rank = 0, 1, 0
    master = rank == 0
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(cfg["seed"])  # same initial weights on every rank (DDP also broadcasts them)
    out_dir, log_dir = Path(cfg["out_dir"]), Path(cfg["log_dir"])
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    # -- data ----------------------------------------------------------------------------------
    dc = DataConfig(**cfg["data"])
    if dc.synthetic:
        train_arrays = [synthetic_frames(dc.synthetic, dc.cache_size, seed=cfg["seed"])]
        val_arrays = [synthetic_frames(max(2, dc.synthetic // 8), dc.cache_size, seed=cfg["seed"] + 1)]
        train_cache = D.FrameCache([], size=dc.cache_size)
        train_cache.arrays = train_arrays
        val_cache = D.FrameCache([], size=dc.cache_size)
        val_cache.arrays = val_arrays
    else:
        def caches() -> tuple[D.FrameCache, D.FrameCache]:
            train_src = D.build_sources(dc.train, dc.layout, dc.partition,
                                        "train" if dc.layout == "voxceleb" and not dc.val else "all",
                                        dc.val_fraction, dc.utterances, cfg["seed"])
            if dc.layout == "voxceleb" and not dc.val:  # identity-disjoint val from the same partition
                val_src = D.build_sources(dc.train, dc.layout, dc.partition, "val", dc.val_fraction,
                                          None, cfg["seed"])
            else:
                val_src = D.folder_sources(dc.val) if dc.layout == "folder" else D.voxceleb_sources(dc.val, "test")
            tc = D.FrameCache(train_src, size=dc.cache_size, every_s=dc.every_s, cache_dir=dc.cache_dir)
            vc = D.FrameCache(val_src, size=cfg["frame_size"], per_source=dc.val_frames_per_clip,
                              cache_dir=dc.cache_dir)
            return tc, vc
        with warnings.catch_warnings():  # unreadable files: listed below as "skipped" instead
            warnings.filterwarnings("ignore", message="skipping unreadable source")
            if master:  # rank 0 decodes and fills the cache; the others then read it
                train_cache, val_cache = caches()
                train_cache.build(progress=True)
                val_cache.build(progress=True)
            if ddp:
                dist.barrier()
            if not master:
                train_cache, val_cache = caches()
                train_cache.build(progress=False)
                val_cache.build(progress=False)
        if master:
            for path, why in train_cache.skipped + val_cache.skipped:
                print(f"skipped {path}: {why}", flush=True)
        for what, cache in (("train", train_cache), ("val", val_cache)):
            if not cache.arrays:  # listed up front, but none of them decodes
                raise ConfigError(f"[data] {what}: none of the {len(cache.sources)} file(s) could be read "
                                  f"(each is listed above as skipped)")
    # val frames grouped by size, as float tensors
    by_size: dict[int, list[np.ndarray]] = {}
    for a in val_cache.arrays:
        side = min(cfg["frame_size"], a.shape[1] // 8 * 8)
        for f in a:
            by_size.setdefault(side, []).append(np.ascontiguousarray(f[(f.shape[0] - side) // 2:][:side, (f.shape[1] - side) // 2:][:, :side]))
    val_frames = [torch.from_numpy(np.stack(v)).permute(0, 3, 1, 2).float().div(255).to(device)
                  for v in by_size.values()]
    if master:
        print(f"data: {train_cache.num_frames} training frames from {len(train_cache.arrays)} sources, "
              f"{sum(len(v) for v in val_frames)} val frames; world size {world} on {device}", flush=True)

    # -- model, quantizer ----------------------------------------------------------------------
    model_cfg = dict(cfg["model"])
    preset = model_cfg.pop("preset", "lite")
    mcfg = get_preset(preset, **model_cfg)
    model = CompressiveAutoencoder(mcfg)
    qcfg_base = dict(cfg["quantizer"])
    bits = int(qcfg_base.get("bits", 6))
    # share of training latents inside the fixed range (the rest is clipped). Measured on a
    # cpu-lite stage-1 model, val PSNR quantized: 0.999 34.20, 0.9995 34.69, 0.9999 35.54,
    # full min..max 35.35 dB.
    coverage = float(qcfg_base.get("coverage", 0.9999))

    def target_quantizer() -> QuantizerConfig:
        """What stage 2 trains and exports: 'fixed' (2^bits levels per channel) or 'step'
        (load_config has checked it)."""
        return QuantizerConfig(bits=bits, mode=str(qcfg_base.get("mode", "fixed")),
                               steps=[float(v) for v in qcfg_base.get("steps", [])],
                               level=int(qcfg_base.get("level", 0)))
    entropy_counts: list[np.ndarray | None] = [None]  # fitted with the range (step mode)
    residual_counts: list[np.ndarray | None] = [None]  # the P-frame tables: kept from init_from only
    keep_init = bool(qcfg_base.get("keep_init", False))
    quantizer = Quantizer(QuantizerConfig(bits=bits, mode="bypass"), mcfg.latent_channels)
    net = Autoencoder(model, quantizer).to(device)

    # -- state, resumed from a checkpoint if asked --------------------------------------------
    state: dict[str, Any] = {"stage": int(cfg["stages"][0]), "step": 0, "elapsed_s": 0.0,
                             "best_psnr": -1.0, "metrics": {}, "total_elapsed_s": 0.0, "history": []}
    resume_opt = None
    if args.resume and has_checkpoint(out_dir):
        model_state, opt_tensors, info = load_checkpoint(out_dir)
        net.model.load_state_dict(model_state)
        state.update(info["state"])
        if info.get("quantizer", {}).get("mode") in ("fixed", "step"):
            quantizer.cfg = QuantizerConfig.from_dict(info["quantizer"])
            quantizer.lo.copy_(torch.tensor(quantizer.cfg.lo))
            quantizer.hi.copy_(torch.tensor(quantizer.cfg.hi))
        resume_opt = (opt_tensors, info["optimizer"])
        if master:
            print(f"resumed {out_dir} at stage {state['stage']} step {state['step']}", flush=True)
    writer = None
    if master:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(log_dir))

    def codec_config(stage: int) -> codec_weights.CodecConfig:
        return codec_weights.CodecConfig(
            preset=preset, model=mcfg, quantizer=QuantizerConfig.from_dict(quantizer.cfg.to_dict()),
            frame_size=int(cfg["frame_size"]),
            entropy_counts=entropy_counts[0] if quantizer.cfg.mode == "step" else None,
            residual_counts=residual_counts[0],
            training={"command": "python -m training.train " + " ".join(sys.argv[1:] if argv is None else argv),
                      "config": str(args.config), "stage": stage, "step": state["step"],
                      "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "wall_time_min": round((state["total_elapsed_s"] + time.time() - t_start) / 60, 1),
                      "machine": cfg.get("machine", f"{platform.node()} {os.cpu_count()} CPU"
                                         f"{', ' + torch.cuda.get_device_name() if device.type == 'cuda' else ', no GPU'}"),
                      "world_size": world, "torch": torch.__version__,
                      "training_frames": train_cache.num_frames, "val": dict(state["metrics"]),
                      **({"decoder_of": init_training[0]} if keep_init else {})})

    init_training: list[dict[str, Any]] = [{}]

    def adopt_init_quantizer() -> None:
        """keep_init: the quantizer, its range and every table come from init_from unchanged, so
        the frozen encoder sends the same codes and bitstreams as before; only the decoder learns."""
        init_cfg, _, init_id = codec_weights.load(cfg["init_from"])
        if init_cfg.quantizer.mode != "step" or init_cfg.entropy_counts is None:
            raise ConfigError(f"[quantizer] keep_init: {cfg['init_from']} has no step quantizer with tables")
        quantizer.cfg = QuantizerConfig.from_dict(init_cfg.quantizer.to_dict())
        quantizer.lo.copy_(torch.tensor(quantizer.cfg.lo))
        quantizer.hi.copy_(torch.tensor(quantizer.cfg.hi))
        entropy_counts[0], residual_counts[0] = init_cfg.entropy_counts, init_cfg.residual_counts
        init_training[0] = {"weights": str(cfg["init_from"]), "model_id": f"{init_id:08x}", **init_cfg.training}

    @torch.no_grad()
    def calibrate() -> None:
        """The per-channel range from training latents (deterministic: same on all ranks); in
        step mode also the entropy tables, from the codes of more training frames."""
        frames = D.CentreCrops(train_cache, cfg["frame_size"]).frames
        tq = target_quantizer()
        count = 1024 if tq.mode == "step" else 256
        pick = np.linspace(0, len(frames) - 1, num=min(count, len(frames))).round().astype(int)
        net.model.encoder.eval()
        latents = []
        by_side: dict[int, list[np.ndarray]] = {}
        for i in pick:
            by_side.setdefault(frames[i].shape[0], []).append(frames[i])
        whole = []  # full-size frames' latents: the entropy tables learn from whole frames
        for side, fs in by_side.items():
            for j in range(0, len(fs), 32):
                x = torch.from_numpy(np.stack(fs[j:j + 32])).permute(0, 3, 1, 2).float().div(255).to(device)
                y = net.model.encoder(x)
                latents.append(y.transpose(0, 1).flatten(1).cpu())  # (C, N*h*w)
                if side == cfg["frame_size"]:
                    whole.append(y.cpu())
        quantizer.cfg = tq
        flat = torch.cat(latents, dim=1)[None, :, :, None]
        quantizer.calibrate(flat, coverage=coverage)
        if tq.mode == "step":
            from streamer.codec import entropy
            if not whole:
                raise ConfigError(f"no training frame of {cfg['frame_size']} px to fit entropy tables on")
            entropy_counts[0] = entropy.fit_levels(quantizer, torch.cat(whole))

    def val_levels() -> list[int] | None:
        """Stage 2 in step mode picks its best model by val PSNR pooled over these levels."""
        levels = qcfg_base.get("val_levels")
        return [int(v) for v in levels] if levels and quantizer.cfg.mode == "step" else None

    def export(path: Path, stage: int) -> None:
        """Codec weights (safetensors + JSON), written next to each other then renamed into place."""
        tmp = path.parent / f".tmp-{path.name}"
        codec_weights.save(tmp, codec_config(stage), net.model)
        for suffix in (".safetensors", ".json"):
            os.replace(tmp.with_suffix(suffix), path.with_suffix(suffix))

    if mcfg.linear_path and 1 in cfg["stages"] and not cfg.get("init_from") and state["step"] == 0 and resume_opt is None:
        # the linear block path starts as the PCA of training blocks (same frames on every rank)
        from .pca import init_linear_path
        frames = [f for f in D.CentreCrops(train_cache, cfg["frame_size"]).frames if f.shape[0] == cfg["frame_size"]]
        pick = np.linspace(0, len(frames) - 1, num=min(512, len(frames))).round().astype(int)
        explained = init_linear_path(net.model, np.stack([frames[i] for i in pick]))
        if master:
            v = validate(net, val_frames)
            print(f"linear path: PCA of 8x8 training blocks, {explained:.1%} of their variance; "
                  f"val PSNR at step 0 {v['psnr']:.2f} dB", flush=True)
    if cfg.get("init_from") and 1 in cfg["stages"] and state["step"] == 0 and resume_opt is None:
        _, init, _ = codec_weights.load(cfg["init_from"])  # stage 1 continues from other weights
        net.model.load_state_dict(init.state_dict())
        if master:
            print(f"stage 1 starts from {cfg['init_from']}", flush=True)

    # -- the two stages ------------------------------------------------------------------------
    for stage in cfg["stages"]:
        if stage < state["stage"]:
            continue
        sc = StageConfig(**cfg[f"stage{stage}"])
        fresh = stage != state["stage"] or resume_opt is None
        if stage == 2:
            start = out_dir / "best-stage1"  # the best stage-1 model by val, or another run's (init_from)
            if not start.with_suffix(".safetensors").exists() and cfg.get("init_from"):
                start = Path(cfg["init_from"])
            if fresh and start.with_suffix(".safetensors").exists():
                _, best1, _ = codec_weights.load(start)
                net.model.load_state_dict(best1.state_dict())
            elif fresh:
                print(f"warning: stage 2 found no stage-1 weights at {start}; fine-tuning the current model",
                      flush=True)
            for p in net.model.encoder.parameters():
                p.requires_grad_(False)
            net.model.encoder.eval()
            if keep_init and (fresh or entropy_counts[0] is None):
                adopt_init_quantizer()
            elif not fresh and quantizer.cfg.mode == "step" and entropy_counts[0] is None:
                calibrate()  # resumed: the frozen encoder gives the same range and tables again
            elif fresh:
                calibrate()
            if fresh:
                q = validate(net, val_frames, levels=val_levels())
                state["metrics"]["quantized_before_stage2"] = q
                state["best_psnr"] = q["psnr"]
                if master:
                    what = (f"steps {quantizer.cfg.steps} (validated at level {quantizer.cfg.level})"
                            if quantizer.cfg.mode == "step" else f"{bits}-bit fixed range")
                    how = "kept init_from's" if keep_init else "calibrated"
                    print(f"stage 2: {how} {what}; val PSNR quantized before "
                          f"fine-tuning {q['psnr']:.2f} dB", flush=True)
                    writer.add_scalar("val/psnr_quantized_before_stage2", q["psnr"], state["step"])
                    export(out_dir / "best", 2)
                    if cfg.get("export"):
                        export(Path(cfg["export"]), 2)
        if fresh:
            state.update(stage=stage, elapsed_s=0.0, stage_step=0)
        net.rate.requires_grad_(stage == 1 and sc.rate_weight > 0)  # DDP: no parameter left unused
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=sc.lr, weight_decay=sc.weight_decay)
        if not fresh:
            restore_optimizer(opt, *resume_opt)
        resume_opt = None
        train_net: nn.Module = net
        if ddp:
            train_net = nn.parallel.DistributedDataParallel(net, device_ids=[local_rank] if device.type == "cuda" else None)
        dataset = D.RandomCrops(train_cache, sc.crop, flip=True, seed=cfg["seed"] * 1000 + rank + 7919 * state["step"])
        gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank + 7919 * state["step"])
        set_train_mode(net, stage, sc.freeze_bn)

        def get_batch() -> torch.Tensor:
            idx = torch.randint(len(dataset), (sc.batch_size,), generator=gen).tolist()
            return torch.stack([dataset[i] for i in idx]).to(device, non_blocking=True)

        if master:
            from tqdm import tqdm
            bar = tqdm(total=sc.max_steps, initial=state["stage_step"], desc=f"stage {stage}",
                       mininterval=1 if sys.stderr.isatty() else 30, dynamic_ncols=True)
        t0 = time.time() - state["elapsed_s"]
        last_eval = last_ckpt = time.time()
        loss_acc, bpp_acc, n_acc = 0.0, 0.0, 0
        while True:
            # rank 0 decides progress, validation and checkpointing (wall clock) for everyone
            elapsed = time.time() - t0
            progress = state["stage_step"] / sc.max_steps
            if sc.max_minutes > 0:
                progress = max(progress, elapsed / (sc.max_minutes * 60))
            done = progress >= 1.0
            do_eval = done or (sc.eval_every > 0 and state["stage_step"] > 0 and state["stage_step"] % sc.eval_every == 0) \
                or (sc.eval_every <= 0 and time.time() - last_eval > sc.eval_minutes * 60)
            do_ckpt = done or time.time() - last_ckpt > sc.checkpoint_minutes * 60
            flags = torch.tensor([progress, float(done), float(do_eval), float(do_ckpt)])
            if ddp:
                dist.broadcast(flags, 0)
            progress, done, do_eval, do_ckpt = float(flags[0]), bool(flags[1]), bool(flags[2]), bool(flags[3])

            if do_eval:
                all_average_buffers(net, world)
                v = validate(net, val_frames, levels=val_levels() if stage == 2 else None)
                last_eval = time.time()
                state["history"].append({"stage": stage, "step": state["stage_step"], "val_psnr": round(v["psnr"], 3),
                                         "minutes": round((time.time() - t0) / 60, 2)})
                if master:
                    writer.add_scalar(f"val/psnr_stage{stage}", v["psnr"], state["step"])
                    writer.add_scalar(f"val/psnr_of_mean_mse_stage{stage}", v["psnr_of_mean_mse"], state["step"])
                    with torch.no_grad():
                        net.eval()
                        xs = val_frames[0][: 4]
                        writer.add_images("val/original_top_reconstruction_bottom",
                                          torch.cat([xs, net(xs)]).clamp(0, 1), state["step"])
                        set_train_mode(net, stage, sc.freeze_bn)
                    bar.write(f"stage {stage} step {state['stage_step']}: val PSNR {v['psnr']:.2f} dB "
                              f"(of mean MSE {v['psnr_of_mean_mse']:.2f}), best {state['best_psnr']:.2f}")
                if v["psnr"] > state["best_psnr"] or (stage == 1 and sc.rate_weight > 0):
                    state["best_psnr"] = max(v["psnr"], state["best_psnr"])
                    state["metrics"][f"stage{stage}"] = {**v, "step": state["stage_step"]}
                    if master:
                        if stage == 1:
                            export(out_dir / "best-stage1", 1)  # bypass quantizer: the stage-2 start
                            if cfg.get("export") or 2 in cfg["stages"]:  # a usable codec right away
                                saved = quantizer.cfg
                                lo, hi = quantizer.lo.clone(), quantizer.hi.clone()
                                calibrate()
                                set_train_mode(net, stage, sc.freeze_bn)
                                export(out_dir / "best", 1)
                                if cfg.get("export"):
                                    export(Path(cfg["export"]), 1)
                                quantizer.cfg = saved
                                quantizer.lo.copy_(lo)
                                quantizer.hi.copy_(hi)
                        else:
                            export(out_dir / "best", 2)
                            if cfg.get("export"):
                                export(Path(cfg["export"]), 2)
            if do_ckpt:
                all_average_buffers(net, world)
                state["elapsed_s"] = time.time() - t0
                if master:
                    save_checkpoint(out_dir, net.model, opt, {"state": state, "config": cfg,
                                                              "quantizer": quantizer.cfg.to_dict()})
                last_ckpt = time.time()
            if done:
                break

            # one optimisation step
            lr = lr_at(sc, state["stage_step"], progress)
            for g in opt.param_groups:
                g["lr"] = lr
            x = get_batch()
            # step mode: a random level per batch, so the decoder learns every step size
            level = (int(torch.randint(len(quantizer.cfg.steps), (1,), generator=gen))
                     if stage == 2 and quantizer.cfg.mode == "step" else None)
            rd = stage == 1 and sc.rate_weight > 0
            y = train_net(x, level, sc.rate_step if rd else 0.0)
            mse = torch.nn.functional.mse_loss(y, x)
            loss = torch.log10(mse.clamp_min(1e-10)) if sc.log_mse else mse
            if rd:
                bpp = net.bits / (x.shape[0] * x.shape[2] * x.shape[3])
                loss = mse + sc.rate_weight * bpp
                bpp_acc += bpp.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if sc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, sc.grad_clip)
            opt.step()
            state["step"] += 1
            state["stage_step"] += 1
            loss_acc += mse.item()  # the distortion alone: the PSNR logged below
            n_acc += 1
            if master:
                bar.update(1)
                if state["stage_step"] % sc.log_every == 0:
                    mean = loss_acc / n_acc
                    writer.add_scalar(f"train/loss_stage{stage}", mean, state["step"])
                    writer.add_scalar(f"train/psnr_stage{stage}", 10 * math.log10(1 / max(mean, 1e-12)), state["step"])
                    writer.add_scalar("train/lr", lr, state["step"])
                    if bpp_acc:
                        writer.add_scalar(f"train/bpp_estimate_stage{stage}", bpp_acc / n_acc, state["step"])
                    state["history"].append({"stage": stage, "step": state["stage_step"], "train_loss": mean})
                    bar.set_postfix(mse=f"{mean:.5f}", lr=f"{lr:.2e}", budget=f"{progress:.0%}",
                                    **({"bpp": f"{bpp_acc / n_acc:.3f}"} if bpp_acc else {}))
                    loss_acc, bpp_acc, n_acc = 0.0, 0.0, 0
        state["metrics"][f"stage{stage}_final"] = v
        if master:
            bar.close()
            print(f"stage {stage} done: {state['stage_step']} steps in {(time.time() - t0) / 60:.1f} min, "
                  f"best val PSNR {state['best_psnr']:.2f} dB", flush=True)
        state["total_elapsed_s"] += time.time() - t0
        if ddp:
            del train_net
        if stage == 1 and 2 in cfg["stages"]:
            state["stage"] = 2  # the next stage starts fresh from best-stage1
            state["elapsed_s"] = 0.0
            resume_opt = None

    if master:
        save_checkpoint(out_dir, net.model, opt, {"state": state, "config": cfg,
                                                  "quantizer": quantizer.cfg.to_dict()})
        print("val PSNRs:", {k: round(v["psnr"], 2) for k, v in state["metrics"].items()}, flush=True)
        writer.close()
        print_outputs(cfg, dc)
    if cfg.get("dump_rank_weights"):  # tests: every rank writes what it ended with
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in net.model.state_dict().items()}, str(out_dir / f"rank{rank}.safetensors"))
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return state


if __name__ == "__main__":
    raise SystemExit(main())
