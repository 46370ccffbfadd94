"""Property tests of the documented promises, where the older ones do not reach.

A schema of a few tables (a composite key, an immediate and a deferred
foreign key, a UNIQUE column, a CHECK, NOT NULL) and a reducer driven by the
payload (a list of change dicts), so that hypothesis chooses the changesets;
failures are injected at random points (a reducer raising on the k-th event of
a batch, a broken constraint, a middleware refusing or raising before or after
next(), a raising subscriber, an id conflict, a stale expect_seq, a failing
restore or rebuild) and each must leave every table, fluxlite's own included,
as it was.
"""
import contextlib
import itertools
import os
import tempfile
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as statistic
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

import fluxlite
from fluxlite import Change

SCHEMA = """
CREATE TABLE parents (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
                      n INTEGER CHECK (n >= 0));
CREATE TABLE kids (pid INTEGER NOT NULL REFERENCES parents(id), k TEXT NOT NULL,
                   v INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (pid, k));
CREATE TABLE links (a INTEGER PRIMARY KEY,
                    b INTEGER REFERENCES parents(id) DEFERRABLE INITIALLY DEFERRED);
"""

# During a rebuild, the reducer raises at this seq (a rebuild that fails part way).
FAIL_REPLAY_AT = [None]


class Boom(Exception):
    pass


class AfterNext(Exception):
    """Raised by the middleware after next() returned."""


def reducer(view, event):
    p = event.payload
    if FAIL_REPLAY_AT[0] is not None and event.seq == FAIL_REPLAY_AT[0]:
        raise Boom(f"replay of {event.seq}")
    if event.type != "apply":
        return None
    if p.get("boom"):
        raise Boom("the reducer raised")
    if p.get("reject"):
        raise fluxlite.Rejected("the reducer refused")
    return [Change(c["op"], c["table"], c.get("key"), c.get("values")) for c in p["c"]
            if not c.get("if_exists") or view[c["table"]].get(c["key"]) is not None]


def middleware(store):
    def wrap(next):
        def handle(event):
            mode = event["meta"].get("mw")
            if mode == "before":
                raise fluxlite.Forbidden("refused before next()")
            result = next(event)
            if mode == "after":
                raise AfterNext("raised after next()")
            return result
        return handle
    return wrap


pid = st.integers(1, 4)
name = st.sampled_from(["ann", "bob", "cy", "di"])
n = st.one_of(st.none(), st.integers(-1, 3))  # -1 breaks the CHECK
kid_key = st.tuples(st.integers(1, 5), st.sampled_from(["x", "y"]))
change = st.one_of(
    st.builds(lambda i, nm, v: {"op": "insert", "table": "parents",
                                "values": {"id": i, "name": nm, "n": v}}, pid, name, n),
    st.builds(lambda i, nm, v: {"op": "upsert", "table": "parents",
                                "values": {"id": i, "name": nm, "n": v}}, pid, name, n),
    st.builds(lambda i, v: {"op": "update", "table": "parents", "key": i,
                            "values": {"n": v}}, pid, n),
    st.builds(lambda i, nm: {"op": "update", "table": "parents", "key": i,
                             "values": {"name": nm}}, pid, st.one_of(name, st.none())),
    st.builds(lambda i: {"op": "delete", "table": "parents", "key": i}, pid),
    st.builds(lambda k, v: {"op": "insert", "table": "kids",
                            "values": {"pid": k[0], "k": k[1], "v": v}},
              kid_key, st.one_of(st.none(), st.integers(0, 3))),
    st.builds(lambda k, v: {"op": "upsert", "table": "kids",
                            "values": {"pid": k[0], "k": k[1], "v": v}},
              kid_key, st.integers(0, 3)),
    st.builds(lambda k, v: {"op": "update", "table": "kids", "key": list(k),
                            "values": {"v": v}}, kid_key, st.integers(0, 3)),
    st.builds(lambda k: {"op": "delete", "table": "kids", "key": list(k)}, kid_key),
    st.builds(lambda a, b: {"op": "upsert", "table": "links", "values": {"a": a, "b": b}},
              st.integers(1, 3), st.integers(1, 5)),
    st.builds(lambda a: {"op": "delete", "table": "links", "key": a}, st.integers(1, 3)),
)
# mostly well-behaved events, now and then one that fails
event = st.fixed_dictionaries({
    "type": st.just("apply"),
    "payload": st.builds(
        lambda c, fail: {"c": c, **({fail: True} if fail else {})},
        st.lists(change, max_size=3),
        st.sampled_from([None] * 8 + ["boom", "reject"])),
}, optional={
    "id": st.sampled_from(["id-1", "id-2"]),
    "meta": st.sampled_from([{}, {"mw": "before"}, {"mw": "after"}]).map(dict),
})


def dump(store):
    """Every byte of content: schema, every table's rows (fluxlite_* included)."""
    with store._lock:
        return list(store._conn.iterdump())


def but_generation(lines):
    """A dump without the model's generation number: reset_to() puts every row back
    but that one, which moves on at every reset, so that the file never holds a
    number again that another store took for its model (nor the rewound log under
    the number of the log it replaced), and the heads of its last resets (rewinds)."""
    return [line for line in lines
            if not line.startswith(("INSERT INTO \"fluxlite_meta\" VALUES('generation'",
                                    "INSERT INTO \"fluxlite_meta\" VALUES('rewinds'"))]


def as_dicts(changes):
    return [c.to_dict() for c in changes]


@contextlib.contextmanager
def opened(directory, name="s.db", **kw):
    store = fluxlite.open(os.path.join(directory, name), schema=SCHEMA, reducer=reducer, durability="normal",
                          middleware=[middleware], **kw)
    try:
        yield store
    finally:
        store.close()


op = st.one_of(
    st.tuples(st.just("dispatch"), event, st.sampled_from([None, 0, -1])),
    st.tuples(st.just("many"), st.lists(event, max_size=4), st.sampled_from([None, 0, -1])),
    st.tuples(st.just("restore"), st.sampled_from(["parents", "kids", "links"]),
              st.one_of(pid, kid_key.map(list)), st.integers(0, 30)),
    st.tuples(st.just("rebuild"), st.integers(0, 10)),
    st.tuples(st.just("consume"), event, st.integers(0, 5)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=12))
def test_a_failed_write_leaves_every_table_as_it_was_and_the_store_working(ops):
    """All or nothing (README, Guarantees): after any failed dispatch, dispatch_many,
    restore or rebuild every table (the log, journal, seals, consumers, the model)
    dumps as before, verify() passes and the next event gets the next seq."""
    heard = []
    with tempfile.TemporaryDirectory() as directory, opened(directory) as store:
        store.subscribe(lambda e, c: heard.append((e.seq, as_dicts(c))))

        def bad_subscriber(e, c):
            raise Boom("a subscriber raised")
        store.subscribe(bad_subscriber)
        consumer = store.consumer("c")
        for kind, *args in ops:
            if kind == "consume":  # reading renews the lease (a write): before the dump
                unacked = [e for e, _ in consumer]
            head, before = store.head, dump(store)
            position = consumer.position
            # dispatch() commits before a middleware raising after next(); a batch does not
            committed_then_raised = (AfterNext,) if kind in ("dispatch", "consume") else ()
            try:
                if kind == "consume":  # exactly-once: the ack only with the dispatch
                    ev, k = args
                    ack = unacked[min(k, len(unacked) - 1)] if unacked else 0
                    consumer.dispatch(dict(ev), ack=ack)
                    assert consumer.position == max(position, getattr(ack, "seq", 0))
                elif kind == "dispatch":
                    ev, stale = args
                    expect = None if stale is None else abs(head + stale)
                    store.dispatch(dict(ev), expect_seq=expect)
                elif kind == "many":
                    evs, stale = args
                    expect = None if stale is None else abs(head + stale)
                    store.dispatch_many([dict(e) for e in evs], expect_seq=expect)
                elif kind == "restore":
                    table, key, at = args
                    if table != "kids":
                        key = key if isinstance(key, int) else key[0]
                    elif isinstance(key, int):
                        key = [key, "x"]
                    store.restore(table, key, at=min(at, head) if at else None)
                else:
                    (at,) = args
                    FAIL_REPLAY_AT[0] = max(1, head - at) if head and at < 8 else None
                    try:
                        store.rebuild()
                    finally:
                        FAIL_REPLAY_AT[0] = None
            except committed_then_raised:
                # dispatch(): the event committed (or was a retry of a logged id),
                # then the middleware raised
                # (a retry with ack= acknowledges in its transaction: nothing else changes)
                assert store.head == head + 1 or (store.head == head and (
                    kind == "consume" or dump(store) == before))
            except (fluxlite.FluxliteError, Boom, AfterNext) as exc:
                assert kind != "rebuild" or isinstance(exc, fluxlite.ReducerError)
                after = dump(store)
                statistic(f"{kind}: {type(exc).__name__}" + (f" {str(exc)[:60]}" if kind == "consume" and isinstance(exc, fluxlite.UsageError) else ""))
                assert after == before, f"{kind} failed with {exc!r} but changed the store"
                assert store.head == head and consumer.position == position
            assert [e.seq for e in store.events()] == list(range(1, store.head + 1))
        consumer.close()
        store.verify()
        # the store goes on: the next event is the next seq
        head = store.head
        assert store.dispatch("apply", {"c": []}).seq == head + 1
        # every committed event was heard once, in order, with the changes as logged
        assert [s for s, _ in heard] == list(range(1, store.head + 1))
        for seq, changes in heard:
            assert changes == as_dicts(store.changes(seq))


def store_rows(view):
    return {t: view[t].all() for t in ("parents", "kids", "links")}


def attempt(store, ev, many):
    """Dispatch, ignoring refusals (the all-or-nothing property checks those)."""
    try:
        if many:
            store.dispatch_many([dict(e) for e in ev])
        else:
            store.dispatch(dict(ev))
    except (fluxlite.FluxliteError, Boom, AfterNext):
        pass


# changes that mostly apply (unique names, references to parents that mostly exist),
# so that many events make several changes
likely = st.one_of(
    st.builds(lambda i, v: {"op": "upsert", "table": "parents",
                            "values": {"id": i, "name": f"p{i}", "n": v}}, pid, st.integers(0, 3)),
    st.builds(lambda k, v: {"op": "upsert", "table": "kids",
                            "values": {"pid": k[0] % 2 + 1, "k": k[1], "v": v}},
              kid_key, st.integers(0, 3)),
    st.builds(lambda a, b: {"op": "upsert", "table": "links", "values": {"a": a, "b": b}},
              st.integers(1, 3), st.integers(1, 2)),
    st.builds(lambda k: {"op": "delete", "table": "kids", "key": [k[0] % 2 + 1, k[1]],
                         "if_exists": True}, kid_key),
    st.builds(lambda a: {"op": "delete", "table": "links", "key": a, "if_exists": True},
              st.integers(1, 3)),
)
likely_event = st.builds(
    lambda first, c: {"type": "apply", "payload": {"c": first + c}},
    st.sampled_from([[], [{"op": "upsert", "table": "parents",
                           "values": {"id": i, "name": f"p{i}", "n": 0}} for i in (1, 2)]]),
    st.lists(likely, min_size=1, max_size=4))
some_event = st.one_of(event, likely_event, likely_event)
writes = st.lists(st.one_of(st.tuples(some_event, st.just(False)),
                            st.tuples(st.lists(some_event, max_size=3), st.just(True))),
                  max_size=10)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=writes, data=st.data())
def test_subscribers_changes_followers_consumers_and_replays_agree(ops, data):
    """Equivalence: for every committed event, what subscribers got == changes(seq) ==
    what follow() yields (here and in a second store on the file) == what the second
    store's watch() tells its subscribers == what a Consumer yields; replay() equals
    the live model and at(k) equals replay(k)."""
    heard, heard_there = [], []
    seconds = itertools.count()
    def clock():  # a coarse clock: several events share a ts
        return datetime(2030, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=next(seconds) // 3)

    with tempfile.TemporaryDirectory() as directory, opened(directory, clock=clock) as store, \
            opened(directory) as other:
        def echo(e, c):  # a subscriber may dispatch: heard after the current event
            if e.type == "apply" and e.seq % 3 == 0:
                store.dispatch("echo", {"of": e.seq})
        store.subscribe(echo)
        store.subscribe(lambda e, c: heard.append((e, as_dicts(c))))
        other.subscribe(lambda e, c: heard_there.append((e, as_dicts(c))))
        other.watch()
        for ev, many in ops:
            attempt(store, ev, many)
            if data.draw(st.booleans()):  # the other store writes too, now and then
                attempt(other, data.draw(event), False)
        head = store.head
        logged = [(e, as_dicts(store.changes(e.seq))) for e in store.events()]
        statistic(f"events with 2+ changes: {sum(len(c) > 1 for _, c in logged) > 2}")
        assert [e.seq for e, _ in logged] == list(range(1, head + 1))
        # heard here: this store's own commits (nothing is watched here)
        mine = {e.seq for e, _ in heard}
        assert heard == [x for x in logged if x[0].seq in mine]
        for s in (store, other):
            followed = [(e, as_dicts(c)) for e, c in s.follow(after=0, timeout=0)]
            assert followed == logged
            k = data.draw(st.integers(0, head))
            assert [(e, as_dicts(c)) for e, c in s.follow(after=k, timeout=0)] == logged[k:]
            assert [(e, as_dicts(c)) for e, c in s.follow(after=k, types="echo", timeout=0)] \
                == [x for x in logged[k:] if x[0].type == "echo"]
        other._notify()
        for _ in range(500):  # the watcher delivers what this store committed
            if len(heard_there) >= head:
                break
            import time
            time.sleep(0.01)
        assert heard_there == logged
        with other.consumer("c") as consumer:
            consumed = [(e, as_dicts(c)) for e, c in consumer]
        assert consumed == logged
        with other.consumer("echoes", types=["echo"]) as consumer:
            consumed = [(e, as_dicts(c)) for e, c in consumer]
        assert consumed == [x for x in logged if x[0].type == "echo"]
        with store.replay() as replayed:
            assert store_rows(replayed.view) == store_rows(store.view)
        k = data.draw(st.integers(0, head))
        with store.at(k) as past:
            try:
                replayed = store.replay(k)
            except fluxlite.ChangesetError as exc:  # documented: k inside a batch whose
                assert "deferred references hold only at that end" in str(exc)  # refs
                replayed = None                                     # hold at its end
            if replayed is not None:
                with replayed:
                    assert store_rows(past) == store_rows(replayed.view)
        if head:  # at(time=) is at() of the last event with ts <= time (a batch shares one)
            ts = store.event(data.draw(st.integers(1, head))).ts
            with store.at(time=ts) as then:
                assert then.seq == max(e.seq for e in store.events() if e.ts <= ts)
        # a rebuild rewrites the model and journal as they were: the same changes
        store.rebuild()
        assert [(e, as_dicts(store.changes(e.seq))) for e in store.events()] == logged
        store.verify()


mixed = st.lists(st.one_of(
    st.tuples(st.just("dispatch"), event),
    st.tuples(st.just("many"), st.lists(event, max_size=4)),
    st.tuples(st.just("retry"), st.integers(0, 50)),  # an idempotent retry of a logged event
    st.tuples(st.just("preview"), event),
    st.tuples(st.just("fork"), st.lists(event, min_size=1, max_size=3)),
    st.tuples(st.just("checkpoint")),
    st.tuples(st.just("reset")),
    st.tuples(st.just("restore"), st.sampled_from(["parents", "links"]), pid),
    st.tuples(st.just("next")),  # an event that always commits: the next seq
), max_size=14)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=mixed, on_disk=st.booleans())
def test_mixed_operations_keep_one_gap_free_log(ops, on_disk):
    """Order is total and gap-free under dispatch, dispatch_many (duplicate ids,
    retries), restore, preview (never commits), fork (the original unchanged by
    writes to the fork) and checkpoint/reset_to (back byte for byte)."""
    with tempfile.TemporaryDirectory() as directory:
        if on_disk:
            store = fluxlite.open(os.path.join(directory, "m.db"), schema=SCHEMA,
                                  reducer=reducer, middleware=[middleware], durability="normal")
        else:
            store = fluxlite.open(":memory:", schema=SCHEMA, reducer=reducer,
                                  middleware=[middleware])
        checkpoints = []
        try:
            for kind, *args in ops:
                head, before = store.head, dump(store)
                if kind == "dispatch":
                    attempt(store, args[0], False)
                elif kind == "many":
                    attempt(store, args[0], True)
                    if store.head > head:  # committed: ids given twice were applied once
                        given_ids = [e["id"] for e in args[0] if "id" in e]
                        new = [e for e in store.events(after=head)]
                        assert len({e.id for e in new}) == len(new)
                        assert not (set(given_ids) & {e.id for e in store.events() if e.seq <= head}
                                    & {e.id for e in new})
                elif kind == "retry":
                    if head:
                        old = store.event(args[0] % head + 1)
                        again = store.dispatch(old.type, old.payload, id=old.id)
                        assert again == old and store.head == head and dump(store) == before
                        assert store.dispatch_many([{"type": old.type, "payload": old.payload,
                                                     "id": old.id}] * 2) == [old, old]
                        assert store.head == head and dump(store) == before
                elif kind == "preview":
                    try:
                        previewed, changes = store.preview(dict(args[0]))
                    except (fluxlite.FluxliteError, Boom, AfterNext):
                        assert dump(store) == before
                        continue
                    assert dump(store) == before and store.head == head
                    if previewed is not None and previewed.seq == head + 1:
                        # dispatched now, it commits what the preview showed
                        ev = dict(args[0])
                        heard = []
                        undo = store.subscribe(lambda e, c, heard=heard: heard.append(as_dicts(c)))
                        try:
                            committed = store.dispatch(ev)
                        finally:
                            undo()
                        assert committed.seq == head + 1
                        assert (committed.type, committed.payload) == (previewed.type,
                                                                     previewed.payload)
                        assert heard == [as_dicts(changes)]
                elif kind == "fork":
                    fork = store.fork(os.path.join(directory, f"fork{len(os.listdir(directory))}.db")
                                      if on_disk else ":memory:")
                    try:
                        assert dump(fork) == before  # the same store
                        for ev in args[0]:
                            attempt(fork, ev, False)
                        fork.dispatch("apply", {"c": []})
                        assert [e.seq for e in fork.events()] == list(range(1, fork.head + 1))
                        assert fork.head > head
                        fork.verify()
                    finally:
                        fork.close()
                    assert dump(store) == before and store.head == head
                elif kind == "checkpoint":
                    checkpoints.append((store.checkpoint(), before, head))
                elif kind == "reset":
                    if checkpoints:
                        cp, then, then_head = checkpoints[-1]
                        store.reset_to(cp)
                        assert but_generation(dump(store)) == but_generation(then)
                        assert store.head == then_head
                    closed = store.checkpoint()
                    closed.close()
                    reset = dump(store)
                    with pytest.raises(fluxlite.UsageError, match="cannot be read"):
                        store.reset_to(closed)  # refused whole
                    assert dump(store) == reset
                elif kind == "next":
                    assert store.dispatch("apply", {"c": []}).seq == head + 1
                else:
                    table, key = args
                    try:
                        store.restore(table, key)
                    except (fluxlite.FluxliteError, Boom, AfterNext):
                        assert dump(store) == before
                logged = list(store.events())
                assert [e.seq for e in logged] == list(range(1, store.head + 1))
                assert [e.ts for e in logged] == sorted(e.ts for e in logged)  # never decreasing
                assert store.head >= head or kind == "reset"
            store.verify()
            head = store.head
            assert store.dispatch("apply", {"c": []}).seq == head + 1
        finally:
            for cp, *_ in checkpoints:
                cp.close()
            store.close()


def test_a_preview_refuses_what_a_deferred_reference_would_refuse_at_commit():
    # preview() never commits, so SQLite never checked its DEFERRABLE INITIALLY DEFERRED
    # references: it showed changes that dispatch() then refused at COMMIT, though a
    # preview's "refusal or error is raised exactly as dispatch() would raise it".
    # Found by test_mixed_operations_keep_one_gap_free_log.
    schema = """CREATE TABLE p (id INTEGER PRIMARY KEY);
    CREATE TABLE c (id INTEGER PRIMARY KEY,
                    p INTEGER REFERENCES p(id) DEFERRABLE INITIALLY DEFERRED);"""

    def r(view, event):
        if event.type == "parent":
            return view.p.insert(id=9)
        return view.c.insert(id=event.payload, p=9)

    with fluxlite.open(":memory:", schema=schema, reducer=r) as store:
        before = dump(store)
        with pytest.raises(fluxlite.ChangesetError, match="deferred constraint"):
            store.dispatch("child", 1)
        with pytest.raises(fluxlite.ChangesetError, match="deferred constraint"):
            store.preview("child", 1)
        assert dump(store) == before and store.head == 0
        store.dispatch("parent")
        _, changes = store.preview("child", 1)  # now it would commit: so it previews
        assert [c.op for c in changes] == ["insert"] and store.head == 1
        assert store.dispatch("child", 1).seq == 2
        store.verify()


two_stores = st.lists(st.tuples(st.integers(0, 1), st.one_of(
    st.tuples(st.just("dispatch"), event),
    st.tuples(st.just("many"), st.lists(event, max_size=3)),
    st.tuples(st.just("rebuild")),
    st.tuples(st.just("checkpoint")),
    st.tuples(st.just("reset")),
    st.tuples(st.just("restore"), st.sampled_from(["parents", "links"]), pid),
    st.tuples(st.just("preview"), event),
    st.tuples(st.just("next")),  # an event that always commits: the next seq
)), max_size=14)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=two_stores, data=st.data())
def test_two_stores_on_one_file_keep_one_log_through_rebuilds_and_resets(ops, data):
    """Two stores on one file, each dispatching, rebuilding, resetting (to a checkpoint
    either took), restoring and previewing: one gap-free log, each store's writes
    land after the other's, a failed write changes nothing, and both read the same."""
    with tempfile.TemporaryDirectory() as directory, opened(directory) as a, \
            opened(directory) as b:
        stores, checkpoints = (a, b), []
        for who, (kind, *args) in ops:
            store = stores[who]
            head, before = store.head, dump(store)
            committed_then_raised = (AfterNext,) if kind == "dispatch" else ()
            try:
                if kind == "dispatch":
                    store.dispatch(dict(args[0]))
                elif kind == "many":
                    store.dispatch_many([dict(e) for e in args[0]])
                elif kind == "rebuild":
                    store.rebuild()
                elif kind == "checkpoint":
                    checkpoints.append((store.checkpoint(), before, head))
                elif kind == "reset":
                    if checkpoints:
                        cp, then, then_head = checkpoints[-1]
                        store.reset_to(cp)
                        assert dump(a) == dump(b) and a.head == b.head == then_head
                        assert but_generation(dump(a)) == but_generation(then)
                elif kind == "restore":
                    store.restore(*args)
                elif kind == "next":
                    assert store.dispatch("apply", {"c": []}).seq == head + 1
                else:
                    store.preview(dict(args[0]))
                    assert dump(store) == before
            except committed_then_raised:
                pass  # committed (or a retry of a logged id), then the middleware raised
            except (fluxlite.FluxliteError, Boom, AfterNext) as exc:
                assert dump(store) == before, f"{kind} failed with {exc!r} but changed the store"
            assert a.head == b.head
            assert [e.seq for e in a.events()] == list(range(1, a.head + 1))
            assert dump(a) == dump(b)
            assert store_rows(a.view) == store_rows(b.view)
        for store in stores:
            store.verify()
            assert store.dispatch("apply", {"c": []}).seq == a.head == b.head
            k = data.draw(st.integers(0, store.head))
            with store.at(k) as past, store.replay(k) as replayed:
                assert store_rows(past) == store_rows(replayed.view)
        for cp, *_ in checkpoints:
            cp.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(given_events=st.lists(some_event, max_size=6),
       candidates=st.lists(st.tuples(some_event, st.sampled_from([None, 0, -1])), min_size=1,
                           max_size=6))
def test_a_preview_is_what_the_dispatch_then_does(given_events, candidates):
    """preview() returns what dispatch() would commit (event and changes), or raises what
    it would raise (README: "A refusal or error is raised exactly as dispatch() would
    raise it"), and keeps nothing."""
    with fluxlite.open(":memory:", schema=SCHEMA, reducer=reducer,
                       middleware=[middleware]) as store:
        for ev in given_events:
            attempt(store, ev, False)
        heard = []
        store.subscribe(lambda e, c: heard.append(as_dicts(c)))
        for ev, stale in candidates:
            head, before = store.head, dump(store)
            expect = None if stale is None else abs(head + stale)
            try:
                previewed, changes = store.preview(dict(ev), expect_seq=expect)
                outcome = ("ok", previewed.seq, previewed.type, previewed.payload,
                           previewed.meta, as_dicts(changes))
            except (fluxlite.FluxliteError, Boom, AfterNext) as exc:
                outcome = ("error", type(exc))
            assert dump(store) == before and heard == []
            try:
                committed = store.dispatch(dict(ev), expect_seq=expect)
                expected = ("ok", committed.seq, committed.type, committed.payload,
                            committed.meta, heard[0] if heard else [])
            except (fluxlite.FluxliteError, Boom, AfterNext) as exc:
                expected = ("error", type(exc))
            assert outcome == expected
            heard.clear()
        store.verify()


def test_a_follower_yields_nothing_of_the_history_a_reset_erased(tmp_path):
    # follow() reads the log in batches; one read before reset_to() went on being
    # yielded after it: an event the reset had erased, then the checkpoint's next seq
    # again (seqs 1, 2, 3, 2, 3, 4), where README says "this store's followers go on
    # from the checkpoint's head". Found while probing reset_to() with followers.
    with opened(str(tmp_path)) as store:
        store.dispatch("apply", {"c": []})
        checkpoint = store.checkpoint()
        follower = store.follow(after=0, timeout=0.1)
        assert next(follower)[0].seq == 1
        store.dispatch("apply", {"c": []}, id="erased-2")
        store.dispatch("apply", {"c": []}, id="erased-3")
        assert next(follower)[0].id == "erased-2"  # read together with erased-3
        store.reset_to(checkpoint)
        for n in (2, 3, 4):
            store.dispatch("apply", {"c": []}, id=f"new-{n}")
        assert [e.id for e, _ in follower] == ["new-2", "new-3", "new-4"]
        checkpoint.close()


# --- stateful: one on-disk store driven through the public API against a plain model ---
#
# A RuleBasedStateMachine mixes dispatch, dispatch_many, refused dispatches (a reducer
# raising, a stale expect_seq, an id reused with other content, a changeset the model
# refuses), restore, checkpoint/reset_to, rebuild (also by a new version=), close and
# reopen, and checks after every step: the live tables, a subscriber's mirror built
# from the changes it heard, at(k), history(), events(after, types=), event() and head
# against a plain-Python model of what the store must hold.

SM_SCHEMA = """
CREATE TABLE items (cat TEXT NOT NULL, n INTEGER NOT NULL, v INTEGER CHECK (v >= 0),
                    PRIMARY KEY (cat, n));
CREATE TABLE tags (name TEXT PRIMARY KEY, note TEXT DEFAULT 'none');
"""
SM_KEYS = {"items": ("cat", "n"), "tags": ("name",)}
SM_COLUMNS = {"items": ("cat", "n", "v"), "tags": ("name", "note")}
SM_DEFAULTS = {"items": {"v": None}, "tags": {"note": "none"}}


def sm_reducer(view, event):
    """Changes straight from the payload, so that hypothesis picks them."""
    if event.type != "apply":
        return None  # "noop": logged, no changes
    p = event.payload
    if p.get("boom"):
        raise Boom("the reducer raised")
    return [Change(op, table, key, values) for op, table, key, values in p["c"]]


class SmRefused(Exception):
    """The model refuses the event (the store must raise a FluxliteError, change nothing)."""


def sm_key(table, row):
    return tuple(row[c] for c in SM_KEYS[table])


def sm_value(v):
    """INTEGER affinity: 2.0 is stored as 2."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def sm_apply_change(state, journal, seq, op, table, key, values):
    rows = state[table]
    if op in ("insert", "upsert"):
        values = {c: sm_value(v) for c, v in values.items()}
        key = sm_key(table, values)
        if key in rows and op == "insert":
            raise SmRefused("insert of an existing key")
        if key in rows:
            op, values = "update", {c: v for c, v in values.items() if c not in SM_KEYS[table]}
        else:
            row = {**SM_DEFAULTS[table], **values}
            row = {c: row[c] for c in SM_COLUMNS[table]}
            if table == "items" and row["v"] is not None and row["v"] < 0:
                raise SmRefused("CHECK")
            rows[key] = row
            journal.append((table, key, seq, "insert", None, dict(row)))
            return
    else:
        key = tuple(key) if isinstance(key, list) else (key,)
    if key not in rows:
        raise SmRefused(f"{op} of a missing key")
    before = rows[key]
    if op == "delete":
        del rows[key]
        journal.append((table, key, seq, "delete", dict(before), None))
        return
    if any(c in SM_KEYS[table] or c not in SM_COLUMNS[table] for c in values):
        raise SmRefused("an update of a key column, or of a column not in the table")
    row = {**before, **{c: sm_value(v) for c, v in values.items()}}
    if table == "items" and row["v"] is not None and row["v"] < 0:
        raise SmRefused("CHECK")
    rows[key] = row
    journal.append((table, key, seq, "update", dict(before), dict(row)))


def sm_copy(state):
    return {t: {k: dict(r) for k, r in rows.items()} for t, rows in state.items()}


sm_cat = st.sampled_from(["a", "b"])
sm_n = st.integers(1, 2)
sm_v = st.sampled_from([None, 0, 1, 2, 2.0, 2.5, -1])  # -1 breaks the CHECK
sm_name = st.sampled_from(["x", "y", "X"])
sm_note = st.sampled_from(["p", "q", None])
sm_change = st.one_of(
    st.builds(lambda c, n, v: ["insert", "items", None, {"cat": c, "n": n, "v": v}], sm_cat, sm_n, sm_v),
    st.builds(lambda c, n, v: ["upsert", "items", None, {"cat": c, "n": n, "v": v}], sm_cat, sm_n, sm_v),
    st.builds(lambda c, n: ["upsert", "items", None, {"cat": c, "n": n}], sm_cat, sm_n),
    st.builds(lambda c, n, v: ["update", "items", [c, n], {"v": v}], sm_cat, sm_n, sm_v),
    st.builds(lambda c, n: ["delete", "items", [c, n], None], sm_cat, sm_n),
    st.builds(lambda k, v: ["insert", "tags", None, {"name": k, "note": v}], sm_name, sm_note),
    st.builds(lambda k: ["insert", "tags", None, {"name": k}], sm_name),
    st.builds(lambda k, v: ["upsert", "tags", None, {"name": k, "note": v}], sm_name, sm_note),
    st.builds(lambda k, v: ["update", "tags", k, {"note": v}], sm_name, sm_note),
    st.builds(lambda k: ["delete", "tags", k, None], sm_name),
    st.builds(lambda k, k2: ["update", "tags", k, {"name": k2}], sm_name, sm_name),
    st.builds(lambda c, n: ["update", "items", [c, n], {"nope": 1}], sm_cat, sm_n),
)
sm_event = st.builds(
    lambda kind, c, boom, id: {"type": kind, "payload": {"c": c, **({"boom": True} if boom else {})},
                               **({"id": id} if id else {})},
    st.sampled_from(["apply"] * 6 + ["noop"]), st.lists(sm_change, max_size=3),
    st.sampled_from([False] * 12 + [True]), st.sampled_from([None] * 6 + ["id-1", "id-2", "id-3"]))
sm_expect = st.sampled_from([None, None, None, "head", -1, 1])
SM_ROWS = [("items", (c, n)) for c in "ab" for n in (1, 2)] + [("tags", (k,)) for k in "xyX"]


class LoggedStoreMachine(RuleBasedStateMachine):
    """One store on disk against a plain model: every state by seq, every journal row."""

    checkpoints = Bundle("checkpoints")

    def __init__(self):
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "sm.db")
        self.version = 1
        self.ticks = itertools.count()
        self.store = None
        self.open_store()
        self.states = [{"items": {}, "tags": {}}]  # states[k]: the tables right after seq k
        self.events = []  # (seq, id, type, payload)
        self.journal = []  # (table, key, seq, op, before, after), in order
        self.mirror = {"items": {}, "tags": {}}
        self.open_checkpoints = []

    # -- the store and its subscriber

    def open_store(self):
        self.store = fluxlite.open(self.path, schema=SM_SCHEMA, reducer=sm_reducer,
                                   version=self.version, durability="normal", clock=self.clock)
        self.store.subscribe(self.heard)

    def clock(self):  # several events share a ts
        return datetime(2030, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=next(self.ticks) // 3)

    def heard(self, event, changes):
        for c in changes:
            key = tuple(c.key) if isinstance(c.key, (list, tuple)) else (c.key,)
            rows = self.mirror[c.table]
            if c.op == "insert":
                assert key not in rows, (event.seq, c)
                rows[key] = dict(c.values)
            elif c.op == "update":
                rows[key].update(c.values)
            else:
                assert c.op == "delete", c
                del rows[key]

    def live(self):
        return {t: {sm_key(t, r): r for r in self.store.view[t].all()} for t in ("items", "tags")}

    @property
    def model(self):
        return self.states[-1]

    # -- the model of a dispatch

    def expected(self, batch, expect_seq):
        """The model after `batch` (a list of event dicts): (state, new events, journal),
        or raises SmRefused. An id already logged (or earlier in the batch) with the same
        type and payload is that event again; with other content a Conflict. expect_seq
        is checked before the first new event (a retry of a logged one returns it, as it
        did when it committed), or for an empty batch."""
        if expect_seq not in (None, len(self.events)) and not batch:
            raise SmRefused("stale expect_seq")
        state, journal, new, seq = sm_copy(self.model), [], [], len(self.events)
        seen = {e[1]: e for e in self.events}
        states = []
        returned = []
        for ev in batch:
            old = seen.get(ev.get("id"))
            if old is not None:
                if (old[2], old[3]) != (ev["type"], ev["payload"]):
                    raise SmRefused("an id reused with other content")
                returned.append(old[0])
                continue
            if expect_seq not in (None, len(self.events)):
                raise SmRefused("stale expect_seq")
            seq += 1
            if ev["type"] == "apply" and ev["payload"].get("boom"):
                raise SmRefused("the reducer raised")
            if ev["type"] == "apply":
                for op, table, key, values in ev["payload"]["c"]:
                    sm_apply_change(state, journal, seq, op, table, key, values)
            new.append((seq, ev.get("id"), ev["type"], ev["payload"]))
            if ev.get("id"):
                seen[ev["id"]] = new[-1]
            states.append(sm_copy(state))
            returned.append(seq)
        return states, new, journal, returned

    def commit(self, states, new, journal, result):
        """The store committed: take the ids it gave, the states and the journal."""
        by_seq = {e.seq: e for e in result}
        for seq, id, kind, payload in new:
            assert by_seq[seq].id == id or id is None
            self.events.append((seq, by_seq[seq].id, kind, payload))
        self.states.extend(states)
        self.journal.extend(journal)

    def run(self, batch, many, expect):
        head = len(self.events)
        expect_seq = {None: None, "head": head, -1: head - 1, 1: head + 1}[expect]
        if expect_seq is not None and expect_seq < 0:
            expect_seq = None
        try:
            outcome = self.expected(batch, expect_seq)
        except SmRefused as exc:
            before = dump(self.store)
            with pytest.raises(fluxlite.FluxliteError):
                if many:
                    self.store.dispatch_many([dict(e) for e in batch], expect_seq=expect_seq)
                else:
                    self.store.dispatch(dict(batch[0]), expect_seq=expect_seq)
            assert dump(self.store) == before, f"refused ({exc}) but changed the store"
            statistic(f"refused: {exc}")
            return
        if many:
            result = self.store.dispatch_many([dict(e) for e in batch], expect_seq=expect_seq)
        else:
            result = [self.store.dispatch(dict(batch[0]), expect_seq=expect_seq)]
        states, new, journal, returned = outcome
        assert [e.seq for e in result] == returned
        self.commit(states, new, journal, result)

    # -- rules

    @rule(ev=sm_event, expect=sm_expect)
    def dispatch(self, ev, expect):
        self.run([ev], False, expect)

    @rule(batch=st.lists(sm_event, max_size=4), expect=sm_expect)
    def dispatch_many(self, batch, expect):
        self.run(batch, True, expect)

    @rule(data=st.data(), many=st.booleans())
    def dispatch_likely(self, data, many):
        """Events that mostly commit: whole-row upserts, deletes of rows there are."""
        batch = []
        for _ in range(data.draw(st.integers(1, 3 if many else 1))):
            there = [(t, k) for t in ("items", "tags") for k in self.model[t]]
            changes = []
            for _ in range(data.draw(st.integers(1, 3))):
                if there and data.draw(st.integers(0, 3)) == 0:
                    table, key = data.draw(st.sampled_from(there))
                    changes.append(["delete", table, list(key) if table == "items" else key[0], None])
                elif data.draw(st.booleans()):
                    changes.append(["upsert", "items", None, {"cat": data.draw(sm_cat), "n": data.draw(sm_n),
                                                             "v": data.draw(st.integers(0, 2))}])
                else:
                    changes.append(["upsert", "tags", None, {"name": data.draw(sm_name),
                                                            "note": data.draw(sm_note)}])
            batch.append({"type": "apply", "payload": {"c": changes}})
        self.run(batch, many, None)

    @rule(data=st.data())
    def retry_a_logged_event(self, data):
        if not self.events:
            return
        seq, id, kind, payload = data.draw(st.sampled_from(self.events))
        before = dump(self.store)
        assert self.store.dispatch(kind, payload, id=id).seq == seq
        # a retry with the expect_seq its first dispatch passed: the stored event again
        assert self.store.dispatch(kind, payload, id=id, expect_seq=seq - 1).seq == seq
        with pytest.raises(fluxlite.Conflict):
            self.store.dispatch(kind, {"other": payload}, id=id)
        assert dump(self.store) == before

    @rule(row=st.sampled_from(SM_ROWS), data=st.data())
    def restore(self, row, data):
        table, key = row
        at = data.draw(st.one_of(st.none(), st.integers(0, len(self.events))))
        if at is None:
            deletions = [j for j in self.journal if j[:2] == (table, key) and j[3] == "delete"]
            version = deletions[-1][4] if deletions else None
        else:
            version = self.states[at][table].get(key)
        arg = key if table == "items" else key[0]
        if version is None or self.model[table].get(key) == version:
            before = dump(self.store)
            with pytest.raises(fluxlite.UsageError):
                self.store.restore(table, arg, at=at)
            assert dump(self.store) == before
            return
        state, journal, seq = sm_copy(self.model), [], len(self.events) + 1
        op = "update" if key in state[table] else "insert"
        before = state[table].get(key)
        state[table][key] = dict(version)
        journal.append((table, key, seq, op, before and dict(before), dict(version)))
        event = self.store.restore(table, arg, at=at)
        statistic(f"restored ({op}, at={'given' if at is not None else 'None'})")
        assert event.seq == seq and event.type == fluxlite.RESTORE
        self.commit([state], [(seq, None, event.type, event.payload)], journal, [event])

    @rule(target=checkpoints)
    def checkpoint(self):
        cp = self.store.checkpoint()
        self.open_checkpoints.append(cp)
        return (cp, self.version, len(self.events), list(self.states), list(self.events),
                list(self.journal))

    @rule(saved=checkpoints)
    def reset_to(self, saved):
        cp, version, head, states, events, journal = saved
        if version != self.version:  # taken before a rebuild to another version
            before = dump(self.store)
            with pytest.raises(fluxlite.UsageError):
                self.store.reset_to(cp)
            assert dump(self.store) == before
            return
        self.store.reset_to(cp)
        statistic(f"reset_to a checkpoint {len(self.events) - head} events back")
        self.states, self.events, self.journal = list(states), list(events), list(journal)
        # subscribers are not told: a mirror is refilled from the store (README)
        self.mirror = sm_copy(self.live())

    @rule()
    def rebuild(self):
        self.store.rebuild()

    @rule(bump=st.booleans())
    def reopen(self, bump):
        self.store.close()
        self.version += bump
        self.open_store()

    @rule()
    def verify(self):
        self.store.verify()

    # -- reads of the past, checked against the model

    @rule(row=st.sampled_from(SM_ROWS), data=st.data())
    def read_the_past(self, row, data):
        self.at(data)
        self.history(row, data)
        self.events_and_event(data)
        self.changes_and_follow(data)

    def changes_and_follow(self, data):
        """changes(seq) and follow(): the journal's rows of each event, as the model made them."""
        def ops(changes):
            return [(c.op, c.table, tuple(c.key) if isinstance(c.key, (list, tuple)) else (c.key,))
                    for c in changes]
        after = data.draw(st.integers(0, len(self.events)))
        want = [(seq, [(j[3], j[0], j[1]) for j in self.journal if j[2] == seq])
                for seq, *_ in self.events[after:]]
        assert [(seq, ops(self.store.changes(seq))) for seq, _ in want] == want
        assert [(e.seq, ops(c)) for e, c in self.store.follow(after=after, timeout=0)] == want

    def at(self, data):
        k = data.draw(st.integers(0, len(self.events)))
        with self.store.at(k) as past:
            got = {t: {sm_key(t, r): r for r in past[t].all()} for t in ("items", "tags")}
        assert got == self.states[k], k
        if self.events:  # at(time=): after the last event with ts <= time
            seq = data.draw(st.integers(1, len(self.events)))
            ts = self.store.event(seq).ts + timedelta(microseconds=data.draw(st.sampled_from([-1, 0, 1])))
            want = max([e.seq for e in self.store.events() if e.ts <= ts], default=0)
            with self.store.at(time=ts) as then:
                assert then.seq == want
                got = {t: {sm_key(t, r): r for r in then[t].all()} for t in ("items", "tags")}
            assert got == self.states[want]

    def history(self, row, data):
        table, key = row
        want = [j[2:] for j in self.journal if j[:2] == (table, key)]
        arg = key if table == "items" else key[0]
        got = [(r.seq, r.op, r.before, r.after) for r in self.store.history(table, arg)]
        assert got == want
        head = len(self.events)
        after = data.draw(st.integers(0, head))
        upto = data.draw(st.one_of(st.none(), st.integers(0, head + 1)))
        limit = data.draw(st.one_of(st.none(), st.integers(0, 3)))
        reverse = data.draw(st.booleans())
        window = [w for w in want if after < w[0] and (upto is None or w[0] <= upto)]
        window = (window[::-1] if reverse else window)[:limit]
        got = [(r.seq, r.op, r.before, r.after) for r in
               self.store.history(table, arg, after=after, upto=upto, limit=limit, reverse=reverse)]
        assert got == window

    def events_and_event(self, data):
        head = len(self.events)
        after = data.draw(st.integers(0, head + 1))
        types = data.draw(st.one_of(st.none(), st.just("noop"),
                                    st.lists(st.sampled_from(["apply", "noop", fluxlite.RESTORE]),
                                             min_size=1, max_size=2)))
        wanted = None if types is None else {types} if isinstance(types, str) else set(types)
        got = [(e.seq, e.id, e.type, e.payload) for e in self.store.events(after, types=types)]
        assert got == [e for e in self.events if e[0] > after and (wanted is None or e[2] in wanted)]
        if self.events:
            seq, id, kind, payload = data.draw(st.sampled_from(self.events))
            assert self.store.event(seq) == self.store.event(id)
            assert (self.store.event(id).seq, self.store.event(seq).id, self.store.event(seq).type,
                    self.store.event(seq).payload) == (seq, id, kind, payload)
        assert self.store.event(head + 1) is None

    # -- after every step

    @invariant()
    def live_mirror_and_head_agree_with_the_model(self):
        live = self.live()
        assert live == self.model
        assert self.mirror == live
        assert self.store.head == len(self.events)
        stamps = [e.ts for e in self.store.events()]
        assert stamps == sorted(stamps)
        assert [e[0] for e in self.events] == list(range(1, len(self.events) + 1))

    def teardown(self):
        for cp in self.open_checkpoints:
            cp.close()
        if self.store is not None:
            self.store.close()
        self.dir.cleanup()


def _machine_tests(machine, examples):
    """A state machine's test for the default suite (``examples`` runs of 25 steps)
    and a longer one marked slow (100 runs of 50 steps)."""
    class Long(machine):
        pass

    quick, long = machine.TestCase, Long.TestCase
    for case, runs, steps in ((quick, examples, 25), (long, 100, 50)):
        case.settings = settings(
            max_examples=runs, stateful_step_count=steps, deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    return quick, pytest.mark.slow(long)


(test_one_store_against_a_model_through_the_public_api,
 test_one_store_against_a_model_long) = _machine_tests(LoggedStoreMachine, 10)


# --- statem: two Store objects on one file, followers, a consumer, generation ---
#
# The machine above, with a second Store object on the same file (another process,
# as far as the first can tell) that dispatches and resets too, a follower of each,
# a durable consumer, and store.generation, checked against the model after each
# step: a follower yields only events of the current history at their seqs, never
# past one it has not yielded; the consumer yields the current history after its
# acked (or seen-through) position, which a reset_to() of its store takes from the
# checkpoint; generation moves at a reset_to() or rebuild and at nothing else.


class TwoHandlesMachine(LoggedStoreMachine):

    def __init__(self):
        super().__init__()
        self.gen = self.store.generation
        self.open_the_rest()

    def open_the_rest(self):
        self.other = fluxlite.open(self.path, schema=SM_SCHEMA, reducer=sm_reducer,
                                   version=self.version, durability="normal", clock=self.clock)
        self.followers = {"here": self.store.follow(after=0, timeout=2),
                          "there": self.other.follow(after=0, timeout=2)}
        self.followed = {name: 0 for name in self.followers}  # the last seq yielded
        self.seen = {name: set() for name in self.followers}  # every (seq, id) yielded
        self.stale = {name: [] for name in self.followers}  # see read_followers
        self.open_mailer()

    def open_mailer(self):
        self.mailer = self.store.consumer("mailer", lease=600)
        self.acked = self.mailer.position
        self.delivered = self.acked  # what it yielded since: not again

    def close_the_rest(self):
        for follower in self.followers.values():
            follower.close()
        self.mailer.close()
        self.other.close()

    def heard_elsewhere(self):
        """The other store's commits and resets are not heard here: refill the mirror."""
        self.mirror = sm_copy(self.live())

    @rule(data=st.data())
    def dispatch_elsewhere(self, data):
        batch = [{"type": "apply", "payload": {"c": [["upsert", "tags", None, {
            "name": data.draw(sm_name), "note": data.draw(sm_note)}]]}}]
        if data.draw(st.booleans()):
            batch.append(data.draw(sm_event))
        try:
            outcome = self.expected(batch, None)
        except SmRefused:
            before = dump(self.store)
            with pytest.raises(fluxlite.FluxliteError):
                self.other.dispatch_many([dict(e) for e in batch])
            assert dump(self.store) == before
            return
        result = self.other.dispatch_many([dict(e) for e in batch])
        states, new, journal, returned = outcome
        assert [e.seq for e in result] == returned
        self.commit(states, new, journal, result)
        self.heard_elsewhere()

    @rule(target=LoggedStoreMachine.checkpoints)
    def checkpoint(self):
        return super().checkpoint() + (self.acked_in_file(), self.mailer)

    def acked_in_file(self):
        row = self.store.query("SELECT position FROM fluxlite_consumers WHERE name = 'mailer'")
        return row[0]["position"] if row else 0

    @rule(saved=LoggedStoreMachine.checkpoints, elsewhere=st.booleans())
    def reset_to(self, saved, elsewhere):
        cp, version, head, states, events, journal, acked, mailer = saved
        by = self.other if elsewhere else self.store
        if version != self.version:
            before = dump(self.store)
            with pytest.raises(fluxlite.UsageError):
                by.reset_to(cp)
            assert dump(self.store) == before
            return
        by.reset_to(cp)
        statistic(f"reset_to {'elsewhere' if elsewhere else 'here'}")
        # The follower of the store that did not reset may still yield the rest of a
        # batch it read before (as one in another process would): stale events.
        # (Of any history since it last yielded a fresh one: resets one after another.)
        self.stale["here" if elsewhere else "there"].append(self.events)
        self.states, self.events, self.journal = list(states), list(events), list(journal)
        self.heard_elsewhere()
        self.gen = self.expect_new_generation()
        if mailer is not self.mailer:  # its lease is not in the checkpoint: reopened (README)
            self.mailer.close()
            self.open_mailer()
            assert self.acked == acked
        else:  # from its position in the checkpoint: this store's consumer at once, the
            self.acked = self.delivered = acked  # other's at its next read (README)

    @rule(elsewhere=st.booleans())
    def reset_to_the_head(self, elsewhere):
        """A reset that erases nothing: followers holding part of a batch go on with it."""
        saved = self.checkpoint()
        try:
            self.reset_to(saved, elsewhere)
        finally:
            saved[0].close()
            self.open_checkpoints.remove(saved[0])

    def expect_new_generation(self):
        now = self.store.generation
        assert now != self.gen and self.other.generation == now
        return now

    @rule()
    def rebuild(self):
        super().rebuild()
        self.gen = self.expect_new_generation()

    @rule(bump=st.booleans())
    def reopen(self, bump):
        self.close_the_rest()
        super().reopen(bump)
        self.open_the_rest()
        if bump:  # a new version: rebuilt
            self.gen = self.expect_new_generation()

    @rule(data=st.data())
    def read_followers(self, data):
        for name, follower in self.followers.items():
            # Not more than it must yield: what it already yielded of this history may
            # not come again (this store's followers), or may (the other's, rewound).
            ahead = len([e for e in self.events[self.followed[name]:]
                         if e[:2] not in self.seen[name]])
            for _ in range(data.draw(st.integers(0, max(0, ahead)))):
                event, _ = next(follower)
                seq = event.seq
                now = self.events[seq - 1][:2] if len(self.events) >= seq else None
                if any(len(stale) >= seq and stale[seq - 1][:2] == (seq, event.id) != now
                       for stale in self.stale[name]):
                    assert seq == self.followed[name] + 1, (name, seq)
                    self.followed[name] = seq
                    continue
                self.stale[name] = []
                assert (seq, event.id) == self.events[seq - 1][:2], (name, seq)
                # Nothing of the current history before it that it never yielded.
                missed = [e[:2] for e in self.events[:seq - 1] if e[:2] not in self.seen[name]]
                assert not missed, (name, seq, missed)
                self.followed[name] = seq
                self.seen[name].add((seq, event.id))

    @rule(data=st.data())
    def consume(self, data):
        got = [e.seq for e, _ in self.mailer]
        start = max(self.acked, self.delivered)
        assert got == [e[0] for e in self.events[start:]]
        self.delivered = max(self.delivered, len(self.events))
        if self.acked <= len(self.events) and data.draw(st.booleans()):
            upto = data.draw(st.integers(self.acked, len(self.events)))
            self.mailer.ack(upto)
            self.acked = max(self.acked, upto)
            assert self.acked_in_file() == self.acked

    @rule(data=st.data())
    def at_replay_and_history(self, data):
        k = data.draw(st.integers(0, len(self.events)))
        with self.store.at(k) as past, self.store.replay(upto=k) as replayed:
            for table in ("items", "tags"):
                assert past[table].all() == replayed.view[table].all(), (k, table)
        table, key = data.draw(st.sampled_from(SM_ROWS))
        arg = key if table == "items" else key[0]
        # An event may change a row twice: the last revision of each seq is what at() shows.
        last = {revision.seq: revision.after for revision in self.store.history(table, arg)}
        for seq, after in last.items():
            with self.store.at(seq) as then:
                assert then[table].get(arg) == after

    @invariant()
    def both_stores_hold_one_gap_free_log(self):
        want = [(seq, id) for seq, id, *_ in self.events]
        for store in (self.store, self.other):
            assert [(e.seq, e.id) for e in store.events()] == want
            assert store.head == len(self.events)
        assert self.store.generation == self.other.generation == self.gen

    def teardown(self):
        self.close_the_rest()
        super().teardown()


(test_two_store_objects_followers_a_consumer_and_generation,
 test_two_store_objects_long) = _machine_tests(TwoHandlesMachine, 8)
