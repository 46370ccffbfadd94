"""The `fluxlite` command, driven as a user would: subprocesses on real files."""

import csv
import io
import json
import os
import pathlib
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

import fluxlite

ROOT = pathlib.Path(__file__).resolve().parent

APP_MODULE = '''
import fluxlite

SCHEMA = """
CREATE TABLE users (name TEXT PRIMARY KEY, role TEXT);
CREATE TABLE rights (user TEXT, right TEXT, PRIMARY KEY (user, right));
"""

def reducer(view, event):
    p = event.payload
    if event.type == "addUser":
        if p["name"] in view.users:
            raise fluxlite.Rejected(p["name"] + " exists")
        return view.users.insert(name=p["name"])
    if event.type == "grantAccess":
        return [view.users.update(p["name"], role=p["right"]),
                view.rights.upsert(user=p["name"], right=p["right"])]
    if event.type == "removeUser":
        return view.users.delete(p["name"])

APP = fluxlite.App(SCHEMA, reducer)

SCHEMA2 = SCHEMA.replace("role TEXT", "role TEXT, shout TEXT")

def reducer2(view, event):
    if event.type == "grantAccess":
        p = event.payload
        return [view.users.update(p["name"], role=p["right"], shout=p["right"].upper()),
                view.rights.upsert(user=p["name"], right=p["right"])]
    return reducer(view, event)

APP2 = fluxlite.App(SCHEMA2, reducer2, version=2)
NOT_AN_APP = 42
'''


def cli(*args, cwd, check=True, input=None, timeout=60):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "fluxlite", *map(str, args)], cwd=cwd,
                            env=env, capture_output=True, text=True, input=input, timeout=timeout)
    assert "Traceback" not in result.stderr, result.stderr
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def work(tmp_path):
    """A directory with the app module and a prepared store of 5 events."""
    (tmp_path / "cliapp.py").write_text(APP_MODULE)
    sys.path.insert(0, str(tmp_path))
    import importlib
    cliapp = importlib.import_module("cliapp")
    importlib.reload(cliapp)
    sys.path.remove(str(tmp_path))
    clock = iter([f"2026-01-0{d}T12:00:00+00:00" for d in range(1, 10)])
    from datetime import datetime
    with fluxlite.open(tmp_path / "app.db", app=cliapp.APP,
                       clock=lambda: datetime.fromisoformat(next(clock))) as store:
        store.dispatch("addUser", {"name": "barack"}, actor="admin")
        store.dispatch("grantAccess", {"name": "barack", "right": "president"}, actor="admin")
        store.dispatch("addUser", {"name": "joe"})
        store.dispatch("removeUser", {"name": "joe"})
        store.dispatch("addUser", {"name": "kamala", "note": "x" * 200})
    return tmp_path


def db_bytes(path):
    return b"".join(pathlib.Path(str(path) + s).read_bytes()
                    for s in ("", "-wal") if os.path.exists(str(path) + s))


def test_info(work):
    before = db_bytes(work / "app.db")
    text = cli("info", "app.db", cwd=work).stdout
    assert re.search(r"^head +5$", text, re.M) and re.search(r"^  users +2$", text, re.M)
    assert re.search(r"^  addUser +3$", text, re.M) and "consumers (position): none" in text
    data = json.loads(cli("info", "app.db", "--json", cwd=work).stdout)
    assert data["head"] == 5 and data["tables"] == {"rights": 1, "users": 2}
    assert data["events_by_type"]["addUser"] == 3 and data["format"] == fluxlite.FORMAT_VERSION
    assert data["first_event"].startswith("2026-01-01") and data["journal_rows"] == 6
    assert db_bytes(work / "app.db") == before  # read-only commands write nothing


@pytest.mark.slow
def test_log_filters_and_json(work):
    lines = cli("log", "app.db", cwd=work).stdout.splitlines()
    assert lines[0].split() == ["seq", "time", "type", "id", "actor", "payload"]
    assert len(lines) == 7 and "admin" in lines[2] and lines[2].split()[1] == "2026-01-01T12:00:00Z"
    assert "…" in lines[-1] and len(lines[-1]) < 200  # long payloads shortened
    seqs = lambda *a: [json.loads(l)["seq"] for l in cli("log", "app.db", "--json", *a,
                                                          cwd=work).stdout.splitlines()]
    assert seqs() == [1, 2, 3, 4, 5]
    assert seqs("--after", "3") == [4, 5]
    assert seqs("--type", "addUser", "--type", "removeUser") == [1, 3, 4, 5]
    assert seqs("--reverse", "--limit", "2") == [5, 4]
    assert seqs("--since", "2026-01-02", "--until", "2026-01-03T23:00:00Z") == [2, 3]
    exported = cli("export", "app.db", cwd=work).stdout
    assert cli("log", "app.db", "--json", cwd=work).stdout == exported


@pytest.mark.slow
def test_log_reads_a_long_log_page_by_page(work):
    with fluxlite.open(work / "app.db", app=__import__("cliapp").APP) as store:
        store.dispatch_many([{"type": "addUser", "payload": {"name": f"u{n:04d}"}}
                             for n in range(2500)])
    seqs = lambda *a: [json.loads(l)["seq"] for l in cli("log", "app.db", "--json", *a,
                                                          cwd=work).stdout.splitlines()]
    assert seqs() == list(range(1, 2506))
    assert seqs("--reverse", "--limit", "1500") == list(range(2505, 1005, -1))
    assert seqs("--after", "2000", "--limit", "1200") == list(range(2001, 2506))
    assert seqs("--type", "grantAccess") == [2]
    lines = cli("log", "app.db", cwd=work).stdout.splitlines()
    assert len(lines) == 2 + 2505 and lines[-1].split()[0] == "2505"
    assert lines[-1].index("addUser") == lines[2].index("addUser")  # one set of columns


def test_tail_and_show(work):
    lines = cli("tail", "app.db", "-n", "2", cwd=work).stdout.splitlines()
    assert [l.split()[0] for l in lines[2:]] == ["4", "5"]
    shown = cli("show", "app.db", "2", cwd=work).stdout
    assert "type     grantAccess" in shown and "update users" in shown and "insert rights" in shown
    event_id = json.loads(cli("show", "app.db", "1", "--json", cwd=work).stdout)["event"]["id"]
    data = json.loads(cli("show", "app.db", event_id, "--json", cwd=work).stdout)
    assert data["event"]["seq"] == 1 and data["changes"][0]["op"] == "insert"


def test_query_now_and_in_the_past(work):
    table = cli("query", "app.db", "SELECT name, role FROM users ORDER BY name", cwd=work).stdout
    assert table.splitlines()[2].split() == ["barack", "president"]
    rows = [json.loads(l) for l in cli("query", "app.db", "SELECT name FROM users", "--at", "3",
                                       "--json", cwd=work).stdout.splitlines()]
    assert rows == [{"name": "barack"}, {"name": "joe"}]
    got = cli("query", "app.db", "SELECT count(*) AS n FROM users", "--time",
              "2026-01-01T12:30:00Z", "--csv", cwd=work).stdout
    assert list(csv.reader(io.StringIO(got))) == [["n"], ["1"]]
    refused = cli("query", "app.db", "DELETE FROM users", cwd=work, check=False)
    assert refused.returncode == 1 and "read-only" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    bad = cli("query", "app.db", "SELEKT", cwd=work, check=False)
    assert bad.returncode == 1 and "syntax error" in bad.stderr


def test_history(work):
    lines = cli("history", "app.db", "users", "joe", cwd=work).stdout.splitlines()
    assert [l.split()[3] for l in lines[2:]] == ["insert", "delete"]
    newest = cli("history", "app.db", "users", "joe", "--reverse", "--limit", "1",
                 "--json", cwd=work).stdout.splitlines()
    assert [json.loads(l)["op"] for l in newest] == ["delete"]
    revisions = [json.loads(l) for l in cli("history", "app.db", "rights",
                                            '["barack", "president"]', "--json",
                                            cwd=work).stdout.splitlines()]
    assert revisions[0]["after"] == {"user": "barack", "right": "president"}


def test_history_of_a_text_key_that_reads_as_json(work):
    with fluxlite.open(work / "app.db", app=_app(work)) as store:
        for name in ("true", "1e3", "null"):
            store.dispatch("addUser", {"name": name})
    for name in ("true", "1e3", "null"):
        lines = cli("history", "app.db", "users", name, "--json", cwd=work).stdout.splitlines()
        assert [json.loads(l)["after"]["name"] for l in lines] == [name]


@pytest.mark.slow
def test_dispatch_verify_and_rebuild(work):
    out = json.loads(cli("dispatch", "app.db", "addUser", '{"name": "hillary"}', "--actor", "me",
                         "--id", "cli-1", "--app", "cliapp:APP", cwd=work).stdout)
    assert out["event"]["seq"] == 6 and out["event"]["meta"] == {"actor": "me"}
    assert out["changes"][0]["values"]["name"] == "hillary"
    rejected = cli("dispatch", "app.db", "addUser", '{"name": "hillary"}', "--app", "cliapp:APP",
                   cwd=work, check=False)
    assert rejected.returncode == 1 and "hillary exists" in rejected.stderr
    assert "replaying 6 events" in cli("verify", "app.db", "--app", "cliapp:APP", cwd=work).stdout
    conn = sqlite3.connect(work / "app.db")
    conn.execute("UPDATE users SET role = 'hacker'")
    conn.commit()
    conn.close()
    failed = cli("verify", "app.db", "--app", "cliapp:APP", cwd=work, check=False)
    assert failed.returncode == 1 and "live 'hacker' != replay" in failed.stderr
    assert "rebuilt: 6 events" in cli("rebuild", "app.db", "--app", "cliapp:APP", cwd=work).stdout
    cli("verify", "app.db", "--app", "cliapp:APP", cwd=work)
    other = cli("verify", "app.db", "--app", "cliapp:APP2", cwd=work, check=False)
    assert other.returncode == 1 and "run `fluxlite rebuild app.db --app cliapp:APP2` first" \
        in other.stderr, other.stderr
    assert "version 2" in cli("rebuild", "app.db", "--app", "cliapp:APP2", cwd=work).stdout
    cli("verify", "app.db", "--app", "cliapp:APP2", cwd=work)
    stale = cli("verify", "app.db", "--app", "cliapp:APP", cwd=work, check=False)
    assert stale.returncode == 1 and "another schema or version" in stale.stderr
    rows = json.loads(cli("query", "app.db", "SELECT shout FROM users WHERE name = 'barack'",
                          "--json", cwd=work).stdout)
    assert rows == {"shout": "PRESIDENT"}


def test_verify_reports_a_changed_event_as_damage(work):
    conn = sqlite3.connect(work / "app.db")
    conn.execute("DROP TRIGGER fluxlite_events_no_update")
    conn.execute("UPDATE events SET meta = '{\"note\":\"edited\"}' WHERE seq = 2")
    conn.commit()
    conn.close()
    failed = cli("verify", "app.db", "--app", "cliapp:APP", cwd=work, check=False)
    assert failed.returncode == 1 and "events 2..2 of the log do not match" in failed.stderr


@pytest.mark.slow
def test_export_import_round_trip_is_idempotent(work):
    exported = cli("export", "app.db", cwd=work).stdout
    (work / "events.jsonl").write_text(exported)
    assert "imported 5 events (0 already" in cli("import", "copy.db", "events.jsonl", "--app",
                                                  "cliapp:APP", cwd=work).stdout
    assert "imported 0 events (5 already" in cli("import", "copy.db", "events.jsonl", "--app",
                                                  "cliapp:APP", cwd=work).stdout
    cli("verify", "copy.db", "--app", "cliapp:APP", cwd=work)
    assert cli("export", "copy.db", cwd=work).stdout == exported
    same = "SELECT * FROM users ORDER BY name"
    assert cli("query", "copy.db", same, cwd=work).stdout == cli("query", "app.db", same,
                                                                  cwd=work).stdout
    lines = exported.splitlines()
    (work / "first.jsonl").write_text("\n".join(lines[:2]) + "\n")
    (work / "rest.jsonl").write_text("\n".join(lines[2:]) + "\n")
    cli("import", "part.db", "first.jsonl", "--app", "cliapp:APP", cwd=work)
    assert "imported 3 events" in cli("import", "part.db", "rest.jsonl", "--app", "cliapp:APP",
                                      cwd=work).stdout
    with fluxlite.open(work / "other.db", app=__import__("cliapp").APP) as other:
        other.dispatch("addUser", {"name": "someone else"})
    conflict = cli("import", "other.db", "events.jsonl", "--app", "cliapp:APP", cwd=work,
                   check=False)
    assert conflict.returncode == 1 and "the logs conflict" in conflict.stderr
    assert json.loads(cli("info", "other.db", "--json", cwd=work).stdout)["head"] == 1


def test_import_reads_a_pipe(work):
    exported = cli("export", "app.db", cwd=work).stdout
    out = cli("import", "piped.db", "/dev/stdin", "--app", "cliapp:APP", cwd=work,
              input=exported).stdout
    assert "imported 5 events" in out
    assert cli("export", "piped.db", cwd=work).stdout == exported


def test_export_and_import_are_utf8_whatever_the_locale(work):
    # Windows writes a pipe or file in the ANSI code page: "Zoë" came out in
    # cp1252 (which import, reading UTF-8, refused) and an emoji not at all.
    with fluxlite.open(work / "app.db", app=__import__("cliapp").APP) as store:
        store.dispatch("addUser", {"name": "Zoë \U0001F600"})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "cp1252"}
    exported = subprocess.run([sys.executable, "-m", "fluxlite", "export", "app.db"], cwd=work,
                              env=env, capture_output=True, timeout=60)
    assert exported.returncode == 0, exported.stderr.decode("utf-8", "replace")
    assert "Zoë \U0001F600" in exported.stdout.decode("utf-8")
    # What a Windows editor saves: a byte-order mark first, CRLF line ends.
    text = exported.stdout.decode("utf-8").replace("\n", "\r\n")
    (work / "events.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert "imported 6 events" in cli("import", "copy.db", "events.jsonl", "--app",
                                      "cliapp:APP", cwd=work).stdout
    shown = subprocess.run([sys.executable, "-m", "fluxlite", "query", "copy.db",
                            "SELECT name FROM users WHERE name LIKE 'Zo%'", "--csv"],
                           cwd=work, env=env, capture_output=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout.decode("utf-8") == "name\nZoë \U0001F600\n"


def test_an_error_naming_an_undecodable_file_name_is_still_shown(work):
    # Made UTF-8, the output streams keep their error handlers: a file name that
    # is not UTF-8 (held with surrogate escapes) is shown escaped, not lost.
    name = os.fsencode(str(work)) + b"/caf\xe9.jsonl"
    with open(name, "wb") as f:
        f.write(b"\xff\xfe not utf-8\n")
    result = subprocess.run([sys.executable, "-m", "fluxlite", "import", "copy.db", name,
                             "--app", "cliapp:APP"], cwd=work, capture_output=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT),
                                 "PYTHONIOENCODING": "latin-1"})
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 1 and "is not UTF-8 text" in stderr, stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("change, error", [
    (lambda e: {**e, "type": 5}, "non-empty string"),
    (lambda e: {**e, "type": ""}, "non-empty string"),
    (lambda e: {**e, "id": 7}, "An event id must be"),
    (lambda e: {**e, "meta": [1]}, "meta"),
    (lambda e: {**e, "ts": "garbage"}, "time zone"),
    (lambda e: {**e, "ts": 5}, "time zone"),
    (lambda e: {**e, "ts": "2026-11-29T10:09:06"}, "time zone"),
    # before year 1 in UTC: no ts can hold it (a raw OverflowError, unchecked)
    (lambda e: {**e, "ts": "0001-01-01T00:00:00+01:00"}, "time zone"),
])
def test_import_checks_each_event_as_dispatch_does(work, change, error):
    first = json.loads(cli("export", "app.db", cwd=work).stdout.splitlines()[0])
    (work / "bad.jsonl").write_text(json.dumps(change(first)) + "\n")
    result = cli("import", "new.db", "bad.jsonl", "--app", "cliapp:APP", cwd=work, check=False)
    assert result.returncode == 1 and error in result.stderr
    assert "Traceback" not in result.stderr


def test_import_refuses_two_different_events_at_one_seq_in_its_file(work):
    lines = cli("export", "app.db", cwd=work).stdout.splitlines()
    other = {**json.loads(lines[1]), "id": "another"}
    (work / "twice.jsonl").write_text("\n".join(lines[:2] + [json.dumps(other)]) + "\n")
    result = cli("import", "new.db", "twice.jsonl", "--app", "cliapp:APP", cwd=work, check=False)
    assert result.returncode == 1 and "the logs conflict" in result.stderr
    assert not (work / "new.db").exists()  # nothing imported: no empty store left behind
    (work / "latin1.jsonl").write_bytes(b"\xff\xfe")
    result = cli("import", "new2.db", "latin1.jsonl", "--app", "cliapp:APP", cwd=work, check=False)
    assert result.returncode == 1 and "not UTF-8" in result.stderr
    assert not (work / "new2.db").exists()


def test_import_and_time_options_take_a_z_and_short_fractions_on_every_python(work):
    first = json.loads(cli("export", "app.db", cwd=work).stdout.splitlines()[0])
    (work / "z.jsonl").write_text(json.dumps({**first, "ts": "2026-01-01T12:00:00.5Z"}) + "\n")
    assert "imported 1 events" in cli("import", "z.db", "z.jsonl", "--app", "cliapp:APP",
                                      cwd=work).stdout
    event = json.loads(cli("log", "z.db", "--json", cwd=work).stdout)
    assert event["ts"] == "2026-01-01T12:00:00.500000+00:00"  # stored in fluxlite's own form
    seqs = [json.loads(line)["seq"] for line in cli(
        "log", "app.db", "--json", "--since", "2026-01-02T11:59:59.5Z", cwd=work).stdout.splitlines()]
    assert seqs == [2, 3, 4, 5]


def test_dispatch_through_a_middleware_that_ends_the_chain_says_so(work):
    (work / "dropping.py").write_text(APP_MODULE + """
def drop_tests(store):
    return lambda next: lambda event: None if event["type"] == "test" else next(event)
DROPPING = fluxlite.App(SCHEMA, reducer, middleware=[drop_tests])

def forget_to_return(store):
    return lambda next: lambda event: next(event) and None
FORGETFUL = fluxlite.App(SCHEMA, reducer, middleware=[forget_to_return])
""")
    result = cli("dispatch", "app.db", "test", "{}", "--app", "dropping:DROPPING", cwd=work,
                 check=False)
    assert result.returncode == 1 and "returned None and committed nothing" in result.stderr
    # Committed, though the middleware returned None: a success (a retry would repeat it).
    result = cli("dispatch", "app.db", "addUser", '{"name": "x"}', "--app",
                 "dropping:FORGETFUL", cwd=work)
    assert "returned None instead of the event" in result.stderr
    assert json.loads(result.stdout)["event"]["seq"] == 6


def test_import_lets_go_of_each_batch_it_committed(work, monkeypatch, capsys):
    first = json.loads(cli("export", "app.db", cwd=work).stdout.splitlines()[0])
    (work / "many.jsonl").write_text("\n".join(
        json.dumps({**first, "seq": n, "id": f"e{n}", "payload": {"name": f"u{n}"}})
        for n in range(1, 3001)) + "\n")
    held = []
    commit = fluxlite.Store._commit_prepared

    def spy(store, prepared, *args, **kwargs):
        held.append(len(store._pending))  # events kept from earlier batches
        return commit(store, prepared, *args, **kwargs)

    monkeypatch.setattr(fluxlite.Store, "_commit_prepared", spy)
    monkeypatch.chdir(work)
    assert fluxlite.main(["import", "many.db", "many.jsonl", "--app", "cliapp:APP"]) == 0
    assert "imported 3000 events" in capsys.readouterr().out
    assert held == [0, 0, 0]  # memory flat in the length of the log


def test_an_import_that_fails_part_way_keeps_what_it_committed(work):
    first = json.loads(cli("export", "app.db", cwd=work).stdout.splitlines()[0])
    lines = [json.dumps({**first, "seq": n, "id": f"e{n}", "payload": {"name": f"u{n}"}})
             for n in range(1, 1001)]  # one whole batch, committed before the bad line
    (work / "long.jsonl").write_text("\n".join(lines + ["not json"]) + "\n")
    result = cli("import", "new.db", "long.jsonl", "--app", "cliapp:APP", cwd=work, check=False)
    assert result.returncode == 1 and "long.jsonl line 1001" in result.stderr
    assert json.loads(cli("info", "new.db", "--json", cwd=work).stdout)["head"] == 1000


def test_a_closed_pipe_ends_the_command_quietly(work):
    with fluxlite.open(work / "app.db", app=__import__("cliapp").APP) as store:
        store.dispatch_many([{"type": "addUser", "payload": {"name": f"u{n}"}}
                             for n in range(5000)])  # more than a pipe's buffer holds
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = subprocess.Popen([sys.executable, "-m", "fluxlite", "log", "app.db"], cwd=work,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log.stdout.readline()
    log.stdout.close()  # as `| head -1` does
    assert log.wait(30) == 0
    assert log.stderr.read() == b""


@pytest.mark.parametrize("args", [("tail", "app.db", "-n", "-3"), ("log", "app.db", "--limit", "-1"),
                                  ("log", "app.db", "--after", "x")])
def test_negative_counts_are_usage_errors(work, args):
    result = cli(*args, cwd=work, check=False)
    assert result.returncode == 2 and "whole number >= 0" in result.stderr


def test_query_prints_blobs_as_sql_hex_literals(work):
    sql = "SELECT x'00ff' AS b, 1 AS n"
    assert "x'00ff'  1" in cli("query", "app.db", sql, cwd=work).stdout
    assert json.loads(cli("query", "app.db", sql, "--json", cwd=work).stdout) == \
        {"b": "x'00ff'", "n": 1}
    assert cli("query", "app.db", sql, "--csv", cwd=work).stdout.splitlines()[1] == "x'00ff',1"


def test_tables_show_control_characters_escaped_not_raw(work):
    with fluxlite.open(work / "app.db", app=_app(work)) as store:
        store.dispatch("addUser", {"name": "evil\x1b[2J\nline"})
    for args in (("query", "app.db", "SELECT name AS \"a\nb\" FROM users"), ("log", "app.db"),
                 ("history", "app.db", "users", "evil\x1b[2J\nline"), ("show", "app.db", "6")):
        out = cli(*args, cwd=work).stdout
        assert "\x1b" not in out and "evil\\" in out, (args, out)
        assert not any(l.startswith("line") for l in out.splitlines()), (args, out)
    header = cli("query", "app.db", "SELECT name AS \"a\nb\" FROM users", cwd=work).stdout
    assert header.splitlines()[0] == "a\\nb"
    rows = json.loads(cli("query", "app.db", "SELECT name FROM users WHERE name LIKE 'evil%'",
                          "--json", cwd=work).stdout)
    assert rows == {"name": "evil\x1b[2J\nline"}  # JSON keeps the data as it is


def test_backup_of_a_file_that_is_not_a_store_names_it_and_leaves_nothing(work):
    conn = sqlite3.connect(work / "plain.db")
    conn.execute("CREATE TABLE z (a)")
    conn.commit()
    conn.close()
    result = cli("backup", "plain.db", "copy.db", cwd=work, check=False)
    assert result.returncode == 1 and "plain.db' is not a fluxlite store" in result.stderr
    assert not list(work.glob("copy.db*"))


@pytest.mark.slow
def test_backup_while_a_writer_runs(work):
    # Big enough for a step-wise copy to take many steps, each of which a commit
    # from another process sent back to the start: the backup never ended.
    with fluxlite.open(work / "app.db", app=_app(work)) as store:
        store.dispatch_many([{"type": "addUser", "payload": {"name": f"p{n}", "note": "x" * 2000}}
                             for n in range(20_000)])
    stop = work / "stop"
    writer = subprocess.Popen([sys.executable, "-c", f"""
import os, sys, time
sys.path[:0] = [{str(ROOT)!r}, {str(work)!r}]
import fluxlite, cliapp
store = fluxlite.open({str(work / 'app.db')!r}, app=cliapp.APP, durability="normal")
n, deadline = 0, time.monotonic() + 60
while not os.path.exists({str(stop)!r}) and time.monotonic() < deadline:
    store.dispatch("addUser", {{"name": "w%d" % n}})
    n += 1
"""])
    try:
        time.sleep(0.3)
        out = cli("backup", "app.db", "snap.db", cwd=work, timeout=30).stdout
        assert writer.poll() is None, "the writer stopped before the backup ended"
    finally:
        stop.touch()
    assert writer.wait(60) == 0
    copied = int(out.split()[2])
    assert copied >= 20_005
    conn = sqlite3.connect(work / "snap.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    cli("verify", "snap.db", "--app", "cliapp:APP", cwd=work)
    again = cli("backup", "app.db", "snap.db", cwd=work, check=False)
    assert again.returncode == 1 and "exists" in again.stderr


def test_backup_of_an_idle_store_leaves_nothing_beside_it(work):
    before = sorted(p.name for p in work.iterdir())
    cli("backup", "app.db", "snap.db", cwd=work)
    assert sorted(p.name for p in work.iterdir()) == sorted(before + ["snap.db"])


def _app(work):
    sys.path.insert(0, str(work))
    try:
        import cliapp
        return cliapp.APP
    finally:
        sys.path.remove(str(work))


def test_tail_follow_picks_up_another_process_and_stops_cleanly(work):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    tail = subprocess.Popen([sys.executable, "-m", "fluxlite", "tail", "-f", "-n", "1",
                             "app.db"], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        header, _, last = (tail.stdout.readline() for _ in range(3))  # header, rule, event 5
        cli("dispatch", "app.db", "addUser", '{"name": "live"}', "--app", "cliapp:APP", cwd=work)
        line = tail.stdout.readline()
        assert line.split()[0] == "6" and "addUser" in line
        starts = lambda text: [m.start() for m in re.finditer(r"(?<=  )\S", text)][:3] + [
            text.index("{") if "{" in text else text.index("payload")]
        assert starts(line) == starts(last) == starts(header), (header, last, line)  # columns
        tail.send_signal(signal.SIGINT)
        assert tail.wait(10) == 130  # as a shell reports a `tail -f` Ctrl-C stopped
        assert "Traceback" not in tail.stderr.read()
    finally:  # a failed assertion must not leave `tail -f` running for ever
        if tail.poll() is None:
            tail.kill()
            tail.wait()


@pytest.mark.parametrize("args, message", [
    (["info", "missing.db"], "No such store file"),
    (["info", "notes.txt"], "not a SQLite database"),
    (["info", "plain.db"], "not a fluxlite store"),
    (["show", "app.db", "nope"], "no event with seq or id 'nope'"),
    (["dispatch", "app.db", "addUser", "{bad json", "--app", "cliapp:APP"], "not valid JSON"),
    (["dispatch", "app.db", "addUser", "--app", "nomodule:APP"], "cannot import 'nomodule'"),
    (["dispatch", "app.db", "addUser", "--app", "cliapp:NOT_AN_APP"], "not a fluxlite.App"),
    (["dispatch", "app.db", "addUser", "--app", "cliapp"], "is not MODULE:ATTR"),
    (["dispatch", "app.db", "addUser", "--app", "cliapp:NOPE"], "cliapp has no attribute 'NOPE'"),
    (["import", "new.db", ".", "--app", "cliapp:APP"], "no such file"),
    (["dispatch", "plain.db", "addUser", "--app", "cliapp:APP"], "adopt=True) in Python"),
    (["verify", "missing.db", "--app", "cliapp:APP"], "No such store file"),
    (["query", "app.db", "SELECT 1", "--time", "yesterday"], "not an ISO-8601 time"),
    (["query", "app.db", "SELECT 1", "--at", "99"], "outside the log"),
    (["import", "new.db", "missing.jsonl", "--app", "cliapp:APP"], "no such file"),
    (["history", "app.db", "people", "x"], "Unknown table 'people'"),
    (["history", "app.db", "rights", "barack"], "KEY is then a JSON list"),
])
def test_user_errors_are_one_line_and_exit_1(work, args, message):
    (work / "notes.txt").write_text("not a database" * 100)
    conn = sqlite3.connect(work / "plain.db")
    conn.execute("CREATE TABLE t (a)")
    conn.close()
    result = cli(*args, cwd=work, check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not os.path.exists(work / "missing.db")


def test_demo_tells_the_tour(tmp_path):
    out = cli("demo", tmp_path / "tour", cwd=tmp_path).stdout
    for step in ["one SQLite file", "subscriber", "Rejected", "The log", "time travel",
                 "Restoring", "no migration", "verify()"]:
        assert step in out
    assert (tmp_path / "tour" / "demo.db").exists()
    assert "Look inside" in out


def test_demo_never_overwrites_a_file(tmp_path):
    (tmp_path / "mine").mkdir()
    precious = tmp_path / "mine" / "demo.db"
    precious.write_bytes(b"precious notes")
    again = cli("demo", tmp_path / "mine", cwd=tmp_path, check=False)
    assert again.returncode == 1 and "exists; demo writes a new store" in again.stderr
    assert precious.read_bytes() == b"precious notes"


def test_progress_bar_only_when_stderr_is_a_terminal(work):
    import pty
    with fluxlite.open(work / "big.db", app=__import__("cliapp").APP) as store:
        store.dispatch_many([{"type": "addUser", "payload": {"name": f"u{n}"}}
                             for n in range(2500)])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    primary, secondary = pty.openpty()
    proc = subprocess.run([sys.executable, "-m", "fluxlite", "verify", "big.db", "--app",
                           "cliapp:APP"], cwd=work, env=env, stdout=subprocess.PIPE,
                          stderr=secondary, timeout=60)
    os.close(secondary)
    shown = os.read(primary, 65536).decode()
    os.close(primary)
    assert proc.returncode == 0 and "verify [" in shown and "2000/2500" in shown
    piped = cli("verify", "big.db", "--app", "cliapp:APP", cwd=work)
    assert piped.stderr == ""  # not a terminal: no progress bar


# -- found in review: the command line on odd input --------------------------

def test_read_commands_open_a_store_whose_file_name_is_not_utf8(work):
    # A POSIX file name may be any bytes; Python holds the others as surrogate
    # escapes, and the read-only URI must be made from the bytes themselves.
    name = b"caf\xe9.db"
    os.rename(work / "app.db", os.path.join(os.fsencode(str(work)), name))
    for args in (["info", name], ["log", name], ["query", name, "SELECT name FROM users",
                                                 "--at", "3"], ["backup", name, b"copy\xe9.db"]):
        result = subprocess.run([sys.executable, "-m", "fluxlite", *args], cwd=work,
                                capture_output=True, timeout=60,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr
    assert b"joe" in subprocess.run(
        [sys.executable, "-m", "fluxlite", "query", name, "SELECT name FROM users", "--at", "3"],
        cwd=work, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout


def test_a_read_that_fails_on_text_that_is_not_utf8_leaves_no_wal_beside_the_file(work):
    with sqlite3.connect(work / "app.db") as conn:  # as another tool might write it
        conn.execute("UPDATE users SET role = CAST(x'ff' AS TEXT) WHERE name = 'barack'")
    conn.close()
    before = sorted(p.name for p in work.iterdir())
    for args in (["query", "app.db", "SELECT CAST(x'ff' AS TEXT) AS t"],
                 ["query", "app.db", "SELECT * FROM users"],
                 ["history", "app.db", "users", "barack"]):
        result = cli(*args, cwd=work, check=False)
        assert result.returncode == 1 and "UTF-8" in result.stderr, result.stderr
        assert sorted(p.name for p in work.iterdir()) == before, args  # reading writes nothing


@pytest.mark.parametrize("name", ["NaN", "Infinity", "99999999999999999999"])
def test_history_of_a_text_key_that_json_reads_as_no_key(work, name):
    with fluxlite.open(work / "app.db", app=_app(work)) as store:
        store.dispatch("addUser", {"name": name})
    lines = cli("history", "app.db", "users", name, "--json", cwd=work).stdout.splitlines()
    assert [json.loads(l)["after"]["name"] for l in lines] == [name]


@pytest.mark.parametrize("key", ["\u00b2", "99999999999999999999999"])
def test_show_of_a_digit_string_that_is_no_seq_says_there_is_no_such_event(work, key):
    result = cli("show", "app.db", key, cwd=work, check=False)
    assert result.returncode == 1
    assert f"no event with seq or id {key!r} (the log runs 1..5)" in result.stderr, result.stderr


def test_tail_follow_misses_no_event_committed_while_it_starts(work, monkeypatch, capsys):
    import threading
    app, printed, done = _app(work), fluxlite._print_events, []

    def and_meanwhile(rows, as_json, *least):  # another process commits right after the first read
        if not done:
            done.append(True)
            with fluxlite.open(work / "app.db", app=app) as other:
                other.dispatch("addUser", {"name": "meanwhile"})
        return printed(rows, as_json, *least)

    monkeypatch.setattr(fluxlite, "_print_events", and_meanwhile)
    threading.Timer(3, os.kill, (os.getpid(), signal.SIGINT)).start()  # Ctrl-C
    assert fluxlite.main(["tail", "-f", "-n", "1", "--json", str(work / "app.db")]) == 130
    seqs = [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()]
    assert seqs == [5, 6]


def test_json_nested_past_pythons_limit_is_a_user_error(work):
    deep = "[" * 5000 + "]" * 5000
    (work / "deep.jsonl").write_text(json.dumps({"seq": 1, "id": "x", "type": "t",
                                                 "ts": "2026-01-01T00:00:00Z"})[:-1]
                                     + ', "payload": ' + deep + "}\n")
    for args, message in ((["dispatch", "app.db", "addUser", deep, "--app", "cliapp:APP"],
                           "PAYLOAD_JSON nests too deep"),
                          (["dispatch", "app.db", "addUser", "--meta",
                            '{"a": ' * 5000 + "1" + "}" * 5000, "--app", "cliapp:APP"],
                           "--meta nests too deep"),
                          (["import", "new.db", "deep.jsonl", "--app", "cliapp:APP"],
                           "deep.jsonl line 1 nests too deep")):
        result = cli(*args, cwd=work, check=False)
        # Python 3.13's json reads this depth, and the event's own limit refuses it
        # (200 levels); before 3.13 json's recursion gives out first.
        said = message in result.stderr or "nests more than 200 levels" in result.stderr
        assert result.returncode == 1 and said and "Traceback" not in result.stderr, result.stderr
    assert "no versions of users" in cli("history", "app.db", "users", deep, cwd=work).stdout
    assert not os.path.exists(work / "new.db")


def test_query_json_is_json_even_for_an_infinite_float(work):
    result = cli("query", "app.db", "SELECT 1e999 AS x", "--json", cwd=work, check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert "JSON, which has no infinity or NaN" in result.stderr, result.stderr


def test_show_escapes_c1_controls_and_bidi_overrides_as_the_tables_do(work):
    with fluxlite.open(work / "app.db", app=_app(work)) as store:
        store.dispatch("addUser", {"name": "evil\u202e\x9b2J\x85"}, meta={"note": "\u202e"})
    out = cli("show", "app.db", "6", cwd=work).stdout
    assert not set(out) & {"\u202e", "\x9b", "\x85"}, out
    assert '"name": "evil\\u202e\\x9b2J\\x85"' in out and '{"note": "\\u202e"}' in out
    assert 'insert users "evil\\u202e\\x9b2J\\x85"' in out


@pytest.mark.parametrize("args", [("log", "app.db", "--since", ""), ("log", "app.db", "--until", ""),
                                  ("query", "app.db", "SELECT 1 AS x", "--time", "")])
def test_an_empty_time_is_an_error_not_no_filter(work, args):
    result = cli(*args, cwd=work, check=False)
    assert result.returncode == 1 and "'' is not an ISO-8601 time" in result.stderr, result.stderr


def test_info_reports_one_snapshot_while_another_process_writes(work, monkeypatch, capsys):
    app, count, done = _app(work), fluxlite._Model.count, []

    def and_meanwhile(model, info):  # another process commits between two of info's reads
        if not done:
            done.append(True)
            with fluxlite.open(work / "app.db", app=app) as other:
                other.dispatch("addUser", {"name": "meanwhile"})
        return count(model, info)

    monkeypatch.setattr(fluxlite._Model, "count", and_meanwhile)
    assert fluxlite.main(["info", str(work / "app.db"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert done and data["head"] == sum(data["events_by_type"].values()) == 5
    assert data["tables"] == {"rights": 1, "users": 2} and data["journal_rows"] == 6


def test_reading_through_a_symbolic_link_leaves_nothing_beside_the_store(work):
    os.symlink("app.db", work / "link.db")
    before = sorted(p.name for p in work.iterdir())
    for args in (["info", "link.db"], ["log", "link.db"], ["query", "link.db",
                                                           "SELECT * FROM users", "--at", "2"]):
        cli(*args, cwd=work)
        assert sorted(p.name for p in work.iterdir()) == before, args  # no app.db-wal, -shm


def test_a_file_name_that_is_not_utf8_is_printed_as_its_bytes_in_a_utf8_locale(work):
    # In a UTF-8 locale (other than C/POSIX) Python's stdout is strict: the name's
    # surrogate escapes could not be written, and info or backup would fail.
    os.rename(work / "app.db", os.path.join(os.fsencode(str(work)), b"caf\xe9.db"))
    for args, shown in (([b"info", b"caf\xe9.db"], b"/caf\xe9.db\n"),
                        ([b"backup", b"caf\xe9.db", b"copy\xe9.db"], b"to copy\xe9.db\n")):
        result = subprocess.run([sys.executable, "-m", "fluxlite", *args], cwd=work,
                                capture_output=True, timeout=60,
                                env={**os.environ, "PYTHONPATH": str(ROOT),
                                     "PYTHONIOENCODING": "utf-8"})
        assert result.returncode == 0 and shown in result.stdout, result.stderr


def test_backup_refuses_a_dangling_symbolic_link_instead_of_making_its_target(work):
    os.symlink("elsewhere.db", work / "link.db")
    result = cli("backup", "app.db", "link.db", cwd=work, check=False)
    assert result.returncode == 1 and "symbolic link to a file that does not exist" in result.stderr
    assert not os.path.lexists(work / "elsewhere.db")


def test_info_shows_control_characters_in_the_version_and_file_name_escaped(work):
    app = _app(work)
    with fluxlite.open(work / "a\x1b[2Jb.db", schema=app.schema, reducer=app.reducer,
                       version="v\x1b]0;owned\x07") as store:
        store.dispatch("addUser", {"name": "x"})
    out = cli("info", "a\x1b[2Jb.db", cwd=work).stdout
    assert "\x1b" not in out and "\x07" not in out, out
    assert "a\\x1b[2Jb.db" in out and "v\\x1b]0;owned\\x07" in out


COMBINED_V2 = '''
import fluxlite
from cliapp import SCHEMA

def users(table, event):
    if event.type == "addUser":
        return table.insert(name=event.payload["name"])

def audit(table, event):
    if event.type == "addUser":
        return table.insert(id=event.id, who=event.payload["name"])

APP = fluxlite.App(SCHEMA + "CREATE TABLE audit (id TEXT PRIMARY KEY, who TEXT);",
                   {"users": users, "audit": audit}, version=2)
'''


def test_rebuild_to_an_app_whose_combined_reducer_adds_a_table(work):
    # The typical schema change: a new table with its own reducer in combine(). The
    # store was opened with the file's old schema, which open() checked the
    # combined reducer's tables against: "a reducer for table 'audit'" was refused.
    (work / "combined2.py").write_text(COMBINED_V2)
    out = cli("rebuild", "app.db", "--app", "combined2:APP", cwd=work).stdout
    assert "into audit, rights, users (version 2)" in out
    rows = json.loads(cli("query", "app.db", "SELECT who FROM audit ORDER BY who", "--json",
                          cwd=work).stdout.splitlines()[0])
    assert rows == {"who": "barack"}
    cli("verify", "app.db", "--app", "combined2:APP", cwd=work)


COMBINED_GHOST = '''
import fluxlite
from cliapp import SCHEMA

APP = fluxlite.App(SCHEMA, {"users": lambda table, e: None, "ghost": lambda table, e: None},
                   version=2)
'''


def test_rebuild_to_a_combined_reducer_with_a_missing_table_changes_nothing(work):
    # Found by review: the CLI checked the combined reducer's tables after the rebuild
    # had swapped the model in (a log with no events of the reducer's never runs it).
    (work / "ghost.py").write_text(COMBINED_GHOST)
    with fluxlite.open(work / "empty.db", schema="CREATE TABLE t (id INTEGER PRIMARY KEY)"):
        pass
    before = db_bytes(work / "empty.db")
    result = cli("rebuild", "empty.db", "--app", "ghost:APP", cwd=work, check=False)
    assert result.returncode == 1 and "table 'ghost'" in result.stderr
    assert db_bytes(work / "empty.db") == before


def test_an_error_with_newlines_is_printed_whole_on_one_line(work):
    """Every error is one line on stderr, but not only its first line: SQLite's
    integrity_check reports "*** in database main ***" on a line of its own, and a
    reducer's exception can span lines; the rest (what is damaged, which event,
    what to do) was dropped."""
    (work / "multiline.py").write_text(
        "import fluxlite\nfrom cliapp import SCHEMA, reducer\n"
        "def strict(view, event):\n"
        "    if event.type == 'checked':\n"
        "        raise ValueError('1 validation error\\nname: field required')\n"
        "    return reducer(view, event)\n"
        "APP = fluxlite.App(SCHEMA, strict)\n")
    failed = cli("dispatch", "app.db", "checked", "{}", "--app", "multiline:APP", cwd=work,
                 check=False)
    assert failed.returncode == 1 and len(failed.stderr.strip().splitlines()) == 1
    assert "field required on event 6 ('checked'" in failed.stderr
    assert "nothing was written" in failed.stderr
    path = work / "app.db"
    data = bytearray(path.read_bytes())
    data[36:40] = (7).to_bytes(4, "big")  # the header's count of free pages, made wrong
    path.write_bytes(data)
    damaged = cli("verify", "app.db", "--app", "cliapp:APP", cwd=work, check=False)
    assert damaged.returncode == 1 and len(damaged.stderr.strip().splitlines()) == 1
    # (SQLite 3.40 says "Main freelist:", later ones "Freelist:": either, on one line)
    assert re.search(r"\*\*\* in database main \*\*\* (Main f|F)reelist: size is 0 but should "
                     r"be 7", damaged.stderr)
    assert "Restore the file from a backup." in damaged.stderr


def test_a_vendored_copy_runs_as_a_script_under_python_I_and_P_and_inside_a_package(work):
    """The __main__ block imported `fluxlite` to run in the module applications
    import. Under python -I or -P this file's folder is not on sys.path, so that
    import failed with a raw ModuleNotFoundError; a copy vendored inside a package
    (python -m myapp.vendor.fluxlite) failed too, or found none of the app's."""
    import shutil
    shutil.copy(ROOT / "fluxlite.py", work / "fluxlite.py")  # the file alone, as vendored
    flags = [["-I"]] + ([["-P"]] if sys.version_info >= (3, 11) else [])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for flag in flags:
        result = subprocess.run([sys.executable, *flag, "fluxlite.py", "verify", "app.db",
                                 "--app", "cliapp:APP"], cwd=work, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (flag, result.stderr)
        assert "ok: replaying 5 events" in result.stdout
    vendor = work / "myapp" / "vendor"
    vendor.mkdir(parents=True)
    (work / "myapp" / "__init__.py").write_text("")
    (vendor / "__init__.py").write_text("")
    shutil.copy(ROOT / "fluxlite.py", vendor / "fluxlite.py")
    (work / "myapp" / "app.py").write_text(
        APP_MODULE.replace("import fluxlite", "from myapp.vendor import fluxlite", 1))
    (work / "fluxlite.py").unlink()  # no top-level copy to find
    result = subprocess.run([sys.executable, "-m", "myapp.vendor.fluxlite", "verify", "app.db",
                             "--app", "myapp.app:APP"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ok: replaying 5 events" in result.stdout


def test_main_called_by_a_host_program_gives_its_streams_back(work):
    """fluxlite.main([...]) writes UTF-8 whatever the locale says, but it left the
    host's sys.stdout and sys.stderr reconfigured for good: a program writing
    Latin-1 wrote UTF-8 after the call."""
    host = ("import sys, fluxlite\n"
            "before = [(s.encoding, s.errors) for s in (sys.stdout, sys.stderr)]\n"
            "assert fluxlite.main(['query', 'app.db', \"SELECT 'Zo\\u00eb' AS n\"]) == 0\n"
            "after = [(s.encoding, s.errors) for s in (sys.stdout, sys.stderr)]\n"
            "print(before == after, after)\n"
            "print('Zo\\u00eb')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "latin-1"}
    result = subprocess.run([sys.executable, "-c", host], cwd=work, env=env,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "Zo\u00eb".encode("utf-8") in lines[2]  # the command's own output: UTF-8
    assert lines[-2].startswith(b"True"), lines[-2]
    assert lines[-1] == "Zo\u00eb".encode("latin-1")  # the host's, in its own encoding


def test_commands_run_without_stdout_or_stderr_as_under_pythonw(work):
    """Under pythonw, in a windowed (frozen) app, or with the descriptor closed,
    sys.stdout and sys.stderr are None: print() drops the output, but verify and
    rebuild asked None.isatty() for their progress bar and query --csv gave
    csv.writer None: raw AttributeError and TypeError."""
    host = ("import os, sys, fluxlite\n"
            "sys.stdout = sys.stderr = None\n"
            "codes = [fluxlite.main(argv) for argv in (\n"
            "    ['verify', 'app.db', '--app', 'cliapp:APP'],\n"
            "    ['rebuild', 'app.db', '--app', 'cliapp:APP'],\n"
            "    ['query', 'app.db', 'SELECT * FROM users', '--csv'],\n"
            "    ['log', 'app.db'], ['show', 'app.db', 'nothing'])]\n"
            "os.write(1, repr(codes).encode())\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", host], cwd=work, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "[0, 0, 0, 0, 1]", result


def test_commands_write_to_a_host_stream_with_encoding_and_no_errors(work):
    """A host program (a GUI's console pane, a test harness) may put its own object
    in sys.stdout: write() and flush(), an encoding, no errors attribute. main()
    read stream.errors to decide whether to reconfigure it: a raw AttributeError
    before the command ran."""
    host = ("import sys, fluxlite\n"
            "class Pane:\n"
            "    encoding = 'utf-8'\n"
            "    def __init__(self):\n"
            "        self.parts = []\n"
            "    def write(self, text):\n"
            "        self.parts.append(text)\n"
            "        return len(text)\n"
            "    def flush(self):\n"
            "        pass\n"
            "pane = sys.stdout = Pane()\n"
            "code = fluxlite.main(['query', 'app.db', 'SELECT name FROM users ORDER BY name'])\n"
            "sys.stdout = sys.__stdout__\n"
            "print(code, ''.join(pane.parts).split())\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", host], cwd=work, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "0 ['name', '------', 'barack', 'kamala']\n"


# leftovers (session 14) --------------------------------------------------------------

def test_log_type_empty_is_an_error_not_no_events(work):
    result = cli("log", "app.db", "--type", "", cwd=work, check=False)
    assert result.returncode == 1 and "--type '' matches no event" in result.stderr, result.stderr


# -- cli review (session 14): import errors located, stdin, tail -f ending ----------------

def _export_lines(count, bad=None):
    """``count`` exported addUser events (seq n is user u<n>); ``bad`` maps a seq
    to the payload name it gets instead (a duplicate: the reducer refuses it)."""
    bad = bad or {}
    return [json.dumps({"seq": n, "id": f"e{n}", "type": "addUser",
                        "payload": {"name": bad.get(n, f"u{n}")}, "meta": {},
                        "ts": "2026-01-01T00:00:00+00:00"}) for n in range(1, count + 1)]


def test_an_import_refused_by_the_reducer_names_the_line_and_keeps_the_events_before(work):
    (work / "dup.jsonl").write_text("\n".join(_export_lines(1500, {1234: "u7"})) + "\n")
    result = cli("import", "new.db", "dup.jsonl", "--app", "cliapp:APP", cwd=work, check=False)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "dup.jsonl line 1234: event seq 1234 ('addUser', id 'e1234')" in result.stderr
    assert "u7 exists" in result.stderr and "1233 events imported before it" in result.stderr
    assert json.loads(cli("info", "new.db", "--json", cwd=work).stdout)["head"] == 1233
    fixed = _export_lines(1500)
    (work / "dup.jsonl").write_text("\n".join(fixed) + "\n")  # fixed: the rest goes in
    out = cli("import", "new.db", "dup.jsonl", "--app", "cliapp:APP", cwd=work).stdout
    assert "imported 267 events (1233 already present)" in out


def test_an_import_that_stops_on_a_bad_line_says_what_it_imported(work):
    lines = _export_lines(1200)
    lines[1099] = "{not json"
    (work / "bad.jsonl").write_text("\n".join(lines) + "\n")
    result = cli("import", "new.db", "bad.jsonl", "--app", "cliapp:APP", cwd=work, check=False)
    assert result.returncode == 1 and "bad.jsonl line 1100 is not valid JSON" in result.stderr
    assert "the 1000 events imported before it are in new.db" in result.stderr, result.stderr


def test_an_import_whose_lines_are_out_of_order_says_so(work):
    lines = _export_lines(5)
    lines[2], lines[3] = lines[3], lines[2]
    (work / "swap.jsonl").write_text("\n".join(lines) + "\n")
    result = cli("import", "new.db", "swap.jsonl", "--app", "cliapp:APP", cwd=work, check=False)
    assert result.returncode == 1, result.stderr
    assert "swap.jsonl line 3 holds seq 4, but the next seq here is 3" in result.stderr
    assert "is there already" not in result.stderr and not os.path.exists(work / "new.db")


def test_import_reads_standard_input_given_as_a_dash(work):
    exported = cli("export", "app.db", cwd=work).stdout
    out = cli("import", "copy.db", "-", "--app", "cliapp:APP", cwd=work, input=exported).stdout
    assert "imported 5 events" in out
    assert cli("export", "copy.db", cwd=work).stdout == exported


def test_tail_follow_stops_with_an_error_when_the_file_is_deleted(work, monkeypatch, capsys):
    follow = fluxlite.Store.follow

    def and_meanwhile(self, *args, **kwargs):  # the file goes during the first poll
        if os.path.exists(work / "app.db"):
            os.remove(work / "app.db")
        return follow(self, *args, **kwargs)

    monkeypatch.setattr(fluxlite.Store, "follow", and_meanwhile)
    import threading
    ctrl_c = threading.Timer(5, os.kill, (os.getpid(), signal.SIGINT))  # should it follow on
    ctrl_c.start()
    try:
        assert fluxlite.main(["tail", "-f", "-n", "1", str(work / "app.db")]) == 1
    finally:
        ctrl_c.cancel()
    assert "was deleted, renamed or replaced while it was followed" in capsys.readouterr().err


def test_an_import_refuses_an_id_given_twice_instead_of_dropping_the_second(work):
    lines = _export_lines(5)
    lines[4] = lines[0].replace('"seq": 1,', '"seq": 5,')  # seq 5 repeats seq 1's event
    (work / "twice.jsonl").write_text("\n".join(lines) + "\n")
    result = cli("import", "new.db", "twice.jsonl", "--app", "cliapp:APP", cwd=work, check=False)
    assert result.returncode == 1 and "twice.jsonl line 5" in result.stderr, result.stderr
    assert "seq 1 has that id already" in result.stderr
    assert json.loads(cli("info", "new.db", "--json", cwd=work).stdout)["head"] == 4


def _follow_without_unbuffered_output(work):
    """`fluxlite tail -f -n 1 app.db` with its output to a pipe, as Python buffers it
    when PYTHONUNBUFFERED is not set (as it is not on a user's machine)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.Popen([sys.executable, "-m", "fluxlite", "tail", "-f", "-n", "1",
                             "app.db"], cwd=work, env={**env, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _lines_within(stream, count, seconds):
    import select
    lines, deadline = b"", time.monotonic() + seconds
    while lines.count(b"\n") < count and time.monotonic() < deadline:
        if select.select([stream], [], [], max(0, deadline - time.monotonic()))[0]:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                break
            lines += chunk
    return lines.decode().splitlines()


def test_tail_follow_into_a_pipe_shows_the_last_events_before_any_new_one(work):
    tail = _follow_without_unbuffered_output(work)
    try:
        lines = _lines_within(tail.stdout, 3, 5)  # no event comes: they were buffered
        assert len(lines) == 3 and lines[2].split()[0] == "5", lines
    finally:
        tail.kill()
        tail.wait()


def test_tail_follow_ended_by_sigterm_closes_the_store_and_exits_143(work):
    assert not os.path.exists(work / "app.db-wal")
    tail = _follow_without_unbuffered_output(work)
    try:
        assert len(_lines_within(tail.stdout, 3, 5)) == 3  # header, rule, event 5: following
        tail.send_signal(signal.SIGTERM)  # kill, systemd, docker stop
        assert tail.wait(10) == 143
        assert tail.stderr.read() == b""
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
    assert sorted(p.name for p in work.glob("app.db*")) == ["app.db"]  # no -wal, -shm left


def test_tail_reads_a_long_log_page_by_page(work, monkeypatch, capsys):
    with fluxlite.open(work / "app.db", app=_app(work)) as store:
        store.dispatch_many([{"type": "addUser", "payload": {"name": f"u{n:04d}"}}
                             for n in range(2500)])
    query, largest = fluxlite.Store.query, [0]

    def spy(self, *args, **kwargs):
        rows = query(self, *args, **kwargs)
        largest[0] = max(largest[0], len(rows))
        return rows

    monkeypatch.setattr(fluxlite.Store, "query", spy)
    assert fluxlite.main(["tail", "-n", "2400", "--json", str(work / "app.db")]) == 0
    seqs = [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()]
    assert seqs == list(range(106, 2506)) and largest[0] <= 1000  # memory flat in N
    assert fluxlite.main(["tail", "-n", "2", str(work / "app.db")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].split()[0] == "seq" and lines[3].split()[0] == "2505"


def test_backup_to_a_directory_says_to_name_a_file_in_it(work):
    (work / "backups").mkdir()
    result = cli("backup", "app.db", "backups", cwd=work, check=False)
    assert result.returncode == 1 and "'backups' is a directory" in result.stderr
    assert os.path.join("backups", "app.db") in result.stderr and not any(
        (work / "backups").iterdir())


def test_an_import_stopped_by_ctrl_c_says_what_it_imported(work, monkeypatch, capsys):
    (work / "many.jsonl").write_text("\n".join(_export_lines(2500)) + "\n")
    commit, calls = fluxlite.Store._commit_prepared, []

    def ctrl_c_at_the_third_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return commit(self, *args, **kwargs)

    monkeypatch.setattr(fluxlite.Store, "_commit_prepared", ctrl_c_at_the_third_batch)
    monkeypatch.chdir(work)
    assert fluxlite.main(["import", "new.db", "many.jsonl", "--app", "cliapp:APP"]) == 130
    err = capsys.readouterr().err
    assert "interrupted: 2000 events are in new.db; import the file again" in err, err


# -- mutation testing (session 14): guarantees the suite did not check ----------


def test_import_of_overlapping_exports_skips_each_repeated_event(work):
    # Two exports that overlap, concatenated: the repeats within the one file are
    # the events just read (seq 2 is the file's second event, not its first).
    lines = cli("export", "app.db", cwd=work).stdout.splitlines()
    (work / "both.jsonl").write_text("\n".join(lines[:3] + lines[1:]) + "\n")
    out = cli("import", "copy.db", "both.jsonl", "--app", "cliapp:APP", cwd=work).stdout
    assert "imported 5 events (2 already present)" in out
    assert cli("export", "copy.db", cwd=work).stdout.splitlines() == lines


def test_log_since_and_until_take_an_event_at_exactly_that_time(work):
    # The fixture's events are at 12:00:00 of 1 to 5 January: both ends are inclusive.
    shown = cli("log", "app.db", "--json", "--since", "2026-01-02T12:00:00Z", "--until",
                "2026-01-04T12:00:00Z", cwd=work).stdout.splitlines()
    assert [json.loads(line)["seq"] for line in shown] == [2, 3, 4]


def test_log_and_export_page_through_more_than_a_thousand_events(work, capsys):
    with fluxlite.open(work / "app.db", app=__import__("cliapp").APP) as store:
        store.dispatch_many([{"type": "addUser", "payload": {"name": f"u{n}"}}
                             for n in range(1200)])

    def seqs(*args):  # in this process: five runs of 1,205 lines stay fast
        assert fluxlite.main([*args[:1], str(work / "app.db"), *args[1:]]) == 0
        return [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()]
    everything = list(range(1, 1206))
    assert seqs("export") == everything
    assert seqs("log", "--json") == everything
    assert seqs("log", "--json", "--reverse") == everything[::-1]
    assert seqs("log", "--json", "--limit", "1100") == everything[:1100]
    assert fluxlite.main(["log", str(work / "app.db")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + 1205 and table[-1].split()[0] == "1205"


def test_import_refuses_an_event_whose_id_is_logged_at_its_seq_with_another_payload(work):
    lines = cli("export", "app.db", cwd=work).stdout.splitlines()
    edited = {**json.loads(lines[0]), "payload": {"name": "someone else"}}
    (work / "edited.jsonl").write_text(json.dumps(edited) + "\n")
    result = cli("import", "app.db", "edited.jsonl", "--app", "cliapp:APP", cwd=work,
                 check=False)
    assert result.returncode == 1 and "the logs conflict" in result.stderr


# -- diskfull: a real full disk (RLIMIT_FSIZE on the command's process) -------------

def _files_cannot_grow_past(size):
    """preexec_fn: the command's files cannot grow past ``size`` bytes (a disk full for
    it; its stderr is a pipe, not counted). An ignored SIGXFSZ stays ignored across
    exec, so a write past the limit fails with EFBIG instead of killing it."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
    return limit


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="RLIMIT_FSIZE is POSIX")
def test_backup_onto_a_full_disk_is_an_error_message_and_leaves_no_file(work):
    # It was a traceback (a raw sqlite3.OperationalError out of main()).
    size = (work / "app.db").stat().st_size
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "fluxlite", "backup", "app.db", "copy.db"],
                            cwd=work, env=env, capture_output=True, text=True, timeout=60,
                            preexec_fn=_files_cannot_grow_past(size // 2))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "fluxlite backup: error:" in result.stderr and "disk" in result.stderr
    assert not [p.name for p in work.iterdir() if p.name.startswith("copy.db")]
    assert "backed up 5 events" in cli("backup", "app.db", "copy.db", cwd=work).stdout


# Area: clock. An imported ts outside the years 1 to 9999 in UTC is named as such.

def test_import_of_a_ts_outside_the_years_1_to_9999_says_so(work):
    # The refusal said only "needs ... a ts with a time zone", and this one has one.
    first = json.loads(cli("export", "app.db", cwd=work).stdout.splitlines()[0])
    (work / "bad.jsonl").write_text(json.dumps({**first, "ts": "0001-01-01T00:00:00+01:00"}) + "\n")
    result = cli("import", "new.db", "bad.jsonl", "--app", "cliapp:APP", cwd=work, check=False)
    assert result.returncode == 1 and "in the years 1 to 9999 in UTC" in result.stderr


# Area: newcomer. A log or tail that matches nothing says so, as query's "(no rows)".

def test_log_and_tail_that_match_nothing_say_so_in_columns_and_print_nothing_as_json(
        work, capsys):
    # `fluxlite log demo.db --until 2026-01-31` (the README's example of a date) printed
    # nothing at all: no header, no line, a newcomer could not tell it had run.
    db = str(work / "app.db")
    for args in (["log", db, "--until", "2026-01-01"], ["log", db, "--type", "nope"],
                 ["log", db, "--after", "5"], ["tail", db, "-n", "0"]):
        assert fluxlite.main(args) == 0
        assert capsys.readouterr().out == "(no events)\n", args
        assert fluxlite.main([*args, "--json"]) == 0
        assert capsys.readouterr().out == "", args
    assert fluxlite.main(["log", db, "--limit", "1"]) == 0
    assert "(no events)" not in capsys.readouterr().out


# -- leftovers: what a failed backup or demo made is undone --------------------------

@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="RLIMIT_FSIZE is POSIX")
def test_backup_onto_an_empty_file_on_a_full_disk_leaves_it_empty(work):
    # An empty DEST is allowed (it counts as new), but a failed backup left its partial
    # copy in it, and the retry was refused: "'copy.db' exists".
    size = (work / "app.db").stat().st_size
    (work / "copy.db").write_bytes(b"")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "fluxlite", "backup", "app.db", "copy.db"],
                            cwd=work, env=env, capture_output=True, text=True, timeout=60,
                            preexec_fn=_files_cannot_grow_past(size // 2))
    assert result.returncode == 1 and "disk" in result.stderr, result.stderr
    assert sorted(p.name for p in work.iterdir() if p.name.startswith("copy.db")) == ["copy.db"]
    assert (work / "copy.db").stat().st_size == 0
    assert "backed up 5 events" in cli("backup", "app.db", "copy.db", cwd=work).stdout


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="RLIMIT_FSIZE is POSIX")
def test_demo_on_a_full_disk_leaves_no_store_behind_and_can_run_again(tmp_path):
    # It left DIR/demo.db (and its -wal, -shm), and the next `demo DIR` refused to
    # start: "demo.db exists".
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for limit in (0, 45000, 100000):  # the first open, a dispatch, the reopen at version 2
        folder = tmp_path / f"at{limit}"
        result = subprocess.run([sys.executable, "-m", "fluxlite", "demo", str(folder)],
                                capture_output=True, text=True, timeout=60, env=env,
                                preexec_fn=_files_cannot_grow_past(limit))
        assert result.returncode != 0, (limit, result.stdout)
        assert not folder.exists() or not list(folder.iterdir()), (limit, result.stderr)
    folder = tmp_path / "at0"
    assert "verify()" in cli("demo", str(folder), cwd=tmp_path).stdout
    assert (folder / "demo.db").stat().st_size > 0


# --- deploy: rolling out a new version of an application's code ---------------------


def test_dispatch_and_import_with_old_code_refuse_a_file_the_new_code_rebuilt(work):
    # Found by review (deploy): `fluxlite dispatch` with the app of the old code (an old
    # checkout, a cron job) opened the file with it, which rebuilt the whole read model
    # back to the old schema before dispatching, unasked, and every process running the
    # new code then refused to dispatch. verify already refused; now all three do.
    assert "version 2" in cli("rebuild", "app.db", "--app", "cliapp:APP2", cwd=work).stdout
    (work / "events.jsonl").write_text(cli("export", "app.db", cwd=work).stdout)
    before = db_bytes(work / "app.db")
    for command in (["dispatch", "app.db", "addUser", '{"name": "old"}'],
                    ["import", "app.db", "events.jsonl"]):
        old = cli(*command, "--app", "cliapp:APP", cwd=work, check=False)
        assert old.returncode == 1, old.stdout
        assert "run `fluxlite rebuild app.db --app cliapp:APP` first" in old.stderr, old.stderr
        assert db_bytes(work / "app.db") == before
    with fluxlite.open(work / "app.db", readonly=True) as store:
        assert store.version == 2
    out = json.loads(cli("dispatch", "app.db", "addUser", '{"name": "new"}', "--app",
                         "cliapp:APP2", cwd=work).stdout)
    assert out["event"]["seq"] == 6
    assert "imported 0 events (5 already" in cli("import", "app.db", "events.jsonl", "--app",
                                                  "cliapp:APP2", cwd=work).stdout


# --- importexport: moving logs between stores (export, import) ---------------------

DEFERRED_APP = '''
import fluxlite

SCHEMA = """
CREATE TABLE parents (id TEXT PRIMARY KEY);
CREATE TABLE kids (id TEXT PRIMARY KEY,
                   parent TEXT REFERENCES parents(id) DEFERRABLE INITIALLY DEFERRED);
"""

def reducer(view, event):
    p = event.payload
    if event.type == "parent":
        return view.parents.insert(id=p["id"])
    if event.type == "kid":
        return view.kids.insert(id=p["id"], parent=p["parent"])

APP = fluxlite.App(SCHEMA, reducer)
'''


def _deferred_store(tmp_path, monkeypatch, before):
    """A store whose last transaction holds a kid before its parent (a reference
    that holds at that transaction's end only), after ``before`` other events."""
    (tmp_path / "deferredapp.py").write_text(DEFERRED_APP)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import deferredapp
    with fluxlite.open(tmp_path / "src.db", app=deferredapp.APP) as store:
        if before:
            store.dispatch_many([{"type": "parent", "payload": {"id": f"p{n}"}}
                                 for n in range(before)])
        store.dispatch_many([{"type": "kid", "payload": {"id": "k", "parent": "late"}},
                             {"type": "parent", "payload": {"id": "late"}}])
    return deferredapp


@pytest.mark.parametrize("before", [999, 1999])  # the pair cut by a batch's end
def test_import_of_a_transaction_cut_by_the_batch_end_keeps_it_whole(
        tmp_path, monkeypatch, capsys, before):
    # A batch of the log (dispatch_many) whose deferred reference holds only at its
    # end, cut in two by import's 1,000-line batches: the import stopped with "was not
    # imported: ... deferred constraint ...; fix the file" on an exported file that
    # is exactly right, and could never be imported.
    deferredapp = _deferred_store(tmp_path, monkeypatch, before)
    with open("events.jsonl", "w", encoding="utf-8") as out:
        monkeypatch.setattr(sys, "stdout", out)
        assert fluxlite.main(["export", "src.db"]) == 0
    monkeypatch.undo()  # (stdout back; the directory and the path set again)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert fluxlite.main(["import", "copy.db", "events.jsonl", "--app", "deferredapp:APP"]) == 0
    assert f"imported {before + 2} events" in capsys.readouterr().out
    with fluxlite.open("src.db", readonly=True) as src, \
            fluxlite.open("copy.db", app=deferredapp.APP) as copy:
        assert copy.query("SELECT * FROM events") == src.query("SELECT * FROM events")
        assert copy.view.kids.all() == [{"id": "k", "parent": "late"}]
        copy.verify()


def test_import_of_a_reference_that_never_holds_names_its_line(tmp_path, monkeypatch, capsys):
    # Held back for the lines after it, a kid whose parent never comes is still an
    # error naming its line at the end of the file, with what came before it imported.
    _deferred_store(tmp_path, monkeypatch, 0)
    lines = [json.dumps({"seq": n, "id": f"p{n}", "type": "parent", "payload": {"id": f"p{n}"},
                         "meta": {}, "ts": "2026-01-01T00:00:00Z"}) for n in range(1, 1000)]
    lines.append(json.dumps({"seq": 1000, "id": "k", "type": "kid", "meta": {},
                             "payload": {"id": "k", "parent": "nobody"},
                             "ts": "2026-01-01T00:00:00Z"}))
    lines.append(json.dumps({"seq": 1001, "id": "p", "type": "parent", "meta": {},
                             "payload": {"id": "p"}, "ts": "2026-01-01T00:00:00Z"}))
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    assert fluxlite.main(["import", "copy.db", "bad.jsonl", "--app", "deferredapp:APP"]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl line 1000: event seq 1000" in err and "deferred" in err, err
    assert "the 999 events imported before it" in err
    with fluxlite.open("copy.db", readonly=True) as copy:
        assert copy.head == 999


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX kill -9")
def test_an_import_killed_mid_way_resumes_with_no_duplicate_and_no_gap(work, monkeypatch,
                                                                        capsys):
    # A guard (it passed before): the import process killed with SIGKILL during its
    # third batch (by its own reducer, at a line known in advance: no timing), then
    # run again, ends with every event once, in order, as the file has them.
    (work / "dying.py").write_text(
        "import os, signal, cliapp, fluxlite\n"
        "def reducer(view, event):\n"
        "    if event.id == os.environ.get('DIE_AT'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return cliapp.reducer(view, event)\n"
        "APP = fluxlite.App(cliapp.SCHEMA, reducer)\n")
    lines = _export_lines(2500)
    (work / "many.jsonl").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DIE_AT": "e2100"}
    killed = subprocess.run([sys.executable, "-m", "fluxlite", "import", "new.db", "many.jsonl",
                             "--app", "dying:APP"], cwd=work, env=env, capture_output=True,
                            timeout=60)
    assert killed.returncode == -signal.SIGKILL
    with fluxlite.open(work / "new.db", readonly=True) as store:
        assert store.head == 2000  # the two batches committed before it
    monkeypatch.chdir(work)  # the rest in this process: fast
    monkeypatch.delenv("DIE_AT", raising=False)
    assert fluxlite.main(["import", "new.db", "many.jsonl", "--app", "dying:APP"]) == 0
    assert "imported 500 events (2000 already present)" in capsys.readouterr().out
    assert fluxlite.main(["export", "new.db"]) == 0
    exported = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in exported] == [
        {**json.loads(line), "ts": "2026-01-01T00:00:00.000000+00:00"} for line in lines]
    assert fluxlite.main(["verify", "new.db", "--app", "dying:APP"]) == 0


def test_export_then_import_gives_the_same_log_model_and_past(work, monkeypatch, capsys):
    # A guard (it passed before): the values JSON can lose or change on the way.
    import cliapp
    odd = {"name": "\u00e9\U0001F600\u2028\x00", "big": 2 ** 70, "max": 1e308, "zero": -0.0,
           "tiny": 5e-324, "whole": 1.0, "nested": {"b": [None, True, 0.1 + 0.2], "a": {}}}
    with fluxlite.open(work / "app.db", app=cliapp.APP) as store:
        store.dispatch("addUser", odd, meta={"k": -0.0, "big": -2 ** 64}, actor="\u00e9")
    monkeypatch.chdir(work)
    assert fluxlite.main(["export", "app.db"]) == 0
    (work / "events.jsonl").write_text(capsys.readouterr().out, encoding="utf-8")
    assert fluxlite.main(["import", "copy.db", "events.jsonl", "--app", "cliapp:APP"]) == 0
    with fluxlite.open(work / "app.db", app=cliapp.APP) as a, \
            fluxlite.open(work / "copy.db", app=cliapp.APP) as b:
        assert b.query("SELECT * FROM events") == a.query("SELECT * FROM events")
        assert list(b.events()) == list(a.events())
        assert b.event(6).payload["zero"] == 0 and str(b.event(6).payload["zero"]) == "-0.0"
        for table in ("users", "rights"):
            assert b.query(f"SELECT * FROM {table}") == a.query(f"SELECT * FROM {table}")
        b.verify()
        for event in a.events():
            with a.at(time=event.ts) as then_a, b.at(time=event.ts) as then_b:
                assert then_b.users.all() == then_a.users.all()


def test_import_holds_a_cut_transaction_back_for_a_bounded_number_of_lines(
        tmp_path, monkeypatch, capsys):
    # The hold is bounded: a reference that never holds (code other than the
    # log's) is not retried over the whole rest of the file, each batch again.
    _deferred_store(tmp_path, monkeypatch, 0)
    monkeypatch.setattr(fluxlite, "_IMPORT_HOLD", 500)
    line = lambda n, kind, payload: json.dumps({"seq": n, "id": f"e{n}", "type": kind,
                                                "payload": payload, "meta": {},
                                                "ts": "2026-01-01T00:00:00Z"})
    lines = [line(n, "parent", {"id": f"p{n}"}) for n in range(1, 1000)]
    lines.append(line(1000, "kid", {"id": "k", "parent": "nobody"}))
    lines += [line(n, "parent", {"id": f"p{n}"}) for n in range(1001, 3501)]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    tries = []
    commit = fluxlite.Store._commit_prepared
    monkeypatch.setattr(fluxlite.Store, "_commit_prepared",
                        lambda store, prepared, *a: tries.append(len(prepared)) or
                        commit(store, prepared, *a))
    assert fluxlite.main(["import", "copy.db", "bad.jsonl", "--app", "deferredapp:APP"]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl line 1000: event seq 1000" in err and "the 999 events" in err, err
    assert max(tries) <= 1001  # the held line and the batch after it, not the whole file


# --- dogfood: a new user's inventory app, built from the README -----------------------


def test_dogfood_query_with_a_placeholder_says_the_cli_binds_none(tmp_path, capsys):
    # The error was query()'s advice, "Give one value per ? (a sequence), or a dict",
    # which the command line has no way to follow.
    db = str(tmp_path / "app.db")
    fluxlite.open(db, schema="CREATE TABLE items (sku TEXT PRIMARY KEY)",
                  reducer=lambda view, event: None).close()
    for when in ([], ["--at", "0"]):
        assert fluxlite.main(["query", db, "SELECT * FROM items WHERE sku = ?", *when]) == 1
        err = capsys.readouterr().err  # (session 17: it says how to pass one)
        assert "no value was given for it" in err and "--param VALUE per ?" in err, err
        assert "Give one value per ?" not in err, err
    assert fluxlite.main(["query", db, "SELECT * FROM missing"]) == 1  # other errors as before
    assert "no such table: missing" in capsys.readouterr().err


# -- cli (session 17): query's placeholders bound, history's window, log --actor,
# -- tail -f's columns ---------------------------------------------------------------

def _run(capsys, *args):
    """fluxlite.main in this process: (exit status, stdout, stderr); a usage error's 2 too."""
    try:
        status = fluxlite.main([str(a) for a in args])
    except SystemExit as exc:  # argparse's
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def _json_lines(text):
    return [json.loads(line) for line in text.splitlines()]


def test_query_binds_each_param_in_order_and_reads_it_as_history_reads_a_key(work, capsys):
    sql = "SELECT name, role FROM users WHERE name = ? AND role = ?"
    got = cli("query", "app.db", sql, "--param", "barack", "--param", "president", "--json",
              cwd=work).stdout  # (one run as a user runs it)
    assert _json_lines(got) == [{"name": "barack", "role": "president"}]
    db = work / "app.db"
    status, past, _ = _run(capsys, "query", db, "SELECT name FROM users WHERE name = ?",
                           "--param", "joe", "--at", "3", "--csv")
    assert status == 0 and list(csv.reader(io.StringIO(past))) == [["name"], ["joe"]]
    # A JSON scalar is that value; any other text is the text as written.
    kinds = {"5": "integer", "1.5": "real", '"5"': "text", "null": "null", "true": "integer",
             "007": "text", "A1": "text", "[1, 2]": "text", "NaN": "text", "1e999": "text",
             "99999999999999999999": "text", "": "text"}
    sql = "SELECT " + ", ".join(f"typeof(?) AS t{n}, ? AS v{n}" for n in range(len(kinds)))
    args = [a for value in kinds for a in ("--param", value, "--param", value)]
    status, out, err = _run(capsys, "query", db, sql, *args, "--json")
    row = json.loads(out)
    assert [row[f"t{n}"] for n in range(len(kinds))] == list(kinds.values()), row
    assert row["v5"] == "007" and row["v7"] == "[1, 2]" and row["v2"] == "5"


def test_query_params_takes_a_json_list_or_an_object_for_names(work, capsys):
    db = work / "app.db"
    sql = "SELECT name FROM users WHERE name = :who OR role = :role ORDER BY name"
    status, out, _ = _run(capsys, "query", db, sql, "--params",
                          '{"who": "kamala", "role": "president"}', "--json")
    assert status == 0 and _json_lines(out) == [{"name": "barack"}, {"name": "kamala"}]
    status, out, _ = _run(capsys, "query", db, "SELECT ? AS a, ? AS b, ? AS c", "--params",
                          '["x", 2, null]', "--time", "2026-01-01T12:00:00Z", "--json")
    assert status == 0 and json.loads(out) == {"a": "x", "b": 2, "c": None}


@pytest.mark.parametrize("params, message", [
    ("x", "'x' is not JSON"), ("5", "no JSON list or object"),
    ('"barack"', "no JSON list or object"), ("[[1]]", "no value SQLite binds"),
    ('{"a": {}}', "no value SQLite binds"), ("[NaN]", "NaN is not JSON"),
    ("[1e999]", "no value SQLite binds"), ("[99999999999999999999]", "no value SQLite binds"),
])
def test_query_params_that_are_no_list_or_object_of_values_are_usage_errors(
        work, capsys, params, message):
    status, out, err = _run(capsys, "query", work / "app.db", "SELECT ? AS a", "--params", params)
    assert status == 2 and out == ""
    assert "argument --params: " in err and message in err, err


def test_query_values_that_do_not_fit_the_placeholders_say_how_to_pass_them(work, capsys):
    db = work / "app.db"
    for args in (["SELECT name FROM users WHERE name = ?"],
                 ["SELECT name FROM users WHERE name = ?", "--at", "1"],
                 ["SELECT name FROM users WHERE name = ?", "--param", "a", "--param", "b"],
                 ["SELECT name FROM users WHERE name = ?", "--params", '{"n": "a"}'],
                 ["SELECT name FROM users WHERE name = :n", "--params", '{"m": "a"}'],
                 ["SELECT 1 AS one", "--param", "a"]):
        status, out, err = _run(capsys, "query", db, *args)
        assert status == 1 and out == "", args
        assert "--param VALUE per ?" in err and "--params with a JSON list" in err, err
        assert "Give one value per ? (a sequence)" not in err and len(err.splitlines()) == 1
    status, _, err = _run(capsys, "query", db, "SELECT 1 AS x", "--param", "1", "--params", "[1]")
    assert status == 2 and "not allowed with argument" in err, err


def test_history_takes_the_apis_window_after_and_upto(work, capsys):
    def ops(*args):
        status, out, err = _run(capsys, "history", work / "app.db", *args, "--json")
        assert status == 0, err
        return [(r["seq"], r["op"]) for r in _json_lines(out)]

    assert ops("users", "joe") == [(3, "insert"), (4, "delete")]
    assert ops("users", "joe", "--after", "3") == [(4, "delete")]
    assert ops("users", "joe", "--upto", "3") == [(3, "insert")]
    assert ops("users", "barack", "--after", "1", "--upto", "2") == [(2, "update")]
    assert ops("users", "barack", "--upto", "2", "--reverse", "--limit", "1") == [(2, "update")]
    assert ops("rights", '["barack", "president"]', "--after", "2") == []
    empty = cli("history", "app.db", "users", "joe", "--after", "4", cwd=work).stdout
    assert empty == "no versions of users joe in the journal after seq 4\n"
    for bad in (["--after", "-1"], ["--upto", "x"]):
        status, _, err = _run(capsys, "history", work / "app.db", "users", "joe", *bad)
        assert status == 2 and "whole number >= 0" in err, err


def test_log_actor_keeps_the_events_of_one_actor(work, capsys):
    def seqs(*args):
        status, out, err = _run(capsys, "log", work / "app.db", "--json", *args)
        assert status == 0, err
        return [r["seq"] for r in _json_lines(out)]

    assert seqs("--actor", "admin") == [1, 2]
    assert seqs("--actor", "admin", "--reverse", "--limit", "1") == [2]
    assert seqs("--actor", "admin", "--type", "addUser") == [1]
    assert seqs("--actor", "Admin") == [] and seqs("--actor", "nobody", "--limit", "1") == []
    table = cli("log", "app.db", "--actor", "admin", cwd=work).stdout.splitlines()
    assert len(table) == 4 and table[2].split()[4] == "admin"
    assert _run(capsys, "log", work / "app.db", "--actor", "nobody")[1] == "(no events)\n"
    status, _, err = _run(capsys, "log", work / "app.db", "--actor", "")
    assert status == 2 and "argument --actor: '' is no actor" in err, err


@pytest.mark.parametrize("in_sqlite", [True, False])
def test_log_actor_pages_through_a_long_log_with_or_without_json_functions(
        work, monkeypatch, capsys, in_sqlite):
    if not in_sqlite:  # a SQLite built without JSON functions: filtered in Python
        monkeypatch.setattr(fluxlite, "_has_json_functions", lambda store: False)
    with fluxlite.open(work / "app.db", app=_app(work)) as store:
        store.dispatch_many([{"type": "addUser", "payload": {"name": f"u{n}"},
                              "meta": {"actor": "bot"} if n % 3 == 0 else {}}
                             for n in range(2700)])
        store.dispatch("addUser", {"name": "x"}, meta={"actor": 7})  # not the text "7"
    bots = [6 + n for n in range(0, 2700, 3)]
    db = str(work / "app.db")
    for args, expected in ((["--actor", "bot"], bots),
                           (["--actor", "bot", "--limit", "850"], bots[:850]),
                           (["--actor", "bot", "--reverse", "--limit", "5"], bots[::-1][:5]),
                           (["--actor", "admin", "--after", "1"], [2]),
                           (["--actor", "7"], [])):
        assert fluxlite.main(["log", db, "--json", *args]) == 0
        got = [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()]
        assert got == expected, args


def _follow_lines(work, monkeypatch, capsys, db, args, dispatch):
    """tail -f's output, ended by a Ctrl-C it sends itself once ``dispatch`` ran and
    what it committed was printed (no sleep: the loop's own check is the clock)."""
    calls = []

    def then_stop(store, path):
        calls.append(path)
        if len(calls) == 1:
            with fluxlite.open(db, app=_app(work)) as other:
                dispatch(other)
        elif len(calls) == 2:  # the follow before this read every event committed
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(fluxlite, "_check_still_there", then_stop)
    assert fluxlite.main(["tail", "-f", *args, db]) == 130
    return capsys.readouterr().out.splitlines()


def _cells_under(header, line):
    starts = [header.index(name) for name in ("seq", "time", "type", "id", "actor", "payload")]
    return [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]


def test_tail_follow_prints_new_events_under_the_headers_columns(work, monkeypatch, capsys):
    # -n 1 shows an addUser (7 wide); a grantAccess (11) pushed the id, actor and
    # payload of every later line along.
    def more(store):
        store.dispatch("grantAccess", {"name": "barack", "right": "veep"}, actor="admin")
        store.dispatch("addUser", {"name": "zoe"})

    lines = _follow_lines(work, monkeypatch, capsys, str(work / "app.db"), ["-n", "1"], more)
    header, rule, *events = lines
    assert [_cells_under(header, line)[:3] for line in events] == [
        ["5", "2026-01-05T12:00:00Z", "addUser"],
        ["6", _cells_under(header, events[1])[1], "grantAccess"],
        ["7", _cells_under(header, events[2])[1], "addUser"]], lines
    assert [_cells_under(header, line)[4:] for line in events[1:]] == [
        ["admin", '{"name": "barack", "right": "veep"}'], ["", '{"name": "zoe"}']], lines
    assert all(len(_cells_under(header, line)[3]) == 36 for line in events), lines


def test_tail_follow_of_an_empty_log_prints_the_header_and_lines_under_it(
        tmp_path, work, monkeypatch, capsys):
    # It printed no header, then each line in columns of its own.
    db = str(tmp_path / "empty.db")
    _app(work).open(db).close()

    def more(store):
        store.dispatch("addUser", {"name": "barack"}, actor="admin")
        store.dispatch("grantAccess", {"name": "barack", "right": "boss"})

    header, rule, *events = _follow_lines(work, monkeypatch, capsys, db, ["-n", "0"], more)
    assert header.split() == ["seq", "time", "type", "id", "actor", "payload"]
    cells = [_cells_under(header, line) for line in events]
    assert [c[2] for c in cells] == ["addUser", "grantAccess"]
    assert [c[4:] for c in cells] == [["admin", '{"name": "barack"}'],
                                      ["", '{"name": "barack", "right": "boss"}']], events


def test_history_of_a_composite_key_with_no_versions_says_so(work, capsys):
    # It said "Table 'rights' has the composite primary key (user, right); a key is a
    # tuple of 2 values ..., received '[\"joe\", \"veep\"]'", to a key given as asked.
    for args in ([], ["--upto", "1"]):
        status, out, err = _run(capsys, "history", work / "app.db", "rights", '["joe", "veep"]',
                                *args)
        assert status == 0 and err == "", err
        assert out.startswith("no versions of rights [\"joe\", \"veep\"] in the journal"), out
    status, _, err = _run(capsys, "history", work / "app.db", "rights", "joe")
    assert status == 1 and "KEY is then a JSON list" in err, err  # (as before)


def test_history_with_no_versions_shows_a_key_of_control_characters_escaped(work, capsys):
    # "no versions of users <ESC>[2J ..." wrote the escape sequence to the terminal raw.
    status, out, _ = _run(capsys, "history", work / "app.db", "users", "x\x1b[2J\u202e")
    assert status == 0 and "\x1b" not in out and "\u202e" not in out
    assert out == "no versions of users x\\x1b[2J\\u202e in the journal\n"


# -- review3 (session 17): log --actor on actors that are no text, and on damage -------

def _actor_seqs(capsys, db, *args):
    status, out, err = _run(capsys, "log", db, "--json", *args)
    assert status == 0, err
    return [r["seq"] for r in _json_lines(out)]


@pytest.mark.parametrize("in_sqlite", [True, False])
def test_log_actor_matches_a_text_actor_only_not_a_lists_or_objects_json(
        work, monkeypatch, capsys, in_sqlite):
    # In SQLite, json_extract() gave a list or object actor as its JSON text: --actor
    # '{"a":1}' showed an event whose actor is {"a": 1}, which Python's filter (a
    # SQLite without JSON functions) did not, and which no dispatch(actor=) makes.
    if not in_sqlite:
        monkeypatch.setattr(fluxlite, "_has_json_functions", lambda store: False)
    with fluxlite.open(work / "app.db", app=_app(work)) as store:
        store.dispatch("addUser", {"name": "a"}, meta={"actor": {"a": 1}})  # 6
        store.dispatch("addUser", {"name": "b"}, meta={"actor": ["x"]})  # 7
        store.dispatch("addUser", {"name": "c"}, actor='{"a":1}')  # 8: text, as JSON reads
        store.dispatch("addUser", {"name": "d"}, meta={"actor": True})  # 9
    db = work / "app.db"
    assert _actor_seqs(capsys, db, "--actor", '{"a":1}') == [8]
    assert _actor_seqs(capsys, db, "--actor", '["x"]') == []
    assert _actor_seqs(capsys, db, "--actor", "true") == []
    assert _actor_seqs(capsys, db, "--actor", "admin", "--reverse") == [2, 1]


@pytest.mark.parametrize("in_sqlite", [True, False])
def test_log_actor_passes_over_a_damaged_meta_with_or_without_json_functions(
        work, monkeypatch, capsys, in_sqlite):
    # SQLite's filter counts a meta that is no JSON as no actor's; Python's (a SQLite
    # without JSON functions) raised StorageError for it, so log --actor failed there.
    if not in_sqlite:
        monkeypatch.setattr(fluxlite, "_has_json_functions", lambda store: False)
    with sqlite3.connect(work / "app.db") as raw:  # appended past fluxlite: damage
        raw.execute("INSERT INTO events (id, type, payload, meta, ts) VALUES "
                    "('bad', 'addUser', '{}', '{oops', '2026-01-09T12:00:00.000000+00:00')")
    raw.close()
    assert _actor_seqs(capsys, work / "app.db", "--actor", "admin") == [1, 2]


def test_tail_follow_from_now_starts_on_a_log_with_a_damaged_recent_event(
        work, monkeypatch, capsys):
    # The columns set up front read the newest 1,000 events, and one that cannot be
    # read stopped tail -f -n 0 at its start ("Event 6 in the log is damaged"), which
    # before shows no old event and followed the new ones.
    db = str(work / "app.db")
    with sqlite3.connect(db) as raw:
        raw.execute("INSERT INTO events (id, type, payload, meta, ts) VALUES "
                    "('bad', 'addUser', '{}', '{oops', '2026-01-09T12:00:00.000000+00:00')")
    raw.close()
    lines = _follow_lines(work, monkeypatch, capsys, db, ["-n", "0"],
                          lambda store: store.dispatch("addUser", {"name": "zoe"}, actor="me"))
    header, rule, *events = lines
    assert [_cells_under(header, line)[4:] for line in events] == [
        ["me", '{"name": "zoe"}']], lines


# --- errors (eighteenth session)


def test_errors_dispatch_into_a_one_byte_file_is_refused_and_leaves_it(work):
    # SQLite opens a 1-byte file (`echo > new.db`) as an empty database: the
    # command made it a store over its byte; now one line, exit 1, no traceback.
    (work / "new.db").write_bytes(b"\n")
    result = cli("dispatch", "new.db", "addUser", '{"name": "x"}', "--app", "cliapp:APP",
                 cwd=work, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "fluxlite dispatch: error: 'new.db' is not a SQLite database (file is not a "
        "database); fluxlite stores are SQLite files. Check the path, or choose a new "
        "file name."]
    assert (work / "new.db").read_bytes() == b"\n"
    assert not os.path.exists(work / "new.db-wal")


# paths (nineteenth session)


def test_paths_backup_to_a_bad_destination_is_one_line_and_makes_nothing(work):
    # backup printed a raw OSError ("[Errno 2] No such file or directory: ...") for
    # a missing directory, wrote a FIFO's "disk I/O error", and for "file:copy.db"
    # made copy.db through SQLite's URI reading, an empty "file:copy.db", and failed.
    (work / "plain").write_text("")
    cases = {"nope/copy.db": "The directory of 'nope/copy.db' does not exist; create it first.",
             "plain/copy.db": "is a file, not a directory; check the path.",
             "file:copy.db": "begins with 'file:', which SQLite reads as a URI"}
    if hasattr(os, "mkfifo"):
        os.mkfifo(work / "pipe")
        cases["pipe"] = "'pipe' is a FIFO (named pipe), which cannot hold a store."
    before = sorted(os.listdir(work))
    for dest, message in cases.items():
        result = cli("backup", "app.db", dest, cwd=work, check=False)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fluxlite backup: error: "), lines
        assert message in lines[0] and "Errno" not in lines[0], lines
    assert sorted(os.listdir(work)) == before


def test_paths_demo_in_a_file_is_one_line_and_makes_nothing(work):
    # demo printed "[Errno 17] File exists: 'plain'" (and "[Errno 20] Not a directory").
    (work / "plain").write_text("x")
    cases = {"plain": "fluxlite demo: error: 'plain' exists and is not a directory; demo "
                      "builds its store in a directory: name a new one, or an existing "
                      "directory.",
             "plain/tour": "fluxlite demo: error: Could not create the directory "
                           "'plain/tour': Not a directory. Check that its parent directories "
                           "exist and are writable, or name another directory."}
    for directory, message in cases.items():
        result = cli("demo", directory, cwd=work, check=False)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [message]
    assert (work / "plain").read_text() == "x"


def test_paths_import_into_a_file_uri_is_refused_and_makes_nothing(work):
    # It imported into app.db (SQLite read "file:app.db" as a URI), beside an empty
    # "file:app.db" that every command then read as "not a fluxlite store".
    exported = cli("export", "app.db", cwd=work).stdout
    (work / "events.jsonl").write_text(exported)
    before = sorted(os.listdir(work))
    result = cli("import", "file:other.db", "events.jsonl", "--app", "cliapp:APP", cwd=work,
                 check=False)
    assert result.returncode == 1
    assert "begins with 'file:', which SQLite reads as a URI" in result.stderr
    assert sorted(os.listdir(work)) == before


# --- uncovered (nineteenth session): command-line paths no test ran ----------------------

def test_uncovered_verify_of_a_hand_edited_store_exits_1_with_the_diff(work):
    # Scripts rely on verify's exit status: 0 when the replay matches, 1 with the diff.
    conn = sqlite3.connect(work / "app.db")
    conn.execute("UPDATE users SET role = 'intern' WHERE name = 'barack'")
    conn.commit()
    conn.close()
    result = cli("verify", "app.db", "--app", "cliapp:APP", cwd=work, check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert "Replaying the log does not give the live read model" in result.stderr
    assert "users 'barack': role: live 'intern' != replay 'president'" in result.stderr


def test_uncovered_rebuild_of_a_missing_store_makes_no_file(work):
    result = cli("rebuild", "nope.db", "--app", "cliapp:APP", cwd=work, check=False)
    assert result.returncode == 1 and "no such store file: 'nope.db'" in result.stderr
    assert not (work / "nope.db").exists()


def test_uncovered_backup_onto_an_existing_file_leaves_it_alone(work):
    (work / "kept.db").write_text("someone's data")
    result = cli("backup", "app.db", "kept.db", cwd=work, check=False)
    assert result.returncode == 1 and "'kept.db' exists; backup writes a new file" in result.stderr
    assert (work / "kept.db").read_text() == "someone's data"


def test_uncovered_import_of_a_line_with_no_valid_seq_imports_nothing(work):
    lines = cli("export", "app.db", cwd=work).stdout.splitlines()
    first = json.loads(lines[0])
    for seq in (0, "1", True):
        (work / "bad.jsonl").write_text(json.dumps({**first, "seq": seq}) + "\n")
        result = cli("import", "new.db", "bad.jsonl", "--app", "cliapp:APP", cwd=work,
                     check=False)
        assert result.returncode == 1, seq
        assert f"bad.jsonl line 1: event {first['id']!r} has seq {seq!r}; seqs start at 1" \
            in result.stderr
        assert not (work / "new.db").exists()  # no empty store passing for an import


def test_uncovered_query_and_history_print_tables_for_people(work):
    assert cli("query", "app.db", "SELECT * FROM users WHERE name = 'nobody'",
               cwd=work).stdout.strip() == "(no rows)"
    text = cli("history", "app.db", "users", "joe", cwd=work).stdout
    rows = [line.split() for line in text.strip().splitlines() if not line.startswith("-")]
    assert rows[0][:4] == ["seq", "time", "type", "op"]
    assert rows[1][2:4] == ["addUser", "insert"] and rows[2][2:] == ["removeUser", "delete",
                                                                       "(deleted)"]


def test_uncovered_dispatch_whose_middleware_commits_nothing_is_an_error(work):
    (work / "quietapp.py").write_text(APP_MODULE + '''
def swallow(store):
    return lambda next_: lambda event: None  # ends every chain without next()

QUIET = fluxlite.App(SCHEMA, reducer, middleware=[swallow])
''')
    result = cli("dispatch", "app.db", "addUser", '{"name": "x"}', "--app", "quietapp:QUIET",
                 cwd=work, check=False)
    assert result.returncode == 1
    assert "middleware returned None and committed nothing: the event was not dispatched" \
        in result.stderr
    with fluxlite.open(work / "app.db", readonly=True) as store:
        assert store.head == 5


def test_uncovered_dispatch_to_a_missing_store_makes_no_file(work):
    result = cli("dispatch", "nope.db", "addUser", '{"name": "x"}', "--app", "cliapp:APP",
                 cwd=work, check=False)
    assert result.returncode == 1 and "no such store file: 'nope.db'" in result.stderr
    assert not (work / "nope.db").exists()


def test_uncovered_import_skips_blank_lines_and_names_a_line_that_is_no_event(work):
    lines = cli("export", "app.db", cwd=work).stdout.splitlines()
    (work / "events.jsonl").write_text(lines[0] + "\n\n" + lines[1] + "\n" + '{"seq": 3}\n')
    result = cli("import", "copy.db", "events.jsonl", "--app", "cliapp:APP", cwd=work,
                 check=False)
    assert result.returncode == 1
    assert "events.jsonl line 4 is not an exported event" in result.stderr
    assert not (work / "copy.db").exists()  # one batch, refused whole: no empty store left

# --- mut4: mutation testing of _write (a copied event's id already logged at another seq) ---


def test_import_refuses_an_event_whose_id_the_store_has_at_another_seq(work):
    # An export --after 5 imported onto a store of 5 events: its line at seq 6 carries
    # the id of the store's seq 1. Skipped as a resend, it would be missing from the
    # copy (and every later seq off by one): the import is refused, nothing written.
    lines = cli("export", "app.db", cwd=work).stdout.splitlines()
    first = json.loads(lines[0])
    (work / "reused.jsonl").write_text(json.dumps({**first, "seq": 6}) + "\n")
    before = cli("export", "app.db", cwd=work).stdout
    result = cli("import", "app.db", "reused.jsonl", "--app", "cliapp:APP", cwd=work,
                 check=False)
    assert result.returncode == 1, result.stdout
    assert "is copied as seq 6, but seq 1 has that id already" in result.stderr
    assert cli("export", "app.db", cwd=work).stdout == before
