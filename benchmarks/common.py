"""Shared by the benchmark scripts: machine description, statistics, result files."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import numpy as np


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise SystemExit(f"error: size {text!r} is not like 4K, 16M, 1G")
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]


def stats(values) -> tuple[float, float]:
    """mean and 1.96 x sample sd (Horovod's synthetic benchmarks report it this way)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(1.96 * v.std(ddof=1)) if len(v) > 1 else 0.0


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def machine_info() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    try:
        mpi = subprocess.run(["mpirun", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        mpi = None
    info = {"hostname": platform.node(), "cpu_model": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "mpi": mpi, "torch": _version("torch"), "horovod": _version("horovod"), "mpi4py": _version("mpi4py"),
            "numpy": np.__version__, "gpu": None}
    try:
        import torch
        if torch.cuda.is_available():
            info["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return info


def save_results(name: str, result: dict, out_dir: str, tag: str = "", plot=None) -> Path:
    """benchmarks/results/<machine>-<date>-<name>.json (+ .png when `plot` is given)."""
    info = machine_info()
    machine = tag or f"{info['cores']}core-{'gpu' if info['gpu'] else 'cpu'}"
    stem = f"{machine}-{dt.date.today().isoformat()}-{name}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": info, **result}
    path = out / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}", flush=True)
    if plot:
        plot(result, out / f"{stem}.png")
        print(f"wrote {out / f'{stem}.png'}", flush=True)
    return path
