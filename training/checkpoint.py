"""Pickle-free checkpoints: tensors (model + optimizer state) in safetensors, the rest in JSON.

    <dir>/ckpt.safetensors   model.<name>  and  optim.<param index>.<state key>
    <dir>/ckpt.json          step, stage, elapsed time, config, optimizer param groups, metrics

`torch.save`/`torch.load` would pickle whole objects, and unpickling runs arbitrary code; here
only tensors and JSON scalars are ever read back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `opt.state_dict()` into flat tensors and JSON-able scalars."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if not name.startswith("optim."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for name, v in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(directory: str | Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    info: dict[str, Any]) -> Path:
    """Write ckpt.safetensors + ckpt.json atomically (temp files, then rename)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = optimizer_tensors(opt)
    tensors.update(opt_tensors)
    st_tmp, js_tmp = d / "ckpt.safetensors.tmp", d / "ckpt.json.tmp"
    save_file(tensors, str(st_tmp))
    js_tmp.write_text(json.dumps({**info, "optimizer": opt_meta}, indent=2, default=str) + "\n")
    os.replace(st_tmp, d / "ckpt.safetensors")
    os.replace(js_tmp, d / "ckpt.json")
    return d / "ckpt.json"


def load_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(model state, optimizer tensors, info) of a checkpoint directory."""
    d = Path(directory)
    tensors = load_file(str(d / "ckpt.safetensors"))
    info = json.loads((d / "ckpt.json").read_text())
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    opt_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    return model_state, opt_tensors, info


def has_checkpoint(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / "ckpt.safetensors").exists() and (d / "ckpt.json").exists()
