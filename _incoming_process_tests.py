"""Multi-process and crash tests (a fragment to merge into test_fluxlite.py).

Children are separate interpreters (``sys.executable -c``) that import
fluxlite from the repository root. Their reducers are the functions below,
sent as source text, so the parent verifies with exactly the code the
children ran.
"""

import inspect
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

import fluxlite

_REPO_ROOT = os.path.dirname(os.path.abspath(fluxlite.__file__))

_PROC_SCHEMA = """
CREATE TABLE tallies (worker TEXT PRIMARY KEY, n INTEGER NOT NULL, last_seq INTEGER NOT NULL);
CREATE TABLE items (id TEXT PRIMARY KEY, worker TEXT NOT NULL, k INTEGER NOT NULL);
"""


def _proc_reducer(view, event):
    """Counts each writer's events; rejects one that arrives out of its order."""
    worker, k = event.payload["worker"], event.payload["k"]
    tally = view.tallies.get(worker)
    n = tally["n"] if tally else 0
    if k != n:
        raise fluxlite.Rejected(f"{worker} sent k={k}, expected k={n}")
    changes = [
        view.tallies.upsert(worker=worker, n=n + 1, last_seq=event.seq),
        view.items.insert(id=event.id, worker=worker, k=k),
    ]
    if k % 7 == 6:  # deletes too, so the journal and replay see every op
        changes.append(view.items.delete(f"{worker}-{k - 3}"))
    return changes


def _batch_size(k):
    """How many events the crash child dispatches at once from k: 1 (dispatch) or 2-4."""
    return 1 if k % 3 == 0 else 1 + k % 4


def _child_script(body):
    """A child program: imports fluxlite, defines the shared schema and functions, runs body."""
    return "\n".join([
        "import os, sys, time",
        "import fluxlite",
        f"SCHEMA = {_PROC_SCHEMA!r}",
        textwrap.dedent(inspect.getsource(_proc_reducer)),
        textwrap.dedent(inspect.getsource(_batch_size)),
        textwrap.dedent(body),
    ])


def _spawn(script, *args, stdout=subprocess.DEVNULL, cwd):
    env = dict(os.environ, PYTHONPATH=_REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)],
                            cwd=str(cwd), env=env, stdout=stdout, stderr=subprocess.PIPE)


def _open_proc_store(path):
    return fluxlite.open(path, schema=_PROC_SCHEMA, reducer=_proc_reducer)


def _assert_log_gap_free(store):
    seqs = [event.seq for event in store.events()]
    assert seqs == list(range(1, len(seqs) + 1))
    return seqs


_WRITER = """
    path, worker, count, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    with fluxlite.open(path, schema=SCHEMA, reducer=_proc_reducer) as store:
        open(f"{go}.{worker}", "w").close()
        deadline = time.monotonic() + 30
        while not os.path.exists(go):  # the start line: every writer begins at once
            if time.monotonic() > deadline:
                sys.exit("no start signal")
            time.sleep(0.001)
        for k in range(count):
            store.dispatch("tick", {"worker": worker, "k": k}, id=f"{worker}-{k}")
"""


@pytest.mark.slow
def test_concurrent_processes_share_one_gap_free_log(tmp_path):
    workers, per_worker = [f"w{n}" for n in range(4)], 300
    path, go = tmp_path / "shared.db", tmp_path / "go"
    _open_proc_store(path).close()  # created once, so the children race on writes, not on creation
    procs = [_spawn(_child_script(_WRITER), path, w, per_worker, go, cwd=tmp_path)
             for w in workers]
    try:
        deadline = time.monotonic() + 30
        while not all(os.path.exists(f"{go}.{w}") for w in workers):
            assert time.monotonic() < deadline, "writers did not start"
            for proc in procs:
                assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.005)
        go.touch()
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err.decode()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    with _open_proc_store(path) as store:
        assert _assert_log_gap_free(store) == list(range(1, len(workers) * per_worker + 1))
        by_worker = {}
        for event in store.events():
            by_worker.setdefault(event.payload["worker"], []).append(event.payload["k"])
            assert event.id == f"{event.payload['worker']}-{event.payload['k']}"
        assert by_worker == {w: list(range(per_worker)) for w in workers}
        assert [(t["worker"], t["n"]) for t in store.view.tallies.all()] == [
            (w, per_worker) for w in workers]
        store.verify()


_CRASHER = """
    path, name = sys.argv[1], sys.argv[2]
    out = sys.stdout
    with fluxlite.open(path, schema=SCHEMA, reducer=_proc_reducer) as store:
        out.write("ready\\n")
        out.flush()
        k, deadline = 0, time.monotonic() + 20  # stops by itself if nobody kills it
        while time.monotonic() < deadline:
            size = _batch_size(k)
            batch = [{"type": "tick", "payload": {"worker": name, "k": k + i},
                      "id": f"{name}-{k + i}"} for i in range(size)]
            if size == 1:
                done = [store.dispatch(batch[0])]
            else:
                done = store.dispatch_many(batch)
            out.write("".join(f"{e.seq} {e.id}\\n" for e in done))  # after dispatch returned
            out.flush()
            k += size
"""


@pytest.mark.slow
def test_sigkill_mid_dispatch_loses_nothing_acknowledged(tmp_path):
    path = tmp_path / "crash.db"
    _open_proc_store(path).close()
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    reported = {}  # seq -> id, every commit any child acknowledged
    for round_ in range(5):
        report = tmp_path / f"round{round_}.out"
        with open(report, "wb") as sink:
            proc = _spawn(_child_script(_CRASHER), path, f"r{round_}", stdout=sink,
                          cwd=tmp_path)
        try:
            deadline = time.monotonic() + 20
            while not report.read_bytes().startswith(b"ready\n"):
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "child did not open the store"
                time.sleep(0.002)
            time.sleep(rng.uniform(0.05, 0.5))
            assert proc.poll() is None, proc.stderr.read().decode()
            proc.kill()  # SIGKILL on POSIX: no cleanup, no atexit, mid-transaction
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
        lines = report.read_text().split("\n")[1:-1]  # a torn last line is not a report
        acked = {int(seq): event_id for seq, event_id in (line.split() for line in lines)}

        conn = sqlite3.connect(str(path))
        try:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            conn.close()
        with _open_proc_store(path) as store:
            seqs = _assert_log_gap_free(store)
            ids = {event.seq: event.id for event in store.events()}
            reported.update(acked)
            missing = {s: i for s, i in reported.items() if ids.get(s) != i}
            assert not missing, (
                f"round {round_} (seed {seed}): acknowledged events lost: {missing}")
            # All or nothing: the round's events are whole batches, k = 0, 1, 2...
            ks = [e.payload["k"] for e in store.events() if e.payload["worker"] == f"r{round_}"]
            assert ks == list(range(len(ks)))
            boundaries, k = {0}, 0
            while k < len(ks):
                k += _batch_size(k)
                boundaries.add(k)
            assert len(ks) in boundaries, f"round {round_} left a partial batch: {len(ks)}"
            store.verify()
        assert len(seqs) >= len(reported)
    assert reported, f"no child reported a commit (seed {seed})"
