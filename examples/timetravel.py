"""Time travel on fluxlite: the past of a tiny inventory, explored.

    python examples/timetravel.py            # a store in a temporary directory
    python examples/timetravel.py inv.db     # or in a new file you keep

A few events over (fake) time; then the model at a past seq and at a past time,
one row's history, a deleted row restored, and a schema change with no
migration: reopen with a new schema and version=2, and the log is replayed.
"""
import itertools
import json
import os
import sys
import tempfile
import textwrap
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fluxlite  # noqa: E402  (the repo root, so no install is needed)

START = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
STORY = [  # (event type, payload): one event every 5 minutes from START
    ("added", {"sku": "APL", "name": "apples", "qty": 12}),
    ("added", {"sku": "BAN", "name": "bananas", "qty": 6}),
    ("sold", {"sku": "APL", "qty": 5}),
    ("added", {"sku": "CHE", "name": "cherries", "qty": 30}),
    ("restocked", {"sku": "BAN", "qty": 4}),
    ("sold", {"sku": "BAN", "qty": 7}),
    ("discontinued", {"sku": "BAN"}),
    ("sold", {"sku": "CHE", "qty": 27}),
]


def story_clock(step=timedelta(minutes=5)):
    """START, START + 5 min, ...: reproducible times. Real apps omit clock=."""
    ticks = itertools.count()
    return lambda: START + next(ticks) * step


def new_qty(before, event):
    """A restock adds, a sale takes away; selling more than there is is refused."""
    qty = before + (1 if event.type == "restocked" else -1) * event.payload["qty"]
    if qty < 0:
        raise fluxlite.Rejected(f"only {before} {event.payload['sku']} left")
    return qty


SCHEMA_V1 = "CREATE TABLE items (sku TEXT PRIMARY KEY, name TEXT NOT NULL, qty INTEGER NOT NULL)"


def reducer_v1(view, event):
    p, items = event.payload, view.items
    if event.type == "added":
        return items.insert(sku=p["sku"], name=p["name"], qty=p["qty"])
    if event.type in ("sold", "restocked"):
        return items.update(p["sku"], qty=new_qty(items.get(p["sku"])["qty"], event))
    if event.type == "discontinued":
        return items.delete(p["sku"])


# Version 2: qty is renamed on_hand, and a new column, stock, says "low" or "ok".
SCHEMA_V2 = """CREATE TABLE items (sku TEXT PRIMARY KEY, name TEXT NOT NULL,
                                   on_hand INTEGER NOT NULL, stock TEXT NOT NULL)"""


def stock(on_hand):
    return "low" if on_hand < 5 else "ok"


def reducer_v2(view, event):
    p, items = event.payload, view.items
    if event.type == "added":
        return items.insert(sku=p["sku"], name=p["name"], on_hand=p["qty"], stock=stock(p["qty"]))
    if event.type in ("sold", "restocked"):
        on_hand = new_qty(items.get(p["sku"])["on_hand"], event)
        return items.update(p["sku"], on_hand=on_hand, stock=stock(on_hand))
    if event.type == "discontinued":
        return items.delete(p["sku"])


def restore_v1_to_v2(event):
    """A fluxlite.restore logged under v1 carries a whole v1 row, replayed as is: give it
    v2's columns, the computed one too (without them the replay stops at it)."""
    p = event.payload
    if p["table"] != "items" or "qty" not in p["row"]:
        return event  # already the current shape: upcasters stop when nothing changes
    row = {"sku": p["row"]["sku"], "name": p["row"]["name"],
           "on_hand": p["row"]["qty"], "stock": stock(p["row"]["qty"])}
    return event.replace(payload={**p, "row": row})


def brief(row):
    return "-" if row is None else " ".join(f"{k}={v}" for k, v in row.items() if k != "sku")


def print_table(title, rows, columns):
    widths = [max([len(c)] + [len(str(row[c])) for row in rows]) for c in columns]
    line = "     " + "  ".join("{:<%d}" % w for w in widths)
    print(f"   {title}")
    for cells in [columns, ["-" * w for w in widths]] + [[row[c] for c in columns] for row in rows]:
        print(line.format(*map(str, cells)).rstrip())


def main():
    with tempfile.TemporaryDirectory() as tmp:
        path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tmp, "inventory.db")
        if os.path.exists(path) and os.path.getsize(path):
            sys.exit(f"{path} already exists; give a new file name (the story needs an empty log).")
        clock = story_clock()
        with fluxlite.open(path, schema=SCHEMA_V1, reducer=reducer_v1, clock=clock) as store:
            for kind, payload in STORY:
                store.dispatch(kind, payload)
            print(f"Store: {path}\n\nThe story: {len(STORY)} events, five minutes apart.")
            print_table(f"the log (times UTC, {START:%Y-%m-%d})", [
                {"seq": e.seq, "time": f"{e.ts:%H:%M}", "type": e.type,
                 "payload": json.dumps(e.payload)} for e in store.events()],
                ["seq", "time", "type", "payload"])
            print_table("live items", store.view.items.all(), store.view.items.columns)

            print("\n1. store.at(seq) is the whole model right after that event, read-only:")
            with store.at(3) as past:
                print_table(f"items at seq {past.seq}", past.items.all(), past.items.columns)
            when = datetime(2026, 3, 2, 9, 22, tzinfo=timezone.utc)
            print(f"   store.at(time=...) is the model after the last event by {when:%H:%M}:")
            with store.at(time=when) as past:
                print_table(f"items at {when:%H:%M} (seq {past.seq})", past.items.all(),
                            past.items.columns)

            print("\n2. store.history('items', 'BAN') is every version of one row (the journal):")
            print_table("history of BAN", [
                {"seq": r.seq, "time": f"{r.ts:%H:%M}", "event": r.type,
                 "before -> after": f"{brief(r.before)} -> {brief(r.after)}"}
                for r in store.history("items", "BAN")],
                ["seq", "time", "event", "before -> after"])

            print("\n3. store.restore('items', 'BAN') brings the deleted row back, as a new event:")
            event = store.restore("items", "BAN", id="restore-BAN")  # id: idempotency key
            print(f"   dispatched #{event.seq} {event.type} {json.dumps(event.payload)}")
            print_table("live items", store.view.items.all(), store.view.items.columns)

        print("\n4. A new schema without a migration: qty becomes on_hand, a new column stock is\n"
              "   computed by the new reducer; reopening with version=2 replays the log into it.")
        try:
            fluxlite.open(path, schema=SCHEMA_V2, reducer=reducer_v2, version=2).close()
        except fluxlite.ChangesetError as exc:
            print("   Without an upcaster the replay stops at the v1 restore; the file is unchanged:")
            print(textwrap.fill(str(exc), 88, initial_indent="     ", subsequent_indent="     "))
        print("   With upcasters={'fluxlite.restore': restore_v1_to_v2} it carries along:")
        with fluxlite.open(path, schema=SCHEMA_V2, reducer=reducer_v2, version=2, clock=clock,
                           upcasters={"fluxlite.restore": restore_v1_to_v2}) as store:
            print_table(f"live items, version {store.version}", store.view.items.all(),
                        store.view.items.columns)
            with store.at(6) as past:
                print_table("items at seq 6, rebuilt too", past.items.all(), past.items.columns)
            store.verify()
            print(f"   verify(): replaying all {store.head} events gives exactly the live tables.")


if __name__ == "__main__":
    main()
