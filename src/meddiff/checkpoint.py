"""Run-folder persistence: atomic folders, safetensors weights, optimizer state, exact-resume checkpoints.

Nothing is pickled: tensors go to safetensors, everything else to JSON. A checkpoint folder is written
under a temporary name, fsynced and renamed; `state.json` is its last file, so a folder without it is
incomplete and ignored. Old checkpoints are pruned only after a new one is complete.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_folder, write_json  # noqa: F401  (re-exported until runfolder.py)
from .errors import RunError

CKPT_DIR = "checkpoints"
STATE_FILE = "state.json"


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: missing; is this a meddiff run folder?") from None
    except (OSError, ValueError) as err:
        raise RunError(f"{path}: unreadable JSON ({err})") from None


def state_dict_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of a module's tensors (safetensors refuses shared or strided storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state as flat tensors ('state.<param>.<name>') plus JSON-safe param groups."""
    sd = opt.state_dict()
    tensors = {f"state.{pid}.{name}": v.detach().cpu().contiguous().clone()
               for pid, st in sd["state"].items() for name, v in st.items() if torch.is_tensor(v)}
    scalars = {f"{pid}.{name}": v for pid, st in sd["state"].items() for name, v in st.items() if not torch.is_tensor(v)}
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run: Path, step: int, weights: dict[str, dict[str, torch.Tensor]], state: dict[str, Any],
                    keep: int = 2, protect: tuple[str, ...] = ()) -> Path:
    """Write run/checkpoints/step_XXXXXXXX/{<name>.safetensors…, state.json} atomically, then prune to `keep`
    complete checkpoints (never those named in `protect`)."""
    target = Path(run) / CKPT_DIR / f"step_{step:08d}"
    with atomic_folder(target) as tmp:
        for name, tensors in weights.items():
            save_file(tensors, str(tmp / f"{name}.safetensors"))
        write_json(tmp / STATE_FILE, state)
    complete = complete_checkpoints(run)
    for old in complete[:-keep] if keep > 0 else []:
        if old.name not in protect and old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def complete_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    folder = Path(run) / CKPT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("step_") and (p / STATE_FILE).is_file())


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    done = complete_checkpoints(run)
    return done[-1] if done else None


def load_checkpoint(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """({name: tensors} for every .safetensors file, state dict) of one checkpoint folder."""
    folder = Path(folder)
    state = read_json(folder / STATE_FILE)
    weights = {p.stem: load_file(str(p)) for p in sorted(folder.glob("*.safetensors"))}
    return weights, state


def model_index(model: dict[str, Any], class_names: list[str]) -> tuple[str, dict[str, Any]]:
    """(pipeline class, model_index.json) for a model config: a plain DDIMPipeline for unconditional models
    without patches, else meddiff.pipeline.MeddiffPipeline (which knows class names and patches)."""
    import diffusers

    index: dict[str, Any] = {"_diffusers_version": diffusers.__version__,
                             "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    if not model.get("num_classes") and model.get("patch_size", 1) == 1:
        return "DDIMPipeline", {"_class_name": "DDIMPipeline", **index}
    return "MeddiffPipeline", {"_class_name": "MeddiffPipeline", **index,
                               "class_names": list(class_names) if model.get("num_classes") else [],
                               "patch_size": model.get("patch_size", 1)}
