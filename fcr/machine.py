"""This machine in words, without importing torch: CPU model and count, platform, package versions
(read from the installed distributions' metadata)."""

from __future__ import annotations

import os
import platform
from importlib import metadata

__all__ = ["cpu_model", "machine_summary", "package_version"]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str:
    """The installed version of distribution ``name`` ("not installed" when absent)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_summary() -> str:
    """One line: CPU model, CPU count, torch and diffusers versions, platform."""
    return (f"{cpu_model()}, {os.cpu_count()} CPUs, torch {package_version('torch')}, "
            f"diffusers {package_version('diffusers')}, {platform.platform()}")
