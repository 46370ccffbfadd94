"""The past: at(), history() and rebuild() on a store with a long history.

    python bench/past.py            # 100,000 events over 10,000 rows
    python bench/past.py --quick    # 20,000 events over 2,000 rows

Every event upserts one row of `items` (about 5% delete one instead); row 0
is written by exactly 100 events spread along the log. Measured, interleaved
in rounds, best of --repeat rounds:

- at(seq), 500 events before the head and in the middle of the log, each
  against verify(): a full replay of the log into a scratch database plus a
  table compare (the faster of replay() and verify(), so the stricter yardstick);
- history() of row 0 (100 versions), the median of 200 calls;
- rebuild() against a raw sqlite3 replay loop (read the log, json.loads,
  upsert into a fresh table with the same schema, one transaction);
- run.py's single-dispatch cases, fluxlite vs raw sqlite3 (each dispatch now
  also writes the journal that at() and history() read).
"""

import hashlib
import json
import random
import sqlite3
import statistics

from _common import bench, fluxlite, interleave, ms, parser, record, run, timed

SCHEMA = ("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, "
          "qty INTEGER NOT NULL, note TEXT)")
UPSERT = ("INSERT INTO items (id, name, qty, note) VALUES (?, ?, ?, ?) ON CONFLICT (id) "
          "DO UPDATE SET name = excluded.name, qty = excluded.qty, note = excluded.note")


def reducer(view, event):
    if event.type == "put":
        return view.items.upsert(event.payload)
    return view.items.delete(event.payload["id"])


def make_events(n, keys, hot_versions=100):
    """n events over `keys` rows; row 0 gets exactly hot_versions of them."""
    rnd, live, every = random.Random(42), set(), n // hot_versions
    for i in range(n):
        k = 0 if i % every == 0 else i if i < keys else rnd.randrange(1, keys)
        if k and i >= keys and k in live and rnd.random() < 0.05:
            live.discard(k)
            yield {"type": "drop", "payload": {"id": k}}
        else:
            live.add(k)
            yield {"type": "put",
                   "payload": {"id": k, "name": f"item {k}", "qty": i, "note": "v" * (i % 20)}}


def build(path, n, keys):
    store = fluxlite.open(path, schema=SCHEMA, reducer=reducer, durability="normal")
    events = list(make_events(n, keys))
    for start in range(0, n, 1000):
        store.dispatch_many(events[start:start + 1000])
    return store


def raw_replay(path):
    """The hand-written replay loop rebuild() is compared with."""
    log = sqlite3.connect(path, isolation_level=None)
    replica = run.scratch(SCHEMA)
    for kind, text in log.execute("SELECT type, payload FROM events ORDER BY seq"):
        p = json.loads(text)
        if kind == "put":
            replica.execute(UPSERT, (p["id"], p["name"], p["qty"], p["note"]))
        else:
            replica.execute("DELETE FROM items WHERE id = ?", (p["id"],))
    replica.execute("COMMIT")
    replica.close()
    log.close()


def journaled_replay(path):
    """raw_replay plus the journal rebuild() must write again: per change the row
    before (read back) and after as JSON in a journal row with fluxlite's table and
    index, then hashed as the seals do. No reducer, no checks, no swap into the file."""
    columns = ("id", "name", "qty", "note")
    log = sqlite3.connect(path, isolation_level=None)
    replica = run.scratch(SCHEMA)
    replica.execute("CREATE TABLE fluxlite_journal (seq INTEGER NOT NULL, n INTEGER NOT NULL, "
                    "tbl TEXT NOT NULL, key TEXT NOT NULL, op TEXT NOT NULL, before TEXT, "
                    "after TEXT, PRIMARY KEY (seq, n)) WITHOUT ROWID")
    replica.execute("CREATE INDEX fluxlite_journal_row ON fluxlite_journal (tbl, key, seq)")
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    journal, digest = [], hashlib.sha256()

    def flush():
        replica.executemany("INSERT INTO fluxlite_journal VALUES (?, ?, ?, ?, ?, ?, ?)", journal)
        digest.update(run.seal_encoding(journal))
        journal.clear()

    for seq, kind, text in log.execute("SELECT seq, type, payload FROM events ORDER BY seq"):
        p = json.loads(text)
        row = replica.execute("SELECT * FROM items WHERE id = ?", (p["id"],)).fetchone()
        before = dumps(dict(zip(columns, row))) if row else None
        if kind == "put":
            replica.execute(UPSERT, (p["id"], p["name"], p["qty"], p["note"]))
            op, after = ("update" if row else "insert"), dumps({c: p[c] for c in columns})
        else:
            replica.execute("DELETE FROM items WHERE id = ?", (p["id"],))
            op, after = "delete", None
        journal.append((seq, 0, "items", str(p["id"]), op, before, after))
        if len(journal) == 4096:
            flush()
    flush()
    replica.execute("COMMIT")
    replica.close()
    log.close()


def case_at(b, store):
    head = store.head
    near, middle = head - 500, head // 2
    with store.at(middle) as past, store.replay(upto=middle) as replayed:  # same answer?
        assert past.items.all() == replayed.view.items.all(), "at(seq) != replay(upto=seq)"
    times = interleave(b.repeat, verify=lambda: timed(store.verify),
                       near=lambda: timed(lambda: store.at(near).close()),
                       middle=lambda: timed(lambda: store.at(middle).close()))
    full = min(times["verify"])
    for name, seq in (("near", near), ("middle", middle)):
        t = min(times[name])
        record(b, f"at({seq:,}): {head - seq:,} events before the head of {head:,}", ms(t),
               f"verify() {ms(full)}", f"**1/{full / t:.0f}** of a full replay", "<= 1/20",
               20 * t <= full)


def case_history(b, store, calls=200):
    versions = store.history("items", 0)
    assert len(versions) == 100, len(versions)
    t = statistics.median(timed(store.history, "items", 0) for _ in range(calls))
    record(b, f"history('items', 0): 100 versions (median of {calls} calls)", ms(t),
           target="< 10 ms", ok=t < 0.010)


def main():
    args = parser(__doc__, repeat=3).parse_args()
    q = args.quick
    n, keys = (20_000, 2_000) if q else (100_000, 10_000)
    with bench(args, "fluxlite and the past", "Reference for at(): verify(), a full replay "
               "(scratch database, no journal) plus the table compare. Rates: best of the "
               "rounds; ratio = fluxlite rate / raw sqlite3 rate, 1.00 = as fast as raw.") as b:
        run.case_single(b, "full", 500 if q else 2_000, 0.85)
        run.case_single(b, "normal", 1_000 if q else 5_000, 0.6)
        with build(b.path(), n, keys) as store:
            print(f"  store: {store.head:,} events, {store.view.items.count():,} rows", flush=True)
            case_at(b, store)
            case_history(b, store)
            b.compare(f"rebuild() ({n:,} events) vs a raw replay loop", n, "ev/s", 0.5,
                      lambda: timed(store.rebuild), lambda: timed(raw_replay, store.path))
            b.compare("  by hand: the raw loop plus writing and hashing the journal", n,
                      "ev/s", None, lambda: timed(journaled_replay, store.path),
                      lambda: timed(raw_replay, store.path))


if __name__ == "__main__":
    main()
