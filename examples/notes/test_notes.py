"""The notes example over real HTTP: a server on port 0, a SQLite file in tmp_path.

Commands and their errors with urllib; the Server-Sent Events stream with a
raw socket reader, so the tests see exactly the bytes a browser would.
"""
import http.client
import json
import logging
import socket
import sys
import threading
import time
import traceback
import urllib.request

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
        self.sock.sendall(f"GET /api/stream{query} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
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

    # Anyone named may edit; the user may come from ?user= too.
    status, body = app.call("POST", "/api/command/editNoteTitle?user=bob", {"id": "n1", "title": "Shopping"})
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
    long_body = json.dumps({**NOTE, "text": "x" * 70_000}).encode()
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
    assert retry[1]["event"] == first[1]["event"] and first[1]["event"]["id"] == "req-1"
    assert app.store.head == 1
    status, body = app.command("addNote", {**NOTE, "id": "n2"}, headers=headers)  # other content
    assert status == 409 and "idempotency" in body["error"]
    assert app.store.head == 1


def test_the_page_is_served(app):
    with urllib.request.urlopen(app.url + "/", timeout=5) as response:
        page = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/html")
    assert "EventSource" in page and "function applyChange" in page


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
    gone.sendall(b"GET /api/stream?after=0 HTTP/1.1\r\nHost: x\r\n\r\n")
    # Another stays connected and never reads, with a tiny receive buffer.
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    stalled.settimeout(5)
    stalled.connect(("127.0.0.1", app.port))
    stalled.sendall(b"GET /api/stream?after=0 HTTP/1.1\r\nHost: x\r\n\r\n")
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
