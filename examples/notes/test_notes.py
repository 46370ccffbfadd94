"""The notes example over real HTTP: a server on port 0, a SQLite file in tmp_path.

Commands and their errors with urllib; the Server-Sent Events stream with a
raw socket reader, so the tests see exactly the bytes a browser would.
"""
import http.client
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.request

import notes_server  # server.py, registered under this name by conftest.py
import pytest

NOTE = {"id": "n1", "title": "Groceries", "text": "milk, eggs"}


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def stream_threads_writing():
    """How many server threads are inside a stream's socket write right now."""
    return sum(1 for frame in sys._current_frames().values()
               if any(f.name == "write_sse" for f in traceback.extract_stack(frame)))


class SSEClient:
    """Reads a text/event-stream from a raw socket: messages as (id, data), comments skipped."""

    def __init__(self, app, query="", last_event_id=None, timeout=5.0):
        self.sock = socket.create_connection(("127.0.0.1", app.port), timeout=timeout)
        extra = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id is not None else ""
        self.sock.sendall(f"GET /api/stream{query} HTTP/1.1\r\nHost: 127.0.0.1:{app.port}\r\n"
                          f"{extra}\r\n".encode())
        self.file = self.sock.makefile("rb")
        self.status = int(self.file.readline().split()[1])
        self.headers = {}
        for line in iter(self.file.readline, b"\r\n"):
            name, _, value = line.decode().partition(":")
            self.headers[name.lower()] = value.strip()
        self.comments = []

    def next(self):
        """The next message as (id, data), waiting at most the socket timeout."""
        fields = {}
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError("the stream ended")
            line = line.decode().rstrip("\n")
            if line == "":
                if "data" in fields:
                    return int(fields["id"]), json.loads(fields["data"])
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value

    def wait_open(self):
        """Block until the server's opening comment: it follows the log from then on."""
        while not any(c.startswith("following the log") for c in self.comments):
            line = self.file.readline().decode()
            if not line:
                raise EOFError("the stream ended")
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
        return self

    def close(self):
        self.file.close()
        self.sock.close()


@pytest.fixture
def streams():
    opened = []

    def open_stream(app, **kwargs):
        client = SSEClient(app, **kwargs)
        opened.append(client)
        return client

    yield open_stream
    for client in opened:
        client.close()


# -- commands --------------------------------------------------------------------

def notes(app):
    status, body = app.call("GET", "/api/notes")
    assert status == 200
    return body


def test_each_command_changes_the_notes(app):
    status, body = app.command("addNote", NOTE, user="alice")
    assert status == 200
    assert body["event"]["type"] == "addNote" and body["event"]["meta"] == {"actor": "alice"}
    assert body["changes"] == [{"op": "insert", "table": "notes", "key": "n1", "values": {
        **NOTE, "author": "alice", "created_at": body["event"]["ts"], "updated_at": body["event"]["ts"]}}]
    assert notes(app)["seq"] == 1
    assert [(n["id"], n["title"], n["text"], n["author"]) for n in notes(app)["notes"]] == [
        ("n1", "Groceries", "milk, eggs", "alice")]

    # Anyone named may edit.
    status, body = app.command("editNoteTitle", {"id": "n1", "title": "Shopping"}, user="bob")
    assert status == 200
    assert body["changes"][0]["op"] == "update"
    assert set(body["changes"][0]["values"]) == {"title", "updated_at"}  # only what changed
    status, _ = app.command("editNoteContent", {"id": "n1", "text": "milk, eggs, bread"}, user="bob")
    assert status == 200
    [note] = notes(app)["notes"]
    assert (note["title"], note["text"], note["author"]) == ("Shopping", "milk, eggs, bread", "alice")

    # The author may remove it; "admin" may remove anyone's; X-User is percent-decoded.
    status, body = app.command("removeNote", {"id": "n1"}, user="alice")
    assert status == 200 and body["changes"] == [
        {"op": "delete", "table": "notes", "key": "n1", "values": None}]
    assert app.command("addNote", {**NOTE, "id": "n2"}, user="J%C3%BCrgen")[0] == 200
    assert notes(app)["notes"][0]["author"] == "Jürgen"
    assert app.command("removeNote", {"id": "n2"}, user="admin")[0] == 200
    assert notes(app) == {"seq": 6, "notes": []}

    status, body = app.call("GET", "/api/events?after=1&limit=2")
    assert status == 200
    assert [(e["seq"], e["type"]) for e in body["events"]] == [
        (2, "editNoteTitle"), (3, "editNoteContent")]
    app.store.verify()


def test_bad_requests_get_a_status_and_a_json_error(app, caplog):
    assert app.command("addNote", NOTE)[0] == 200
    good = [e.to_dict() for e in app.store.events()]
    long_body = json.dumps({**NOTE, "text": "x" * notes_server.MAX_BODY}).encode()
    cases = [
        (400, "POST", "/api/command/deleteEverything", {"body": {}}),
        (400, "POST", "/api/command/addNote", {"data": b"{not json"}),
        (400, "POST", "/api/command/addNote", {"data": b"\xff\xfe"}),
        (400, "POST", "/api/command/addNote", {"data": b"[" * 50_000}),
        (400, "POST", "/api/command/addNote", {"body": ["n9", "t", "x"]}),
        (400, "POST", "/api/command/addNote", {"body": {"id": "n9", "title": "t"}}),  # no text
        (400, "POST", "/api/command/addNote", {"body": {"id": "n9", "title": 5, "text": ""}}),
        (400, "POST", "/api/command/addNote", {"body": {"id": "n9", "title": "  ", "text": ""}}),
        (400, "POST", "/api/command/addNote", {"body": {"id": "../x", "title": "t", "text": ""}}),
        (400, "POST", "/api/command/addNote", {"body": {**NOTE, "id": "n9", "extra": 1}}),
        (400, "POST", "/api/command/addNote", {"body": {**NOTE, "id": "n9", "text": "x" * 20_001}}),
        (400, "POST", "/api/command/addNote", {"body": {**NOTE, "id": "n9", "base": "x"}}),
        (400, "POST", "/api/command/editNoteTitle", {"body": {"id": "n1", "title": "t", "base": 1}}),
        (400, "POST", "/api/command/removeNote", {"body": {}}),
        (413, "POST", "/api/command/addNote", {"data": long_body}),
        (409, "POST", "/api/command/addNote", {"body": NOTE}),  # the id exists
        (409, "POST", "/api/command/editNoteTitle", {"body": {"id": "nope", "title": "t"}}),
        (409, "POST", "/api/command/editNoteContent", {"body": {"id": "nope", "text": "t"}}),
        (409, "POST", "/api/command/removeNote", {"body": {"id": "nope"}}),
        (403, "POST", "/api/command/addNote", {"body": {**NOTE, "id": "n9"}, "user": None}),
        (403, "POST", "/api/command/removeNote", {"body": {"id": "n1"}, "user": "bob"}),
        (400, "POST", "/api/command/addNote", {"body": {**NOTE, "id": "n9"}, "user": "x" * 65}),
        (404, "GET", "/nothing/here", {}),
        (404, "POST", "/api/nothing", {"body": {}}),
        (405, "GET", "/api/command/addNote", {}),
        (405, "DELETE", "/api/notes", {}),
        (400, "GET", "/api/events?after=-1", {}),
        (400, "GET", "/api/events?limit=many", {}),
        (400, "GET", "/api/stream?after=99", {}),
        (400, "GET", "/api/stream?after=x", {}),
    ]
    for expected, method, path, options in cases:
        options = {"user": "alice", **options}
        status, body = app.call(method, path, **options)
        assert (status, type(body.get("error"))) == (expected, str), (method, path, options, body)

    # No Content-Length: 411 (urllib always sends one, so by hand).
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=5)
    conn.putrequest("POST", "/api/command/addNote")
    conn.putheader("X-User", "alice")
    conn.putheader("Content-Type", "application/json")
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 411 and "error" in json.loads(response.read())
    conn.close()

    # Still serving; the log holds only the good event, and replay equals live.
    assert [e.to_dict() for e in app.store.events()] == good
    assert [n["id"] for n in notes(app)["notes"]] == ["n1"]
    app.store.verify()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_an_idempotency_key_applies_a_retry_once(app):
    headers = {"Idempotency-Key": "req-1"}
    first = app.command("addNote", NOTE, headers=headers)
    retry = app.command("addNote", NOTE, headers=headers)
    assert first[0] == retry[0] == 200
    assert retry[1]["event"] == first[1]["event"] and first[1]["event"]["id"] == "alice:req-1"
    assert app.store.head == 1
    status, body = app.command("addNote", {**NOTE, "id": "n2"}, headers=headers)  # other content
    assert status == 409 and "idempotency" in body["error"]
    assert app.store.head == 1


def test_the_page_is_served(app):
    with urllib.request.urlopen(app.url + "/", timeout=5) as response:
        page = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/html")
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert "EventSource" in page and "function applyChange" in page


# -- other web sites, and who the user is -------------------------------------------

def raw_request(app, method, path, headers, body=b""):
    """(status, headers, body bytes) for a request with exactly these headers (bytes allowed)."""
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=5)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for name, value in headers.items():
        conn.putheader(name, value)
    if body:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body or None)
    response = conn.getresponse()
    try:
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def test_other_sites_cannot_send_commands_or_read_the_notes(app):
    own = f"127.0.0.1:{app.port}"
    body = json.dumps(NOTE).encode()
    json_ = {"Content-Type": "application/json", "X-User": "alice"}
    refused = [
        # A no-cors post from another site's page: text/plain needs no preflight.
        (415, {"Content-Type": "text/plain", "X-User": "alice"}),
        (415, {"Content-Type": "application/x-www-form-urlencoded", "X-User": "alice"}),
        (415, {"X-User": "alice"}),
        (403, {**json_, "Origin": "http://evil.example"}),
        (403, {**json_, "Origin": "null"}),
        (403, {**json_, "Origin": f"http://localhost:{app.port}"}),  # Host is 127.0.0.1
        # DNS rebinding: the attacker's name, resolved to 127.0.0.1, as the Host.
        (403, {**json_, "Host": f"evil.example:{app.port}"}),
        (403, {**json_, "Host": "127.0.0.1"}),  # no port
        (403, {**json_, "Host": None}),  # none at all
    ]
    for expected, headers in refused:
        headers = {"Host": own, **headers}
        headers = {k: v for k, v in headers.items() if v is not None}
        status, _, data = raw_request(app, "POST", "/api/command/addNote", headers, body)
        assert (status, type(json.loads(data)["error"])) == (expected, str), headers
    assert app.store.head == 0

    # The user comes from X-User only: ?user= names nobody.
    status, body_ = app.call("POST", "/api/command/addNote?user=alice", NOTE)
    assert status == 403 and "X-User" in body_["error"] and "?user= is not read" in body_["error"]
    assert app.store.head == 0

    # Reads too: a rebinding page could read the notes otherwise.
    for path in ("/", "/api/notes", "/api/events", "/api/stream"):
        status, _, data = raw_request(app, "GET", path, {"Host": f"evil.example:{app.port}"})
        assert status == 403 and "Host" in json.loads(data)["error"], path

    # Our own page, by any of the server's names: accepted.
    for host in (own, f"localhost:{app.port}", f"LocalHost:{app.port}", f"[::1]:{app.port}"):
        status, _, _ = raw_request(app, "GET", "/api/notes", {"Host": host})
        assert status == 200, host
    headers = {"Host": own, "Origin": f"http://{own}", "X-User": "alice",
               "Content-Type": "application/json; charset=utf-8"}
    assert raw_request(app, "POST", "/api/command/addNote", headers, body)[0] == 200
    assert app.store.head == 1


def test_an_extra_origin_is_accepted_for_a_proxy(tmp_path):
    httpd, store = notes_server.make_server(str(tmp_path / "n.db"),
                                            origins=["https://Notes.Example.com"])
    try:
        assert "notes.example.com" in httpd.hosts and "https://notes.example.com" in httpd.origins
    finally:
        httpd.server_close()
        store.close()
    with pytest.raises(ValueError, match="scheme://host"):
        notes_server.make_server(str(tmp_path / "n.db"), origins=["notes.example.com"])


def test_a_raw_non_ascii_user_name_is_refused_not_mangled(app):
    headers = {"Host": f"127.0.0.1:{app.port}", "Content-Type": "application/json",
               "X-User": "Jürgen".encode()}  # UTF-8 bytes, not percent-encoded
    body = json.dumps(NOTE).encode()
    status, _, data = raw_request(app, "POST", "/api/command/addNote", headers, body)
    assert status == 400 and "percent-encode" in json.loads(data)["error"]
    assert app.command("addNote", NOTE, user="J%FCrgen")[0] == 400  # Latin-1, not UTF-8
    assert app.store.head == 0
    assert app.command("addNote", NOTE, user="J%C3%BCrgen")[0] == 200
    assert notes(app)["notes"][0]["author"] == "Jürgen"


def test_other_methods_get_a_json_405_with_allow(app):
    for method, path, allow in [("HEAD", "/", "GET"), ("OPTIONS", "/api/notes", "GET"),
                                ("OPTIONS", "/api/command/addNote", "POST"),
                                ("PATCH", "/api/command/editNoteTitle", "POST"),
                                ("PATCH", "/api/notes", "GET")]:
        headers = {"Host": f"127.0.0.1:{app.port}", "Origin": "http://evil.example",
                   "Access-Control-Request-Method": "POST"} if method == "OPTIONS" else {
                   "Host": f"127.0.0.1:{app.port}"}
        if method == "OPTIONS":  # a CORS preflight from another site: refused, no CORS headers
            status, response_headers, data = raw_request(app, method, path, headers)
            assert status == 403 and "Access-Control-Allow-Origin" not in response_headers
            headers.pop("Origin")
        status, response_headers, data = raw_request(app, method, path, headers)
        assert (status, response_headers["Allow"]) == (405, allow), (method, path)
        assert response_headers["Content-Type"] == "application/json"
        if method == "HEAD":
            assert data == b""
        else:
            assert method in json.loads(data)["error"]


def test_unknown_methods_and_refused_big_bodies_get_a_json_answer(app):
    own = {"Host": f"127.0.0.1:{app.port}"}
    for method in ("FOO", "TRACE"):
        status, headers, data = raw_request(app, method, "/api/notes", own)
        assert status == 501 and headers["Content-Type"] == "application/json"
        assert "error" in json.loads(data)
    big = b"x" * 3_000_000  # unread by a refusal: it must still reach the client whole
    for headers, expected in [({**own, "Content-Type": "text/plain", "X-User": "a"}, 415),
                              ({**own, "Content-Type": "application/json", "X-User": "a"}, 400)]:
        path = "/api/command/addNote" if expected == 415 else "/api/command/nope"  # unknown
        status, _, data = raw_request(app, "POST", path, headers, big)
        assert status == expected and "error" in json.loads(data)


def test_control_characters_in_a_request_line_are_escaped_in_the_log(app, caplog):
    caplog.set_level(logging.INFO, logger="notes")
    with socket.create_connection(("127.0.0.1", app.port), timeout=5) as sock:
        sock.sendall(b"GET /\x1b[31mred\x07 HTTP/1.0\r\nHost: 127.0.0.1:%d\r\n\r\n" % app.port)
        assert b" 404 " in sock.makefile("rb").readline()
    wait_until(lambda: any("red" in r.getMessage() for r in caplog.records))
    [message] = [r.getMessage() for r in caplog.records if "red" in r.getMessage()]
    assert "\\x1b[31mred\\x07" in message and "\x1b" not in message and "\x07" not in message


def test_a_copied_server_imports_the_installed_fluxlite_not_one_two_levels_up(tmp_path):
    import fluxlite

    repo = os.path.dirname(os.path.abspath(fluxlite.__file__))
    copy = tmp_path / "a" / "b"
    copy.mkdir(parents=True)
    shutil.copy(notes_server.__file__, copy / "server.py")
    (tmp_path / "fluxlite.py").write_text("raise ImportError('the wrong fluxlite')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = "import server, fluxlite; print(fluxlite.__file__)"
    found = subprocess.run([sys.executable, "-c", script], cwd=copy, capture_output=True, text=True,
                           env={**env, "PYTHONPATH": repo},  # as if installed
                           timeout=60, check=False)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == os.path.join(repo, "fluxlite.py")
    # Where nothing is installed, the example in the repo still finds the repo's.
    here = subprocess.run([sys.executable, notes_server.__file__, "--help"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert here.returncode == 0 and "--origin" in here.stdout, here.stderr


# -- edits over edits, idempotency per user, big notes ----------------------------------

def test_a_note_added_after_the_rule_ran_is_still_only_its_authors_to_remove(app):
    # The rule runs before the transaction; in one batch the remove's rule runs while
    # the note does not exist yet, as when a remove races the note's creation.
    race = [{"type": "addNote", "payload": {**NOTE, "base": None}, "meta": {"actor": "alice"}},
            {"type": "removeNote", "payload": {"id": "n1"}, "meta": {"actor": "mallory"}}]
    race[0]["payload"].pop("base")
    with pytest.raises(notes_server.fluxlite.Forbidden, match="author or admin"):
        app.store.dispatch_many(race)
    assert app.store.head == 0
    race[1]["meta"]["actor"] = "alice"
    app.store.dispatch_many(race)
    assert notes(app)["notes"] == []


def test_a_header_sent_twice_is_refused(app):
    for name, value in [("X-User", "proxyuser"), ("Origin", "http://evil.example"),
                        ("Content-Type", "text/plain"), ("Idempotency-Key", "k2")]:
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=5)
        body = json.dumps(NOTE).encode()
        conn.putrequest("POST", "/api/command/addNote")
        first = {"X-User": "mallory", "Origin": f"http://127.0.0.1:{app.port}",
                 "Content-Type": "application/json", "Idempotency-Key": "k1"}
        for header, first_value in first.items():
            conn.putheader(header, first_value)
        conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        answer = json.loads(response.read())
        conn.close()
        assert response.status == 400 and f"The {name} header was sent 2 times" in answer["error"]
    assert app.store.head == 0


def test_sigterm_stops_the_server_as_cleanly_as_ctrl_c(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    db = tmp_path / "notes.db"
    server = subprocess.Popen([sys.executable, notes_server.__file__, "--db", str(db),
                               "--port", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert "Ctrl-C stops" in server.stdout.readline()
        server.terminate()
        assert server.wait(10) == 0
    finally:
        server.kill()
    assert not os.path.exists(f"{db}-wal")  # closed: SQLite removed its WAL
    with notes_server.open_store(str(db)) as store:
        store.verify()


def test_an_edit_started_from_an_old_version_is_refused(app):
    assert app.command("addNote", NOTE, user="alice")[0] == 200
    # alice and bob both start from "Groceries"; alice saves first.
    assert app.command("editNoteTitle", {"id": "n1", "title": "Shopping", "base": "Groceries"},
                       user="alice")[0] == 200
    status, body = app.command("editNoteTitle", {"id": "n1", "title": "Food", "base": "Groceries"},
                               user="bob")
    assert status == 409 and "changed meanwhile" in body["error"] and "'Shopping'" in body["error"]
    status, body = app.command("editNoteContent", {"id": "n1", "text": "bread", "base": "milk"},
                               user="bob")
    assert status == 409 and "text changed meanwhile" in body["error"]
    assert [(n["title"], n["text"]) for n in notes(app)["notes"]] == [("Shopping", "milk, eggs")]
    # From the current version, or without a base (older clients, older events): applied.
    assert app.command("editNoteTitle", {"id": "n1", "title": "Food", "base": "Shopping"},
                       user="bob")[0] == 200
    assert app.command("editNoteContent", {"id": "n1", "text": "bread", "base": "milk, eggs"},
                       user="bob")[0] == 200
    assert app.command("editNoteTitle", {"id": "n1", "title": "Old client"}, user="carol")[0] == 200
    assert app.command("editNoteContent", {"id": "n1", "text": "no base"}, user="carol")[0] == 200
    assert [(n["title"], n["text"]) for n in notes(app)["notes"]] == [("Old client", "no base")]
    assert [(e.type, e.actor) for e in app.store.events()] == [
        ("addNote", "alice"), ("editNoteTitle", "alice"), ("editNoteTitle", "bob"),
        ("editNoteContent", "bob"), ("editNoteTitle", "carol"), ("editNoteContent", "carol")]
    app.store.verify()  # replay, base or not, equals live


def test_an_idempotency_key_is_scoped_to_its_user(app):
    assert app.command("addNote", NOTE)[0] == 200
    edit, key = {"id": "n1", "title": "Shopping"}, {"Idempotency-Key": "k1"}
    status, mine = app.command("editNoteTitle", edit, user="alice", headers=key)
    assert status == 200 and mine["event"]["id"] == "alice:k1"
    # bob's first request with the same key and body is his own event, not alice's.
    status, his = app.command("editNoteTitle", edit, user="bob", headers=key)
    assert status == 200 and his["event"]["id"] == "bob:k1"
    assert his["event"]["meta"] == {"actor": "bob"}
    assert app.command("editNoteTitle", edit, user="bob", headers=key)[1]["event"] == his["event"]
    # Names are percent-encoded in the id, so "a:b" + "c" is not "a" + "b:c".
    assert app.command("editNoteTitle", edit, user="a:b", headers={"Idempotency-Key": "c"})[1][
        "event"]["id"] == "a%3Ab:c"
    status, other = app.command("editNoteTitle", edit, user="a", headers={"Idempotency-Key": "b:c"})
    assert status == 200 and other["event"]["id"] == "a:b:c"
    assert other["event"]["meta"] == {"actor": "a"}
    assert app.store.head == 5


def test_the_longest_notes_in_any_script_fit_in_a_body(app):
    for n, char in enumerate(["\U0001f600", "\u00e9", "\x01"]):  # 12, 6 and 6 bytes as escaped JSON
        text = char * 20_000
        body = {"id": f"n{n}", "title": char * 200, "text": text}
        assert len(json.dumps(body)) > 64 * 1024  # json.dumps escapes all but ASCII by default
        assert app.command("addNote", body)[0] == 200, char
        # The longest command: a whole text, and the whole text it started from.
        edit = {"id": f"n{n}", "text": char * 19_999 + "x", "base": text}
        assert app.command("editNoteContent", edit)[0] == 200, char
    status, body = app.command("addNote", {**NOTE, "text": "\U0001f600" * 20_001})
    assert status == 400 and "longer than 20000" in body["error"]
    app.store.verify()


# -- the stream ---------------------------------------------------------------------

def test_two_stream_clients_receive_a_change_posted_by_a_third(app, streams):
    a = streams(app).wait_open()  # no ?after=: from the head at connect time
    b = streams(app).wait_open()
    assert a.status == b.status == 200 and a.headers["content-type"] == "text/event-stream"
    posted = [app.command("addNote", NOTE, user="carol")[1],
              app.command("editNoteTitle", {"id": "n1", "title": "Later"}, user="carol")[1],
              app.command("removeNote", {"id": "n1"}, user="carol")[1]]
    expected = [(p["event"]["seq"], {"event": p["event"], "changes": p["changes"]}) for p in posted]
    assert [seq for seq, _ in expected] == [1, 2, 3]
    assert [a.next() for _ in posted] == expected
    assert [b.next() for _ in posted] == expected


def test_reconnecting_with_last_event_id_resumes_right_after_it(app, streams):
    for n in range(5):
        app.command("addNote", {**NOTE, "id": f"n{n}"})
    first = streams(app, query="?after=0")
    assert [first.next()[0] for _ in range(5)] == [1, 2, 3, 4, 5]
    first.close()  # the browser lost the connection after seq 3, say

    # Last-Event-ID wins over the ?after= the page was first opened with.
    again = streams(app, query="?after=1", last_event_id=3)
    assert [again.next()[0] for _ in range(2)] == [4, 5]
    app.command("removeNote", {"id": "n0"})
    seq, data = again.next()
    assert seq == 6 and data["event"]["type"] == "removeNote"
    assert [streams(app, query="?after=4").next()[0]] == [5]


def test_a_vanished_or_stalled_client_blocks_nothing(app, streams, caplog):
    # One client asks for the stream and vanishes without reading a byte.
    gone = socket.create_connection(("127.0.0.1", app.port), timeout=5)
    gone.sendall(f"GET /api/stream?after=0 HTTP/1.1\r\nHost: 127.0.0.1:{app.port}\r\n\r\n".encode())
    # Another stays connected and never reads, with a tiny receive buffer.
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    stalled.settimeout(5)
    stalled.connect(("127.0.0.1", app.port))
    stalled.sendall(f"GET /api/stream?after=0 HTTP/1.1\r\nHost: 127.0.0.1:{app.port}\r\n\r\n".encode())
    wait_until(lambda: app.httpd.streams == 2)
    gone.close()
    live = streams(app, query="?after=0")

    started = time.monotonic()
    big = "x" * 20_000
    for n in range(260):  # 5 MB for each stream: more than the kernel buffers of the stalled one
        assert app.command("addNote", {**NOTE, "id": f"n{n}", "text": big})[0] == 200
    assert time.monotonic() - started < 8
    assert [live.next()[0] for _ in range(260)] == list(range(1, 261))
    wait_until(lambda: stream_threads_writing() >= 1)  # the stalled stream's thread is stuck...
    # ...alone; the vanished client's stream ended at its next write; the others go on.
    wait_until(lambda: app.httpd.streams == 2)
    stalled.close()  # now its blocked write fails, and its stream ends too
    wait_until(lambda: app.httpd.streams == 1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_an_idle_stream_gets_heartbeats_and_closing_the_server_ends_it(app, streams):
    client = streams(app).wait_open()
    threading.Timer(0.5, app.command, ("addNote", NOTE)).start()
    assert client.next()[0] == 1
    assert "heartbeat" in client.comments  # 0.2 s heartbeats in these tests
    app.httpd.close()
    with pytest.raises(EOFError):
        client.next()


# -- stopping ---------------------------------------------------------------------------

def test_a_command_committed_while_the_server_stops_is_answered_200(app, caplog):
    # The command has committed (a subscriber hears it) but not answered yet when
    # close() starts: the store must stay open until it has answered.
    committed, answer = threading.Event(), threading.Event()
    app.store.subscribe(lambda event, changes: (committed.set(), answer.wait(5)))
    result = []
    sender = threading.Thread(target=lambda: result.append(app.command("addNote", NOTE)))
    sender.start()
    assert committed.wait(5)
    closer = threading.Thread(target=app.httpd.close)
    closer.start()
    wait_until(lambda: app.httpd.stopping.is_set())
    time.sleep(0.2)  # the store would be closed by now
    answer.set()
    sender.join(5)
    closer.join(5)
    assert not closer.is_alive()
    [(status, body)] = result
    assert status == 200 and body["event"]["seq"] == 1 and body["changes"][0]["op"] == "insert"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- starting -----------------------------------------------------------------------------

def ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_the_server_serves_on_an_ipv6_address(tmp_path):
    httpd, store = notes_server.make_server(str(tmp_path / "notes.db"), host="::1")
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        port = httpd.server_address[1]
        conn = http.client.HTTPConnection("::1", port, timeout=5)
        conn.request("GET", "/api/notes", headers={"Host": f"[::1]:{port}"})
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())) == (200, {"seq": 0, "notes": []})
        conn.close()
    finally:
        httpd.close()
        thread.join(5)


def test_a_taken_port_or_a_file_that_is_no_store_is_a_clear_message(tmp_path):
    def start(*args):
        return subprocess.run([sys.executable, notes_server.__file__, *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, check=False)

    (tmp_path / "other.db").write_text("not a database")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for args, message in [(["--port", port], "cannot listen on --host 127.0.0.1 --port"),
                              (["--port", "99999"], "port must be 0-65535"),
                              (["--db", "other.db", "--port", "0"], "cannot open --db 'other.db'")]:
            result = start(*args)
            assert result.returncode == 1 and message in result.stderr, (args, result.stderr)
            assert "Traceback" not in result.stderr, args
    with notes_server.open_store(str(tmp_path / "notes.db")) as store:  # closed again
        assert store.head == 0


def test_a_body_shorter_than_its_content_length_is_refused(app):
    body = json.dumps(NOTE).encode()
    with socket.create_connection(("127.0.0.1", app.port), timeout=5) as sock:
        sock.sendall(b"POST /api/command/addNote HTTP/1.0\r\nHost: 127.0.0.1:%d\r\n"
                     b"Content-Type: application/json\r\nX-User: alice\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (app.port, len(body) + 10, body))
        sock.shutdown(socket.SHUT_WR)  # 10 bytes short: the client gave up, say
        answer = sock.makefile("rb").read()
    head, _, data = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400 ") and "Content-Length" in json.loads(data)["error"]
    assert app.store.head == 0


def test_a_malformed_content_length_is_a_400_and_a_missing_one_a_411(app):
    own = {"Host": f"127.0.0.1:{app.port}", "Content-Type": "application/json",
           "X-User": "alice"}
    body = json.dumps(NOTE).encode()
    for lengths, expected in [(["-5"], 400), (["abc"], 400), (["+%d" % len(body)], 400),
                              (["2", str(len(body))], 400), ([], 411)]:
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=5)
        conn.putrequest("POST", "/api/command/addNote", skip_host=True)
        for name, value in own.items():
            conn.putheader(name, value)
        for length in lengths:
            conn.putheader("Content-Length", length)
        conn.endheaders(body)
        response = conn.getresponse()
        error = json.loads(response.read())["error"]
        conn.close()
        assert (response.status, "Content-Length" in error) == (expected, True), lengths
    assert app.store.head == 0


def test_an_error_in_the_middle_of_a_stream_ends_it_without_a_second_response(app, streams):
    assert app.command("addNote", NOTE)[0] == 200
    client = streams(app, query="?after=0")
    assert client.next()[0] == 1
    # Another process rebuilds the model with new code: this server's store may no
    # longer read the log (SchemaError), in the middle of the stream.
    fluxlite = notes_server.fluxlite
    fluxlite.open(app.store.path, schema=notes_server.SCHEMA, reducer=notes_server.REDUCER,
                  version=2).close()
    rest = client.file.read()  # until the server ends the stream
    assert b"HTTP/1." not in rest and b"Internal error" not in rest, rest
