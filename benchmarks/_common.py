"""What both benchmark scripts share: a description of the machine, medians and markdown tables."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Optional, Sequence

# the project's one Markdown table and one (atomic) JSON writer, for the scripts that import them from here
from nnunet_losses.commands.output import markdown_table, write_json  # noqa: F401


def cpu_model() -> str:
    """The CPU model as ``lscpu`` names it (``/proc/cpuinfo`` or ``platform`` where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> Optional[list[float]]:
    """1, 5 and 15 minute load averages (what ``uptime`` prints); None where the OS has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: str) -> dict:
    """The facts a reader needs to compare timings: CPU/GPU model, cores, load and library versions."""
    import torch

    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": load_average(),
    }
    try:
        from importlib.metadata import version

        info["nnunetv2"] = version("nnunetv2")
    except Exception:  # metadata missing in odd installs: the benchmark still runs
        info["nnunetv2"] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def describe_machine(info: dict) -> str:
    """One line for the console and the README."""
    text = f"{info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads)"
    if info.get("gpu"):
        text += f", GPU {info['gpu']}"
    text += f", torch {info['torch']}, nnunetv2 {info.get('nnunetv2')}"
    if info.get("load_average"):
        text += ", load average " + " / ".join(f"{v:.2f}" for v in info["load_average"])
    return text


def source_version() -> dict:
    """The commit the runs were made at (read-only git calls: no index refresh)."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, env=env, capture_output=True,
                                text=True, check=True).stdout.strip()
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, env=env,
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "uncommitted_changes": None}
    return {"commit": commit, "uncommitted_changes": bool(changes)}


def package_fingerprint() -> str:
    """A hash of the nnunet_losses package's Python source, paths included: what a timing measured, unlike
    the commit, which also moves with a results-only commit."""
    import hashlib

    import nnunet_losses

    root = Path(nnunet_losses.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)

