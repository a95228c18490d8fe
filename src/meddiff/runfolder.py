"""The run folder, and the only code that builds a path inside one: its layout, the typed record (RunRecord ↔
meddiff.json), the weights folders, checkpoints and their verification, the training log.

```
RUN/meddiff.json            RunRecord: train + model config, class names, data summary, split, hardware, result
RUN/unet/, RUN/scheduler/   the sampling model (EMA weights) in the diffusers layout, safetensors
RUN/model_index.json        so that DDIMPipeline.from_pretrained(RUN) loads it (MeddiffPipeline when conditional
                            or patched)
RUN/best/                   the weights with the lowest validation loss
RUN/checkpoints/step_N/     model / ema / optimizer .safetensors + state.json (written last: complete)
RUN/log.jsonl               one JSON line per logged step or validation
RUN/skipped.txt             the data files training left out (unreadable or not images), `path: reason` a line
RUN/README.md               the model card (modelcard.py writes it)
```
Nothing is pickled: tensors go to safetensors, everything else to JSON, all through meddiff.atomic. Old
checkpoints are pruned only after a new one is complete; "latest" is the newest complete one.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_folder, write_json, write_text
from .config import WEIGHTS, ModelConfig, TrainConfig, check_value, from_json, to_json
from .diffusion import diffusers_scheduler_config
from .errors import MeddiffError, RunError

RECORD_FILE = "meddiff.json"
UNET_DIR, BEST_DIR, SCHEDULER_DIR = "unet", "best", "scheduler"   # also the folder names of a diffusers export
MODEL_INDEX_FILE = "model_index.json"
UNET_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"         # diffusers' name inside unet/ and best/
CARD_FILE = "README.md"
LOG_FILE = "log.jsonl"
SKIPPED_FILE = "skipped.txt"     # the data files left out, `relative/path: reason` per line
CKPT_DIR = "checkpoints"
STATE_FILE = "state.json"
_FOLDERS = {"ema": UNET_DIR, "best": BEST_DIR}


# ---------------------------------------------------------------- the record

@dataclass(frozen=True)
class TrainResult:
    """What a training run reached; stored as the record's `result` once training ends."""

    run: Path
    steps: int
    images_seen: int
    seconds: float
    train_img_per_s: float
    final_loss: float
    best_val_loss: float | None
    peak_rss_mib: float | None
    stopped: str                     # "max-steps" | "epochs" | "max-minutes" | "early-stopping" | "interrupted"

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class RunRecord:
    """meddiff.json: what resume, sampling, the pipeline, the model card and the web page know about a run.
    `data` is the data set's summary (counts per class and format, sizes; never a file name), `split` the images
    used for training and held out. Only train, model and class_names are required when reading."""

    train: TrainConfig
    model: ModelConfig
    class_names: tuple[str, ...]
    data: dict[str, Any] = field(default_factory=dict)
    split: dict[str, int] = field(default_factory=dict)
    hardware: str = ""
    processes: int = 1
    meddiff_version: str = "unknown"
    result: TrainResult | None = None

    @property
    def conditional(self) -> bool:
        return self.model.num_classes > 0

    def to_json(self) -> dict[str, Any]:
        out = dict(train=to_json(self.train), model=to_json(self.model), class_names=list(self.class_names),
                   data=self.data, split=self.split, hardware=self.hardware, processes=self.processes,
                   meddiff_version=self.meddiff_version)
        if self.result is not None:
            out["result"] = self.result.to_json()
        return out

    @classmethod
    def from_json(cls, data: Any, source: Path | str) -> "RunRecord":
        """A dict read from `source` → the record, or RunError naming the file and the field that is wrong."""
        if not isinstance(data, dict):
            raise RunError(f"{source}: expected a JSON object (a meddiff run record), got {type(data).__name__}")
        missing = [k for k in ("train", "model", "class_names") if k not in data]
        if missing:
            raise RunError(f"{source}: no {', '.join(missing)}; is this a meddiff run record?")
        try:
            result = data.get("result")
            return cls(train=from_json(TrainConfig, data["train"]), model=from_json(ModelConfig, data["model"]),
                       class_names=tuple(str(c) for c in data["class_names"]), data=dict(data.get("data") or {}),
                       split=dict(data.get("split") or {}), hardware=str(data.get("hardware", "")),
                       processes=int(data.get("processes", 1)),
                       meddiff_version=str(data.get("meddiff_version", "unknown")),
                       result=_result(result) if result else None)
        except (TypeError, ValueError, AttributeError, MeddiffError) as err:
            raise RunError(f"{source}: not a valid meddiff run record ({err})") from None


def _result(data: dict[str, Any]) -> TrainResult:
    result = from_json(TrainResult, data)
    return dataclasses.replace(result, run=Path(result.run))


def record_path(run: str | Path) -> Path:
    return Path(run) / RECORD_FILE


def has_record(run: str | Path) -> bool:
    """Whether `run` holds a meddiff run (its meddiff.json)."""
    return record_path(run).exists()


def read_record(run: str | Path) -> RunRecord:
    path = record_path(run)
    return RunRecord.from_json(read_json(path), path)


def write_record(run: str | Path, record: RunRecord) -> None:
    write_json(record_path(run), record.to_json())


def read_json(path: str | Path) -> Any:
    """A JSON file of a run folder, or RunError saying it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: missing; is this a meddiff run folder?") from None
    except (OSError, ValueError) as err:
        raise RunError(f"{path}: unreadable JSON ({err})") from None


def card_path(run: str | Path) -> Path:
    return Path(run) / CARD_FILE


def write_skipped(run: str | Path, listing: str) -> Path:
    """RUN/skipped.txt: the data files training left out, one `relative/path: reason` a line → its path."""
    return write_text(Path(run) / SKIPPED_FILE, listing)


# ---------------------------------------------------------------- the log

def append_log(run: str | Path, entry: dict[str, Any]) -> None:
    """Append one JSON line to RUN/log.jsonl."""
    with open(Path(run) / LOG_FILE, "a") as f:
        f.write(json.dumps(entry) + "\n")


def read_log(run: str | Path) -> list[dict[str, Any]]:
    """The lines of RUN/log.jsonl, oldest first; a line cut off by an interrupted run is skipped."""
    path = Path(run) / LOG_FILE
    if not path.is_file():
        raise RunError(f"--run {run}: no {LOG_FILE}; expected a run folder written by meddiff train")
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


# ---------------------------------------------------------------- the model: weights folders, scheduler

def _check_weights(weights: str, allowed: tuple[str, ...]) -> None:
    check_value("--weights", weights, choices=allowed)


def weights_file(run: str | Path, weights: str = "ema") -> Path:
    """Where the safetensors file of `weights` (ema, best) lies, whether or not it is there yet."""
    _check_weights(weights, tuple(_FOLDERS))
    return Path(run) / _FOLDERS[weights] / UNET_WEIGHTS_FILE


def weights_folder(run: str | Path, weights: str = "ema") -> Path:
    """The diffusers folder of `weights`: ema → unet/, best → best/; RunError when training has not written it."""
    folder = weights_file(run, weights).parent
    if not (folder / "config.json").is_file():
        raise RunError(f"{run}: {folder.name}/ is missing; has training finished (or validated, for best)?")
    return folder


def load_unet(run: str | Path, weights: str = "ema") -> tuple[UNet2DModel, Path]:
    """(UNet on the CPU, its weights file) for `weights`: ema (unet/), best (best/) or raw (unet/'s architecture
    with the last complete checkpoint's non-averaged weights)."""
    _check_weights(weights, WEIGHTS)
    run = Path(run)
    if weights != "raw":
        folder = weights_folder(run, weights)
        return UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False), folder / UNET_WEIGHTS_FILE
    last = latest_checkpoint(run)
    if last is None:
        raise RunError(f"--run {run}: no complete checkpoint for --weights raw")
    unet = UNet2DModel.from_pretrained(run / UNET_DIR, low_cpu_mem_usage=False)
    unet.load_state_dict(load_checkpoint(last)[0]["model"])
    return unet, last / "model.safetensors"


def scheduler_config(run: str | Path) -> dict[str, Any]:
    """The run's noise schedule as a diffusers scheduler config (RUN/scheduler/)."""
    return dict(DDPMScheduler.load_config(Path(run) / SCHEDULER_DIR))


def model_index(model: ModelConfig, class_names: tuple[str, ...] | list[str]) -> tuple[str, dict[str, Any]]:
    """(pipeline class, model_index.json) for a model config: a plain DDIMPipeline for unconditional models
    without patches, else meddiff.pipeline.MeddiffPipeline (which knows class names and patches)."""
    index: dict[str, Any] = {"_diffusers_version": diffusers.__version__,
                             "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    if not model.num_classes and model.patch_size == 1:
        return "DDIMPipeline", {"_class_name": "DDIMPipeline", **index}
    return "MeddiffPipeline", {"_class_name": "MeddiffPipeline", **index,
                               "class_names": list(class_names) if model.num_classes else [],
                               "patch_size": model.patch_size}


def save_model_folder(run: str | Path, unet: torch.nn.Module, record: RunRecord, weights: str = "ema") -> None:
    """Write `unet` as the `weights` folder (ema → unet/, best → best/) with scheduler/ and model_index.json: the
    diffusers layout that DDIMPipeline.from_pretrained loads (MeddiffPipeline for class-conditional or patched
    models)."""
    run = Path(run)
    with atomic_folder(weights_file(run, weights).parent) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
    t = record.train
    sched = DDPMScheduler(**diffusers_scheduler_config(t.beta_schedule, t.num_train_timesteps, t.objective,
                                                      t.zero_terminal_snr, t.timestep_spacing))
    with atomic_folder(run / SCHEDULER_DIR) as tmp:
        sched.save_pretrained(tmp)
    write_json(run / MODEL_INDEX_FILE, model_index(record.model, record.class_names)[1])


# ---------------------------------------------------------------- checkpoints

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


def checkpoint_folder(run: str | Path, step: int) -> Path:
    """RUN/checkpoints/step_XXXXXXXX, complete or not."""
    return Path(run) / CKPT_DIR / f"step_{step:08d}"


def save_checkpoint(run: str | Path, step: int, weights: dict[str, dict[str, torch.Tensor]], state: dict[str, Any],
                    keep: int = 2, protect: tuple[str, ...] = ()) -> Path:
    """Write run/checkpoints/step_XXXXXXXX/{<name>.safetensors…, state.json} atomically, then prune to `keep`
    complete checkpoints (never those named in `protect`)."""
    target = checkpoint_folder(run, step)
    with atomic_folder(target) as tmp:
        for name, tensors in weights.items():
            save_file(tensors, str(tmp / f"{name}.safetensors"))
        write_json(tmp / STATE_FILE, state)
    complete = complete_checkpoints(run)
    for old in complete[:-keep] if keep > 0 else []:
        if old.name not in protect and old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def complete_checkpoints(run: str | Path) -> list[Path]:
    """Complete checkpoint folders (those holding state.json, their last file), oldest first."""
    folder = Path(run) / CKPT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("step_") and (p / STATE_FILE).is_file())


def latest_checkpoint(run: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    done = complete_checkpoints(run)
    return done[-1] if done else None


def load_checkpoint(folder: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """({name: tensors} for every .safetensors file, state dict) of one checkpoint folder; RunError when a file
    is missing or damaged."""
    folder = Path(folder)
    state = read_json(folder / STATE_FILE)
    weights = {}
    for p in sorted(folder.glob("*.safetensors")):
        try:
            weights[p.stem] = load_file(str(p))
        except (OSError, SafetensorError) as err:
            raise RunError(f"{p}: unreadable checkpoint weights ({err}); resume from an earlier checkpoint") from None
    return weights, state
