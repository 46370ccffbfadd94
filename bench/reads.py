"""The read paths: get, find, count, all, query, events, event, at() views, history.

    python bench/reads.py            # 10,000 rows, 10,100 events
    python bench/reads.py --quick    # 2,000 rows, 2,100 events

One table `users` (id INTEGER PRIMARY KEY, name TEXT indexed, email TEXT);
each row inserted by one event, then row 0 updated by 100 more (for history).
Each case is measured in interleaved rounds against hand-written sqlite3 on
its own connection to the same file, best of --repeat rounds, and shown as
microseconds per call; ratio = raw time / fluxlite time (1.00 = as fast as raw).

The raw side does what a user's own code would to get the same result:
- rows as dicts, the column names taken from cursor.description per statement
  (fluxlite returns dicts);
- find(): `WHERE name = ? ORDER BY id`; all(): `SELECT * ... ORDER BY id`;
- events and event(seq): the row, json.loads of payload and meta, and
  datetime.fromisoformat of ts (fluxlite returns Event objects with those);
- an at(seq) view's get: the same get on the live file (the view's copy is
  made once, before the rounds; its reads are what is measured);
- history(): the journal joined with the events for one key, json.loads of
  each version's before and after, fromisoformat of ts.
"""

import json
import sqlite3
from datetime import datetime

from _common import bench, fluxlite, interleave, parser, record, timed

SCHEMA = ("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT);\n"
          "CREATE INDEX users_name ON users (name)")
EVENT_SQL = "SELECT seq, id, type, payload, meta, ts FROM events"


def reducer(view, event):
    return view.users.upsert(event.payload)


def build(path, rows, versions=100):
    store = fluxlite.open(path, schema=SCHEMA, reducer=reducer, durability="normal")
    store.dispatch_many([{"type": "put", "payload": {"id": i, "name": f"u{i % 100}",
                                                      "email": f"e{i}@example.com"}}
                         for i in range(rows)])
    for v in range(versions):
        store.dispatch("put", {"id": 0, "name": "u0", "email": f"v{v}@example.com"})
    return store


def dicts(cursor):
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor]


def raw_event(row):
    seq, event_id, kind, payload, meta, ts = row
    return (seq, event_id, kind, json.loads(payload), json.loads(meta),
            datetime.fromisoformat(ts))


def raw_history(raw, key):
    rows = raw.execute(
        "SELECT j.seq, e.id, e.type, e.ts, j.op, j.before, j.after FROM fluxlite_journal j "
        "JOIN events e ON e.seq = j.seq WHERE j.tbl = ? AND j.key = ? ORDER BY j.seq, j.n",
        ("users", json.dumps(key))).fetchall()
    return [(seq, event_id, kind, datetime.fromisoformat(ts), op,
             json.loads(before) if before else None, json.loads(after) if after else None)
            for seq, event_id, kind, ts, op, before, after in rows]


def cases(store, raw, rows):
    """{name: (calls per round, fluxlite(), raw())}, each doing `calls` calls."""
    users, keys = store.view.users, range(0, rows, max(1, rows // 2000))
    head = store.head
    past = store.at(rows)  # before row 0's updates; the others are as they are now
    old, later = past.users, keys[1:]
    select = "SELECT * FROM users WHERE id = ?"
    large = "SELECT * FROM users WHERE id < ?"
    return past, {
        "get(key)": (len(keys), lambda: [users.get(k) for k in keys],
                     lambda: [(dicts(raw.execute(select, (k,))) or [None])[0] for k in keys]),
        "find(name=...), 1% of the rows": (
            50, lambda: [users.find(name="u7") for _ in range(50)],
            lambda: [dicts(raw.execute("SELECT * FROM users WHERE name = ? ORDER BY id",
                                       ("u7",))) for _ in range(50)]),
        "count()": (2000, lambda: [users.count() for _ in range(2000)],
                    lambda: [raw.execute("SELECT count(*) FROM users").fetchone()[0]
                             for _ in range(2000)]),
        f"all(), {rows:,} rows": (
            1, lambda: users.all(),
            lambda: dicts(raw.execute("SELECT * FROM users ORDER BY id"))),
        "query(sql, (key,)), 1 row": (
            len(keys), lambda: [store.query(select, (k,)) for k in keys],
            lambda: [dicts(raw.execute(select, (k,))) for k in keys]),
        "query(sql, (1000,)), 1,000 rows": (
            5, lambda: [store.query(large, (1000,)) for _ in range(5)],
            lambda: [dicts(raw.execute(large, (1000,))) for _ in range(5)]),
        f"list(events()), {head:,} events": (
            1, lambda: list(store.events()),
            lambda: [raw_event(r) for r in raw.execute(EVENT_SQL + " ORDER BY seq")]),
        "event(seq)": (
            len(keys), lambda: [store.event(k + 1) for k in keys],
            lambda: [raw_event(raw.execute(EVENT_SQL + " WHERE seq = ?", (k + 1,)).fetchone())
                     for k in keys]),
        "get(key) on an at(seq) view": (
            len(later), lambda: [old.get(k) for k in later],
            lambda: [(dicts(raw.execute(select, (k,))) or [None])[0] for k in later]),
        "history('users', 0), 101 versions": (
            20, lambda: [store.history("users", 0) for _ in range(20)],
            lambda: [raw_history(raw, 0) for _ in range(20)]),
    }


def main():
    args = parser(__doc__, repeat=5).parse_args()
    rows = 2_000 if args.quick else 10_000
    with bench(args, "fluxlite's reads", "Per call: best of the rounds; ratio = raw time / "
               "fluxlite time, 1.00 = as fast as raw sqlite3.") as b:
        with build(b.path(), rows) as store:
            raw = sqlite3.connect(store.path, isolation_level=None)
            past, table = cases(store, raw, rows)
            with past:
                for name, (calls, flux, ref) in table.items():
                    assert _same(flux(), ref()), name
                    times = interleave(b.repeat, flux=lambda: timed(flux),
                                       raw=lambda: timed(ref))
                    f, r = min(times["flux"]) / calls, min(times["raw"]) / calls
                    record(b, name, us(f), us(r), f"**{r / f:.2f}**")
            raw.close()


def us(seconds):
    return f"{seconds * 1e6:,.1f} µs" if seconds < 0.001 else f"{seconds * 1e3:,.2f} ms"


def _same(flux, ref):
    """Both sides got the same answer (events and revisions compared field by field)."""
    if isinstance(flux, list) and flux and isinstance(flux[0], list) and flux[0] \
            and isinstance(flux[0][0], fluxlite.Revision):
        flux = [[tuple(vars(r).values()) for r in h] for h in flux]
    elif isinstance(flux, list) and flux and isinstance(flux[0], fluxlite.Event):
        flux = [tuple(vars(e)[f] for f in ("seq", "id", "type", "payload", "meta", "ts"))
                for e in flux]
    return flux == ref


if __name__ == "__main__":
    main()
