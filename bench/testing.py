"""Test fixtures: fork(), checkpoint()/reset_to(), a fresh store, scenario().

    python bench/testing.py            # forks of 10,000- and 100,000-event stores
    python bench/testing.py --quick    # forks of 10,000- and 20,000-event stores

Each fluxlite call is timed in turn with its raw sqlite3 floor, the same SQLite
work without fluxlite around it: fork() and checkpoint() against
Connection.backup() of the same file, reset_to() against backing a raw copy
of the store up from memory, a fresh store against connect() plus the same
DDL. The stores are run.py's (one addUser event = one users row, durability
full). Figures are medians over the rounds; ratio = raw time / fluxlite time
(1.00 = no overhead over the raw floor).
"""

import json
import sqlite3
import statistics
import time
import uuid

from _common import bench, fluxlite, interleave, ms, parser, record, remove_db, run, timed


def compare(b, case, rounds, flux, raw):
    times = interleave(rounds, flux=flux, raw=raw)
    f, r = statistics.median(times["flux"]), statistics.median(times["raw"])
    record(b, case, ms(f), f"{ms(r)} raw", f"**{r / f:.2f}**")


def copy_time(b, into, make_copy):
    """Seconds of make_copy(dest) into :memory: or a new file; the copy is closed and removed."""
    dest = ":memory:" if into == ":memory:" else b.path()
    start = time.perf_counter()
    copy = make_copy(dest)
    seconds = time.perf_counter() - start
    copy.close()
    if dest != ":memory:":
        remove_db(dest)
    return seconds


def raw_backup(source, dest):
    conn = sqlite3.connect(dest)
    source.backup(conn)
    return conn


def case_fork(b, n, rounds):
    path = b.store_with(n)
    with run.open_store(path) as store:
        source = sqlite3.connect(path)
        for into in (":memory:", "file"):
            compare(b, f"fork() into {into}, a store of {n:,} events", rounds,
                    lambda: copy_time(b, into, store.fork),
                    lambda: copy_time(b, into, lambda dest: raw_backup(source, dest)))
        source.close()


def case_reset(b, n, rounds, per_test=10):
    path, raw_path = b.path(), b.path()
    run.build_store(path, n)
    source = sqlite3.connect(path)
    raw_backup(source, raw_path).close()  # the raw side's own copy of the same store
    source.close()
    raw = sqlite3.connect(raw_path, isolation_level=None)
    raw.execute("PRAGMA journal_mode=wal")
    raw.execute("PRAGMA synchronous=FULL")  # as the store's durability="full"
    with run.open_store(path) as store:
        compare(b, f"checkpoint() of an on-disk store of {n:,} events", rounds,
                lambda: copy_time(b, ":memory:", lambda _: store.checkpoint()),
                lambda: copy_time(b, ":memory:", lambda dest: raw_backup(raw, dest)))
        saved, raw_saved = store.checkpoint(), raw_backup(raw, ":memory:")

        def flux_test():
            for i in range(n, n + per_test):
                store.dispatch("addUser", run.payload(i))
            return timed(store.reset_to, saved)

        def raw_test():
            for i in range(n, n + per_test):
                p = run.payload(i)
                raw.execute("BEGIN IMMEDIATE")
                raw.execute(run.INSERT_EVENT,
                            (str(uuid.uuid4()), "addUser", json.dumps(p), "{}", run.now()))
                raw.execute(run.INSERT_USER, (p["id"], p["name"], p["email"]))
                raw.execute("COMMIT")
            return timed(raw_saved.backup, raw)

        compare(b, f"reset_to() after a test dispatched {per_test} events ({n:,}-event store "
                   f"on disk)", rounds, flux_test, raw_test)
        assert store.head == n and store.view.users.count() == n
        assert raw.execute("SELECT count(*) FROM users").fetchone()[0] == n
    raw.close()


def fresh_store():
    fluxlite.open(":memory:", schema=run.SCHEMA, reducer=run.reducer).close()


def fresh_scenario():
    fluxlite.scenario(run.SCHEMA, run.reducer).close()


def fresh_raw():
    conn = sqlite3.connect(":memory:")
    conn.executescript(run.EVENTS_DDL + run.SCHEMA)
    conn.close()


def main():
    args = parser(__doc__, repeat=7).parse_args()
    q = args.quick
    with bench(args, "fluxlite test fixtures", "Medians over the rounds; ratio = raw sqlite3 "
               "time / fluxlite time (1.00 = no overhead over the raw floor).") as b:
        for n in (10_000, 20_000 if q else 100_000):
            case_fork(b, n, args.repeat)
        case_reset(b, 10_000, 10 * args.repeat)
        compare(b, "open(':memory:', schema, reducer), then close()", 10 * args.repeat,
                lambda: timed(fresh_store), lambda: timed(fresh_raw))
        compare(b, "scenario(schema, reducer), then close()", 10 * args.repeat,
                lambda: timed(fresh_scenario), lambda: timed(fresh_raw))


if __name__ == "__main__":
    main()
