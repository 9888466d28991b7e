"""`liqmon bench`: the performance figures of SPEC §9, each beside a naive baseline measured in
the same run.

The workload (`monitor.benchdata`): a 50-instrument config with Binance-style tiers, N accounts
with about three positions each, and a mixed stream of 20 % ticks, 70 % fills and 10 % ledger
entries. The naive baseline is `monitor.reference.ReferenceEngine`: plain Python, every account a
record can move re-valued from scratch after every record.

Phases: engine only (records/s, and the events of both engines compared on the common prefix);
one tick on BTC-PERP (held by one account in ten), typical and with every holder re-valued;
resident memory per account (each engine loaded in a subprocess of its own); end to end through
the embedded broker (the service's `Monitor` in a subprocess: sustained records/s on a backlog,
then tick-to-event latency at half that rate); restore of every account from `liqmon.state`;
`liqmon stress` over a 61-scenario grid; tick-to-event latency while `liqmon run` writes a
checkpoint of every account (up to 100,000), beside before and after it.
"""

from monitor.bench.report import Figure, Plan, render
from monitor.bench.runner import run

__all__ = ["Figure", "Plan", "render", "run"]
