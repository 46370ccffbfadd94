"""Benchmark fluxlite against raw sqlite3 doing the same SQL work.

    python bench/run.py            # full sizes (a few minutes)
    python bench/run.py --quick    # smaller sizes (about 30 s)
    python bench/run.py --profile  # also cProfile the fluxlite side of each case

Every case runs fluxlite and a hand-written sqlite3 equivalent in the same
process, on real files in a temporary directory, interleaved and repeated
(best of --repeat); the ratio fluxlite/raw is what to compare across machines.
Both sides use the same events table and pragmas as fluxlite. The raw side
writes no journal, checks nothing and reads nothing back, and its replay does
not compare tables as verify() does: the ratio is the price of those. Its ids
are uuid.uuid4()s, as most hand-written code makes them; fluxlite's are
UUIDv7s, which sort in the order they are made, so each lands at the end of
the id index: once the log outgrows SQLite's page cache (about 50,000 events
here), random ids cost page reads and writes that the 100,000-event batched
case shows (the by-hand rows use fluxlite's ids).
"""

import argparse
import cProfile
import hashlib
import json
import os
import pstats
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fluxlite  # noqa: E402

SCHEMA = "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT)"
# The same log table and index fluxlite creates (its triggers cost nothing on INSERT).
EVENTS_DDL = """
CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL, payload TEXT, meta TEXT, ts TEXT NOT NULL);
CREATE INDEX events_type ON events (type, seq);
"""
INSERT_EVENT = "INSERT INTO events (id, type, payload, meta, ts) VALUES (?, ?, ?, ?, ?)"
INSERT_USER = "INSERT INTO users (id, name, email) VALUES (?, ?, ?)"


def reducer(view, event):
    return view.users.insert(event.payload)


def payload(i):
    return {"id": i, "name": f"user {i}", "email": f"user{i}@example.com"}


def now():
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


# -- helpers -------------------------------------------------------------------

class Bench:
    """Where the files go, how often to repeat, and the rows of the final table."""

    def __init__(self, tmp, repeat, profile):
        self.tmp, self.repeat, self.profile = tmp, repeat, profile
        self.rows, self.files, self.stores = [], 0, {}

    def path(self):
        self.files += 1
        return os.path.join(self.tmp, f"b{self.files}.db")

    def store_with(self, n, batch=10_000):
        """The path of a closed store holding n addUser events, dispatched `batch`
        at a time (built once)."""
        if (n, batch) not in self.stores:
            self.stores[n, batch] = self.path()
            build_store(self.stores[n, batch], n, batch)
        return self.stores[n, batch]

    def compare(self, case, n, unit, target, flux, raw):
        """Run flux() and raw() alternately, keep the best of each; record the row.

        Each returns the seconds of its timed part for n items, on fresh files.
        """
        best_f = best_r = float("inf")
        for _ in range(self.repeat):
            best_f = min(best_f, flux())
            best_r = min(best_r, raw())
        rate_f, rate_r = n / best_f, n / best_r
        ratio = rate_f / rate_r
        ok = None if target is None else ratio >= target
        self.rows.append((case, f"{rate_f:,.0f} {unit}", f"{rate_r:,.0f} {unit}",
                          f"**{ratio:.2f}**", "" if ok is None else f">= {target}", ok))
        verdict = "" if ok is None else f" (target >= {target}) {'ok' if ok else 'MISSED'}"
        print(f"  {case}: fluxlite {rate_f:,.0f} {unit}, raw {rate_r:,.0f} {unit}, "
              f"ratio {ratio:.2f}{verdict}", flush=True)
        if self.profile:
            prof = cProfile.Profile()
            prof.runcall(flux)
            print(f"  cProfile of the fluxlite side of {case!r} (top 15 by own time):")
            pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(15)


def checkout():
    """The commit of the fluxlite.py measured, "+edits" if it has uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit and commit + ("+edits" if git("status", "--porcelain", "fluxlite.py") else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def open_store(path, durability="full"):
    return fluxlite.open(path, schema=SCHEMA, reducer=reducer, durability=durability)


def raw_connect(path, synchronous):
    """What a careful hand-written event store opens: the pragmas fluxlite uses."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute("PRAGMA foreign_keys=on")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.executescript(EVENTS_DDL + SCHEMA)
    return conn


def build_store(path, n, chunk=10_000):
    with open_store(path, "normal") as store:
        if chunk == 1:  # as an application dispatching one event at a time writes it
            for i in range(n):
                store.dispatch("addUser", payload(i))
            return
        for start in range(0, n, chunk):
            store.dispatch_many([{"type": "addUser", "payload": payload(i)}
                                 for i in range(start, min(n, start + chunk))])


# -- cases ---------------------------------------------------------------------

def case_single(b, durability, n, target):
    def flux():
        with open_store(b.path(), durability) as store:
            def run():
                for i in range(n):
                    store.dispatch("addUser", payload(i))
            return timed(run)

    def raw():
        conn = raw_connect(b.path(), durability.upper())

        def run():
            for i in range(n):
                p = payload(i)
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(INSERT_EVENT, (str(uuid.uuid4()), "addUser", json.dumps(p), "{}", now()))
                conn.execute(INSERT_USER, (p["id"], p["name"], p["email"]))
                conn.execute("COMMIT")
        try:
            return timed(run)
        finally:
            conn.close()

    b.compare(f"dispatch, 1 event per txn, durability={durability} ({n:,} events)",
              n, "ev/s", target, flux, raw)
    b.compare(f"  by hand: fluxlite's own statements, durability={durability}",
              n, "ev/s", None, lambda: by_hand(b, durability, n, 1), raw)


def case_many(b, n, batch=1000, target=0.4):
    def flux():
        with open_store(b.path()) as store:
            def run():
                for start in range(0, n, batch):
                    store.dispatch_many([{"type": "addUser", "payload": payload(i)}
                                         for i in range(start, start + batch)])
            return timed(run)

    def raw():
        conn = raw_connect(b.path(), "FULL")

        def run():
            for start in range(0, n, batch):
                ps = [payload(i) for i in range(start, start + batch)]
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(INSERT_EVENT, [(str(uuid.uuid4()), "addUser", json.dumps(p),
                                                 "{}", now()) for p in ps])
                conn.executemany(INSERT_USER, [(p["id"], p["name"], p["email"]) for p in ps])
                conn.execute("COMMIT")
        try:
            return timed(run)
        finally:
            conn.close()

    b.compare(f"dispatch_many, {batch:,} events per call, durability=full ({n:,} events)",
              n, "ev/s", target, flux, raw)
    b.compare("  by hand: fluxlite's own statements, batched", n, "ev/s", None,
              lambda: by_hand(b, "full", n, batch), raw)


def scratch(schema):
    """A private temporary database (a file SQLite deletes on close), its table
    created, in one open transaction: where the replays write."""
    replica = sqlite3.connect("", isolation_level=None)
    replica.execute("PRAGMA journal_mode=off")
    replica.execute("PRAGMA synchronous=off")
    replica.execute("BEGIN")
    replica.execute(schema)
    return replica


def seal_encoding(rows):
    """Rows as fluxlite's seals encode them (README: On-disk format)."""
    return "".join([f"{len(v)}:{v}" if v.__class__ is str else "~" if v is None
                    else f"#{v};" for row in rows for v in row]).encode()


def by_hand(b, durability, n, batch):
    """fluxlite's own statements per transaction, written by hand with sqlite3:
    the store's tables, triggers and pragmas, an event row, the user row, its
    journal row, a seal row (two sha256 links) and the file check, with no
    Python layer around them. Its ratio to raw is the most any code writing
    this on-disk format could reach; fluxlite's distance from it is its Python."""
    path = b.path()
    fluxlite.open(path, schema=SCHEMA, reducer=reducer, durability=durability).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA synchronous={durability.upper()}")
    links, seq = ["", ""], 0

    def run():
        nonlocal seq
        for start in range(0, n, batch):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("PRAGMA data_version").fetchone()
            events, users, journal = [], [], []
            for i in range(start, start + batch):
                p = payload(i)
                seq += 1
                text = json.dumps(p, separators=(",", ":"))
                events.append((seq, fluxlite._new_id(), "addUser", text, "{}", now()))
                users.append((p["id"], p["name"], p["email"]))
                journal.append((seq, 0, "users", str(p["id"]), "insert", None, text))
            for k, rows in enumerate((events, journal)):
                links[k] = hashlib.sha256(links[k].encode() + seal_encoding(rows)).hexdigest()
            conn.executemany(INSERT_USER, users)
            conn.executemany("INSERT INTO events (seq, id, type, payload, meta, ts) "
                             "VALUES (?, ?, ?, ?, ?, ?)", events)
            conn.executemany("INSERT INTO fluxlite_journal VALUES (?, ?, ?, ?, ?, ?, ?)", journal)
            conn.execute("INSERT INTO fluxlite_seals VALUES (?, ?, ?)", (seq, *links))
            os.stat(path)
            conn.execute("COMMIT")
    try:
        return timed(run)
    finally:
        conn.close()


def raw_replay(path):
    """Read the log, json.loads each payload, insert into a fresh table, one txn."""
    log = sqlite3.connect(path, isolation_level=None)
    replica = scratch(SCHEMA)
    for kind, text in log.execute("SELECT type, payload FROM events ORDER BY seq"):
        if kind == "addUser":
            p = json.loads(text)
            replica.execute(INSERT_USER, (p["id"], p["name"], p["email"]))
    replica.execute("COMMIT")
    replica.close()
    log.close()


def sealed_replay(path):
    """raw_replay plus what the seals make verify() read and hash: every column of
    the log and every journal row, each encoded as the seals encode it, into sha256
    (one digest per seal range is no cheaper). No reducer, no checks, no compare."""
    log = sqlite3.connect(path, isolation_level=None)
    replica = scratch(SCHEMA)
    log.execute("BEGIN")
    events, journal = hashlib.sha256(), hashlib.sha256()
    rows = log.execute("SELECT seq, id, type, payload, meta, ts FROM events ORDER BY seq")
    for page in iter(lambda: rows.fetchmany(1024), []):
        events.update(seal_encoding(page))
        for seq, _, kind, text, meta, ts in page:
            if kind == "addUser":
                p = json.loads(text)
                replica.execute(INSERT_USER, (p["id"], p["name"], p["email"]))
    rows = log.execute("SELECT * FROM fluxlite_journal ORDER BY seq, n")
    for page in iter(lambda: rows.fetchmany(1024), []):
        journal.update(seal_encoding(page))
    log.execute("COMMIT")
    replica.execute("COMMIT")
    replica.close()
    log.close()


def case_verify(b, n, target=0.5):
    path = b.store_with(n)

    def flux():
        with open_store(path) as store:
            return timed(store.verify)

    b.compare(f"verify() = full replay ({n:,} events)", n, "ev/s", target,
              flux, lambda: timed(raw_replay, path))
    b.compare("  by hand: the raw replay plus reading and hashing what the seals cover",
              n, "ev/s", None, lambda: timed(sealed_replay, path), lambda: timed(raw_replay, path))
    # The log above was written 10,000 events per dispatch_many (one seal each);
    # one written by single dispatches has a seal per event, each checked.
    single = b.store_with(n, batch=1)

    def flux_single():
        with open_store(single) as store:
            return timed(store.verify)

    b.compare("  the same, on a log of single dispatches (a seal per event)", n, "ev/s", None,
              flux_single, lambda: timed(raw_replay, single))


def verify_memory(b, sizes, limit_mb=20):
    """Peak RSS growth of verify(), each size in a fresh subprocess."""
    growth = {}
    for n in sizes:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--verify-mem",
                              b.store_with(n)], check=True, capture_output=True, text=True).stdout
        before, peak = json.loads(out)
        growth[n] = peak - before
        b.rows.append((f"verify() peak RSS growth ({n:,} events)",
                       f"{growth[n]:+.1f} MB (RSS {before:.0f} -> peak {peak:.0f} MB)",
                       "", "", "", None))
        print(f"  {b.rows[-1][0]}: {b.rows[-1][1]}", flush=True)
    small, large = min(sizes), max(sizes)
    spread = round(growth[large] - growth[small], 1) or 0.0  # no "-0.0"
    b.rows.append((f"verify() memory, {large:,} minus {small:,} events", f"{spread:+.1f} MB",
                   "", "", f"within {limit_mb} MB", abs(spread) <= limit_mb))


def measure_verify_memory(path):
    """Child process: print [RSS just before verify(), peak RSS during it] in MB.

    Linux: VmHWM/VmRSS from /proc/self/status, the peak reset first through
    clear_refs (ru_maxrss is no good here: after exec it can still report the
    parent's RSS). Elsewhere: ru_maxrss, which may under-report a small growth.
    """
    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    with open_store(path) as store:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            before = status("VmRSS:")
            store.verify()
            peak = status("VmHWM:")
        except OSError:
            scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, else KiB
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            store.verify()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    print(json.dumps([before / 2**20, peak / 2**20]))


# -- main ----------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (~30 s)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per side; the best counts")
    parser.add_argument("--profile", action="store_true", help="cProfile the fluxlite side")
    parser.add_argument("--dir", help="where to put the database files (default: a temp dir)")
    parser.add_argument("--verify-mem", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.verify_mem:
        return measure_verify_memory(args.verify_mem)

    q = args.quick
    versions = (f"Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, "
                f"fluxlite {fluxlite.__version__} {checkout()}".rstrip() + f", {sys.platform}")
    print(f"fluxlite vs raw sqlite3 ({'quick' if q else 'full'} run, best of {args.repeat}); "
          f"{versions}", flush=True)
    tmp = tempfile.mkdtemp(prefix="fluxlite-bench-", dir=args.dir)
    b = Bench(tmp, args.repeat, args.profile)
    started = time.perf_counter()
    try:
        case_single(b, "full", 500 if q else 2_000, 0.85)
        case_single(b, "normal", 1_000 if q else 5_000, 0.6)
        case_many(b, 20_000 if q else 100_000)
        case_verify(b, 20_000 if q else 100_000)
        verify_memory(b, (20_000, 100_000) if q else (100_000, 1_000_000))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nDone in {time.perf_counter() - started:.0f} s. Ratio = fluxlite rate / raw "
          f"sqlite3 rate in the same run (higher is better, 1.00 = as fast as raw).\n")
    print("| case | fluxlite rate | raw sqlite3 rate | ratio | target |")
    print("|---|---|---|---|---|")
    for case, flux, raw, ratio, target, ok in b.rows:
        mark = "" if ok is None else (" ✅" if ok else " ❌ missed")
        print(f"| {case} | {flux} | {raw} | {ratio} | {target}{mark} |")
    print(f"\n{versions}; files in {args.dir or tempfile.gettempdir()}; "
          f"memory is peak RSS (VmHWM) minus RSS before, across verify() in a fresh subprocess.")


if __name__ == "__main__":
    main()
