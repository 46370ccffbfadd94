"""The White House users example from flux-capacitor's README, on fluxlite.

    python examples/whitehouse.py            # a store in a temporary directory
    python examples/whitehouse.py wh.db      # or in a file you keep (safe to re-run)

Events go in; per-table reducers turn each one into row changes; a logger
subscriber hears every commit; the log can replay the tables at any time.
"""
import json
import os
import sys
import tempfile
from datetime import datetime, timezone

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fluxlite  # noqa: E402  (the repo root, so no install is needed)

SCHEMA = """
CREATE TABLE users (name TEXT PRIMARY KEY, since TEXT NOT NULL);
CREATE TABLE user_rights (user TEXT PRIMARY KEY REFERENCES users (name), role TEXT NOT NULL);
"""


# Per-table reducers, the seed's (collection, event) -> changeset. They read the
# view to check business rules and raise Rejected to refuse an event.
def users(table, event):
    name = event.payload.get("name")
    if event.type == "addUser":
        if name in table:
            raise fluxlite.Rejected(f"{name!r} is already a user")
        return table.insert(name=name, since=event.ts.date().isoformat())
    if event.type == "removeUser":
        if name not in table:
            raise fluxlite.Rejected(f"there is no user {name!r} to remove")
        return table.delete(name)


def user_rights(table, event):
    user, role = event.payload.get("user"), event.payload.get("role")
    if event.type == "grantAccess":
        if user not in table.view.users:
            raise fluxlite.Rejected(f"cannot grant {role!r} to {user!r}: no such user")
        if role == "President" and table.find(role="President"):
            raise fluxlite.Rejected("there is already a President")
        return table.upsert(user=user, role=role)
    if event.type == "revokeAccess":
        if user not in table:
            raise fluxlite.Rejected(f"{user!r} has no access to revoke")
        return table.delete(user)
    if event.type == "removeUser" and event.payload["name"] in table:
        return table.delete(event.payload["name"])  # the right goes with its user


# user_rights first: on removeUser its row must go before the users row it references.
REDUCER = fluxlite.combine({"user_rights": user_rights, "users": users})

# The seed's picture, as (time, events). Each step is one transaction; the
# handover's two events commit together: never zero or two Presidents.
STORY = [
    ("2008-12-15 23:16:38", [("addUser", {"name": "Barack"})]),
    ("2008-12-15 23:17:14", [("grantAccess", {"user": "Barack", "role": "President"})]),
    ("2016-12-19 22:40:05", [("addUser", {"name": "Trump"})]),
    ("2017-01-20 17:00:00", [("grantAccess", {"user": "Barack", "role": "Ex-President"}),
                             ("grantAccess", {"user": "Trump", "role": "President"})]),
]


def logger(event, changes):
    print(f"  #{event.seq} {event.ts:%Y-%m-%d %H:%M} {event.type} {json.dumps(event.payload)}")
    for change in changes:
        values = ", ".join(f"{k}={v!r}" for k, v in (change.values or {}).items())
        print(f"      {change.op:<6} {change.table}[{change.key!r}] {values}".rstrip())


def print_table(title, rows, columns):
    widths = [max([len(c)] + [len(str(row[c])) for row in rows]) for c in columns]
    line = "  " + "  ".join("{:<%d}" % w for w in widths)
    print(f"\n{title}")
    for cells in [columns, ["-" * w for w in widths]] + [[row[c] for c in columns] for row in rows]:
        print(line.format(*map(str, cells)).rstrip())


def main():
    with tempfile.TemporaryDirectory() as tmp:
        path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tmp, "whitehouse.db")
        now = [None]  # a story clock, so the log shows the seed's dates; real apps omit clock=
        with fluxlite.open(path, schema=SCHEMA, reducer=REDUCER, clock=lambda: now[0]) as store:
            print(f"Store: {path}\n\nCommitted events, as the logger subscriber hears them:")
            store.subscribe(logger)
            start = store.head
            for n, (when, events) in enumerate(STORY, 1):
                now[0] = datetime.fromisoformat(when).replace(tzinfo=timezone.utc)
                # Fixed ids make the story idempotent: a re-run on the same file adds nothing.
                store.dispatch_many([{"type": t, "payload": p, "id": f"story-{n}.{i}"}
                                     for i, (t, p) in enumerate(events)])
            if store.head == start:
                print("  (none: this file already holds the story)")

            print("\nBo (the First Dog) asks for access:")
            before = store.head, [table.all() for table in store.view]
            try:
                store.dispatch("grantAccess", {"user": "Bo", "role": "Chief Ball Officer"})
            except fluxlite.Rejected as exc:
                print(f"  Rejected: {exc}")
            assert (store.head, [table.all() for table in store.view]) == before
            print(f"  Nothing changed: the log still ends at #{store.head}, the tables are as they were.")

            print_table("Event log", [
                {"seq": e.seq, "time": f"{e.ts:%Y-%m-%d %H:%M:%S}", "type": e.type,
                 "payload": json.dumps(e.payload)} for e in store.events()],
                ["seq", "time", "type", "payload"])
            for table in (store.view.users, store.view.user_rights):
                print_table(f"Table {table.name}", table.all(), table.columns)

            store.verify()
            print(f"\nverify(): replaying all {store.head} events into empty tables gives "
                  f"exactly the live tables. Replay equals live.")


if __name__ == "__main__":
    main()
