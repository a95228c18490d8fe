"""The hardware a run lands on: device choice, the precision it supports, the CPU threads the load leaves, a
one-line description for logs, and the progress bar that long loops (training, sampling) show on the terminal."""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as td
from tqdm.auto import tqdm

from .errors import ConfigError


def cpu_model() -> str:
    """The CPU's marketing name, from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX or AVX512-BF16; on AVX2-only CPUs bf16 autocast is ~65x slower than fp32."""
    capability = torch.backends.cpu.get_cpu_capability().upper()
    if "AMX" in capability or "BF16" in capability:
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_device(name: str = "auto") -> torch.device:
    """`auto` → CUDA when available, else CPU; `cuda` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None


def pick_precision(name: str, device: torch.device) -> str:
    """`auto` → bf16 on CUDA with bf16 support or a CPU with AMX/AVX512-BF16, fp16 on older GPUs, else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16: only on CUDA; on CPU use bf16 (with AMX) or fp32")
    return name


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for a precision; fp32 is a no-op."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def threads_for_load(usable_cpus: int, others_load: float, total_cpus: int | None = None,
                     most: int | None = None) -> int:
    """Torch threads for this process: the CPUs it may use minus those other processes keep busy, at least 1 and
    at most `most` (torch's own default: one a physical core). `others_load` is the run queue of everything else
    on all `total_cpus` CPUs (default: `usable_cpus`), taken as spread evenly over them. Why: torch's threads wait
    for each other at every operation, so one thread sharing its core with another process stalls the rest; on
    2 cores with one taken, 2 threads trained ~10x slower than 1 (issue 19)."""
    total = max(total_cpus or usable_cpus, usable_cpus)
    busy = max(others_load, 0.0) * usable_cpus / total  # the share of the others' load on this process's CPUs
    threads = max(1, usable_cpus - int(busy + 0.5))
    return max(1, min(threads, most)) if most else threads


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: taskset, cgroups, torchrun), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def others_load(loadavg: str | None = None) -> float:
    """How many runnable tasks other processes keep: the smaller of the 1-minute load average and the run queue
    right now less this process (/proc/loadavg's "running/total" field). The smaller, because the average lags a
    minute behind (a run that just ended still counts) and the snapshot catches short-lived tasks."""
    if loadavg is None:
        try:
            loadavg = Path("/proc/loadavg").read_text()
        except OSError:
            try:
                return os.getloadavg()[0]
            except (AttributeError, OSError):  # Windows: no load average, assume a quiet machine
                return 0.0
    fields = loadavg.split()
    load1, running = float(fields[0]), int(fields[3].split("/")[0])
    return max(0.0, min(load1, running - 1.0))


def threads_from_load() -> int:
    """threads_for_load on this machine's CPUs and load, capped at torch's current thread count."""
    return threads_for_load(usable_cpus(), others_load(), os.cpu_count(), torch.get_num_threads())


def describe(device: torch.device, precision: str) -> str:
    """E.g. 'cpu (AMD EPYC, AVX2, 1 of 2 CPUs), fp32' — printed by every command and benchmark."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        bf16 = ", bf16 hardware" if cpu_has_fast_bf16() else ""  # AMX / AVX512-BF16: the kernels' ISA name omits it
        threads, cpus = torch.get_num_threads(), usable_cpus()
        name = (f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()}{bf16}, "
                + (f"{threads} threads" if threads >= cpus else f"{threads} thread{'s' * (threads > 1)} of {cpus} CPUs"))
    return f"{device.type} ({name}), {precision}"


def available_memory(device: torch.device) -> int:
    """Bytes free for this process on the device: CUDA's free memory, or MemAvailable from /proc/meminfo."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30  # unknown platform: assume 4 GiB


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a multi-process run (torchrun): rank 0 of 1 for a plain run.

    `rank` numbers the processes 0 … `world` - 1 across machines; `local_rank` is the rank on this machine, which
    picks its GPU."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(dist: Dist, device_name: str = "auto", timeout_s: float = 120.0) -> torch.device:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU) and return this rank's device.
    The timeout bounds every collective, so a lost peer ends the run with an error instead of a hang."""
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not td.is_initialized():
        td.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=dist.rank, world_size=dist.world,
                              timeout=datetime.timedelta(seconds=timeout_s))
    return device


def progress_bar(enabled: bool, total: int | None, initial: int, unit: str) -> Any:
    """A tqdm bar counting `unit`s from `initial` to `total` (None: open-ended), or None when disabled."""
    if not enabled:
        return None
    return tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True)
