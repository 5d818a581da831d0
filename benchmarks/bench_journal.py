"""Output journal throughput: appends of 4 KiB and 64 KiB chunks, and reads from offsets.

Writes ``--total-mb`` (default 512) per chunk size through ``OutputJournal.append`` with the
default retention (256 MiB, so segments roll over and old ones are deleted as in a real loop),
then reads the retained bytes back in 1 MiB reads, sequentially and from random offsets, both
from the writer's own journal and from a read-only one (as ralphd or ``ralph-uv logs`` would).
Each figure is the median of ``--rounds`` runs; the page cache is warm, no fsync is timed.

Usage: python benchmarks/bench_journal.py [--total-mb 512] [--rounds 3] [--dir /tmp]
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import cpu_model

from ralph_uv.journal import DEFAULT_RETENTION, OutputJournal

MIB = 1024 * 1024
TARGET_APPEND = 200.0
TARGET_READ = 500.0


def _filesystem(path: Path) -> str:
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype, *_ = line.split()
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def _append(directory: Path, chunk: int, total: int) -> tuple[float, OutputJournal]:
    journal = OutputJournal(directory, retention=DEFAULT_RETENTION)
    data = os.urandom(chunk)
    count = total // chunk
    started = time.perf_counter()
    for _ in range(count):
        journal.append(data)
    elapsed = time.perf_counter() - started
    return count * chunk / elapsed / 1e6, journal


def _read_sequential(journal: OutputJournal) -> float:
    position, received = journal.start, 0
    started = time.perf_counter()
    while position < journal.end:
        result = journal.read(position, MIB)
        position = result.next
        received += len(result.data)
    return received / (time.perf_counter() - started) / 1e6


def _read_random(journal: OutputJournal, reads: int, seed: int) -> float:
    rng = random.Random(seed)
    low, high = journal.start, journal.end - MIB
    received = 0
    started = time.perf_counter()
    for _ in range(reads):
        received += len(journal.read(rng.randrange(low, high), MIB).data)
    return received / (time.perf_counter() - started) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-mb", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    total = args.total_mb * MIB

    root = Path(tempfile.mkdtemp(prefix="bench-journal-", dir=args.dir))
    machine = {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        "filesystem": _filesystem(root.resolve()),
        "loadavg_1m": os.getloadavg()[0],
    }
    print(f"machine: {machine}")
    print(f"writing {args.total_mb} MiB per chunk size, {args.rounds} rounds, in {root}")
    results: dict[str, float] = {}
    try:
        for chunk in (4096, 65536):
            figures: dict[str, list[float]] = {"append": [], "seq": [], "rand": [], "ro": []}
            for round_ in range(args.rounds):
                directory = root / f"c{chunk}-r{round_}"
                rate, journal = _append(directory, chunk, total)
                figures["append"].append(rate)
                figures["seq"].append(_read_sequential(journal))
                figures["rand"].append(_read_random(journal, 256, seed=round_))
                reader = OutputJournal(directory, read_only=True)
                figures["ro"].append(_read_sequential(reader))
                journal.close()
                shutil.rmtree(directory)
            label = f"{chunk // 1024}k"
            for name, values in figures.items():
                results[f"{name}_{label}_mb_s"] = round(statistics.median(values), 1)
            print(
                f"{label:>4} chunks: append {results[f'append_{label}_mb_s']:8.1f} MB/s | "
                f"read 1 MiB sequential {results[f'seq_{label}_mb_s']:8.1f} MB/s, "
                f"random offsets {results[f'rand_{label}_mb_s']:8.1f} MB/s, "
                f"read-only reader {results[f'ro_{label}_mb_s']:8.1f} MB/s"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    append_min = min(v for k, v in results.items() if k.startswith("append_"))
    read_min = min(v for k, v in results.items() if not k.startswith("append_"))
    verdict = {
        "append_target_mb_s": TARGET_APPEND,
        "read_target_mb_s": TARGET_READ,
        "append_ok": append_min >= TARGET_APPEND,
        "read_ok": read_min >= TARGET_READ,
    }
    print(
        f"append >= {TARGET_APPEND:g} MB/s: {'yes' if verdict['append_ok'] else 'NO'}; "
        f"read >= {TARGET_READ:g} MB/s: {'yes' if verdict['read_ok'] else 'NO'}"
    )
    print(json.dumps({"benchmark": "journal", **machine, **results, **verdict}))


if __name__ == "__main__":
    main()
