"""Shared benchmark machinery: CLI flags, interleaved timing, peak memory, JSON and figures.

Timing: every configuration is warmed up, then the repeats are interleaved
(round ``r`` runs every configuration once, in an order rotated by ``r``), so
that clock drift, thermal throttling or a noisy neighbour affects all
configurations alike; the median of the repeats is reported.  CUDA work is
synchronised before and after each timed call.

JSON goes through the recipes' atomic ``write_json`` and figures through
their ``save_figure`` (matplotlib optional: "plot skipped" without it).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` around one call
(in-process; the caching allocator's statistics are reset per call).  On
CPU there is no allocator statistic, so each configuration runs in its own
child process and reports its peak resident set size (``ru_maxrss``) and its
resident size just before the call, so configurations cannot inflate each
other's peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Callable

import torch

from recipes.common import resolve_device, save_figure, write_json

__all__ = [
    "parser", "add_threads", "apply_threads", "machine", "resolve_device", "time_interleaved", "summarise", "cuda_peak_memory",
    "child_peak_rss", "cpu_peak_memory", "write_results", "save_figure",
]

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every benchmark's ``--help``: the description as written, and each flag's default appended, except
    ``None``/``False`` ones, whose help says what they mean."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parser(description: str, module: str, full: bool = False, device: bool = True) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the flags every benchmark takes; ``module`` names it in the usage line.

    ``--full`` and ``--device`` only where the benchmark uses them (``full``, ``device``); ``--help`` shows
    every default.
    """
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=description, formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmark-results"), help="directory for the JSON and PNG files")
    if device:
        p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    if full:
        p.add_argument("--full", action="store_true", help="paper-sized run (slow on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the problem's data and of the randomized solvers")
    add_threads(p)
    return p


def add_threads(p: argparse.ArgumentParser, default: int | None = None) -> None:
    """``--threads``, the flag every benchmark takes; ``None`` leaves torch's own choice."""
    p.add_argument("--threads", type=int, default=default,
                   help="torch CPU threads" + (" (default: torch's choice)" if default is None else "")
                        + "; 1 avoids the large slowdowns of oversubscribed cores when other processes share the machine")


def apply_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def machine(device: torch.device) -> dict:
    """Where a result came from: host, CPU, threads, torch version and the accelerator."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each function: ``warmup`` untimed calls each, then ``repeats`` interleaved rounds.

    ``clock`` is wall time by default; ``time.process_time`` (CPU time of this
    process, all threads) is steadier on a CPU shared with other jobs.
    Returns ``{name: [seconds, ...]}`` with ``repeats`` entries per name.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            sync(device)
            start = clock()
            fns[name]()
            sync(device)
            times[name].append(clock() - start)
    return times


def summarise(seconds: list[float]) -> dict:
    return {"seconds_median": median(seconds), "seconds_min": min(seconds), "seconds_all": seconds}


def cuda_peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Peak ``max_memory_allocated`` (bytes) during one call, and the allocation just before it."""
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return {"peak_bytes": torch.cuda.max_memory_allocated(device), "baseline_bytes": before}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def child_peak_rss(fn: Callable[[], object], warmup: Callable[[], object] | None = None) -> None:
    """In a child process: run ``fn`` once and print its peak RSS as one JSON line.

    ``warmup`` (e.g. one forward and backward pass) runs first, so that
    one-time costs every method pays (autograd engine, thread pools, allocator
    arenas) land in ``baseline_bytes``, the resident size just before the
    call.  The kernel's high-water mark is then reset (``/proc/self/clear_refs``,
    Linux ≥ 4.0) so that ``peak_bytes`` (``VmHWM``) is the peak of this call
    alone, not of the imports; ``peak_reset`` says whether that worked.
    Without ``/proc`` (not Linux) the lifetime peak ``ru_maxrss`` is reported
    and ``baseline_bytes`` is 0.
    """
    if warmup is not None:
        warmup()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_bytes("VmRSS")
        fn()
        report = {"peak_bytes": _status_bytes("VmHWM"), "baseline_bytes": before, "peak_reset": True}
    except OSError:
        fn()
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        report = {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "baseline_bytes": 0,
                  "peak_reset": False}
    print(json.dumps(report))


def cpu_peak_memory(module: str, argv: list[str]) -> dict:
    """Run ``python -m module *argv`` (which ends in :func:`child_peak_rss`) and return its report.

    Raises:
        RuntimeError: the child failed; its stderr is included.
    """
    # A fixed mmap threshold makes glibc return every large freed block to the kernel at once
    # (by default the threshold grows after the first free and freed blocks stay resident),
    # so the resident size follows the live tensors and the baseline is not inflated by a warm-up.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17)}
    proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {module} {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_results(out: Path, name: str, data: dict) -> Path:
    """Write ``data`` as ``<out>/<name>.json`` (creating ``out``)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    write_json(path, data)
    print(f"wrote {path}")
    return path
