"""The seed's collaborative notes app on fluxlite: an HTTP server in the stdlib only.

    python examples/notes/server.py                      # notes.db in the current directory
    python examples/notes/server.py --db notes.db --port 8080

Then open http://127.0.0.1:8000/ in two browser windows: what one does, the
other shows at once. The store file is ``notes.db`` in the current directory
unless ``--db`` says otherwise, so notes (and their whole history) survive a
restart.

X-User is a name, not authentication: anyone who can reach the server can
claim any name, "admin" included. The server listens on 127.0.0.1 and refuses
requests from other web sites (below), but before exposing the app to a
network, put real authentication in front of it (a reverse proxy that logs
users in and sets X-User itself, refusing it from clients) and serve it over
HTTPS.

HTTP API (JSON in, JSON out; errors are ``{"error": "..."}``):

    POST /api/command/addNote          {"id", "title", "text"}  (the client makes the id)
    POST /api/command/editNoteTitle    {"id", "title", "base"?}
    POST /api/command/editNoteContent  {"id", "text", "base"?}
    POST /api/command/removeNote       {"id"}
        200 {"event": ..., "changes": [...]}; 400 unknown command, invalid JSON,
        a missing/invalid field, or a body not of its Content-Length; 403 not
        allowed; 409 rejected by the reducer (no such note, the id exists, the
        note changed since ``base``) or an Idempotency-Key reused for other
        content; 411 no Content-Length; 413 body too large; 415 not
        ``Content-Type: application/json``; 503 the store is busy (another
        writer held it; retry with the same Idempotency-Key) or the server is
        stopping (a command under way then is still answered). Any other path
        is a 404.
        The user is the ``X-User`` header only, percent-encoded UTF-8 (so any
        name fits in it; raw non-ASCII is refused with 400). Anyone named may
        add and edit; only a note's author or "admin" may remove it.
        ``base`` is the title or text the edit started from: when the note no
        longer has it (someone else edited it meanwhile), the edit is refused
        with 409 instead of silently overwriting theirs. Without ``base`` an
        edit always applies (as events logged before it existed do).
        An optional ``Idempotency-Key`` header (1-100 of ``A-Za-z0-9_.:-``) is
        scoped per user: the event id is ``<user, percent-encoded>:<key>``, so
        a retried request is applied once and one user's key never returns
        another user's event.
    GET /api/notes                     {"seq": N, "notes": [...]}: the notes as of seq N
    GET /api/events?after=0&limit=100  {"events": [...]}: the log, oldest first
    GET /api/stream?after=N            Server-Sent Events: ``id: <seq>`` and
        ``data: {"event": ..., "changes": [...]}`` per event after N (or after the
        ``Last-Event-ID`` header, which a reconnecting EventSource sends; without
        either, after the head), and a comment every 15 s when idle.
    GET /                              the page (index.html next to this file)
    HEAD, OPTIONS, PUT, PATCH, DELETE: 405 with an ``Allow`` header.

Other web sites: every request must carry a ``Host`` header naming this server
(the address it is bound to, localhost, 127.0.0.1 or [::1], with its port, or
the host of an ``--origin``), and an ``Origin`` header, when present, must be
this same origin (``http://`` + Host) or an ``--origin``; else 403. That stops
DNS rebinding (a site whose name resolves to 127.0.0.1) and cross-site posts.
Commands need ``Content-Type: application/json`` and X-User, which a browser
sends cross-origin only after a CORS preflight (OPTIONS), which this server
never grants. The page may not be framed (CSP ``frame-ancestors 'none'``).

Every command becomes one event; the reducer turns it into row changes of the
``notes`` table; each SSE client follows the log in its own thread and gets the
changes as committed, which the page applies to its own copy of the table.

Limits: the server speaks HTTP/1.0, one request per connection, and each open
page holds one stream. Browsers allow 6 connections per host over HTTP/1.x, so
6 tabs of the app in one browser use them all: a 7th tab, and every command
from any tab, waits until a stream closes. A real deployment serves it over
HTTP/2 (behind a proxy) or shares one stream between tabs (a SharedWorker or
BroadcastChannel).
"""
import argparse
import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

try:
    import fluxlite
except ImportError:  # not installed: the repo this example sits in (only as a fallback,
    # so a copy of this file never imports whatever fluxlite.py lies two levels up)
    sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    import fluxlite

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
        _unchanged_since_base(table.get(note_id), "title", event.payload)
        return table.update(note_id, title=event.payload["title"], updated_at=now)
    if event.type == "editNoteContent":
        _unchanged_since_base(table.get(note_id), "text", event.payload)
        return table.update(note_id, text=event.payload["text"], updated_at=now)
    if event.type == "removeNote":
        # Checked again here, inside the transaction: the rule in access_control runs
        # before it opens, so a note added meanwhile would pass it as "missing".
        if event.actor != "admin" and table.get(note_id)["author"] != event.actor:
            raise fluxlite.Forbidden(f"Only the note's author or admin may remove note "
                                     f"{note_id!r}; you are {event.actor!r}.")
        return table.delete(note_id)


def _unchanged_since_base(note, field, payload):
    """Reject an edit made over someone else's: the field must still be its "base".

    Events without a base (older clients, events logged before base existed)
    apply as they always did, so replaying an old log gives the same rows.
    """
    if "base" in payload and note[field] != payload["base"]:
        raise fluxlite.Rejected(
            f"The note's {field} changed meanwhile (someone else edited it): your edit started "
            f"from {_preview(payload['base'])}, the note now has {_preview(note[field])}. "
            f"Nothing was saved; merge your change into the current {field} and send it "
            f"again with that as base.")


def _preview(text, limit=60):
    return repr(text if len(text) <= limit else text[:limit] + "...")


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


TITLE_MAX, TEXT_MAX = 200, 20_000  # characters (code points), as len() counts them
FIELDS = {"id": _note_id, "title": _text("title", TITLE_MAX, blank=False),
          "text": _text("text", TEXT_MAX), "base": _text("base", TEXT_MAX)}
COMMANDS = {  # name: (required fields, optional fields)
    "addNote": (("id", "title", "text"), ()),
    "editNoteTitle": (("id", "title"), ("base",)),
    "editNoteContent": (("id", "text"), ("base",)),
    "removeNote": (("id",), ()),
}
# The longest command is editNoteContent: an id, a text and a base. A character
# takes up to 12 bytes of JSON: an emoji is "\ud83d\ude00" as json.dumps (and
# so many clients) write it by default. 4 KiB more for names, quotes, spaces.
MAX_BODY = 12 * (64 + 2 * TEXT_MAX) + 4096
MAX_EVENT_ID = 1000  # "<user>:<key>": 64 characters percent-encoded (<= 768) + 1 + 100


def command_payload(name, body):
    """The event payload for command ``name``, or ApiError(400). The event type is the name."""
    if name not in COMMANDS:
        raise ApiError(400, f"Unknown command {name[:80]!r}; the commands are {', '.join(COMMANDS)}.")
    if not isinstance(body, dict):
        raise ApiError(400, f"The body of {name} must be a JSON object.")
    required, optional = COMMANDS[name]
    extra = sorted(set(body) - set(required) - set(optional))
    if extra:
        raise ApiError(400, f"Unknown field(s) for {name}: {', '.join(map(repr, extra))[:200]}.")
    missing = [f for f in required if f not in body]
    if missing:
        raise ApiError(400, f"Missing field(s) for {name}: {', '.join(map(repr, missing))}.")
    return {f: FIELDS[f](body[f]) for f in required + optional if f in body}


def scoped_event_id(actor, key):
    """The event id for an Idempotency-Key: per user, so a key never finds another's event.

    The name is percent-encoded (":" included), so "<user>:<key>" is one
    user's key only: "a:b" with key "c" and "a" with key "b:c" differ.
    """
    if key is None:
        return None
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,100}", key):
        raise ApiError(400, f"Idempotency-Key must be 1-100 letters, digits or '-_.:'; "
                            f"received {key[:120]!r}. A UUID will do.")
    event_id = f"{quote(actor or '', safe='')}:{key}"
    if len(event_id) > MAX_EVENT_ID:  # cannot happen with names <= 64 characters
        raise ApiError(400, f"Idempotency-Key and user name together are too long "
                            f"({len(event_id)} > {MAX_EVENT_ID} characters); use a shorter key.")
    return event_id


# Errors from dispatch, as HTTP statuses.
STATUS = ((fluxlite.Forbidden, 403), (fluxlite.Rejected, 409), (fluxlite.Conflict, 409),
          (fluxlite.InvalidEvent, 400), (fluxlite.Busy, 503))
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout)

# Control characters as \x1b etc. (as BaseHTTPRequestHandler logs them): a request
# line or path must not write escape sequences to the terminal or forge log lines.
_CONTROL = str.maketrans({c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))})
_CONTROL[ord("\\")] = "\\\\"


def _escape(text):
    return text.translate(_CONTROL)


# -- HTTP ----------------------------------------------------------------------

class NotesServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer holding the store; ``close()`` stops it and closes the store."""

    daemon_threads = True  # a lingering stream never keeps the process alive
    # On Windows SO_REUSEADDR lets a second server take a port already in use,
    # silently; elsewhere it only allows a restart right after a stop.
    allow_reuse_address = os.name != "nt"

    def __init__(self, address, store, heartbeat, origins=()):
        if ":" in address[0]:  # an IPv6 address (::1, ::): the stdlib's default is IPv4 only
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.store, self.heartbeat = store, heartbeat
        self.origins, self.hosts = set(origins), _hosts(self.server_address, origins)
        self.stopping = threading.Event()
        self._streams = 0
        self._streams_lock = threading.Lock()
        self._using = 0  # requests between their first and last store call (not streams)
        self._used = threading.Condition()

    @property
    def streams(self):
        """How many SSE clients are connected now."""
        with self._streams_lock:
            return self._streams

    def _count_stream(self, delta):
        with self._streams_lock:
            self._streams += delta

    @contextlib.contextmanager
    def using_store(self):
        """The store, for one request's calls; 503 once the server is stopping.

        close_store() waits for these: a command that has committed must still
        read its changes and answer 200, not 503 as if it had failed.
        """
        with self._used:
            if self.stopping.is_set():
                raise ApiError(503, "The server is stopping; retry once it is back "
                                    "(with the same Idempotency-Key, if you sent one).")
            self._using += 1
        try:
            yield self.store
        finally:
            with self._used:
                self._using -= 1
                self._used.notify_all()

    def close_store(self, wait=30.0):
        """Refuse new requests, wait (up to ``wait`` seconds: a dispatch waits out
        busy_timeout at most) for those using the store, then close it."""
        with self._used:
            self.stopping.set()
            self._used.wait_for(lambda: self._using == 0, wait)
        self.store.close()  # wakes every follower, so each stream ends now

    def close(self):
        """Stop serving (call from another thread than serve_forever), end streams, close."""
        self.stopping.set()
        self.shutdown()
        self.close_store()
        self.server_close()


def _hosts(address, origins):
    """The Host headers that name this server: its address or a loopback name, with its
    port (or without, on port 80), and the host of each extra origin."""
    bound, port = address[:2]
    names = {n if ":" not in n else f"[{n}]" for n in (bound, "localhost", "127.0.0.1", "::1")}
    hosts = {f"{n}:{port}" for n in names} | (names if port == 80 else set())
    return hosts | {urlsplit(o).netloc for o in origins}


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.0: one request per connection, so a stream simply ends when it closes."""

    server_version = "fluxlite-notes/1"
    timeout = 30  # seconds a socket read or write may block: a stuck client is dropped

    def log_message(self, format, *args):
        log.info("%s %s", self.address_string(), _escape(format % args))

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    def do_DELETE(self):
        self._route("DELETE")

    def do_PATCH(self):
        self._route("PATCH")

    def do_OPTIONS(self):  # a CORS preflight among others: never granted
        self._route("OPTIONS")

    def do_HEAD(self):
        self._route("HEAD")

    def _route(self, method):
        self.body_read = False  # per request: a kept-alive connection reuses this handler
        self.responded = False
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path.startswith("/api/command/"):
            allowed, action = "POST", lambda: self.api_command(url.path[len("/api/command/"):])
        else:
            allowed, action = "GET", {
                "/": self.index_page, "/index.html": self.index_page, "/api/notes": self.api_notes,
                "/api/events": lambda: self.api_events(query), "/api/stream": lambda: self.api_stream(query),
            }.get(url.path)
        try:
            self.check_host_and_origin()
            if action is None:
                raise ApiError(404, f"Nothing at {url.path[:100]!r}.")
            if method != allowed:
                raise ApiError(405, f"{url.path[:100]} takes {allowed}, not {method}.")
            action()
        except ApiError as exc:
            with contextlib.suppress(*CLIENT_GONE):
                self.drain_body()
            self.send_json(exc.status, {"error": exc.message})
        except CLIENT_GONE:
            pass  # the client left; nothing to answer
        except Exception as exc:  # a bug or a closed store: answer 500, keep serving
            log.exception("%s %s failed", method, _escape(self.path))
            if not self.responded:  # else (a stream) the connection just ends
                self.send_json(503 if isinstance(exc, fluxlite.UsageError) else 500,
                               {"error": f"Internal error: {type(exc).__name__}."})

    def send_response(self, code, message=None):
        self.responded = True  # a second status line would land inside this response
        super().send_response(code, message)

    def send_error(self, code, message=None, explain=None):
        """The stdlib's own refusals (an unknown method, a malformed request line) as
        JSON too, like every other error of this API."""
        self.close_connection = True
        text = message or self.responses.get(code, ("Error",))[0]
        body = json.dumps({"error": f"{text[:200]} ({code})."}).encode()
        try:
            self.send_response(code, message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if getattr(self, "command", None) != "HEAD":
                self.wfile.write(body)
        except CLIENT_GONE:
            pass

    def drain_body(self):
        """Read a request body not read yet (up to a limit), so that the client sees
        the error it gets instead of a connection reset."""
        if getattr(self, "body_read", False):
            return
        self.body_read = True
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return
        if 0 < length <= 16 * MAX_BODY:
            while length > 0:
                length -= len(self.rfile.read(min(length, MAX_BODY))) or length

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
            if self.command != "HEAD":  # a HEAD answer has the headers only
                self.wfile.write(body)
        except CLIENT_GONE:
            pass

    def check_host_and_origin(self):
        """403 unless Host names this server and Origin, if sent, is this same origin.

        A browser sends the Host of the URL it thinks it talks to: a site whose
        name resolves to 127.0.0.1 (DNS rebinding) sends its own name. A
        browser sends Origin on cross-site posts: another site's page posting
        here sends its own.
        """
        hosts = self.headers.get_all("Host", [])
        host = hosts[0].strip().lower() if len(hosts) == 1 else None
        if host not in self.server.hosts:
            raise ApiError(403, f"The Host header must name this server "
                                f"({', '.join(sorted(self.server.hosts))}); received "
                                f"{', '.join(map(repr, hosts))[:120] or 'none'}. Open the app at one "
                                f"of those addresses, or start the server with --origin for the "
                                f"public address a proxy serves it at.")
        origin = self.single_header("Origin")
        if origin is not None and origin != f"http://{host}" and origin not in self.server.origins:
            raise ApiError(403, f"Requests from other web sites are refused: the Origin header must "
                                f"be http://{host} (or an --origin); received {origin[:120]!r}.")

    def actor(self):
        """The user: the X-User header, percent-decoded UTF-8; None when anonymous.

        Only a header: a browser sends it cross-site only after a CORS preflight,
        which is never granted (a ``?user=`` in the URL would need none).
        """
        header = self.single_header("X-User")
        if header is None:
            return None
        if not header.isascii():  # the stdlib decodes header bytes as Latin-1: mangled
            raise ApiError(400, f"X-User must be ASCII: percent-encode the name as UTF-8 "
                                f"(encodeURIComponent in JavaScript, e.g. J%C3%BCrgen); received "
                                f"{header[:80]!r}.")
        try:
            name = unquote(header, errors="strict").strip()
        except UnicodeDecodeError:
            raise ApiError(400, f"X-User is not percent-encoded UTF-8; received "
                                f"{header[:80]!r}.") from None
        if len(name) > 64 or not name.isprintable():
            raise ApiError(400, f"A user name is at most 64 printable characters; received "
                                f"{name[:80]!r} ({len(name)} characters).")
        return name or None

    def single_header(self, name):
        """A header's value, None when absent; 400 when sent twice (a proxy that
        appends its own X-User instead of replacing the client's, for instance)."""
        values = self.headers.get_all(name, [])
        if len(values) > 1:
            raise ApiError(400, f"The {name} header was sent {len(values)} times; send it once.")
        return values[0] if values else None

    def check_json_content_type(self):
        """415 unless Content-Type is application/json (a charset parameter may follow).

        Another site's page can post text/plain or a form without asking; JSON
        needs a CORS preflight first, which this server never grants.
        """
        content_type = self.single_header("Content-Type") or ""
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise ApiError(415, f"Commands take Content-Type: application/json; received "
                                f"{content_type[:80]!r}. Send the body as JSON with that header.")

    def read_json(self):
        value = self.single_header("Content-Length")  # twice: 400, whichever is right
        if value is None:  # chunked, say: not read by this HTTP/1.0 server
            raise ApiError(411, "Send the JSON body with a Content-Length.")
        if not re.fullmatch(r"[0-9]+", value.strip()):  # int() takes "-5", "+5", "1_0"
            raise ApiError(400, f"Content-Length must be the body's size in bytes (digits "
                                f"only); received {value[:40]!r}.")
        length = int(value)
        if length > MAX_BODY:
            raise ApiError(413, f"The body must be at most {MAX_BODY} bytes.")  # drained
        self.body_read = True
        body = self.rfile.read(length)
        if len(body) < length:  # the client stopped sending: what came is not the command
            raise ApiError(400, f"The body ended after {len(body)} of the {length} bytes its "
                                f"Content-Length announced; send it whole.")
        try:
            return json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError):
            raise ApiError(400, "The body is not valid JSON.") from None

    # -- endpoints ---------------------------------------------------------------

    def api_command(self, name):
        if name in COMMANDS:
            self.check_json_content_type()
        payload = command_payload(name, self.read_json() if name in COMMANDS else {})
        actor = self.actor()
        event_id = scoped_event_id(actor, self.single_header("Idempotency-Key"))
        with self.server.using_store() as store:  # close() waits for the answer
            try:
                event = store.dispatch(name, payload, actor=actor, id=event_id)
            except fluxlite.FluxliteError as exc:
                status = next((s for kind, s in STATUS if isinstance(exc, kind)), None)
                if status is None:
                    raise
                hint = (" Name yourself: send the X-User header (percent-encoded); ?user= is "
                        "not read." if status == 403 and actor is None else "")
                raise ApiError(status, str(exc) + hint) from None
            changes = [c.to_dict() for c in store.changes(event.seq)]
        self.send_json(200, {"event": event.to_dict(), "changes": changes})

    def api_notes(self):
        with self.server.using_store() as store:
            while True:  # the notes and the seq they are as of, from one moment
                seq = store.head
                rows = store.query("SELECT * FROM notes ORDER BY created_at, id")
                if store.head == seq:
                    break
        self.send_json(200, {"seq": seq, "notes": rows})

    def api_events(self, query):
        after = _int_param(query, "after", 0)
        limit = min(_int_param(query, "limit", 100), 1000)
        with self.server.using_store() as store:
            events = [e.to_dict() for e in store.events(after=after, limit=limit)]
        self.send_json(200, {"events": events})

    def index_page(self):
        with open(PAGE, "rb") as f:
            body = f.read()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy",  # the page loads nothing from elsewhere
                         "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                         "style-src 'self' 'unsafe-inline'; img-src data:; "
                         "frame-ancestors 'none'")  # no other site may frame it (clickjacking)
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


def make_server(db_path, port=0, host="127.0.0.1", heartbeat=15.0, origins=()):
    """Open the store and bind the server (port 0: any free port). Returns (httpd, store).

    ``origins``: extra origins the page is served at, e.g. "https://notes.example.com"
    behind a proxy; requests from them (and with their Host) are accepted too.

    Run it with ``httpd.serve_forever()``; stop it from another thread with
    ``httpd.close()``, which also closes the store.
    """
    origins = _origins(origins)
    store = open_store(db_path)
    try:
        return NotesServer((host, port), store, heartbeat, origins), store
    except BaseException:
        store.close()
        raise


def _origins(origins):
    """Each origin as scheme://host[:port] in lower case, as a browser sends it."""
    checked = []
    for origin in origins:
        url = urlsplit(origin)
        if url.scheme not in ("http", "https") or not url.netloc or url.path not in ("", "/"):
            raise ValueError(f"An origin is scheme://host[:port], like https://notes.example.com; "
                             f"received {origin!r}.")
        checked.append(f"{url.scheme}://{url.netloc}".lower())
    return checked


def _stop(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    parser = argparse.ArgumentParser(description="The fluxlite notes example server.")
    parser.add_argument("--db", default="notes.db", help="store file (default: ./notes.db)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--origin", action="append", default=[], metavar="URL",
                        help="also accept requests for this origin, e.g. https://notes.example.com "
                             "behind a proxy (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        origins = _origins(args.origin)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        httpd, store = make_server(args.db, port=args.port, host=args.host, origins=origins)
    except fluxlite.FluxliteError as exc:  # not a store, no such directory, ...
        parser.exit(1, f"{parser.prog}: cannot open --db {args.db!r}: {exc}\n")
    except (OSError, OverflowError) as exc:  # the port is taken, no such host, port > 65535
        parser.exit(1, f"{parser.prog}: cannot listen on --host {args.host} --port {args.port}: "
                       f"{str(exc).rstrip('.')}. Choose another port (0: any free one) or host.\n")
    signal.signal(signal.SIGTERM, _stop)  # `kill` stops it as cleanly as Ctrl-C
    try:
        host, port = httpd.server_address[:2]
        host = f"[{host}]" if ":" in host else host  # an IPv6 address, as a URL writes it
        print(f"Notes on http://{host}:{port}/  (store: {os.path.abspath(args.db)}, "
              f"{store.head} events). Ctrl-C stops.", flush=True)
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.close_store()  # after the commands under way have answered
        httpd.server_close()


if __name__ == "__main__":
    main()
