"""bench/run.py's pure parts: which CPUs each process gets under a placement, and the
per-round ratios and their range in the summary."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

RUN = Path(__file__).resolve().parents[2] / "bench" / "run.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def test_proxy_alone_gives_the_proxy_the_last_cpu_and_everyone_else_the_rest() -> None:
    assert bench.cpus_for("proxy-alone", "proxy", [0, 1]) == {1}
    assert bench.cpus_for("proxy-alone", "loadgen", [0, 1]) == {0}
    assert bench.cpus_for("proxy-alone", "upstream", [3, 0, 2]) == {0, 2}
    assert bench.cpus_for("proxy-alone", "proxy", [3, 0, 2]) == {3}


def test_one_cpu_puts_everyone_together_and_unpinned_pins_nobody() -> None:
    for role in ("proxy", "loadgen", "upstream"):
        assert bench.cpus_for("one-cpu", role, [2, 5]) == {2}
        assert bench.cpus_for("unpinned", role, [2, 5]) is None


def test_a_placement_the_machine_cannot_do_is_a_clear_error() -> None:
    with pytest.raises(bench.BenchError, match="needs two CPUs"):
        bench.cpus_for("proxy-alone", "proxy", [0])
    with pytest.raises(bench.BenchError, match="unknown placement"):
        bench.cpus_for("two-cpus", "proxy", [0, 1])


def run(value: float | None, ok: bool = True) -> dict[str, Any]:
    return {"ok": ok, "cpu_us_per_connection": value}


def test_the_summary_reports_the_median_of_per_round_ratios_and_their_range() -> None:
    runs = {
        "proxy-alone": {
            "churn": {
                # Round 3 of HAProxy failed: only rounds 1, 2 and 4 pair up.
                "ours": [run(1300), run(1500), run(1400), run(1200)],
                "haproxy": [run(1000), run(1000), run(None, ok=False), run(1200)],
            }
        }
    }
    rows = bench.summarize(runs)
    (row,) = [r for r in rows if r["metric"] == "cpu_us_per_connection"]
    assert (row["placement"], row["rounds"]) == ("proxy-alone", 3)
    assert (row["ratio"], row["ratio_min"], row["ratio_max"]) == (1.3, 1.0, 1.5)
    assert row["ours"] == 1350  # each proxy's own median over its good rounds
    assert row["haproxy"] == 1000
    assert row["met"] is False  # the target is <= 1.1


def test_every_placement_is_described_by_what_runs_where() -> None:
    assert bench.describe_placement("proxy-alone", [0, 1]) == (
        "proxy-alone: the proxy on CPU 1, upstreams and load generators on CPU 0"
    )
    assert bench.describe_placement("one-cpu", [0, 1]) == "one-cpu: every process on CPU 0"
    assert bench.describe_placement("unpinned", [0, 1]) == "unpinned: no process pinned"


def test_the_workers_share_of_connections_is_reported_per_run() -> None:
    run = {"proxy_log": {"by_worker": {"1": 2559, "2": 2505}}}
    runs = {"unpinned": {"churn": {"ours": [run, run], "haproxy": [{}]}}}
    assert bench.worker_shares(runs) == [
        "our connections by worker, unpinned churn: 50.5/49.5, 50.5/49.5 %"
    ]
    assert bench.worker_shares({"unpinned": {"churn": {"ours": [{}]}}}) == []


def test_the_proxys_cpu_time_includes_its_worker_processes() -> None:
    """``workers: N``: the proxy is a process tree; its CPU time is the tree's."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        assert child.pid in bench.process_tree(os.getpid())
        assert bench.process_tree(child.pid) == [child.pid]
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)


INSTRUCTIONS = Path(__file__).resolve().parents[2] / "bench" / "instructions.py"


def load_instructions() -> ModuleType:
    sys.modules.setdefault("run", bench)  # instructions.py imports run.py as ``run``
    spec = importlib.util.spec_from_file_location("bench_instructions", INSTRUCTIONS)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


instructions = load_instructions()


def test_instructions_per_connection_are_the_difference_of_two_runs() -> None:
    """Start-up and warm-up are in both runs' totals: the difference has none of them."""
    small = {"total": 1_000_000 + 50 * 6_000, "handshake": 50 * 5_000, "records": 9 + 50 * 300}
    large = {"total": 1_000_000 + 250 * 6_000, "handshake": 250 * 5_000, "records": 9 + 250 * 300}
    assert instructions.per_connection(small, large, 200) == {
        "total": 6_000.0,
        "handshake": 5_000.0,
        "rest": 1_000.0,
        "records": 300.0,
        "own": 700.0,
    }


def test_instruction_ratios_are_to_haproxys_figures() -> None:
    figures = {
        "ours": {"total": 6_200.0, "rest": 650.0},
        "haproxy": {"total": 5_700.0, "rest": 130.0},
    }
    got = instructions.ratios(figures)
    assert got["haproxy"] == {"total": 1.0, "rest": 1.0}
    assert got["ours"]["rest"] == pytest.approx(5.0)
    assert instructions.ratios({"ours": figures["ours"]}) == {}


def test_callgrind_totals_and_the_handshake_and_records_inclusive_counts_are_read(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run.callgrind"
    out.write_text("version: 1\ncmd: haproxy\nsummary: 123456789\n")
    annotated = (
        "5,566,127 (89.1%)  ???:SSL_do_handshake [/usr/lib/x86_64-linux-gnu/libssl.so.3]\n"
        "   12,345 ( 0.1%)  ???:SSL_do_handshake_x [/usr/lib/libssl.so.3]\n"
        "   99,999 ( 1.0%)  ???:_ssl__SSLSocket_do_handshake [/usr/lib/_ssl.so]\n"
        "    1,000 ( 0.1%)  ???:SSL_read [/usr/lib/x86_64-linux-gnu/libssl.so.3]\n"
        "      200 ( 0.1%)  ???:SSL_write_ex [/usr/lib/x86_64-linux-gnu/libssl.so.3]\n"
        "       30 ( 0.1%)  ???:SSL_read_early_data [/usr/lib/libssl.so.3]\n"
        "        4 ( 0.1%)  _ssl.c:_ssl__SSLSocket_read [/usr/lib/_ssl.so]\n"
    )
    script = tmp_path / "annotate"
    script.write_text(f"#!/bin/sh\ncat <<'END'\n{annotated}END\n")
    script.chmod(0o755)
    assert instructions.counted(out, str(script)) == {
        "total": 123456789,
        "handshake": 5566127,
        "records": 1200,
    }
    out.write_text("version: 1\n")
    with pytest.raises(bench.BenchError, match="no instruction total"):
        instructions.counted(out, str(script))
