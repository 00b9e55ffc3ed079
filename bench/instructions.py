"""Instructions per connection (churn, resumption) or per message (ping-pong), counted by
valgrind's callgrind: a figure that does not move with the machine's load or CPU
placement, as CPU time does here (±20 % between runs of the same code).

    .venv/bin/python bench/instructions.py [--only churn,resumption,pingpong] \\
        [--small 50] [--large 250]

Each proxy (ours; HAProxy; and the floor, ``bench/floor_proxy.py``: the least a Python
TLS proxy on uvloop does per connection) runs under callgrind twice per workload: once
with ``--small`` measured units and once with ``--large``, after the same warm-up
(ping-pong: 40 times as many messages, over the same connections). The difference of
the two totals divided by the difference of the counts is the instructions per unit:
start-up, warm-up and shutdown cancel out. OpenSSL's ``SSL_do_handshake``, counted
inclusively, splits that figure in two: the handshake (the same library and the same
work for every proxy) and **the rest**, which is the proxy's own per-connection code,
its event loop, its log line and the record layer. The record layer (``SSL_read``,
``SSL_write`` and their ``_ex`` forms, inclusively: OpenSSL again) is counted too, and
**own** is the rest without it: what the proxy and its language spend themselves.

What it does not count: the kernel's work (system calls), cache misses, stalls. CPU
time (``bench/run.py``) is what the targets are judged on; this is the instrument for
steering: an A/B of a change on the per-connection path shows here to within about 1 %,
where CPU time needs many rounds. It takes about 10 minutes (valgrind runs a proxy about
50 times slower) and is not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import run as bench

KINDS = ("ours", "haproxy", "floor")
WORKLOADS = ("churn", "resumption", "pingpong")
# The size that counts one workload's units (connections; ping-pong: messages).
UNITS = {
    "churn": "churn_connections",
    "resumption": "churn_connections",
    "pingpong": "pingpong_messages",
}
# Ping-pong counts messages over the same connections: more units for the same precision.
SCALE = {"pingpong": 40}
HANDSHAKE = "SSL_do_handshake"
RECORDS = r"SSL_(?:read|write)(?:_ex)?"
_TOTAL = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)
_INCLUSIVE = re.compile(r"^\s*([\d,]+) .*?[\s:]" + HANDSHAKE + r" \[", re.MULTILINE)
_RECORDS = re.compile(r"^\s*([\d,]+) .*?[\s:]" + RECORDS + r" \[", re.MULTILINE)


def counted(path: Path, annotate: str) -> dict[str, int]:
    """The total instructions of one callgrind output, those inside SSL_do_handshake and
    those inside the record layer's reads and writes."""
    text = path.read_text(errors="replace")
    total = _TOTAL.search(text)
    if total is None:
        raise bench.BenchError(f"{path.name}: no instruction total (did valgrind finish?)")
    out = subprocess.run(  # noqa: S603 - our own argv
        [annotate, "--inclusive=yes", "--threshold=100", str(path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    handshake = sum(int(m.replace(",", "")) for m in _INCLUSIVE.findall(out))
    records = sum(int(m.replace(",", "")) for m in _RECORDS.findall(out))
    return {"total": int(total.group(1)), "handshake": handshake, "records": records}


def per_connection(small: dict[str, int], large: dict[str, int], extra: int) -> dict[str, float]:
    """Instructions per unit from two runs ``extra`` units apart."""
    total, handshake, records = (
        (large[key] - small[key]) / extra for key in ("total", "handshake", "records")
    )
    rest = total - handshake
    return {
        "total": total,
        "handshake": handshake,
        "rest": rest,
        "records": records,
        "own": rest - records,
    }


def ratios(figures: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each proxy's figures divided by HAProxy's (when HAProxy's are there)."""
    base = figures.get("haproxy")
    if not base:
        return {}
    return {
        kind: {key: value / base[key] for key, value in fig.items() if base.get(key)}
        for kind, fig in figures.items()
    }


def measure(
    setup: bench.Setup, workload: str, kind: str, sizes: Sequence[int], annotate: str
) -> dict[str, Any]:
    counts = []
    sizes = [n * SCALE.get(workload, 1) for n in sizes]
    for n in sizes:
        tag = f"{workload}-{kind}-{n}"
        here = dataclasses.replace(
            setup, sizes=dataclasses.replace(setup.sizes, **{UNITS[workload]: n})
        )
        result = bench.run_one(here, workload, kind, tag)
        unit = "messages" if workload == "pingpong" else "connections"
        print(f"  {workload:<10} {kind:<8} {n:>5} {unit}  {result['wall_s']:6.1f} s", end="")
        if not result["ok"]:
            print(f"  FAILED: {result.get('error')}", flush=True)
            return {"ok": False, "error": result.get("error")}
        counts.append(counted(setup.tmp / f"{tag}.callgrind", annotate))
        print(f"  {counts[-1]['total']:,} instructions", flush=True)
    figures = per_connection(counts[0], counts[1], sizes[1] - sizes[0])
    return {"ok": True, "runs": counts, "per_connection": figures}


def print_table(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    print()
    print(
        "instructions per connection (ping-pong: per message; user space), "
        "and each proxy's ratio to HAProxy's"
    )
    header = (
        f"{'workload':<11} {'proxy':<8} {'total':>10} {'handshake':>10} {'rest':>9} "
        f"{'records':>9} {'own':>9} {'total/hap':>10} {'rest/hap':>9} {'own/hap':>8}"
    )
    print(header)
    print("-" * len(header))
    nan = float("nan")
    for workload, by_kind in results.items():
        figures = {k: r["per_connection"] for k, r in by_kind.items() if r.get("ok")}
        relative = ratios(figures)
        for kind, fig in figures.items():
            rel = relative.get(kind, {})
            print(
                f"{workload:<11} {kind:<8} {fig['total']:>10,.0f} {fig['handshake']:>10,.0f} "
                f"{fig['rest']:>9,.0f} {fig['records']:>9,.0f} {fig['own']:>9,.0f} "
                f"{rel.get('total', nan):>10.3f} {rel.get('rest', nan):>9.2f} "
                f"{rel.get('own', nan):>8.2f}"
            )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(WORKLOADS), help="churn,resumption,pingpong")
    parser.add_argument("--kinds", default=",".join(KINDS), help="ours,haproxy,floor")
    parser.add_argument(
        "--small", type=int, default=50, help="units (ping-pong: 40 messages each), first run"
    )
    parser.add_argument("--large", type=int, default=250, help="units, second run")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--no-install", action="store_true", help="never apt-get install")
    parser.add_argument("--out", default=str(bench.RESULTS / "instructions.json"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    if not 0 < args.small < args.large:
        parser.error("--small must be positive and below --large")
    for name, allowed in (("only", WORKLOADS), ("kinds", KINDS)):
        unknown = set(getattr(args, name).split(",")) - set(allowed)
        if unknown:
            parser.error(f"--{name}: unknown {', '.join(sorted(unknown))}")
    return args


def ensure_valgrind(install: bool) -> tuple[str, str]:
    """valgrind and callgrind_annotate; installed from Debian's packages when missing
    (as root, like HAProxy for bench/run.py)."""
    found = shutil.which("valgrind"), shutil.which("callgrind_annotate")
    if None in found and install and os.geteuid() == 0 and shutil.which("apt-get"):
        with contextlib.suppress(subprocess.CalledProcessError):
            bench.apt_install("valgrind")
        found = shutil.which("valgrind"), shutil.which("callgrind_annotate")
    valgrind, annotate = found
    if valgrind is None or annotate is None:
        raise bench.BenchError("valgrind is missing: install it (apt-get install -y valgrind)")
    return valgrind, annotate


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="layer4lab-instructions-"))
    try:
        valgrind, annotate = ensure_valgrind(install=not args.no_install)
        haproxy = bench.ensure_haproxy(install=not args.no_install)
        certs = tmp / "certs"
        bench.make_certs(certs)
        sizes = dataclasses.replace(
            bench.QUICK, churn_concurrency=args.concurrency, churn_warmup=16, churn_timeout=900
        )
        setup = bench.Setup(
            tmp=tmp,
            certs=certs,
            haproxy=haproxy,
            sizes=sizes,
            haproxy_log=True,
            run_deadline=float("inf"),
            haproxy_maxconn=4096,
            idle_connections=0,
            wrap=(valgrind, "--tool=callgrind", f"--callgrind-out-file={tmp}/{{tag}}.callgrind"),
            start_timeout=180.0,
            stop_grace=120.0,
        )
        workloads = [w for w in WORKLOADS if w in args.only.split(",")]
        kinds = [k for k in KINDS if k in args.kinds.split(",")]
        print(
            f"layer4lab instructions: {', '.join(workloads)}; {', '.join(kinds)}; "
            f"{args.small} and {args.large} units, {args.concurrency} connections at a time",
            flush=True,
        )
        sizes_run = (args.small, args.large)
        results = {
            w: {k: measure(setup, w, k, sizes_run, annotate) for k in kinds} for w in workloads
        }
        print_table(results)
        report = {
            "schema": 1,
            "machine": bench.machine_info(haproxy),
            "parameters": {
                "connections": list(sizes_run),
                "concurrency": args.concurrency,
                "warmup": sizes.churn_warmup,
            },
            "results": results,
            "ratios": {
                w: ratios({k: r["per_connection"] for k, r in by.items() if r.get("ok")})
                for w, by in results.items()
            },
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {out}")
    except bench.BenchError as exc:
        print(f"set-up failed: {exc}", file=sys.stderr)
        return 2
    finally:
        bench.Child.stop_all()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    failed = any(not r.get("ok") for by in results.values() for r in by.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
