"""`python -m monitor.bench --worker SPEC`: the subprocesses of `liqmon bench` (a memory probe,
a start-to-ready probe, or the service under measurement)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from monitor.bench.end_to_end import service_worker
from monitor.bench.engine import memory_probe
from monitor.bench.restore import start_probe


def main_worker(raw: str) -> int:
    spec = json.loads(raw)
    if spec["mode"] == "memory":
        print(json.dumps(memory_probe(spec)))
        return 0
    if spec["mode"] == "start":
        print(json.dumps(asyncio.run(start_probe(spec))))
        return 0
    asyncio.run(service_worker(spec))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m monitor.bench")
    parser.add_argument("--worker", required=True, help=argparse.SUPPRESS)
    sys.exit(main_worker(parser.parse_args().worker))
