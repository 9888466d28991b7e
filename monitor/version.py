"""The installed liqmon's version: `liqmon --version`, and the service's first log line."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def liqmon_version() -> str:
    try:
        return version("liqmon")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"
