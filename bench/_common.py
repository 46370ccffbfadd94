"""What bench/past.py, live.py and testing.py share, on top of run.py's helpers.

Each program builds a run.Bench (temporary directory, --repeat, rows), appends
rows of (case, fluxlite, reference, ratio, target, ok) and prints them as one
Markdown table, with the same version line as run.py.
"""

import argparse
import contextlib
import os
import shutil
import sqlite3
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (puts the repository root on sys.path, imports fluxlite)
from run import fluxlite, timed  # noqa: E402,F401  (re-exported)


def versions():
    """The same version line as run.py's."""
    return (f"Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, "
            f"fluxlite {fluxlite.__version__} {run.checkout()}".rstrip() + f", {sys.platform}")


def parser(doc, repeat):
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes")
    p.add_argument("--repeat", type=int, default=repeat,
                   help=f"rounds of interleaved measurements (default {repeat})")
    p.add_argument("--dir", help="where to put the database files (default: a temp dir)")
    return p


@contextlib.contextmanager
def bench(args, title, footnote):
    """A run.Bench in a temporary directory; prints the table when the block ends."""
    print(f"{title} ({'quick' if args.quick else 'full'} run, {args.repeat} rounds); "
          f"{versions()}", flush=True)
    tmp = tempfile.mkdtemp(prefix="fluxlite-bench-", dir=args.dir)
    b = run.Bench(tmp, args.repeat, profile=False)
    started = time.perf_counter()
    try:
        yield b
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nDone in {time.perf_counter() - started:.0f} s. {footnote}\n")
    print("| case | fluxlite | reference | ratio | target |")
    print("|---|---|---|---|---|")
    for case, flux, ref, ratio, target, ok in b.rows:
        mark = "" if ok is None else (" ✅" if ok else " ❌ missed")
        print(f"| {case} | {flux} | {ref} | {ratio} | {target}{mark} |")
    print(f"\n{versions()}; files in {args.dir or tempfile.gettempdir()}.")


def record(b, case, flux, ref="", ratio="", target="", ok=None):
    """Add a row to the table and print it as a progress line."""
    b.rows.append((case, flux, ref, ratio, target, ok))
    verdict = "" if ok is None else ("  ok" if ok else "  MISSED")
    print(f"  {case}: {flux}; {ref or '-'}; ratio {ratio or '-'}; target {target or '-'}{verdict}",
          flush=True)


def interleave(rounds, **cases):
    """Call each case once per round, in turn; {name: [seconds of each round]}.

    Each case returns the seconds of its own timed part. Taking turns spreads
    the machine's slow moments over all cases instead of one.
    """
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            times[name].append(case())
    return times


def ms(seconds):
    return f"{seconds * 1e3:,.1f} ms" if seconds >= 0.01 else f"{seconds * 1e3:.2f} ms"


def remove_db(path):
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)
