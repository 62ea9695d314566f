"""The benches' arithmetic: percentiles and matching commits to receipts."""

from __future__ import annotations

from subsys.bench.single import _match_latencies
from subsys.bench.support import percentile, summarize_ms


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert summarize_ms([0.001, 0.002, 0.003])["median_ms"] == 2.0


def test_match_latencies_coalesced_and_lost() -> None:
    commits = [(1, 10.0), (2, 10.05), (3, 10.2), (4, 11.0)]
    receipts = [(9.0, 0, "snapshot"), (10.1, 2, "diff"), (10.3, 3, "diff")]
    latencies, coalesced, lost = _match_latencies(commits, receipts)
    assert [round(x, 3) for x in latencies] == [0.1, 0.05, 0.1]
    assert coalesced == 1  # value 1 arrived with value 2
    assert lost == 1  # value 4 never arrived
