"""The run folder, and the only code that builds a path inside one: its layout, the typed record (RunRecord ↔
meddiff.json), the weights folders, checkpoints and their verification, the training log.

```
RUN/meddiff.json            RunRecord: train + model config, class names, data summary, split, hardware, result
RUN/unet/, RUN/scheduler/   the sampling model (EMA weights) in the diffusers layout, safetensors
RUN/model_index.json        so that DDIMPipeline.from_pretrained(RUN, local_files_only=True) loads it
                            (MeddiffPipeline when conditional or patched)
RUN/best/                   the weights with the lowest validation loss
RUN/vae/                    latent runs only: the run's own copy of its autoencoder (diffusers AutoencoderKL,
                            safetensors), its scaling_factor set for this run's latents
RUN/checkpoints/step_N/     model / ema / optimizer .safetensors + state.json (written last: complete)
RUN/log.jsonl               one JSON line per logged step or validation
RUN/skipped.txt             the data files training left out (unreadable or not images), `path: reason` a line
RUN/README.md               the model card (modelcard.py writes it)
```
Nothing is pickled: tensors go to safetensors, everything else to JSON, all through meddiff.atomic. Old
checkpoints are pruned only after a new one is complete; "latest" is the newest complete one, and resume starts
from the newest one that verifies. Loading reads only the run's own files (never the Hugging Face Hub, never a
pickle) and checks them against the record: anything missing, damaged or not matching is a RunError naming the
file.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_folder, no_space_is_an_error, write_json, write_text
from .atomic import remove_temporaries as _remove_temporaries
from .config import WEIGHTS, ModelConfig, TrainConfig, check_value, from_json, to_json
from .diffusion import DIFFUSERS_BETA_SCHEDULE, DIFFUSERS_PREDICTION, betas_for, diffusers_scheduler_config
from .errors import ConfigError, MeddiffError, RunError
from .model import build_unet, unet_config

RECORD_FILE = "meddiff.json"
UNET_DIR, BEST_DIR, SCHEDULER_DIR = "unet", "best", "scheduler"   # also the folder names of a diffusers export
VAE_DIR = "vae"                                                   # an autoencoder folder's and a latent run's
MODEL_INDEX_FILE = "model_index.json"
UNET_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"         # diffusers' name inside unet/ and best/
UNET_CONFIG_FILE = "config.json"
SCHEDULER_CONFIG_FILE = "scheduler_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")       # never loaded: unpickling runs code
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
    stopped: str                     # "max-steps" | "epochs" | "max-minutes" | "early-stopping" | "copies" |
    #                                  "interrupted"

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
    autoencoder: dict[str, Any] = field(default_factory=dict)  # latent runs: factor, channels, scale, AE figures

    def mask_names(self) -> dict[int, str]:
        """The names the training data gave the label values (`builtin:phantoms?masks=…` names them; a folder of
        label images does not): {value: name} for the values the model knows."""
        from .data.dataset import named_values

        known = set(self.model.mask_values) | set(self.model.map_values)
        return {v: n for v, n in named_values(self.data).items() if v in known}

    @property
    def conditional(self) -> bool:
        return self.model.num_classes > 0

    def check_kind(self, run: str | Path, maps: bool = False, flag: str = "--run") -> None:
        """ConfigError naming `flag` unless the run makes what its caller wants: images, or (`maps`) label maps
        (a model trained with --learn maps, which only `meddiff sample --mask-run` samples)."""
        if self.model.makes_maps and not maps:
            raise ConfigError(f"{flag} {run}: a model of label maps (trained with --learn maps), not of images; give "
                              "it to `meddiff sample --mask-run` beside a run that makes images for its maps")
        if maps and not self.model.makes_maps:
            raise ConfigError(f"{flag} {run}: a model of images; {flag} takes a model of label maps (`meddiff train "
                              "--learn maps`)")

    def to_json(self) -> dict[str, Any]:
        out = dict(train=to_json(self.train), model=to_json(self.model), class_names=list(self.class_names),
                   data=self.data, split=self.split, hardware=self.hardware, processes=self.processes,
                   meddiff_version=self.meddiff_version)
        if self.autoencoder:
            out["autoencoder"] = self.autoencoder
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
        _check_types(TrainConfig, data["train"], source, "train")
        _check_types(ModelConfig, data["model"], source, "model")
        names = data["class_names"]
        if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
            raise RunError(f"{source}: class_names is {_show(names)}; expected a list of names")
        try:
            result = data.get("result")
            record = cls(train=from_json(TrainConfig, data["train"]), model=from_json(ModelConfig, data["model"]),
                         class_names=tuple(names), data=dict(data.get("data") or {}),
                         split=dict(data.get("split") or {}), hardware=str(data.get("hardware", "")),
                         processes=int(data.get("processes", 1)),
                         meddiff_version=str(data.get("meddiff_version", "unknown")),
                         result=_result(result) if result else None, autoencoder=dict(data.get("autoencoder") or {}))
        except (TypeError, ValueError, AttributeError, MeddiffError) as err:
            raise RunError(f"{source}: not a valid meddiff run record ({err})") from None
        if record.model.latent != bool(record.autoencoder):
            raise RunError(f"{source}: model.latent_factor {record.model.latent_factor} and the autoencoder section "
                           "disagree; a latent model has both, a pixel model neither")
        if record.conditional and len(record.class_names) != record.model.num_classes:
            raise RunError(f"{source}: {len(record.class_names)} class_names ({', '.join(record.class_names)}) for a "
                           f"model of {record.model.num_classes} classes (model.num_classes); they must match")
        return record


def _show(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a dataclass field's type (int, float, str, bool, None, tuple[X, ...], unions);
    other types are not checked. A bool is not a number here, an int is a float."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, h) for h in args)
    if origin is tuple:
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        return isinstance(value, (list, tuple)) and len(items) == len(value) and all(map(_conforms, value, items))
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint) if hint in (str, bool) else True


def _check_types(cls: type, data: Any, source: Path | str, section: str) -> None:
    """RunError naming the file and the field when `data` (a section of meddiff.json) does not fit `cls`."""
    if not isinstance(data, dict):
        raise RunError(f"{source}: {section} is {_show(data)}; expected a JSON object of {cls.__name__} fields")
    for name, hint in typing.get_type_hints(cls).items():
        if name in data and not _conforms(data[name], hint):
            allowed = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
            raise RunError(f"{source}: {section}.{name} is {_show(data[name])}; expected {allowed}")


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
    with no_space_is_an_error(f"{record_path(run)}", "the previous one is intact"):
        write_json(record_path(run), record.to_json())


def read_json(path: str | Path) -> Any:
    """A JSON file of a run folder, or RunError saying it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: missing; is this a meddiff run folder?") from None
    except (OSError, ValueError) as err:
        raise RunError(f"{path}: unreadable JSON ({err})") from None


def read_json_object(path: str | Path, what: str = "") -> dict[str, Any]:
    """A JSON object (`what` it should hold, for the message) from a run's file, or RunError naming the file."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise RunError(f"{path}: expected a JSON object{f' ({what})' if what else ''}, got {_show(data)}")
    return data


def card_path(run: str | Path) -> Path:
    return Path(run) / CARD_FILE


def write_skipped(run: str | Path, listing: str) -> Path:
    """RUN/skipped.txt: the data files training left out, one `relative/path: reason` a line → its path."""
    return write_text(Path(run) / SKIPPED_FILE, listing)


# ---------------------------------------------------------------- the log

def append_log(run: str | Path, entry: dict[str, Any]) -> None:
    """Append one JSON line to RUN/log.jsonl."""
    with no_space_is_an_error(f"{Path(run) / LOG_FILE}", "the lines before are intact"):
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
    if not folder.is_dir():
        raise RunError(f"{run}: {folder.name}/ is missing; has training finished (or validated, for best)?")
    return folder


def one_line(err: BaseException, limit: int = 300) -> str:
    """A library's (often multi-line) error message as one line for a RunError."""
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + "…"


def load_unet(run: str | Path, weights: str = "ema", record: RunRecord | None = None) -> tuple[UNet2DModel, Path]:
    """(UNet on the CPU, its weights file) for `weights`: ema (unet/), best (best/) or raw (the record's
    architecture with the newest verified checkpoint's non-averaged weights). Only the run's own safetensors
    and JSON files are read; anything missing, damaged or not matching the record is a RunError naming the file."""
    _check_weights(weights, WEIGHTS)
    run = Path(run)
    record = record or read_record(run)
    if weights != "raw":
        return load_unet_folder(weights_folder(run, weights), record.model)
    last = newest_verified_checkpoint(run, need_weights=("model",))
    if last is None:
        raise RunError(f"--run {run}: no complete checkpoint for --weights raw")
    unet = _build(record.model, record_path(run))
    _load_weights(unet, last.weights["model"], last.folder / "model.safetensors")
    return unet.eval(), last.folder / "model.safetensors"


def load_unet_folder(folder: str | Path, model: ModelConfig | None = None) -> tuple[UNet2DModel, Path]:
    """A diffusers UNet folder (config.json + diffusion_pytorch_model.safetensors) → (UNet on the CPU, weights
    file), from these two local files only: nothing is fetched, no pickle is opened. With `model` (a run's
    record) config.json must describe that architecture; the weights must fit it. RunError naming the file."""
    return _load_diffusers_folder(folder, UNet2DModel, "a UNet2DModel config",
                                  unet_config(model) if model is not None else {},
                                  "is this a meddiff run or an exported pipeline folder?")


def load_vae_folder(folder: str | Path, expect: dict[str, Any] | None = None) -> tuple[AutoencoderKL, Path]:
    """A diffusers AutoencoderKL folder (an autoencoder folder's or a latent run's vae/) → (autoencoder on the CPU,
    weights file), read as `load_unet_folder` reads a UNet; one image channel in and out, and `expect` (e.g. a
    run's latent channels) must hold. RunError naming the file."""
    return _load_diffusers_folder(folder, AutoencoderKL, "an AutoencoderKL config",
                                  {"in_channels": 1, "out_channels": 1, **(expect or {})},
                                  "is this a meddiff autoencoder folder (meddiff train-autoencoder)?")


def _load_diffusers_folder(folder: str | Path, cls: type, what: str, expect: dict[str, Any],
                           hint: str) -> tuple[Any, Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise RunError(f"{folder}: missing; {hint}")
    config_path = folder / UNET_CONFIG_FILE
    config = read_json_object(config_path, what)
    for key, want in expect.items():
        got = config.get(key)
        if (tuple(got) if isinstance(got, list) else got) != want:
            wanted = (f"the run's {RECORD_FILE} describes a model with {key} {_show(want)}" if cls is UNet2DModel
                      else f"expected {_show(want)}")
            raise RunError(f"{config_path}: {key} is {_show(got)}; {wanted}")
    weights = folder / UNET_WEIGHTS_FILE
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise RunError(f"{folder / pickles[0]}: a pickle, which can run code when loaded; meddiff loads only "
                           f"{UNET_WEIGHTS_FILE} (safetensors)")
        raise RunError(f"{weights}: missing; has training finished?")
    try:
        model = cls.from_config(config)
    except Exception as err:  # noqa: BLE001  diffusers raises many kinds on a config it cannot build
        raise RunError(f"{config_path}: not {what} this diffusers can build ({one_line(err)})") from None
    _load_weights(model, _read_safetensors(weights, "weights"), weights)
    return model.eval(), weights


def save_vae_folder(folder: str | Path, vae: torch.nn.Module) -> None:
    """Write an autoencoder as a diffusers folder (config.json + safetensors), whole or not at all."""
    folder = Path(folder)
    with no_space_is_an_error(f"{folder}", f"the previous {folder.name}/ is intact"), atomic_folder(folder) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)


def load_run_vae(run: str | Path, model: ModelConfig) -> tuple[AutoencoderKL, Path]:
    """A latent run's own autoencoder (RUN/vae/), checked against the record: its latent channels are the UNet's."""
    vae, path = load_vae_folder(Path(run) / VAE_DIR, {"latent_channels": model.in_channels})
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if factor != model.latent_factor:
        raise RunError(f"{Path(run) / VAE_DIR / UNET_CONFIG_FILE}: an autoencoder of factor {factor}; the run's "
                       f"{RECORD_FILE} trained on latents {model.latent_factor}x smaller than its images")
    return vae, path


def _build(model: ModelConfig, source: Path) -> UNet2DModel:
    try:
        return build_unet(model)
    except Exception as err:  # noqa: BLE001  an edited record can describe a model diffusers cannot build
        raise RunError(f"{source}: its model cannot be built ({one_line(err)})") from None


def _read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise RunError(f"{path}: unreadable {what} ({one_line(err)})") from None


def _load_weights(unet: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Every tensor of the module from `tensors`, exactly (same names, same shapes), or RunError naming `path`."""
    try:
        unet.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()]
        raise RunError(f"{path}: the weights do not fit the model ({lines[0] if lines else one_line(err)})") from None


def scheduler_config(run: str | Path, record: RunRecord | None = None) -> dict[str, Any]:
    """The run's noise schedule as a diffusers scheduler config (RUN/scheduler/), checked against its record. A
    latent run's x_0 is never clipped to [-1, 1], whatever its folder says (runs saved before this rule wrote
    clip_sample true for latents too: `diffusion.diffusers_scheduler_config`)."""
    run = Path(run)
    record = record or read_record(run)
    config = read_scheduler_config(run / SCHEDULER_DIR, record.train)
    return {**config, "clip_sample": False} if record.model.latent else config


def _check_schedule(config: dict[str, Any], path: Path, t: TrainConfig) -> None:
    """The schedule in a scheduler config is the one the record says the model was trained with."""
    try:
        want = dict(num_train_timesteps=t.num_train_timesteps,
                    beta_schedule=DIFFUSERS_BETA_SCHEDULE[t.beta_schedule] if t.beta_schedule else None,
                    prediction_type=DIFFUSERS_PREDICTION[t.objective] if t.objective else None)
    except KeyError as err:
        raise RunError(f"{path.parent.parent / RECORD_FILE}: unknown schedule or objective {err}") from None
    for key, value in want.items():
        if value is not None and config.get(key) != value:
            raise RunError(f"{path}: {key} is {_show(config.get(key))}; the run's {RECORD_FILE} trained with "
                           f"{_show(value)}")
    betas = config.get("trained_betas")
    if t.beta_schedule and t.num_train_timesteps and (betas is not None or t.shift not in (0.0, (0.0, 0.0))):
        want_betas = betas_for(t.beta_schedule, t.num_train_timesteps, t.shift)
        try:
            same = betas is not None and torch.allclose(torch.tensor(betas, dtype=torch.float64), want_betas,
                                                        rtol=1e-5, atol=1e-9)
        except (TypeError, ValueError, RuntimeError):
            same = False
        if not same:
            raise RunError(f"{path}: trained_betas are not the schedule the run's {RECORD_FILE} trained with "
                           f"({t.beta_schedule}, log-SNR shift {t.shift})")


def read_scheduler_config(folder: str | Path, train: TrainConfig | None = None) -> dict[str, Any]:
    """A diffusers scheduler folder's scheduler_config.json → the config, read locally; with `train` (a run's
    record) its schedule must be the one the model was trained with. RunError naming the file."""
    path = Path(folder) / SCHEDULER_CONFIG_FILE
    if not path.parent.is_dir():
        raise RunError(f"{path.parent}: missing; is this a meddiff run or an exported pipeline folder?")
    config = read_json_object(path, "a scheduler config")
    if train is not None:
        _check_schedule(config, path, train)
    for name, param in inspect.signature(DDPMScheduler.__init__).parameters.items():
        if name in config and type(param.default) in (bool, int, float, str):
            hint = float if type(param.default) is float else type(param.default)
            if not _conforms(config[name], hint):
                raise RunError(f"{path}: {name} is {_show(config[name])}; expected {hint.__name__}")
    try:
        DDPMScheduler.from_config(config).set_timesteps(min(10, int(config.get("num_train_timesteps", 10))))
    except Exception as err:  # noqa: BLE001  diffusers raises many kinds on a config it cannot use
        raise RunError(f"{path}: not a scheduler config diffusers can use ({one_line(err)})") from None
    return dict(config)


def model_index(model: ModelConfig, class_names: tuple[str, ...] | list[str]) -> tuple[str, dict[str, Any]]:
    """(pipeline class, model_index.json) for a model config: a plain DDIMPipeline for unconditional models
    without patches, else meddiff.pipeline.MeddiffPipeline (which knows class names and patches)."""
    index: dict[str, Any] = {"_diffusers_version": diffusers.__version__,
                             "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    if not model.num_classes and model.patch_size == 1 and not model.latent and not model.cond_channels:
        return "DDIMPipeline", {"_class_name": "DDIMPipeline", **index}
    if model.latent:
        index["vae"] = ["diffusers", "AutoencoderKL"]
    return "MeddiffPipeline", {"_class_name": "MeddiffPipeline", **index,
                               "class_names": list(class_names) if model.num_classes else [],
                               "patch_size": model.patch_size, "mask_values": list(model.mask_values)}


def save_model_folder(run: str | Path, unet: torch.nn.Module, record: RunRecord, weights: str = "ema") -> None:
    """Write `unet` as the `weights` folder (ema → unet/, best → best/) with scheduler/ and model_index.json: the
    diffusers layout that DDIMPipeline.from_pretrained loads (MeddiffPipeline for class-conditional or patched
    models)."""
    run = Path(run)
    folder = weights_file(run, weights).parent
    with no_space_is_an_error(f"{folder}", f"the previous {folder.name}/ is intact"), atomic_folder(folder) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
    t = record.train
    sched = DDPMScheduler(**diffusers_scheduler_config(t.beta_schedule, t.num_train_timesteps, t.objective,
                                                      t.zero_terminal_snr, t.timestep_spacing, t.shift,
                                                      record.model.latent))
    with no_space_is_an_error(f"{run / SCHEDULER_DIR}", "the previous files are intact"):
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
    complete checkpoints (never those named in `protect`). A full disk is an OutputError; the checkpoints
    already there are left exactly as they were."""
    target = checkpoint_folder(run, step)
    with no_space_is_an_error(f"checkpoint {target}", "the previous checkpoint is intact"):
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


def load_checkpoint(folder: str | Path, need_weights: tuple[str, ...] = (),
                    need_state: tuple[str, ...] = ()) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """({name: tensors} for every .safetensors file, state dict) of one checkpoint folder; RunError naming the
    file when one is missing or damaged, a weights file in `need_weights` is absent or state.json lacks a key
    of `need_state`."""
    folder = Path(folder)
    path = folder / STATE_FILE
    state = read_json_object(path)
    missing = [k for k in need_state if k not in state]
    if missing:
        raise RunError(f"{path}: no {', '.join(missing)}")
    weights = {p.stem: _read_safetensors(p, "checkpoint weights") for p in sorted(folder.glob("*.safetensors"))}
    absent = [n for n in need_weights if n not in weights]
    if absent:
        raise RunError(f"{folder / (absent[0] + '.safetensors')}: missing")
    return weights, state


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint that verified: its folder, tensors and state, and the newer ones skipped as damaged."""

    folder: Path
    weights: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]
    damaged: tuple[str, ...] = ()     # "step_00000008 is damaged (model.safetensors: …)", newest first


def newest_verified_checkpoint(run: str | Path, need_weights: tuple[str, ...] = (),
                               need_state: tuple[str, ...] = ()) -> Checkpoint | None:
    """The newest complete checkpoint whose files all load, with the weights `need_weights` and the state keys
    `need_state`; newer ones that do not verify are named in its `damaged`. None when there is no complete
    checkpoint; RunError naming each when there are some and none verifies."""
    damaged = []
    for folder in reversed(complete_checkpoints(run)):
        try:
            weights, state = load_checkpoint(folder, need_weights, need_state)
        except RunError as err:
            damaged.append(f"{folder.name} is damaged ({str(err).replace(str(folder) + '/', '')})")
            continue
        return Checkpoint(folder, weights, state, tuple(damaged))
    if damaged:
        raise RunError(f"{run}: no checkpoint can be resumed from: {'; '.join(damaged)}")
    return None


# ---------------------------------------------------------------- what an interrupted or failed run leaves

def remove_temporaries(run: str | Path) -> list[Path]:
    """Remove the temporary folders and files (`.best.123.ab12.tmp`, `.unet.….old`) that a killed save left in
    the run folder and its checkpoints/ → what was removed. Only at the start of training, the run's one writer."""
    run = Path(run)
    return _remove_temporaries(run) + _remove_temporaries(run / CKPT_DIR)


def discard_unsaved_run(run: str | Path, created: bool) -> None:
    """After training failed before its first complete checkpoint: remove what it wrote (the whole folder when it
    `created` it), so that the next attempt with the same --out is not refused as "already holds a meddiff run".
    A run with a complete checkpoint is kept: it can be resumed."""
    run = Path(run)
    if not run.is_dir() or complete_checkpoints(run):
        return
    if created:
        shutil.rmtree(run, ignore_errors=True)
        return
    for name in (RECORD_FILE, LOG_FILE, SKIPPED_FILE, CARD_FILE, MODEL_INDEX_FILE):
        (run / name).unlink(missing_ok=True)
    for name in (UNET_DIR, BEST_DIR, SCHEDULER_DIR, CKPT_DIR, VAE_DIR):
        shutil.rmtree(run / name, ignore_errors=True)
    remove_temporaries(run)
