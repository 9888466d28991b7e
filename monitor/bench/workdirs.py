"""Where a benchmark phase keeps its broker's and processes' logs.

A run of `liqmon bench` starts five embedded brokers and a dozen processes, each logging to a
file. Kept after every run, they piled up in the temporary directory (66 directories on the
development machine after one day); deleted even when a phase fails, they would take the
reason with them. So a phase's directory goes when the phase ends well, stays when it fails
(the error says where), and always stays under a directory the user names (`--keep-logs DIR`).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def phase_dir(prefix: str, keep_in: Path | None = None) -> Iterator[Path]:
    """A new directory for one phase's logs: made and kept under ``keep_in`` if given, else
    made in the system's temporary directory and removed once the phase ends without an
    error. An error leaving the phase keeps it and gets a note naming it."""
    if keep_in is not None:
        keep_in.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=keep_in))
    try:
        yield path
    except BaseException as exc:
        exc.add_note(f"the phase's logs are kept in {path}")
        raise
    if keep_in is None:
        shutil.rmtree(path, ignore_errors=True)


def add_keep_logs_option(parser: argparse.ArgumentParser) -> None:
    """`--keep-logs DIR` of a standalone diagnostic (`python -m monitor.bench.latency`,
    `.checkpoint`): its logs are what it is run for, so they are kept by default."""
    parser.add_argument("--keep-logs", type=Path, default=Path(tempfile.gettempdir()),
                        metavar="DIR", help="where the run's logs are kept (default: %(default)s)")
