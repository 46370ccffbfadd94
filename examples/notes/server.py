"""The seed's collaborative notes app on fluxlite: an HTTP server in the stdlib only.

    python examples/notes/server.py                      # notes.db in the current directory
    python examples/notes/server.py --db /tmp/n.db --port 8080

Then open http://127.0.0.1:8000/ in two browser windows: what one does, the
other shows at once. The store file is ``notes.db`` in the current directory
unless ``--db`` says otherwise, so notes (and their whole history) survive a
restart.

HTTP API (JSON in, JSON out; errors are ``{"error": "..."}``):

    POST /api/command/addNote          {"id", "title", "text"}  (the client makes the id)
    POST /api/command/editNoteTitle    {"id", "title"}
    POST /api/command/editNoteContent  {"id", "text"}
    POST /api/command/removeNote       {"id"}
        200 {"event": ..., "changes": [...]}; 400 unknown command, invalid JSON or
        a missing/invalid field; 403 not allowed; 409 rejected by the reducer
        (no such note, the id exists) or an Idempotency-Key reused for other content.
        The user is the ``X-User`` header (percent-decoded, so any name fits in
        it) or ``?user=``. Anyone named may add and edit; only a note's author
        or "admin" may remove it. An optional ``Idempotency-Key`` header becomes
        the event id, so a retried request is applied once.
    GET /api/notes                     {"seq": N, "notes": [...]}: the notes as of seq N
    GET /api/events?after=0&limit=100  {"events": [...]}: the log, oldest first
    GET /api/stream?after=N            Server-Sent Events: ``id: <seq>`` and
        ``data: {"event": ..., "changes": [...]}`` per event after N (or after the
        ``Last-Event-ID`` header, which a reconnecting EventSource sends; without
        either, after the head), and a comment every 15 s when idle.
    GET /                              the page (index.html next to this file)

Every command becomes one event; the reducer turns it into row changes of the
``notes`` table; each SSE client follows the log in its own thread and gets the
changes as committed, which the page applies to its own copy of the table.
"""
import argparse
import json
import logging
import os
import re
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import fluxlite  # noqa: E402  (the repo root, so no install is needed)

log = logging.getLogger("notes")
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "index.html")

SCHEMA = """
CREATE TABLE notes (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    author TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
)
"""


# -- the reducer: the seed's 1 x create, 2 x update, 1 x delete ----------------

def notes(table, event):
    """(notes table, event) -> changeset. Time comes from the event, so replay equals live."""
    note_id, now = event.payload.get("id"), event.ts.isoformat()
    if event.type == "addNote":
        if note_id in table:
            raise fluxlite.Rejected(f"A note with id {note_id!r} already exists.")
        return table.insert(id=note_id, title=event.payload["title"], text=event.payload["text"],
                            author=event.actor, created_at=now, updated_at=now)
    if event.type in ("editNoteTitle", "editNoteContent", "removeNote") and note_id not in table:
        raise fluxlite.Rejected(f"There is no note with id {note_id!r} (removed meanwhile?).")
    if event.type == "editNoteTitle":
        return table.update(note_id, title=event.payload["title"], updated_at=now)
    if event.type == "editNoteContent":
        return table.update(note_id, text=event.payload["text"], updated_at=now)
    if event.type == "removeNote":
        return table.delete(note_id)


REDUCER = fluxlite.combine({"notes": notes})


# -- access control by event type ----------------------------------------------

def access_control(store):
    """Middleware: fluxlite.authorize with rules that read the store (a closure)."""
    def named(actor, event):
        return actor is not None

    def author_or_admin(actor, event):
        payload = event.get("payload")
        note = store.view.notes.get(payload.get("id")) if isinstance(payload, dict) else None
        # A missing note is let through: the reducer rejects it (409, not 403).
        return actor == "admin" or (actor is not None and (note is None or note["author"] == actor))

    rules = {"addNote": named, "editNoteTitle": named, "editNoteContent": named,
             "removeNote": author_or_admin}  # any other type: denied
    return fluxlite.authorize(rules)(store)


def open_store(path):
    return fluxlite.open(path, schema=SCHEMA, reducer=REDUCER, middleware=[access_control])


# -- commands: the HTTP body checked field by field, then one event ------------

class ApiError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


def _text(name, limit, blank=True):
    def check(value):
        if not isinstance(value, str):
            raise ApiError(400, f"Field {name!r} must be a string.")
        if len(value) > limit:
            raise ApiError(400, f"Field {name!r} is longer than {limit} characters.")
        if not blank and not value.strip():
            raise ApiError(400, f"Field {name!r} must not be empty.")
        return value
    return check


def _note_id(value):
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise ApiError(400, "Field 'id' must be 1-64 letters, digits, '-' or '_' (a UUID will do).")
    return value


FIELDS = {"id": _note_id, "title": _text("title", 200, blank=False), "text": _text("text", 20_000)}
COMMANDS = {
    "addNote": ("id", "title", "text"),
    "editNoteTitle": ("id", "title"),
    "editNoteContent": ("id", "text"),
    "removeNote": ("id",),
}
MAX_BODY = 64 * 1024


def command_payload(name, body):
    """The event payload for command ``name``, or ApiError(400). The event type is the name."""
    if name not in COMMANDS:
        raise ApiError(400, f"Unknown command {name[:80]!r}; the commands are {', '.join(COMMANDS)}.")
    if not isinstance(body, dict):
        raise ApiError(400, f"The body of {name} must be a JSON object.")
    fields = COMMANDS[name]
    extra = sorted(set(body) - set(fields))
    if extra:
        raise ApiError(400, f"Unknown field(s) for {name}: {', '.join(map(repr, extra))[:200]}.")
    missing = [f for f in fields if f not in body]
    if missing:
        raise ApiError(400, f"Missing field(s) for {name}: {', '.join(map(repr, missing))}.")
    return {f: FIELDS[f](body[f]) for f in fields}


# Errors from dispatch, as HTTP statuses.
STATUS = ((fluxlite.Forbidden, 403), (fluxlite.Rejected, 409), (fluxlite.Conflict, 409),
          (fluxlite.InvalidEvent, 400), (fluxlite.Busy, 503))
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout)


# -- HTTP ----------------------------------------------------------------------

class NotesServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer holding the store; ``close()`` stops it and closes the store."""

    daemon_threads = True  # a lingering stream never keeps the process alive

    def __init__(self, address, store, heartbeat):
        super().__init__(address, Handler)
        self.store, self.heartbeat = store, heartbeat
        self.stopping = threading.Event()
        self._streams = 0
        self._streams_lock = threading.Lock()

    @property
    def streams(self):
        """How many SSE clients are connected now."""
        with self._streams_lock:
            return self._streams

    def _count_stream(self, delta):
        with self._streams_lock:
            self._streams += delta

    def close(self):
        """Stop serving (call from another thread than serve_forever), end streams, close."""
        self.stopping.set()
        self.shutdown()
        self.store.close()  # wakes every follower, so each stream ends now
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.0: one request per connection, so a stream simply ends when it closes."""

    server_version = "fluxlite-notes/1"
    timeout = 30  # seconds a socket read or write may block: a stuck client is dropped

    def log_message(self, format, *args):
        log.info("%s %s", self.address_string(), format % args)

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    def do_DELETE(self):
        self._route("DELETE")

    def _route(self, method):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path.startswith("/api/command/"):
            allowed, action = "POST", lambda: self.api_command(url.path[len("/api/command/"):], query)
        else:
            allowed, action = "GET", {
                "/": self.index_page, "/index.html": self.index_page, "/api/notes": self.api_notes,
                "/api/events": lambda: self.api_events(query), "/api/stream": lambda: self.api_stream(query),
            }.get(url.path)
        try:
            if action is None:
                raise ApiError(404, f"Nothing at {url.path[:100]!r}.")
            if method != allowed:
                raise ApiError(405, f"{url.path[:100]} takes {allowed}, not {method}.")
            action()
        except ApiError as exc:
            self.send_json(exc.status, {"error": exc.message})
        except CLIENT_GONE:
            pass  # the client left; nothing to answer
        except Exception as exc:  # a bug or a closed store: answer 500, keep serving
            log.exception("%s %s failed", method, self.path)
            self.send_json(503 if isinstance(exc, fluxlite.UsageError) else 500,
                           {"error": f"Internal error: {type(exc).__name__}."})

    def send_json(self, status, data):
        body = json.dumps(data).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            if status == 405:
                self.send_header("Allow", "POST" if self.path.startswith("/api/command/") else "GET")
            self.end_headers()
            self.wfile.write(body)
        except CLIENT_GONE:
            pass

    def actor(self, query):
        """The user: X-User (percent-decoded) or ?user=; None when anonymous."""
        header = self.headers.get("X-User")
        name = unquote(header) if header is not None else query.get("user", [""])[0]
        name = name.strip()
        if len(name) > 64 or not name.isprintable():
            raise ApiError(400, "A user name is at most 64 printable characters.")
        return name or None

    def read_json(self):
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if length < 0:
            raise ApiError(411, "Send the JSON body with a Content-Length.")
        if length > MAX_BODY:
            if length <= 16 * MAX_BODY:  # read it all, so the client sees our answer, not a reset
                while length > 0:
                    length -= len(self.rfile.read(min(length, MAX_BODY))) or length
            raise ApiError(413, f"The body must be at most {MAX_BODY} bytes.")
        try:
            return json.loads(self.rfile.read(length).decode("utf-8"))
        except (ValueError, RecursionError):
            raise ApiError(400, "The body is not valid JSON.") from None

    # -- endpoints ---------------------------------------------------------------

    def api_command(self, name, query):
        payload = command_payload(name, self.read_json() if name in COMMANDS else {})
        actor = self.actor(query)
        key = self.headers.get("Idempotency-Key")
        if key is not None and not re.fullmatch(r"[A-Za-z0-9_.:-]{1,100}", key):
            raise ApiError(400, "Idempotency-Key must be 1-100 letters, digits or '-_.:'.")
        store = self.server.store
        try:
            event = store.dispatch(name, payload, actor=actor, id=key)
        except fluxlite.FluxliteError as exc:
            status = next((s for kind, s in STATUS if isinstance(exc, kind)), None)
            if status is None:
                raise
            hint = " Name yourself: X-User header or ?user=." if status == 403 and actor is None else ""
            raise ApiError(status, str(exc) + hint) from None
        changes = [c.to_dict() for c in store.changes(event.seq)]
        self.send_json(200, {"event": event.to_dict(), "changes": changes})

    def api_notes(self):
        store = self.server.store
        while True:  # the notes and the seq they are as of, from one moment
            seq = store.head
            rows = store.query("SELECT * FROM notes ORDER BY created_at, id")
            if store.head == seq:
                return self.send_json(200, {"seq": seq, "notes": rows})

    def api_events(self, query):
        after = _int_param(query, "after", 0)
        limit = min(_int_param(query, "limit", 100), 1000)
        events = [e.to_dict() for e in self.server.store.events(after=after, limit=limit)]
        self.send_json(200, {"events": events})

    def index_page(self):
        with open(PAGE, "rb") as f:
            body = f.read()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy",  # the page loads nothing from elsewhere
                         "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                         "style-src 'self' 'unsafe-inline'; img-src data:")
        self.end_headers()
        self.wfile.write(body)

    def api_stream(self, query):
        """SSE: follow the log in this handler's thread until the client or the server goes."""
        store, server = self.server.store, self.server
        last_id = self.headers.get("Last-Event-ID")
        if last_id is not None and last_id.strip():
            after = _parse_int("Last-Event-ID", last_id)
        else:
            after = _int_param(query, "after", None)
        head = store.head
        if after is None:
            after = head
        elif after > head:
            raise ApiError(400, f"after={after} is past the end of the log (seq {head}).")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Accel-Buffering", "no")  # proxies: do not buffer the stream
        self.end_headers()
        server._count_stream(+1)
        try:
            self.write_sse(f"retry: 1000\n: following the log after seq {after}\n\n")
            while not server.stopping.is_set():
                for event, changes in store.follow(after=after, timeout=server.heartbeat):
                    data = json.dumps({"event": event.to_dict(),
                                       "changes": [c.to_dict() for c in changes]})
                    self.write_sse(f"id: {event.seq}\ndata: {data}\n\n")
                    after = event.seq
                self.write_sse(": heartbeat\n\n")  # idle: keeps proxies open, finds dead clients
        except CLIENT_GONE:
            pass  # a vanished or stuck client ends only its own stream
        except fluxlite.UsageError:
            pass  # the store was closed: the server is stopping
        finally:
            server._count_stream(-1)

    def write_sse(self, text):
        self.wfile.write(text.encode("utf-8"))
        self.wfile.flush()


def _parse_int(name, text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ApiError(400, f"{name} must be an integer >= 0; received {text[:40]!r}.")
    return value


def _int_param(query, name, default):
    values = query.get(name)
    return _parse_int(name, values[0]) if values and values[0] != "" else default


def make_server(db_path, port=0, host="127.0.0.1", heartbeat=15.0):
    """Open the store and bind the server (port 0: any free port). Returns (httpd, store).

    Run it with ``httpd.serve_forever()``; stop it from another thread with
    ``httpd.close()``, which also closes the store.
    """
    store = open_store(db_path)
    try:
        return NotesServer((host, port), store, heartbeat), store
    except BaseException:
        store.close()
        raise


def main(argv=None):
    parser = argparse.ArgumentParser(description="The fluxlite notes example server.")
    parser.add_argument("--db", default="notes.db", help="store file (default: ./notes.db)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    httpd, store = make_server(args.db, port=args.port, host=args.host)
    host, port = httpd.server_address[:2]
    print(f"Notes on http://{host}:{port}/  (store: {os.path.abspath(args.db)}, "
          f"{store.head} events). Ctrl-C stops.", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.stopping.set()
        store.close()
        httpd.server_close()


if __name__ == "__main__":
    main()
