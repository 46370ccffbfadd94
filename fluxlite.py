# fluxlite — an event-sourced data store in one file, on stdlib sqlite3.
#
# Copyright (c) 2026 the fluxlite developers
#
# Permission is hereby granted, free of charge, to any person obtaining a copy
# of this software and associated documentation files (the "Software"), to deal
# in the Software without restriction, including without limitation the rights
# to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
# copies of the Software, and to permit persons to whom the Software is
# furnished to do so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in
# all copies or substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
# IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
# FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
# AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
# LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
# OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
# SOFTWARE.
#
# Keep this header when you copy the file into your project.
"""fluxlite: Redux's model for your data layer, in one file on SQLite.

Dispatch events; pure reducers turn each event into a changeset of row
operations; the event and its changes commit in one transaction; subscribers
hear about it after commit; the log is kept, so the past can be replayed.

Quick start (run by the test suite, so it stays true)::

    >>> import fluxlite
    >>> def reducer(view, event):
    ...     if event.type == "addUser":
    ...         return view.users.insert(name=event.payload["name"], role=None)
    ...     if event.type == "grantAccess":
    ...         return view.users.update(event.payload["name"], role=event.payload["role"])
    >>> store = fluxlite.open(":memory:",
    ...     schema="CREATE TABLE users (name TEXT PRIMARY KEY, role TEXT)",
    ...     reducer=reducer)
    >>> event = store.dispatch("addUser", {"name": "Barack"})
    >>> event.seq, event.type
    (1, 'addUser')
    >>> _ = store.dispatch("grantAccess", {"name": "Barack", "role": "President"})
    >>> store.view.users.get("Barack")
    {'name': 'Barack', 'role': 'President'}
    >>> store.verify()   # replaying the log gives exactly the live tables
    >>> store.close()

Map of this file, in dependency order:

    1. constants and pragmas
    2. exceptions
    3. value types: Event, Change
    4. private helpers: JSON, time, identifiers, SQL splitting
    5. connection and transactions (_connect, _write_txn)
    6. schema: checking the user's DDL, reading table shapes
    7. the read model: applying changesets, the journal, reads (_Model)
    8. views and tables (View, Table) and reducer helpers (combine)
    9. the store (Store): dispatch, subscribers, the log, verify, the past
   10. replay and the past: as-of views, rebuilds, comparing models
   11. middleware (authorize)
   12. open(), adopting an existing database
   13. testing helpers: scenario (given / when / then)
   14. the command line (python -m fluxlite, or the `fluxlite` script)
"""

from __future__ import annotations

__version__ = "0.1.0"
__license__ = "MIT"

__all__ = [
    "APPLICATION_ID",
    "App",
    "AsyncFollower",
    "BASELINE",
    "Busy",
    "Change",
    "ChangesetError",
    "Checkpoint",
    "CollectionReducer",
    "Conflict",
    "Consumer",
    "Event",
    "FORMAT_VERSION",
    "FluxliteError",
    "Forbidden",
    "InvalidEvent",
    "Middleware",
    "QueryError",
    "RESTORE",
    "Reducer",
    "ReducerError",
    "Rejected",
    "ReplayMismatch",
    "Revision",
    "Scenario",
    "SchemaError",
    "StorageError",
    "Store",
    "Table",
    "Upcaster",
    "UsageError",
    "View",
    "authorize",
    "combine",
    "main",
    "open",
    "scenario",
]

import atexit
import builtins
import collections
import collections.abc
import contextlib
import dataclasses
import errno
import functools
import hashlib
import inspect
import itertools
import json
import logging
import math
import numbers
import os
import re
import signal
import socket
import sqlite3
import stat
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import uuid
import weakref
from datetime import date, datetime, timedelta, timezone
from datetime import time as dt_time
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Deque,
    Dict,
    FrozenSet,
    Generator,
    Iterable,
    Iterator,
    List,
    Mapping,
    NoReturn,
    Optional,
    Sequence,
    Set,
    Tuple,
    Type,
    TypeVar,
    Union,
)

if TYPE_CHECKING:  # imported when afollow() is first called: most programs never need them
    import concurrent.futures

_log = logging.getLogger("fluxlite")
_Mapping = collections.abc.Mapping  # for isinstance: faster than typing.Mapping

###############################################################################
# 1. Constants and pragmas
###############################################################################

#: On-disk format. Stored in ``PRAGMA user_version`` (unless an adopted
#: application's number is there: _app_marks) and fluxlite_meta; a file with a
#: higher number was written by a newer fluxlite and is refused.
FORMAT_VERSION = 2  # 2: fluxlite_seals (format 1 files are sealed on open)
#: ``PRAGMA application_id``: the ASCII bytes "FLXT", so tools can tell a
#: fluxlite file from any other SQLite file (an adopted one keeps its own).
APPLICATION_ID = 0x464C5854

_DURABILITY = {"full": "FULL", "normal": "NORMAL"}
_DARWIN = sys.platform == "darwin"  # see _apply_full_fsync
_MAX_DEPTH = 200  # how deep an event's payload or meta may nest (lists, dicts)

# At durability="normal" the WAL is checkpointed by a background thread (see
# _WalCheckpointer), every _CHECKPOINT_EVERY events this store commits; the
# store's own connection checkpoints only once the WAL holds _WAL_CEILING bytes,
# which bounds it as SQLite's default (1,000 pages of 4 KB) did.
_CHECKPOINT_EVERY = 64
_CHECKPOINT_IDLE = 30.0  # seconds without commits before the thread ends
_WAL_CEILING = 4 * 1024 * 1024

# Applied by _connect() to every connection, in this order. synchronous is
# added per store, from its durability (it is per connection, not in the file).
_PRAGMAS: Dict[str, Any] = {
    # Takes effect only in a new file (an existing one keeps its own size). A
    # commit writes every page it touches to the WAL whole, and a dispatch
    # touches about nine (the log, its indexes and sqlite_sequence, the row,
    # the journal and its index, the seal): at half SQLite's default of 4096,
    # each commit and each checkpoint moves half the bytes. bench/run.py:
    # single dispatches 10-15% faster, batches, replays and at() unchanged.
    "page_size": 2048,
    "busy_timeout": 10_000,  # ms a writer waits for another process's lock
    "journal_mode": "wal",
    "foreign_keys": "on",
    # A big transaction (a rebuild's swap) grows the WAL file; without a limit
    # SQLite reuses it but never shrinks it. With one, the file is truncated
    # back to this size each time the WAL restarts after a checkpoint.
    "journal_size_limit": 64 * 1024 * 1024,
}

# One seal per write transaction: seq is the last event it wrote; events and
# journal are links of two sha256 chains over the rows of the log and of the
# journal up to that seq (see _chain_link). verify() recomputes both, so a
# byte changed anywhere in either is found, even where the JSON stays valid.
# A rebuild rewrites the journal links; the events links never change.
_SEALS_DDL = """CREATE TABLE fluxlite_seals (
        seq INTEGER PRIMARY KEY,
        events TEXT NOT NULL,
        journal TEXT NOT NULL
    )"""

_LOG_DDL = (
    """CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        payload TEXT,
        meta TEXT,
        ts TEXT NOT NULL
    )""",
    "CREATE INDEX fluxlite_events_type ON events (type, seq)",
    # The log is append-only, for anyone holding the file: the sqlite3 shell too.
    """CREATE TRIGGER fluxlite_events_no_update BEFORE UPDATE ON events
       BEGIN SELECT RAISE(ABORT, 'fluxlite: the events log is append-only; UPDATE is refused'); END""",
    """CREATE TRIGGER fluxlite_events_no_delete BEFORE DELETE ON events
       BEGIN SELECT RAISE(ABORT, 'fluxlite: the events log is append-only; DELETE is refused'); END""",
    # REPLACE deletes the conflicting row without firing DELETE triggers: refuse
    # any insert whose seq or id is already in the log, before that happens.
    # (seq is gap-free, so "at most the head" means "taken"; max(seq) is one
    # step, where "seq = NEW.seq OR id = NEW.id" cost two index searches.)
    """CREATE TRIGGER fluxlite_events_no_replace BEFORE INSERT ON events
       WHEN NEW.seq > 0 AND NEW.seq <= (SELECT max(seq) FROM events)
         OR EXISTS (SELECT 1 FROM events WHERE id = NEW.id)
       BEGIN SELECT RAISE(ABORT, 'fluxlite: the events log is append-only; REPLACE is refused'); END""",
    # Every row change, with the whole row before and after: row history and
    # the past without replaying, and the changes of events written elsewhere.
    """CREATE TABLE fluxlite_journal (
        seq INTEGER NOT NULL,
        n INTEGER NOT NULL,
        tbl TEXT NOT NULL,
        key TEXT NOT NULL,
        op TEXT NOT NULL,
        before TEXT,
        after TEXT,
        PRIMARY KEY (seq, n)
    ) WITHOUT ROWID""",
    "CREATE INDEX fluxlite_journal_row ON fluxlite_journal (tbl, key, seq)",
    "CREATE TABLE fluxlite_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    _SEALS_DDL,
)
# Durable consumers: a position and a lease per name (created on open if missing).
_CONSUMERS_DDL = """CREATE TABLE IF NOT EXISTS fluxlite_consumers (
    name TEXT PRIMARY KEY,
    position INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0
) WITHOUT ROWID"""

_OPS = ("insert", "update", "upsert", "delete")
_RESERVED_TABLE = re.compile(r"^(events|fluxlite_.*|sqlite_.*)$", re.IGNORECASE)
_ALLOWED_DDL = re.compile(r"^CREATE\s+(TABLE|(UNIQUE\s+)?INDEX)\b", re.IGNORECASE)

# sqlite3 authorizer action codes allowed in read-only queries: READ, SELECT,
# FUNCTION, RECURSIVE (numbers, since Python 3.9 lacks some of the names).
_READ_ACTIONS = frozenset({20, 21, 31, 33})
_SQLITE_READ = 20
_SQLITE_FUNCTION = 31
# SQL functions that are no reads, refused in query() (SQLite names them in lower
# case): fts3_tokenizer(name, pointer) installs a C function pointer on the
# connection that the next FTS3/FTS4 table using that tokenizer calls (a crash, or
# worse, from a SELECT), and fts3_tokenizer(name) returns a memory address; builds
# such as Debian's enable both. load_extension() loads code.
_UNSAFE_FUNCTIONS = frozenset({"fts3_tokenizer", "load_extension"})
# The table-valued functions a reducer's query() may read besides the model: they
# read only their arguments. SQLite 3.51 added the jsonb_ pair (JSONB rows).
_JSON_TABLES = frozenset({"json_each", "json_tree", "jsonb_each", "jsonb_tree"})
# Prefixes, not suffixes: SQLite names a result column by its text, which for
# the last column ran on into a comment after it.
_READONLY_TAG = "/* fluxlite:read-only */\n"
# How SQLite reports a statement query() may not run (see _Model.query).
_REFUSED_QUERY = ("not authorized", "prohibited", "authorization denied", "cannot VACUUM")
_REDUCER_TAG = "/* fluxlite:reducer */\n"
# SQLite steps between two calls of _let_signals_in while query() runs in the main
# thread: some tens of milliseconds, short for a Ctrl-C, rare enough to cost nothing.
_SIGNAL_TICKS = 1_000_000
# A table-valued function (json_each, json_tree) is set up with an UPDATE of
# sqlite_master in the authorizer's eyes; the query itself only reads.
_SQLITE_UPDATE = 23
_PAGE = 512  # rows fetched per query when streaming the log
_REWINDS_KEPT = 16  # resets whose heads the file keeps for followers of other stores
_VERIFY_RETRIES = 3  # replays of verify() again after another process reset the file
# RETURNING is not used: SQLite 3.40 can report a REAL column's affinity on
# the wrong column (the torture suite found it for INSERT/UPDATE, and later for
# DELETE, which then journaled an integer key as 0.0), so rows are read with a
# SELECT when they are not known in advance (_stored_row).
_HAS_UPSERT = sqlite3.sqlite_version_info >= (3, 24, 0)  # INSERT ... ON CONFLICT DO UPDATE
# The oldest SQLite fluxlite can read a table's shape on: PRAGMA table_xinfo came
# in 3.26, and an older SQLite ignores a PRAGMA it does not know (no rows, no
# error), so every table looked keyless ("has no primary key").
_MIN_SQLITE = (3, 26, 0)

###############################################################################
# 2. Exceptions
###############################################################################


class FluxliteError(Exception):
    """Root of every error fluxlite raises on purpose; ``batch_index``: see dispatch_many()."""

    # Set when dispatch_many() refused the batch for one of its items: that item's
    # 0-based index in the list given (see _name_batch_item; also on a middleware's
    # own exception). None otherwise.
    batch_index: Optional[int] = None


class InvalidEvent(FluxliteError):
    """An event is malformed: bad type, id, payload or meta."""


class Rejected(FluxliteError):
    """Raised by a reducer to refuse an event; nothing is written."""


class ReducerError(FluxliteError):
    """A reducer (or an upcaster) raised something other than a FluxliteError; see __cause__."""


class Forbidden(FluxliteError):
    """Access control refused an event for its actor; nothing is written."""


class ChangesetError(FluxliteError):
    """A changeset is malformed or cannot be applied to the read model."""


class Conflict(FluxliteError):
    """An id was reused with other content, expect_seq did not match, or a consumer lost its lease."""


class SchemaError(FluxliteError):
    """The schema DDL or the file itself is not acceptable."""


class QueryError(FluxliteError):
    """A read-only query was refused or failed."""


class ReplayMismatch(FluxliteError):
    """Replaying the log did not reproduce the live read model."""


class UsageError(FluxliteError):
    """An API was used against its rules (closed store, dispatch in a reducer)."""


class Busy(FluxliteError):
    """Held by another connection or process; nothing was written: retry.

    The write lock (past busy_timeout, 10 s); a consumer name (another open Consumer,
    or a live process's); the file, reset or rebuilt by another process during each of
    verify()'s or rebuild()'s replays.
    """


class StorageError(FluxliteError):
    """SQLite could not read or write the file (disk full, read-only, I/O error), or it is damaged."""


# view.nope and view["nope"]: a UsageError, and what Python's protocols expect
# there (hasattr() and getattr(view, name, default) rely on AttributeError).
class _NoTableAttribute(UsageError, AttributeError):
    pass


class _NoTableKey(UsageError, KeyError):
    __str__ = Exception.__str__  # not KeyError's repr() of the message


###############################################################################
# 3. Value types
###############################################################################


@dataclasses.dataclass(frozen=True)
class Event:
    """One committed event: the log's unit. Its fields cannot be reassigned.

    ``payload`` and ``meta`` are the values as stored (after the JSON round
    trip), so reducers see the same input live and in replay; they are plain
    dicts and lists, shared, not copied: a reducer must not mutate them (what
    subscribers and dispatch()'s caller see would change, not the log). ``ts`` is
    a timezone-aware UTC datetime that never decreases along ``seq``.
    """

    seq: int
    id: str
    type: str
    payload: Any
    meta: Dict[str, Any]
    ts: datetime

    @property
    def actor(self) -> Optional[str]:
        """``meta["actor"]``: who dispatched the event, if known."""
        return self.meta.get("actor")

    def replace(self, **changes: Any) -> "Event":
        """A copy with a new type, payload or meta (for upcasters)."""
        unknown = set(changes) - {"type", "payload", "meta"}
        if unknown:
            raise UsageError(
                f"Event.replace() changes type, payload or meta; received "
                f"[{', '.join(map(_quoted, sorted(unknown)))}]."
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict: seq, id, type, payload, meta, ts (ISO-8601)."""
        return {
            "seq": self.seq,
            "id": self.id,
            "type": self.type,
            "payload": self.payload,
            "meta": self.meta,
            "ts": _format_ts(self.ts),
        }


@dataclasses.dataclass(frozen=True)
class Change:
    """One row operation: plain data a reducer returns and subscribers receive.

    ``op`` is insert, update, upsert or delete; ``key`` is the primary-key
    value (a tuple for a composite key; for an insert or upsert it may be None
    and is then taken from ``values``); ``values`` is the row (insert, upsert)
    or the columns to set (update), and None for a delete.
    """

    op: str
    table: str
    key: Any = None
    values: Optional[Dict[str, Any]] = None

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ChangesetError(
                f"Change op must be one of {', '.join(_OPS)}; received {_quoted(self.op)}."
            )
        if not isinstance(self.table, str):
            raise ChangesetError(
                f"Change table must be a table name (str); received {_quoted(self.table)}."
            )
        if isinstance(self.key, list):
            object.__setattr__(self, "key", tuple(self.key))
        if self.values is not None and not isinstance(self.values, _Mapping):
            raise ChangesetError(
                f"Change values must be a dict of column -> value or None; received "
                f"{_describe(self.values)} for {'an' if self.op[0] in 'aeiou' else 'a'} "
                f"{self.op} on {_quoted(self.table)}. (In a scenario's then(), a matcher "
                f"such as ANY stands for one value: {{'column': ANY}}.)"
            )

    def replace(self, **changes: Any) -> "Change":
        """A copy with a new op, table, key or values: for a reducer that adds to
        what another returns, ``c.replace(values={**c.values, "updated": ts})``
        (for a change with values: a delete's ``values`` is None)."""
        unknown = set(changes) - {"op", "table", "key", "values"}
        if unknown:
            raise UsageError(
                f"Change.replace() changes op, table, key or values; received "
                f"[{', '.join(map(_quoted, sorted(unknown)))}]."
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict: op, table, key (a list for a composite key), values."""
        key = list(self.key) if isinstance(self.key, tuple) else self.key
        values = dict(self.values) if self.values is not None else None
        return {"op": self.op, "table": self.table, "key": key, "values": values}


@dataclasses.dataclass(frozen=True)
class Revision:
    """One version of a row, from store.history(): the event that made it and the row.

    ``before`` and ``after`` are whole rows as dicts; ``before`` is None for
    an insert and ``after`` is None for a delete. ``type`` is the event's type
    as events() gives it (after the store's upcasters).
    """

    seq: int
    event_id: str
    type: str
    ts: datetime
    op: str
    before: Optional[Dict[str, Any]]
    after: Optional[Dict[str, Any]]

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict of the revision."""
        return {**dataclasses.asdict(self), "ts": _format_ts(self.ts)}


###############################################################################
# 4. Private helpers: JSON, time, identifiers, SQL splitting
###############################################################################


def _unshowable(value: Any, exc: Exception) -> str:
    """What a message says of a value whose repr() failed: "a int" read as a typo."""
    name = type(value).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    if isinstance(exc, RecursionError):  # a dict nested thousands deep: the message, not a crash
        return f"{article} {name} nested too deeply to show"
    if isinstance(value, int):  # past Python's str() limit (4300 digits by default)
        return f"{article} {name} of more digits than Python will show"
    return f"{article} {name} that cannot be shown"


def _describe(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # (RecursionError included)
        return _unshowable(value, exc)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} (of type {type(value).__name__})"


def _quoted(value: Any) -> str:
    """repr(value) for a message, at most its first 200 characters: a 1 MB event type,
    table name, key or id is not repeated whole in an error (and in each log line of it)."""
    try:
        text = repr(value)
    except Exception as exc:
        return _unshowable(value, exc)
    if len(text) <= 200:
        return text
    if isinstance(value, str):
        return f"{value[:200]!r}... ({len(value)} characters)"
    return f"{text[:200]}... ({len(text)} characters)"


def _make_dumps() -> Callable[[Any], str]:
    """Compact JSON text, no NaN, non-ASCII kept: JSONEncoder.encode without the new
    C encoder that JSONEncoder.iterencode builds on every call (about a microsecond
    per value, and the hot paths encode several values per event). No markers dict:
    a circular value is a RecursionError, which callers treat like any bad value."""
    encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        chunks = json.encoder.c_make_encoder(  # type: ignore[attr-defined]
            None, encoder.default, json.encoder.encode_basestring, None,
            ":", ",", False, False, False)

        def fast(value: Any) -> str:
            return "".join(chunks(value, 0))

        sample = {"a": [1, -2.5, "\u00e9\n\"", None, True, {}]}
        if fast(sample) == encoder.encode(sample):
            return fast
    except Exception:  # no C accelerator, or another interpreter's internals
        pass
    return encoder.encode


_dumps = _make_dumps()
_raw_decode = json.JSONDecoder().raw_decode


def _loads(text: str) -> Any:
    """Decode JSON that fluxlite wrote (no surrounding whitespace to skip)."""
    return _raw_decode(text)[0]


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values: 1, 1.0, true and -0.0 differ, though Python's == says
    they are equal."""
    if a.__class__ is not b.__class__:
        return False
    if a.__class__ is dict:
        return a.keys() == b.keys() and all(_same_json(v, b[k]) for k, v in a.items())
    if a.__class__ is list:
        return len(a) == len(b) and all(map(_same_json, a, b))
    if a.__class__ is float:
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return bool(a == b)


def _to_json_text(value: Any, what: str) -> str:
    """Encode as JSON or raise InvalidEvent saying why; the text is valid UTF-8."""
    try:
        text = _dumps(value)
        text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidEvent(
            f"An event's {what} must be JSON: dicts with str keys, lists, str, "
            f"int, finite float, bool, None. Received {_describe(value)}: {exc}. "
            f"Convert it to plain JSON data before dispatching (a datetime with "
            f".isoformat(), a Decimal with str() or as an int of cents, a set with "
            f"sorted())."
        ) from None
    # Bracket count bounds the depth; only a deep candidate is measured.
    if text.count("[") + text.count("{") > _MAX_DEPTH and _depth(value) > _MAX_DEPTH:
        raise InvalidEvent(
            f"An event's {what} nests more than {_MAX_DEPTH} levels deep; such data could "
            f"not be read back safely everywhere (Python's recursion limit). Flatten it."
        )
    return text


def _depth(value: Any) -> int:
    """Nesting depth of lists and dicts, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (list, tuple, dict)):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (
                item.values() if isinstance(item, dict) else item))
    return deepest


def _check_text(text: str, what: str, error: type) -> str:
    """Refuse text SQLite cannot store (lone surrogates are not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(f"{what} {_quoted(text)} is not valid Unicode text (a lone surrogate at "
                    f"character {exc.start}); fix the string's encoding.") from None
    return text


def _format_ts(ts: datetime) -> str:
    # Fixed width, one offset: text order equals time order.
    return _utc_text(ts.astimezone(timezone.utc))


def _utc_text(utc: datetime) -> str:
    """A UTC datetime as ts text, written from its fields: not isoformat(), which a
    datetime subclass may write its own way (a Z, no fraction), text of another
    length that sorts out of time order. Also a quarter cheaper than
    isoformat(timespec="microseconds"): no keyword to parse, no tzinfo call."""
    return "%04d-%02d-%02dT%02d:%02d:%02d.%06d+00:00" % (
        utc.year, utc.month, utc.day, utc.hour, utc.minute, utc.second, utc.microsecond)


def _clock_utc(clock: Callable[[], datetime]) -> datetime:
    """What the store's clock returns, checked, in UTC."""
    now = clock()
    if not isinstance(now, datetime) or now.tzinfo is None or (
            now.tzinfo is not timezone.utc and now.utcoffset() is None):  # naive too
        raise UsageError(
            f"The store's clock must return a timezone-aware datetime; it "
            f"returned {_describe(now)}. Use datetime.now(timezone.utc)."
        )
    try:
        return now.astimezone(timezone.utc)
    except OverflowError:  # e.g. 9999-12-31 23:00-05:00: past datetime.max in UTC
        raise UsageError(
            f"The store's clock returned {_describe(now)}, which in UTC is before year 1 "
            f"or after 9999, where no ts can be written. Make it return a time in range."
        ) from None


def _parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


_fromisoformat = datetime.fromisoformat  # _parse_ts, where a call of it counts


_ISO_FRACTION = re.compile(r"([T ]\d\d:\d\d:\d\d)\.(\d{1,6})(?=$|[+-])")


def _parse_iso(text: str) -> datetime:
    """A user's ISO-8601 time: datetime.fromisoformat, plus what Python 3.9 and
    3.10 refuse there and 3.11 takes: a trailing Z, and 1 to 6 digits of fraction."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        fixed = text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text
        fixed = _ISO_FRACTION.sub(lambda m: f"{m[1]}.{m[2]:0<6}", fixed)
        return datetime.fromisoformat(fixed)


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _new_id() -> str:
    """A UUIDv7 (RFC 9562) as text: 48 bits of Unix milliseconds, then random bits.

    Ids made one after another sort together, so each lands at the end of the
    log's id index instead of in a random page of it: in a store past its page
    cache, random ids cost page reads and writes that grow with the log.
    """
    raw = bytearray((time.time_ns() // 1_000_000).to_bytes(6, "big") + os.urandom(10))
    raw[6] = (raw[6] & 0x0F) | 0x70
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _quote(name: str) -> str:
    """Quote an identifier already checked against the schema."""
    return '"' + name.replace('"', '""') + '"'


def _sql_text(text: str) -> str:
    """A SQL string literal, for text fluxlite writes into SQL rather than binds."""
    return "'" + text.replace("'", "''") + "'"


def _strip_leading_comments(sql: str) -> str:
    text = sql.lstrip()
    while text.startswith(("--", "/*")):
        end = text.find("\n") if text.startswith("--") else text.find("*/") + 1
        if end <= 0:
            return ""
        text = text[end + 1 :].lstrip()
    return text


def _split_sql(script: str) -> List[str]:
    """Split a script into complete statements (semicolons in strings are safe)."""
    statements, start = [], 0
    for end, char in enumerate(script):
        if char == ";" and sqlite3.complete_statement(script[start:end + 1]):
            statements.append(script[start:end + 1])
            start = end + 1
    statements.append(script[start:])
    return [s.strip() for s in statements if _strip_leading_comments(s).strip(" \t\r\n;")]


# SQL as tokens: a string literal, a quoted identifier, a comment, whitespace,
# a run of anything else, or one character. Literals stay whole, so what looks
# like a comment or a keyword inside one is not taken for it.
_SQL_TOKEN = re.compile(r"""'(?:[^']|'')*'?|"(?:[^"]|"")*"?|`(?:[^`]|``)*`?|\[[^\]]*\]?"""
                        r"""|--[^\n]*|/\*.*?(?:\*/|\Z)|\s+|[^'"`\[\-/\s(),]+|.""", re.S)


def _sql_code(sql: str, literals: bool = True, names: str = "blank") -> List[str]:
    """The statement's tokens, each comment and run of whitespace made one " ".
    With literals=False (to search the code only), string literals are made "''",
    and quoted names too ("blank"), or unquoted where they are called ("calls":
    "random"() is the function random)."""
    tokens: List[str] = []
    for token in _SQL_TOKEN.findall(sql):
        if token.isspace() or token.startswith(("--", "/*")):
            if tokens and tokens[-1] != " ":
                tokens.append(" ")
        elif literals or token[0] not in "'\"`[":
            tokens.append(token)
        elif token[0] != "'" and names == "calls":
            tokens.append(token)  # unquoted below, if a call

        else:
            tokens.append("''")
    if names == "calls":  # "random"() calls random; a lone "x" in a default is the text 'x'
        return [_called_name(tokens, i) for i in range(len(tokens))]
    return tokens


def _called_name(tokens: List[str], i: int) -> str:
    token = tokens[i]
    if token[0] not in "\"`[":
        return token
    following = [t for t in tokens[i + 1:i + 3] if t != " "]
    return token[1:-1] if following and following[0].startswith("(") else "''"


_SQLITE_OWN_TABLE = re.compile(
    r"CREATE\s+TABLE\s+(IF\s+NOT\s+EXISTS\s+)?[\"`\[]?sqlite_sequence[\"`\]]?\s*\(", re.IGNORECASE)


def _schema_statements(script: str) -> List[str]:
    """The schema's statements, less any CREATE TABLE sqlite_sequence: SQLite makes
    that one itself, and a schema copied from sqlite_master has it."""
    return [s for s in _split_sql(script) if not _SQLITE_OWN_TABLE.match(_strip_leading_comments(s))]


_SQL_OPERATORS = frozenset("=<>!|+-*/%&~^.")
# Two operator characters SQLite reads as one token (or a comment) when they touch:
# only between these does a space count ("< =" is not "<=", "- -1" is no comment).
_SQL_JOINING = frozenset(("<=", ">=", "==", "!=", "<>", "<<", ">>", "||", "->", "--", "/*", "*/"))


def _json_version(version: Any) -> Any:
    """A version as stored (a tuple is the list it is stored as); UsageError if it is
    not JSON (also from the CLI, where an App's version reaches here unchecked)."""
    try:
        return _loads(_to_json_text(version, "version"))
    except InvalidEvent:
        raise UsageError(
            f"version must be a JSON value (a number, a string, ...); received "
            f"{_describe(version)}."
        ) from None


def _same_code(schema: str, version: Any, other_schema: str, other_version: Any) -> bool:
    """The same read model: schema text as _normalize_schema compares it, and versions
    equal as JSON values (1 and true differ; a tuple is the list it is stored as)."""
    return _normalize_schema(schema) == _normalize_schema(other_schema) and _same_json(
        _json_version(version), _json_version(other_version))


def _code_difference(schema: str, version: Any, own_schema: str, own_version: Any) -> str:
    """What differs between the file's code (schema, version) and a store's own, for
    an error: "another schema (...)", "another version (...)", or both."""
    parts = []
    stored = _normalize_schema(schema).split(";\n")
    own = _normalize_schema(own_schema).split(";\n")
    if stored != own:
        added = "; ".join(t for t in stored if t not in own)
        dropped = "; ".join(t for t in own if t not in stored)
        shown = [f"{whose} has {_shorten(text)!r}" for whose, text in (
            ("the file's", added), ("this store's", dropped)) if text]
        parts.append(f"another schema ({', where '.join(shown) or 'its statements in another order'})")
    if not _same_json(_json_version(version), _json_version(own_version)):
        parts.append(f"another version ({version!r}; this store was opened with {own_version!r})")
    return " and ".join(parts)


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _normalize_schema(script: str) -> str:
    """The schema as compared between opens: comments and whitespace (outside
    string literals and quoted names) do not count."""
    out = []
    for statement in _split_sql(script):
        tokens = _sql_code(statement)
        # A space counts only between two words (or two operators, which it keeps
        # apart: "< =" is not "<="); next to punctuation or between a word and an
        # operator ("n > 0" and "n>0") it does not.
        kept = [t for i, t in enumerate(tokens) if t != " " or (
            0 < i < len(tokens) - 1 and tokens[i - 1][-1] not in "(),;"
            and tokens[i + 1][0] not in "(),;"
            and (tokens[i - 1][-1] in _SQL_OPERATORS) == (tokens[i + 1][0] in _SQL_OPERATORS)
            and (tokens[i - 1][-1] not in _SQL_OPERATORS
                 or tokens[i - 1][-1] + tokens[i + 1][0] in _SQL_JOINING))]
        out.append("".join(kept).rstrip(";").strip())
    return ";\n".join(out)


def _check_value(value: Any, table: str, column: str,
                 error: Callable[[str], FluxliteError] = ChangesetError) -> None:
    kind = type(value)
    if kind is str or value is None or kind is bool:
        return
    if kind is int and -9223372036854775808 <= value <= 9223372036854775807:
        return
    if kind is float and value - value == 0:  # finite: inf - inf and nan - nan are nan
        return
    if value is None or isinstance(value, (str, int)):
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise error(
                f"Column {table}.{column} received {_describe(value)}, outside SQLite's 64-bit "
                f"integer range; store it as text (str(value)) instead."
            )
        return
    if isinstance(value, float):
        if math.isfinite(value):
            return
        raise error(
            f"Column {table}.{column} received {value!r}; read-model values must be "
            f"finite numbers (NaN and infinity do not survive SQLite and JSON). "
            f"Use None or a sentinel value."
        )
    raise error(
        f"Column {table}.{column} received {_describe(value)}; read-model values "
        f"must be None, bool, int, float or str.{_scalar_hint(value)}"
    )


def _scalar_hint(value: Any) -> str:
    """How to store a value SQLite and JSON cannot hold as it is."""
    # A time is the likeliest: reducers are told to take it from event.ts; then money.
    if isinstance(value, (datetime, date, dt_time)):
        # timespec: plain isoformat() drops the fraction at a whole second, so its
        # text is not the log's ts for that instant ('...:01+00:00' < '...:01.000000+00:00'):
        # `at >= ts` then misses the row (README, Concepts).
        return (" Store a time as text, e.g. event.ts.isoformat(timespec='microseconds') "
                "(UTC, fixed width, the log's own ts text: text order is time order), "
                "or as a number, event.ts.timestamp().")
    if isinstance(value, numbers.Number):  # Decimal, Fraction, complex
        return (" Store an exact amount as an int in its smallest unit (cents) or as "
                "text, str(value).")
    return " Encode structured data with json.dumps() or split it into columns."


###############################################################################
# 5. Connection and transactions
###############################################################################


def _connect(path: str, durability: str, readonly: bool = False,
             page_size: Optional[int] = None) -> sqlite3.Connection:
    """The one place a connection is made, with the pragmas fluxlite relies on.

    ``page_size``: for a new file that SQLite's backup API will fill from
    another database; it refuses to copy into a WAL file of another page size.
    """
    if readonly:
        return _connect_readonly(path)
    _create_file(path)
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, cached_statements=256
    )
    try:
        # Switching a new file to WAL needs it to itself, and SQLite answers "locked"
        # at once rather than wait (processes creating one store together): retry.
        deadline = time.monotonic() + _PRAGMAS["busy_timeout"] / 1000
        while True:
            try:
                _apply_pragmas(conn, path, durability, page_size)
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
    except sqlite3.DatabaseError as exc:
        conn.close()
        if _is_storage_problem(exc):
            raise _storage_error(exc, path) from exc
        raise _not_a_database(path, exc, " Check the path, or choose a new file name.") from exc
    except UnicodeDecodeError as exc:  # damaged text in sqlite_master (Python 3.11+)
        conn.close()
        raise SchemaError(f"{path!r} is damaged: its schema text is not UTF-8 ({exc}).") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _sqlite_file(path: str) -> str:
    """The absolute path of the file SQLite opens for ``path``, beside which it puts
    the -wal and -shm: through a symbolic link, on POSIX, the file it leads to (its
    unix VFS resolves links; the Windows one does not)."""
    return os.path.realpath(path) if os.name == "posix" else os.path.abspath(path)


def _create_file(path: str) -> None:
    """Create a missing store file, private to its owner (0600) from the start."""
    if path in (":memory:", "") or os.path.exists(path):
        return
    # A symbolic link to a missing file: SQLite would create its target with the
    # umask's mode, and O_EXCL refuses a link, so the target is made here instead.
    path = _sqlite_file(path)
    _check_no_orphan_wal(path)
    try:
        with contextlib.suppress(FileExistsError):  # another process was first: fine
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as exc:  # a read-only directory or medium, a full disk: not a bug of the caller's
        raise StorageError(
            f"Could not create the store file {path!r}: {exc.strerror or exc}. Nothing was "
            f"written. Check that its directory is writable and has free space, then retry."
        ) from exc


def _apply_pragmas(conn: sqlite3.Connection, path: str, durability: str,
                   page_size: Optional[int]) -> None:
    for name, value in _PRAGMAS.items():
        if name == "page_size" and page_size is not None:
            value = page_size
        result = conn.execute(f"PRAGMA {name}={value}").fetchone()
        if name == "journal_mode" and result and result[0] not in ("wal", "memory"):
            raise SchemaError(
                f"Could not switch {path!r} to WAL mode (got {result[0]!r}); "
                f"fluxlite needs WAL. Is the file on a network file system?"
            )
    conn.execute(f"PRAGMA synchronous={_DURABILITY[durability]}")
    _apply_full_fsync(conn, durability)


def _apply_full_fsync(conn: sqlite3.Connection, durability: str) -> None:
    """On macOS fsync() leaves the data in the drive's cache, to be written later
    and out of order; only F_FULLFSYNC (off in SQLite by default) flushes it. So
    a commit at "full", and every checkpoint (which "normal" relies on for a
    file that stays sound), asks for it there."""
    if _DARWIN:
        conn.execute("PRAGMA checkpoint_fullfsync=ON")
        if durability == "full":
            conn.execute("PRAGMA fullfsync=ON")


def _check_no_orphan_wal(path: str) -> None:
    """Refuse to make a new file beside a -wal or -shm that is not its own: SQLite
    would take them as the new file's, apply another store's pages to it and
    share its WAL index with a store that still has them open."""
    orphans = [path + suffix for suffix in ("-wal", "-shm") if os.path.exists(path + suffix)]
    if orphans and not os.path.exists(path):  # (looked again: another process may create it)
        raise StorageError(
            f"{path!r} does not exist, but {' and '.join(map(repr, orphans))} do: the WAL "
            f"files of a store whose file was moved or deleted while it was open (or left "
            f"by a process that crashed, or by another program's read-only connection), "
            f"which SQLite would take as a new file's here. Close the store that has them "
            f"open (it saves its last commits beside the path); if no process has it "
            f"open, move them away. Then open again."
        )


def _present(path: str) -> Dict[str, bool]:
    """Which of a store file and its -wal and -shm exist (before making a new one)."""
    return {suffix: os.path.exists(path + suffix) for suffix in ("", "-wal", "-shm")}


def _remove_made(path: str, present: Dict[str, bool]) -> None:
    """Remove what a failed attempt made of a store file: only the files that were
    not there before (a -wal beside it may be another store's, still in use)."""
    for suffix, was in present.items():
        if not was:
            _remove_quietly(path + suffix)


def _empty_quietly(path: str) -> None:
    """Truncate a file that was given empty and half filled by a failed copy, so that
    the retry is not refused as "has content"; logged if it cannot be."""
    try:
        os.truncate(path, 0)
    except OSError as exc:
        _log.warning("could not empty %r: %s", path, exc)


def _empty_if_blank(path: str) -> None:
    """Empty a store file that a fork() or replay(into=) killed at once (SIGKILL, a
    power cut: no except clause ran) left made but holding no table: SQLite writes
    its header when it switches the new file to WAL, before the copy's first commit.
    Left as it is, the retry was refused as "has content" (or "not a fluxlite
    store"); emptied, it is the empty file the retry accepts. Only when closing the
    look left no -wal: another connection still open on it (a copy being made into
    it now) keeps its -wal, and the file is left alone; and only a file of exactly one
    page, the header such a kill leaves."""
    if path in (":memory:", "") or not os.path.isfile(path) or os.path.getsize(path) < 512:
        return
    file, page = _sqlite_file(path), 0
    try:
        conn = sqlite3.connect(_file_uri(file, "rw"), uri=True, isolation_level=None)
    except sqlite3.Error:
        return
    try:
        # Marked by another program (as open() tells): its file, whatever it holds.
        blank = (conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
                 and conn.execute("PRAGMA user_version").fetchone()[0] == 0
                 and conn.execute("PRAGMA application_id").fetchone()[0] in (0, APPLICATION_ID))
        page = int(conn.execute("PRAGMA page_size").fetchone()[0])
    except sqlite3.Error:  # not a database, damaged, locked: not ours to empty
        blank = False
    finally:
        conn.close()
    # More than a page is damage, not a blank: a stray write that left page 1 an empty
    # schema over a file of rows (PRAGMA page_count reads 1 from that header too). Its
    # rows are still there for .recover: emptied, they were gone. Less is no header at
    # all (SQLite reads `echo > file`'s one byte as an empty database): not ours.
    if blank and not os.path.exists(file + "-wal") and os.path.getsize(file) == page:
        _empty_quietly(file)


def _remove_quietly(path: str) -> None:
    """Remove a file fluxlite made, if it can: a file missing is fine, and one that
    cannot go (on Windows, while anything holds it open) must not replace the
    error or result being returned; it is logged instead."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        _log.warning("could not remove %r: %s", path, exc)


def _file_uri(path: str, mode: str) -> str:
    """A SQLite URI for an absolute path: mode=ro cannot write, mode=rw cannot create.
    Every "/" is escaped too: "file://x/..." would name a host x (a POSIX path may
    begin with "//"); SQLite decodes the escapes after looking for one. Escaped from
    the file system's own bytes: a POSIX name that is not UTF-8 (held by Python with
    surrogate escapes) names the file it came from, instead of failing to encode."""
    return "file:" + urllib.parse.quote(os.fsencode(path), safe="") + "?mode=" + mode


def _connect_readonly(path: str) -> sqlite3.Connection:
    """A connection that cannot write (SQLite's mode=ro), for inspecting a file."""
    if path == ":memory:":
        raise UsageError("readonly=True opens an existing store file; ':memory:' is always a "
                         "new, empty store. Pass the path of a store, or leave out readonly=True.")
    if not os.path.isfile(path):
        raise UsageError(f"No such store file: {path!r}. Check the path.")
    uri = _file_uri(os.path.abspath(path), "ro")
    # On read-only media SQLite cannot make the WAL's -shm file; with no WAL
    # content to miss, the file can be read as immutable instead. Where the
    # folder says it is writable, try the usual way first: on Windows every
    # folder says so (os.access ignores permissions there).
    wal = path + "-wal"
    if (os.path.exists(wal) and os.path.getsize(wal)) or os.path.exists(path + "-shm"):
        return _reading_connection(path, uri)
    if os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        try:
            return _reading_connection(path, uri)
        except StorageError as exc:
            if any(w in str(exc.__cause__) for w in ("locked", "busy")):
                raise  # a writer has it: immutable would read around its WAL, stale
            # else the folder is not writable after all: read the file as immutable
    return _reading_connection(path, uri + "&immutable=1")


def _reading_connection(path: str, uri: str) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout={_PRAGMAS['busy_timeout']}")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        conn.close()
        if _is_storage_problem(exc):
            # Reading a WAL store writes its -shm index: on a full disk (or past a
            # file-size limit) that fails as an I/O error, not as read-only media.
            full = "" if "readonly" in str(exc) else (
                "Reading a store writes the -shm index beside it: check free disk space "
                "there (and any file-size limit, ulimit -f), then retry. ")
            raise StorageError(
                f"SQLite could not open {path!r} for reading: {exc}. {full}On read-only "
                f"media a store with an unfinished WAL cannot be read; copy the files "
                f"somewhere writable, or open it once where it is writable so the WAL is "
                f"checkpointed."
            ) from exc
        raise _not_a_database(path, exc, "") from exc
    return conn


def _not_a_database(path: str, exc: sqlite3.DatabaseError, advice: str) -> SchemaError:
    if "malformed database schema" in str(exc):
        # A SQLite file whose schema this SQLite cannot parse: most often written by a
        # newer SQLite (digit separators 1_000 came in 3.46, json_valid(x, flags) in
        # 3.45), not damage. A new file name would set a new store beside the old one.
        return SchemaError(
            f"{path!r} is a SQLite database whose schema this SQLite "
            f"({sqlite3.sqlite_version}) cannot read ({exc}). A newer SQLite may have "
            f"written SQL this one does not know (a function or syntax added since): open "
            f"it with a Python whose sqlite3 links a SQLite at least as new as the one that "
            f"made the store (python -c \"import sqlite3; print(sqlite3.sqlite_version)\"). "
            f"Else the schema is damaged: check it with PRAGMA integrity_check."
        )
    return SchemaError(
        f"{path!r} is not a SQLite database ({exc}); fluxlite stores are SQLite files.{advice}")


class _write_txn:
    """BEGIN IMMEDIATE ... COMMIT; roll back on any exception, including in COMMIT.

    Inside a transaction already open (a preview), it is a SAVEPOINT instead.
    A class rather than a generator: every dispatch enters one.
    """

    __slots__ = ("conn", "nested")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.nested = conn.in_transaction

    def __enter__(self) -> None:
        try:
            self.conn.execute("SAVEPOINT fluxlite_nested" if self.nested else "BEGIN IMMEDIATE")
        except BaseException:  # Ctrl-C raised as BEGIN returned: no __exit__ would end it,
            if not self.nested and self.conn.in_transaction:  # and the file's write lock
                self.conn.execute("ROLLBACK")                 # stayed held
            raise

    def __exit__(self, kind: Any, *exc: Any) -> None:
        conn = self.conn
        if self.nested:
            if not conn.in_transaction:  # SQLite ended it itself (SQLITE_FULL, ...)
                return
            if kind is not None:
                conn.execute("ROLLBACK TO fluxlite_nested")
            conn.execute("RELEASE fluxlite_nested")
            return
        try:
            if kind is None:
                conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if kind is not None and conn.in_transaction:
            conn.execute("ROLLBACK")


class _WalCheckpointer:
    """Checkpoints a store's WAL from a background thread (durability="normal").

    At synchronous=NORMAL a commit does not fsync, but the checkpoint SQLite
    runs inside every commit that takes the WAL past 1,000 pages does, twice:
    about a quarter of the time of single dispatches. Here a daemon thread runs
    it instead (PASSIVE: it never waits for, or blocks, readers and writers),
    on its own connection, every _CHECKPOINT_EVERY events. The store's
    connection keeps SQLite's automatic checkpoint, but at _WAL_CEILING: under
    a steady stream of commits the WAL can only restart (be reused from its
    start) after a checkpoint that nothing was committed during, so that one
    runs inline, and finds most of the WAL already copied. Not at "full":
    there the thread's fsyncs compete with each commit's and it was slower.

    The thread ends after _CHECKPOINT_IDLE seconds without commits (and closes
    its connection), so a store that is dropped without close() leaves nothing
    behind for long; the next commits start it again.
    """

    def __init__(self, file: str) -> None:
        self._file = file
        self._pending = 0
        self._wake = threading.Event()
        self._stopping = False
        self._ceiling_frames = 0  # 0 until the store's connection has its ceiling
        self._thread: Optional[threading.Thread] = None

    def committed(self, conn: sqlite3.Connection, events: int) -> None:
        """Called after each commit of the store's connection, with its lock held."""
        self._pending += events
        if self._pending < _CHECKPOINT_EVERY or self._stopping:
            return
        self._pending = 0
        if not self._ceiling_frames:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            frames = max(1000, _WAL_CEILING // page_size)
            conn.execute(f"PRAGMA wal_autocheckpoint={frames}")
            self._ceiling_frames = frames
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="fluxlite-checkpoint",
                                            daemon=True)
            self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        # mode=rw: never create a file, should the store's have gone meanwhile.
        uri = _file_uri(self._file, "rw")
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        except sqlite3.Error as exc:  # the inline checkpoint still bounds the WAL
            _log.debug("no background checkpoints for %r: %s", self._file, exc)
            return
        try:
            conn.execute("PRAGMA synchronous=NORMAL")
            _apply_full_fsync(conn, "normal")
            step_aside = False
            while self._wake.wait(_CHECKPOINT_IDLE) and not self._stopping:
                self._wake.clear()
                if step_aside:
                    # The WAL reached its ceiling: only the store's own checkpoint,
                    # inside a commit, can let it restart, and SQLite skips that one
                    # while this thread's runs. Under slow disks they kept meeting
                    # and the WAL grew past 3 times its ceiling: sit one round out.
                    step_aside = False
                    continue
                try:
                    _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    step_aside = bool(self._ceiling_frames) and frames >= self._ceiling_frames
                except sqlite3.Error as exc:
                    _log.debug("background checkpoint of %r failed: %s", self._file, exc)
        finally:
            conn.close()

    def stop_soon(self) -> None:
        """Tell the thread to end (and close its connection) without waiting: for
        a store dropped without close(), whose thread would otherwise wait out
        _CHECKPOINT_IDLE with the file open."""
        self._stopping = True
        self._wake.set()

    def stop(self, wait: Optional[float] = None) -> None:
        """Stop the thread, which closes its connection: before the store's own
        closes, so that the store's is the last and SQLite removes the WAL."""
        self.stop_soon()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(wait)


def _sync_directory(file: str) -> None:
    """fsync the directory holding ``file`` (best effort: POSIX only, where a
    directory opens; an error leaves the removal as durable as it was)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(os.path.dirname(os.path.abspath(file)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _close_last(file: str) -> None:
    """Open and close ``file`` once through a connection that can write. SQLite copies
    the WAL into the file, and removes the -wal and -shm, only when the file's last
    connection (in any process) closes, and only if that one can write: a mode=ro
    connection closing last leaves them, with any commits not yet copied. Never
    waits: if another connection still has the file, that one closes last."""
    with contextlib.suppress(OSError, sqlite3.Error):
        conn = sqlite3.connect(_file_uri(file, "rw"), uri=True, timeout=0,
                               isolation_level=None)
        try:
            _apply_full_fsync(conn, "normal")  # (macOS: the checkpoint's own fsyncs)
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        finally:
            conn.close()


@contextlib.contextmanager
def _short_wait(conn: sqlite3.Connection, ms: int = 100) -> Iterator[None]:
    """busy_timeout 0.1 s (or ``ms``), for tidying that must not hold up its caller
    when other processes are busy with the file (it is simply left for later then)."""
    conn.execute(f"PRAGMA busy_timeout = {ms}")
    try:
        yield
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.execute(f"PRAGMA busy_timeout = {_PRAGMAS['busy_timeout']}")


def _empty_wal(conn: sqlite3.Connection, path: str, wait_ms: int = 100) -> None:
    """Checkpoint the WAL into the file and truncate it, unless other connections
    are busy with it (then journal_size_limit trims it at its next restart).
    While it waits it holds the WAL's write lock: every writer waits too."""
    try:
        with _short_wait(conn, wait_ms):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    except sqlite3.Error as exc:
        _log.debug("the WAL of %r was not truncated: %s", path, exc)


@contextlib.contextmanager
def _read_txn(conn: sqlite3.Connection) -> Iterator[None]:
    """One consistent snapshot for several reads (a no-op inside a transaction)."""
    if conn.in_transaction:
        yield
        return
    try:  # BEGIN inside: a Ctrl-C raised as it returned left the snapshot open, and
        conn.execute("BEGIN")  # the store refused every later dispatch as inside a read
        yield
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def _storage_error(exc: sqlite3.Error, path: str) -> FluxliteError:
    """A SQLite failure below fluxlite's rules, as a FluxliteError saying what to do."""
    text = str(exc)
    missing = _missing_function_error(exc, f"Writing {path!r}", " Nothing was written.")
    if missing is not None:
        return missing
    if "no such table" in text:
        return SchemaError(
            f"{path!r} lacks a table the read model needs ({text}): the schema references "
            f"a table it does not create, which only the file that has it can check. "
            f"Nothing was written."
        )
    if "locked" in text or "busy" in text:
        return Busy(
            f"{path!r} stayed locked by another writer for longer than busy_timeout "
            f"({_PRAGMAS['busy_timeout']} ms): {text}. Nothing was written; retry "
            f"(retry a dispatch with the same id, so that it can never apply twice)."
        )
    return StorageError(
        f"SQLite could not write {path!r}: {text}. Nothing was written. Check free disk "
        f"space and that the file and its directory are writable, then retry."
    )


def _is_damage(exc: sqlite3.Error) -> bool:
    """A malformed file, or text in it that is not UTF-8: damage, not a mistake."""
    text = str(exc)
    return "malformed" in text or "decode" in text or "not a database" in text


def _is_storage_problem(exc: sqlite3.Error) -> bool:
    """Locks, full disks, read-only files: not a malformed file."""
    text = str(exc)
    return any(s in text for s in ("locked", "busy", "full", "readonly", "read-only",
                                    "unable to open", "disk I/O"))


###############################################################################
# 6. Schema: checking the user's DDL, reading table shapes
###############################################################################


class _TableInfo:
    """A read-model table's shape, read from SQLite, with its SQL prepared."""

    __slots__ = ("name", "columns", "column_set", "pk", "pk_set", "pk_types", "rowid_key", "q",
                 "where_key", "select_key", "delete_key", "count_sql", "order_by", "_insert_sql",
                 "writable", "writable_columns", "exact_types", "defaults", "one_statement_upsert",
                 "quiet_inserts", "quiet_upserts")

    def __init__(self, name: str, columns: Sequence[str], pk: Sequence[str],
                 rowid_key: bool, pk_types: Sequence[str] = (),
                 writable: Optional[Sequence[str]] = None,
                 exact_types: Optional[Mapping[str, Tuple[type, ...]]] = None,
                 defaults: Optional[Mapping[str, Any]] = None,
                 one_statement_upsert: bool = False) -> None:
        self.name = name
        # Whether a whole-row upsert may replay as one INSERT .. ON CONFLICT DO
        # UPDATE: not with CHECKs or references, which SQLite tests on the row it
        # would insert, with the key as the change spells it (1.0 for 1).
        self.one_statement_upsert = one_statement_upsert
        self.writable = frozenset(columns if writable is None else writable)
        self.writable_columns = tuple(c for c in columns if c in self.writable)
        # Per column, the Python types SQLite stores unchanged (its affinity),
        # and the constant defaults: with both, an insert's stored row is known
        # without asking SQLite for it back (see _Model._stored_row).
        self.exact_types = dict(exact_types or {})
        self.defaults = dict(defaults or {})
        self.pk_types = tuple(pk_types) or ("",) * len(pk)
        self.columns = tuple(columns)
        self.column_set = frozenset(columns)
        self.pk = tuple(pk)
        self.pk_set = frozenset(pk)
        self.rowid_key = rowid_key  # INTEGER PRIMARY KEY: SQLite may assign it
        self.q = _quote(name)
        self.where_key = " AND ".join(f"{_quote(c)} = ?" for c in pk)
        self.select_key = f"SELECT * FROM {self.q} WHERE {self.where_key}"
        self.delete_key = f"DELETE FROM {self.q} WHERE {self.where_key}"
        self.count_sql = f"SELECT count(*) FROM {self.q}"
        self.order_by = ", ".join(_quote(c) for c in pk)
        self._insert_sql: Dict[Tuple[Any, ...], str] = {}
        # Column tuples of inserts that pass check_columns and hold the one-column
        # key, with their SQL: see _Model._inserted.
        self.quiet_inserts: Dict[Tuple[str, ...], str] = {}
        # Likewise for upserts, with the columns besides the key: see _Model._upserted.
        self.quiet_upserts: Dict[Tuple[str, ...], Tuple[str, ...]] = {}

    # The cache holds an insert's SQL under its columns, the others under (kind,
    # columns): ("update",) + columns was an insert's key too, of the columns
    # "update", *columns (a column may be named so), and ran that INSERT for an update.
    def update_sql(self, columns: Tuple[str, ...]) -> str:
        key = ("update", columns)
        sql = self._insert_sql.get(key)
        if sql is None:
            sets = ", ".join(f"{_quote(c)} = ?" for c in columns)
            sql = f"UPDATE {self.q} SET {sets} WHERE {self.where_key}"
            self._insert_sql[key] = sql
        return sql

    def insert_sql(self, columns: Tuple[str, ...]) -> str:
        sql = self._insert_sql.get(columns)
        if sql is None:
            names = ", ".join(_quote(c) for c in columns)
            marks = ", ".join("?" for _ in columns)
            sql = (f"INSERT INTO {self.q} ({names}) VALUES ({marks})" if columns else
                   f"INSERT INTO {self.q} DEFAULT VALUES")  # a row of defaults, a new rowid
            self._insert_sql[columns] = sql
        return sql

    def non_key(self, columns: Tuple[str, ...]) -> Tuple[str, ...]:
        """The columns an upsert of these columns sets besides the (one-column) key."""
        return tuple(c for c in columns if c != self.pk[0])

    def upsert_sql(self, columns: Tuple[str, ...]) -> str:
        """One statement that inserts the row or updates it by key (replay's upsert)."""
        key = ("upsert", columns)
        sql = self._insert_sql.get(key)
        if sql is None:
            sets = ", ".join(f"{_quote(c)} = excluded.{_quote(c)}" for c in columns
                             if c not in self.pk)
            sql = (f"{self.insert_sql(columns)} ON CONFLICT ({self.order_by}) "
                   + (f"DO UPDATE SET {sets}" if sets else "DO NOTHING"))
            self._insert_sql[key] = sql
        return sql

    def key_of(self, row: Mapping[str, Any]) -> Any:
        if len(self.pk) == 1:
            return row[self.pk[0]]
        return tuple(row[c] for c in self.pk)

    def key_params(self, key: Any, error: Callable[[str], FluxliteError] = ChangesetError
                   ) -> Tuple[Any, ...]:
        """The key as bind parameters, or ``error`` if its shape is wrong (a
        ChangesetError in a change, a UsageError in a read)."""
        if len(self.pk) == 1:
            if isinstance(key, tuple) and len(key) == 1:
                key = key[0]
            if isinstance(key, (tuple, dict, set)) or key is None:
                raise error(
                    f"Table {self.name!r} has the one-column primary key "
                    f"({self.pk[0]}); a key is a single value, received {_describe(key)}."
                )
            _check_value(key, self.name, self.pk[0], error)
            return (key,)
        if not isinstance(key, tuple) or len(key) != len(self.pk):
            raise error(
                f"Table {self.name!r} has the composite primary key "
                f"({', '.join(self.pk)}); a key is a tuple of {len(self.pk)} values "
                f"in that order, received {_describe(key)}."
            )
        for column, part in zip(self.pk, key):
            if part is None:
                raise error(
                    f"Table {self.name!r}: key {key!r} has a None for {column!r}; every "
                    f"part of a primary key must have a value (SQL's NULL never equals "
                    f"itself, so the row could never be found again)."
                )
            _check_value(part, self.name, column, error)
        return key


def _table_infos(conn: sqlite3.Connection, names: Iterable[str]) -> Dict[str, _TableInfo]:
    """_read_table_info of each table, with sqlite_master read once: a lookup of one
    name in it reads it all, which made open() and at() quadratic in the tables
    (3,000 tables: 2 s of lookups in open(), 6 s in at())."""
    sql_of = dict(conn.execute(
        "SELECT name, CAST(sql AS BLOB) FROM sqlite_master WHERE type = 'table'"))
    return {n: _read_table_info(conn, n, _utf8(sql_of.get(n))) for n in names}


def _utf8(data: Optional[bytes]) -> Optional[str]:
    """Text read as bytes, or None if it is not UTF-8 (damage, which reading it as
    text reports: only the tables asked for are read so)."""
    try:
        return None if data is None else data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_table_info(conn: sqlite3.Connection, name: str,
                     sql: Optional[str] = None) -> _TableInfo:
    """What fluxlite needs to know of a table; ``sql``, its CREATE TABLE statement
    if the caller has it (else it is looked up)."""
    # table_xinfo also lists generated columns (hidden 2 or 3): SELECT * has them.
    rows = [r for r in conn.execute(f"PRAGMA table_xinfo({_quote(name)})") if r[6] != 1]
    columns = [r[1] for r in rows]
    pk_rows = sorted((r for r in rows if r[5]), key=lambda r: r[5])
    pk = [r[1] for r in pk_rows]
    rowid_key = len(pk_rows) == 1 and pk_rows[0][2].upper() == "INTEGER" and not any(
        index[3] == "pk" for index in conn.execute(f"PRAGMA index_list({_quote(name)})"))
    exact, defaults = {}, {}
    if all(r[6] == 0 for r in rows):  # generated columns: always read the row back
        for r in rows:
            exact[r[1]] = _exact_types(r[2])
            default = _constant_default(conn, r[4])
            negative_zero = type(default) is float and default == 0 and \
                math.copysign(1.0, default) < 0  # stored as 0.0: read the row back
            if default is not _MISSING and (default is None or type(default) in exact[r[1]]) \
                    and not negative_zero:
                defaults[r[1]] = default
        if rowid_key:
            defaults.pop(pk[0], None)  # SQLite assigns it: read the row back
    # In a STRICT table, ANY keeps each value as given (no affinity), which is
    # what an empty declared type means elsewhere.
    strict_any = any(r[2].upper() == "ANY" for r in pk_rows) and _is_strict(conn, name)
    if sql is None:
        row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?",
                           (name,)).fetchone()
        sql = row and row[0]
    # One INSERT .. ON CONFLICT DO UPDATE for a whole-row upsert in a replay, only
    # where it stores what the live insert-or-update does: no CHECK or reference
    # (judged on the key as the change spells it), and no generated column (with
    # one, SQLite 3.40's DO UPDATE gives a later column a wrong affinity: an
    # integer stored as a REAL, found by the fuzzer).
    plain = _HAS_UPSERT and sql is not None and all(r[6] == 0 for r in rows) and \
        "CHECK" not in (t.upper() for t in _sql_code(sql, literals=False)) and \
        conn.execute(f"PRAGMA foreign_key_list({_quote(name)})").fetchone() is None
    return _TableInfo(name, columns, pk, rowid_key,
                      ["" if strict_any and r[2].upper() == "ANY" else r[2] for r in pk_rows],
                      writable=[r[1] for r in rows if r[6] == 0], exact_types=exact,
                      defaults=defaults, one_statement_upsert=plain)


def _is_strict(conn: sqlite3.Connection, name: str) -> bool:
    try:  # PRAGMA table_list: SQLite 3.37+, as are STRICT tables
        row = conn.execute(f"PRAGMA table_list({_quote(name)})").fetchone()
    except sqlite3.Error:
        return False
    return bool(row and row[5])


def _exact_types(declared: str) -> Tuple[type, ...]:
    """The types a column of this declared type stores unchanged (SQLite's affinity rules)."""
    kind = declared.upper()
    if "INT" in kind:
        return (int,)
    if any(t in kind for t in ("CHAR", "CLOB", "TEXT")):
        return (str,)
    if "BLOB" in kind or not kind:
        return (str, int, float)
    if any(t in kind for t in ("REAL", "FLOA", "DOUB")):
        return (float,)
    return (int,)  # NUMERIC


_LITERAL = re.compile(r"^(NULL|[-+]?\d+(\.\d+)?([eE][-+]?\d+)?|'([^']|'')*')$", re.IGNORECASE)


def _constant_default(conn: sqlite3.Connection, text: Optional[str]) -> Any:
    """A column default that is a literal, evaluated; _MISSING for an expression."""
    if text is None:
        return None
    if not _LITERAL.match(text.strip()):
        return _MISSING
    return conn.execute(f"SELECT {text}").fetchone()[0]


def _affinity(declared: str) -> str:
    """The column affinity SQLite gives a declared type (its five rules, in order)."""
    kind = declared.upper()
    if "INT" in kind:
        return "integer"
    if any(t in kind for t in ("CHAR", "CLOB", "TEXT")):
        return "text"
    if "BLOB" in kind or not kind:
        return "blob"
    return "real" if any(t in kind for t in ("REAL", "FLOA", "DOUB")) else "numeric"


class _AffinityScratch:
    """_as_stored's private in-memory database: one per process, kept open (opening
    one costs more than history()'s query), shared by threads under a lock. Not
    one per thread: a thread's own would be left unclosed when the thread ends."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conn: Optional[sqlite3.Connection] = None

    def connection(self) -> sqlite3.Connection:  # with the lock held
        if self.conn is None:
            self.conn = sqlite3.connect(":memory:", isolation_level=None,
                                        check_same_thread=False)
            self.conn.execute("CREATE TABLE a (integer INTEGER, text TEXT, blob BLOB, "
                              "real REAL, numeric NUMERIC)")
        return self.conn


_affinity_scratch = _AffinityScratch()


def _new_affinity_scratch() -> None:
    global _affinity_scratch
    _affinity_scratch = _AffinityScratch()


if hasattr(os, "register_at_fork"):  # a fork's child gets its own: the lock may be held
    os.register_at_fork(after_in_child=_new_affinity_scratch)


def _as_stored(values: Sequence[Any], declared: Sequence[str]) -> Tuple[Any, ...]:
    """Values as SQLite stores them in columns of these declared types.

    Keys in the journal are kept as stored; a caller may write 1 for the text
    key '1', as SQL lookups allow. SQLite itself applies the affinity, in a
    scratch table on a private in-memory database: Python's int() and float()
    read text SQLite does not ('INF', '1_000', non-ASCII digits).
    """
    scratch = _affinity_scratch
    if scratch.lock.acquire(blocking=False):
        try:
            return _stored_in(scratch.connection(), values, declared)
        finally:
            scratch.lock.release()
    spare = _AffinityScratch()  # in use by another thread, or by this one (a signal
    try:                        # handler): never wait for it
        return _stored_in(spare.connection(), values, declared)
    finally:
        spare.connection().close()


def _stored_in(conn: sqlite3.Connection, values: Sequence[Any], declared: Sequence[str]
               ) -> Tuple[Any, ...]:
    stored = []
    for value, kind in zip(values, declared):
        column = _affinity(kind)  # one of the five fixed column names above
        try:
            conn.execute(f"INSERT INTO a ({column}) VALUES (?)", (value,))
            stored.append(conn.execute(f"SELECT {column} FROM a").fetchone()[0])
        finally:
            conn.execute("DELETE FROM a")
    return tuple(stored)


# Column defaults a replay would not repeat (the time, random values, counters, and
# the SQLite a replay on another machine or Python runs: sqlite_version()).
_NONDETERMINISTIC = re.compile(
    r"\bCURRENT_(TIME|DATE|TIMESTAMP)\b|\b(random|randomblob|changes|total_changes|"
    r"last_insert_rowid|sqlite_version|sqlite_source_id|sqlite_compileoption_get|"
    r"sqlite_compileoption_used)\s*\(", re.IGNORECASE)
_DATE_FUNCTION = re.compile(r"\b(date|time|datetime|julianday|strftime|unixepoch|timediff)\s*\(",
                            re.IGNORECASE)


def _nondeterministic(default: str) -> bool:
    """A default that may differ on each run. Every date function counts: with no
    time value (date(), strftime('%s')) or with 'now' it reads the clock."""
    code = "".join(_sql_code(default, literals=False, names="calls"))  # 'CURRENT_TIMESTAMP' is text
    return bool(_NONDETERMINISTIC.search(code) or _DATE_FUNCTION.search(code))


# SQLite's words when a schema statement creates a name fluxlite or SQLite holds.
_TAKEN_NAME = re.compile(r"^table (\S+) already exists$|"
                         r"^object name reserved for internal use: (\S+)$")


def _reserved_table(name: str) -> SchemaError:
    return SchemaError(
        f"Table name {name!r} is reserved: `events` is fluxlite's log and "
        f"`fluxlite_*` / `sqlite_*` belong to fluxlite and SQLite. Rename the table."
    )


def _check_new_table(conn: sqlite3.Connection, name: str, sql: str, new: bool = True) -> None:
    """The rules a read-model table must follow, so the journal sees every write.

    ``new=False`` for a schema a store already has (a copy for at() or a replay):
    the rules added since it was accepted (per-run defaults, ON CONFLICT ROLLBACK)
    do not lock an older store out of its own past.
    """
    if _RESERVED_TABLE.match(name):
        raise _reserved_table(name)
    info = _read_table_info(conn, name, sql)
    if not info.pk:
        raise SchemaError(
            f"Table {name!r} has no primary key; every read-model table needs one "
            f"so changes can name rows. Add PRIMARY KEY to a column or a "
            f"PRIMARY KEY (a, b) clause."
        )
    if new and len(info.pk) >= _expr_depth_limit(conn):
        # A row is found by "k1 = ? AND k2 = ? ...": one level of SQLite's expression
        # tree per part. Inserts worked; every update, delete, get() and history()
        # failed ("Expression tree is too large"), reported as a disk error.
        raise SchemaError(
            f"Table {name!r} has a primary key of {len(info.pk)} columns; SQLite finds a "
            f"row by a condition on each, and refuses conditions of "
            f"{_expr_depth_limit(conn)} or more. Key the table by fewer columns (an "
            f"id the reducer makes from them, such as a JSON text of them)."
        )
    for fk in conn.execute(f"PRAGMA foreign_key_list({_quote(name)})"):
        on_update, on_delete = fk[5].upper(), fk[6].upper()
        if on_update not in ("NO ACTION", "RESTRICT") or on_delete not in ("NO ACTION", "RESTRICT"):
            raise SchemaError(
                f"Table {name!r} has a foreign key with ON UPDATE {on_update} / "
                f"ON DELETE {on_delete}; cascading actions write rows behind the "
                f"reducers' back. Use NO ACTION or RESTRICT and return the "
                f"dependent changes from the reducer."
            )
    for column in conn.execute(f"PRAGMA table_xinfo({_quote(name)})") if new else ():
        if column[4] is not None and _nondeterministic(column[4]):
            raise SchemaError(
                f"Column {name}.{column[1]} has DEFAULT {column[4]}, which gives another "
                f"value each time it runs (or under another SQLite): a replay would not "
                f"give the live rows. Drop "
                f"the default and set the value in the reducer (from event.ts for a time)."
            )
    if new and _key_clause_collates(sql) and _key_collates_apart(conn, name, sql):
        raise SchemaError(
            f"Table {name!r} has a COLLATE inside its PRIMARY KEY (...) clause other than "
            f"its column's: the key's "
            f"index then compares keys unlike the column, which lookups by key use, so a "
            f"key found live (an update, an upsert) can make a new row in a replay "
            f"(verify(), rebuild()). Put the COLLATE on the column instead "
            f"(k TEXT COLLATE NOCASE, ..., PRIMARY KEY (k))."
        )
    for check in _check_clauses(sql) if new else ():
        found = _NONDETERMINISTIC.search(check)
        if found:  # SQLite refuses these in generated columns and indexes, not in a CHECK
            raise SchemaError(
                f"Table {name!r} has a CHECK that uses {found.group(0).rstrip('( ')}, which "
                f"gives another value each time it runs (or under another SQLite): the "
                f"live store would accept rows that a replay (verify(), rebuild(), a new "
                f"version) or at() later refuses. Check against a value the reducer sets "
                f"(a time from event.ts), or enforce the rule in the reducer (raise Rejected)."
            )
    code = "".join(_sql_code(sql, literals=False))
    clause = re.search(r"\bON\s+CONFLICT\s+(REPLACE|IGNORE|ROLLBACK)\b", code, re.IGNORECASE)
    if clause and (new or clause.group(1).upper() != "ROLLBACK"):
        raise SchemaError(
            f"Table {name!r} uses ON CONFLICT {clause.group(1).upper()}, which silently "
            f"drops or deletes rows, or ends the whole transaction; remove the clause "
            f"and let constraint errors surface."
        )


def _key_clause_collates(sql: str) -> bool:
    """Whether a table constraint PRIMARY KEY (...) names a COLLATE for a column (the
    column constraint form, k PRIMARY KEY COLLATE X, is the column's own collation)."""
    tokens = [t.upper() for t in _sql_code(sql, literals=False) if t != " "]
    for i in range(len(tokens) - 2):
        if tokens[i:i + 3] == ["PRIMARY", "KEY", "("]:
            end = tokens.index(")", i)  # the clause holds names, no parentheses
            if "COLLATE" in tokens[i + 3:end]:
                return True
    return False


def _key_collates_apart(conn: sqlite3.Connection, name: str, sql: str) -> bool:
    """Whether the key's index compares a key column under another collation than the
    column's own. The same one named twice (k TEXT COLLATE NOCASE, PRIMARY KEY (k
    COLLATE NOCASE)) is harmless: a lookup by key and the index then agree."""
    index = [r[1] for r in conn.execute(f"PRAGMA index_list({_quote(name)})") if r[3] == "pk"]
    if not index:  # an INTEGER PRIMARY KEY: the rowid, compared as a number
        return False
    keyed = [(r[2], r[4]) for r in conn.execute(f"PRAGMA index_xinfo({_quote(index[0])})")
             if r[5]]
    # The columns' own collations, as SQLite gives an index that names none: the
    # table made again in an empty in-memory database (the file is left alone).
    probe = sqlite3.connect(":memory:")
    try:
        probe.execute(sql)
        probe.execute(f"CREATE INDEX fluxlite_probe ON {_quote(name)} "
                      f"({', '.join(_quote(c) for c, _ in keyed)})")
        own = [r[4] for r in probe.execute("PRAGMA index_xinfo(fluxlite_probe)") if r[5]]
    except sqlite3.Error:  # cannot be made apart from the file: judge by the clause
        return True
    finally:
        probe.close()
    return [c.upper() for _, c in keyed] != [c.upper() for c in own]


def _check_clauses(sql: str) -> List[str]:
    """The code of each CHECK constraint of a CREATE TABLE (literals blanked), the
    parenthesised expression after each CHECK keyword (a name cannot be CHECK unquoted)."""
    tokens = _sql_code(sql, literals=False, names="calls")
    clauses, i = [], 0
    while i < len(tokens):
        if tokens[i].upper() == "CHECK":
            start = end = i + 1
            depth = 0
            while end < len(tokens):
                depth += (tokens[end] == "(") - (tokens[end] == ")")
                if depth == 0 and tokens[end] != " ":
                    break
                end += 1
            clauses.append("".join(tokens[start:end + 1]))
            i = end
        i += 1
    return clauses


def _check_schema_text(schema: Any, new: bool = True) -> None:
    """``new=False``: a schema a store already has (see _check_new_table)."""
    if not isinstance(schema, str):
        raise SchemaError(
            f"schema must be SQL text (CREATE TABLE / CREATE INDEX statements); "
            f"received {_describe(schema)}. Join a list of statements with ';'."
        )
    _check_text(schema, "The schema", SchemaError)  # else each Python has its own error
    # sqlite3 refuses SQL holding a NUL with a bare ValueError, once a file is made.
    # (One in a comment after the last statement never reached SQLite, so a store
    # may have it: new=False lets such a store read its own past, and open() with it.)
    if "\x00" in schema and (new or not _nul_never_run(schema)):
        at = schema.index("\x00")
        raise SchemaError(
            f"The schema holds a NUL character (\\x00) at character {at}, near "
            f"{schema[max(0, at - 40):at + 40]!r}; SQL text cannot contain one. Remove it "
            f"(SQL spells a NUL in a value as char(0))."
        )


def _nul_never_run(schema: str) -> bool:
    """Whether each NUL in the schema is in text _split_sql drops (a comment after the
    last statement), which SQLite never reads."""
    return _split_sql(schema.replace("\x00", " ")) == _split_sql(schema.replace("\x00", "!"))


def _temp_objects(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM temp.sqlite_master").fetchone()[0])


# What an older SQLite says of SQL a later one added: STRICT (3.37), concat_ws()
# (3.44), jsonb() (3.45), 1_000 (3.46).
_NEWER_SQL_ERRORS = ("syntax error", "unknown table option", "no such function",
                     "unrecognized token")


def _newer_syntax_hint(exc: BaseException) -> str:
    # The same DDL can be valid where it was written and an error on the older
    # SQLite of another machine (Debian 11's 3.34, say): name this one. Said as an
    # if: the same errors come of a plain typo, on the newest SQLite too.
    if not any(fragment in str(exc) for fragment in _NEWER_SQL_ERRORS):
        return ""
    return (f" This Python's SQLite is {sqlite3.sqlite_version}: if the statement is "
            f"valid where it was written, it may use SQL a later SQLite added (STRICT "
            f"tables came in 3.37, for one).")


# SQLite says "no such function: f" when it prepares a statement that calls f, and
# "unknown function: f()" when a stored schema's expression (a generated column, a
# CHECK, an index) first needs it; a table-valued JSON function is "no such table".
_MISSING_FUNCTION = re.compile(r"no such function: (\w+)|unknown function: (\w+)\(\)|"
                               r"no such table: (?:main\.)?(jsonb?_(?:each|tree))\b")


@functools.lru_cache(maxsize=None)
def _sqlite_has_json() -> bool:
    """Whether this SQLite has the JSON functions (built in since 3.38, unless a
    build leaves them out with SQLITE_OMIT_JSON; an optional extension before)."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("SELECT json('1')")
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()
    return True


def _no_json_hint(exc: BaseException) -> str:
    """A sentence saying that this SQLite lacks the JSON function ``exc`` names."""
    found = _MISSING_FUNCTION.search(str(exc))
    name = next(n for n in found.groups() if n) if found else ""
    if not name.lower().startswith("json") or _sqlite_has_json():
        return ""
    return (f" This Python's SQLite ({sqlite3.sqlite_version}) was built without the "
            f"JSON functions ({name}() among them: built in since SQLite 3.38 unless "
            f"left out with SQLITE_OMIT_JSON, an optional extension before). Run on a "
            f"SQLite that has them, or do the JSON work in Python (in the reducer, or "
            f"on the rows read).")


def _missing_function_hint(exc: BaseException) -> str:
    """A sentence naming why a function is missing: a SQLite without the JSON
    functions, or one older than the SQLite the schema or SQL was written on."""
    found = _MISSING_FUNCTION.search(str(exc))
    if found is None:
        return ""
    name = next(n for n in found.groups() if n)
    return _no_json_hint(exc) or (
        f" This Python's SQLite ({sqlite3.sqlite_version}) has no {name}(): check its "
        f"spelling; a function a later SQLite added (the jsonb_ ones came in 3.45, for "
        f"one), or one this build leaves out, needs a SQLite that has it.")


def _missing_function_error(exc: BaseException, what: str,
                            after: str = "") -> Optional[SchemaError]:
    """The schema calls a function this SQLite lacks (written where SQLite had it):
    every write, or read, of the tables that call it fails the same way."""
    hint = _missing_function_hint(exc)
    if not hint or "no such table" in str(exc):
        return None
    return SchemaError(
        f"{what} failed: the read model's schema calls a function this SQLite lacks "
        f"({exc}), in a generated column, a CHECK or an index.{after}{hint}"
    )


def _create_schema(conn: sqlite3.Connection, schema: str, new: bool = True) -> List[str]:
    """Run the user's DDL (inside the caller's transaction); return the new tables.
    ``new``: a schema not yet accepted by a store (see _check_new_table)."""
    _check_schema_text(schema, new)
    statements = _schema_statements(schema)
    if not statements:
        raise SchemaError(
            "schema is empty; give at least one CREATE TABLE statement for the read model."
        )
    before = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    temporary = _temp_objects(conn)
    for number, statement in enumerate(statements, 1):
        if not _ALLOWED_DDL.match(_strip_leading_comments(statement)):
            raise SchemaError(
                f"Schema statement {number} is not CREATE TABLE or CREATE INDEX: "
                f"{statement[:120]!r}. The read-model schema may only create tables "
                f"and indexes (no triggers, views or temporary tables)."
            )
        try:
            conn.execute(statement)
        except (sqlite3.Error, UnicodeEncodeError) as exc:
            taken = _TAKEN_NAME.search(str(exc))
            name = taken and (taken.group(1) or taken.group(2)).strip('"`[]')
            if name and _RESERVED_TABLE.match(name):
                raise _reserved_table(name) from None
            raise SchemaError(
                f"Schema statement {number} failed: {exc}. Statement: "
                f"{statement[:200]!r}. Note `events`, `fluxlite_*` and `sqlite_*` "
                f"are reserved table names.{_no_json_hint(exc) or _newer_syntax_hint(exc)}"
            ) from exc
        if _temp_objects(conn) != temporary:
            # CREATE TABLE temp.x: not in the file, gone on close; and a temp table
            # named as a model table shadows it, so every write went there.
            raise SchemaError(
                f"Schema statement {number} creates a temporary table or index: "
                f"{statement[:200]!r}. The read model lives in the store's file: "
                f"drop the 'temp.' (or 'temporary') qualifier."
            )
    tables = []
    for name, sql in conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' ORDER BY name"
    ).fetchall():
        if name not in before and not name.startswith("sqlite_"):  # sqlite_sequence: AUTOINCREMENT
            _check_new_table(conn, name, sql, new)
            tables.append(name)
    if not tables:
        raise SchemaError("schema creates no table; the read model needs at least one.")
    for name, table in conn.execute(
            "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index'").fetchall():
        if name not in before and _RESERVED_TABLE.match(table):
            # The schema is the read model's: a replay (verify, rebuild, a new
            # version) makes it where the log is not, and would fail for ever.
            raise SchemaError(
                f"Schema index {name!r} is on {table!r}, which is fluxlite's (or SQLite's), "
                f"not a read-model table: the schema may only index its own tables. "
                f"Remove the index from the schema."
            )
    for name in tables if new else ():
        try:  # a reference SQLite cannot follow fails every write to the table: say so now
            conn.execute(f"PRAGMA foreign_key_check({_quote(name)})").fetchone()
        except sqlite3.OperationalError as exc:
            raise SchemaError(
                f"Table {name!r} has a reference SQLite cannot check ({exc}): a reference "
                f"must name the referenced table's primary key or a UNIQUE column."
            ) from None
    return tables


_EVENT_COLUMNS = "seq, id, type, payload, meta, ts"

###############################################################################
# 7. The read model: applying changesets, the journal, reads
###############################################################################


def _normalize_changes(out: Any, event: Event) -> List[Change]:
    if out is None:
        return []
    if isinstance(out, Change):
        return [out]
    if isinstance(out, (list, tuple)):
        for item in out:
            if not isinstance(item, Change):
                raise ChangesetError(
                    f"Reducer for {_quoted(event.type)} returned a list holding "
                    f"{_describe(item)}; every item must be a Change (build them "
                    f"with view.<table>.insert/update/upsert/delete)."
                )
        return list(out)
    raise ChangesetError(
        f"Reducer for {_quoted(event.type)} returned {_describe(out)}; a reducer returns "
        f"None, a Change, or a list of Changes."
    )


def _let_signals_in(raised: List[BaseException]) -> Iterator[int]:
    """SQLite's progress handler while query() runs in the main thread (its
    __next__, once started).

    sqlite3 runs a statement without the GIL, so Python runs no signal handler
    until it ends: Ctrl-C could not stop a query that runs for hours (a
    recursive CTE without a LIMIT), nor the lock it holds. Calling back into
    Python lets the handler run; an exception it raises aborts the statement,
    and is kept in ``raised`` for query() to raise as it was: sqlite3 drops a
    progress handler's exception, and a handler's own (SystemExit from a SIGTERM
    handler, a timeout from a SIGALRM one) is no KeyboardInterrupt. A generator,
    because a handler runs where Python resumes a frame: a function's would run
    before its try (uncaught), a generator's right after its yield (inside it).
    """
    while True:
        try:
            while True:
                yield 0
        except GeneratorExit:  # closed when collected: not a signal's
            return
        except BaseException as exc:
            raised.append(exc)
            yield 1  # abort the statement: SQLite's "interrupted"


_Entry = TypeVar("_Entry")


def _keyed_values(info: _TableInfo, change: Change, known: Dict[Tuple[str, ...], _Entry],
                  make: Callable[[_TableInfo, Tuple[str, ...]], _Entry]
                  ) -> Optional[Tuple[_Entry, Any]]:
    """(entry, key) for the usual change of _Model._inserted and _upserted: values in a
    dict holding the table's one-column key, in columns check_columns passes (``known``
    keeps ``make(info, columns)`` for each such column tuple, so the test runs once), each
    value checked as _checked checks it. None for any other change, nothing checked:
    _checked takes it, and says what is wrong."""
    values = change.values
    if change.key is not None or values is None or values.__class__ is not dict:
        return None
    columns = tuple(values)
    entry = known.get(columns)
    if entry is None:  # check_columns' test, and _checked's usual case
        if not (values.keys() <= info.writable and len(info.pk) == 1
                and info.pk[0] in values):
            return None
        entry = known[columns] = make(info, columns)
    key = values[info.pk[0]]
    if key is None:
        return None
    table = info.name
    for column, value in values.items():
        if value.__class__ is not str and value is not None:  # (those pass at once)
            _check_value(value, table, column)
    return entry, key


class _Model:
    """The read model on one connection: checked writes with a journal, and reads.

    This is the only code that writes read-model rows, so it is the layer a
    second backend would replace.
    """

    def __init__(self, conn: sqlite3.Connection, tables: Mapping[str, _TableInfo],
                 lock: threading.RLock) -> None:
        self.conn = conn
        # The usual insert's statement runs on this one cursor, as Store._cursor's do:
        # conn.execute() makes and frees a cursor per row. An INSERT returns no row,
        # so the cursor never keeps a statement open.
        self.cursor = conn.cursor()
        self.tables = dict(tables)
        self.lock = lock
        self.query_mode = 0  # 0 internal, 1 read-only query, 2 reducer's query
        self.autoincrement: Dict[str, bool] = {}  # by table, looked up on its first keyless insert
        conn.set_authorizer(self._authorize)

    # -- reads ---------------------------------------------------------------

    def table(self, name: str, error: type = ChangesetError) -> _TableInfo:
        info = self.tables.get(name) if isinstance(name, str) else None
        if info is None:
            known = ", ".join(sorted(self.tables)) or "none"
            if not isinstance(name, str):
                raise error(f"A table name is a str, one of: {known}; received "
                            f"{_describe(name)}.")
            raise error(
                f"Unknown table {_quoted(name)}; the read model has: {known}. Table names "
                f"are case-sensitive and must match the schema."
            )
        return info

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> List[Dict[str, Any]]:
        with self.lock:
            try:
                cursor = self.conn.execute(sql, params)
                try:  # closed also on a failed row: see query(). (Not contextlib.closing:
                    # that object and its two calls were a tenth of a get().)
                    names = [d[0] for d in cursor.description]
                    return [dict(zip(names, row)) for row in cursor]
                finally:
                    cursor.close()
            except UnicodeEncodeError:
                raise UsageError(
                    f"A value looked up in the read model is not valid Unicode text (a "
                    f"lone surrogate): {_describe(params)}. Look up text that encodes as UTF-8."
                ) from None
            except (sqlite3.Error, OverflowError) as exc:
                raise _read_failure(exc, params) from exc

    def get(self, info: _TableInfo, key: Any) -> Optional[Dict[str, Any]]:
        rows = self._rows(info.select_key, info.key_params(key, UsageError))
        return rows[0] if rows else None

    def find(self, info: _TableInfo, equals: Mapping[str, Any]) -> List[Dict[str, Any]]:
        self.check_columns(info, equals, "find", UsageError)
        for column, value in equals.items():
            _check_value(value, info.name, column, UsageError)
        where = " AND ".join(f"{_quote(c)} IS ?" for c in equals) or "1"
        sql = f"SELECT * FROM {info.q} WHERE {where} ORDER BY {info.order_by}"
        return self._rows(sql, tuple(equals.values()))

    def count(self, info: _TableInfo) -> int:
        with self.lock:
            try:
                return int(self.conn.execute(info.count_sql).fetchone()[0])
            except sqlite3.Error as exc:
                raise _read_failure(exc, ()) from exc

    def query(self, sql: str, params: Any = ()) -> List[Dict[str, Any]]:
        if not isinstance(sql, str):
            raise QueryError(f"query() takes SQL text; received {_describe(sql)}.")
        if params.__class__ not in (tuple, list, dict) and (  # (the usual ones first)
                isinstance(params, (str, bytes, bytearray))
                or not isinstance(params, (_Mapping, collections.abc.Sequence))):
            # sqlite3 would bind "a" as ("a",) but fail on "ab", and say nothing useful of 5
            raise QueryError(
                f"query() params are a list or tuple (one value per ?) or a dict (for "
                f":name placeholders); received {_describe(params)}. For one value, "
                f"write (value,). SQL: {sql[:200]!r}."
            )
        # Python's sqlite3 can report a reused statement's failed bind as the last
        # error SQLite had (another query's): say what is wrong before that.
        values = params.values() if isinstance(params, _Mapping) else \
            params if isinstance(params, (list, tuple)) else ()
        for value in values:
            # What a query is usually given, and what the full check passes whatever
            # adapters are registered: skipping it took a tenth off a one-row query by key.
            kind = value.__class__
            if (kind is int and -9223372036854775808 <= value <= 9223372036854775807) \
                    or (kind is str and value.isascii()) or kind is float or value is None:
                continue
            _check_query_param(value, sql)
        with self.lock:
            previous = self.query_mode
            # Only the main thread runs signal handlers (Ctrl-C) at all.
            signals: List[BaseException] = []
            handler = _let_signals_in(signals) \
                if threading.current_thread() is threading.main_thread() else None
            try:
                # Set inside the try: a Ctrl-C raised after one of the calls above (where
                # Python runs signal handlers) left it set, and the authorizer then
                # refused every statement of the store, its writes' BEGIN included.
                self.query_mode = 2 if previous == 2 else 1
                if handler is not None:
                    next(handler)  # to its yield, where a handler's exception is caught
                    self.conn.set_progress_handler(handler.__next__, _SIGNAL_TICKS)
                # The tag keeps this text apart from fluxlite's own cached
                # statements (and a reducer's apart from query()'s), so it is
                # always prepared, and authorized, under the rules in force.
                tag = _REDUCER_TAG if self.query_mode == 2 else _READONLY_TAG
                cursor = self.conn.execute(tag + sql, params)
                # Closed however it ends: a row that fails to read (text that is not
                # UTF-8) leaves the statement open, held by the error's traceback, and
                # the connection then cannot close (a reader leaves -wal and -shm).
                try:
                    names = [d[0] for d in cursor.description or ()]
                    if len(set(names)) < len(names):
                        raise _repeated_names(names, sql)
                    return [dict(zip(names, row)) for row in cursor]
                finally:
                    cursor.close()
            except sqlite3.DatabaseError as exc:
                if signals:  # a signal handler raised (Ctrl-C's KeyboardInterrupt, or
                    raise signals[0] from None  # the handler's own): that, not SQLite's
                # Refused by the authorizer when prepared ("not authorized"), or while
                # running (VACUUM: "authorization denied"; inside a transaction, "cannot
                # VACUUM" comes first): the same rule.
                if any(word in str(exc) for word in _REFUSED_QUERY):
                    raise QueryError(
                        "query() is read-only (SELECT and WITH only"
                        + (", on read-model tables, inside a reducer" if self.query_mode == 2 else "")
                        + f"); refused: {sql[:200]!r}. Change data by dispatching events."
                    ) from None
                raise _query_failure(exc, sql, params) from exc
            except (sqlite3.Warning, sqlite3.ProgrammingError, ValueError, OverflowError) as exc:
                raise _query_failure(exc, sql, params) from exc
            finally:
                self.query_mode = previous
                if handler is not None:  # (a connection closed meanwhile was reported above)
                    try:
                        self.conn.set_progress_handler(None, 0)
                    except sqlite3.ProgrammingError:
                        pass

    def _authorize(self, action: int, arg1: Any, arg2: Any, db: Any, trigger: Any) -> int:
        if self.query_mode == 0:
            return sqlite3.SQLITE_OK
        if action not in _READ_ACTIONS:
            # Safe to allow: SQLite itself refuses to write sqlite_master unless
            # PRAGMA writable_schema is on, and no PRAGMA passes here.
            if action == _SQLITE_UPDATE and arg1 in ("sqlite_master", "sqlite_schema") \
                    and trigger is None:
                return sqlite3.SQLITE_OK
            return sqlite3.SQLITE_DENY
        if action == _SQLITE_FUNCTION and arg2 in _UNSAFE_FUNCTIONS:
            return sqlite3.SQLITE_DENY
        # Replay has no log, and its scratch file another schema (sqlite_master
        # names the log's tables, and other root pages): reducers read the model only.
        if (self.query_mode == 2 and action == _SQLITE_READ and arg1 not in self.tables
                and arg1 not in _JSON_TABLES
                and not (arg1 in ("sqlite_master", "sqlite_schema") and arg2 == "ROWID")):
            return sqlite3.SQLITE_DENY
        # (SQLite reads sqlite_master's ROWID when json_each or json_tree is first used on
        # a connection, as it builds the table: refused, a reducer's json_each failed on a
        # new store, and in every replay's scratch. A query naming sqlite_master itself is
        # still refused: SQLite also asks for the table, with the column '')
        return sqlite3.SQLITE_OK

    # -- writes --------------------------------------------------------------

    def check_columns(self, info: _TableInfo, values: Mapping[str, Any], op: str,
                      error: Callable[[str], FluxliteError] = ChangesetError) -> None:
        if values.keys() <= info.writable:
            return
        generated = [c for c in values if c in info.column_set and c not in info.writable]
        if generated:
            raise error(
                f"{op} on {info.name!r} sets generated column(s) "
                f"{', '.join(map(_quoted, generated))}; SQLite computes them. Leave them out."
            )
        unknown = [c for c in values if c not in info.column_set]
        raise error(
            f"{op} on {info.name!r} names unknown column(s) "
            f"{', '.join(map(_quoted, unknown))}; the table has: {', '.join(info.columns)}."
        )

    def apply(self, changes: Sequence[Change], seq: int,
              journal: Optional[List[Tuple[Any, ...]]], report: bool = True) -> List[Change]:
        """Apply changes inside the caller's transaction; return them as applied
        (none if not ``report``: a rebuild keeps only the journal).

        Each journal row holds the whole row before and after the change.
        """
        applied, start = [], len(journal) if journal is not None else 0
        for change in changes:
            info = self.table(change.table)
            try:
                # The usual insert takes _inserted's short path (the row as stored is
                # what the journal keeps and the applied change shows); else _checked.
                after = self._inserted(info, change, True) if info.exact_types else None
                if after is None:
                    # An upsert of a row holding its key takes _upserted's short path.
                    upserted = self._upserted(info, change, report) \
                        if change.op == "upsert" else None
                    done, before, after = upserted or self._apply_one(
                        info, *self._checked(info, change), report)
                else:
                    done, before = _change("insert", info.name, after[info.pk[0]], after), None
            except _STORAGE_REFUSALS as exc:
                error = _constraint_error(change, info, exc)
                if error is None:  # the file's: locks, a full disk
                    raise
                raise error from exc
            if report:
                applied.append(done)
            if journal is not None:
                try:
                    journal.append((
                        seq, len(journal) - start, info.name,
                        str(done.key) if done.key.__class__ is int else _dumps(_key_json(done.key)),
                        done.op, None if before is None else _dumps(before),
                        None if after is None else _dumps(after),
                    ))
                except ValueError as exc:  # e.g. '1e999' that a REAL column made infinite
                    raise ChangesetError(
                        f"{change.op} on {info.name!r} stored a value that is not a finite "
                        f"number ({exc}): SQLite's column affinity turned the given text "
                        f"into infinity. Give the column a finite number or text it keeps."
                    ) from None
                except TypeError:  # bytes: from a DEFAULT x'..' or a generated column
                    blobs = sorted(c for row in (before, after) if row
                                   for c, v in row.items() if isinstance(v, bytes))
                    raise ChangesetError(
                        f"{change.op} on {info.name!r} left a BLOB in column(s) "
                        f"{', '.join(map(repr, blobs))}, made by the schema (a DEFAULT x'..' "
                        f"or a generated column): read-model values are None, bool, int, "
                        f"float or str, so that the journal can keep them. Make the schema "
                        f"produce text (hex() of the blob) or a number."
                    ) from None
        return applied

    def apply_quietly(self, changes: Sequence[Change]) -> None:
        """Apply changes with the same checks, reporting nothing (replay for verify)."""
        for change in changes:
            info = self.table(change.table)
            try:
                if self._inserted(info, change, False) is None:
                    self._apply_quietly(info, *self._checked(info, change))
            except _STORAGE_REFUSALS as exc:
                error = _constraint_error(change, info, exc)
                if error is None:  # the file's: locks, a full disk
                    raise
                raise error from exc

    def _inserted(self, info: _TableInfo, change: Change, stored: bool
                  ) -> Optional[Dict[str, Any]]:
        """A replay's usual change, an insert holding its (one-column) key, in
        columns seen before, checked as _checked checks it and applied as
        _apply_quietly and _apply_one apply it, with none of their other work (~7%
        of a replayed event's instructions): its values, or with ``stored`` the row
        as stored. None, nothing done, for any other change (or a row SQLite may
        store otherwise): _checked takes it."""
        if change.op != "insert":
            return None
        found = _keyed_values(info, change, info.quiet_inserts, _TableInfo.insert_sql)
        if found is None:
            return None
        sql, key = found
        values: Dict[str, Any] = change.values  # type: ignore[assignment]
        row = _stored_row(info, values, info.defaults) if stored else values
        if row is None:
            return None
        try:
            self.cursor.execute(sql, tuple(values.values()))
        except sqlite3.IntegrityError:
            if self._row(info, (key,)) is not None:
                raise _existing_row(info, (key,)) from None
            raise
        return row

    def _upserted(self, info: _TableInfo, change: Change, report: bool
                  ) -> Optional[Tuple[Change, Optional[Dict[str, Any]], Optional[Dict[str, Any]]]]:
        """The usual upsert (each event of a store that upserts rows), a dict holding
        its one-column key, in columns seen before: checked as _checked checks it
        and applied as _apply_one applies it (read the row, then update or insert),
        without _checked's other cases, its copy of the values, or check_columns'
        test again (3.6% of rebuild()'s instructions on bench/past.py's upserts).
        None, nothing done, for any other change: _checked takes it."""
        found = _keyed_values(info, change, info.quiet_upserts, _TableInfo.non_key)
        if found is None:
            return None
        others, key = found
        values: Dict[str, Any] = change.values  # type: ignore[assignment]
        params = (key,)
        before = self._row(info, params)
        if before is not None:
            return self._update(info, params, {c: values[c] for c in others}, before, report)
        try:
            after = self._insert(info, values)
        except sqlite3.IntegrityError:
            if self._row(info, params) is not None:
                raise _existing_row(info, params) from None
            raise
        return _change("insert", info.name, info.key_of(after), after), None, after

    def _checked(self, info: _TableInfo, change: Change
                 ) -> Tuple[str, Dict[str, Any], Optional[Tuple[Any, ...]]]:
        """(op, values, key params) once every rule a change must follow is checked."""
        op, values = change.op, change.values
        if op == "delete":
            return op, {}, info.key_params(change.key)
        if values is None:
            if op == "update" or change.key is None:
                raise ChangesetError(
                    f"{op} on {info.name!r} needs values (a dict of column -> value); "
                    f"received None."
                )
            values = {}
        self.check_columns(info, values, op)
        table = info.name
        for column, value in values.items():
            _check_value(value, table, column)
        if op == "update":
            touched = [c for c in values if c in info.pk]
            if touched:
                raise ChangesetError(
                    f"update on {table!r} may not change primary-key column(s) "
                    f"{', '.join(touched)}; delete the row and insert a new one."
                )
            return op, dict(values), info.key_params(change.key)
        # insert / upsert: the key is in the row, or given apart and merged in
        if change.key is None and values.keys() >= info.pk_set:  # the usual case
            if len(info.pk) == 1:  # its value is checked above: only None is no key
                key = values[info.pk[0]]
                return op, dict(values), (key,) if key is not None else info.key_params(key)
            return op, dict(values), info.key_params(tuple(values[c] for c in info.pk))
        values = self._with_key(info, change)
        if any(c not in values for c in info.pk):
            return op, values, None  # SQLite assigns the INTEGER PRIMARY KEY
        return op, values, info.key_params(_unparams(info, tuple(values[c] for c in info.pk)))

    def _apply_one(self, info: _TableInfo, op: str, values: Dict[str, Any],
                   key: Optional[Tuple[Any, ...]], report: bool = True
                   ) -> Tuple[Change, Optional[Dict[str, Any]], Optional[Dict[str, Any]]]:
        if op == "delete":
            before = self._delete(info, key)  # type: ignore[arg-type]
            if before is None:
                raise _missing_row(info, op, key)
            return _change("delete", info.name, info.key_of(before), None), before, None
        before = self._row(info, key) if op != "insert" and key is not None else None
        if op == "update" or before is not None:
            rest = {c: v for c, v in values.items() if c not in info.pk}
            return self._update(info, key, rest, before, report)  # type: ignore[arg-type]
        try:
            after = self._insert(info, values)
        except sqlite3.IntegrityError:
            if key is not None and self._row(info, key) is not None:
                raise _existing_row(info, key) from None
            raise
        return _change("insert", info.name, info.key_of(after), after), None, after

    def _apply_quietly(self, info: _TableInfo, op: str, values: Dict[str, Any],
                       key: Optional[Tuple[Any, ...]]) -> None:
        conn = self.conn
        if op == "delete":
            if conn.execute(info.delete_key, key).rowcount == 0:  # type: ignore[arg-type]
                raise _missing_row(info, op, key)
            return
        # One statement only for a whole row, and only where it cannot refuse what
        # the live way (look the row up, update or insert) accepted: SQLite checks
        # NOT NULL and CHECK on the row an upsert would insert before it looks for
        # the conflict (and references, with the key as the change spells it).
        # And only for a key of the types its columns store unchanged: SQL finds the
        # row -2**63 by the key -2.0**63, which a STRICT INTEGER column refuses to store.
        if op == "upsert" and key is not None and info.one_statement_upsert and \
                len(values) == len(info.writable) and all(
                    part.__class__ in info.exact_types.get(column, ())
                    for column, part in zip(info.pk, key)):
            conn.execute(info.upsert_sql(tuple(values)), tuple(values.values()))
            return
        if op == "update" or (op == "upsert" and self._row(info, key) is not None):  # type: ignore[arg-type]
            rest = {c: v for c, v in values.items() if c not in info.pk}
            if not rest:
                if self._row(info, key) is None:  # type: ignore[arg-type]
                    raise _missing_row(info, "update", key)
                return
            sql = info.update_sql(tuple(rest))
            if conn.execute(sql, (*rest.values(), *key)).rowcount == 0:  # type: ignore[misc]
                raise _missing_row(info, "update", key)
            return
        try:
            conn.execute(info.insert_sql(tuple(values)), tuple(values.values()))
        except sqlite3.IntegrityError:
            if key is not None and self._row(info, key) is not None:
                raise _existing_row(info, key) from None
            raise

    def _update(self, info: _TableInfo, key: Tuple[Any, ...], values: Mapping[str, Any],
                before: Optional[Dict[str, Any]], report: bool = True
                ) -> Tuple[Change, Optional[Dict[str, Any]], Optional[Dict[str, Any]]]:
        if before is None:
            raise _missing_row(info, "update", key)
        after = before
        if values:
            sql, params = info.update_sql(tuple(values)), (*values.values(), *key)
            known = _stored_row(info, values, before)
            if known is not None:
                self.conn.execute(sql, params)
                after = known
            else:
                after = self._write_returning(sql, params, info, key)
        if not report:  # the changed columns, compared one by one, would go unread
            return _change("update", info.name, info.key_of(before), None), before, after
        # Generated columns change with the columns they are computed from.
        columns = values if len(info.writable_columns) == len(info.columns) else info.columns
        shown = {c: after[c] for c in columns if _differs(before[c], after[c])}
        return _change("update", info.name, info.key_of(before), shown), before, after

    def _counter_at_end(self, info: _TableInfo) -> bool:
        """Whether an AUTOINCREMENT table's counter is at 2**63-1. Asked before the
        insert: the SQLITE_FULL it would get ends the transaction, and with it any
        sign of a counter that this transaction moved there."""
        known = self.autoincrement.get(info.name)
        if known is None:
            row = self.conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND "
                                    "name = ?", (info.name,)).fetchone()
            known = self.autoincrement[info.name] = bool(
                row and re.search(r"\bAUTOINCREMENT\b", row[0] or "", re.IGNORECASE))
        return known and self.conn.execute(
            "SELECT 1 FROM sqlite_sequence WHERE name = ? AND seq = ?",
            (info.name, 2**63 - 1)).fetchone() is not None

    def _insert(self, info: _TableInfo, values: Mapping[str, Any]) -> Dict[str, Any]:
        sql, params = info.insert_sql(tuple(values)), tuple(values.values())
        known = _stored_row(info, values, info.defaults)
        if known is not None:
            self.conn.execute(sql, params)
            return known
        assigned = not all(c in values for c in info.pk)  # an INTEGER PRIMARY KEY, by SQLite
        if assigned and self._counter_at_end(info):
            raise ChangesetError(
                f"insert into {info.name!r} without a key: the largest key (2**63-1) "
                f"is taken, and AUTOINCREMENT never picks a smaller one. Give the key "
                f"in the insert."
            )
        try:
            cursor = self.conn.execute(sql, params)
        except sqlite3.OperationalError as exc:  # AUTOINCREMENT past 2**63-1: SQLITE_FULL
            if assigned and "full" in str(exc) and self.conn.execute(
                    "SELECT 1 FROM sqlite_sequence WHERE name = ? AND seq = ?",
                    (info.name, 2**63 - 1)).fetchone() is not None:
                raise ChangesetError(
                    f"insert into {info.name!r} without a key: the largest key (2**63-1) "
                    f"is taken, and AUTOINCREMENT never picks a smaller one. Give the key "
                    f"in the insert."
                ) from None
            raise
        key = (cursor.lastrowid,) if assigned else tuple(values[c] for c in info.pk)
        if assigned and key[0] < self.conn.execute(
                f"SELECT max(rowid) FROM {info.q}").fetchone()[0]:
            raise ChangesetError(
                f"insert into {info.name!r} without a key: the largest key (2**63-1) is "
                f"taken, so SQLite picked one at random, which a replay would not pick "
                f"again. Give the key in the insert."
            )
        row = self._row(info, info.key_params(_unparams(info, key)))
        if row is None:
            raise ChangesetError(
                f"insert into {info.name!r}: the key {_quoted(_unparams(info, key))} changed when "
                f"SQLite stored it (the column's type rounded or converted it), so the row "
                f"could not be found by its key. Use a key of the column's own type."
            )
        return row

    def _delete(self, info: _TableInfo, key: Tuple[Any, ...]) -> Optional[Dict[str, Any]]:
        # Read first, not DELETE ... RETURNING, which SQLite 3.40 can get wrong.
        before = self._row(info, key)
        if before is not None:
            self.conn.execute(info.delete_key, key)
        return before

    def _write_returning(self, sql: str, params: Sequence[Any], info: _TableInfo,
                         key: Optional[Tuple[Any, ...]]) -> Dict[str, Any]:
        """Run an UPDATE and return the row as stored (read back: not RETURNING)."""
        self.conn.execute(sql, params)
        row = self._row(info, key)  # type: ignore[arg-type]
        assert row is not None
        return row

    def _with_key(self, info: _TableInfo, change: Change) -> Dict[str, Any]:
        values = dict(change.values or {})
        if change.key is not None:
            key = info.key_params(change.key)
            for column, part in zip(info.pk, key):
                if column in values and values[column] != part:
                    raise ChangesetError(
                        f"{change.op} into {info.name!r}: key {_quoted(change.key)} disagrees "
                        f"with the row's {column}={_quoted(values[column])}; leave key=None or "
                        f"make them equal."
                    )
                values[column] = part
        missing = [c for c in info.pk if c not in values]
        if missing and not (change.op == "insert" and info.rowid_key):
            raise ChangesetError(
                f"{change.op} into {info.name!r} lacks primary-key column(s) "
                f"{', '.join(missing)}; put them in the row (or, in a Change built by "
                f"hand, give key=)."
            )
        return values

    def _row(self, info: _TableInfo, key: Tuple[Any, ...]) -> Optional[Dict[str, Any]]:
        row = self.conn.execute(info.select_key, key).fetchone()
        return None if row is None else dict(zip(info.columns, row))


# What SQLite may answer a change with (an OperationalError only sometimes the
# change's fault: see _constraint_error).
_STORAGE_REFUSALS = (sqlite3.IntegrityError, OverflowError, UnicodeEncodeError,
                     sqlite3.OperationalError, sqlite3.DataError)


def _default_adapter(adapter: Any) -> bool:
    """sqlite3's own date/datetime adapter, also where pysqlite3 or sqlean.py (a
    newer SQLite) stands in as sqlite3: their module is pysqlite3.dbapi2 or
    sqlean.dbapi2, not sqlite3.dbapi2, and the adapter was taken for the user's."""
    module = getattr(adapter, "__module__", None) or ""
    return (module == "dbapi2" or module.endswith(".dbapi2")) and \
        getattr(adapter, "__qualname__", "").startswith("register_adapters_and_converters.")


def _check_query_param(value: Any, sql: str) -> None:
    """What SQLite cannot bind, said here: Python's sqlite3 can report a failed
    bind of a reused statement with the last error SQLite had (another query's)."""
    problem = None
    adapter = sqlite3.adapters.get((type(value), sqlite3.PrepareProtocol))
    if (adapter is not None and not _default_adapter(adapter)) or \
            getattr(value, "__conform__", None) is not None:
        return  # the user taught sqlite3 to bind it
    if isinstance(value, date):  # sqlite3's own adapter (deprecated since Python 3.12)
        problem = (
            "would be bound by sqlite3's default adapter (deprecated in Python 3.12) as "
            "'YYYY-MM-DD HH:MM:SS', with a space, which does not compare with the log's ts "
            "('2026-11-30T08:00:00.000000+00:00'): pass text, value.astimezone(timezone.utc)"
            ".isoformat(timespec='microseconds') to compare with ts, or the text your "
            "reducer stored" if isinstance(value, datetime) else
            "would be bound by sqlite3's default adapter (deprecated in Python 3.12); "
            "pass text: value.isoformat()")
    elif isinstance(value, int) and not -(2**63) <= value < 2**63:
        problem = "is outside SQLite's 64-bit integers; pass it as text (str(value))"
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            problem = "is not valid Unicode text (a lone surrogate)"
    elif isinstance(value, (dict, list, tuple, set, frozenset)):
        problem = "is of a type SQLite cannot store; pass None, a number, text or bytes"
    if problem:
        raise QueryError(f"query() parameter {_describe(value)} {problem}. SQL: {sql[:200]!r}.")


def _repeated_names(names: List[str], sql: str) -> QueryError:
    """Rows are dicts: a second column of a name would silently replace the first."""
    repeated = sorted({n for n in names if names.count(n) > 1})
    return QueryError(
        f"query() returns rows as dicts, so each result column needs its own name; "
        f"the result of {sql[:200]!r} has more than one column named "
        f"{', '.join(map(repr, repeated))} "
        f"(a join's SELECT * repeats the columns both tables have). Give each a distinct "
        f"name with AS, or select only the columns you need."
    )


def _query_failure(exc: Exception, sql: str, params: Any) -> FluxliteError:
    if isinstance(exc, sqlite3.ProgrammingError) and "closed" in str(exc):
        return _read_failure(exc, params)  # the store or at() view was closed: UsageError
    text = f"query failed: {str(exc).rstrip('.')}. SQL: {sql[:200]!r}"
    if re.search(r"no such table: (main\.)?(events|fluxlite_)", str(exc)):
        text += ("; an at() view holds only the read-model tables as they were: read "
                 "the log with store.events(), or query it on the store")
    # (sqlite3 spells a dict given for ? placeholders "Binding 1 has no name"). Only
    # sqlite3's own binding errors, never SQLite's: those quote the SQL's names
    # ("no such column: binding_id"), which are no reason to doubt the params.
    if ("bind" in str(exc).lower() and not isinstance(exc, sqlite3.OperationalError)) \
            or isinstance(exc, OverflowError):
        text += (f"; params: {_describe(params)}. Give one value per ? (a sequence), or a "
                 f"dict for :name placeholders; values are None, int, float, str or bytes")
    return QueryError(text + "." + _missing_function_hint(exc))


def _read_failure(exc: Exception, params: Sequence[Any]) -> FluxliteError:
    """What a failed read of the read model (get, find, count, all) means."""
    text = str(exc)
    if isinstance(exc, sqlite3.Error) and _is_damage(exc):
        return _damaged_model(exc)
    if "closed" in text:
        return UsageError("The store (or the at() view) is closed; a table read after "
                          "close() has nothing to read. Open it again.")
    if "no such table" in text or "no such column" in text:
        return SchemaError(
            f"The read model's tables are not the ones this store opened ({text}): another "
            f"process rebuilt the file with a new schema. Reopen the store with that code."
        )
    if isinstance(exc, (OverflowError, sqlite3.ProgrammingError, sqlite3.InterfaceError)):
        return UsageError(
            f"A value looked up in the read model cannot be a SQLite value ({text}): "
            f"received {_describe(params)}. Look up text, a number within 64 bits, or None."
        )
    missing = _missing_function_error(exc, "Reading the read model")
    return missing or StorageError(f"Reading the read model failed: {text}.")


def _damaged_model(exc: sqlite3.Error) -> StorageError:
    return StorageError(
        f"The read model is damaged: {exc}. Check the file with PRAGMA integrity_check; "
        f"store.rebuild() rewrites the read model from the log."
    )


def _constraint_error(change: Change, info: _TableInfo, exc: Exception
                      ) -> Optional[ChangesetError]:
    """SQLite's refusal of a change, as a ChangesetError naming the change; None for
    an OperationalError that is the file's, not the change's (a lock, a full disk)."""
    if isinstance(exc, sqlite3.OperationalError):
        return _value_error(change, info, exc)
    if isinstance(exc, sqlite3.IntegrityError):
        key = change.key
        if key is None and isinstance(change.values, _Mapping) and info.pk_set <= change.values.keys():
            key = info.key_of(change.values)  # an insert names its key among its values
        hint = (" Changes apply in order: insert a parent row before the rows that "
                "reference it and delete those before it, or declare the reference "
                "DEFERRABLE INITIALLY DEFERRED to check it at commit."
                if "FOREIGN KEY" in str(exc) else "")
        return ChangesetError(
            f"{change.op} on {info.name!r} key {_quoted(key)} violates a "
            f"constraint: {exc}. Check the reducer's values against the schema.{hint}"
        )
    if isinstance(exc, UnicodeEncodeError):  # a lone surrogate: not UTF-8, so not text
        values = dict(change.values or {})
        if change.key is not None:
            parts = change.key if isinstance(change.key, tuple) else (change.key,)
            values.update((c, v) for c, v in zip(info.pk, parts) if c not in values)
        for column, value in values.items():
            try:
                if isinstance(value, str):
                    value.encode("utf-8")
            except UnicodeEncodeError as bad:
                shown = repr(value) if len(value) <= 80 else f"{value[:80]!r}... ({len(value)} characters)"
                return ChangesetError(
                    f"{change.op} on {info.name!r}: column {column!r} received {shown}, "
                    f"which is not valid Unicode text (a lone surrogate at character "
                    f"{bad.start}); SQLite stores text as UTF-8. Fix the string's encoding "
                    f"(decode bytes with errors='replace', not 'surrogateescape').")
    return ChangesetError(f"{change.op} on {info.name!r} has a value SQLite cannot store: {exc}.")


def _value_error(change: Change, info: _TableInfo, exc: sqlite3.OperationalError
                 ) -> Optional[ChangesetError]:
    """An expression of the schema that failed on a change's values, or None."""
    if str(exc).startswith("Could not decode to UTF-8"):
        return ChangesetError(
            f"{change.op} on {info.name!r} left text that is not UTF-8 in the row ({exc}), "
            f"made by the schema from a BLOB (a DEFAULT x'..' or a generated column). "
            f"Make the schema produce valid text, or hex() of the blob."
        )
    if str(exc).startswith("non-deterministic use of"):  # SQLite checks it per row, not
        return ChangesetError(                                # when the schema is created
            f"{change.op} on {info.name!r}: SQLite refuses an expression of the schema on "
            f"these values ({exc}): a generated column, a CHECK or an index that reads the "
            f"clock ('now') or the machine's time zone ('localtime', 'utc') would give a "
            f"replay another answer. Compute the value in the reducer from event.ts, or "
            f"take that part out of the schema's expression."
        )
    if str(exc) == "too many SQL variables":  # a whole row of a very wide table
        values = len(change.values or {}) + (0 if change.key is None else len(info.pk))
        return ChangesetError(
            f"{change.op} on {info.name!r} writes about {values} values in one statement, "
            f"more than this SQLite ({sqlite3.sqlite_version}) binds in one (its "
            f"SQLITE_MAX_VARIABLE_NUMBER: 999 before SQLite 3.32, 32,766 since). Set fewer "
            f"columns per change (insert the row with part of them, update the rest in more "
            f"changes of the same event), or split the table into narrower ones."
        )
    if str(exc) == "integer overflow":
        return ChangesetError(
            f"{change.op} on {info.name!r}: an expression of the schema (a CHECK, a generated "
            f"column or an index on an expression) went past SQLite's 64-bit integers on "
            f"these values ({exc}). Check the values, or make the expression safe for them."
        )
    if str(exc).startswith(_EXPRESSION_ERRORS):  # json_extract() of text that is no JSON
        return ChangesetError(
            f"{change.op} on {info.name!r}: an expression of the schema (a CHECK, a generated "
            f"column or an index on an expression) failed on these values ({exc}). Give the "
            f"column a value the expression takes (valid JSON text for json_extract()), or "
            f"guard the expression (CASE WHEN json_valid(d) THEN json_extract(d, '$.a') END)."
        )
    return None


# SQLite's errors from evaluating a schema's expression on a row's values (not from
# the file: those are StorageError, and "malformed" alone means a damaged file).
# SQLite 3.45 renamed one ("JSON path error near 'x'" became "bad JSON path: 'x'"):
# both, or on a newer SQLite a bad path was a StorageError about free disk space.
_EXPRESSION_ERRORS = ("malformed JSON", "JSON path error", "bad JSON path",
                      "JSON cannot hold BLOB values",
                      "json_", "ESCAPE expression must be a single character",
                      "LIKE or GLOB pattern too complex")


def _stored_row(info: _TableInfo, values: Mapping[str, Any], rest: Mapping[str, Any]
                ) -> Optional[Dict[str, Any]]:
    """The row SQLite will store, when no affinity or default can change it; else None.

    ``rest`` gives the columns ``values`` lacks (the defaults for an insert,
    the row before an update).
    """
    exact = info.exact_types
    if not exact:  # generated columns: only SQLite knows their values
        return None
    for column, value in values.items():
        if value is not None and type(value) not in exact.get(column, ()):
            return None
        if value == 0 and type(value) is float and math.copysign(1.0, value) < 0:
            return None  # SQLite stores -0.0 as 0.0
    row = {}
    for column in info.columns:
        if column in values:
            row[column] = values[column]
        elif column in rest:
            row[column] = rest[column]
        else:
            return None  # an expression default, or SQLite assigns the rowid
    return row


def _missing_row(info: _TableInfo, op: str, key: Any) -> ChangesetError:
    return ChangesetError(
        f"{op} on {info.name!r} of key {_quoted(_unparams(info, key))} which does not exist; "
        f"check the key, or insert the row first."
    )


def _existing_row(info: _TableInfo, key: Tuple[Any, ...]) -> ChangesetError:
    return ChangesetError(
        f"insert into {info.name!r} of key {_quoted(_unparams(info, key))} which already "
        f"exists; use update or upsert to change an existing row."
    )


def _change(op: str, table: str, key: Any, values: Optional[Dict[str, Any]]) -> "Change":
    """A Change built by fluxlite itself: already valid, so no checks (hot path)."""
    change = object.__new__(Change)
    change.__dict__.update(op=op, table=table, key=key, values=values)
    return change


def _unparams(info: _TableInfo, key: Tuple[Any, ...]) -> Any:
    return key[0] if len(info.pk) == 1 else tuple(key)


def _key_json(key: Any) -> Any:
    return list(key) if isinstance(key, tuple) else key


_JOURNAL_COLUMNS = "seq, n, tbl, key, op, before, after"
_LAST_SEAL = "SELECT seq, events, journal FROM fluxlite_seals ORDER BY seq DESC LIMIT 1"


def _encode_rows(rows: Iterable[Sequence[Any]]) -> bytes:
    """Rows' values exactly as stored, one after another, unambiguously: text as
    "<length>:<text>", an integer as "#<digits>;", NULL as "~" (cheaper than
    JSON: verify() runs this over every row of the log and the journal; many
    rows at once, since a call per row costs half as much again)."""
    return "".join([
        f"{len(v)}:{v}" if v.__class__ is str else "~" if v is None else f"#{v};"
        for row in rows for v in row]).encode("utf-8", "surrogatepass")


def _encode_written_journal(rows: Iterable[Sequence[Any]]) -> bytes:
    """_encode_rows' bytes for journal rows fluxlite has just written (seq and n
    integers, tbl, key and op text, before and after text or NULL), a row at a
    time: a third fewer instructions than value by value, where a rebuild
    hashes its whole new journal. Rows read from a file that may have been
    edited (verify()) go through _encode_rows, which looks at each value's type."""
    return "".join([
        f"#{seq};#{n};{len(tbl)}:{tbl}{len(key)}:{key}{len(op)}:{op}"
        f"{'~' if before is None else f'{len(before)}:{before}'}"
        f"{'~' if after is None else f'{len(after)}:{after}'}"
        for seq, n, tbl, key, op, before, after in rows]).encode("utf-8", "surrogatepass")


def _encode_written_events(rows: Iterable[Sequence[Any]]) -> bytes:
    """_encode_rows' bytes for log rows _write makes of events dispatched here (seq
    an int, id, type, payload, meta and ts plain str: _prepare made them so): a
    third fewer instructions, in every dispatch's seal. A copied log's rows
    (restore, import) may hold other types: those go through _encode_rows."""
    return "".join([
        f"#{seq};{len(id)}:{id}{len(kind)}:{kind}{len(payload)}:{payload}"
        f"{len(meta)}:{meta}{len(ts)}:{ts}"
        for seq, id, kind, payload, meta, ts in rows]).encode("utf-8", "surrogatepass")


def _encode_read_events(rows: List[Sequence[Any]]) -> bytes:
    """_encode_rows' bytes for log rows read back (verify()): a row whose values
    have the types fluxlite writes (checked: the file may have been edited) is
    encoded as _encode_written_events does, a fifth to a quarter fewer instructions;
    any other value by value, by _encode_rows (its text, the bytes decoded)."""
    return "".join([
        f"#{s};{len(i)}:{i}{len(k)}:{k}{len(p)}:{p}{len(m)}:{m}{len(t)}:{t}"
        if s.__class__ is int and i.__class__ is str and k.__class__ is str
        and p.__class__ is str and m.__class__ is str and t.__class__ is str
        else _encode_rows(((s, i, k, p, m, t),)).decode("utf-8", "surrogatepass")
        for s, i, k, p, m, t in rows]).encode("utf-8", "surrogatepass")


def _encode_read_journal(rows: List[Sequence[Any]]) -> bytes:
    """_encode_read_events' counterpart for journal rows read back (verify())."""
    return "".join([
        f"#{s};#{n};{len(t)}:{t}{len(k)}:{k}{len(o)}:{o}"
        f"{'~' if b is None else f'{len(b)}:{b}'}{'~' if a is None else f'{len(a)}:{a}'}"
        if s.__class__ is int and n.__class__ is int and t.__class__ is str
        and k.__class__ is str and o.__class__ is str
        and (b is None or b.__class__ is str) and (a is None or a.__class__ is str)
        else _encode_rows(((s, n, t, k, o, b, a),)).decode("utf-8", "surrogatepass")
        for s, n, t, k, o, b, a in rows]).encode("utf-8", "surrogatepass")


_HASH_CHUNK = 1024  # rows encoded at a time: bounds memory for a seal of any size


def _chain_link(previous: str, rows: Iterable[Sequence[Any]],
                encode: Callable[[Iterable[Sequence[Any]]], bytes] = _encode_rows) -> str:
    """The next link of a seal chain: sha256 of the previous link, then the rows
    (``encode``: _encode_written_journal for journal rows fluxlite just wrote)."""
    digest = hashlib.sha256(previous.encode())
    if isinstance(rows, list) and len(rows) <= _HASH_CHUNK:  # a transaction's rows
        digest.update(encode(rows))
        return digest.hexdigest()
    rows = iter(rows)
    chunk = list(itertools.islice(rows, _HASH_CHUNK))
    while chunk:
        digest.update(encode(chunk))
        chunk = list(itertools.islice(rows, _HASH_CHUNK))
    return digest.hexdigest()


class _Chain:
    """A seal chain recomputed over rows ordered by seq (a cursor)."""

    def __init__(self, rows: Iterable[Sequence[Any]], link: str = "",
                 encode: Callable[[List[Sequence[Any]]], bytes] = _encode_rows) -> None:
        self.rows = iter(rows)
        self.link = link
        self.encode = encode
        self.ahead: Optional[Sequence[Any]] = next(self.rows, None)

    def extend_to(self, seq: int) -> str:
        """The link after the rows up to ``seq``, hashed _HASH_CHUNK rows at a time.

        One plain loop: verify() calls this once per seal, and a seal per dispatch
        covers a row or two, so what a call costs besides hashing counts. (A
        generator into _chain_link, with its islice and lists, cost ~0.6 us more
        per call; the locals keep the per-row cost of a long seal as it was.)
        """
        digest, chunk = hashlib.sha256(self.link.encode()), []
        ahead, rows = self.ahead, self.rows
        if ahead is None:  # ran dry earlier: pages (_Pages) may have more by now
            ahead = next(rows, None)
        while ahead is not None:
            if ahead[0].__class__ is not int:  # SQLite does not enforce types on read
                self.ahead = ahead
                raise StorageError(
                    f"The store is damaged: a journal or log row has the seq "
                    f"{ahead[0]!r}. Restore the file from a backup."
                )
            if ahead[0] > seq:
                break
            chunk.append(ahead)
            if len(chunk) == _HASH_CHUNK:
                digest.update(self.encode(chunk))
                chunk.clear()
            ahead = next(rows, None)
        self.ahead = ahead
        digest.update(self.encode(chunk))
        self.link = digest.hexdigest()
        return self.link


def _journal_rows(conn: sqlite3.Connection, after: int = 0) -> sqlite3.Cursor:
    return conn.execute(f"SELECT {_JOURNAL_COLUMNS} FROM fluxlite_journal WHERE seq > ? "
                        f"ORDER BY seq, n", (after,))


def _stored_generation(conn: sqlite3.Connection) -> str:
    """The file's generation as fluxlite_meta holds it; 0 in a file made before it was
    kept (the first format), until a reset_to() or rebuild writes one: read as None
    there, a follower or consumer took the first reset's for the one it started at."""
    row = conn.execute("SELECT value FROM fluxlite_meta WHERE key = 'generation'").fetchone()
    return _dumps(0) if row is None else str(row[0])


class _Pages:
    """The rows of a table in key order, read a page at a time, each page a short
    read of its own (fetched whole, no statement left open).

    A statement held open across a long replay would hold its snapshot, and a
    checkpoint cannot pass a snapshot: every page other processes commit
    meanwhile would pile up in the WAL. ``sql`` selects rows whose first
    ``width`` columns are the key, after a key given as ``width`` parameters,
    then takes a LIMIT. Running dry is not final: the next call reads again
    (rows committed since, in the same order). ``at_end``, if given, is called
    the first time a page comes back short (at the head), and the pages after
    it are read in whatever snapshot it began.
    """

    def __init__(self, conn: sqlite3.Connection, sql: str, after: Tuple[Any, ...],
                 at_end: Optional[Callable[[], Any]] = None) -> None:
        self.conn, self.sql, self.after, self.at_end = conn, sql, after, at_end
        self.buffer: Deque[Sequence[Any]] = collections.deque()

    def __iter__(self) -> "_Pages":
        return self

    def __next__(self) -> Sequence[Any]:
        while not self.buffer:
            rows = self.conn.execute(self.sql, (*self.after, _PAGE)).fetchall()
            self.buffer.extend(rows)
            if rows:
                self.after = tuple(rows[-1][:len(self.after)])
            if len(rows) == _PAGE:
                continue
            if self.at_end is None:
                if not rows:
                    raise StopIteration
            else:
                at_end, self.at_end = self.at_end, None
                at_end()
        return self.buffer.popleft()


def _event_pages(conn: sqlite3.Connection, after: int,
                 at_end: Optional[Callable[[], Any]] = None) -> _Pages:
    return _Pages(conn, f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq "
                        f"LIMIT ?", (after,), at_end)


def _journal_pages(conn: sqlite3.Connection) -> _Pages:
    return _Pages(conn, f"SELECT {_JOURNAL_COLUMNS} FROM fluxlite_journal WHERE (seq, n) > "
                        f"(?, ?) ORDER BY seq, n LIMIT ?", (0, -1))


def _seal_unsealed(conn: sqlite3.Connection) -> None:
    """Seal every event after the last seal with one seal (adopt, a format 1 file)."""
    last, events_link, journal_link = conn.execute(_LAST_SEAL).fetchone() or (0, "", "")
    head = conn.execute("SELECT max(seq) FROM events").fetchone()[0] or 0
    if head <= last:
        return
    events = conn.execute(f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq",
                          (last,))
    conn.execute("INSERT INTO fluxlite_seals VALUES (?, ?, ?)", (
        head, _Chain(events, events_link).extend_to(head),
        _Chain(_journal_rows(conn, last), journal_link).extend_to(head)))


def _reseal_journal(conn: sqlite3.Connection) -> None:
    """After a rebuild rewrote the journal: its links again, at the same seals."""
    rows = _journal_rows(conn)
    # Closed however it ends: a statement left running (a Ctrl-C in the hashing, which
    # a big journal spends seconds in) made the swap's DETACH of the scratch wait out
    # busy_timeout, then report Busy ("another writer") instead of the interrupt.
    with contextlib.closing(rows):
        chain, after = _Chain(rows, encode=_encode_written_journal), 0
        while True:
            seqs = [r[0] for r in conn.execute(
                "SELECT seq FROM fluxlite_seals WHERE seq > ? ORDER BY seq LIMIT 1000", (after,))]
            if not seqs:
                return
            conn.executemany("UPDATE fluxlite_seals SET journal = ? WHERE seq = ?",
                             [(chain.extend_to(seq), seq) for seq in seqs])
            after = seqs[-1]


def _sealed(conn: sqlite3.Connection, path: str, rows: Iterable[Sequence[Any]]
            ) -> Iterator[Sequence[Any]]:
    """The log's rows (all of them, in seq order), passed through while both seal
    chains are recomputed: StorageError where a byte differs from what was sealed,
    in the log or in the journal, or where events have no seal."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'fluxlite_seals'").fetchone() is None:
        yield from rows  # a format 1 file opened read-only: it has no seals yet
        return
    seals = _Pages(conn, "SELECT seq, events, journal FROM fluxlite_seals WHERE seq > ? "
                         "ORDER BY seq LIMIT ?", (0,))
    journal = _Chain(_journal_pages(conn), encode=_encode_read_journal)
    digest, last = hashlib.sha256(), 0
    unhashed: List[Sequence[Any]] = []
    seal = next(seals, None)
    for row in rows:
        while seal is not None and row[0] > seal[0]:
            digest.update(_encode_read_events(unhashed))
            unhashed.clear()
            _check_seal(path, seal, last, digest, journal)
            digest, last, seal = hashlib.sha256(seal[1].encode()), seal[0], next(seals, None)
        if seal is None:  # read dry before this row was read: its seal may be there now
            seal = next(seals, None)
        if seal is None:
            raise StorageError(
                f"{path!r} holds events after seq {last} that no seal covers: they were "
                f"written outside fluxlite (e.g. an INSERT from the sqlite3 shell), bypassing "
                f"reducers. Restore the file from a backup."
            )
        unhashed.append(row)
        if len(unhashed) == _HASH_CHUNK:
            digest.update(_encode_read_events(unhashed))
            unhashed.clear()
        yield row
    digest.update(_encode_read_events(unhashed))
    while seal is not None:
        _check_seal(path, seal, last, digest, journal)
        digest, last, seal = hashlib.sha256(seal[1].encode()), seal[0], next(seals, None)
    if journal.ahead is None:  # read dry before; read again, as of the last rows' read
        journal.ahead = next(journal.rows, None)
    if journal.ahead is not None:
        raise StorageError(
            f"{path!r} has journal rows for seq {journal.ahead[0]}, after the last sealed "
            f"event: they were written outside fluxlite. Restore the file from a backup."
        )


def _check_integrity(conn: sqlite3.Connection, path: str) -> None:
    """SQLite's own check of every page, and of every index against its table:
    damage the seals cannot see (an index that answers id lookups wrongly)."""
    try:  # it computes each index's expressions: a function this SQLite lacks fails it
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check(10)")]
    except sqlite3.OperationalError as exc:
        missing = _missing_function_error(exc, f"Checking {path!r}")
        if missing is None:
            raise
        raise missing from exc
    if problems != ["ok"]:
        raise _integrity_error(path, problems)


def _integrity_error(path: str, problems: List[str]) -> StorageError:
    return StorageError(
        f"{path!r} is damaged: SQLite's integrity_check reports "
        f"{'; '.join(problems[:5])}. Restore the file from a backup."
    )


class _IntegrityCheck:
    """verify()'s integrity_check, on a second (read-only) connection and thread,
    beside the replay: it is about a sixth of verify()'s time, all of it inside
    SQLite, which lets go of the GIL. A store without a file, in a preview, or
    whose file cannot be opened again checks inline, first (``inline``)."""

    def __init__(self, store: "Store") -> None:
        self._path = store._path
        self._problems: List[str] = ["ok"]
        self._error: Optional[sqlite3.Error] = None
        self._thread: Optional[threading.Thread] = None
        if store._path in (":memory:", "") or store._previewing:
            return
        if not store._file_is_its_own():
            return  # not the file this store opened: check through its own connection
        try:
            conn = _connect_readonly(store._file)
        except FluxliteError:
            return
        self._store = store  # (its connection closes before this one may: see _run)
        self._thread = threading.Thread(target=self._run, args=(conn,),
                                        name="fluxlite-integrity", daemon=True)
        self._thread.start()

    @property
    def inline(self) -> bool:
        return self._thread is None

    def _run(self, conn: sqlite3.Connection) -> None:
        try:
            self._problems = [row[0] for row in conn.execute("PRAGMA integrity_check(10)")]
        except sqlite3.Error as exc:
            self._error = exc
        finally:
            self._store._close_beside(conn)  # (the store closed meanwhile: see there)

    def finish(self, store: "Store", cause: Optional[BaseException] = None) -> None:
        """Wait for it; raise what it found (damage comes before what the replay
        made of it: ``cause``, the replay's error, becomes its __cause__)."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        if self._error is not None and _is_damage(self._error):
            raise StorageError(
                f"{self._path!r} is damaged: {self._error}. Check it with PRAGMA "
                f"integrity_check and restore it from a backup."
            ) from cause or self._error
        if self._error is not None:  # the second connection could not read: check here
            _log.debug("integrity_check beside verify() failed (%s); checking inline",
                       self._error)
            with store._lock, _reading(self._path):
                try:
                    _check_integrity(store._conn, self._path)
                except FluxliteError as damage:  # or a schema this SQLite cannot check
                    raise damage from cause
            return
        if self._problems != ["ok"]:
            raise _integrity_error(self._path, self._problems) from cause


def _check_seal(path: str, seal: Sequence[Any], last: int, events: Any,
                journal: _Chain) -> None:
    seq, events_link, journal_link = seal
    if events.hexdigest() != events_link:
        raise StorageError(
            f"{path!r} is damaged: events {last + 1}..{seq} of the log do not match the "
            f"seal written with them (a byte changed since, by hand or by damage). Restore "
            f"the file from a backup."
        )
    if journal.extend_to(seq) != journal_link:
        raise StorageError(
            f"{path!r} is damaged: the journal rows of events {last + 1}..{seq} do not match "
            f"their seal, so at() and history() could answer wrongly there. If verify() "
            f"finds the log itself intact, store.rebuild() rewrites the journal from it; "
            f"otherwise restore the file from a backup."
        )


###############################################################################
# 8. Views, tables and reducer helpers
###############################################################################


class Table:
    """One read-model table: reads, and builders for the Changes a reducer returns.

    Reads see the model of the table's view, ``table.view``: the live one (inside
    a reducer: the transaction in progress), or the past for a table of an at()
    view. Builders only make Change values; nothing is written until the reducer
    returns them and the store applies them. ``key in table`` is ``get(key) is not None``.
    """

    def __init__(self, view: "View", info: _TableInfo) -> None:
        self.view = view
        self._info = info

    @property
    def name(self) -> str:
        """The table's name."""
        return self._info.name

    @property
    def columns(self) -> Tuple[str, ...]:
        """The table's column names, in schema order."""
        return self._info.columns

    @property
    def primary_key(self) -> Tuple[str, ...]:
        """The primary-key column names, in key order."""
        return self._info.pk

    def __repr__(self) -> str:
        return f"<fluxlite.Table {self.name} {self.columns}>"

    # Hidden from type checkers: declared, __getattr__ would make any name a Table
    # attribute to them, so table.inser(...) or a view's table.users would pass.
    if not TYPE_CHECKING:
        def __getattr__(self, name: str) -> NoReturn:
            self._no_attribute(name)

    def _no_attribute(self, name: str) -> NoReturn:
        if name.startswith("_") or name not in self.view.tables:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        # A reducer written for the view, given a table by combine().
        raise _NoTableAttribute(
            f"Table {self.name!r} has no attribute {_quoted(name)}. Under combine() each "
            f"reducer is given its own table (here {self.name!r}), not the view: read "
            f"any table as table.view.{name} (or table.view[{_quoted(name)}])."
        )

    # reads
    def get(self, key: Any) -> Optional[Dict[str, Any]]:
        """The row with this primary key as a dict, or None."""
        return self.view._model.get(self._info, _as_key(key))

    def find(self, **equals: Any) -> List[Dict[str, Any]]:
        """Rows whose columns equal the given values (None matches NULL), by key."""
        return self.view._model.find(self._info, equals)

    def all(self) -> List[Dict[str, Any]]:
        """Every row, ordered by primary key."""
        return self.view._model.find(self._info, {})

    def count(self) -> int:
        """The number of rows."""
        return self.view._model.count(self._info)

    def __contains__(self, key: Any) -> bool:
        return self.get(key) is not None

    # change builders
    def _values(self, row: Optional[Mapping[str, Any]], columns: Dict[str, Any],
                op: str) -> Dict[str, Any]:
        try:  # (what dict() takes: a mapping, a sqlite3.Row, pairs)
            values = dict(row, **columns) if row else columns
        except (TypeError, ValueError):  # dict() would say it obscurely
            example = "update(key, role='admin')" if op == "update" else f"{op}(name='Ann')"
            raise ChangesetError(
                f"{self._info.name}.{op}() takes the {'columns to set' if op == 'update' else 'row'} "
                f"as a dict of column -> value or as keyword arguments; received "
                f"{_describe(row)}. Write e.g. {example}."
            ) from None
        self.view._model.check_columns(self._info, values, op)
        return values

    def insert(self, row: Optional[Mapping[str, Any]] = None, /, **columns: Any) -> Change:
        """A Change inserting this row (as a dict, or as keyword arguments)."""
        return _change("insert", self._info.name, None, self._values(row, columns, "insert"))

    def upsert(self, row: Optional[Mapping[str, Any]] = None, /, **columns: Any) -> Change:
        """A Change inserting the row, or updating it if its key exists.

        Columns left out keep their values (or take their defaults, inserted): an
        upsert of the key alone on an existing row, like an update() of no columns,
        is an update that changes nothing, reported with no values and kept in
        history()."""
        return _change("upsert", self._info.name, None, self._values(row, columns, "upsert"))

    def update(self, key: Any, values: Optional[Mapping[str, Any]] = None, /,
               **columns: Any) -> Change:
        """A Change setting some columns of the row with this key."""
        return Change("update", self.name, _as_key(key), self._values(values, columns, "update"))

    def delete(self, key: Any) -> Change:
        """A Change deleting the row with this key."""
        return Change("delete", self.name, _as_key(key), None)


def _as_key(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


class View:
    """The read model, read-only: ``view.users`` or ``view["users"]`` is a Table."""

    def __init__(self, model: _Model, seq: Optional[int] = None, owned: bool = False) -> None:
        self._model = model
        self._tables = {name: Table(self, info) for name, info in model.tables.items()}
        self._seq = seq
        self._owned = owned  # an as-of view owns its private database
        # Each table as a plain attribute too: reducers read view.<table> on every
        # event, and this skips __getattr__. A name View itself uses (or a private
        # one) stays a view[name] lookup, as before.
        for name, table in self._tables.items():
            if not name.startswith("_") and not hasattr(View, name):
                self.__dict__[name] = table

    @property
    def seq(self) -> Optional[int]:
        """For a view of the past (store.at), the seq it shows; None for the live view."""
        return self._seq

    def close(self) -> None:
        """Release a view of the past (its private copy); the live view ignores it."""
        if self._owned:
            with self._model.lock:  # closing a connection SQLite is reading crashes the process
                self._model.conn.close()

    @property
    def tables(self) -> List[str]:
        """The read-model table names, sorted."""
        return sorted(self._tables)

    def __getitem__(self, name: str) -> Table:
        if not isinstance(name, str):  # a list or dict: not the dict lookup's "unhashable"
            raise _NoTableKey(f"view[...] takes a table name (str); received {_describe(name)}. "
                              f"The tables are: {', '.join(self.tables)}.")
        table = self._tables.get(name)
        if table is None:
            raise _NoTableKey(self._no_table(name))
        return table

    def __getattr__(self, name: str) -> Table:
        if name.startswith("_"):
            raise AttributeError(name)
        table = self._tables.get(name)
        if table is None:
            raise _NoTableAttribute(self._no_table(name))
        return table

    def _no_table(self, name: Any) -> str:
        return (f"No read-model table {_quoted(name)}; the tables are: {', '.join(self.tables)}. "
                f"Table names are case-sensitive and must match the schema.")

    def __iter__(self) -> Iterator[Table]:
        return iter(self._tables[name] for name in self.tables)

    def query(self, sql: str, params: Any = ()) -> List[Dict[str, Any]]:
        """Read-only SQL; rows as dicts. Write statements are refused (QueryError)."""
        return self._model.query(sql, params)

    def __enter__(self) -> "View":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


CollectionReducer = Callable[[Table, Event], Any]
Reducer = Callable[[View, Event], Any]


def _check_reducer_tables(reducer: Optional[Reducer], tables: Sequence[str]) -> None:
    """A combined reducer's tables must all be in the schema: checked before anything
    is committed (a new store, a rebuild's swap), so that refusing it changes nothing."""
    for name in getattr(reducer, "fluxlite_tables", ()):
        if name not in tables:
            raise SchemaError(
                f"The combined reducer has a reducer for table {name!r}, which "
                f"the schema does not create (tables: {', '.join(tables)}). Nothing "
                f"was changed; add the table to the schema or drop its reducer."
            )


def _check_takes_two(function: Callable[..., Any], what: str, arguments: str,
                     name: str = "reducer") -> None:
    """A reducer (or a rule's predicate) is called with two positional arguments:
    say so at open(), not as a TypeError on the first event."""
    _check_takes(function, 2, what, arguments, name)


def _check_takes(function: Callable[..., Any], count: int, what: str, arguments: str,
                 name: str, shape: str = "") -> None:
    """``function`` is called with ``count`` positional arguments: else a UsageError
    now, not a TypeError later. Only plain functions and methods are judged (as they
    are, not what they wrap); other callables pass."""
    if not (inspect.isfunction(function) or inspect.ismethod(function)):
        return
    try:
        signature = inspect.signature(function, follow_wrapped=False)
    except Exception:  # nothing reliable to read
        return
    try:
        signature.bind(*[None] * count)
    except TypeError:
        raise UsageError(
            f"{what} is called as {name}{arguments}, with {('one argument', 'two arguments')[count - 1]}; "
            f"{_describe(function)} cannot take {('it', 'them')[count - 1]}. Give it the signature "
            f"{arguments}{shape}."
        ) from None


def combine(reducers: Mapping[str, CollectionReducer]) -> Reducer:
    """The seed's combineReducers: one reducer per table, called as ``(table, event)``.

    Each may read any table (``table.view``) but may only return changes for
    its own table; anything else is a ChangesetError. Reducers run in the
    dict's order, each on the model as it was before the event (none sees
    another's changes), and then all their changes are applied in that order.
    """
    if not isinstance(reducers, _Mapping) or not reducers:
        raise UsageError(
            f"combine() takes a non-empty dict of table name -> reducer(table, event); "
            f"received {_describe(reducers)}."
        )
    for name, reducer in reducers.items():
        if not isinstance(name, str) or not callable(reducer):
            raise UsageError(
                f"combine() needs table names mapped to callables; {name!r} maps to "
                f"{_describe(reducer)}."
            )
        _check_takes_two(reducer, f"The reducer for {name!r}", "(table, event)")
    items = list(reducers.items())

    def combined(view: View, event: Event) -> List[Change]:
        out: List[Change] = []
        for name, reducer in items:
            table = view[name] if name in view.tables else None
            if table is None:
                raise ChangesetError(
                    f"combine() has a reducer for table {name!r}, which is not in "
                    f"the schema (tables: {', '.join(view.tables)})."
                )
            for change in _normalize_changes(reducer(table, event), event):
                if change.table != name:
                    raise ChangesetError(
                        f"The {name!r} reducer returned a change for table "
                        f"{change.table!r} on {_quoted(event.type)}; a combined reducer may "
                        f"only change its own table. Move that logic to the "
                        f"{change.table!r} reducer."
                    )
                out.append(change)
        return out

    combined.fluxlite_tables = tuple(reducers)  # type: ignore[attr-defined]
    return combined


#: Built-in event types. ``fluxlite.restore`` sets a row back to an earlier
#: version (payload: table, key, row); ``fluxlite.baseline`` records the rows
#: an adopted database already had (payload: table, rows). They reach the
#: store's reducer never: fluxlite reduces them itself, live and in replay.
RESTORE = "fluxlite.restore"
BASELINE = "fluxlite.baseline"


def _restore_reducer(view: View, event: Event) -> List[Change]:
    p = event.payload
    if not (isinstance(p, dict) and {"table", "key", "row"} <= set(p)
            and isinstance(p["row"], dict)):
        raise InvalidEvent(
            f"A {RESTORE!r} event's payload is {{table, key, row}}; received "
            f"{_describe(p)}. Use store.restore() to make one."
        )
    if p["table"] not in view.tables:
        raise ChangesetError(
            f"A {RESTORE!r} event names table {p['table']!r}, which the schema does not "
            f"have. After renaming a table or column, give open() an upcaster for "
            f"{RESTORE!r} that renames it in the payload (after dropping the table, one "
            f"that gives such events a type of your own that the reducer ignores)."
        )
    table, key = view[p["table"]], _as_key(p["key"])
    unknown = [c for c in p["row"] if c not in table.columns]
    if unknown:
        raise ChangesetError(
            f"A {RESTORE!r} event's row has column(s) {', '.join(map(repr, unknown))} that "
            f"table {table.name!r} no longer has (it has {', '.join(table.columns)}). After "
            f"renaming or adding columns, give open() an upcaster for {RESTORE!r} that "
            f"maps the old row to the new shape, filling computed columns too."
        )
    writable = table._info.writable  # generated columns: SQLite computes them again
    # A row logged before columns were added lacks them: restored over a live row it
    # would keep that row's newer values there, into the table's default or NULL if
    # deleted, a mix of versions no one asked for, silently.
    missing = [c for c in table.columns if c in writable and c not in p["row"]]
    if missing:
        raise ChangesetError(
            f"A {RESTORE!r} event's row lacks column(s) {', '.join(map(repr, missing))} "
            f"that table {table.name!r} has now (the row has {', '.join(p['row']) or 'none'}): "
            f"it was logged before they were added. Give open() an upcaster for "
            f"{RESTORE!r} that maps the old row to the new shape, giving those columns "
            f"the values the reducers would have given that version of the row."
        )
    row = {c: v for c, v in p["row"].items() if c in writable}
    if table.get(key) is None:
        return [Change("insert", table.name, key, row)]
    rest = {c: v for c, v in row.items() if c not in table.primary_key}
    return [Change("update", table.name, key, rest)]


def _baseline_reducer(view: View, event: Event) -> List[Change]:
    p = event.payload
    if not (isinstance(p, dict) and isinstance(p.get("rows"), list)
            and isinstance(p.get("table"), str)):
        raise InvalidEvent(
            f"A {BASELINE!r} event's payload is {{table, rows}} naming a read-model "
            f"table; received {_describe(p)}."
        )
    if p["table"] not in view.tables:
        raise ChangesetError(
            f"A {BASELINE!r} event holds the adopted rows of table {p['table']!r}, which the "
            f"schema does not have. After renaming that table, give open() an upcaster for "
            f"{BASELINE!r} that renames it in the payload; after dropping it, one that "
            f"gives its baseline a type of your own that the reducer ignores."
        )
    return [Change("insert", p["table"], None, row) for row in p["rows"]]


_BUILTIN_REDUCERS: Dict[str, Reducer] = {RESTORE: _restore_reducer, BASELINE: _baseline_reducer}


def _reduce(reducer: Reducer, view: View, event: Event) -> List[Change]:
    """Run the reducer (or a built-in) on one event: the same code live and in replay."""
    model = view._model
    try:
        model.query_mode = 2  # (set inside: it must never outlive the call)
        out = _BUILTIN_REDUCERS.get(event.type, reducer)(view, event)
    except FluxliteError:
        raise
    except Exception as exc:
        raise ReducerError(
            f"The reducer raised {type(exc).__name__}: {exc} on event {event.seq} "
            f"({_quoted(event.type)}, id {_quoted(event.id)}); nothing was written. Raise "
            f"fluxlite.Rejected to refuse an event on purpose."
        ) from exc
    finally:
        model.query_mode = 0
    return _normalize_changes(out, event)


Upcaster = Callable[[Event], Optional[Event]]

# What follow() (the store's, a consumer's) returns: a generator, typed as one (not as
# an Iterator), so that close() on it, or contextlib.closing(store.follow()), type-checks.
_Following = Generator[Tuple[Event, List[Change]], None, None]

# Steps one event may take through the upcasters before they count as never settling:
# an app's renames and one-version-at-a-time upgrades of a type add up over the years
# (16 refused a chain of 17); a cycle still ends in milliseconds.
_MAX_UPCASTS = 1000


def _make_upcaster(upcasters: Optional[Mapping[str, Upcaster]]) -> Callable[[Event], Event]:
    """One function applying the upcasters by type until the event stops changing."""
    if not upcasters:
        return lambda event: event
    if not isinstance(upcasters, _Mapping):
        raise UsageError(f"upcasters must be a dict of event type -> function(event) -> "
                         f"event; received {_describe(upcasters)}.")
    for kind, upcaster in upcasters.items():
        if not isinstance(kind, str) or not callable(upcaster):
            raise UsageError(f"upcasters must map event types (str) to functions(event) -> "
                             f"event; {_quoted(kind)} maps to {_describe(upcaster)}.")
    table = dict(upcasters)

    def upcast(event: Event) -> Event:
        for _ in range(_MAX_UPCASTS):
            upcaster = table.get(event.type)
            if upcaster is None:
                return event
            try:
                newer = upcaster(event)
            except FluxliteError:  # as a reducer's: itself (a refused dispatch, say)
                raise
            except Exception as exc:
                raise ReducerError(
                    f"The upcaster for {_quoted(event.type)} raised {type(exc).__name__}: {exc} "
                    f"on event {event.seq} (id {_quoted(event.id)}). An upcaster must accept every "
                    f"shape of its event type in the log, the current one too (return it "
                    f"unchanged)."
                ) from exc
            if newer is None or newer == event:
                return event
            if not isinstance(newer, Event) or (newer.seq, newer.id, newer.ts) != (
                    event.seq, event.id, event.ts):
                raise UsageError(
                    f"The upcaster for {_quoted(event.type)} returned {_describe(newer)}; an "
                    f"upcaster returns the event with a new type, payload or meta "
                    f"(event.replace(...)), keeping seq, id and ts."
                )
            _check_upcast_shape(newer, event)
            event = newer
        raise UsageError(
            f"Upcasters did not settle on event {event.seq} ({_quoted(event.type)}) after "
            f"{_MAX_UPCASTS} steps; an upcaster must return a current-shape event "
            f"unchanged (or None), and the upcasters must not turn types into each other "
            f"in a cycle."
        )

    return upcast


def _check_upcast_shape(newer: Event, event: Event) -> None:
    """What an upcaster returns is an event as dispatch() would take it: a type
    that is a non-empty string (a list would be a raw TypeError in the next lookup;
    None or 5 would reach reducers, rules and subscribers) and a dict of meta."""
    kind, meta = newer.type, newer.meta
    if isinstance(kind, str) and kind.strip() and isinstance(meta, _Mapping):
        _check_upcast_json(newer, event)
        return
    wrong = (f"type {_describe(kind)}" if not (isinstance(kind, str) and kind.strip())
             else f"meta {_describe(meta)}")
    raise UsageError(
        f"The upcaster for {_quoted(event.type)} returned event {event.seq} (id {_quoted(event.id)}) "
        f"with {wrong}; an event's type is a non-empty string and its meta a dict. "
        f"Return event.replace(type='newName', payload=..., meta={{...}})."
    )


def _check_upcast_json(newer: Event, event: Event) -> None:
    """An upcast payload and meta are JSON, as a logged event's are: code hands
    events on as JSON (Event.to_dict(), `fluxlite dispatch --app`, a web app's
    feed), and a date an upcaster put in failed there, after the commit (the CLI
    printed a traceback for a dispatch that had committed)."""
    for what, value in (("payload", newer.payload), ("meta", newer.meta)):
        try:
            _to_json_text(value, what)
        except InvalidEvent as exc:
            raise UsageError(
                f"The upcaster for {_quoted(event.type)} returned event {event.seq} (id "
                f"{_quoted(event.id)}) with a {what} that is not JSON; an upcaster returns "
                f"the plain JSON data a dispatch would log. {exc}"
            ) from None


###############################################################################
# 9. The store
###############################################################################


@dataclasses.dataclass
class _Prepared:
    """An event checked and encoded before its transaction opens."""

    id: str
    id_given: bool
    type: str
    payload_text: str
    meta_text: str
    payload: Any
    meta: Dict[str, Any]
    seq: Optional[int] = None  # fixed when copying a logged event (replay, import)
    ts: Optional[str] = None


_ACTION_KEYS = frozenset(("type", "payload", "meta", "id"))


def _action_from(type_or_action: Any, payload: Any, meta: Any, id: Any,
                 actor: Any) -> Dict[str, Any]:
    # A str type, the usual call, is told apart first: isinstance() with an ABC is slow.
    if type_or_action.__class__ is not str and (
            type_or_action.__class__ is dict or isinstance(type_or_action, _Mapping)):
        extra = type_or_action.keys() - _ACTION_KEYS
        if extra:
            raise InvalidEvent(
                f"An event dict has the keys type, payload, meta and id (Flux "
                f"Standard Action); received unknown key(s) {sorted(extra, key=repr)}."
                + (" seq and ts are set when the event commits: to copy a log with "
                   "them (an export's lines), use `fluxlite import`, or replay(into=) "
                   "for a new store." if extra & {"seq", "ts"} else "")
                + (" actor and expect_seq are arguments, not keys: dispatch(event, "
                   "actor=..., expect_seq=...) (dispatch_many() takes them for the whole "
                   "batch)." if extra & {"actor", "expect_seq"} else "")
            )
        if payload is not None or meta is not None or id is not None:
            raise InvalidEvent(
                "Pass payload, meta and id inside the event dict, not also as arguments."
            )
        action = dict(type_or_action)
        action.setdefault("payload", None)
        meta = action.get("meta")
        action.setdefault("id", None)
    else:
        action = {"type": type_or_action, "payload": payload, "meta": meta, "id": id}
    # Checked before the middleware chain, so that middleware sees a type and a meta
    # it can use (_prepare checks the rest after it).
    _check_type(action.get("type"))
    if meta is None:
        action["meta"] = {}
    elif meta.__class__ is dict or isinstance(meta, _Mapping):
        action["meta"] = dict(meta)
    else:
        raise InvalidEvent(f"An event's meta must be a dict; received {_describe(meta)}.")
    if actor is not None:
        action["meta"]["actor"] = _check_actor(actor)
    return action


def _check_actor(actor: Any) -> Optional[str]:
    """``actor=``: who dispatches, a non-empty str (or None: not recorded)."""
    if actor is None:
        return None
    if not isinstance(actor, str) or not actor.strip():
        raise InvalidEvent(
            f"An event's actor (actor=, recorded as meta[\"actor\"]) must be a non-empty "
            f"string such as 'admin', or None; received {_describe(actor)}. Pass who "
            f"dispatches as text (str(user.id), say), or leave actor out."
        )
    return _check_text(actor, "An event's actor", InvalidEvent)


def _batch_action(event: Any, position: int, actor: Optional[str] = None) -> Dict[str, Any]:
    """An item of dispatch_many(): an event dict only (a bare type is dispatch()'s)."""
    if event.__class__ is not dict and not isinstance(event, _Mapping):
        raise InvalidEvent(
            f"dispatch_many() takes event dicts such as {{'type': 'addUser', 'payload': "
            f"{{...}}}}; item {position} is {_describe(event)}. Nothing was dispatched."
        )
    return _action_from(event, None, None, None, actor)


def _name_batch_item(exc: BaseException, index: int, count: int, item: Any) -> None:
    """Say which item of a dispatch_many() list was refused, keeping the exception's
    class and message, which code catching it relies on (then_rejected(match=), an
    HTTP handler's mapping): its 0-based index as ``exc.batch_index``, and a note,
    shown under the message in a traceback (add_note(); before Python 3.11, kept in
    ``exc.__notes__`` only). Every refusal of a batch is named so: one of an item's
    shape, of a middleware (whatever it raises), of a reducer or upcaster."""
    if not isinstance(exc, Exception):  # Ctrl-C, SystemExit: no item's refusal
        return
    if isinstance(item, _Mapping):
        event_id = item.get("id")
        what = f"type {_quoted(item.get('type'))}" + (
            f", id {_quoted(event_id)}" if event_id is not None else "")
    else:
        what = _describe(item)
    note = (f"{_BATCH_NOTE}{index} (counting from 0) of the {count} in "
            f"its list: {what}. The whole batch was refused.")
    try:
        setattr(exc, "batch_index", index)
    except (AttributeError, TypeError):  # an exception that takes no attributes
        pass
    # One such note, this batch's: an exception object raised again (a module's
    # OUT_OF_STOCK = Rejected(...), raised at each refusal) gathered one note per
    # refused batch, every earlier one naming another batch's item, without end.
    # (What add_note() does, by hand: before Python 3.11 there is no add_note().)
    notes = getattr(exc, "__notes__", None)
    if notes is not None and not isinstance(notes, list):  # not Python's: left alone
        return
    kept = [n for n in notes or () if not (isinstance(n, str) and n.startswith(_BATCH_NOTE))]
    try:
        setattr(exc, "__notes__", kept + [note])
    except (AttributeError, TypeError):
        pass


_BATCH_NOTE = "dispatch_many() refused item "  # how _name_batch_item's note begins


def _check_type(kind: Any) -> str:
    if not isinstance(kind, str) or not kind.strip():
        raise InvalidEvent(
            f"An event type must be a non-empty string such as 'addUser'; received "
            f"{_describe(kind)}."
        )
    return kind


def _check_passed_dict(action: Any) -> None:
    if action.__class__ is not dict and not isinstance(action, _Mapping):
        raise InvalidEvent(
            f"Middleware must pass an event dict (type, payload, meta, id) to next(); "
            f"received {_describe(action)}."
        )


def _check_passed_keys(action: Any) -> None:
    """What a middleware passes to next() has the keys dispatch() takes in an event dict:
    another key (actor, seq, ts) would be dropped without a word, so that an actor a
    middleware meant to set as {**event, "actor": user} would not be recorded."""
    _check_passed_dict(action)
    extra = action.keys() - _ACTION_KEYS
    if extra:
        raise InvalidEvent(
            f"Middleware passed next() an event dict with unknown key(s) "
            f"{sorted(extra, key=repr)}; an event dict has the keys type, payload, meta "
            f"and id (Flux Standard Action). "
            + ("Put the actor in meta: next({**event, \"meta\": {**event[\"meta\"], "
               "\"actor\": ...}})." if "actor" in extra else
               "Leave the others out (seq and ts are set when the event commits).")
        )


def _prepare(action: Any, ids: Callable[[], str]) -> _Prepared:
    _check_passed_dict(action)
    kind = _check_text(_check_type(action.get("type")), "An event type", InvalidEvent)
    if kind.__class__ is not str:
        kind = _plain_str(kind)
    if kind == BASELINE:
        raise InvalidEvent(
            f"{BASELINE!r} events are recorded by open(..., adopt=True) only: they insert "
            f"rows without a reducer. Dispatch your own event type instead."
        )
    if kind.startswith("fluxlite.") and kind not in _BUILTIN_REDUCERS:
        raise InvalidEvent(
            f"Event types starting with 'fluxlite.' are reserved for built-in events "
            f"({', '.join(sorted(_BUILTIN_REDUCERS))}); received {_quoted(kind)}. Rename the type."
        )
    meta = action.get("meta")
    meta = {} if meta is None else meta
    if (meta.__class__ is not dict and not isinstance(meta, _Mapping)
            or meta and not all(k.__class__ is str or isinstance(k, str) for k in meta)):
        raise InvalidEvent(
            f"An event's meta must be a dict with str keys; received {_describe(meta)}."
        )
    event_id = action.get("id")
    if event_id is not None and (not isinstance(event_id, str) or not event_id.strip()):
        raise InvalidEvent(
            f"An event id must be a non-empty string (it is the idempotency key); "
            f"received {_describe(event_id)}. Omit it to have one generated."
        )
    if event_id is not None:
        _check_text(event_id, "An event id", InvalidEvent)
    payload = action.get("payload")
    payload_text = _to_json_text(payload, "payload")
    meta_text = _to_json_text(dict(meta), "meta") if meta else "{}"
    stored_payload = _loads(payload_text)
    stored_meta = _loads(meta_text) if meta else {}
    # json writes a key 1 as "1": {1: a, "1": b} would be stored with two "1"s and
    # read back with one. Equal as read back (one comparison, in C) is the usual case.
    if stored_payload.__class__ in (dict, list) and stored_payload != payload:
        _check_keys_distinct(payload, "payload")
    if stored_meta and stored_meta != meta:
        _check_keys_distinct(meta, "meta")
    given = event_id is not None
    if not given:
        event_id = ids()
    if event_id.__class__ is not str:
        event_id = _plain_str(event_id)
    # Positional, in the fields' order: keyword arguments to a class cost a dict per call.
    return _Prepared(event_id, given, kind, payload_text, meta_text, stored_payload,
                     stored_meta)


def _plain_str(text: str) -> str:
    """A str subclass's text as a plain str (a str Enum's member: its value, as
    sqlite3 stores it). The seal hashes the log's values by their type, and
    reading the log back gives str: hashed as a subclass, the event was reported
    as damage by verify(). Replayed, a reducer sees the plain str too."""
    return str.__str__(text)


def _check_keys_distinct(value: Any, what: str) -> None:
    """InvalidEvent for a dict, anywhere in an event's value, with two keys that JSON
    writes as the same text (1 and "1", True and "true"): one entry would be lost."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if not all(k.__class__ is str for k in item):
                texts = [k if isinstance(k, str) else _dumps(k) for k in item]
                if len(set(texts)) < len(texts):
                    raise InvalidEvent(
                        f"An event's {what} has a dict whose keys JSON writes as the same "
                        f"text (JSON keys are text: 1 becomes \"1\"), so one entry would be "
                        f"lost: {_describe(item)}. Give each entry a distinct str key."
                    )
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def _prepared_from_row(row: Sequence[Any]) -> _Prepared:
    """A logged event, to be copied exactly (seq, id, ts, payload and meta text)."""
    seq, event_id, kind, payload, meta, ts = row
    return _Prepared(id=event_id, id_given=True, type=kind, payload_text=payload,
                     meta_text=meta, payload=json.loads(payload) if payload is not None else None,
                     meta=json.loads(meta) if meta else {}, seq=seq, ts=ts)


def _event_from_row(row: Sequence[Any]) -> Event:
    seq, event_id, kind, payload, meta, ts = row
    event = object.__new__(Event)  # the fields come from the log: no checks (hot path)
    # Set item by item, and _loads and _parse_ts inlined: about a third less time than
    # update() with keywords (no keyword dict, two calls fewer), in every event that
    # verify() and rebuild() replay (verify()'s read of the log: ~1 us less per event).
    fields = event.__dict__
    try:
        fields["seq"], fields["id"], fields["type"] = seq, event_id, kind
        fields["payload"] = _raw_decode(payload)[0] if payload is not None else None
        fields["meta"] = _raw_decode(meta)[0] if meta and meta != "{}" else {}
        fields["ts"] = _fromisoformat(ts)
    except (ValueError, TypeError) as exc:
        raise _unreadable_event(seq, exc) from exc
    return event


def _unreadable_event(seq: int, exc: Exception) -> StorageError:
    if "integer string conversion" in str(exc):  # Python 3.11+'s limit on digits
        return StorageError(
            f"Event {seq} holds an integer of more digits than this Python reads ({exc}). "
            f"The log is not damaged: a Python before 3.11, which has no such limit, "
            f"logged it. Read it after sys.set_int_max_str_digits(0)."
        )
    return StorageError(
        f"Event {seq} in the log is damaged and cannot be read ({exc}). Check the file "
        f"with PRAGMA integrity_check and restore it from a backup."
    )


class _reading:
    """Reads of the log: SQLite's errors about a damaged file, as StorageError.

    A class, not a @contextmanager: event() enters it per call (and events() per
    page); the generator-based one, with event()'s SQL built per call, was an
    eighth of an event(seq)'s instructions."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, traceback: Any) -> None:
        if isinstance(exc, sqlite3.DatabaseError) and _is_damage(exc):
            raise StorageError(
                f"{self.path!r} is damaged: {exc}. Check it with PRAGMA integrity_check and "
                f"restore it from a backup."
            ) from exc


_EVENT_BY_SEQ = f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq = ?"
_EVENT_BY_ID = f"SELECT {_EVENT_COLUMNS} FROM events WHERE id = ?"
_INSERT_EVENT = f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
_INSERT_JOURNAL = "INSERT INTO fluxlite_journal VALUES (?, ?, ?, ?, ?, ?, ?)"
_INSERT_SEAL = "INSERT INTO fluxlite_seals VALUES (?, ?, ?)"


def _file_ids(path: str) -> Dict[str, Optional[Tuple[int, int]]]:
    """(device, inode) of a store file and its -wal and -shm; None where missing."""
    ids: Dict[str, Optional[Tuple[int, int]]] = {}
    for suffix in ("", "-wal", "-shm"):
        try:
            info = os.stat(path + suffix)
            ids[suffix] = (info.st_dev, info.st_ino)
        except OSError:
            ids[suffix] = None
    return ids


def _insert_rows(conn: Union[sqlite3.Connection, sqlite3.Cursor], sql: str,
                 rows: List[Tuple[Any, ...]]) -> None:
    if len(rows) == 1:
        conn.execute(sql, rows[0])  # cheaper than executemany for one row
    elif rows:
        conn.executemany(sql, rows)
# What a write transaction reads first, in one statement: the rebuild
# generation, the head, the last event's ts and the last seal's two links.
_HEAD_SQL = """SELECT (SELECT value FROM fluxlite_meta WHERE key = 'generation'),
    (SELECT seq FROM events ORDER BY seq DESC LIMIT 1),
    (SELECT ts FROM events ORDER BY seq DESC LIMIT 1),
    (SELECT events || ' ' || journal FROM fluxlite_seals ORDER BY seq DESC LIMIT 1)"""


# Stores open in this process. While the process forks, each store's lock is
# held, so that none is inside a transaction: the child closes its copies of
# their connections, and a copy closed in the middle of a write could undo the
# parent's write in the WAL index the two processes share.
_OPEN_STORES: "weakref.WeakSet[Store]" = weakref.WeakSet()
_OPEN_STORES_LOCK = threading.RLock()  # held from before a fork until after it
_HELD_FOR_FORK: Dict[int, List["Store"]] = {}  # per forking thread
_FORK_WAIT = 5.0  # seconds a fork waits, in all, for stores in use to finish


def _before_fork() -> None:
    _OPEN_STORES_LOCK.acquire()
    held = _HELD_FOR_FORK.setdefault(threading.get_ident(), [])
    deadline = time.monotonic() + _FORK_WAIT
    for store in list(_OPEN_STORES):
        if store._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            held.append(store)


def _release_for_fork() -> List["Store"]:
    held = _HELD_FOR_FORK.pop(threading.get_ident(), [])
    for store in held:
        store._lock.release()
    _OPEN_STORES_LOCK.release()
    return held


def _after_fork_in_child() -> None:
    quiet = set(map(id, _release_for_fork()))  # this thread's holds, which came along
    _HELD_FOR_FORK.clear()  # other threads' entries: those threads did not
    for store in list(_OPEN_STORES):
        try:
            store._after_fork(id(store) in quiet)
        except Exception:  # one store's trouble must not leave the others usable
            store._closed = store._forked = True


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(before=_before_fork, after_in_parent=_release_for_fork,
                        after_in_child=_after_fork_in_child)


def _stop_threads_at_exit() -> None:
    """At interpreter exit, end the threads of stores left open (watch(), checkpoints).
    Daemon threads stop wherever they are: the checkpoint thread with its connection
    to the file open, watch()'s maybe holding the store. Then the store's connection
    is not the file's last to close (or never closes), so SQLite leaves the -wal and
    -shm, with the last commits in the -wal: a copy of the bare file misses them.
    Bounded waits: a thread held up in a subscriber must not hold up the exit."""
    if not _OPEN_STORES_LOCK.acquire(timeout=1.0):  # (a daemon thread forking, say)
        return
    try:
        stores = list(_OPEN_STORES)
    finally:
        _OPEN_STORES_LOCK.release()
    held: List["Store"] = []  # stores whose lock another thread kept for the whole wait
    for store in stores:
        if store._closed:
            continue
        with contextlib.suppress(Exception):
            if not store._stop_watch_thread(wait=1.0):
                held.append(store)
            if store._checkpointer is not None:
                store._checkpointer.stop(wait=1.0)
    for store in stores:
        if not any(store is other for other in held):  # (waited for once: not twice)
            _close_reader_at_exit(store)


def _close_reader_at_exit(store: "Store") -> None:
    """Close a readonly=True store left open at exit. Left to the collector, which
    closes connections in no set order, its read-only connection could close after
    a writer's, as the file's last: SQLite then keeps the -wal, with the writer's
    last commits in it (a copy of the bare file missed them all). Its close() closes
    the file once more through a connection that can write (_tidy_after_reading),
    and a writer left open, collected after it, closes last. Not if another thread
    holds the store, or its watch() thread did not stop: a bounded wait, at exit."""
    if store._closed or not store._readonly_file or not store._lock.acquire(timeout=1.0):
        return
    try:
        if store._watcher is None:
            with contextlib.suppress(Exception):
                store.close()
    finally:
        store._lock.release()


atexit.register(_stop_threads_at_exit)


class Store:
    """An event-sourced store on one SQLite file. Make one with fluxlite.open().

    The rules of a dispatch (each enforced in code, with its own error):

    1. An event is checked before any transaction opens: a non-empty str
       type, JSON payload and meta, a non-empty str id if given (InvalidEvent).
    2. Middleware sees the event first, as a plain dict; it may change it,
       refuse it by raising (e.g. Forbidden), or dispatch other events.
    3. One dispatch (or one dispatch_many) is one BEGIN IMMEDIATE
       transaction: the event rows, the read-model changes and their journal
       rows commit together, or nothing is written.
    4. An id already in the log with the same type and payload returns the
       stored event and applies nothing; with other content it is a Conflict.
       expect_seq=N is a Conflict unless the head is N at commit time.
    5. The reducer sees the read model as of the transaction (earlier events
       of the batch included) and may only read it: query() refuses writes,
       and inside a reducer reads of the log. It may not dispatch
       (UsageError); an upcaster may read only its event and may not
       dispatch either, in replays (verify(), rebuild()) too. Anything it
       raises rolls everything back: a
       FluxliteError (Rejected, ChangesetError...) as itself, anything else
       as ReducerError naming the event, with the original as __cause__.
    6. Changes name tables and columns of the schema; they are checked before
       any SQL is built, and values are always bound parameters.
    7. Subscribers run after commit only, never for a rolled-back event, in
       subscription order, on a snapshot of the list taken per event (an
       unsubscribe() meanwhile counts from the next event); each is a plain
       function of (event, changes), called synchronously (an async def is
       refused by subscribe()). One
       that raises is logged and does not stop the others. A subscriber may
       dispatch; that event is delivered after the current one, so every
       subscriber hears events in seq order. One thread delivers at a time,
       other threads' events too: their dispatches do not wait for it.

    A Store may be shared between threads (a lock serialises its
    connection); several processes may open and write the same file.
    """

    def __init__(self, conn: sqlite3.Connection, path: str, tables: Mapping[str, _TableInfo],
                 reducer: Optional[Reducer], schema: str, *, durability: str,
                 clock: Callable[[], datetime], ids: Callable[[], str], version: Any,
                 generation: int, upcasters: Optional[Mapping[str, Upcaster]],
                 middleware: Sequence[Middleware], readonly_file: bool = False) -> None:
        self._conn = conn
        # A dispatch's statements on the log (data_version, the event, journal and
        # seal rows) run on this one cursor: conn.execute() makes and frees a cursor
        # per statement, 5-10% of a small INSERT's cost. Each returns no row, or one
        # row fetched at once, so the cursor never keeps a statement (and a read) open.
        self._cursor = conn.cursor()
        self._version = version
        self._generation = generation
        self._generation_text = _dumps(generation)  # as fluxlite_meta holds it
        self._upcasters = dict(upcasters or {})
        self._upcast = _make_upcaster(upcasters)
        self._middleware = list(middleware)
        self._lock = threading.RLock()
        self._model = _Model(conn, tables, self._lock)
        self._pid = os.getpid()  # a child of fork() has a copy: see _after_fork
        self._forked = False
        self._view = View(self._model)
        self._reducer = reducer
        self._path = path
        # Absolute, for the checks on the file itself: a chdir must not point them
        # at another file (SQLite keeps the file it opened).
        self._file = _sqlite_file(path) if path not in (":memory:", "") else path
        self._schema = schema
        self._durability = durability
        self._clock = clock
        self._ids = ids
        self._closed = False
        self._reducing_thread: Optional[int] = None
        # Sets of threads, not one: verify() replays without the store's lock, so two
        # threads may be in these at once (each put back only what it changed).
        self._verifying_threads: Set[int] = set()  # in reducers, upcasters replayed beside
        self._verify_progress_threads: Set[int] = set()  # in verify()'s progress=
        self._progress_threads: Set[int] = set()  # in a progress= of verify() or rebuild()
        self._subscribers: List[Tuple[Callable[[Event, List[Change]], Any],
                                      Optional[FrozenSet[str]]]] = []
        self._pending: Deque[Tuple[Event, List[Change]]] = collections.deque()
        self._notify_lock = threading.RLock()
        self._notifying = threading.local()
        self._frames = threading.local()  # per-thread stack of dispatch frames
        self._previewing = 0
        self._preview_thread: Optional[int] = None  # previews hold _lock: one thread at a time
        # In a preview of a model with deferred references: the foreign-key violations
        # there were when it began (see _check_deferred_in_preview), else None.
        self._preview_fk: Optional["collections.Counter[Tuple[Any, ...]]"] = None
        self._head_cache: Optional[Tuple[Any, ...]] = None  # (data_version, generation, head, ts, seal)
        # The identity of the file and of its -wal and -shm, to notice a file
        # deleted or replaced while open (see _check_file and close).
        self._file_ids = _file_ids(self._file) if path not in (":memory:", "") else {}
        self._file_id = self._file_ids.get("")
        self._readonly_file = readonly_file
        self._reads_any_code = False  # set by open(): no schema, version or reducer given
        self._committed = threading.Condition()  # followers wake on this store's commits
        self._commit_count = 0
        self._watcher: Optional[threading.Thread] = None
        self._watch_cursor: Optional[_FollowCursor] = None  # watch()'s place in the log
        self._cursors: "weakref.WeakSet[_FollowCursor]" = weakref.WeakSet()  # reset_to() moves them
        # reset_to()s so far and the latest of them: a cursor placed without the lock
        # (afollow()) is moved by each one since, in order, when it joins the others.
        self._resets = 0
        self._reset_log: Deque[_Reset] = collections.deque(maxlen=_Lineage._DEEPEST)
        # This store's log since its last reset_to(): a checkpoint taken in it holds
        # the same events up to its seq (see _after_reset, _Lineage).
        self._lineage = _Lineage(None, 0)
        # owner -> name of the consumer leases this store took (plain strings: a
        # Consumer dropped without close() is released by close() all the same).
        self._leases: Dict[str, str] = {}
        self._chain: Callable[[Dict[str, Any]], Any] = _refuse_during_setup
        self._bare = False  # True once open() found no middleware (dispatch's fast path)
        self._checkpointer = (_WalCheckpointer(self._file)
                              if durability == "normal" and path not in (":memory:", "")
                              else None)
        if self._checkpointer is not None:
            weakref.finalize(self, self._checkpointer.stop_soon)
        with _OPEN_STORES_LOCK:  # once whole: a fork may look at it from now on
            _OPEN_STORES.add(self)

    # -- properties ------------------------------------------------------------

    @property
    def path(self) -> str:
        """The file path, or ":memory:"."""
        return self._path

    @property
    def schema(self) -> str:
        """The read-model DDL this store runs (after its rebuild, the new one).

        The file's, as it was opened, for a store with a reducer: after another
        store's rebuild with other code, it writes nothing (SchemaError) until reopened.
        A store opened without a reducer follows the file's.
        """
        self._take_files_code()
        return self._schema

    @property
    def version(self) -> Any:
        """The application's schema/reducer version this store runs (any JSON value).

        As for ``schema``: the file's, as of open() or this store's rebuild (a store
        opened without a reducer follows the file's).
        """
        self._take_files_code()
        return self._version

    @property
    def durability(self) -> str:
        """"full" (the default: fsync on every commit) or "normal"."""
        return self._durability

    @property
    def readonly(self) -> bool:
        """True when the store cannot dispatch: opened without a reducer, or readonly=True."""
        return self._reducer is None or self._readonly_file

    @property
    def view(self) -> View:
        """The live read model."""
        self._check_open()
        self._take_files_code()
        return self._view

    def _take_files_code(self) -> None:
        """A store opened without code (open(path)) reads the model the file has now,
        also after another process rebuilt it with other code: as its follow(), at()
        and history() do (see _check_generation), so do its view, schema and version."""
        if self._reads_any_code and not self._closed:
            with self._lock:
                if self._closed:  # by another thread, while this one waited for the lock
                    return
                with _read_txn(self._conn):
                    self._check_model_current()

    @property
    def head(self) -> int:
        """The seq of the last event in the log, 0 when it is empty."""
        with self._lock:
            self._check_open()
            row = self._conn.execute("SELECT max(seq) FROM events").fetchone()
            return row[0] or 0

    @property
    def generation(self) -> int:
        """A number the file changes whenever its tables change without an event:
        every reset_to() and every rebuild, by this store or any other, in any
        process. Subscribers are not told of those: a copy of the tables kept from
        their changes compares it with the one it was filled at, and refills."""
        with self._lock:
            self._check_open()
            stored = _stored_generation(self._conn)
        return int(json.loads(stored)) if stored else 0

    def __repr__(self) -> str:
        reducing = self._reducing_thread == threading.get_ident() or self._in_verify_replay()
        state = "closed" if self._closed else "reducing" if reducing else f"head={self.head}"
        return f"<fluxlite.Store {self._path!r} {state}>"

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (and stop watch()). Safe to call twice."""
        if not self._closed:
            self._check_open()  # not from inside a reducer
            if self._previewing and self._preview_thread == threading.get_ident():
                raise UsageError("close() cannot run inside a preview (from its middleware): "
                                 "the preview's transaction is still open. Close the store "
                                 "after preview() returns.")
            self._check_not_in_progress("close()")
        self._stop_watch_thread()
        with self._lock:
            if not self._closed:
                self._release_leases()
                # Its consumers can use their names no more: free at once in this
                # process even where the release above was left to run out.
                for owner in list(self._leases):
                    _LIVE_CONSUMERS.pop(owner, None)
                self._closed = True
                if self._checkpointer is not None:
                    self._checkpointer.stop()
                now = _file_ids(self._file)
                moved = self._file_id is not None and now[""] != self._file_id
                # Replaced, or moved away (renamed) with commits still in its own -wal
                # (this store's, or another's that this one reads): SQLite does not
                # checkpoint a moved file on close, since another process may use it
                # by its new name, so those commits are copied out beside the path.
                frames = moved and self._own_wal_has_frames(now)
                saved = moved and (now[""] is not None or frames) and self._save_replaced()
                if not moved and not self._readonly_file and self._file not in (":memory:", ""):
                    # SQLite does this only when the closing connection is the file's
                    # last. A writer closed before a reader (a readonly=True store
                    # in the same app) would leave the WAL, which the next open's
                    # recovery counts as not copied, so it could never restart: it
                    # would grow by every session's commits. Never waiting: it
                    # would hold up other processes' writers meanwhile.
                    _empty_wal(self._conn, self._path, wait_ms=0)
                self._conn.close()
                # Their -wal and -shm must not be inherited by a file made at the path;
                # but a -wal whose commits could not be saved is kept (the moved file's
                # last commits: open() refuses a new file beside it, and says so).
                if moved and (saved or now[""] is not None or not frames):
                    self._remove_stale_companions()
                if not moved and self._readonly_file:
                    self._tidy_after_reading()

    def _file_is_its_own(self) -> bool:
        """Whether the file at the store's path is still the one it opened (for a
        second connection to it: at() attaching it, verify() checking it)."""
        return self._file_id is not None and _file_ids(self._file)[""] == self._file_id

    def _page_size(self) -> int:
        return int(self._conn.execute("PRAGMA page_size").fetchone()[0])

    def _release_leases(self) -> None:
        """Free the names of consumers still open from this store, for others at once:
        best effort, in one transaction, waiting at most 0.1 s for the write lock
        (else their leases simply run out)."""
        leases = [(name, owner) for owner, name in list(self._leases.items())]
        if not leases or self._readonly_file:
            return
        try:
            with _short_wait(self._conn), _write_txn(self._conn):
                self._conn.executemany(_RELEASE_LEASE, leases)
        except sqlite3.Error as exc:
            _log.debug("consumer leases of %r left to run out: %s", self._path, exc)

    def _own_wal_has_frames(self, now: Dict[str, Optional[Tuple[int, int]]]) -> bool:
        """Whether the -wal at the path is still this store's, and not empty."""
        if now["-wal"] is None or now["-wal"] != self._file_ids.get("-wal"):
            return False  # deleted with its file: the store was deleted on purpose
        with contextlib.suppress(OSError):
            return os.path.getsize(self._file + "-wal") > 0
        return False

    def _save_replaced(self) -> bool:
        """Copy the store whose file was replaced or moved under it: its last commits
        live only in its -wal, which a file at the path must not inherit and which
        SQLite does not move into a moved file. Nothing is written to the file.
        Whether a sound copy was made."""
        copy = f"{self._file}.replaced-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        try:
            target = _connect(copy, self._durability, page_size=self._page_size())
            try:
                self._conn.backup(target)
                # A moved file another process writes under its new name can make
                # the copy a mixture of two states: keep only a sound store.
                problems = [r[0] for r in target.execute("PRAGMA integrity_check(1)")]
                if target.execute("SELECT 1 FROM sqlite_master WHERE name = 'events'"
                                  ).fetchone() is None:
                    problems.append("it holds no log")
            finally:
                target.close()
            if problems != ["ok"]:
                raise sqlite3.DatabaseError(f"the copy is not a sound store: {problems}")
        except (OSError, sqlite3.Error, FluxliteError) as exc:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.remove(copy + suffix)
            _log.error("%r was moved, deleted or replaced while open; saving the old store "
                       "to %r failed: %s", self._path, copy, exc)
            return False
        _log.warning("%r was moved, deleted or replaced while this store had it open; the "
                     "old store (all its events) is saved as %r.", self._path, copy)
        return True

    def _tidy_after_reading(self) -> None:
        """A read-only connection cannot checkpoint, nor delete the -wal and -shm it
        leaves: see _close_last. Its -wal is empty unless a writer closed while this
        store was reading (its checkpoint cannot pass a reader's snapshot), or was
        dropped without close(): then its last commits are only in the -wal, and a
        copy of the bare file after the app closed would miss them (or be a mixture
        of pages of two times, since a checkpoint stopped at a snapshot copies only
        the pages no later commit changed)."""
        file = self._file  # (through a symbolic link: the file it leads to, see _sqlite_file)
        if (os.path.exists(file + "-wal") or os.path.exists(file + "-shm")) \
                and self._file_is_its_own():
            _close_last(file)

    def _close_beside(self, conn: sqlite3.Connection) -> None:
        """Close a second connection to the file (verify(), rebuild() and fork() read
        through one, mode=ro). If another thread closed the store meanwhile, the
        store's connection was not the file's last (nor could its checkpoint pass this
        one's snapshot), and a read-only connection closing last leaves the -wal with
        the last commits in it: a copy of the bare file after close() missed them, or
        was damaged. So a connection that can write closes after it (_close_last)."""
        conn.close()
        if self._closed and not self._forked and self._file_is_its_own():
            _close_last(self._file)

    def _remove_stale_companions(self) -> None:
        """Remove this store's -wal and -shm once its file is gone or replaced.

        SQLite pairs a -wal with whatever file has the name: left behind, the
        old store's last commits would be replayed into the next file opened
        at this path. Only the very files this store opened are removed (a new
        store made at the path since then has its own).
        """
        now = _file_ids(self._file)
        removed = False
        for suffix in ("-wal", "-shm"):
            if now[suffix] is not None and now[suffix] == self._file_ids.get(suffix):
                with contextlib.suppress(OSError):
                    os.remove(self._file + suffix)
                    removed = True
        if removed:
            # A removal is on disk only once its directory is: after a power cut the
            # -wal could be back beside the file now at the path (its rename, synced
            # by SQLite with the saved copy's -wal), and replayed into it.
            _sync_directory(self._file)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_writable(self, what: str) -> None:
        self._check_open()
        if self._readonly_file:
            raise UsageError(f"{what} writes to the file, but this store was opened with "
                             f"readonly=True; open it without readonly=True.")

    def _after_fork(self, quiet: bool) -> None:
        """In the child of a fork(), on its copy of this store. Threads did not
        come along (delivery, watch(), checkpoints), nor locks other threads
        held. A store in memory is the child's own copy and goes on; a file's
        connection cannot cross a fork, so it is closed (left alone if it was
        inside a transaction: ``quiet`` False) and the store refuses use."""
        self._lock = self._model.lock = threading.RLock()
        self._committed = threading.Condition()
        if not getattr(self._notifying, "active", False):  # else this thread delivers: a
            self._notify_lock = threading.RLock()           # fork() inside a subscriber
        self._watcher, self._watch_cursor, self._checkpointer = None, None, None
        self._pending.clear()
        if self._closed:
            return
        if quiet and self._path in (":memory:", ""):
            return  # a transaction open is this thread's own (a fork inside a preview)
        # Not quiet: another thread was using the connection, and may have held
        # SQLite's own mutex of it, which nothing in the child would release.
        self._closed, self._forked = True, True
        if quiet:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()

    def _check_open(self) -> None:
        if self._closed:  # (tested here first: no call on every read and dispatch)
            self._check_not_closed()
        if (self._reducing_thread is not None and self._reducing_thread == threading.get_ident()
                or self._verifying_threads and threading.get_ident() in self._verifying_threads):
            raise UsageError(  # the authorizer alone misses statements already prepared
                "A reducer may read only its view (view.<table>, view.query()), an "
                "upcaster only its event: the store's log, head and methods are not there "
                "when the log is replayed. Take what is needed from the event."
            )

    def _check_not_closed(self) -> None:
        if self._closed:
            if self._forked:
                raise UsageError(
                    f"The store {self._path!r} was opened in process {self._pid}, not in "
                    f"this one: a SQLite connection cannot cross a fork(), so this copy "
                    f"is closed. Open the store again here, with fluxlite.open()."
                )
            raise UsageError(f"The store {self._path!r} is closed; open it again to use it.")

    # -- dispatch --------------------------------------------------------------

    def dispatch(self, type: Union[str, Mapping[str, Any]], payload: Any = None, *,
                 meta: Optional[Mapping[str, Any]] = None, id: Optional[str] = None,
                 actor: Optional[str] = None, expect_seq: Optional[int] = None
                 ) -> Optional[Event]:
        """Dispatch one event; return it as committed (what the middleware chain
        returns: None if a middleware ends the chain without calling next).

        ``type`` is the event type, or a whole event dict (type, payload, meta,
        id). ``actor`` is recorded as ``meta["actor"]``. ``id`` is the
        idempotency key. ``expect_seq`` makes the dispatch a Conflict unless
        the log's head is that seq (optimistic concurrency).
        """
        action = _action_from(type, payload, meta, id, actor)
        self._check_dispatchable()
        _check_expect_seq(expect_seq)
        result: Optional[Event]
        if self._bare:  # no middleware: the chain is the core, and needs no frame
            result = self._commit_prepared([_prepare(action, self._ids)], expect_seq)[0]
        else:
            frames = self._frame_stack()
            frames.append(_Frame(expect_seq))
            try:
                result = self._chain(action)
            finally:
                frames.pop()
                self._notify()  # also when a middleware raised after next() committed
            return result
        self._notify()
        return result

    def dispatch_many(self, events: Iterable[Mapping[str, Any]], *,
                      expect_seq: Optional[int] = None, actor: Optional[str] = None
                      ) -> List[Event]:
        """Dispatch event dicts in one transaction, all or nothing; return the committed events.

        ``actor`` is recorded as every event's ``meta["actor"]``, as dispatch()'s;
        ``expect_seq`` is dispatch()'s, for the whole batch (a Conflict unless the
        log's head is that seq).
        A refusal names the refused item: its ``batch_index`` in the list (from 0).

        Each event goes through the middleware chain first (there ``next``
        returns None, since nothing is committed until the whole batch has
        passed); a refusal of any one refuses the batch. Each reducer call
        sees the effects of the events before it. The same id twice: the
        same content is applied once, different content is a Conflict.
        """
        if isinstance(events, (str, bytes, _Mapping)) or not isinstance(events, collections.abc.Iterable):
            raise InvalidEvent(
                f"dispatch_many() takes a list of event dicts; received {_describe(events)}."
            )
        _check_actor(actor)  # also for an empty batch
        given = events if isinstance(events, list) else list(events)
        actions: List[Dict[str, Any]] = []
        for n, item in enumerate(given):
            try:
                actions.append(_batch_action(item, n, actor))
            except InvalidEvent as exc:
                _name_batch_item(exc, n, len(given), item)
                raise
        self._check_dispatchable()
        _check_expect_seq(expect_seq)
        try:
            if not actions:  # no transaction to check expect_seq in: checked here
                if expect_seq is not None:
                    head = self.head
                    if head != expect_seq:
                        raise _stale(expect_seq, head)
                return []
            failed: List[int] = []  # the position in the batch of an item _write refused
            if self._bare:  # no middleware: as given
                prepared: List[_Prepared] = []
                for n, action in enumerate(actions):
                    try:
                        prepared.append(_prepare(action, self._ids))
                    except InvalidEvent as exc:
                        _name_batch_item(exc, n, len(given), given[n])
                        raise
                try:
                    return self._commit_prepared(prepared, expect_seq, failed=failed)
                except Exception as exc:
                    if failed:
                        _name_batch_item(exc, failed[0], len(given), given[failed[0]])
                    raise
            # What each next() was given, checked and encoded when it was given: a
            # middleware changing that dict afterwards does not change the batch.
            batch: List[_Prepared] = []
            frame = _Frame(expect_seq, batch)
            frames = self._frame_stack()
            frames.append(frame)
            try:
                for n, action in enumerate(actions):
                    frame.position, refused = n, frame.refused
                    frame.calls = [[None]]  # the outermost middleware's call
                    try:
                        self._chain(action)
                    except Exception as exc:
                        _name_batch_item(exc, n, len(given), given[n])
                        raise
                    if frame.calls[0][0] is not None:  # it returned after swallowing a refusal
                        frame.refused = frame.refused or frame.calls[0][0]
                    if refused is None and frame.refused is not None:  # refused by this item
                        _name_batch_item(frame.refused, n, len(given), given[n])
            finally:
                frames.pop()
            if frame.refused is not None:  # a middleware caught it: the batch is still refused
                raise frame.refused
            if not batch:  # the middleware let none through: as an empty batch
                if expect_seq is not None and self.head != expect_seq:
                    raise _stale(expect_seq, self.head)
                return []
            self._check_dispatchable()
            try:
                return self._commit_prepared(batch, expect_seq, failed=failed)
            except Exception as exc:
                if failed:  # the item that next() was given while the middleware had this one
                    origin = frame.origins[failed[0]]
                    _name_batch_item(exc, origin, len(given), given[origin])
                raise
        finally:
            self._notify()  # also what a middleware dispatched before the batch was refused

    def preview(self, type: Union[str, Mapping[str, Any]], payload: Any = None, *,
                meta: Optional[Mapping[str, Any]] = None, id: Optional[str] = None,
                actor: Optional[str] = None, expect_seq: Optional[int] = None
                ) -> Tuple[Optional[Event], List[Change]]:
        """Dry run: what dispatch() would commit, as (event, changes); nothing is kept.

        The arguments are dispatch()'s. Middleware, access control and the reducer
        run inside a transaction that is rolled back (events middleware dispatches
        included); no subscriber is called and the head does not move. A refusal or
        error is raised exactly as dispatch() would raise it; a middleware that ends
        the chain without calling next gives (None, []), as dispatch() gives None.
        """
        action = _action_from(type, payload, meta, id, actor)
        self._check_dispatchable()
        _check_expect_seq(expect_seq)  # as dispatch() does: "4" or True is no seq
        if self._previewing and self._preview_thread == threading.get_ident():
            raise UsageError("preview() was called inside another preview() (from a "
                             "middleware or subscriber it runs): previews do not nest. "
                             "Preview the events one at a time.")
        frame = _Frame(expect_seq, preview=True)
        with self._lock:
            self._check_open()  # again: another thread may have closed it meanwhile
            pending = len(self._pending)
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise _storage_error(exc, self._path) from exc
            self._previewing += 1
            self._preview_thread = threading.get_ident()
            frames = self._frame_stack()
            frames.append(frame)
            try:
                try:
                    self._preview_fk = _deferred_fk_violations(self._conn)
                except sqlite3.OperationalError as exc:  # damage, an interrupt: as a dispatch says it
                    raise _storage_error(exc, self._path) from exc
                event = self._chain(action)
            finally:
                self._preview_fk = None
                frames.pop()
                if self._conn.in_transaction:  # SQLite may have ended it itself
                    self._conn.execute("ROLLBACK")
                self._head_cache = None
                self._previewing -= 1
                while len(self._pending) > pending:
                    self._pending.pop()
        return event, frame.changes

    def fork(self, path: Union[str, "os.PathLike[str]"] = ":memory:", *,
             clock: Optional[Callable[[], datetime]] = None,
             ids: Optional[Callable[[], str]] = None) -> "Store":
        """An independent copy (log, read model, journal), made with SQLite's backup API.

        ``path`` is ":memory:" or a new file. The copy has the same reducer,
        middleware and upcasters (not the subscribers), and the same clock and
        ids unless ``clock=`` or ``ids=`` give it its own: forks of one prepared
        store that share a counter for ids get ids that depend on which fork ran
        first.
        """
        _check_sources(clock, ids)
        path = _path_argument(path, "fork(path=...)")
        _empty_if_blank(path)
        if path != ":memory:" and os.path.exists(path) and os.path.getsize(path):
            raise UsageError(f"fork(path={path!r}) needs a new file; that one has content.")
        with self._lock:
            self._check_open()
            self._check_not_previewing("fork()")
            # The copy opens with the model the file holds and this store's reducer:
            # after another process rebuilt the file with other code, that reducer
            # would write old-shape changes into the new tables (as dispatch() refuses
            # to). Refused before any file is made.
            self._check_model_current()
            if self._reducer is not None:  # the copy can dispatch: refused as it would
                # be on opening it, but naming this file, where the trigger is
                _check_no_triggers(self._conn, self._path, list(self._model.tables))
            page_size = self._page_size()
        # What a failed copy made is removed (a full disk): a half-copied file left
        # at the path would be refused by the retry as "has content".
        present = _present(_sqlite_file(path)) if path not in (":memory:", "") else {}
        try:
            copy = self._fork_into(path, page_size, clock, ids)
        except BaseException:
            if present:
                _remove_made(_sqlite_file(path), present)
                if present[""]:  # given empty (a temporary file's name): empty again
                    _empty_quietly(_sqlite_file(path))
            raise
        return copy

    def _fork_into(self, path: str, page_size: int, clock: Optional[Callable[[], datetime]],
                   ids: Optional[Callable[[], str]]) -> "Store":
        """fork()'s copy, made at ``path`` (checked to be new or empty)."""
        conn = _connect(path, self._durability, page_size=page_size)
        try:
            if not self._fork_from_file(conn):
                with self._lock:
                    self._check_open()
                    with _read_txn(self._conn):  # checked in the snapshot the backup copies
                        self._check_model_current()
                        self._conn.backup(conn)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.OperationalError):  # a full disk, a read-only file
                raise _storage_error(exc, path) from exc
            raise
        copy = _open_connection(conn, path, schema=None, reducer=self._reducer,
                                middleware=self._middleware, durability=self._durability,
                                version=None, upcasters=self._upcasters, adopt=False,
                                clock=clock or self._clock,
                                ids=_checked_ids(ids) if ids else self._ids)
        # The copy's consumer names are nobody's: the leases it copied belong to
        # Consumers of this store, which can never use the copy (and would keep
        # its names Busy until they ran out). Positions are kept.
        try:
            with copy._lock:
                copy._conn.execute("UPDATE fluxlite_consumers SET owner = NULL, "
                                   "lease_until = 0 WHERE owner IS NOT NULL")
        except BaseException as exc:
            copy.close()
            if isinstance(exc, sqlite3.Error):
                raise _storage_error(exc, path) from exc
            raise
        return copy

    def _fork_from_file(self, target: sqlite3.Connection) -> bool:
        """Copy the file into ``target`` through a second connection of its own, in one
        read snapshot, without this store's lock: through the store's own connection the
        lock was held for the whole copy (seconds for a big file), and every other thread's
        dispatch and read waited, a backup thread freezing an application. False (nothing
        copied) where that cannot be: in memory, a moved file, another model in the
        snapshot than this store's code checked (a rebuild by another process just now)."""
        if self._path in (":memory:", "") or self._previewing or not self._file_is_its_own():
            return False
        try:
            source = _connect_readonly(self._file)
        except FluxliteError:
            return False
        try:
            if not self._file_is_its_own():  # replaced while it was being opened
                return False
            with _read_txn(source):
                generation = _stored_generation(source)  # this read starts the snapshot copied
                with self._lock:
                    self._check_open()
                    with _read_txn(self._conn):
                        self._check_model_current()
                    current = self._generation_text
                if (_dumps(0) if generation is None else generation) != current:
                    return False
                source.backup(target)
            return True
        finally:
            self._close_beside(source)

    def checkpoint(self) -> Checkpoint:
        """Remember the whole store (in memory), to come back with reset_to()."""
        with self._lock:
            self._check_open()
            self._check_not_previewing("checkpoint()")
            copy = sqlite3.connect(":memory:", check_same_thread=False)
            self._conn.backup(copy)
            # The seq the copy holds, not the file's head read after it: another
            # process may have committed in between.
            seq = copy.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
            checkpoint = Checkpoint(copy, seq)
            checkpoint._lineage = self._lineage
            in_memory = self._file in (":memory:", "")
            # the file itself, not its name: a file moved since, or another at the
            # path, is told apart
            checkpoint._origin = weakref.ref(self) if in_memory else (
                self._file_id if self._file_id is not None else self._file)
            return checkpoint

    def _check_not_in_progress(self, what: str) -> None:
        """Not from a progress= callback: verify() and rebuild() go on replaying the
        log they were reading (and rebuild() swaps the result in) when it returns."""
        if self._progress_threads and threading.get_ident() in self._progress_threads:
            raise UsageError(f"{what} cannot run inside verify() or rebuild() (from their "
                             f"progress=): they go on with the log and the connection it "
                             f"would take from under them. Call it after they return.")

    def _check_not_previewing(self, what: str) -> None:
        """SQLite's backup cannot read a connection in the middle of a write (it answers
        "locked", and Python's backup() retries that for ever): not inside a preview.
        With the lock held, a preview in progress is this thread's own."""
        if self._previewing:
            raise UsageError(f"{what} cannot run inside a preview (from its middleware): "
                             f"the preview's transaction is still open. Call it after "
                             f"preview() returns.")

    def reset_to(self, checkpoint: Checkpoint) -> None:
        """Put the whole store back as it was at checkpoint() (log included).

        For test suites: cheap rollback between tests of an on-disk store.
        Other connections to the file see the reset too. watch() and this
        store's followers go on from the checkpoint's head, its consumers from
        their position in the checkpoint; followers and consumers of other stores
        (in this process or others) at their next read (the file keeps the heads
        of its last resets). Subscribers are not told: a copy of the tables a
        subscriber keeps must be refilled from the store (events committed
        before the checkpoint that they had not heard yet, they still hear).
        The file's generation is new after it, for stores elsewhere to tell.
        A checkpoint of another store of the same schema and version (a template
        of a test suite) fits too: its consumers' positions come, not their leases.
        """
        if not isinstance(checkpoint, Checkpoint):
            raise UsageError(
                f"reset_to() takes what store.checkpoint() returned; received "
                f"{_describe(checkpoint)}."
            )
        self._check_writable("reset_to()")
        self._check_not_verifying("reset_to() a checkpoint", "Reset")
        self._check_not_in_progress("reset_to()")
        with self._lock:
            self._check_open()
            if self._conn.in_transaction:  # SQLite's backup cannot copy into it
                raise UsageError("reset_to() cannot run inside a preview (from its middleware) "
                                 "or a verify() (from its progress=): their transaction is "
                                 "still open. Call it after they return.")
            # Dropped before the copy: an interrupt as (or right after) it ran left the
            # head and seal of before the reset cached, and the next dispatch wrote its
            # event past a gap in seq, under a seal that did not match (a damaged file).
            self._head_cache = None
            try:
                with checkpoint._lock:
                    self._check_fits(_read_meta(checkpoint._conn))
                    self._check_page_size(checkpoint)
                    ours = _read_meta(self._conn)
                    before = ours.get("generation", 0)
                    _stamp_generation(checkpoint._conn, before, _rewinds(ours), checkpoint.seq)
                    try:
                        # Python's backup() retries a locked file for ever; after
                        # busy_timeout it is Busy here, as for every other write.
                        with _leases_left_out(checkpoint._conn, not checkpoint._taken_from(self)):
                            checkpoint._conn.backup(self._conn, progress=_refuse_locked)
                    except sqlite3.Error:
                        raise
                    except BaseException:  # Ctrl-C (in _refuse_locked, or as it returned):
                        self._after_reset(before, checkpoint)  # the copy may be in: go on
                        raise                                  # from the file
                self._after_reset(before, checkpoint)
            except sqlite3.ProgrammingError as exc:  # the checkpoint's copy was closed
                raise UsageError(f"That checkpoint cannot be read ({exc}); take a new one "
                                 f"with store.checkpoint().") from exc
            except sqlite3.OperationalError as exc:  # a full disk, a read-only file
                raise _storage_error(exc, self._path) from exc

    def _after_reset(self, before: Any, checkpoint: Checkpoint) -> None:
        """reset_to()'s work once the checkpoint is copied in: a new generation, the
        model, delivery and followers as the file now has them."""
        with self._lock:
            _renew_generation(self._conn, before)
            self._head_cache = None
            meta = _read_meta(self._conn)
            self._schema, self._version = meta["schema"], meta.get("version")
            self._load_tables(meta["tables"], meta.get("generation", 0))
            # Events not yet delivered (another thread's subscriber is slow, or one
            # calls reset_to()) that the checkpoint holds too are still in the log:
            # still heard, once. Those after it are gone; so are all of them for a
            # checkpoint of another history (taken before an earlier reset_to(), or
            # in another store), whose events at those seqs may be others.
            head = self.head
            kept = min(head, _agreed(self._lineage, checkpoint._lineage, checkpoint.seq))
            while self._pending and self._pending[-1][0].seq > kept:
                self._pending.pop()
            reset = _Reset(head, self._lineage, checkpoint._lineage, checkpoint.seq,
                           _rewinds(meta), meta.get("generation", 0))
            self._lineage = _Lineage(checkpoint._lineage, checkpoint.seq)
            for cursor in list(self._cursors):  # watch() and this store's followers
                cursor.reset_to(reset)
            self._resets += 1
            self._reset_log.append(reset)

    def _check_page_size(self, checkpoint: Checkpoint) -> None:
        """SQLite's backup copies into a WAL file, or an in-memory database that holds
        anything, only at its own page size (else it answers "readonly"): a checkpoint
        of a store with other pages cannot go back."""
        if self._file == "":  # a temporary file, not in WAL mode: its pages may change
            return
        theirs = checkpoint._conn.execute("PRAGMA page_size").fetchone()[0]
        ours = self._page_size()
        if theirs != ours:
            raise UsageError(
                f"That checkpoint holds a store of {theirs}-byte pages, and {self._path!r} "
                f"has {ours}-byte pages: SQLite copies a whole store into a WAL file (or an "
                f"in-memory store) only at its own page size. Nothing changed; reset a store to its own "
                f"checkpoints (or to those of a store of its page size)."
            )

    def _check_fits(self, theirs: Mapping[str, Any]) -> None:
        """A checkpoint's model must be the one this store's code makes: its reducer
        would otherwise write into tables of another shape (a checkpoint of
        another application's store, or from before a rebuild to a new version)."""
        if _same_code(theirs["schema"], theirs.get("version"), self._schema, self._version):
            return
        other = "version" if _same_code(theirs["schema"], None, self._schema, None) else "schema"
        raise UsageError(
            f"That checkpoint holds a read model of another {other} (version "
            f"{theirs.get('version')!r}, tables {', '.join(theirs['tables']) or 'none'}) than "
            f"this store runs (version {self._version!r}, tables "
            f"{', '.join(self._model.tables) or 'none'}): a checkpoint of another store, or "
            f"one taken before a rebuild. Reset a store only to checkpoints taken with its "
            f"own schema and version (take them after the rebuild); to copy a store, fork() it."
        )

    def _frame_stack(self) -> List["_Frame"]:
        stack = getattr(self._frames, "stack", None)
        if stack is None:
            stack = self._frames.stack = []
        return stack

    @contextlib.contextmanager
    def _replaying(self) -> Iterator[None]:
        """Around calls of reducers and upcasters while this thread holds the store's
        lock (a dispatch's transaction, verify(), rebuild()): a dispatch or a read of
        the store from them is refused. Let through, it would be written inside that
        transaction or snapshot (verify() rolls its snapshot back: an event it had
        acknowledged would be lost)."""
        try:  # (set inside: an interrupt right after it would leave the store refusing all)
            self._reducing_thread = threading.get_ident()
            yield
        finally:
            self._reducing_thread = None

    @contextlib.contextmanager
    def _verify_replaying(self) -> Iterator[None]:
        """_replaying() for verify() and rebuild(), whose replay runs mostly without the
        store's lock (see _replay_beside, _replay_log_beside): this thread is marked in a
        set of its own, which other threads' dispatches (marking _reducing_thread
        meanwhile) leave alone."""
        me = threading.get_ident()
        try:
            self._verifying_threads.add(me)
            yield
        finally:
            self._verifying_threads.discard(me)

    def _in_verify_replay(self) -> bool:
        return bool(self._verifying_threads) and threading.get_ident() in self._verifying_threads

    def _unguarded(self, progress: Optional[Callable[[int], None]], verifying: bool = False,
                   beside: Optional[bool] = None) -> Optional[Callable[[int], None]]:
        """A progress= callback, called from inside _replaying() (rebuild() holding the
        lock) or _verify_replaying() (``beside``: verify(), and rebuild() replaying
        beside the store; by default, as ``verifying``): it is the caller's own code,
        not a reducer, and may read the store as before. verify()'s (``verifying``) may
        not write to it: _check_not_verifying() refuses that."""
        if progress is None:
            return None
        marked_apart = verifying if beside is None else beside

        def call(seq: int) -> None:
            me = threading.get_ident()
            if marked_apart:
                self._verifying_threads.discard(me)
            else:
                self._reducing_thread = None
            # Only what this call added is taken away after: a verify() called from
            # verify()'s progress= must not lift the outer one's rule when it returns.
            added = [marks for marks in ((self._verify_progress_threads,) if verifying else ())
                     + (self._progress_threads,) if me not in marks]
            try:
                for marks in added:
                    marks.add(me)
                progress(seq)
            finally:
                for marks in added:
                    marks.discard(me)
                if marked_apart:
                    self._verifying_threads.add(me)
                else:
                    self._reducing_thread = me

        return call

    def _check_not_verifying(self, what: str, instead: str) -> None:
        """verify()'s progress= may read the store, not write to it. Refused for the
        whole of verify(), not only once it reaches the last page of the log and its
        snapshot (where a write would be rolled back with it, or fail): else whether
        a progress= callback works would depend on the log's length."""
        if self._verify_progress_threads and threading.get_ident() in \
                self._verify_progress_threads:
            raise UsageError(
                f"verify()'s progress= callback may read the store {self._path!r} but not "
                f"{what}: verify() may compare in a snapshot of the store that it then "
                f"rolls back, and what is written into it would be lost with it. {instead} after "
                f"verify() returns."
            )

    def _check_dispatchable(self) -> None:
        if (self._reducing_thread is not None and self._reducing_thread == threading.get_ident()
                or self._verifying_threads and threading.get_ident() in self._verifying_threads):
            raise UsageError(
                "Reducers and upcasters may not dispatch: a reducer must be a pure "
                "function of (view, event), an upcaster of the event. Return the changes "
                "instead, or dispatch from a subscriber or middleware."
            )
        self._check_not_verifying("dispatch or preview", "Dispatch")
        self._check_open()
        if self._reducer is None or self._readonly_file:
            raise UsageError(
                f"The store {self._path!r} was opened for reading only ("
                + ("readonly=True" if self._readonly_file else "no reducer")
                + "); open it with a reducer and without readonly=True to dispatch."
            )

    def _core_dispatch(self, action: Dict[str, Any]) -> Optional[Event]:
        """The innermost step of the middleware chain."""
        frames = self._frame_stack()
        if not frames:
            raise UsageError(
                "A middleware called next() outside the dispatch it was given (in another "
                "thread, or after returning): call next(event) within the call, in the "
                "dispatching thread, and return what it returns."
            )
        frame = frames[-1]
        _check_passed_keys(action)
        if frame.batch is not None:
            # A refusal here refuses the batch unless the middleware calls next()
            # again with a fixed event that passes (see _refusing_batch).
            frame.batch.append(_prepare(action, self._ids))
            frame.origins.append(frame.position)
            return None
        event = self._commit([action], frame.expect_seq, frame.ack)[0]
        frame.acked = frame.ack is not None
        if frame.preview:
            frame.changes = next((c for e, c in reversed(self._pending) if e.seq == event.seq), [])
        return event

    def _commit(self, actions: Sequence[Mapping[str, Any]], expect_seq: Optional[int],
                ack: Optional[_Ack] = None) -> List[Event]:
        self._check_dispatchable()
        return self._commit_prepared([_prepare(a, self._ids) for a in actions], expect_seq, ack)

    def _commit_prepared(self, prepared: List[_Prepared], expect_seq: Optional[int] = None,
                         ack: Optional[_Ack] = None,
                         failed: Optional[List[int]] = None) -> List[Event]:
        """Write the events in one transaction. ``failed``, if given, is told the
        position in ``prepared`` of the event whose reducer (or id) refused the batch."""
        results: List[Event] = []
        committed: List[Tuple[Event, List[Change]]] = []
        with self._lock:
            self._check_open()
            outermost = not self._conn.in_transaction
            try:
                self._write(prepared, expect_seq, results, committed, ack, failed)
            except sqlite3.IntegrityError as exc:  # a deferred constraint, at COMMIT
                raise ChangesetError(
                    f"The changes violate a deferred constraint checked at commit: "
                    f"{exc}. Nothing was written; make the reducer return changes "
                    f"that leave the tables consistent."
                ) from exc
            except sqlite3.OperationalError as exc:
                raise _storage_error(exc, self._path) from exc
            except sqlite3.DataError as exc:  # "string or blob too big": the event's text
                raise InvalidEvent(
                    f"An event's type, id, payload or meta is longer than SQLite stores "
                    f"({exc}; SQLITE_MAX_LENGTH, 1,000,000,000 bytes by default). Nothing "
                    f"was written; keep large data outside the event and refer to it."
                ) from exc
            except FluxliteError:
                raise  # refused: _write_txn rolled it back
            except BaseException:  # Ctrl-C, a signal handler's SystemExit, a MemoryError
                if outermost and self._landed_anyway(committed):
                    if self._watcher is not None:  # it did commit: watch() and
                        self._watch_past(committed[0][0].seq, committed[-1][0].seq)
                    self._pending.extend(committed)  # subscribers hear of it
                raise
            if committed and self._watcher is not None and not self._previewing:
                self._watch_past(committed[0][0].seq, committed[-1][0].seq)
            self._pending.extend(committed)
            if committed and self._checkpointer is not None:
                self._checkpointer.committed(self._conn, len(committed))
        if committed:
            with self._committed:
                self._commit_count += 1
                self._committed.notify_all()
        return results

    def _landed_anyway(self, committed: List[Tuple[Event, List[Change]]]) -> bool:
        """_interrupted_write, never hiding the exception being handled: a file that
        cannot even be read now (a damaged one) is that exception's to report."""
        try:
            return self._interrupted_write(committed)
        except sqlite3.Error as exc:
            _log.warning("after an interrupted write to %r, its outcome could not be "
                         "read: %s", self._path, exc)
            return False

    def _interrupted_write(self, committed: List[Tuple[Event, List[Change]]]) -> bool:
        """After an exception that is no error of the write's own (KeyboardInterrupt,
        a signal handler's SystemExit, a MemoryError) came out of _write, which may
        have landed anywhere in it: whether its events committed.

        Such an exception can come between COMMIT and the bookkeeping after it
        (Ctrl-C during COMMIT's fsync is raised right after it): the head this store
        caches would then be stale, and its next dispatch would reuse a committed seq
        (refused for ever). Or before COMMIT or ROLLBACK ran (inside _write_txn's
        __exit__): the transaction would stay open, holding the file's write lock
        against every other process. Both are put right here."""
        conn = self._conn
        self._head_cache = None  # read again at the next write
        self._reducing_thread = None
        self._model.query_mode = 0  # (the authorizer would refuse the ROLLBACK)
        if conn.in_transaction:
            conn.execute("ROLLBACK")
            return False
        if not committed:
            return False
        last = committed[-1][0]
        row = conn.execute("SELECT id FROM events WHERE seq = ?", (last.seq,)).fetchone()
        return row is not None and row[0] == last.id

    def _write(self, prepared: List[_Prepared], expect_seq: Optional[int],
               results: List[Event], committed: List[Tuple[Event, List[Change]]],
               ack: Optional[_Ack] = None,
               failed: Optional[List[int]] = None) -> None:
        conn = self._conn
        outermost = not conn.in_transaction  # a preview's transaction is rolled back
        if not outermost and not self._previewing:  # e.g. from verify()'s progress=
            raise UsageError(
                f"The store {self._path!r} is in a read of its own in this thread (verify() "
                f"compares in a snapshot that it then rolls back): a dispatch now would be "
                f"lost with it. Dispatch after verify() returns."
            )
        if self._previewing and outermost:  # SQLite ended the preview's transaction itself
            raise ChangesetError(
                "SQLite ended this preview's transaction after an earlier error in it "
                "(such as a full disk); a preview never commits, "
                "so nothing more can be tried in it. Preview the events again."
            )
        cursor = self._cursor
        with _write_txn(conn):
            if ack is not None:
                _advance_consumer(conn, *ack)
            # data_version moves only when another connection commits: until then the
            # head this store last wrote is still the head (saves a query per dispatch).
            version = cursor.execute("PRAGMA data_version").fetchone()[0]
            cached = self._head_cache
            if cached is not None and cached[0] == version and outermost:
                generation, head, last_ts, seal = cached[1:]
            else:
                generation, head, last_ts, seal = conn.execute(_HEAD_SQL).fetchone()
            if generation != self._generation_text:
                self._check_generation(generation)
            baselines = bool(prepared) and prepared[0].type == BASELINE  # a copied adoption
            if baselines:
                conn.execute("PRAGMA defer_foreign_keys = ON")  # whole tables, any order
            head, last_ts, seal = head or 0, last_ts or "", seal or " "
            event_rows: List[Tuple[Any, ...]] = []
            journal: List[Tuple[Any, ...]] = []
            seen: Dict[str, Tuple[_Prepared, Event, int]] = {}  # id: (item, event, position)
            batch_ts: Optional[Tuple[str, datetime]] = None
            encode_events = _encode_written_events  # (_encode_rows once a copied event is in)
            for item in prepared:
                if baselines and item.type != BASELINE:
                    baselines = False
                    _end_baselines(conn)
                if item.id_given:
                    try:
                        known = self._known_event(item, seen, len(results))
                    except Exception:
                        if failed is not None:
                            failed.append(len(results))
                        raise
                else:
                    known = None
                    if self._ids is not _new_id:  # the user's ids= source: a counter may restart
                        self._check_generated_id(item.id, seen)
                if known is not None:
                    if item.seq is not None and item.seq != known.seq:
                        # A copied log names each event once: skipped as a resend, the
                        # seqs after it would be off by one (and an import miscounted)
                        raise Conflict(
                            f"Logged event {_quoted(item.id)} is copied as seq {item.seq}, "
                            f"but seq {known.seq} has that id already; ids are unique in a "
                            f"log. Remove the second copy.")
                    results.append(known)
                    continue
                if expect_seq is not None and head != expect_seq:
                    raise _stale(expect_seq, head)
                expect_seq = None  # checked once, before the first new event
                ts_text, ts = self._timestamp(item, head, last_ts, batch_ts)
                if item.seq is None:  # a copied event's ts is its own
                    batch_ts = (ts_text, ts)
                else:
                    encode_events = _encode_rows
                try:
                    event, changes = self._reduce_and_apply(item, head + 1, ts, journal)
                except Exception:  # (not an expect_seq or a clock's error: the batch's)
                    if failed is not None:
                        failed.append(len(results))
                    raise
                event_rows.append((head + 1, item.id, item.type, item.payload_text,
                                   item.meta_text, ts_text))
                head, last_ts = head + 1, ts_text
                seen[item.id] = (item, event, len(results))
                results.append(event)
                committed.append((event, changes))
            # Reducers cannot read the log, so its rows can wait for one write at the end.
            _insert_rows(cursor, _INSERT_EVENT, event_rows)
            try:
                _insert_rows(cursor, _INSERT_JOURNAL, journal)
            except sqlite3.DataError as exc:  # a row whose journal text is too long
                raise ChangesetError(
                    f"A changed row is longer, as the journal keeps it, than SQLite "
                    f"stores ({exc}). Nothing was written; keep large data outside the "
                    f"read model and refer to it."
                ) from exc
            if not outermost:  # a preview's event: no COMMIT will check its deferred references
                self._check_deferred_in_preview()
            if event_rows:
                events_link, journal_link = seal.split(" ")
                events_link = _chain_link(events_link, event_rows, encode_events)
                # (the journal's rows were just written by apply(): the cheaper encoder)
                journal_link = _chain_link(journal_link, journal, _encode_written_journal)
                cursor.execute(_INSERT_SEAL, (head, events_link, journal_link))
                seal = f"{events_link} {journal_link}"
            self._check_file()
            generation = self._generation_text
        self._head_cache = (version, generation, head, last_ts, seal) if outermost else None

    def _check_deferred_in_preview(self) -> None:
        """In a preview, the check COMMIT would make of DEFERRABLE INITIALLY DEFERRED
        references: the preview's transaction is rolled back, never committed, so
        SQLite never checks them, and a preview showed changes that dispatch()
        refuses. A violation that was not there when the preview began is the
        ChangesetError dispatch() raises at COMMIT (raised inside the event's
        savepoint, so that it is rolled back as a dispatch's would be)."""
        if self._preview_fk is None:  # no deferred references (or foreign keys off)
            return
        now = _deferred_fk_violations(self._conn)
        if now is not None and now - self._preview_fk:
            table, rowid, parent = next(iter(now - self._preview_fk))[:3]
            raise ChangesetError(
                f"The changes violate a deferred constraint checked at commit: FOREIGN KEY "
                f"constraint failed (row {rowid} of {table!r} references {parent!r} where "
                f"no row has that key). A dispatch of this event would be refused at "
                f"COMMIT, so its preview is too. Nothing was written; make the reducer "
                f"return changes that leave the tables consistent."
            )

    def _timestamp(self, item: _Prepared, head: int, last_ts: str,
                   batch_ts: Optional[Tuple[str, datetime]]) -> Tuple[str, datetime]:
        """The new event's ts, as text and as the datetime that text reads back as:
        now, but never before the previous event. The events of one transaction
        share one ts, ``batch_ts`` once the first has it: they commit at one instant,
        and one clock read per batch is cheaper."""
        if item.seq is not None:  # a logged event being copied keeps its seq and ts
            if item.seq != head + 1:
                raise Conflict(
                    f"Logged event {_quoted(item.id)} has seq {item.seq} but would be seq "
                    f"{head + 1} here; a log can only be copied onto a store whose "
                    f"head is the seq right before it."
                )
            assert item.ts is not None
            if item.ts < last_ts:
                raise InvalidEvent(
                    f"Logged event seq {item.seq} has ts {item.ts}, before the previous "
                    f"event's {last_ts}; ts never decreases along seq."
                )
            return item.ts, _parse_ts(item.ts)
        if batch_ts is not None and batch_ts[0] >= last_ts:
            return batch_ts
        utc = _clock_utc(self._clock)
        text = _utc_text(utc)
        if text < last_ts or utc.__class__ is not datetime:  # a step back, or a subclass
            text = max(text, last_ts)
            return text, _parse_ts(text)
        return text, utc

    def _check_file(self) -> None:
        """Refuse to commit into a file that was deleted or replaced since open.

        SQLite would write on to the open (unlinked or stale) file: the commit
        would be acknowledged, then lost. Nothing is written instead.
        """
        if self._file_id is None:
            return
        try:
            info = os.stat(self._file)
            same = (info.st_dev, info.st_ino) == self._file_id
        except OSError:
            same = False
        if not same:
            raise StorageError(
                f"{self._path!r} was deleted, renamed or replaced while this store had it "
                f"open; nothing was written. Close the store (it saves what the moved file "
                f"lacks beside the path) and open the file again."
            )

    def _check_model_current(self) -> None:
        """Before reading the past or rebuilding with this store's idea of the tables:
        the generation in the file is this store's (or the same code's)."""
        row = self._conn.execute(
            "SELECT value FROM fluxlite_meta WHERE key = 'generation'").fetchone()
        if row is not None and row[0] != self._generation_text:
            self._check_generation(row[0])

    def _check_generation(self, stored: Optional[str]) -> None:
        """Refuse to write old-shape changes after another process rebuilt the model.

        Called only when ``stored`` is not this store's generation text (the usual
        case is checked by the caller, _write, without a call)."""
        generation = json.loads(stored) if stored else 0
        if generation == self._generation:
            return
        meta = _read_meta(self._conn)
        same_code = _same_code(meta["schema"], meta.get("version"), self._schema, self._version)
        if not same_code and self._reads_any_code:
            # A reader opened as open(path) (no schema, version or reducer: the CLI's
            # tail -f, say) has no code of its own to be old: it takes the file's.
            self._schema, self._version = meta["schema"], meta.get("version")
            same_code = True
        if not same_code:
            differs = _code_difference(meta["schema"], meta.get("version"), self._schema,
                                       self._version)
            raise _rebuilt_by_other_code(
                f"The read model of {self._path!r} was rebuilt by another process "
                f"(or reset to a checkpoint of other code) with {differs}. Reopen it "
                f"with the new code before dispatching, reading its past or rebuilding."
            )
        self._load_tables(meta["tables"], generation)

    def _load_tables(self, names: Sequence[str], generation: int) -> None:
        self._head_cache = None
        tables = _table_infos(self._conn, names)
        self._model.tables = tables
        self._view = View(self._model)
        self._generation, self._generation_text = generation, _dumps(generation)

    def _known_event(self, item: _Prepared, seen: Dict[str, Tuple[_Prepared, Event, int]],
                     position: int) -> Optional[Event]:
        """The stored event for a reused id (same content), else None; or Conflict.

        Called only for an id the caller gave (a generated one is new by
        construction; _write skips the call for those). ``position``: the
        item's, in its batch (``seen``: the batch's items so far, by id)."""
        if item.id in seen:
            first, event, earlier = seen[item.id]
            if not first.id_given:  # the user's ids= source gave it first, in this batch
                raise UsageError(
                    f"ids() returned {_quoted(item.id)}, which this batch also gives as an event's "
                    f"id; the ids it returns must differ from every other id. Make ids() "
                    f"return ids of a form the explicit ids never take."
                )
            same = first.type == item.type and _same_json(  # as sent: a reducer may
                _loads(first.payload_text), _loads(item.payload_text))  # mutate payloads
            same = same or self._same_upcast(event, first, item)
            if not same:  # the batch is refused: its seqs are never committed, so
                if item.seq is not None:  # named by what is true: a copied log's seqs,
                    where = f"the copied log's seqs {first.seq} and {item.seq}"
                else:  # or the items' places in the batch
                    where = f"items {earlier} and {position} of the batch (counting from 0" + (
                        ")" if self._bare else ", as the middleware passed them to next())")
                what = (f"a {_quoted(first.type)} and a {_quoted(item.type)} event" if first.type != item.type
                        else f"two {_quoted(item.type)} events with different payloads")
                raise Conflict(
                    f"Event id {_quoted(item.id)} is given twice in one batch with other content: "
                    f"{where} are {what}; an id is an idempotency key. Nothing of "
                    f"the batch was written; give each event of it its own id."
                )
        else:
            row = self._conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE id = ?", (item.id,)).fetchone()
            if row is None:
                return None
            stored = _event_from_row(row)
            same = stored.type == item.type and _same_json(stored.payload, _loads(item.payload_text))
            with self._replaying():
                event = self._upcast(stored)
            same = same or self._same_upcast(event, _prepared_from_row(row), item)
        if not same:
            raise Conflict(
                f"Event id {_quoted(item.id)} is already used by a {_quoted(event.type)} event "
                f"(seq {event.seq}) with other content; an id is an idempotency key. "
                f"Use a new id for a new event."
            )
        return event

    def _same_upcast(self, event: Event, first: _Prepared, item: _Prepared) -> bool:
        """Whether two shapes of one id's event are the same event once upcast: a retry
        in the new shape of an event logged in the old one (a client's outbox upgraded
        with the same upcasters) gets the stored event back, not a Conflict, since the
        reducer sees the two as one. Each is upcast as the event the id holds (its seq,
        id and ts) with its own meta, from its own JSON (an upcaster may change what it
        is given); as for a retry in the same shape, meta is not compared."""
        if first.type not in self._upcasters and item.type not in self._upcasters:
            return False
        shapes = []
        for prepared in (first, item):
            raw = object.__new__(Event)
            raw.__dict__.update(seq=event.seq, id=event.id, type=prepared.type,
                                payload=_loads(prepared.payload_text), ts=event.ts,
                                meta=_loads(prepared.meta_text) if prepared.meta_text else {})
            try:
                with self._replaying():
                    shapes.append(self._upcast(raw))
            except FluxliteError:  # the new content cannot even be upcast: not the same
                if prepared is first:  # (the logged one, read back, says it itself)
                    raise
                return False
        return shapes[0].type == shapes[1].type and _same_json(shapes[0].payload,
                                                               shapes[1].payload)

    def _check_generated_id(self, event_id: str, seen: Dict[str, Any]) -> None:
        """An id from the user's ids= source must be new to the file."""
        if event_id in seen:
            where = "earlier in this batch"
        else:
            row = self._conn.execute("SELECT seq FROM events WHERE id = ?", (event_id,)).fetchone()
            if row is None:
                return
            where = f"in the log (seq {row[0]})"
        raise UsageError(
            f"ids() returned {_quoted(event_id)}, an id already used {where}; the ids it "
            f"returns must be unique across the whole file. Continue the counter "
            f"from the log (a store reopened starts it again), or leave out ids=."
        )

    def _reduce_and_apply(self, item: _Prepared, seq: int, ts: datetime,
                          journal: List[Tuple[Any, ...]]) -> Tuple[Event, List[Change]]:
        event = object.__new__(Event)  # checked in _prepare: no dataclass __init__ (hot path)
        event.__dict__.update(seq=seq, id=item.id, type=item.type, payload=item.payload,
                              meta=item.meta, ts=ts)
        assert self._reducer is not None
        try:  # (set inside: an interrupt right after it would leave the store refusing all)
            self._reducing_thread = threading.get_ident()  # (inline: the hot path's _replaying())
            event = self._upcast(event)
            changes = _reduce(self._reducer, self._view, event)
        finally:
            self._reducing_thread = None
        return event, self._model.apply(changes, seq, journal)

    def _upcast_action(self, action: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        """A dispatched event as its reducer will see it once upcast (an event dict),
        or None when no upcaster changes it. Before the transaction, so provisional:
        seq is the head's next, ts now."""
        if action.get("type") not in self._upcasters:
            return None
        prepared = _prepare(action, str)  # checked, and as stored (no id needed here)
        event = object.__new__(Event)
        event.__dict__.update(seq=self.head + 1, id=prepared.id, type=prepared.type,
                              payload=prepared.payload, meta=prepared.meta, ts=_utc_now())
        with self._lock, self._replaying():  # the upcasters' rule holds here too
            newer = self._upcast(event)
        if newer is event:
            return None
        return {"type": newer.type, "payload": newer.payload, "meta": newer.meta,
                "id": action.get("id")}

    # -- subscribers -----------------------------------------------------------

    def subscribe(self, listener: Callable[[Event, List[Change]], Any], *,
                  types: Union[None, str, Iterable[str]] = None) -> Callable[[], None]:
        """Call ``listener(event, changes)`` after each commit; return unsubscribe.

        ``changes`` are the Changes as applied: each with its key, an upsert
        as the insert or update it became, an update with the columns it changed
        (a column set to the value it had is left out),
        a delete with just its key. ``types`` limits the event types heard.
        """
        if not callable(listener):
            raise UsageError(f"subscribe() needs a callable; received {_describe(listener)}.")
        _check_runs_when_called(listener)
        # Said now, not as a TypeError logged at every event (a one-argument lambda).
        _check_takes_two(listener, "A subscriber", "(event, changes)", "listener")
        entry = (listener, self._kept_types(types))
        with self._lock:
            self._check_open()  # a closed store commits nothing: the listener would never hear
            self._subscribers.append(entry)

        def unsubscribe() -> None:
            with self._lock:  # this subscription, by identity: not an equal one (the
                for n, other in enumerate(self._subscribers):  # same listener twice)
                    if other is entry:
                        del self._subscribers[n]
                        break

        return unsubscribe

    def _notify(self) -> None:
        if self._previewing and self._preview_thread == threading.get_ident():
            return  # a preview's events are rolled back: nobody hears of them
        # (Another thread's preview holds _lock until it has taken its events back.)
        if not self._subscribers:  # nobody to tell (the usual case, and cheap)
            if not self._pending:
                return
            with self._lock:  # looked at again: one may have subscribed meanwhile
                if not self._subscribers:
                    self._pending.clear()
                    return
        if getattr(self._notifying, "active", False):
            return  # the outer loop in this thread delivers it, in order
        # One thread delivers at a time, everyone's events in seq order. Another
        # thread that is delivering will deliver this one's events too: waiting
        # for it would let a slow subscriber hold up every dispatch, and one that
        # waits on a dispatch in another thread would never return.
        while True:
            # Acquired inside the try: Python runs a signal handler right after a call
            # returns, and a Ctrl-C between acquire() and a try after it kept the lock
            # for ever (no subscriber of this store heard of another event).
            try:
                if not self._notify_lock.acquire(blocking=False):
                    return
                self._notifying.active = True
                self._deliver_pending()
            finally:
                self._notifying.active = False
                try:  # the release itself is the only call: nothing can come before it
                    self._notify_lock.release()
                except RuntimeError:  # not acquired (another thread delivers)
                    pass
            with self._lock:  # committed while this thread was letting go? deliver it
                if not self._pending:
                    return

    def _deliver_pending(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    return
                event, changes = self._pending.popleft()
                listeners = list(self._subscribers)
            for listener, types in listeners:
                if types is not None and event.type not in types:
                    continue
                try:  # each its own values dicts: one listener's edits are not the next's
                    result = listener(event, [c if c.values is None else
                                              _change(c.op, c.table, c.key, dict(c.values))
                                              for c in changes])
                    if result is not None and _unrun(result):
                        _log.error(_UNRUN_SUBSCRIBER, listener, event.seq, event.type,
                                   _describe(result))
                except Exception:
                    _log.exception("fluxlite subscriber %r failed on event %s (%s)",
                                   listener, event.seq, event.type)

    # -- reading ---------------------------------------------------------------

    def query(self, sql: str, params: Any = ()) -> List[Dict[str, Any]]:
        """Read-only SQL on the store (read model and log); rows as dicts.

        ``params``: a tuple or list (one value per ``?``) or a dict (for ``:name``).
        Writes are refused (QueryError). Inside a reducer this is refused whole
        (UsageError): a reducer reads through ``view.query()``, the read-model tables only."""
        self._check_open()
        try:
            return self._model.query(sql, params)
        except QueryError as exc:
            if re.search(r"no such (table|column)", str(exc)):
                # A table this store's code has, gone: another process rebuilt the
                # file with other code. Said so (as the view's reads say), not "no
                # such table", which reads as a typo in the SQL.
                with self._lock:
                    self._check_open()
                    self._check_model_current()
            raise

    def event(self, seq_or_id: Union[int, str]) -> Optional[Event]:
        """The event with this seq (int) or id (str), or None."""
        if isinstance(seq_or_id, bool) or not isinstance(seq_or_id, (int, str)):
            raise UsageError(
                f"event() takes a seq (int) or an id (str); received {_describe(seq_or_id)}."
            )
        if isinstance(seq_or_id, int):
            if not 0 < seq_or_id < 2**63:
                return None  # no seq is outside SQLite's integers
            sql = _EVENT_BY_SEQ
        else:
            _check_text(seq_or_id, "An event id", UsageError)
            sql = _EVENT_BY_ID
        with self._lock, _reading(self._path):
            self._check_open()
            try:
                row = self._conn.execute(sql, (seq_or_id,)).fetchone()
            except sqlite3.DataError:  # an id longer than SQLite stores: not in the log
                row = None
        return self._upcast_logged(row) if row else None

    def _upcast_logged(self, row: Sequence[Any]) -> Event:
        """A logged event as a reader gets it (event(), events(), history(), followers):
        upcast under the rule replay holds upcasters to (no dispatch, no read of the
        store), so that an upcaster that breaks it fails here too, not only in replay."""
        event = _event_from_row(row)
        # An event of a type no upcaster is given for comes as it is: taking the lock
        # and marking the thread for each made reading a log of such events (an
        # upcaster for a rare type, fluxlite.restore's say) 2.5 times slower.
        if event.type not in self._upcasters:
            return event
        with self._lock, self._replaying():  # (one thread at a time marks itself so)
            return self._upcast(event)

    def events(self, after: int = 0, *, types: Union[None, str, Iterable[str]] = None,
               limit: Optional[int] = None) -> Iterator[Event]:
        """Events with seq > after, in seq order; streamed page by page.

        ``types`` (a str or an iterable of them) keeps those types only (as upcast);
        ``limit`` stops after that many events yielded."""
        _check_count(after, "after", "a seq (int >= 0)")
        _check_count(limit, "limit", "an int >= 0 or None", none=True)
        wanted = self._kept_types(types)
        return self._stream(min(after, 2**63 - 1), wanted, limit)

    def _stream(self, after: int, wanted: Optional[FrozenSet[str]], limit: Optional[int]
                ) -> Iterator[Event]:
        remaining = limit
        with self._lock:  # (a closed store's connection has no limits to ask)
            self._check_open()
            types_sql, types = self._types_sql(wanted)
        where = "seq > ?" + types_sql
        params: List[Any] = [after, *types]
        # Upcasters can change an event's type: then the upcast events are filtered
        # (as followers and subscribers filter), not the log's rows; so are they when
        # the types were too many to be SQL parameters.
        after_upcast = wanted if wanted is not None and (self._upcasters or not types_sql) \
            else None
        while remaining is None or remaining > 0:
            page = _PAGE if remaining is None or after_upcast else min(_PAGE, remaining)
            with self._lock, _reading(self._path):
                self._check_open()
                rows = self._conn.execute(
                    f"SELECT {_EVENT_COLUMNS} FROM events WHERE {where} ORDER BY seq LIMIT ?",
                    (*params, page)).fetchall()
            for row in rows:
                event = self._upcast_logged(row)
                if after_upcast is not None and event.type not in after_upcast:
                    if row[2] in after_upcast:  # asked for by a name the upcasters renamed
                        raise _renamed_away(row[2], event)
                    continue
                yield event
                if remaining is not None:
                    remaining -= 1
                    if remaining == 0:
                        return
            if len(rows) < page:
                return
            params[0] = rows[-1][0]

    def _kept_types(self, types: Union[None, str, Iterable[str]]) -> Optional[FrozenSet[str]]:
        """A types= filter, checked against this store's upcasters: every types= filter
        matches the type as upcast, so one naming a type the upcasters rename away
        ("ship" after an upcaster made it "pick") would match none of those events,
        quietly. The last logged event of each such type is upcast now (through the
        type index), so that the call says so at once; the readers also say so at the
        first such event they meet (an upcaster renaming only some shapes of a type,
        or a type not logged yet)."""
        wanted = _type_filter(types)
        if wanted is None or not self._upcasters or not wanted & self._upcasters.keys():
            return wanted
        for kind in sorted(wanted & self._upcasters.keys()):
            with self._lock, _reading(self._path):
                self._check_open()
                row = self._conn.execute(
                    f"SELECT {_EVENT_COLUMNS} FROM events WHERE type = ? "
                    f"ORDER BY seq DESC LIMIT 1", (kind,)).fetchone()
            if row is None:
                continue
            try:
                event = self._upcast_logged(row)
            except FluxliteError:  # a broken upcaster: the read that reaches it says so
                continue
            if event.type not in wanted:
                raise _renamed_away(kind, event)
        return wanted

    def _types_sql(self, wanted: Optional[FrozenSet[str]]) -> Tuple[str, List[str]]:
        """(" AND type IN (...)", its parameters): the log rows that can be of the
        ``wanted`` types, for the type index to find; ("", []) for every type.
        With the lock held (a closed store's connection has no limits to ask)."""
        if wanted is None:
            return "", []
        # An upcaster changes only the types it is given for: their rows come too,
        # and the caller filters the upcast events.
        logged = wanted | set(self._upcasters) if self._upcasters else wanted
        longest = _length_limit(self._conn)  # a longer type cannot be in the log
        kept = sorted(t for t in logged if len(t) <= longest // 4 or len(t.encode()) <= longest)
        if len(kept) > _variable_limit(self._conn) - 2:  # (the callers bind two more)
            return "", []  # too many to bind: every row comes, and the caller filters
        return f" AND type IN ({', '.join('?' for _ in kept)})", kept

    def changes(self, seq: int) -> List[Change]:
        """The Changes event ``seq`` made, as applied (read from the journal)."""
        if seq == 0 or isinstance(seq, bool) or not isinstance(seq, int):  # seq 0: no event
            raise UsageError(f"changes() takes the seq of an event (an int from 1); "
                             f"received {_describe(seq)}.")
        self._check_seq(seq, "seq")
        return self._changes(seq)

    def _changes(self, seq: int) -> List[Change]:
        with self._lock, _reading(self._path):
            self._check_open()
            # Another code's journal is not this store's changes. Inside a transaction
            # (a follower's page, a reducer, verify()'s replay) the caller has checked.
            checked = self._conn.in_transaction
            with _read_txn(self._conn):
                if not checked:
                    self._check_model_current()
                rows = self._conn.execute(
                    "SELECT tbl, key, op, before, after FROM fluxlite_journal WHERE seq = ? "
                    "ORDER BY n", (seq,)).fetchall()
        try:
            return [_change_from_journal(*row) for row in rows]
        except (ValueError, TypeError, AttributeError) as exc:  # a row that is not its JSON
            # As history() and at() say it: damage, not a raw error out of changes(),
            # follow(), watch() or a consumer.
            raise StorageError(
                f"{self._path!r} is damaged: the journal rows of event {seq} cannot be "
                f"read ({exc}). If verify() finds the log intact, store.rebuild() "
                f"rewrites the journal from it; otherwise restore the file from a backup."
            ) from exc

    # -- live data: followers, watch, consumers, asyncio -----------------------

    def follow(self, after: Optional[int] = None, *,
               types: Union[None, str, Iterable[str]] = None,
               timeout: Optional[float] = None
               ) -> Generator[Tuple[Event, List[Change]], None, None]:
        """A tail -f of the log: ``(event, changes)`` committed after ``after``, by anyone.

        ``after`` defaults to the head now. Events come in seq order, without
        gaps or repeats, from this or any other connection or process; then
        the iterator waits for more. It ends after ``timeout`` seconds without
        a new event (None: never), or when the store is closed. Idle, it costs
        one ``PRAGMA data_version`` per poll, backing off to 20 ms.
        """
        _check_timeout(timeout)
        head, generation = self._head_and_generation()
        start = self._check_seq(after, "after", head)
        # Made now, not at the first next(): reset_to() moves the cursors it knows.
        return self._follow(_FollowCursor(self, start, self._kept_types(types), rewinds=True,
                                          generation=generation), timeout)

    def _head_and_generation(self) -> Tuple[int, Optional[str]]:
        """The head and the file's generation, in one snapshot: a follower starting at
        that head goes back after a reset_to() by another store only for resets after
        it (see _FollowCursor.rewind)."""
        with self._lock:
            self._check_open()
            with _reading(self._path), _read_txn(self._conn):
                return self.head, _stored_generation(self._conn)

    def _follow(self, cursor: "_FollowCursor", timeout: Optional[float]) -> "_Following":
        while True:
            batch = cursor.step(timeout if timeout is not None else 3600.0)
            if batch is None:
                return
            # Still reading a backlog of events of other types: not time without one.
            if not batch and timeout is not None and not cursor.behind:
                return
            for item in batch:
                # reset_to() since the batch was read (while the caller held an event of
                # it, or in another thread before the first): the rest of this batch is of
                # the history the reset erased (yielded, it would come out of seq order,
                # before the cursor goes on from the checkpoint's head).
                if cursor.resets != cursor.read_resets:
                    break
                cursor.handed = item[0].seq
                yield item
            cursor.handed = None

    def watch(self) -> None:
        """Also call this store's subscribers for events committed elsewhere.

        Starts a background follower (stopped by close()) that delivers every
        event another connection or process commits, once each, in order.
        """
        self._check_open()
        with self._lock:
            if self._watcher is not None:
                return
            # Old code after another process's rebuild: refused here, as follow() is,
            # rather than a thread that logs the refusal and ends, unheard by the caller.
            self._check_model_current()
            head, generation = self._head_and_generation()
            self._watch_cursor = _FollowCursor(self, head, None, rewinds=True,
                                               generation=generation)
            # The thread holds the store weakly: one dropped without close() is collected.
            thread = threading.Thread(target=_watch_loop, args=(weakref.ref(self),),
                                      name=f"fluxlite-watch {self._path}", daemon=True)
            self._watcher = thread
            # Started with the lock held: close() takes it to find the thread it
            # joins, and a thread not started yet cannot be joined (RuntimeError).
            thread.start()

    def _stop_watch_thread(self, wait: Optional[float] = None) -> bool:
        """Stop watch()'s thread and wait for it to end (up to ``wait`` seconds). False
        when another thread held the store for all of ``wait`` (at exit): not stopped."""
        if wait is None:  # (close()): a with statement, which no Ctrl-C can leave holding
            with self._lock:  # the lock, as one raised right after acquire() returned did
                watcher = self._stop_watching()
        else:  # at exit, not waiting for ever for a thread that holds it
            if not self._lock.acquire(timeout=wait):
                return False
            try:  # no commit in between: see _stop_watching
                watcher = self._stop_watching()
            finally:
                self._lock.release()
        with self._committed:
            self._committed.notify_all()
        # Not from a subscriber: the watcher may be waiting to deliver through the
        # notify lock this thread holds. It sees it was stopped and ends by itself.
        if watcher is not None and watcher is not threading.current_thread() \
                and not getattr(self._notifying, "active", False):
            watcher.join(wait)
        return True

    def _stop_watching(self) -> Optional[threading.Thread]:
        """Stop watch()'s thread, with the lock held; return it. Its cursor stops too:
        the thread may be on its way to a read, and this store's commits from now on
        no longer move that cursor past themselves (_watch_past), so a read would
        queue them for subscribers a second time."""
        watcher, self._watcher = self._watcher, None
        if self._watch_cursor is not None:
            self._watch_cursor.stopped = True
        return watcher

    def _watch_past(self, first: int, last: int) -> None:
        """Before this store's own events first..last are queued for subscribers:
        the events other connections committed before them, which the watcher
        has not read yet, so that subscribers hear all of them in seq order.
        Called with the lock held, which the watcher takes to read."""
        cursor = self._watch_cursor
        assert cursor is not None
        try:
            while cursor.position < first - 1:
                reached = cursor.position
                self._pending.extend(cursor.read(self, before=first))
                if cursor.position == reached:
                    break
        except Exception as exc:  # an upcaster failed: the commit stands, the watch ends
            _log.error("watch() of %r stopped: %s", self._path, exc)
            self._stop_watching()
        cursor.position = max(cursor.position, last)

    def consumer(self, name: str, *, types: Union[None, str, Iterable[str]] = None,
                 lease: float = 30.0) -> "Consumer":
        """A durable consumer: a position kept in the file, advanced by ack().

        ``types`` (a str or an iterable of them) yields only events of those
        types: a consumer that answers with events of its own (dispatch(...,
        ack=event)) does not read them back. Only one process holds a consumer
        name at a time (a lease in the file, renewed on every read and ack; a
        holder that died on this machine is taken over at once). Busy if
        another live holder has it.
        """
        self._check_writable("consumer()")  # its position and lease are in the file
        self._check_not_verifying("take a consumer", "Take it")
        return Consumer(self, name, lease, self._kept_types(types))

    # dispatch()'s keywords spelled out (not **kwargs): a type checker then finds a
    # misspelt one here too, where **kwargs let any name pass until the worker thread.
    async def adispatch(self, type: Union[str, Mapping[str, Any]], payload: Any = None, *,
                        meta: Optional[Mapping[str, Any]] = None, id: Optional[str] = None,
                        actor: Optional[str] = None, expect_seq: Optional[int] = None
                        ) -> Optional[Event]:
        """dispatch() for asyncio: runs in a worker thread, the event loop never blocks.

        Cancelling it (asyncio.wait_for timing out, say) does not stop the
        dispatch, which may still commit unheard: pass an ``id`` and retry with
        it (the retry returns the committed event). Subscribers hear the event
        in the worker thread, not on the loop."""
        import asyncio
        import functools
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(
            self.dispatch, type, payload, meta=meta, id=id, actor=actor, expect_seq=expect_seq))

    def afollow(self, after: Optional[int] = None, *,
                types: Union[None, str, Iterable[str]] = None,
                timeout: Optional[float] = None
                ) -> "AsyncFollower":
        """follow() for asyncio: ``async for event, changes in store.afollow():``.

        As with follow(), the position is taken when afollow() is called, so
        events committed before the first iteration are not missed. A cancelled
        wait (asyncio.wait_for timing out) leaves it usable, nothing lost; one task
        at a time iterates it; ``await aclose()`` ends it and its thread at once.
        """
        _check_timeout(timeout)
        wanted = _type_filter(types)
        # Called on the event loop: placed without waiting for the lock, which another
        # thread may hold for seconds (a large dispatch_many, a dispatch waiting out
        # busy_timeout for another process), stopping the loop all that time.
        resets = self._resets  # before the head: a reset_to() after it moves the cursor
        head, generation = self._head_at_once()
        # The file's generation with the head: another store's reset_to() before the
        # first read rewinds it too (read there first, it was taken as the start).
        cursor = _FollowCursor(self, self._check_seq(after, "after", head), wanted, resets,
                               rewinds=True, generation=generation)
        return AsyncFollower(cursor, timeout)

    def _head_at_once(self) -> Tuple[Optional[int], Optional[str]]:
        """The head and the file's generation (one statement: one snapshot), without
        waiting for another thread's lock: read on this store's connection if the
        lock is free, else on a connection of its own (a WAL reader never waits for
        a writer); (None, None) if neither can be had at once (a store in memory, a
        file SQLite will not open a second time just now)."""
        if self._lock.acquire(blocking=False):
            try:
                self._check_open()
                return self._head_and_generation_in(self._conn)
            finally:
                self._lock.release()
        self._check_open()
        if self._file in (":memory:", ""):
            return None, None
        try:
            conn = sqlite3.connect(_file_uri(self._file, "ro"), uri=True, timeout=0,
                                   isolation_level=None)
        except sqlite3.Error:
            return None, None
        try:
            return self._head_and_generation_in(conn)
        except sqlite3.Error:
            return None, None
        finally:
            self._close_beside(conn)

    @staticmethod
    def _head_and_generation_in(conn: sqlite3.Connection) -> Tuple[int, Optional[str]]:
        head, generation = conn.execute(
            "SELECT (SELECT max(seq) FROM events), "
            "(SELECT value FROM fluxlite_meta WHERE key = 'generation')").fetchone()
        return int(head or 0), _dumps(0) if generation is None else str(generation)

    # -- verify and replay --------------------------------------------------

    def verify(self, *, progress: Optional[Callable[[int], None]] = None) -> None:
        """Replay the whole log into a fresh read model; ReplayMismatch unless equal.

        SQLite checks the file's structure (PRAGMA integrity_check; for a file,
        on a second connection beside the replay) and the replay recomputes the
        seals as it goes: damage is a StorageError, and it is what is reported
        when the replay also fails.
        Replays into a temporary on-disk database, so memory stays flat in the
        size of the log. For a file, the log is read and the live tables compared
        through a second connection (the last page of the log and the tables in one
        snapshot), without holding the store: its other threads dispatch and read
        meanwhile. In memory, in a preview, or if this store's reset_to() or a
        rebuild changes the file meanwhile, the replay runs (or runs again) through
        the store's own connection, holding it throughout; after another process's
        reset or rebuild during that one too, it runs again (Busy after four
        replays each crossed by one). ``progress(seq)`` is called
        every 1,000 events (again from the start, if the replay runs again); it
        may read the store, not write to it (a dispatch, preview, consumer, ack,
        rebuild or reset_to from it is a UsageError).
        """
        reducer = self._require_reducer("verify()")
        _check_progress(progress)
        with self._lock:
            self._check_open()
            integrity = _IntegrityCheck(self)
        try:
            problems = self._replay_and_compare(reducer, progress, integrity.inline)
        except BaseException as exc:
            integrity.finish(self, cause=exc)
            raise
        integrity.finish(self)
        if problems:
            raise ReplayMismatch(
                "Replaying the log does not give the live read model. If you changed "
                "a reducer, open the store with a new version= (or call rebuild()) so "
                "the model is rebuilt with it. Otherwise: reducers must be deterministic "
                "(time from event.ts, ids from the event) and only fluxlite may write "
                "the read-model tables (rebuild() repairs a hand edit). Differences:\n"
                + "\n".join(problems)
            )

    def _replay_and_compare(self, reducer: Reducer, progress: Optional[Callable[[int], None]],
                            check_integrity: bool) -> List[str]:
        """verify()'s replay: the differences found. Through a second connection,
        without the store's lock, where the file can be opened again (see
        _replay_beside); else, or if this store's reset_to() or a rebuild changed the
        file meanwhile, through the store's own connection, holding its lock."""
        if not check_integrity:  # (inline: the file could not be opened again)
            beside = self._reader_beside()
            if beside is not None:
                source, tables, generation, resets = beside
                try:
                    problems = self._replay_beside(reducer, progress, source, tables,
                                                   generation, resets)
                finally:
                    self._close_beside(source)
                if problems is not None:
                    return problems
                _log.debug("verify(): the file was reset or rebuilt during the replay; "
                           "replaying again, holding the store")
        # Holding the lock stops this store's resets and rebuilds, not another
        # process's: the replay runs again after one (a few times: one that resets
        # the file without pause would keep verify() replaying for ever).
        for _ in range(_VERIFY_RETRIES):
            problems = self._replay_holding_lock(reducer, progress, check_integrity)
            if problems is not None:
                return problems
            _log.debug("verify(): another process reset or rebuilt the file during the "
                       "replay; replaying again")
        raise Busy(f"verify() of {self._path!r} replayed the log {_VERIFY_RETRIES + 1} times, "
                   f"and each time another process reset or rebuilt the file meanwhile (a "
                   f"reset_to() or rebuild() loop?): nothing was found wrong, nothing was "
                   f"verified either. Run verify() again once the file is left alone.")

    def _reader_beside(self) -> Optional[Tuple[sqlite3.Connection, Dict[str, _TableInfo],
                                               Optional[str], int]]:
        """A second connection to the store's file for verify() and rebuild(), with the
        tables, the generation and the reset count it starts from; None where there is
        none to be had: in memory, in a preview or another open transaction (its
        snapshot is the one to verify), a moved file, one that cannot be opened again."""
        with self._lock:
            self._check_open()
            if self._path in (":memory:", "") or self._previewing \
                    or self._conn.in_transaction or not self._file_is_its_own():
                return None
            with _reading(self._path), _read_txn(self._conn):
                self._check_model_current()
                generation = _stored_generation(self._conn)
            tables, resets = dict(self._model.tables), self._resets
        try:
            source = _connect_readonly(self._file)
        except FluxliteError:
            return None
        if not self._file_is_its_own():  # replaced while it was being opened
            source.close()
            return None
        return source, tables, generation, resets

    def _replay_beside(self, reducer: Reducer, progress: Optional[Callable[[int], None]],
                       source: sqlite3.Connection, tables: Dict[str, _TableInfo],
                       generation: Optional[str], resets: int) -> Optional[List[str]]:
        """verify()'s replay through ``source``, a second connection, in pages, without
        the store's lock: the store's other threads dispatch and read meanwhile (held
        for the whole replay, it stopped them for seconds; held for the comparison
        alone, still 0.25 s at 100,000 rows). From the page that reaches
        the head on, one snapshot of ``source`` holds the rest of the log and the live
        tables compared: one head for both. None if this store's reset_to() or a
        rebuild (by any store) changed the file meanwhile: what was replayed may be
        another log."""
        replica = _scratch_model(self._schema, "", journal=False)
        try:
            # The snapshot begins at its first read after BEGIN, not at BEGIN: other
            # processes' commits meanwhile can still be checkpointed until then.
            log = self._read_log(sealed=True, at_end=lambda: source.execute("BEGIN"),
                                 conn=source)
            try:
                self._replay_verified(replica, reducer, progress, log)
            except FluxliteError:  # damage, or a failing reducer: or another log by now?
                if self._changed_since(source, generation, resets):
                    return None
                raise
            if self._changed_since(source, generation, resets):  # (in the snapshot)
                return None
            with _reading(self._path):
                return _compare(_Model(source, tables, threading.RLock()), replica)
        finally:
            # The snapshot first: a Ctrl-C raised as the replica's close() returned
            # would leave it open, holding the WAL against checkpoints.
            try:
                if source.in_transaction:
                    source.execute("ROLLBACK")
            finally:
                replica.conn.close()

    def _changed_since(self, source: sqlite3.Connection, generation: Optional[str],
                       resets: int) -> bool:
        """Whether this store's reset_to() or a rebuild changed the file since verify()
        began. The generation as ``source`` reads it (in its snapshot, at the end);
        resets are counted under the lock, which reset_to() holds from its copy to its
        count: one whose copy ``source`` read from is counted by then."""
        with _reading(self._path):
            stored = _stored_generation(source)
        with self._lock:
            self._check_not_closed()  # by another thread meanwhile: as before, an error
            return self._resets != resets or stored != generation

    def _replay_holding_lock(self, reducer: Reducer, progress: Optional[Callable[[int], None]],
                             check_integrity: bool) -> Optional[List[str]]:
        """verify()'s replay through the store's own connection, holding its lock. The
        log is read in pages, each a short read, so other processes' commits meanwhile
        can be checkpointed; from the page that reaches the head on, one snapshot holds
        the rest of the log and the live tables the replay is compared with. None
        if another process reset or rebuilt the file meanwhile."""
        conn = self._conn
        with self._lock:
            self._check_open()  # again: another thread may have closed it meanwhile
            owned = not conn.in_transaction  # else the caller's snapshot is the one
            with _reading(self._path):
                self._check_model_current()
                generation = _stored_generation(conn) if owned else None
                if check_integrity:
                    _check_integrity(conn, self._path)
                replica = _scratch_model(self._schema, "", journal=False)
                try:
                    log = self._read_log(sealed=True, at_end=(lambda: conn.execute("BEGIN"))
                                         if owned else None)  # checks the seals as it goes
                    try:
                        self._replay_verified(replica, reducer, progress, log)
                    except FluxliteError:  # damage, or a failing reducer: or another log?
                        if owned and _stored_generation(conn) != generation:
                            return None
                        self._check_model_current()  # a rebuild meanwhile is not damage
                        raise
                    if owned and _stored_generation(conn) != generation:
                        return None  # (read in the snapshot the tables are compared in)
                    self._check_model_current()  # in the snapshot: the model replayed
                    return _compare(self._model, replica)
                finally:
                    # The snapshot first: a Ctrl-C raised as the replica's close() returned
                    # left it open, and the store refused every later dispatch.
                    try:
                        if owned and conn.in_transaction:
                            conn.execute("ROLLBACK")
                    finally:
                        replica.conn.close()

    def _replay_verified(self, replica: _Model, reducer: Reducer,
                         progress: Optional[Callable[[int], None]], log: Iterator[Event]) -> None:
        """Replay ``log`` (its seals checked as it is read) into ``replica``."""
        try:
            with self._verify_replaying():
                _apply_events(replica, reducer, log, journal=False,
                              progress=self._unguarded(progress, True))
        except StorageError:
            raise
        except FluxliteError as replay_error:
            # A damaged event can fail its reducer before the end of its seal's
            # range is reached: read on, so damage is reported as damage.
            try:
                with self._verify_replaying():  # (upcasters run on what is read)
                    collections.deque(log, maxlen=0)
            except StorageError as damage:
                raise damage from replay_error
            raise

    def replay(self, upto: Optional[int] = None, *,
               into: Union[str, "os.PathLike[str]"] = ":memory:") -> "Store":
        """A new store holding the first ``upto`` events exactly as logged.

        Ids, ts and meta are kept; the read model is what the current reducer
        (and upcasters) make of them. ``into`` is ":memory:" or the path of a
        new or empty store. Middleware does not run on the copied events.
        """
        reducer = self._require_reducer("replay()")
        upto = self._check_seq(upto, "upto")
        file = os.fspath(into) if isinstance(into, (str, os.PathLike)) else into
        if not isinstance(file, str):
            raise UsageError(f"into must be a path or ':memory:'; received {_describe(into)}.")
        _check_path(file)
        _empty_if_blank(file)
        present = _present(file) if file != ":memory:" else {}
        created = file != ":memory:" and not present[""]
        blank: Optional[Checkpoint] = None
        if not created and file != ":memory:" and os.path.getsize(file) > 0:
            # Looked at read-only first: opening it with this store's schema would
            # rebuild its read model before its events could be counted.
            with open(file, readonly=True) as existing:
                if existing.head:
                    raise UsageError(
                        f"replay(into={file!r}) needs a new or empty store; that one "
                        f"already has {existing.head} events. Pass a new path."
                    )
                # Copied now, before that rebuild: an empty store of another schema
                # gets its own tables back if this fails.
                blank = existing.checkpoint()
        target: Optional[Store] = None
        after = 0
        try:
            # This store's own schema: accepted once, so not judged by rules added since.
            target = _open_connection(
                _connect(file, self._durability), file, schema=self._schema, reducer=reducer,
                middleware=self._middleware, durability=self._durability,
                version=self._version, upcasters=self._upcasters, adopt=False,
                clock=self._clock, ids=self._ids, new_schema=False)
            if blank is None and not created and file != ":memory:":  # a 0-byte file
                blank = target.checkpoint()
            if file != ":memory:":  # until the last event is in: see _check_finished
                with target._lock, _write_txn(target._conn):
                    _write_meta(target._conn, unfinished_replay=upto)
            outside = _outside_references(target._conn, list(target._model.tables))
            if outside:  # the copy has no such tables to check against (as a replay's scratch)
                target._conn.execute("PRAGMA foreign_keys = OFF")
            after = 0
            while after < upto:
                with self._lock:
                    self._check_open()
                    # About 1,000 events per transaction, cut where the log's own
                    # transactions end (their seals): a batch whose deferred
                    # references hold only at its end must be copied whole.
                    end = self._transaction_end(min(after + 1000, upto))
                    rows = self._conn.execute(
                        f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq > ? AND seq <= ? "
                        f"ORDER BY seq", (after, min(end, upto))).fetchall()
                try:
                    target._commit_prepared([_prepared_from_row(r) for r in rows])
                    target._pending.clear()  # nobody subscribed to the copy yet
                except ChangesetError as exc:
                    if end <= upto or "deferred" not in str(exc):
                        raise
                    raise ChangesetError(
                        f"{exc} Event {upto} is inside a transaction that ends at seq "
                        f"{end}: its deferred references hold only at that end, so the "
                        f"first {upto} events alone are not a store. Replay up to {end}, "
                        f"or use at({upto}) to look at that moment."
                    ) from exc
                after = rows[-1][0]
            if outside:  # from here on, a store like any opened on that file
                target._conn.execute("PRAGMA foreign_keys = ON")
            with target._lock, _write_txn(target._conn):
                target._conn.execute("DELETE FROM fluxlite_meta WHERE key = 'unfinished_replay'")
        except BaseException:
            if target is not None:
                if blank is not None:  # a part of the log would pass for a whole one
                    try:
                        target._conn.execute("PRAGMA foreign_keys = ON")
                        # Only if nobody else wrote since (the copy goes back over the
                        # whole file: another writer's acknowledged events would go too).
                        last = target._conn.execute(
                            "SELECT seq, id FROM events ORDER BY seq DESC LIMIT 1").fetchone()
                        if last is not None:
                            with self._lock:
                                ours = self._conn.execute("SELECT seq, id FROM events "
                                                          "WHERE seq = ?", (last[0],)).fetchone()
                            if last != ours or last[0] > after:
                                raise UsageError(f"another writer added events to {file!r} "
                                                 f"meanwhile (head {last[0]})")
                        # Not reset_to(): the copy may hold another schema (the file's own).
                        with target._lock, blank._lock:
                            blank._conn.backup(target._conn, progress=_refuse_locked)
                    except Exception as exc:  # the replay's error is the one to report
                        _log.warning("replay(into=%r) failed, and its copied events could "
                                     "not be removed: %s", file, exc)
                        # Kept, it is a store others use too (their events are in it):
                        # not one to refuse on open as unfinished.
                        with contextlib.suppress(Exception), target._lock, \
                                _write_txn(target._conn):
                            target._conn.execute(
                                "DELETE FROM fluxlite_meta WHERE key = 'unfinished_replay'")
                target.close()
            if created:  # a part of the log would pass for a whole one
                _remove_made(file, present)
            raise
        finally:
            if blank is not None:
                blank.close()
        return target

    def _transaction_end(self, seq: int) -> int:
        """The last seq of the write transaction that logged ``seq`` (its seal)."""
        try:
            end = self._conn.execute("SELECT min(seq) FROM fluxlite_seals WHERE seq >= ?",
                                     (seq,)).fetchone()[0]
        except sqlite3.OperationalError:  # a format 1 file opened read-only: no seals
            end = None
        return seq if end is None else end

    def rebuild(self, *, progress: Optional[Callable[[int], None]] = None) -> None:
        """Rebuild the read model by replaying the whole log with the current code.

        The replay runs into a separate database; the new tables and journal
        are swapped in with one transaction. Until then readers see the old
        model, and other writers are blocked only for the final catch-up and
        swap: other processes, and for a file this store's other threads (the
        log is read through a second connection, without holding the store; in
        memory, or replayed again because this store's reset_to() or a rebuild
        changed the file meanwhile, holding it throughout; after another
        process's reset_to() during that one too, it runs again: Busy after three
        such replays, nothing changed). If any event fails, nothing changes and
        the error names it. ``progress(seq)`` is called every 1,000 events replayed.
        """
        self._require_reducer("rebuild()")
        _check_progress(progress)
        self._check_writable("rebuild()")
        self._check_not_verifying("rebuild", "Rebuild")
        with self._lock:
            self._check_open()  # again: another thread may have closed it meanwhile
            if self._conn.in_transaction:  # a preview's, which would roll the swap back
                raise UsageError("rebuild() cannot run inside a dispatch or a preview; "
                                 "call it on its own.")
            self._check_model_current()
        _rebuild(self, self._schema, self._version, progress)

    def _require_reducer(self, what: str) -> Reducer:
        self._check_open()
        if self._reducer is None:
            raise UsageError(f"{what} needs the reducer; open the store with reducer=.")
        return self._reducer

    def _check_seq(self, seq: Optional[int], name: str, head: Optional[int] = None) -> int:
        if head is None:
            head = self.head
        if seq is None:
            return head
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise UsageError(f"{name} must be a seq (int); received {_describe(seq)}.")
        if not 0 <= seq <= head:
            raise UsageError(  # (a number past any seq may be too long for str())
                f"{name}={seq if seq < 2**63 else _describe(seq)} is outside the log: seqs run from 0 (before the first "
                f"event) to the head, {head}."
            )
        return seq

    def _read_log(self, after: int = 0, sealed: bool = False,
                  at_end: Optional[Callable[[], Any]] = None,
                  conn: Optional[sqlite3.Connection] = None) -> Iterator[Event]:
        """The log's events after ``after``, read in pages (see _Pages, and its
        ``at_end``); ``sealed``: all of them, seals checked. Through ``conn``, if
        given (verify()'s second connection), else the store's own."""
        through = self._conn if conn is None else conn
        rows: Iterator[Sequence[Any]] = _event_pages(through, after, at_end)
        if sealed:
            assert after == 0
            rows = _sealed(through, self._path, rows)
        with _reading(self._path):
            for row in rows:
                yield self._upcast(_event_from_row(row))

    # -- the past ----------------------------------------------------------------

    def at(self, seq: Optional[int] = None, *, time: Optional[datetime] = None) -> "View":
        """The whole read model as it was right after event ``seq`` (read-only).

        Or, with ``time`` (a timezone-aware datetime), right after the last
        event with ``ts <= time``. ``at(0)`` is the empty model; ``at(head)``
        equals the live view. Built from the live tables by undoing the
        journal's changes after ``seq`` (no replay). Close it, or use it as a
        context manager.
        """
        if isinstance(seq, (datetime, date)):  # at(when): the likeliest slip
            raise UsageError(f"at() takes a seq first, or a time by name: at(time=...); "
                             f"received {_describe(seq)} as the seq.")
        if time is not None:
            if seq is not None:
                raise UsageError("at() takes a seq or a time, not both.")
            seq = self._seq_at_time(time)
        with self._lock:
            seq = self._check_seq(seq, "seq")
            with _reading(self._path), _read_txn(self._conn):
                self._check_model_current()
                try:
                    return _as_of(self, seq)
                except sqlite3.OperationalError as exc:
                    if str(exc) != "too many SQL variables":
                        raise
                    raise _too_wide_to_copy(self) from exc
                except sqlite3.IntegrityError as exc:  # live rows their own schema forbids
                    raise StorageError(
                        f"{self._path!r} is damaged: a read-model row breaks the schema's "
                        f"constraints ({exc}). Check it with PRAGMA integrity_check; "
                        f"store.rebuild() rewrites the read model from the log."
                    ) from exc
                except (ValueError, TypeError) as exc:  # a journal row that is not JSON
                    raise StorageError(
                        f"{self._path!r} is damaged: a journal row after seq {seq} cannot be "
                        f"read ({exc}). If verify() finds the log intact, store.rebuild() "
                        f"rewrites the journal from it; otherwise restore it from a backup."
                    ) from exc

    def _seq_at_time(self, time: datetime) -> int:
        if not isinstance(time, datetime) or time.utcoffset() is None:  # naive, as Python says
            raise UsageError(
                f"time must be a timezone-aware datetime (e.g. datetime(2026, 1, 1, "
                f"tzinfo=timezone.utc)); received {_describe(time)}. {_time_hint(time)}"
            )
        try:
            text = _format_ts(time)
        except OverflowError:  # in UTC it is before year 1 or after 9999: no ts is
            return 0 if time.year < 5000 else self.head
        return self._seq_by_ts(text, "<=")

    def _seq_by_ts(self, text: str, op: str) -> int:
        """The last seq whose ts is ``op`` (< or <=) ``text``, or 0.

        ts never decreases along seq, so a binary search on seq finds it in
        about 20 point reads for a million events, where "max(seq) WHERE ts <= ?"
        read every event after it (0.6 s from the start of a million)."""
        with self._lock, _reading(self._path):
            self._check_open()
            conn = self._conn
            low, high = 0, conn.execute("SELECT max(seq) FROM events").fetchone()[0] or 0
            while low < high:  # low is 0 or a match; every seq after high is not
                middle = (low + high + 1) // 2
                row = conn.execute(f"SELECT ts {op} ? FROM events WHERE seq = ?",
                                   (text, middle)).fetchone()
                if row is None:  # a gap in seq (a damaged file): a scan still answers
                    return int(conn.execute(f"SELECT max(seq) FROM events WHERE ts {op} ?",
                                            (text,)).fetchone()[0] or 0)
                low, high = (middle, high) if row[0] else (low, middle - 1)
            return low

    def history(self, table: str, key: Any, *, after: int = 0, upto: Optional[int] = None,
                limit: Optional[int] = None, reverse: bool = False) -> List["Revision"]:
        """Every version of one row, oldest first, from the journal (no replay).

        ``after`` and ``upto`` keep the versions made by events with
        after < seq <= upto; ``reverse=True`` gives them newest first; ``limit``
        keeps the first that many, in that order (``limit=10, reverse=True``:
        the ten latest). A row's history is read through its journal index,
        so a window of a long history costs what the window holds.
        """
        _check_count(after, "after", "a seq (int >= 0)")
        _check_count(upto, "upto", "a seq (int >= 0) or None", none=True)
        _check_count(limit, "limit", "an int >= 0 or None", none=True)
        if not isinstance(reverse, bool):
            raise UsageError(f"reverse must be True or False; received {_describe(reverse)}.")
        return self._history(table, key, after, upto, limit, reverse)

    def _history(self, table: str, key: Any, after: int = 0, upto: Optional[int] = None,
                 limit: Optional[int] = None, reverse: bool = False,
                 op: Optional[str] = None) -> List["Revision"]:
        """history()'s answer; ``op``: only the versions that change made."""
        with self._lock:
            self._check_open()
            # One snapshot from the check to the journal's rows: another process's
            # rebuild with other code in between handed old code the new code's rows.
            with _read_txn(self._conn):
                self._check_model_current()
                rows = self._history_rows(table, key, after, upto, limit, reverse, op)
        renamed = {seq: self.event(seq) for seq, _, kind, *_ in rows if kind in self._upcasters}
        try:  # each event's type as events() gives it: after upcasters
            return [Revision(seq, event_id, kind if seq not in renamed else
                             getattr(renamed[seq], "type", kind), _parse_ts(ts), op,
                             json.loads(before) if before else None,
                             json.loads(after) if after else None)
                    for seq, event_id, kind, ts, op, before, after in rows]
        except (ValueError, TypeError) as exc:
            raise StorageError(
                f"{self._path!r} is damaged: the journal rows of {table!r} {key!r} cannot be "
                f"read ({exc}). If verify() finds the log intact, store.rebuild() rewrites "
                f"the journal from it; otherwise restore the file from a backup."
            ) from exc

    def _history_rows(self, table: str, key: Any, after: int, upto: Optional[int],
                      limit: Optional[int], reverse: bool, op: Optional[str]) -> List[Any]:
        """The journal's rows of one row's versions (with their events' id, type, ts)."""
        info = self._model.table(table, error=UsageError)
        params = info.key_params(_as_key(key), UsageError)
        for part in params:
            if isinstance(part, str):
                _check_text(part, "The key", UsageError)
        try:
            stored = [_as_stored(params, info.pk_types)]
        except (sqlite3.Error, OverflowError, ValueError):
            return []  # no row has it: SQLite cannot store it, or made it infinite
        if any(part.__class__ is float and not math.isfinite(part) for part in stored[0]):
            return []  # text past a REAL's range ('1e999', 400 digits) SQLite reads as inf
        live = self._model.get(info, _unparams(info, params))
        if live is not None:  # as the row holds its key (COLLATE NOCASE: 'a' for 'A')
            stored.append(tuple(live[c] for c in info.pk))
        key_texts = self._journal_key_texts(info, stored)
        window = [min(after, 2**63 - 1), min(2**63 - 1 if upto is None else upto, 2**63 - 1)]
        order = " DESC" if reverse else ""
        with _reading(self._path):
            rows = self._conn.execute(
                "SELECT j.seq, e.id, e.type, e.ts, j.op, j.before, j.after "
                "FROM fluxlite_journal j JOIN events e ON e.seq = j.seq "
                f"WHERE j.tbl = ? AND j.key IN ({', '.join('?' * len(key_texts))}) "
                f"AND j.seq > ? AND j.seq <= ?{'' if op is None else ' AND j.op = ?'} "
                f"ORDER BY j.seq{order}, j.n{order} LIMIT ?",
                (info.name, *key_texts, *window, *([] if op is None else [op]),
                 -1 if limit is None else min(limit, 2**63 - 1))).fetchall()
        return rows

    def _journal_key_texts(self, info: _TableInfo, stored: List[Tuple[Any, ...]]) -> List[str]:
        """The texts the journal may hold a row's key as (see _part_spellings)."""
        options = [_part_spellings(key, info.pk_types) for key in stored]
        if sum(math.prod(len(o) for o in parts) for parts in options) <= _LISTED_SPELLINGS:
            return list(dict.fromkeys(_dumps(_key_json(_unparams(info, k))) for parts in options
                                      for k in itertools.product(*parts)))
        # A key of many parts of no type, each a whole number, has 2**n spellings
        # (3**n with zeros): too many to list, or to bind (a 12-part key of zeros
        # took seconds, then SQLite refused its half a million variables). Keep
        # those the table's journal holds: one pass over its index, not 2**n.
        wanted = [[{_dumps(value) for value in part} for part in parts] for parts in options]
        found = []
        with _reading(self._path):
            for (text,) in self._conn.execute(
                    "SELECT DISTINCT key FROM fluxlite_journal WHERE tbl = ?", (info.name,)):
                try:
                    held = json.loads(text)
                except ValueError:
                    continue  # damage, which verify() names
                if isinstance(held, list) and any(
                        len(held) == len(sets) and all(_dumps(v) in s for v, s in zip(held, sets))
                        for sets in wanted):
                    found.append(text)
        return found

    def restore(self, table: str, key: Any, *, at: Optional[int] = None,
                actor: Optional[str] = None, meta: Optional[Mapping[str, Any]] = None,
                id: Optional[str] = None) -> Optional[Event]:
        """Make a row what it was at seq ``at`` (default: right before its last deletion).

        Dispatches a ``fluxlite.restore`` event (payload: table, key, row)
        through the normal pipeline, so middleware and access control apply
        to it by that type and replay reproduces it; ``actor``, ``meta`` and ``id``
        are dispatch()'s. Returns that event (as dispatch() does).
        """
        # Only the version needed is read: a row's history can be long.
        if at is None:
            deletions = self._history(table, key, limit=1, reverse=True, op="delete")
            if not deletions and not self._history(table, key, limit=1):
                raise UsageError(
                    f"Row {_quoted(key)} of {_quoted(table)} has no history: no event wrote a row with "
                    f"that key. A deleted row is found by its key as stored (check its "
                    f"spelling: 1 or '1', its case in a COLLATE NOCASE column)."
                )
            if not deletions:
                raise UsageError(
                    f"Row {_quoted(key)} of {_quoted(table)} was never deleted; pass at=SEQ to set it "
                    f"back to an earlier version."
                )
            row, when = deletions[0].before, f"before its deletion at seq {deletions[0].seq}"
        else:
            at = self._check_seq(at, "at")
            latest = self._history(table, key, upto=at, limit=1, reverse=True)
            row, when = (latest[0].after if latest else None), f"at seq {at}"
        if row is None:
            raise UsageError(f"Row {_quoted(key)} of {_quoted(table)} did not exist {when}; nothing to restore.")
        if _typed(self.view[table].get(key)) == _typed(row):  # 1.0 is not 1 here
            # Unless this is a retry of a restore that committed (its id is in the log):
            # dispatch() then returns the stored event, as it does for any retried id
            # (or raises Conflict if that id holds something else).
            if not (isinstance(id, str) and self.event(id) is not None):
                raise UsageError(f"Row {_quoted(key)} of {_quoted(table)} is already as it was {when}.")
        info = self._model.table(table)
        payload = {"table": table, "key": _key_json(info.key_of(row)), "row": row}
        try:
            return self.dispatch(RESTORE, payload, actor=actor, meta=meta, id=id)
        except ChangesetError as exc:  # the schema refuses the old version among today's rows
            if not isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise
            raise ChangesetError(_restore_refused(table, key, when, exc.__cause__)) from exc


def _restore_refused(table: str, key: Any, when: str, exc: sqlite3.IntegrityError) -> str:
    """Why restore() could not bring a version back: the rows it met are today's,
    so the fix is the user's (the changes are fluxlite's own, not a reducer's)."""
    text = str(exc)
    if "FOREIGN KEY" in text:
        fix = ("it refers to a row that is gone now. Restore that row first "
               "(store.restore() on the table it references), then this one")
    elif "UNIQUE" in text or "PRIMARY KEY" in text:
        fix = ("another row holds one of its UNIQUE values now. Change or delete "
               "that row first, then restore this one")
    else:
        fix = "the schema refuses it among the rows there are now"
    return (f"Row {_quoted(key)} of {_quoted(table)} cannot be restored as it was {when}: {fix} "
            f"({text}). Nothing was written.")


def _check_count(value: Any, name: str, rule: str, none: bool = False) -> None:
    """A seq or a count argument: an int >= 0 (None too, where ``none``); not a bool."""
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"{name} must be {rule}; received {_describe(value)}.")


def _time_hint(value: Any) -> str:
    """How to make at(time=)'s refused value a time, by what it is."""
    if isinstance(value, datetime):
        return "A naive time is ambiguous: give it its zone, e.g. .replace(tzinfo=timezone.utc)."
    if isinstance(value, date):
        return ("A date is not an instant: give the time of day and the zone, e.g. "
                "datetime(2026, 1, 31, tzinfo=timezone.utc) for its start in UTC.")
    if isinstance(value, str):
        return ("Text is not read as a time here: parse it first, e.g. "
                "datetime.fromisoformat('2026-01-31T12:00:00+00:00').")
    if isinstance(value, (int, float)):
        return ("A number is not read as a time here: for Unix seconds, "
                "datetime.fromtimestamp(seconds, timezone.utc).")
    return ""


def _check_sources(clock: Any, ids: Any) -> None:
    """open()'s and fork()'s clock= and ids=: functions of no arguments, or None."""
    for name, function in (("clock", clock), ("ids", ids)):
        if function is not None and not callable(function):
            raise UsageError(f"{name} must be a function of no arguments; received "
                             f"{_describe(function)}.")


def _check_progress(progress: Any) -> None:
    """verify()'s and rebuild()'s progress=: checked before the replay, not after 1,000 events."""
    if progress is not None and not callable(progress):
        raise UsageError(f"progress must be a function progress(seq), or None; received "
                         f"{_describe(progress)}.")


def _stale(expect_seq: int, head: int) -> Conflict:
    return Conflict(
        f"expect_seq={expect_seq} but the log's head is {head}: another dispatch came "
        f"first. Re-read the state and retry with expect_seq={head}."
    )


def _check_expect_seq(expect_seq: Any) -> None:
    if expect_seq is not None and (isinstance(expect_seq, bool) or not isinstance(expect_seq, int)
                                   or not 0 <= expect_seq < 2**63):  # no seq is larger
        raise UsageError(
            f"expect_seq is the seq you last saw (an int >= 0) or None; received "
            f"{_describe(expect_seq)}."
        )


def _check_timeout(timeout: Any) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout >= 0 or math.isinf(timeout)):
        raise UsageError(
            f"timeout is seconds without a new event before the iterator ends (a finite "
            f"number >= 0), or None to wait for ever; received {_describe(timeout)}."
        )


def _refuse_during_setup(action: Any) -> Any:
    raise UsageError(
        "Dispatching while the middleware chain is being built is not allowed; "
        "dispatch from inside the function middleware(store) returns, not from "
        "middleware(store) itself."
    )


def _check_runs_when_called(listener: Callable[..., Any]) -> None:
    """A subscriber whose call only makes a coroutine or a generator (an async def,
    a def with yield) would never run its body: nothing awaits or iterates what
    fluxlite is handed, so every event would pass unheard, with at most a
    RuntimeWarning. Refused at subscribe()."""
    # An object's own __call__ too (an async def __call__, which inspect does not judge
    # on the object itself before Python 3.13), besides the callable as it is.
    calls = (listener, getattr(type(listener), "__call__", None))
    kind = next((name for name, test in (
        ("an async function", inspect.iscoroutinefunction),
        ("an async generator function", inspect.isasyncgenfunction),
        ("a generator function", inspect.isgeneratorfunction))
        if any(_inspect_says(test, call) for call in calls)), None)
    if kind is None:
        return
    raise UsageError(
        f"subscribe() received {kind}, {_describe(listener)}: a subscriber is called "
        f"synchronously after each commit, in the dispatching thread, and what that "
        f"call returns is never awaited or iterated, so its body would never run. Give "
        f"a plain def; to work on an event loop, hand the event to it "
        f"(lambda event, changes: loop.call_soon_threadsafe(queue.put_nowait, (event, "
        f"changes))), or read store.afollow() there."
    )


def _inspect_says(test: Callable[[Any], bool], function: Any) -> bool:
    """inspect's ``test`` (iscoroutinefunction, ...) of ``function``, False for what only
    poses as a function: a Mock(spec=handler), as tests pass for a subscriber or a rule,
    says its class is function, so inspect reads its __code__, a mock too, and
    co_flags & flag was a raw TypeError (Mock) or true (MagicMock: "an async function")."""
    inner = function
    for _ in range(100):  # through partials and bound methods, as inspect goes
        try:
            if inner.__class__ is not type(inner):  # a mock with a spec (or a proxy)
                return False
        except Exception:
            return False
        if isinstance(inner, functools.partial):
            inner = inner.func
        elif inspect.ismethod(inner):
            inner = inner.__func__
        else:
            break
    try:
        return bool(test(function))
    except Exception:  # an object whose attributes answer anything: not judged
        return False


def _unrun(result: Any) -> bool:
    """Whether a subscriber's result is work that never ran: a coroutine, a
    generator (a lambda calling an async def, a generator expression). A coroutine
    is closed, so that no "never awaited" warning follows it."""
    if inspect.iscoroutine(result):
        result.close()
        return True
    return inspect.isgenerator(result) or inspect.isasyncgen(result)


_UNRUN_SUBSCRIBER = (
    "fluxlite subscriber %r returned, on event %s (%s), %s, which nothing awaits or "
    "iterates: its work never ran. A subscriber is called synchronously after each "
    "commit; do the work in the call (to run a coroutine, hand the event to the event "
    "loop: loop.call_soon_threadsafe, asyncio.run_coroutine_threadsafe)."
)


def _renamed_away(kind: str, event: Event) -> UsageError:
    return UsageError(
        f"types= names {_quoted(kind)}, but this store's upcasters turn logged "
        f"{_quoted(kind)} events into {_quoted(event.type)} (event {event.seq} for one), "
        f"and types= matches the type as upcast, as reducers and subscribers see it: "
        f"{_quoted(kind)} would match none of them. Pass types={_quoted(event.type)} "
        f"(the old events come with it), or, where the upcaster renames only some "
        f"{_quoted(kind)} events, both: types=[{_quoted(kind)}, {_quoted(event.type)}] "
        f"(types={_quoted(event.type)} alone would miss the {_quoted(kind)} events it "
        f"leaves as they are)."
    )


def _type_filter(types: Union[None, str, Iterable[str]]) -> Optional[FrozenSet[str]]:
    if types is None:
        return None
    listed = [types] if isinstance(types, str) else \
        list(types) if isinstance(types, collections.abc.Iterable) else [types]
    if not all(isinstance(t, str) for t in listed):
        raise UsageError(f"types must be a str or an iterable of str; received {_describe(types)}.")
    wanted = frozenset(listed)
    for kind in wanted:
        _check_text(kind, "An event type", UsageError)
    if not wanted or "" in wanted:  # no event has an empty type: it would match none, quietly
        raise UsageError(
            f"types are the event types to keep: at least one, each a non-empty str; "
            f"received {_describe(types)}, and an empty type, or none at all, matches no "
            f"event. Pass the types to keep, or types=None for every type."
        )
    return wanted


# history() binds every spelling of a key up to this many; past it, it reads
# which of them the journal holds (see Store._journal_key_texts).
_LISTED_SPELLINGS = 64


def _part_spellings(key: Tuple[Any, ...], declared: Sequence[str]) -> List[List[Any]]:
    """Each part of the key as each way it can be stored: in a column of no type (no
    affinity) a whole number can be held as 1 or as 1.0, and SQL finds either with
    either. The key's spellings are every combination of its parts' spellings."""
    options = []
    for value, kind in zip(key, declared):
        whole = (value.__class__ in (int, float) and _affinity(kind) == "blob"
                 and abs(value) < 2**53 and float(value).is_integer())
        options.append([int(value), float(value)] + ([-0.0] if value == 0 else [])
                       if whole else [value])
    return options


def _change_from_journal(table: str, key: str, op: str, before: Optional[str],
                         after: Optional[str]) -> Change:
    key_value = json.loads(key)
    if isinstance(key_value, list):
        key_value = tuple(key_value)
    if op == "delete":
        return Change("delete", table, key_value, None)
    after_row = json.loads(after) if after else {}
    if op == "insert":
        return Change("insert", table, key_value, after_row)
    before_row = json.loads(before) if before else {}
    changed = {c: v for c, v in after_row.items() if _differs(before_row.get(c, _MISSING), v)}
    return Change("update", table, key_value, changed)


def _length_limit(conn: sqlite3.Connection) -> int:
    """SQLite's length limit on the connection (bytes of a text)."""
    getlimit = getattr(conn, "getlimit", None)  # Python 3.11+, with the constant (0 in C)
    return int(getlimit(getattr(sqlite3, "SQLITE_LIMIT_LENGTH", 0))) if getlimit \
        else 1_000_000_000


def _expr_depth_limit(conn: sqlite3.Connection) -> int:
    """How deep an expression SQLite parses on the connection (1000 unless built
    otherwise, where Python before 3.11 cannot ask)."""
    getlimit = getattr(conn, "getlimit", None)  # Python 3.11+ (the constant is 3 in C)
    return int(getlimit(getattr(sqlite3, "SQLITE_LIMIT_EXPR_DEPTH", 3))) if getlimit \
        else 1000


def _variable_limit(conn: sqlite3.Connection) -> int:
    """How many parameters one statement may bind on the connection (999 before
    SQLite 3.32, where Python cannot ask)."""
    getlimit = getattr(conn, "getlimit", None)  # Python 3.11+ (the constant is 9 in C)
    return int(getlimit(getattr(sqlite3, "SQLITE_LIMIT_VARIABLE_NUMBER", 9))) if getlimit \
        else 999


def _differs(old: Any, new: Any) -> bool:
    """A stored value changed: 1 became 1.0, or -0.0 became 0.0, too (Python's ==
    says they are equal; a subscriber's mirror would keep the old one)."""
    if old != new or old.__class__ is not new.__class__:
        return True
    return old.__class__ is float and math.copysign(1.0, old) != math.copysign(1.0, new)


_MISSING = object()


def _shown(value: Any) -> str:
    return "(absent)" if value is _MISSING else repr(value)


def _refuse_locked(status: int, remaining: int, pages: int) -> None:
    """backup()'s progress: a step that waited busy_timeout for a lock ends the copy
    (nothing copied: the step's transaction is rolled back) as Busy."""
    if status in (5, 6):  # SQLITE_BUSY, SQLITE_LOCKED (named in sqlite3 from 3.11 only)
        raise sqlite3.OperationalError("database is locked")


# A consumer's ack made with a dispatch: (name, owner, seq, lease, generation), the
# arguments of _advance_consumer.
_Ack = Tuple[str, str, int, float, Optional[str]]


@dataclasses.dataclass
class _Frame:
    """What one dispatch call tells the core, past the middleware chain."""

    expect_seq: Optional[int] = None
    batch: Optional[List[_Prepared]] = None  # dispatch_many collects here (checked, encoded)
    preview: bool = False
    ack: Optional[_Ack] = None  # a consumer's ack in the dispatch's transaction
    acked: bool = False  # that ack committed (a middleware may still raise after next())
    changes: List[Change] = dataclasses.field(default_factory=list)
    refused: Optional[BaseException] = None  # a batch's event that next() refused
    # dispatch_many: per middleware call in progress, the refusal its next() last raised
    # (None once a later next() of that call succeeded: it replaced the refused event).
    calls: List[List[Optional[BaseException]]] = dataclasses.field(default_factory=list)
    position: int = 0  # dispatch_many: the index of the item in the chain now
    origins: List[int] = dataclasses.field(default_factory=list)  # each batch entry's item


class _Lineage:
    """A history of a store's log, begun by a reset_to(): it holds the events of the
    history ``parent`` (the checkpoint's) up to seq ``upto``, then its own. A second
    reset_to() to one checkpoint must know that the events before it are the same
    ones (a slow subscriber still hears those it had not), whatever came between."""

    __slots__ = ("parent", "upto", "depth")
    parent: Optional["_Lineage"]
    upto: int
    depth: int
    _DEEPEST = 64  # resets of resets remembered; older ones count as another history

    def __init__(self, parent: Optional["_Lineage"], upto: int) -> None:
        depth: int = parent.depth + 1 if parent is not None else 0
        if depth > self._DEEPEST:  # bounded walks: forget (undelivered events may drop)
            parent, depth = None, 0
        self.parent, self.upto, self.depth = parent, upto, depth


def _agreed(ours: _Lineage, theirs: Optional[_Lineage], seq: int) -> int:
    """The last seq up to which our log and that of a checkpoint taken at ``seq`` in
    history ``theirs`` hold the same events (0 for histories of different stores)."""
    within: Dict[int, int] = {}  # id of each history ours came from -> agreed up to
    node: Optional[_Lineage] = ours
    upto = seq
    while node is not None:
        within[id(node)] = upto
        upto = min(upto, node.upto)
        node = node.parent
    node, upto = theirs, seq
    while node is not None:
        if id(node) in within:
            return min(upto, within[id(node)])
        upto = min(upto, node.upto)
        node = node.parent
    return 0


class _Reset:
    """A reset_to(): the head it left, the history it erased (``before``) and the one
    it put back (the checkpoint's, taken at ``seq``), for the followers it moves; and
    the file's resets as it left them (``rewinds``, its own last, at ``generation``)."""

    __slots__ = ("head", "before", "into", "seq", "rewinds", "generation")

    def __init__(self, head: int, before: Optional[_Lineage], into: Optional[_Lineage],
                 seq: int, rewinds: List[List[int]], generation: int) -> None:
        self.head, self.before, self.into, self.seq = head, before, into, seq
        self.rewinds, self.generation = rewinds, generation

    def rewound_elsewhere(self, seen: Optional[str]) -> Optional[int]:
        """Where the resets of other stores left the log since generation ``seen``
        (the lowest head), before this one: None if none did."""
        if seen is None:
            return None
        after = _generation_number(seen)
        heads = [head for generation, head in self.rewinds
                 if after < generation < self.generation]
        return min(heads) if heads else None

    def agreed(self, lineage: Optional[_Lineage]) -> Optional[int]:
        """How far the log put back holds the events ``lineage`` held; None when the
        two histories are not known to be related (a checkpoint another Store object
        took of the file, say: the same events, for all this store can tell)."""
        ours: Set[int] = set()
        node = lineage
        while node is not None:
            ours.add(id(node))
            node = node.parent
        node = self.into
        while node is not None and id(node) not in ours:
            node = node.parent
        if lineage is None or node is None:
            return None
        return _agreed(lineage, self.into, self.seq)


class Checkpoint:
    """A copy of a whole store in memory, from Store.checkpoint(), for reset_to().

    ``seq`` is the head it was taken at; ``close()`` frees the copy (a checkpoint
    dropped without it is closed by the collector)."""

    def __init__(self, conn: sqlite3.Connection, seq: int) -> None:
        self._conn, self.seq = conn, seq
        self._lock = threading.Lock()  # held by reset_to() while it copies from _conn
        self._lineage: Optional[_Lineage] = None  # the store's history it was taken in
        # The file it was taken of (its consumers' leases hold there), or the
        # in-memory store itself.
        self._origin: "Union[None, str, Tuple[int, int], weakref.ReferenceType[Store]]" = None
        # A checkpoint dropped without close() (as test suites do) closes its copy:
        # left to the collector, Python 3.13 warns "unclosed database", which
        # -W error or pytest's filterwarnings=error makes a failure.
        weakref.finalize(self, conn.close)

    def _taken_from(self, store: "Store") -> bool:
        """Taken of this store's file (by any store on it), or of this in-memory store."""
        if isinstance(self._origin, tuple):
            return self._origin == store._file_id
        if isinstance(self._origin, str):
            return self._origin == store._file
        return self._origin is not None and self._origin() is store

    def close(self) -> None:
        """Free the copy; reset_to() it afterwards is a UsageError."""
        with self._lock:  # closing a connection SQLite is reading crashes the process
            self._conn.close()

    def __repr__(self) -> str:
        return f"<fluxlite checkpoint at seq {self.seq}>"


# Its name before it was public: a type annotation naming it keeps working.
_Checkpoint = Checkpoint


def _watch_loop(store_ref: "weakref.ReferenceType[Store]") -> None:
    """watch()'s thread: queue the events other connections commit, in order.

    It holds the store only while it reads: a store dropped without close()
    is collected, and the thread ends."""
    me = threading.current_thread()
    while True:
        store = store_ref()
        if store is None or store._watcher is not me:
            return
        committed, commits = store._committed, store._commit_count
        try:
            batch = store._watch_cursor.step(0, queue=store._pending)  # type: ignore[union-attr]
        except Busy:  # another process held the file a while: try again
            continue
        except Exception as exc:  # closed underneath us, an upcaster failed, ...
            if not store._closed:
                _log.error("watch() of %r stopped: %s", store._path, exc)
            with store._lock:
                if store._watcher is me:
                    store._stop_watching()  # so that watch() can start it again
            return
        if batch is None:
            return
        if batch:
            _notify_from_watch(store)
            continue
        del store

        def woken() -> bool:  # a commit here, or the store closed (or dropped)
            store = store_ref()
            return store is None or store._watcher is not me or store._commit_count != commits
        with committed:  # other processes' commits are polled for, every 20 ms
            committed.wait_for(woken, timeout=0.02)


def _notify_from_watch(store: Store) -> None:
    """Deliver in watch()'s thread. A subscriber's Exception is logged by the delivery;
    anything else it raises (sys.exit() in a listener, say) has no caller here to reach,
    and ended the thread, which Python does without a word for SystemExit: watch() then
    took it as running, and no event from elsewhere was heard again. Logged instead,
    and the delivery goes on (each round takes at least the event that raised)."""
    while True:
        try:
            store._notify()
            return
        except BaseException as exc:
            _log.error("A subscriber of %r raised %s in watch()'s thread, where nothing "
                       "can catch it; watch() goes on. Catch it in the subscriber (a "
                       "program ends from its main thread).", store._path, _describe(exc),
                       exc_info=True)


class _FollowCursor:
    """Where a follower is in the log, and how it waits cheaply for more."""

    def __init__(self, store: Store, position: int, wanted: Optional[FrozenSet[str]],
                 resets: Optional[int] = None, *, rewinds: bool = False,
                 generation: Optional[str] = None) -> None:
        """``resets``: the store's reset_to()s when ``position`` was read without the
        lock (afollow()); such a cursor is not in the store's cursors until attach().
        ``rewinds``: goes back after another store's reset_to() (see rewind()), from
        ``generation``, the file's when ``position`` was read (None: its first read)."""
        self.store, self.position, self.wanted = store, position, wanted
        self.rewinds, self.generation = rewinds, generation
        # A consumer's: after another store's reset, it reads its position from the file
        # (and goes back to it), in the snapshot the cursor reads the new history in.
        self.rewound: Optional[Callable[[], int]] = None
        self.reached = position  # the furthest it has been, across reset_to()s
        self.reached_in: Optional[_Lineage] = None  # the history it got there in
        # The last event a follower (follow(), afollow(), a consumer's) yielded of a
        # batch it has not yielded all of, or the seq before the batch's first (the
        # position is already past the whole batch): None between batches.
        self.handed: Optional[int] = None
        self.resets = 0  # reset_to()s of the store since: a batch read before one is stale
        self.read_resets = 0  # resets when the last batch was read (under the lock)
        self.version = -1
        self.commits = -1
        self.behind = False  # the last read filled a page: more of the log to read
        self.stopped = False  # watch()'s cursor, once its thread was stopped: reads nothing
        self.placed_resets, self.attached = resets, False
        if resets is None:
            self.placed_resets = store._resets
            self.attach()

    def reset_to(self, reset: "_Reset") -> None:
        """Moved by a reset_to() that left the log at ``reset.head``: back to the last
        event it delivered that the new log holds too, in the history it delivered it
        in (a reset to an older checkpoint, then to a newer one of that history,
        delivers nothing again). Not past an event it never yielded: after a reset
        within one history, the furthest it got in an erased one says nothing of the
        events at those seqs now."""
        if self.handed is not None:  # in the middle of a batch: the rest was not yielded
            self.position, self.handed = self.handed, None
        elsewhere = reset.rewound_elsewhere(self.generation)
        if elsewhere is not None:
            # Another store reset the file since this cursor last read: this store's
            # history says nothing of the log now. From where that reset left it (at
            # worst a repeat); taken for unbroken, it went on from this reset's head,
            # past the events written between the two, never yielded.
            self.position = self.reached = min(self.position, elsewhere)
            self.reached_in = None
            kept = self.position
        else:
            if self.position >= self.reached:
                self.reached, self.reached_in = self.position, reset.before
            here, there = reset.agreed(reset.before), reset.agreed(self.reached_in)
            if here is None or there is None:  # as before histories were told apart
                kept = self.reached
            else:
                kept = max(min(self.position, here), min(self.reached, there))
        self.position, self.version = min(reset.head, kept), -1
        self.resets += 1
        self.generation = self.store._generation_text  # this reset's, moved for above

    def rewind(self, store: Store) -> None:
        """Inside read()'s snapshot: back to where another store's reset_to() left the
        log, if it rewound it past this cursor's position. That store's followers are
        moved by its reset_to(); the others, in this process or another, waited for
        seqs past their position and never yielded the events the new history wrote
        at the seqs they had passed. The file keeps the heads of its last resets,
        each with the generation it gave (see _stamp_generation)."""
        stored = _stored_generation(store._conn)
        heads = _rewound_since(store._conn, self.generation, stored)
        if heads and min(heads) < self.position:
            self.position, self.behind = min(heads), False
        if heads and self.rewound is not None:
            self.position, self.behind = min(self.position, self.rewound()), False
        self.generation = stored

    def attach(self) -> None:
        """Join the cursors reset_to() moves (it goes through them with the lock held),
        moved as they were by the reset_to()s since the position was read, each in
        turn: the last alone took the position for one of its history, and after two
        (back to a checkpoint, then on to a later one of the new history) skipped the
        events the new history wrote at the seqs it had passed."""
        store = self.store
        with store._lock:
            missed = store._resets - (self.placed_resets or 0)
            if missed:  # (more than the log keeps: the oldest are forgotten)
                for reset in list(store._reset_log)[-missed:]:
                    self.reset_to(reset)
            store._cursors.add(self)
            self.attached = True

    def step(self, wait: float, queue: Optional[Deque[Any]] = None
             ) -> Optional[List[Tuple[Event, List[Change]]]]:
        """New (event, changes) after the position, waiting up to ``wait`` seconds.

        [] when nothing came in time; None when the store was closed. With a
        ``queue``, they are also appended to it, under the store's lock.
        """
        store, delay = self.store, 0.001
        deadline = time.monotonic() + wait
        while True:
            with store._committed:
                commits = store._commit_count
            with store._lock:
                if store._closed or self.stopped:
                    return None
                version = store._conn.execute("PRAGMA data_version").fetchone()[0]
                if (version, commits) != (self.version, self.commits):
                    self.version, self.commits = version, commits
                    batch = self.read(store)
                    if queue is None:  # a follower's: the last batch is all yielded,
                        # none of this one yet (a reset_to() by another thread before
                        # the first took the position past the batch as delivered)
                        self.handed = batch[0][0].seq - 1 if batch else None
                    if batch:
                        if queue is not None:
                            queue.extend(batch)
                        return batch
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            if self.version == -1:  # a page of other types only: read on, not wait
                continue
            with store._committed:  # a commit here wakes us at once
                if store._commit_count == commits and not store._closed:
                    store._committed.wait(min(delay, remaining))
            delay = min(delay * 2, 0.02)

    def read(self, store: Store, before: int = 2**63 - 1) -> List[Tuple[Event, List[Change]]]:
        """The next (event, changes) after the position and before seq ``before``
        (up to 1,000 events), with the store's lock held; the position moves on."""
        self.read_resets = self.resets
        with _reading(store._path), _read_txn(store._conn):
            # The journal holds the changes of the model the file has now: after another
            # process rebuilt it with other code, they are that code's (other tables,
            # columns), which this store's followers, consumers and watch() must not
            # pass off as its own. Refused as dispatch(), at() and history() refuse
            # (SchemaError); the same code's rebuild just reloads the tables.
            store._check_model_current()
            if self.rewinds:
                self.rewind(store)
            # Only the rows of the wanted types, found through the type index: a
            # follower or consumer of a rare type would otherwise read and decode the
            # whole log after its position at each poll (a consumer's stays at its
            # last ack, so it read all of that again each time).
            types_sql, types = store._types_sql(self.wanted)
            rows = store._conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq > ? AND seq < ?{types_sql} "
                f"ORDER BY seq LIMIT 1000", (self.position, before, *types)).fetchall()
            through = rows[-1][0] if rows else self.position
            if self.wanted is not None and len(rows) < 1000:  # read past the others too
                last = store._conn.execute("SELECT max(seq) FROM events WHERE seq < ?",
                                           (before,)).fetchone()[0]
                through = max(through, last or 0)
            batch: List[Tuple[Event, List[Change]]] = []
            for n, row in enumerate(rows):
                try:
                    event = store._upcast_logged(row)
                    if (self.wanted is not None and event.type not in self.wanted
                            and row[2] in self.wanted):  # a name the upcasters renamed
                        raise _renamed_away(row[2], event)
                except FluxliteError:
                    if n == 0:
                        raise
                    # An upcaster refused this event: the events before it are
                    # delivered first, as events() yields them before it raises, and
                    # the error comes at the next read, which starts at this event.
                    # (The whole page was refused: a consumer's earlier events waited.)
                    self.position, self.behind, self.version = rows[n - 1][0], True, -1
                    return batch
                if self.wanted is None or event.type in self.wanted:
                    batch.append((event, store._changes(event.seq)))
        # Moved only once all were read: a refusal above leaves it where it was.
        self.position = through
        self.behind = len(rows) == 1000
        if len(rows) == 1000 or (rows and not batch):  # more to read: look again at once
            self.version = -1
        return batch


# Public, and the return type afollow() names: typed as a bare AsyncIterator, it had
# no aclose() to a type checker, so ``await following.aclose()`` and
# ``contextlib.aclosing(store.afollow())``, as the README writes them, failed
# mypy --strict. Not an AsyncGenerator: it has no asend() or athrow().
class AsyncFollower:
    """What afollow() returns (not made directly): an async iterator of
    ``(event, changes)`` with ``aclose()``, which a cancelled ``__anext__`` leaves
    usable. An async generator ends for good once a CancelledError is thrown into it,
    so asyncio.wait_for(follower.__anext__(), 15) timing out (a server's keep-alive
    between events) ended the stream, and the batch its worker thread was reading
    was lost; here the read goes on and the next ``__anext__`` picks it up."""

    def __init__(self, cursor: _FollowCursor, timeout: Optional[float]) -> None:
        import concurrent.futures
        self._cursor, self._timeout = cursor, timeout
        # A thread of its own: waits in the shared default executor would take its
        # few threads from everything else (adispatch, other followers) and delay all.
        # Dropped with the follower, the executor's thread ends by itself.
        self._waiter: Optional[concurrent.futures.ThreadPoolExecutor] = \
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fluxlite-afollow")
        self._step: "Optional[concurrent.futures.Future[Any]]" = None  # a read under way
        self._batch: Deque[Tuple[Event, List[Change]]] = collections.deque()
        self._heard: Optional[float] = None  # when the last event came (monotonic)
        self._handed = False  # a batch was handed out since: the time counts from its end
        self._busy = False

    def __aiter__(self) -> "AsyncFollower":
        return self

    async def __anext__(self) -> Tuple[Event, List[Change]]:
        if self._busy:  # two tasks would share one read: each would get its events
            raise UsageError("An afollow() is iterated by one task at a time; another task "
                             "is waiting in it. Give each task an afollow() of its own.")
        import asyncio
        self._busy = True
        try:
            return await self._next()
        except asyncio.CancelledError:  # a cancelled wait leaves it usable
            raise
        except BaseException:  # the end, a refusal (SchemaError), Ctrl-C: as a generator
            self._close()
            raise
        finally:
            self._busy = False

    async def _next(self) -> Tuple[Event, List[Change]]:
        cursor = self._cursor
        if self._heard is None:
            self._heard = time.monotonic()
        while True:
            if self._batch:
                if cursor.resets == cursor.read_resets:
                    item = self._batch.popleft()
                    cursor.handed = item[0].seq  # as Store._follow: the rest not yet
                    return item
                self._batch.clear()  # erased by reset_to(): see Store._follow
            if self._handed:  # the loop body is done with the last batch: ``timeout``
                # counts from now, as follow()'s wait does (and this one's did), not from
                # the read (a slow body then ended the stream at its next, empty, read)
                self._heard, self._handed = time.monotonic(), False
            batch = await self._read()
            if batch is None:
                raise StopAsyncIteration
            if batch:
                self._batch.extend(batch)
                self._heard, self._handed = time.monotonic(), True
            elif self._timeout is not None and not cursor.behind \
                    and time.monotonic() - self._heard >= self._timeout:
                raise StopAsyncIteration

    async def _read(self) -> Optional[List[Tuple[Event, List[Change]]]]:
        """The next batch (None: closed), from the read under way if a cancelled
        __anext__ left one: its events are not read twice, nor lost."""
        import asyncio
        if self._waiter is None:
            return None
        if self._step is None or self._step.cancelled():
            self._step = self._waiter.submit(_attach_and_step, self._cursor)
        step = self._step
        if not step.done():
            # Cancelled here, the read goes on in the thread (or, not started yet, is
            # cancelled and submitted again); the next __anext__ takes its result.
            await asyncio.wrap_future(step)
        self._step = None
        if self._waiter is None:  # aclose() (from another task) while it waited: ended,
            return None           # not one more event handed out after it
        result: Optional[List[Tuple[Event, List[Change]]]] = step.result()
        return result

    async def aclose(self) -> None:
        """End it now (as leaving the loop early would, for an async generator)."""
        self._close()

    def _close(self) -> None:
        waiter, self._waiter = self._waiter, None
        self._batch.clear()
        if waiter is not None:
            waiter.shutdown(wait=False)


def _attach_and_step(cursor: _FollowCursor) -> Optional[List[Tuple[Event, List[Change]]]]:
    """afollow()'s read, in its thread: placed without the lock, the cursor joins the
    store's cursors here, off the loop; then a short wait, so that aclose() and the
    end of the loop are not held up."""
    if not cursor.attached:
        cursor.attach()
    return cursor.step(0.05)


def _machine() -> str:
    """Where a pid means this process table: the host name, and on Linux the pid
    namespace (containers on one host name can each have a pid 33 of their own).
    Read once per process: a host name can change while it runs (macOS renames
    hosts as networks change), and the process's own leases must stay its own."""
    known = _MACHINE.get(os.getpid())
    if known is None:
        known = _MACHINE[os.getpid()] = _read_machine()
    return known


_MACHINE: Dict[int, str] = {}  # by pid: a fork's child may be in another pid namespace
if hasattr(os, "register_at_fork"):  # where its pid may even equal its parent's
    os.register_at_fork(after_in_child=_MACHINE.clear)


def _read_machine() -> str:
    try:
        namespace = f"~{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        namespace = ""
    return f"{socket.gethostname().replace('/', '_')}{namespace}"


def _rebuilt_by_other_code(message: str) -> SchemaError:
    """The SchemaError of a store whose file another process rebuilt with other code:
    it can read the log but not the model until reopened. A consumer that meets it
    gives its name up (Consumer._give_up) for the new code's process to take at once."""
    error = SchemaError(message)
    error._rebuilt_by_other_code = True  # type: ignore[attr-defined]
    return error


def _is_rebuilt_by_other_code(error: BaseException) -> bool:
    return getattr(error, "_rebuilt_by_other_code", False) is True


# Frees a consumer's name, only if this holder still has it (not one that took over).
_RELEASE_LEASE = ("UPDATE fluxlite_consumers SET owner = NULL, lease_until = 0 "
                  "WHERE name = ? AND owner = ?")


def _lease_owner() -> str:
    return f"{_machine()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


# This process's Consumers by lease owner: a lease of this process whose Consumer
# was dropped without close() is free at once (nothing can use it any more).
_LIVE_CONSUMERS: "weakref.WeakValueDictionary[str, Consumer]" = weakref.WeakValueDictionary()


def _lease_is_free(owner: Optional[str]) -> bool:
    """True if the holder's process is gone, or it is this one and its Consumer is."""
    if owner is not None and owner.startswith(f"{_machine()}/{os.getpid()}/"):
        return owner not in _LIVE_CONSUMERS
    return _holder_is_dead(owner)


def _consumer_busy(name: str, owner: Any, until: float) -> "Busy":
    # The holder's id names a pid; when it is this process's own, "retry later"
    # would wait for ever: it is a Consumer of this program left open.
    if str(owner).startswith(f"{_machine()}/{os.getpid()}/"):
        return Busy(f"Consumer {_quoted(name)} is held by another Consumer of this process, "
                    f"still open; one Consumer at a time may consume a name. close() that "
                    f"one (or leave its with block) before opening the name again.")
    return Busy(f"Consumer {_quoted(name)} is held by {owner} until its lease ends in "
                f"{until - time.time():.1f} s; one process at a time may consume a name. "
                f"Retry later, or use another name.")


_POSIX = os.name == "posix"


def _holder_is_dead(owner: Optional[str]) -> bool:
    """True if the owner ran on this machine and its process is gone. Only POSIX
    can ask: on Windows, os.kill(pid, 0) does not probe, it terminates the process."""
    if not owner:
        return True
    host, _, rest = owner.partition("/")
    if host != _machine() or not _POSIX:
        return False
    try:
        pid = int(rest.partition("/")[0])
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError):
        return False
    try:  # a zombie answers kill(0) until its parent reaps it: dead all the same
        with builtins.open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def _advance_consumer(conn: sqlite3.Connection, name: str, owner: str, seq: int,
                      lease: float = 30.0, generation: Optional[str] = None) -> None:
    """Move a consumer's position to seq (renewing its lease), in the caller's transaction.
    A ``lease`` of 0 (a consumer that gave its name up) leaves the lease run out.
    ``generation``: the file's when the consumer last read its position (see
    Consumer._take_position); not past the head of a reset_to() since."""
    # (The file's generation in the same read: an ack is a hot path.)
    row = conn.execute("SELECT position, owner, (SELECT value FROM fluxlite_meta WHERE key = "
                       "'generation') FROM fluxlite_consumers WHERE name = ?", (name,)).fetchone()
    if row is None or row[1] != owner:
        raise Conflict(
            f"Consumer {_quoted(name)} lost its lease (now held by {row[1]!r}); nothing was "
            f"acknowledged. Another worker took over; reopen the consumer." if row and row[1]
            else f"Consumer {_quoted(name)} lost its lease (no one holds it now: it was given "
            f"up, or erased by a reset_to() of a checkpoint taken before the consumer was "
            f"opened); nothing was acknowledged. Reopen the consumer."
        )
    heads = _rewound_since(conn, generation, _dumps(0) if row[2] is None else str(row[2]))
    if heads:  # seq is of the history that reset erased: the new one's events there
        seq = min(seq, min(heads))  # were never yielded (acked, no one would get them)
    # Never past the head: an event yielded before a reset_to() (by any store on the
    # file) that rewound the log past it would otherwise be acked as a position that
    # the log's next events reach, and the name would skip them, reopened or not.
    conn.execute("UPDATE fluxlite_consumers SET position = min(?, (SELECT coalesce(max(seq), "
                 "0) FROM events)), lease_until = ? WHERE name = ?",
                 (max(seq, row[0]), time.time() + lease if lease else 0.0, name))


class Consumer:
    """A durable consumer of the log, from store.consumer(name).

    Iterating yields ``(event, changes)`` after the acknowledged position, up
    to the head (``follow()`` keeps waiting for more). Nothing advances until
    ``ack(event)`` — or until a ``with`` block is left normally, which acks
    every event yielded in it. Killed before an ack, a consumer gets the
    unacknowledged events again: at-least-once. ``dispatch(..., ack=event)``
    acknowledges in the dispatch's own transaction: exactly-once for work
    that is itself an event in this store.
    """

    def __init__(self, store: Store, name: str, lease: float,
                 types: Optional[FrozenSet[str]] = None) -> None:
        if not isinstance(name, str) or not name:
            raise UsageError(f"A consumer name is a non-empty str; received {_describe(name)}.")
        _check_text(name, "A consumer name", UsageError)
        if isinstance(lease, bool) or not isinstance(lease, (int, float)) \
                or not 0 < lease < math.inf:
            raise UsageError(f"A consumer's lease is a number of seconds above 0; received "
                             f"{_describe(lease)}.")
        self.store, self.name, self._lease = store, name, float(lease)
        self._types = types
        self._owner = _lease_owner()
        self._yielded = 0
        self._finished = 0  # the last event a loop body saw through
        self._closed = False
        self._gave_up: Optional[str] = None  # why it can deliver no more (_give_up)
        # follow()'s cursors, which close() stops: a follow() waiting in another thread
        # (a worker, asyncio's executor) ends at once, not at its next renewal (10 s).
        self._following: "weakref.WeakSet[_FollowCursor]" = weakref.WeakSet()
        _LIVE_CONSUMERS[self._owner] = self  # first: while it lives, its lease is not free
        self._resets = store._resets
        # The file's generation when the position was read, and how often it was read
        # again after a reset since (see _take_position): the loop's filter goes back.
        self._generation: Optional[str] = None
        self._retakes = 0
        self.position = self._acquire()
        self._renewed = time.monotonic()

    def _acquire(self) -> int:
        store = self.store
        with store._lock:
            store._check_open()
            try:
                with _write_txn(store._conn):
                    row = store._conn.execute(
                        "SELECT position, owner, lease_until FROM fluxlite_consumers "
                        "WHERE name = ?", (self.name,)).fetchone()
                    position, owner, until = row if row else (0, None, 0.0)
                    generation = _stored_generation(store._conn)
                    # Old code after another process rebuilt the file would hold the
                    # name only to fail at its first read, keeping the new code out.
                    store._check_model_current()
                    if owner not in (None, self._owner) and until > time.time() \
                            and not _lease_is_free(owner):
                        raise _consumer_busy(self.name, owner, until)
                    store._conn.execute(
                        "INSERT OR REPLACE INTO fluxlite_consumers VALUES (?, ?, ?, ?)",
                        (self.name, position, self._owner, time.time() + self._lease))
                    dropped = [(name, owner) for owner, name in list(store._leases.items())
                               if owner not in _LIVE_CONSUMERS]
                    store._conn.executemany(_RELEASE_LEASE, dropped)  # nothing uses them
                    store._check_file()
            except sqlite3.OperationalError as exc:
                raise _storage_error(exc, store._path) from exc
            for _, owner in dropped:
                store._leases.pop(owner, None)
            # Before the lock is let go: a close() by another thread right after it
            # released the leases it knew of and left this one held in the file (the
            # name Busy to every other Consumer while this one lived, closed or not).
            store._leases[self._owner] = self.name
            self._generation = generation
        return position

    def __iter__(self) -> Iterator[Tuple[Event, List[Change]]]:
        self._check_not_closed("iterating")
        self._after_reset()  # (a reset_to() may have put back a file of this code)
        self._check_not_given_up()
        return self._deliver(self.store._follow(self._placed_cursor(), 0))

    def follow(self, timeout: Optional[float] = None
               ) -> Generator[Tuple[Event, List[Change]], None, None]:
        """Like iterating, then waiting for new events (see Store.follow); the
        lease is renewed while it waits, so an idle consumer keeps its name."""
        _check_timeout(timeout)
        self._check_not_closed("follow()")
        self._after_reset()  # (a reset_to() may have put back a file of this code)
        self._check_not_given_up()
        return self._deliver(self._wait_renewing(timeout))

    def _placed_cursor(self) -> "_FollowCursor":
        """A cursor at _start(), placed with the lock held from reading the position to
        joining the cursors reset_to() moves: a reset_to() by another thread in between
        left it at the erased history's position, past the events the new history wrote
        at those seqs, which were skipped (and acked unseen by the next ack)."""
        with self.store._lock:
            cursor = _FollowCursor(self.store, self._start(), self._types, rewinds=True,
                                   generation=self._generation)
            cursor.rewound = self._take_position
            return cursor

    def _start(self) -> int:
        """Where an iteration reads from: after the last ack, or after the last event a
        loop body saw through (_deliver skips those), whichever is later. Not from the
        ack alone: a worker that polls without acking each event read all those again
        at every poll (1 s a poll, 20,000 events past its ack), only to skip them."""
        self._after_reset()
        return max(self.position, self._finished)

    def _after_reset(self) -> None:
        """After the store's reset_to(): the position the checkpoint holds. The one in
        memory was of the history the reset erased: past it, the events dispatched
        since the reset (the same seqs again) were skipped, and acked unseen. (A lease
        the checkpoint does not hold is lost: the next ack says so, with Conflict.)
        Another store's reset_to() (in any process) is taken in by the cursor's reads."""
        store = self.store
        with store._lock:
            if store._resets == self._resets or store._closed:
                return
            self._resets = store._resets
            # The checkpoint holds this store's code (reset_to() checks it): a name given
            # up to another code's rebuild since is usable again, as the file says.
            self._gave_up = None
            with _read_txn(store._conn):
                self._take_position()

    def _take_position(self) -> int:
        """In a read snapshot, with the store's lock: the position the file has after a
        reset_to() (a cursor's read calls it for another store's, see rewind()). The
        file's, not the cursor's, rules: the checkpoint may be of another history."""
        conn = self.store._conn
        self._generation = _stored_generation(conn)
        row = conn.execute("SELECT position FROM fluxlite_consumers WHERE name = ?",
                           (self.name,)).fetchone()
        self.position = self._finished = self._yielded = row[0] if row else 0
        self._retakes += 1
        return self.position

    def _wait_renewing(self, timeout: Optional[float]) -> "_Following":
        cursor = self._placed_cursor()
        with self.store._lock:  # as close() reads them: it stops this one, or it sees closed
            self._following.add(cursor)
            cursor.stopped = self._closed  # (closed before the first next())
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = self._lease / 3
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            batch = cursor.step(wait)
            if batch is None:
                return
            if batch:
                for item in batch:
                    # reset_to() since the batch was read (in the loop body, or another
                    # thread): the rest is of the history it erased (see Store._follow).
                    if cursor.resets != cursor.read_resets:
                        break
                    cursor.handed = item[0].seq  # (see Store._follow)
                    yield item
                cursor.handed = None
                if timeout is not None:  # seconds without new events
                    deadline = time.monotonic() + timeout
            elif deadline is not None and time.monotonic() >= deadline \
                    and not cursor.behind:  # (not while reading past other types)
                return
            elif time.monotonic() - self._renewed > self._lease / 3:
                if not self._renew():
                    return

    def _renew(self) -> bool:
        """Renew the lease (an ack of the position; Conflict if it was lost). False
        if the store was closed since the last read: following ends then, quietly,
        as Store.follow() does, instead of a UsageError from a renewal that lost the race.
        Busy (another writer held the lock past busy_timeout) while the lease still
        runs is no reason to stop: the name is still ours, the next poll retries."""
        with self.store._lock:
            if self.store._closed or self._closed:  # (closed by another thread, say)
                return False
            try:
                self.ack(self.position)
            except Busy:
                if time.monotonic() - self._renewed >= self._lease:  # it may be lost
                    raise
        return True

    def _deliver(self, source: Iterator[Tuple[Event, List[Change]]]) -> "_Following":
        # Each iteration starts after the last ack, or after the last event whose loop
        # body an earlier iteration saw through (it asked for the next one, or ran to the
        # end): only an event whose body raised or broke out comes again, not every
        # event yielded since the last ack (a worker polling in a with block).
        # With the resets it was read after: a reset_to() by another thread before the
        # cursor is placed is taken in by the cursor's _start(), not seen below.
        last, seen, retakes = self._start(), self._resets, self._retakes
        # A read that finds nothing new renews too: a worker polling a quiet log
        # (`for event, changes in consumer:` in a loop) would otherwise lose its name
        # to another process while it polls, and hit Conflict at its next event.
        if time.monotonic() - self._renewed > self._lease / 3 and not self._renew():
            return  # the store was closed
        try:
            for event, changes in source:
                # reset_to() in the loop (this store's, or another's that the cursor read
                # took in): the seqs after its position are new events
                if seen != self.store._resets or retakes != self._retakes:
                    last, seen, retakes = self._start(), self._resets, self._retakes
                if event.seq <= last:
                    continue
                if self._closed:  # closed meanwhile (by the loop body, another thread): its
                    return  # name is given up, and another worker may be given these events
                if time.monotonic() - self._renewed > self._lease / 3 and not self._renew():
                    return  # the store was closed
                last = event.seq
                self._yielded = max(self._yielded, event.seq)
                yield event, changes
                self._finished = max(self._finished, event.seq)  # the body went on: done
        except SchemaError as exc:
            if _is_rebuilt_by_other_code(exc):
                self._give_up(exc)
            raise

    def ack(self, event: Union[Event, int]) -> None:
        """Acknowledge everything up to this event (or seq): it will not come again."""
        seq = self._ackable(event, "ack()")
        store = self.store
        store._check_not_verifying("ack a consumer's events", "Ack them")
        with store._lock:
            store._check_open()
            outermost = not store._conn.in_transaction
            try:
                with _write_txn(store._conn):
                    _advance_consumer(store._conn, self.name, self._owner, seq,
                                      0.0 if self._gave_up else self._lease, self._generation)
                    store._check_file()  # an ack into a replaced file would be lost
                if seq > self.position:  # (no call: a Ctrl-C comes before or after it)
                    self.position = seq
            except sqlite3.OperationalError as exc:
                raise _storage_error(exc, store._path) from exc
            except (sqlite3.Error, FluxliteError):
                raise
            except BaseException:  # Ctrl-C: as for a dispatch (see _interrupted_write)
                if outermost and store._conn.in_transaction:
                    store._conn.execute("ROLLBACK")
                self._catch_up()
                raise
        self._renewed = time.monotonic()

    # The keywords are Store.dispatch()'s, spelled out (not **kwargs) so that a type
    # checker finds a misspelt one, as it does for store.dispatch().
    def dispatch(self, type: Union[str, Mapping[str, Any]], payload: Any = None, *,
                 ack: Union[Event, int], meta: Optional[Mapping[str, Any]] = None,
                 id: Optional[str] = None, actor: Optional[str] = None,
                 expect_seq: Optional[int] = None) -> Optional[Event]:
        """Dispatch an event and acknowledge ``ack`` in the same transaction (exactly-once).

        The other arguments are those of Store.dispatch(). The ack commits with the
        event: if it is refused, or a middleware ends the chain without calling next
        (None is returned), nothing is acknowledged."""
        seq = self._ackable(ack, "dispatch(ack=...)")
        store = self.store
        action = _action_from(type, payload, meta, id, actor)
        store._check_dispatchable()
        _check_expect_seq(expect_seq)
        frames = store._frame_stack()
        lease = 0.0 if self._gave_up else self._lease
        frame = _Frame(expect_seq, ack=(self.name, self._owner, seq, lease, self._generation))
        frames.append(frame)
        try:
            result: Optional[Event] = store._chain(action)
        except FluxliteError as exc:
            if _is_rebuilt_by_other_code(exc):  # (nothing committed: the ack neither)
                self._give_up(exc)
            raise
        except BaseException:  # Ctrl-C, maybe right after the COMMIT of event and ack
            if not frame.acked:
                self._catch_up()
            raise
        finally:
            # Also when a middleware raised after next() committed: the ack is in the
            # file, so the event must not come again (it would be answered twice). First,
            # and with no call (a signal is raised after one): nothing can come before it.
            if frame.acked and seq > self.position:
                self.position = seq
            frames.pop()
            store._notify()  # also when a middleware raised after next() committed
        return result

    def _catch_up(self) -> None:
        """After an interrupt: the position as the file has it. An ack that committed
        just as the interrupt came (Ctrl-C during COMMIT is raised as it returns) must
        not let its events come again: dispatch(ack=) promises exactly once."""
        store = self.store
        with store._lock:
            if store._closed or store._conn.in_transaction:  # (a preview's: not committed)
                return
            row = store._conn.execute("SELECT position, owner FROM fluxlite_consumers "
                                      "WHERE name = ?", (self.name,)).fetchone()
        if row is not None and row[1] == self._owner:
            self.position = max(self.position, row[0])

    def _give_up(self, exc: FluxliteError) -> None:
        """The file's model is another code's now: this consumer can deliver nothing
        more until its process reopens the store with that code. Its lease is made to
        run out at once, so that the new code's process may take the name without
        waiting for it (or being kept out forever by the renewals of a worker that
        retries). The owner is kept until then: an ack of events it already yielded
        (their work done) still lands if no one took the name meanwhile, and is a
        Conflict, acking nothing, if one did (who is then given them again)."""
        self._gave_up = str(exc)
        store = self.store
        with store._lock:
            if store._closed or self._closed:
                return
            try:
                with _write_txn(store._conn):
                    store._conn.execute(
                        "UPDATE fluxlite_consumers SET lease_until = 0 "
                        "WHERE name = ? AND owner = ?", (self.name, self._owner))
            except sqlite3.Error as why:  # (the lease runs out by itself: the error stands)
                _log.debug("consumer %r: lease left to run out: %s", self.name, why)

    def _check_not_given_up(self) -> None:
        if self._gave_up is not None:
            raise _rebuilt_by_other_code(
                f"{self._gave_up} Consumer {_quoted(self.name)} gave its name up for "
                f"that code's process to take; reopen the store with the new code and "
                f"take the consumer there.")

    def _check_not_closed(self, what: str) -> None:
        if self._closed:  # its name is given up: an ack now would find another owner
            raise UsageError(
                f"{what} on consumer {_quoted(self.name)} after its close(), which gave up its "
                f"name; take it again with store.consumer({_quoted(self.name)})."
            )

    def _ackable(self, event: Union[Event, int], what: str) -> int:
        self._check_not_closed(what)
        seq = event.seq if isinstance(event, Event) else event
        if isinstance(seq, bool) or not isinstance(seq, int) or not \
                0 <= seq <= max(self._yielded, self.position):
            raise UsageError(
                f"{what} takes an event this consumer yielded (up to seq "
                f"{max(self._yielded, self.position)}); received {_describe(event)}."
            )
        return seq

    def close(self) -> None:
        """Give up the lease so another process may take this consumer at once
        (closing the store does so too)."""
        store = self.store
        with store._lock:
            if store._closed:
                return
            try:
                with _write_txn(store._conn):
                    store._conn.execute(_RELEASE_LEASE, (self.name, self._owner))
            except sqlite3.OperationalError as exc:
                raise _storage_error(exc, store._path) from exc
            store._leases.pop(self._owner, None)
            self._closed = True
            for cursor in self._following:  # read under the lock at each poll
                cursor.stopped = True
        # Closed, it holds the name no more in this process either: a lease row of
        # its that comes back (reset_to() a checkpoint taken while it was open) is free.
        _LIVE_CONSUMERS.pop(self._owner, None)

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        try:
            if kind is None and self._yielded > self.position and not self._closed:
                if self.store._closed:  # follow() ended because the store was closed: the
                    _log.info("consumer %r: the store was closed; events after %s come "
                              "again", self.name, self.position)  # unacked come again
                else:
                    self.ack(self._yielded)
        finally:
            self.close()


###############################################################################
# 10. Replay and the past
###############################################################################


def _scratch_model(schema: str, path: str, journal: bool, uri: bool = False,
                   replay: bool = True, new_schema: bool = False) -> _Model:
    """A private database with the schema (and a journal table), for replays.

    A replay checks foreign keys as the live store does, so that an event the
    new code cannot apply is named; unless the schema references a table it
    does not create (one the user keeps beside the read model: the scratch
    has no copy to check against). A copy (at()) fills tables in any order.
    """
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, uri=uri)
    try:
        conn.execute("PRAGMA journal_mode=off")
        conn.execute("PRAGMA synchronous=off")
        with _write_txn(conn):
            names = _create_schema(conn, schema, new_schema)
            if journal:
                conn.execute(next(d for d in _LOG_DDL if "TABLE fluxlite_journal" in d))
        outside = _outside_references(conn, names)
        conn.execute(f"PRAGMA foreign_keys={'on' if replay and not outside else 'off'}")
    except BaseException:
        conn.close()
        raise
    return _Model(conn, _table_infos(conn, names), threading.RLock())


def _outside_references(conn: sqlite3.Connection, names: Sequence[str]) -> List[str]:
    """Tables the schema's tables reference but the schema does not create: the
    user's own tables beside the read model, which a copy of the model lacks."""
    known = {n.lower() for n in names}
    return [fk[2] for n in names for fk in conn.execute(f"PRAGMA foreign_key_list({_quote(n)})")
            if fk[2].lower() not in known]


def _apply_events(model: _Model, reducer: Reducer, events: Iterable[Event],
                  journal: bool, progress: Optional[Callable[[int], None]] = None) -> int:
    """Reduce and apply events in one transaction; return the last seq applied."""
    view = View(model)
    rows: List[Tuple[Any, ...]] = []  # the journal's, written in chunks
    insert = "INSERT INTO fluxlite_journal VALUES (?, ?, ?, ?, ?, ?, ?)"
    try:
        with _write_txn(model.conn):
            last = _apply_each(model, reducer, events, journal, progress, view, rows, insert)
    except sqlite3.IntegrityError as exc:  # a deferred constraint, checked at the end
        raise ChangesetError(
            f"The replayed events break a deferred constraint ({exc}), checked once all "
            f"were applied. Make the reducers return changes that keep it."
        ) from exc
    return last


def _apply_each(model: _Model, reducer: Reducer, events: Iterable[Event], journal: bool,
                progress: Optional[Callable[[int], None]], view: "View",
                rows: List[Tuple[Any, ...]], insert: str) -> int:
    """_apply_events' loop, inside its transaction."""
    last, baselines = 0, False
    for event in events:
        if event.type == BASELINE and not baselines:
            # An adoption's baselines hold whole tables, one event each, in no
            # particular order: their references are checked once all are in.
            baselines = True
            model.conn.execute("PRAGMA defer_foreign_keys = ON")
        elif baselines and event.type != BASELINE:
            baselines = False
            _end_baselines(model.conn)
        try:
            changes = _reduce(reducer, view, event)
            if journal:
                model.apply(changes, event.seq, rows, report=False)
            else:
                model.apply_quietly(changes)
        except FluxliteError as exc:
            if "while replaying" in str(exc):
                raise
            # The built-in events hold rows in the shape of their day, and no reducer of
            # the user's made them: the fix is an upcaster, not the reducer.
            held = {RESTORE: ("the row as it was when restored", "that row"),
                    BASELINE: ("the adopted rows as they were", "its rows")}.get(event.type)
            hint = (f" A {event.type!r} event carries {held[0]}: after adding or changing "
                    f"columns, give open() an upcaster for {event.type!r} that maps "
                    f"{held[1]} to the new shape."
                    if held and "upcaster" not in str(exc) else "")
            if isinstance(exc, (Rejected, Forbidden)) and not held:
                # Typically a rule added to the reducer since: it refuses old events too.
                hint = (" The log holds this event because it was accepted when it was "
                        "dispatched: the reducer (with its upcasters) must accept every "
                        "logged event on replay too. A rule meant only for new events "
                        "belongs in a middleware (replays do not run middleware), or can "
                        "compare event.ts with the day the rule began.")
            raise type(exc)(f"{exc} (while replaying event {event.seq}, "
                            f"{_quoted(event.type)}, id {_quoted(event.id)}).{hint}") from exc
        last = event.seq
        if progress is not None and not last % 1000:
            progress(last)
        if len(rows) >= 4096:
            model.conn.executemany(insert, rows)
            rows.clear()
    if rows:
        model.conn.executemany(insert, rows)
    return last


def _deferred_fk_violations(conn: sqlite3.Connection) -> Optional["collections.Counter[Tuple[Any, ...]]"]:
    """The rows breaking a foreign key now, for a preview's check of references
    SQLite defers to a COMMIT that a preview never makes; None (and no scan) when
    no table declares a deferred reference, or foreign keys are off."""
    # Only the tables that declare one (DEFERRABLE INITIALLY DEFERRED, not after
    # NOT): the word in a name or a literal ('deferred' in a CHECK) is no reference,
    # and a scan of every table with references costs a preview O(rows).
    tables = [name for name, sql in conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE "
        "'fluxlite%' AND sql LIKE '%DEFERRED%'") if _declares_deferred(sql)]
    if not tables or not conn.execute("PRAGMA foreign_keys").fetchone()[0]:
        return None
    found: "collections.Counter[Tuple[Any, ...]]" = collections.Counter()
    for name in tables:
        found.update(map(tuple, conn.execute(f"PRAGMA foreign_key_check({_quote(name)})")))
    return found


def _declares_deferred(sql: str) -> bool:
    """A CREATE TABLE with a reference deferred to COMMIT (in its code, not a literal)."""
    words = [t.upper() for t in _sql_code(sql, literals=False) if not t.isspace()]
    return any(words[i:i + 3] == ["DEFERRABLE", "INITIALLY", "DEFERRED"]
               and (i == 0 or words[i - 1] != "NOT") for i in range(len(words)))


def _end_baselines(conn: sqlite3.Connection) -> None:
    """After an adoption's baselines, applied with foreign keys deferred: check them
    now, and check each later event's references as it is applied."""
    checked = conn.execute("PRAGMA foreign_keys").fetchone()[0]  # off: outside references
    broken = conn.execute("PRAGMA foreign_key_check").fetchone() if checked else None
    if broken is not None:
        raise ChangesetError(
            f"The adopted baseline rows break a foreign key: row {broken[1]} of "
            f"{broken[0]!r} references {broken[2]!r} where no row has that key."
        )
    conn.execute("PRAGMA defer_foreign_keys = OFF")


def _as_of(store: Store, seq: int) -> View:
    """The model right after ``seq``: the live tables with later changes undone.

    The first change to each row after ``seq`` holds the row as it was then,
    so one pass over the journal's tail says what to undo; the undo itself is
    set-based SQL (json_extract), with a row-by-row fallback for SQLite
    builds without JSON functions.
    """
    # A private temporary file ("", as verify() uses), not ":memory:": the copy
    # holds every live row, and freed memory stays with the process (glibc keeps
    # it), so RSS would step up with the size of the model at each at().
    model = _scratch_model(store._schema, "", journal=False, uri=True, replay=False)
    try:
        conn = model.conn
        # The live file attached read-only: rows go across inside SQLite, not
        # through Python. Its snapshot may be newer than the store's: undoing
        # from a later head still ends at seq. A store with a transaction of its
        # own open (a preview) or no file is copied through Python instead.
        live = "fluxlite_live" if _attach_live(conn, store) else None
        try:
            conn.execute("BEGIN")  # not IMMEDIATE: that would lock the attached file too
            if live:  # its snapshot starts here: the model the store checked, or a rebuilt one?
                row = conn.execute(f"SELECT value FROM {live}.fluxlite_meta "
                                   f"WHERE key = 'generation'").fetchone()
                if row is not None and row[0] != store._generation_text:
                    conn.execute("ROLLBACK")  # rebuilt since: copy from the store's snapshot
                    conn.execute(f"DETACH {live}")
                    live = None
                    conn.execute("BEGIN")
            first_changes = _first_changes_sql(
                f"{live}.fluxlite_journal" if live else "fluxlite_journal",
                tail=store.head - seq, head=store.head)
            conn.execute("CREATE TEMP TABLE fluxlite_undo (tbl TEXT, key TEXT, before TEXT)")
            for info in model.tables.values():
                columns = ", ".join(_quote(c) for c in info.writable_columns)
                if live:
                    conn.execute(f"INSERT INTO main.{info.q} ({columns}) "
                                 f"SELECT {columns} FROM {live}.{info.q}")
                else:
                    conn.executemany(info.insert_sql(info.writable_columns),
                                     store._conn.execute(f"SELECT {columns} FROM {info.q}"))
            if live:
                conn.execute(f"INSERT INTO fluxlite_undo {first_changes}", {"seq": seq})
            else:
                conn.executemany("INSERT INTO fluxlite_undo VALUES (?, ?, ?)",
                                 store._conn.execute(first_changes, {"seq": seq}))
            # Each table's undo picks its rows by tbl: without an index, every table
            # scanned all the changed rows of all tables (500 tables and a tail of
            # 100,000 changes: 17 s, a slower at(0) than a whole replay).
            conn.execute("CREATE INDEX temp.fluxlite_undo_tbl ON fluxlite_undo (tbl)")
            try:
                _undo(conn, model)
            except sqlite3.OperationalError as exc:  # (not the copy's: that went in SQL)
                if not live or str(exc) != "too many SQL variables":
                    raise
                raise _too_wide_to_undo(conn, model) from exc
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if live:
            conn.execute(f"DETACH {live}")
    except BaseException:
        model.conn.close()
        raise
    return View(model, seq=seq, owned=True)


def _too_wide_to_copy(store: Store) -> UsageError:
    """at() of a table with more columns than SQLite binds, copied through Python."""
    limit = _variable_limit(store._conn)
    wide = [n for n, i in store._model.tables.items() if len(i.writable_columns) > limit]
    return UsageError(
        f"at() copies the rows of {', '.join(map(_quoted, wide)) or 'a table'} through "
        f"Python here, one statement per row, and a row has more columns than this SQLite "
        f"({sqlite3.sqlite_version}) binds in one statement ({limit}; 999 before SQLite "
        f"3.32). Open the store from a file (not ':memory:', and outside a preview): its "
        f"at() copies rows inside SQLite. Or split the table into narrower ones."
    )


def _too_wide_to_undo(conn: sqlite3.Connection, model: _Model) -> UsageError:
    """at() of a wide table whose earlier rows went back one statement per row."""
    limit = _variable_limit(conn)
    wide = [n for n, i in model.tables.items() if len(i.writable_columns) > limit]
    if not _sqlite_has_json():  # the functions that put rows back inside SQLite
        why = (f"this SQLite ({sqlite3.sqlite_version}) was built without the JSON "
               f"functions that do it inside SQLite")
        fix = "Run on a SQLite that has them (built in since SQLite 3.38), or split"
    else:
        why, fix = ("a JSON path cannot name a column with a '\"' or a control character "
                    "in its name, nor carry a value with a NUL", "Rename such columns, or split")
    return UsageError(
        f"at() puts back the earlier rows of {', '.join(map(_quoted, wide)) or 'a table'} "
        f"one statement per row here ({why}), and a row has more columns than this SQLite "
        f"binds in one statement ({limit}; 999 before SQLite 3.32). {fix} the table into "
        f"narrower ones."
    )


def _attach_live(conn: sqlite3.Connection, store: Store) -> bool:
    """Attach the store's file to ``conn`` read-only, as fluxlite_live, if it can be."""
    if store._path in (":memory:", "") or store._previewing:
        return False
    path = store._file
    if not store._file_is_its_own():
        _log.debug("at(): %r is not the file this store opened; copying through Python", path)
        return False
    uri = _file_uri(path, "ro")
    try:
        conn.execute("ATTACH ? AS fluxlite_live", (uri,))
    except sqlite3.Error as exc:  # e.g. read-only media without the -shm file
        _log.debug("at(): %r not attached (%s); copying through Python", store._path, exc)
        return False
    return True


def _first_changes_sql(journal: str, tail: int, head: int) -> str:
    """(tbl, key, before) of the first change to each row after seq :seq (a
    named parameter: Python 3.14 refuses ?1 with a sequence of parameters).

    Grouping the tail sorts every journal row after it, before-images and
    all; for a long tail it is cheaper to list the changed rows from the
    (tbl, key, seq) index and look up each one's first change there.
    """
    if tail * 10 < head:
        # "+tbl, +key": group without the (tbl, key, seq) index, so SQLite
        # searches the primary key for seq > ? instead of scanning it all.
        return (f"SELECT tbl, key, before FROM (SELECT tbl, key, before, "
                f"min(seq * 4294967296 + n) FROM {journal} WHERE seq > :seq GROUP BY +tbl, +key)")
    return (f"SELECT d.tbl, d.key, (SELECT j.before FROM {journal} j WHERE j.tbl = d.tbl "
            f"AND j.key = d.key AND j.seq > :seq ORDER BY j.seq, j.n LIMIT 1) "
            f"FROM (SELECT DISTINCT tbl, key FROM {journal} WHERE seq > :seq) d")


def _undo(conn: sqlite3.Connection, model: _Model) -> None:
    """Put back each row of fluxlite_undo as it was before its first later change."""
    # A JSON path cannot name every column (a '"' in it): those tables go
    # row by row, as all do on a SQLite without JSON functions.
    simple = [n for n, i in model.tables.items()
              if all(json.dumps(c, ensure_ascii=False) == f'"{c}"' and c.isprintable()
                     for c in i.columns)]
    if conn.execute("SELECT 1 FROM fluxlite_undo WHERE instr(key, '\\u0000') "
                    "OR instr(before, '\\u0000') LIMIT 1").fetchone():
        simple = []  # a NUL in the text: json_extract would cut it off
    try:
        _undo_in_sql(conn, model, simple)
    except sqlite3.OperationalError:
        simple = []
    _undo_in_python(conn, model, [n for n in model.tables if n not in simple])


def _undo_in_sql(conn: sqlite3.Connection, model: _Model, names: List[str]) -> None:
    for name in names:
        info = model.tables[name]
        paths = ["'$'"] if len(info.pk) == 1 else [f"'$[{i}]'" for i in range(len(info.pk))]
        key = ", ".join(f"json_extract(u.key, {p})" for p in paths)
        pk = ", ".join(_quote(c) for c in info.pk)
        conn.execute(f"DELETE FROM {info.q} WHERE ({pk}) IN "
                     f"(SELECT {key} FROM fluxlite_undo u WHERE u.tbl = ?)", (name,))
        cols = info.writable_columns
        # The paths are written into the SQL, not bound: one bound value per column
        # failed on a table wider than SQLite binds (999 values before SQLite 3.32).
        json_paths = (_sql_text('$."' + c + '"') for c in cols)  # 'simple' names: no '"' in c
        values = ", ".join(f"json_extract(u.before, {path})" for path in json_paths)
        conn.execute(f"INSERT INTO {info.q} ({', '.join(_quote(c) for c in cols)}) "
                     f"SELECT {values} FROM fluxlite_undo u "
                     f"WHERE u.tbl = ? AND u.before IS NOT NULL", (name,))


def _undo_in_python(conn: sqlite3.Connection, model: _Model, names: List[str]) -> None:
    rows = conn.execute("SELECT * FROM fluxlite_undo").fetchall() if names else []
    rows = [r for r in rows if r[0] in names]
    # Every changed row out first, then the old versions in: one at a time, an old
    # version could meet a UNIQUE value that another row held later.
    for table, key, _ in rows:
        key_value = json.loads(key)
        conn.execute(model.tables[table].delete_key,
                     tuple(key_value) if isinstance(key_value, list) else (key_value,))
    for table, _, before in rows:
        if before is not None:
            info = model.tables[table]
            row = {c: v for c, v in json.loads(before).items() if c in info.writable}
            conn.execute(info.insert_sql(tuple(row)), tuple(row.values()))


def _rebuild(store: Store, schema: str, version: Any,
             progress: Optional[Callable[[int], None]] = None) -> None:
    """Replay the log into a separate file, then swap tables and journal in one transaction."""
    version = _json_version(version)  # as stored (the CLI passes an App's version as given)
    try:
        _rebuild_unmapped(store, schema, version, progress)
    except sqlite3.OperationalError as exc:
        if _is_storage_problem(exc):
            raise _storage_error(exc, store._path) from exc
        raise
    _truncate_wal(store)


def _truncate_wal(store: Store) -> None:
    """Give back the WAL a rebuild's swap grew (it holds the whole new model and
    journal)."""
    if store._path == ":memory:":
        return
    with store._lock:
        if not store._closed:  # by another thread, right after the rebuild
            _empty_wal(store._conn, store._path)


def _rebuild_unmapped(store: Store, schema: str, version: Any,
                      progress: Optional[Callable[[int], None]]) -> None:
    """The bulk of the log is replayed through a second connection, without the
    store's lock, where the file can be opened again (see _reader_beside): the
    store's other threads dispatch and read meanwhile (held for the whole replay,
    it stopped them for seconds). Else, or if this store's reset_to() or a rebuild
    (by any store) changed the file meanwhile, it is replayed (again) through the
    store's own connection, holding its lock, as before."""
    beside = store._reader_beside()
    try:
        if beside is not None:
            if _rebuild_once(store, schema, version, progress, beside):
                return
            _log.debug("rebuild(): the file was reset or rebuilt during the replay; "
                       "replaying again, holding the store")
        # Holding the lock stops this store's resets, not another process's: one
        # during the replay rewound the log it was reading, and the swap put in
        # tables of both logs (a few times, as verify() does, then Busy).
        for _ in range(_VERIFY_RETRIES):
            if _rebuild_once(store, schema, version, progress, None):
                return
            _log.debug("rebuild(): another process reset the file during the replay; "
                       "replaying again")
        raise Busy(f"rebuild() of {store._path!r} replayed the log {_VERIFY_RETRIES} times "
                   f"holding the store, and each time another process reset the file "
                   f"meanwhile (a reset_to() loop?): nothing was changed. Run rebuild() "
                   f"again once the file is left alone.")
    finally:
        if beside is not None:
            store._close_beside(beside[0])


def _rebuild_once(store: Store, schema: str, version: Any,
                  progress: Optional[Callable[[int], None]],
                  beside: Optional[Tuple[sqlite3.Connection, Dict[str, _TableInfo],
                                         Optional[str], int]]) -> bool:
    """Replay into a scratch file of its own and swap it in; False (nothing changed)
    if replayed ``beside`` and the file was reset or rebuilt meanwhile, or if
    another process reset it before the swap."""
    directory = os.path.dirname(store._file) if store._path != ":memory:" else None
    # The machine in the name: another container's pid 33 is not this one's.
    machine = hashlib.sha256(_machine().encode()).hexdigest()[:8]
    prefix = f".{os.path.basename(store._path)}.rebuild-{machine}-"
    _remove_stale_scratch(directory or tempfile.gettempdir(), prefix)
    try:
        fd, scratch = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", suffix=".db",
                                       dir=directory)
    except OSError as exc:  # the store's directory is read-only or full: say so, as for a write
        raise StorageError(
            f"A rebuild replays the log into a scratch file beside {store._path!r}, and it "
            f"could not be created: {exc}. Nothing was changed. Make the store's directory "
            f"writable (or free some space), then retry."
        ) from exc
    os.close(fd)
    try:
        model = _scratch_model(schema, scratch, journal=True, new_schema=(
            _normalize_schema(schema) != _normalize_schema(store._schema)))
        try:
            return _replay_and_swap(store, schema, version, progress, beside, model, scratch)
        finally:
            model.conn.close()
    finally:
        for suffix in ("", "-journal", "-wal", "-shm"):
            _remove_quietly(scratch + suffix)


def _replay_and_swap(store: Store, schema: str, version: Any,
                     progress: Optional[Callable[[int], None]],
                     beside: Optional[Tuple[sqlite3.Connection, Dict[str, _TableInfo],
                                            Optional[str], int]],
                     model: _Model, scratch: str) -> bool:
    reducer = store._reducer
    assert reducer is not None
    _check_reducer_tables(reducer, list(model.tables))  # before the swap, not after
    done = 0
    if beside is not None:
        source, _, generation, resets = beside
        try:
            done = _replay_log_beside(store, reducer, progress, model, source)
        except FluxliteError:  # a failing reducer: or another log by now?
            if store._changed_since(source, generation, resets):
                return False
            raise
    with store._lock:
        store._check_open()  # again: another thread may have closed it meanwhile
        if beside is not None:
            # Under the lock, which this store's reset_to() and rebuild() hold to the end:
            # unchanged here, the log replayed is the start of the one caught up below.
            # An upgrade (open() with new code, no other thread yet) is swapped in only
            # onto the generation it began from (see _rebuilt_meanwhile): a changed one
            # is another process's upgrade (taken as it is) or is refused; no need to
            # replay again (each worker opening the file at once replayed twice).
            if store._changed_since(source, generation, resets) and \
                    _same_code(schema, version, store._schema, store._version):
                return False
        else:
            # Read before the replay: a reset_to() by another process from here on
            # is one _swap_in refuses to swap across (see _reset_since).
            generation = _stored_generation(store._conn)
            # The bulk of the log, read in pages (no snapshot held across it, so
            # writers' WAL pages can be checkpointed meanwhile); _swap_in catches up.
            with store._replaying():
                done = _apply_events(model, reducer, store._read_log(), journal=True,
                                     progress=store._unguarded(progress))
        generation_now = _swap_in(store, schema, version, model, scratch, done, generation)
        if generation_now is None:  # another process reset the file: another log
            return False
        store._schema, store._version = schema, version
        store._load_tables(list(model.tables), generation_now)
    return True


def _replay_log_beside(store: Store, reducer: Reducer,
                       progress: Optional[Callable[[int], None]], model: _Model,
                       source: sqlite3.Connection) -> int:
    """rebuild()'s bulk replay through ``source``, a second connection, in pages (no
    snapshot held across them), without the store's lock; the last seq replayed. Its
    reducers are marked as verify()'s are: other threads' dispatches meanwhile mark
    and unmark _reducing_thread."""
    with store._verify_replaying():
        return _apply_events(model, reducer, store._read_log(conn=source), journal=True,
                             progress=store._unguarded(progress, beside=True))


def _swap_in(store: Store, schema: str, version: Any, model: _Model, scratch: str,
             done: int, generation: Optional[str], tries: int = 3) -> Optional[int]:
    """Catch up with the events logged since ``done`` and swap the new model in,
    in one write transaction; return the new generation. None, nothing swapped, if
    another process reset the file since it had ``generation`` (the replay's start).

    The store's connection copies the new tables and journal from the scratch
    file attached to it, inside SQLite. Attached, the scratch file is locked by
    that write transaction, so events logged meanwhile are caught up before it,
    and the swap is tried again; after ``tries`` such rounds (writers that never
    pause), the catch-up runs inside the transaction and rows go through Python.
    """
    conn = store._conn
    # Off for the swap: with foreign keys on, DROP TABLE deletes the rows first,
    # and ON DELETE CASCADE / SET NULL would reach into tables fluxlite does not
    # manage. _check_references() checks what the keys would have, instead.
    conn.execute("PRAGMA foreign_keys = OFF")
    try:
        return _swap_in_unchecked(store, schema, version, model, scratch, done, generation,
                                  tries)
    finally:
        conn.execute("PRAGMA foreign_keys = ON")


def _swap_in_unchecked(store: Store, schema: str, version: Any, model: _Model, scratch: str,
                       done: int, generation: Optional[str], tries: int) -> Optional[int]:
    conn, reducer = store._conn, store._reducer
    assert reducer is not None
    for _ in range(tries):
        with _read_txn(conn), store._replaying():
            done = _apply_events(model, reducer, store._read_log(done), journal=True) or done
        try:
            conn.execute("ATTACH ? AS fluxlite_scratch", (scratch,))
        # (UnicodeEncodeError: a store's name from non-UTF-8 bytes, which a bound
        # parameter cannot carry: sqlite3 binds text as strict UTF-8.)
        except (sqlite3.OperationalError, UnicodeEncodeError) as exc:
            _log.debug("rebuild: scratch not attached (%s); copying through Python", exc)
            break
        failed = False
        try:
            with _write_txn(conn):  # other writers wait from here on
                if _reset_since(conn, generation):
                    return None
                theirs = _rebuilt_meanwhile(store, schema, version)
                if theirs is not None:
                    return theirs
                if (conn.execute("SELECT max(seq) FROM events").fetchone()[0] or 0) == done:
                    return _swap_model(conn, schema, version, model, "fluxlite_scratch")
        except BaseException as exc:
            failed = True
            _detach_after(conn, exc)
            raise
        finally:
            if not failed:
                conn.execute("DETACH fluxlite_scratch")
    with _write_txn(conn):
        if _reset_since(conn, generation):
            return None
        theirs = _rebuilt_meanwhile(store, schema, version)
        if theirs is not None:
            return theirs
        with store._replaying():
            _apply_events(model, reducer, store._read_log(done), journal=True)
        return _swap_model(conn, schema, version, model)


def _detach_after(conn: sqlite3.Connection, exc: BaseException) -> None:
    """Detach a rebuild's scratch after its swap failed, without hiding why.

    The frames ``exc`` left hold their cursors (a Ctrl-C in the middle of reading
    one, the swap's likeliest moment, as it is the longest), and SQLite refuses to
    DETACH while a statement runs: the DETACH waited out busy_timeout, then raised
    Busy naming "another writer" in place of the interrupt. Those frames are done:
    their locals are dropped, then it is tried once more, without waiting. Left
    attached, the next rebuild copies through Python instead."""
    if conn.in_transaction:  # an interrupt at _write_txn.__exit__'s entry: ours, undone
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
    for attempt in range(2):
        try:
            with _short_wait(conn, 0):
                conn.execute("DETACH fluxlite_scratch")
            return
        except sqlite3.Error as detach_error:
            if attempt:
                _log.debug("rebuild: scratch left attached after %r: %s", exc, detach_error)
                return
        traceback.clear_frames(exc.__traceback__)


def _reset_since(conn: sqlite3.Connection, generation: Optional[str]) -> bool:
    """Inside the swap's transaction: whether a reset_to() (by any store) rewound the
    file since it had ``generation``, when the rebuild's replay began. A rebuild
    meanwhile changes the generation too, not the log: that one is no reason to
    replay again. Each reset's generation is in "rewinds", the newest kept last."""
    return bool(_rewound_since(conn, generation, _stored_generation(conn)))


def _rebuilt_meanwhile(store: Store, schema: str, version: Any) -> Optional[int]:
    """Inside the swap's transaction: the generation another process's rebuild to this
    very schema and version left (two processes of the new code opening the file at
    once: the second has nothing left to do), or None to swap. SchemaError if another
    process rebuilt it to other code."""
    conn = store._conn
    row = conn.execute("SELECT value FROM fluxlite_meta WHERE key = 'generation'").fetchone()
    if row is None or row[0] == store._generation_text:
        return None
    meta = _read_meta(conn)
    upgrade = not _same_code(schema, version, store._schema, store._version)
    if upgrade and _same_code(meta["schema"], meta.get("version"), schema, version):
        return int(meta.get("generation", 0))
    if upgrade:
        theirs = meta.get("version")
        raise SchemaError(
            f"Rebuilding {store._path!r} to version {version!r}, but another process rebuilt "
            f"it to {'another schema' if _same_json(theirs, version) else f'version {theirs!r}'} "
            f"meanwhile; nothing was changed here. Open it with the code the file should run."
        )
    store._check_generation(row[0])  # the same code: go on and swap; other code: refused
    return None


def _remove_stale_scratch(directory: str, prefix: str) -> None:
    """Delete scratch files of rebuilds whose process died (killed mid-rebuild)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if not name.startswith(prefix):
                continue
            pid = name[len(prefix):].partition("-")[0]
            if pid.isdigit() and _holder_is_dead(f"{_machine()}/{pid}/"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(directory, name))


def _swap_model(conn: sqlite3.Connection, schema: str, version: Any, model: _Model,
                attached: Optional[str] = None) -> int:
    """Inside the caller's transaction: replace read-model tables and journal,
    read from the model's database ``attached`` to ``conn``, or else through Python."""
    meta = _read_meta(conn)
    # References SQLite's own enforcement let through (a reference whose type
    # differs from what it references): the rebuild is not to blame for those.
    already = _broken_references(conn, {n.lower() for n in meta["tables"]})
    dropped = _handmade_indexes(conn, meta["schema"], meta["tables"])
    for name in meta["tables"]:
        conn.execute(f"DROP TABLE main.{_quote(name)}")
    names = _create_schema(conn, schema, new=False)  # checked when the scratch was made
    conn.execute("DELETE FROM main.fluxlite_journal")
    for name, columns in [(model.tables[n].q, model.tables[n].writable_columns) for n in names] \
            + [("fluxlite_journal", _JOURNAL_COLUMNS.split(", "))]:
        listed = ", ".join(_quote(c) for c in columns)
        if attached:
            conn.execute(f"INSERT INTO main.{name} ({listed}) SELECT {listed} FROM {attached}.{name}")
        else:
            conn.executemany(f"INSERT INTO main.{name} ({listed}) VALUES "
                             f"({', '.join('?' * len(columns))})",
                             model.conn.execute(f"SELECT {listed} FROM {name}"))
    _carry_autoincrement(conn, model, names)
    _check_references(conn, names, meta["tables"], already)
    _reseal_journal(conn)
    generation = int(meta.get("generation", 0)) + 1
    _write_meta(conn, schema=schema, tables=names, version=version, generation=generation)
    for name, table, sql in dropped:
        _log.warning("the rebuild dropped index %r on the read-model table %r: the schema "
                     "does not declare it (made by hand?), and the tables are made anew "
                     "from the schema. To keep it, add it to the schema: %s;",
                     name, table, sql)
    return generation


def _handmade_indexes(conn: sqlite3.Connection, schema: str,
                      tables: Sequence[str]) -> List[Tuple[str, str, str]]:
    """The indexes on read-model tables that ``schema`` does not declare (made with
    another SQLite tool, for a query): (name, table, sql) each. A rebuild makes the
    tables anew from the schema, so it drops them; a query that needed one is slow
    again, and a UNIQUE one's rule is gone."""
    if not tables:
        return []
    marks = ", ".join("?" * len(tables))
    found = conn.execute(f"SELECT name, tbl_name, sql FROM main.sqlite_master WHERE type = "
                         f"'index' AND sql IS NOT NULL AND tbl_name COLLATE NOCASE IN "
                         f"({marks}) ORDER BY name", tuple(tables)).fetchall()
    if not found:
        return []
    scratch = sqlite3.connect(":memory:")
    try:
        _create_schema(scratch, schema, new=False)  # the schema's own, named by SQLite
        declared = {r[0].lower() for r in scratch.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index'")}
    except (sqlite3.Error, FluxliteError) as exc:  # accepted once: not expected
        _log.debug("rebuild: the schema's indexes not listed: %s", exc)
        return []
    finally:
        scratch.close()
    return [(n, t, sql) for n, t, sql in found if n.lower() not in declared]


def _carry_autoincrement(conn: sqlite3.Connection, model: _Model, names: Sequence[str]) -> None:
    """AUTOINCREMENT never reuses a key, not even a deleted row's: the next key
    is in sqlite_sequence, which the copied rows alone would not restore."""
    if model.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'"
                          ).fetchone() is None:
        return
    counters = [(n, s) for n, s in model.conn.execute("SELECT name, seq FROM sqlite_sequence")
                if n in names]
    conn.executemany("DELETE FROM main.sqlite_sequence WHERE name = ?", [(n,) for n, _ in counters])
    conn.executemany("INSERT INTO main.sqlite_sequence (name, seq) VALUES (?, ?)", counters)


def _check_references(conn: sqlite3.Connection, names: Sequence[str],
                      dropped: Sequence[str] = (),
                      already: "collections.Counter[Tuple[Any, ...]]" = None  # type: ignore[assignment]
                      ) -> None:
    """After a swap made with foreign keys off: every reference from or to the
    new tables (or to old ones the swap dropped) must hold, as the deferred
    check at COMMIT would have required."""
    managed = {n.lower() for n in (*names, *dropped)}
    if already:
        new = _broken_references(conn, managed) - already
        broken = next(((t, r, p) for t, p, _, r in new), None)
    else:
        broken = _first_broken_reference(conn, managed)
    if broken is not None:
        table = broken[0]
        whose = ("a table of the read model" if table.lower() in managed else
                 "a table the schema does not list, which fluxlite leaves as it is")
        raise SchemaError(
            f"The rebuilt read model breaks a foreign key: row {broken[1]} of {table!r} "
            f"({whose}) references {broken[2]!r}, which no longer has the row it points "
            f"to. Nothing was changed; make the new reducers keep the referenced rows, "
            f"or change the reference."
        )


def _broken_references(conn: sqlite3.Connection, names: Set[str]
                       ) -> "collections.Counter[Tuple[Any, ...]]":
    """Every reference that finds no row, as _first_broken_reference looks for
    them: (table, parent, foreign key id, the referencing row) each."""
    broken: "collections.Counter[Tuple[Any, ...]]" = collections.Counter()
    _first_broken_reference(conn, names, broken)
    return broken


def _first_broken_reference(conn: sqlite3.Connection, names: Set[str],
                            collect: "Optional[collections.Counter[Tuple[Any, ...]]]" = None
                            ) -> Optional[Tuple[Any, ...]]:
    """The first (table, rowid, parent) whose reference finds no row, in the tables
    ``names`` (lower case) or in any table referencing them; a reference that cannot
    work at all (SQLite's "foreign key mismatch") is a SchemaError. With ``collect``,
    all of them are counted there instead, and None is returned; each is named by
    what a rebuild keeps of it (rowids and foreign key numbers change): the table,
    the referenced table, the referencing columns, and their values with the
    row's key (a WITHOUT ROWID row, which the check does not name: by count)."""
    for (table,) in conn.execute("SELECT name FROM main.sqlite_master WHERE type = 'table' "
                                 "AND name NOT LIKE 'sqlite_%'").fetchall():
        parents = {r[2].lower() for r in conn.execute(f"PRAGMA main.foreign_key_list({_quote(table)})")}
        if not parents or not (table.lower() in names or parents & names):
            continue
        try:
            check = conn.execute(f"PRAGMA main.foreign_key_check({_quote(table)})")
            broken = check.fetchone()
        except sqlite3.OperationalError as exc:  # "foreign key mismatch"
            raise SchemaError(f"Table {table!r} cannot have its references checked: {exc}. A "
                              f"reference must name a primary key or a UNIQUE column. Nothing "
                              f"was changed.") from exc
        if broken is not None and collect is None:
            return tuple(broken)
        references = conn.execute(f"PRAGMA main.foreign_key_list({_quote(table)})").fetchall()
        key = [r[1] for r in sorted(conn.execute(f"PRAGMA main.table_info({_quote(table)})"),
                                    key=lambda r: r[5]) if r[5]]
        while broken is not None:
            _, rowid, parent, fkid = broken
            columns = tuple(r[3] for r in references if r[0] == fkid)
            values = None if rowid is None else conn.execute(
                f"SELECT {', '.join(_quote(c) for c in (*key, *columns))} FROM "
                f"main.{_quote(table)} WHERE _rowid_ = ?", (rowid,)).fetchone()
            collect[(table.lower(), parent.lower(), columns, values)] += 1  # type: ignore[index]
            broken = check.fetchone()
    return None


def _compare(live: _Model, replica: _Model) -> List[str]:
    """Differences between two read models; streams rows while they agree."""
    problems: List[str] = []
    for name in sorted(live.tables):
        info = live.tables[name]
        sql = f"SELECT * FROM {info.q} ORDER BY {info.order_by}"
        left, right = live.conn.execute(sql), replica.conn.execute(sql)
        have, want = ([d[0] for d in c.description] for c in (left, right))
        if have != want:  # rows of other shapes: no row-by-row diff
            problems.append(_altered_table(name, have, want))
            continue
        while True:
            a, b = left.fetchmany(_PAGE), right.fetchmany(_PAGE)
            # Python's == takes 1 for 1.0, and -0.0 for 0.0: the types are compared
            # too (typeof()), and a float's sign (a typeless column keeps -0.0).
            if a != b or _kinds(a) != _kinds(b):
                problems += _diff_table(live, replica, info)
                break
            if not a:
                break
    return problems


def _altered_table(name: str, have: List[str], want: List[str]) -> str:
    """A live table whose columns are not the schema's: altered by hand (ALTER TABLE)."""
    return (
        f"{name}: the live table has the columns ({', '.join(have)}) where the schema makes "
        f"({', '.join(want)}): it was altered outside fluxlite (ALTER TABLE?), and no event "
        f"can replay that. rebuild() makes it as the schema declares (what only the "
        f"altered columns held is lost); to keep a new column, add it to the schema and "
        f"open the store with a new version=, and have the reducer fill it."
    )


def _kinds(rows: List[Any]) -> List[Any]:
    """Each value's type, and a float's sign: what == does not tell apart."""
    return [(v.__class__, math.copysign(1.0, v)) if v.__class__ is float else v.__class__
            for v in itertools.chain.from_iterable(rows)]


def _diff_table(live: _Model, replica: _Model, info: _TableInfo, limit: int = 20) -> List[str]:
    """A readable diff of one table (only built once the tables are known to differ)."""
    sql = f"SELECT * FROM {info.q}"
    left = {info.key_of(r): r for r in live._rows(sql)}
    right = {info.key_of(r): r for r in replica._rows(sql)}
    problems: List[str] = []
    for key in sorted(set(left) | set(right), key=repr):
        a, b = left.get(key), right.get(key)
        if _typed(a) == _typed(b):
            continue
        if len(problems) == limit:
            problems.append(f"{info.name}: ... (more differences not shown)")
            break
        if a is None:
            problems.append(f"{info.name} {key!r}: missing live, replay has {b}")
        elif b is None:
            problems.append(f"{info.name} {key!r}: live has {a}, missing in replay")
        else:
            cols = ", ".join(f"{c}: live {a[c]!r} != replay {b[c]!r}" for c in a
                             if _typed({c: a[c]}) != _typed({c: b[c]}))
            problems.append(f"{info.name} {key!r}: {cols}")
    return problems


def _typed(row: Optional[Mapping[str, Any]]) -> Any:
    """A row compared as SQLite stores it: 1 and 1.0 differ (as do their typeof())."""
    return None if row is None else [
        (c, type(v), v, math.copysign(1.0, v) if v.__class__ is float else 0)
        for c, v in row.items()]


###############################################################################
# 11. Middleware
###############################################################################

Middleware = Callable[[Store], Callable[[Callable[[Dict[str, Any]], Any]],
                                        Callable[[Dict[str, Any]], Any]]]


# A predicate's answer counts by its truth (a row found allows), so its return type is
# object, not bool: typed bool, a rule returning the row it found (as the README
# describes) was refused by mypy --strict, though it works.
def authorize(rules: Mapping[str, Callable[[Optional[str], Dict[str, Any]], object]], *,
              default: str = "deny") -> Middleware:
    """Middleware for access control by event type.

    ``rules`` maps an event type (or "*" for any other type) to
    ``predicate(actor, event)``, whose answer counts by its truth (a row found
    allows, None denies), where ``event`` is the event dict the
    middleware chain passes (``event["payload"]``) and ``actor`` is
    ``event["meta"].get("actor")`` (set by ``dispatch(..., actor=...)``: the
    rules trust it, so never pass an untrusted client's meta through). A type
    that upcasters turn into another must pass the other's rule too, which is
    given the event as upcast (with seq taken as the head's next).
    A type with no rule and no "*" rule follows ``default`` ("deny" or
    "allow"). "*" does not cover fluxlite's built-in types (``fluxlite.restore``
    writes any row): they follow their own rule, else ``default``. A refusal
    raises Forbidden before any transaction opens.
    """
    if default not in ("deny", "allow"):
        raise UsageError(f"authorize(default=...) is 'deny' or 'allow'; received "
                         f"{_quoted(default)}.")
    if not isinstance(rules, _Mapping):
        raise UsageError(f"authorize() takes a dict of event type -> predicate(actor, event); "
                         f"received {_describe(rules)}.")
    for kind, predicate in rules.items():
        if not isinstance(kind, str):  # a tuple of types, None: a rule that never applies
            raise UsageError(f"authorize() rules are keyed by one event type (a str, or "
                             f"'*'); received the key {_describe(kind)}. Give each type "
                             f"its own entry.")
        if not callable(predicate):
            raise UsageError(f"authorize() rules map an event type to predicate(actor, event) "
                             f"-> bool; {_quoted(kind)} maps to {_describe(predicate)}. For a type "
                             f"anyone may dispatch, use lambda actor, event: True.")
        _check_takes_two(predicate, f"The rule for {_quoted(kind)}", "(actor, event)", "predicate")
        if _inspect_says(inspect.iscoroutinefunction, predicate):  # a truthy coroutine: allows all
            raise UsageError(
                f"The rule for {_quoted(kind)} is an async function; rules are called "
                f"synchronously, before the transaction, and a coroutine is never awaited "
                f"(and, being truthy, would allow every event). Make it a plain def, and "
                f"read what it needs before dispatching."
            )
    table = dict(rules)

    def middleware(store: Store) -> Callable[[Callable[[Dict[str, Any]], Any]],
                                             Callable[[Dict[str, Any]], Any]]:
        def wrap(next_: Callable[[Dict[str, Any]], Any]) -> Callable[[Dict[str, Any]], Any]:
            def check(event: Dict[str, Any]) -> Any:
                _check_passed_dict(event)  # an earlier middleware's mistake, as the core says it
                kind = event.get("type")
                if not isinstance(kind, str):  # an earlier middleware changed it so
                    kind = _check_type(kind)
                meta = event.get("meta") or {}
                actor = meta.get("actor") if isinstance(meta, _Mapping) else None
                # An old type an upcaster renames is the new type to its reducer: the
                # new type's rule applies too (to the event as upcast), so a rename
                # cannot open a way around it.
                newer = store._upcast_action(event)
                judged = [(kind, event)]
                if newer is not None and newer["type"] != kind:
                    judged.append((newer["type"], newer))
                for checked, shown in judged:
                    builtin = checked.startswith("fluxlite.")
                    rule = table.get(checked) if builtin else table.get(checked, table.get("*"))
                    if (default == "allow") if rule is None else _verdict(rule, checked, actor, shown):
                        continue
                    raise Forbidden(
                        f"Actor {_quoted(actor)} may not dispatch {_quoted(checked)} events"
                        + ("" if checked == kind else f" (upcasters turn {_quoted(kind)} into {_quoted(checked)})")
                        + ("" if rule else f" (no rule for this type{', which * does not cover' if builtin else ''}; the default is deny)")
                        + ". Dispatch as an actor the rules allow, or change the rules."
                    )
                return next_(event)
            return check
        return wrap

    return middleware


def _verdict(rule: Callable[[Optional[str], Dict[str, Any]], Any], kind: str,
             actor: Any, event: Dict[str, Any]) -> bool:
    """A rule's answer, by truth (a row found, say, allows), except for answers that
    are true by accident: a coroutine or generator (an async or yielding predicate),
    or a function (one returned uncalled). Allowing on those would let every actor
    through, so they are refused."""
    answer = rule(actor, event)
    if answer is True or answer is False:
        return answer
    if inspect.isawaitable(answer) or callable(answer) or inspect.isgenerator(answer) \
            or inspect.isasyncgen(answer):
        if inspect.iscoroutine(answer):
            answer.close()  # not run: no "never awaited" warning later
        raise UsageError(
            f"The rule for {_quoted(kind)} returned {_describe(answer)}, not an answer: "
            f"a predicate(actor, event) returns True or False, synchronously (an async "
            f"or yielding rule is never run, and a function returned uncalled is no "
            f"decision). Nothing was dispatched; fix the rule."
        )
    return bool(answer)


def _weak_core(store: Store) -> Callable[[Dict[str, Any]], Any]:
    """The innermost next(): the store's own dispatch, held weakly, so that the
    store and its chain are no reference cycle. A store dropped without close()
    is then freed at once and stops its checkpoint thread, not at the next
    collection (its sqlite3 connection, a cycle in CPython itself, still waits)."""
    core = weakref.WeakMethod(store._core_dispatch)

    def core_dispatch(action: Dict[str, Any]) -> Optional[Event]:
        dispatch = core()
        if dispatch is None:
            raise UsageError("A middleware called next() after its store was gone; "
                             "call next() only while handling the event.")
        return dispatch(action)
    return core_dispatch


def _refusing_batch(frames: threading.local, inner: Callable[[Dict[str, Any]], Any]
                    ) -> Callable[[Dict[str, Any]], Any]:
    """next() as a middleware is given it: a refusal raised through it in dispatch_many
    (Forbidden from authorize, a Rejected of another middleware, or any other error,
    such as a rule's predicate raising KeyError) refuses the whole batch even when that
    middleware catches it and returns, as the core's own refusal does; else a "report
    and carry on" middleware (except Exception) would commit the batch without it.
    A middleware that catches the refusal and calls next() again with a fixed event,
    which passes, replaced the event (as in dispatch()): the batch goes on.
    Holds the frame stack, not the store: no reference cycle."""
    def next_(action: Dict[str, Any]) -> Any:
        stack = getattr(frames, "stack", None)
        frame = stack[-1] if stack and stack[-1].batch is not None else None
        if frame is None or not frame.calls:
            return inner(action)
        caller: List[Optional[BaseException]] = frame.calls[-1]  # the middleware calling next()
        call: List[Optional[BaseException]] = [None]  # the middleware it calls
        frame.calls.append(call)
        try:
            result = inner(action)
        except BaseException as exc:  # any error: a rule's predicate raising refuses too
            caller[0] = exc  # refused, unless that middleware calls next() again and it passes
            raise
        finally:
            frame.calls.pop()
        if call[0] is not None:  # the inner middleware returned after swallowing a refusal
            frame.refused = frame.refused or call[0]
        caller[0] = None  # passed: a retry with a fixed event replaces the refused one
        return result
    return next_


def _compose_chain(store: Store, middleware: Sequence[Middleware]) -> Callable[[Dict[str, Any]], Any]:
    """Redux's applyMiddleware: the first middleware is the outermost."""
    wrappers = [m(store) for m in middleware]
    chain: Callable[[Dict[str, Any]], Any] = _weak_core(store)
    for wrap in reversed(wrappers):
        if not callable(wrap):
            raise UsageError(
                f"A middleware returned {_describe(wrap)} when given the store; middleware "
                f"has the shape store -> next -> event -> result (did it forget to return "
                f"its inner function?)."
            )
        chain = wrap(_refusing_batch(store._frames, chain))
        if not callable(chain):
            raise UsageError(
                f"A middleware returned {_describe(chain)}; middleware has the shape "
                f"store -> next -> event -> result."
            )
        if _inspect_says(inspect.iscoroutinefunction, chain):
            raise UsageError(_ASYNC_MIDDLEWARE.format(f"{_describe(chain)} is an async function"))
    return _synchronous(chain) if wrappers else chain


_ASYNC_MIDDLEWARE = (
    "A middleware's event handler must be a plain function that calls next(event) and "
    "returns its result; {}. dispatch() does not run a coroutine, so what it does (call "
    "next(), which commits) never happens. Middleware runs synchronously: make the "
    "handler a plain def (store.adispatch() runs the whole dispatch in a worker thread, "
    "so an asyncio application needs no async middleware)."
)


def _synchronous(chain: Callable[[Dict[str, Any]], Any]) -> Callable[[Dict[str, Any]], Any]:
    """The chain, refusing a coroutine as its result (a handler that is no async def but
    returns one, a lambda calling an async function): returned, it would read as "the
    event", while next() was never called and nothing was committed."""
    def outermost(action: Dict[str, Any]) -> Any:
        result = chain(action)
        if result is not None and result.__class__ is not Event and inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()  # never run: no "never awaited" warning later
            raise UsageError(_ASYNC_MIDDLEWARE.format(
                f"one returned {_describe(result)} for a {_quoted(action.get('type'))} event"))
        return result
    return outermost


###############################################################################
# 12. open()
###############################################################################


def _read_meta(conn: sqlite3.Connection) -> Dict[str, Any]:
    """fluxlite_meta as a dict; SchemaError if damage left it unreadable or misshapen."""
    try:
        meta = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM fluxlite_meta")}
        shape_ok = (isinstance(meta.get("schema"), str) and isinstance(meta.get("tables"), list)
                    and all(isinstance(t, str) for t in meta["tables"])
                    and isinstance(meta.get("generation", 0), int))
    except (TypeError, ValueError) as exc:  # a value that is not JSON text
        meta, shape_ok = {"error": str(exc)}, False
    if not shape_ok:
        raise SchemaError(
            f"The store's fluxlite_meta table is damaged (it holds {_describe(meta)}): "
            f"its schema, tables and generation cannot be read. Restore the file from a backup."
        )
    return meta


def _renew_generation(conn: sqlite3.Connection, before: Any) -> None:
    """After reset_to() copied a checkpoint over the file: a generation the file has
    never held.

    Another store knows the model is still the one it loaded by the generation alone.
    Put back to an older number, the file could reach that number again by a rebuild
    of other code, and such a store would write its changes into tables of another
    shape (or by other reducers) without a word. Rebuilds only count up, so one
    past both numbers is new: every other store reloads the model, or is refused.
    New also when the checkpoint's number is the one it replaced: the log was
    rewound all the same, and another process's verify() reading it in pages
    learns so by the number (else it took the two logs it read for damage).
    _stamp_generation() gave the copy such a number already: written here only
    where the copy did not go in whole (an interrupt), not a write on every reset
    (that one could fail on a full disk after the reset itself went through)."""
    if _read_meta(conn).get("generation", 0) > before:
        return
    with _write_txn(conn):
        ours = _read_meta(conn).get("generation", 0)
        if ours <= before:
            _write_meta(conn, generation=max(ours, before) + 1)


@contextlib.contextmanager
def _leases_left_out(copy: sqlite3.Connection, leave_out: bool) -> Iterator[None]:
    """reset_to() a checkpoint of another store (a template's): the leases its copy
    holds are that store's Consumers', which can never use this file and would keep
    their names Busy here until they ran out (fork() releases them too). Left out of
    what is copied, and put back in the copy after it: the checkpoint may go back to
    its own store, where they are held. Positions are kept."""
    held = _held_leases(copy) if leave_out else []
    if held:
        with copy:
            copy.execute("UPDATE fluxlite_consumers SET owner = NULL, lease_until = 0")
    try:
        yield
    finally:
        if held:
            with copy:
                copy.executemany("UPDATE fluxlite_consumers SET owner = ?, lease_until = ? "
                                 "WHERE name = ?", held)


def _held_leases(conn: sqlite3.Connection) -> List[Tuple[str, float, str]]:
    """(owner, lease_until, name) of the consumers holding a lease (none in a file
    made before consumers were)."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'fluxlite_consumers'").fetchone():
        return []
    return conn.execute("SELECT owner, lease_until, name FROM fluxlite_consumers "
                        "WHERE owner IS NOT NULL").fetchall()


def _stamp_generation(copy: sqlite3.Connection, before: Any,
                      rewinds: List[List[int]], head: int) -> None:
    """Before reset_to() copies a checkpoint over the file: a generation past the
    file's in the copy, so that the rewound log is never seen under the number
    the file had (another process's verify() would take the two logs it read for
    one, damaged), not even for a moment. With it, the file's last resets (``rewinds``,
    as [generation, head] pairs) and this one, which leaves the log at ``head``:
    followers of other stores go back to it (see _FollowCursor.rewind)."""
    with copy:  # (its own transaction, committed: backup() copies what is committed)
        # Two past: ``before`` was read without the file's lock, and a rebuild another
        # process swaps in before the copy takes the next number (its store would take
        # the checkpoint's model, which the copy puts in under that number, for its own).
        generation = max(_read_meta(copy).get("generation", 0), before) + 2
        kept = (rewinds + [[generation, head]])[-_REWINDS_KEPT:]
        _write_meta(copy, generation=generation, rewinds=kept)


def _rewinds(meta: Mapping[str, Any]) -> List[List[int]]:
    """fluxlite_meta's "rewinds": [generation, head] of the file's last resets (none
    in a file no reset_to() rewound; anything else there is ignored, not an error)."""
    found = meta.get("rewinds")
    if not isinstance(found, list):
        return []
    return [[pair[0], pair[1]] for pair in found if isinstance(pair, list) and len(pair) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in pair)]


def _rewound_since(conn: sqlite3.Connection, generation: Optional[str],
                   stored: Optional[str]) -> List[int]:
    """The heads the file's reset_to()s since it had ``generation`` (it has ``stored``
    now) left the log at: none without a reset since (a rebuild changes the generation
    too, not the log). Past the last 16, the kept ones are all since, so never none."""
    if generation is None or stored == generation:
        return []
    seen = _generation_number(generation)
    return [head for number, head in _rewinds(_read_meta(conn)) if number > seen]


def _generation_number(text: str) -> int:
    """A generation as fluxlite_meta holds it (JSON text of an int), as a number."""
    value = json.loads(text)
    return value if isinstance(value, int) else 0


def _write_meta(conn: sqlite3.Connection, **items: Any) -> None:
    conn.executemany("INSERT OR REPLACE INTO fluxlite_meta VALUES (?, ?)",
                     [(k, _dumps(v)) for k, v in items.items()])


def _read_existing_meta(conn: sqlite3.Connection, path: str) -> Dict[str, Any]:
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "fluxlite_meta" not in names:
        raise SchemaError(f"{path!r} is not a fluxlite store (it has no fluxlite log).")
    _check_format(conn, path, names)
    return _read_meta(conn)


def _check_no_triggers(conn: sqlite3.Connection, path: str, tables: Sequence[str]) -> None:
    """A trigger on a read-model table, made by hand after the store was (the schema
    may not declare one), or one on another table (the log, say) that writes a
    read-model table: its writes would miss the journal, subscribers, at() and every
    replay, and a rebuild would drop it. Refused before a dispatch fires it."""
    if not tables:
        return
    model = {n.lower(): n for n in tables}
    own = {s.split()[2] for s in _LOG_DDL if s.startswith("CREATE TRIGGER")}
    for name, table, sql in conn.execute(
            "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name"):
        writes = _trigger_writes(sql or "")
        written = sorted({model[w] for w in writes if w in model})
        if table.lower() in model and not writes:  # a check: RAISE(ABORT, ...) on a bad row
            raise SchemaError(
                f"{path!r} has trigger {name!r} on the read-model table {table!r}, made "
                f"outside the schema: a rebuild (or a new version) makes the table again "
                f"without it, and the rule it enforces would silently stop. Drop it (DROP "
                f"TRIGGER {_quote(name)}) and enforce the rule in the reducer (raise "
                f"Rejected) or with a CHECK in the schema."
            )
        if table.lower() in model:
            where, lost = f"on the read-model table {table!r}", "a rebuild would drop it"
        elif written and name not in own:
            where = (f"on {table!r} that writes the read-model table "
                     f"{', '.join(map(repr, written))}")
            lost = "a replay would not write what it wrote"
        else:
            continue
        raise SchemaError(
            f"{path!r} has trigger {name!r} {where}, made "
            f"outside the schema: what it writes would bypass the journal, so subscribers, "
            f"history(), at() and replays (verify(), rebuild()) would not see it, and "
            f"{lost}. Drop it (DROP TRIGGER {_quote(name)}) and do its "
            f"work in a reducer (derived data such as a search index: in a subscriber)."
        )


def _trigger_writes(sql: str) -> Set[str]:
    """The tables a trigger's body writes (lower case): the names after INTO, UPDATE
    [OR ...] and DELETE FROM (SQLite allows no schema name before them there)."""
    tokens = [t for t in _sql_code(sql) if t != " "]
    upper = [t.upper() for t in tokens]
    body = upper.index("BEGIN") + 1 if "BEGIN" in upper else len(upper)
    written = set()
    for i in range(body, len(tokens) - 1):
        j = i + 1
        if upper[i] == "UPDATE" and upper[j] == "OR":
            j += 2
        elif upper[i] == "DELETE" and upper[j] == "FROM":
            j += 1
        elif upper[i] not in ("INTO", "UPDATE") or upper[j] == "SET":  # (DO UPDATE SET)
            continue
        if j < len(tokens) and tokens[j][0] in "\"`[":  # a quoted name
            written.add(tokens[j][1:-1].replace(tokens[j][0] * 2, tokens[j][0]).lower())
        elif j < len(tokens):  # (a word token runs on into a ';' or an operator)
            written.add(re.split(r"[^\w$]", tokens[j], maxsplit=1)[0].lower())
    return written


def _check_no_log_triggers(conn: sqlite3.Connection, path: str) -> None:
    """A trigger on the log or on fluxlite's own tables, other than the log's own
    append-only ones, made by hand: it fires inside fluxlite's transactions, where a
    RAISE(IGNORE) before an event's insert let dispatch() return an event the log
    never got (its row changes in, the seals damaged), and any write it makes misses
    the journal and the seals. Refused before a dispatch fires it."""
    own = tuple(s for s in _LOG_DDL if s.startswith("CREATE TRIGGER"))
    marks = ", ".join("?" * len(own))
    for row in conn.execute(f"SELECT name, tbl_name, sql FROM sqlite_master WHERE type = "
                            f"'trigger' AND sql NOT IN ({marks}) ORDER BY name", own).fetchall():
        ours = row[1].lower() == "events" or row[1].lower().startswith("fluxlite_")
        if not _writes_fluxlites(row[2] or "") and (
                not ours or _trigger_timing(row[2] or "") == "AFTER"):
            continue  # an outbox: AFTER the row is in, writing only the application's tables
        if not ours:  # on the application's table, an outbox's trigger may fire it
            raise SchemaError(
                f"{path!r} has trigger {row[0]!r} on {row[1]!r} that writes fluxlite's own "
                f"tables, made by hand: fired inside a dispatch (by a trigger on the log "
                f"writing {row[1]!r}), or by any write, what it writes bypasses the log's "
                f"seals and the journal, leaving the file damaged. Drop it (DROP TRIGGER "
                f"{_quote(row[0])}); to act on each event, subscribe to the store or follow "
                f"its log."
            )
        raise SchemaError(
            f"{path!r} has trigger {row[0]!r} on fluxlite's table {row[1]!r}, made by "
            f"hand: it fires inside every dispatch, and what it does (skipping the event's "
            f"row, writing rows) would bypass the log's seals and the journal, leaving the "
            f"file damaged. Drop it (DROP TRIGGER {_quote(row[0])}); to act on each event, "
            f"subscribe to the store or follow its log."
        )


def _writes_fluxlites(sql: str) -> bool:
    """Whether a trigger's body writes the log or one of fluxlite's own tables."""
    return any(name == "events" or name.startswith("fluxlite_")
               for name in _trigger_writes(sql))


def _trigger_timing(sql: str) -> str:
    """BEFORE, AFTER or INSTEAD of a trigger's CREATE statement (upper case; BEFORE
    when it names none). Read at its place, right after the trigger's name: AFTER
    may be the name itself (CREATE TRIGGER after BEFORE INSERT ...), or a column's
    in UPDATE OF, or in a WHEN clause, and none of those makes a trigger run after."""
    upper = [t.upper() for t in _sql_code(sql) if t != " "]
    at = upper.index("TRIGGER") + 1 if "TRIGGER" in upper else len(upper)
    if upper[at:at + 3] == ["IF", "NOT", "EXISTS"]:
        at += 3
    at += 1  # the name; then the rest of a schema-qualified one (main . x, "main".x, main."x")
    while at < len(upper) and (upper[at].startswith(".") or upper[at - 1].endswith(".")):
        at += 1
    word = upper[at] if at < len(upper) else ""
    return word if word in ("BEFORE", "AFTER", "INSTEAD") else "BEFORE"


def _check_finished(meta: Mapping[str, Any], path: str) -> None:
    """A replay(into=) commits about 1,000 events at a time: a process killed in the
    middle (no except clause runs then) leaves a store holding a part of the log,
    which verify() finds whole. Its mark, taken off with the last event, says so."""
    if "unfinished_replay" in meta:
        raise StorageError(
            f"{path!r} is an unfinished replay(into=...): a replay copying "
            f"{meta['unfinished_replay']} events into it is still running, or stopped "
            f"before the last, so its log is only a part of the one it copies. If it is "
            f"running, open the file once replay() has returned; if it stopped, delete "
            f"the file (with its -wal and -shm) and run replay() again."
        )


def _check_format(conn: sqlite3.Connection, path: str, names: Set[str]) -> int:
    """The on-disk format of an existing store; SchemaError if newer or missing tables."""
    user_version = _stored_format(conn, names)
    if user_version > FORMAT_VERSION:
        raise _newer_format(conn, path, user_version)
    needed = {"events", "fluxlite_journal"} | ({"fluxlite_seals"} if user_version >= 2 else set())
    missing = needed - names
    if missing:
        raise SchemaError(
            f"{path!r} has lost fluxlite's {', '.join(sorted(missing))} table (dropped by "
            f"hand?); the log cannot be trusted. Restore the file from a backup."
        )
    for table, columns in _OWN_COLUMNS.items():
        info = conn.execute(f"PRAGMA table_info({table})").fetchall()
        found = tuple(r[1] for r in info)
        if table in needed and found != columns:
            raise SchemaError(
                f"{path!r} is damaged: fluxlite's table {table} has the columns {found}, "
                f"not {columns}. Restore the file from a backup."
            )
        # Its key must still be INTEGER (for a rowid table, the rowid itself):
        # a damaged type name would make every seq read back as NULL.
        key = [(r[1], r[2].upper()) for r in sorted(info, key=lambda r: r[5]) if r[5]]
        if table in needed and key != [(c, "INTEGER") for c in _OWN_KEYS[table]]:
            raise SchemaError(
                f"{path!r} is damaged: fluxlite's table {table} has the primary key "
                f"{key}, not {', '.join(_OWN_KEYS[table])} INTEGER. Restore the file from a backup."
            )
    return int(user_version)


def _newer_format(conn: sqlite3.Connection, path: str, found: int) -> SchemaError:
    """A format past this fluxlite's. Where only user_version says so and meta records
    one this fluxlite knows (a newer fluxlite writes both), the likelier writer is a
    program that began counting in user_version after fluxlite marked the file as its
    own (an application's migration tool): "upgrade fluxlite" alone sent that user
    after a fluxlite that does not exist."""
    recorded = _recorded_format(conn)
    other = ""
    if recorded is not None and recorded <= FORMAT_VERSION:
        other = (f" Its fluxlite_meta records format {recorded}, though: if another program "
                 f"set PRAGMA user_version (an application's migration tool), that number is "
                 f"fluxlite's mark in this file: set PRAGMA user_version = {recorded} and keep "
                 f"that program's count elsewhere.")
    return SchemaError(
        f"{path!r} was written by a newer fluxlite (on-disk format {found}; this is "
        f"fluxlite {__version__}, format {FORMAT_VERSION}). Nothing was changed. Upgrade "
        f"fluxlite to one whose FORMAT_VERSION is {found} or more to open it.{other}"
    )


def _recorded_format(conn: sqlite3.Connection) -> Optional[int]:
    """The format fluxlite_meta records, or None (none, or damage: _read_meta() says)."""
    try:
        row = conn.execute("SELECT value FROM fluxlite_meta WHERE key = 'format'").fetchone()
        recorded = json.loads(row[0]) if row is not None else None
    except (sqlite3.Error, TypeError, ValueError):
        return None
    return recorded if isinstance(recorded, int) and not isinstance(recorded, bool) else None


def _stored_format(conn: sqlite3.Connection, names: Set[str]) -> int:
    """The on-disk format, from every mark the file has: PRAGMA user_version, the
    format fluxlite_meta records, and fluxlite_seals (format 2 made it), the highest
    of them. A copy made through SQL loses user_version (0: the sqlite3 shell's .dump
    or .recover piped into a new file, an operator's usual way to compact or repair a
    database), and another program may set it; taken at its word, a store with seals
    was "upgraded" (its seals table made again: "table fluxlite_seals already
    exists"), and a newer fluxlite's file whose meta says so was opened. In an
    adopted file that keeps its application's marks (_app_marks), user_version is
    the application's own number, not a format."""
    user_version = 0 if _app_marks(conn) else int(
        conn.execute("PRAGMA user_version").fetchone()[0])
    recorded = _recorded_format(conn)
    return max(user_version, 2 if "fluxlite_seals" in names else 0,
               0 if recorded is None else recorded)


def _app_marks(conn: sqlite3.Connection) -> Optional[Tuple[int, int]]:
    """The header's (application_id, user_version) when another program set them:
    an adopted application's, whose own code reads them (its migration number, its
    file type). Adoption keeps them, and fluxlite then keeps its format in
    fluxlite_meta alone; overwritten, the application re-ran its migrations on a
    database that already had them. None when the header is fluxlite's or blank
    (a copy made through SQL loses both)."""
    marks = (int(conn.execute("PRAGMA application_id").fetchone()[0]),
             int(conn.execute("PRAGMA user_version").fetchone()[0]))
    return None if marks[0] == APPLICATION_ID or marks == (0, 0) else marks


def _app_header_recorded(conn: sqlite3.Connection) -> bool:
    """Whether the header's marks are an adopted application's (_app_marks), even
    once a copy made through SQL blanked them: adoption records that in
    fluxlite_meta's app_header. Stamped with fluxlite's marks instead, such a copy
    told the application its migration number was fluxlite's format, 2; blank, it
    is what any SQLite file copied so would be, and the application can put its
    own number back."""
    row = conn.execute("SELECT value FROM fluxlite_meta WHERE key = 'app_header'").fetchone()
    return row is not None and row[0] == "true"


_OWN_COLUMNS = {
    "events": tuple(_EVENT_COLUMNS.split(", ")),
    "fluxlite_journal": tuple(_JOURNAL_COLUMNS.split(", ")),
    "fluxlite_seals": ("seq", "events", "journal"),
}
_OWN_KEYS = {"events": ("seq",), "fluxlite_journal": ("seq", "n"), "fluxlite_seals": ("seq",)}


def _initialise(conn: sqlite3.Connection, path: str, schema: Optional[str], version: Any,
                adopt: bool, clock: Callable[[], datetime], ids: Callable[[], str],
                new_schema: bool = True) -> Dict[str, Any]:
    """Create a new store in an empty (or adopted) database, or read an existing one's meta."""
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "fluxlite_meta" in names:
        user_version = _check_format(conn, path, names)
        apps = _app_header_recorded(conn)  # the header's marks are an application's
        if not apps and _app_marks(conn):
            # adopted before app_header was recorded (or in format 1): recorded while
            # the header still shows the marks, or a later copy through SQL is stamped
            _write_meta(conn, app_header=True)
            apps = True
        if user_version != conn.execute("PRAGMA user_version").fetchone()[0] and not apps:
            # lost by a copy made through SQL (see _stored_format): put back
            conn.execute(f"PRAGMA user_version={user_version}")
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        _restore_triggers(conn)
        conn.execute(_CONSUMERS_DDL)
        if user_version < 2:  # format 1 had no seals: seal what is there now
            conn.execute(_SEALS_DDL)
            _seal_unsealed(conn)
            _write_meta(conn, format=FORMAT_VERSION)
            if not apps:
                conn.execute(f"PRAGMA user_version={FORMAT_VERSION}")
        return _read_meta(conn)
    existing = names - {"sqlite_sequence"}
    if existing and not adopt:
        raise _not_a_store(path, existing)
    if schema is None:
        raise SchemaError(
            f"{path!r} is a new store and needs a schema: pass schema= with the "
            f"CREATE TABLE statements of the read model."
        )
    for statement in (*_LOG_DDL, _CONSUMERS_DDL):
        conn.execute(statement)
    tables = (_adopt(conn, schema, existing, clock, ids) if existing
              else _create_schema(conn, schema, new_schema))
    _write_meta(conn, format=FORMAT_VERSION, schema=schema, tables=tables, version=version,
                generation=0, created_by=f"fluxlite {__version__}")
    if _app_marks(conn):  # an adopted application's stay: see _app_header_recorded
        _write_meta(conn, app_header=True)
    else:
        conn.execute(f"PRAGMA user_version={FORMAT_VERSION}")
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
    return _read_meta(conn)


def _not_a_store(path: str, tables: Iterable[str]) -> SchemaError:
    return SchemaError(
        f"{path!r} is a SQLite database with tables ({', '.join(sorted(tables))}) "
        f"but no fluxlite log. Pass adopt=True to take it over (its rows become a "
        f"baseline event), or choose a new file."
    )


def _check_adoptable_names(path: str, tables: Iterable[str]) -> None:
    """Adoption creates the log and fluxlite's tables beside the file's own: one of
    those already named `events` or `fluxlite_*` (an application's own event table)
    would collide with the log, or be taken for one of fluxlite's tables."""
    taken = sorted(n for n in tables if _RESERVED_TABLE.match(n)
                   and not n.lower().startswith("sqlite_"))
    if taken:
        raise SchemaError(
            f"Cannot adopt {path!r}: its table(s) {', '.join(map(repr, taken))} have a name "
            f"fluxlite reserves (`events` is fluxlite's log, `fluxlite_*` are its own "
            f"tables). Nothing was changed. Rename them first (ALTER TABLE {_quote(taken[0])} "
            f"RENAME TO app_{taken[0]}), under the new name in the schema too if it lists "
            f"them, then adopt."
        )


def _check_not_a_stub(path: str) -> None:
    """Refuse a file shorter than SQLite's smallest page (512 bytes): not a database.
    SQLite opens a 1-byte one (`echo > app.db` makes one) as an empty database, and a
    new store would overwrite it. A -wal beside it changes nothing: SQLite reads no
    WAL for a file of no pages, it deletes it (so the byte and the -wal were lost)."""
    if os.path.getsize(path) >= 512:
        return
    raise _not_a_database(path, sqlite3.DatabaseError("file is not a database"),
                          " Check the path, or choose a new file name.")


def _foreign_database(path: str, adopt: bool) -> Optional[Tuple[List[str], str]]:
    """For an existing SQLite file with tables but no fluxlite log: its tables and
    journal mode, read without changing it (opening for writing switches it to WAL).
    One with no tables that another program marked as its own is refused (unless
    adopted), also before it is changed."""
    if path == ":memory:" or not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None
    _check_not_a_stub(path)
    try:
        conn = sqlite3.connect(_file_uri(os.path.abspath(path), "ro"), uri=True)
        try:
            names = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            marks = (conn.execute("PRAGMA application_id").fetchone()[0],
                     conn.execute("PRAGMA user_version").fetchone()[0])
        finally:
            conn.close()
    except (sqlite3.Error, UnicodeDecodeError):  # not SQLite, damaged, or not readable
        return None  # so: _connect() and _initialise() say what it is
    tables = sorted(names - {"sqlite_sequence"})
    if not tables and not adopt and marks[0] != APPLICATION_ID and any(marks):
        raise _marked_by_another(path, *marks)
    return None if "fluxlite_meta" in names or not tables else (tables, mode)


def _marked_by_another(path: str, application_id: int, user_version: int) -> SchemaError:
    """An empty database (no tables) is a new store, unless another program set its
    header's marks: then it is that program's file, waiting for its tables, and
    making it a store would overwrite them."""
    return SchemaError(
        f"{path!r} is a SQLite database with no tables that another program marked as "
        f"its own (PRAGMA application_id = {application_id}, user_version = "
        f"{user_version}; fluxlite's application_id is {APPLICATION_ID}). Choose a new "
        f"file, or pass adopt=True to take it over (its marks are kept)."
    )


def _restore_triggers(conn: sqlite3.Connection) -> None:
    """The log's append-only triggers as this version defines them: dropped by
    hand, they come back; defined differently (an older version), replaced."""
    have = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
                             "AND tbl_name = 'events'"))
    for statement in _LOG_DDL:
        if not statement.startswith("CREATE TRIGGER"):
            continue
        name = statement.split()[2]
        if have.get(name) != statement:
            if name in have:
                conn.execute(f"DROP TRIGGER {name}")
            conn.execute(statement)


def _adopt(conn: sqlite3.Connection, schema: str, existing: Set[str],
           clock: Callable[[], datetime], ids: Callable[[], str]) -> List[str]:
    """Take over an existing database: keep its tables, log their rows as a baseline."""
    scratch = sqlite3.connect(":memory:")
    try:
        try:
            declared = _create_schema(scratch, schema)  # the schema's tables, parsed by SQLite
        except SchemaError:  # copied verbatim from a table that breaks a rule: how to mend it
            _check_existing_rules(conn, [n for n in existing if re.search(
                rf"CREATE\s+TABLE\s+(IF\s+NOT\s+EXISTS\s+)?[\"`\[]?{re.escape(n)}\b",
                schema, re.IGNORECASE)])
            raise
        for parent in set(_outside_references(scratch, declared)):  # the user's, as they are
            row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ? "
                               "COLLATE NOCASE", (parent,)).fetchone()
            if row is not None:
                scratch.execute(row[0])
        scratch_shapes = {n: scratch.execute(f"PRAGMA table_xinfo({_quote(n)})").fetchall()
                          for n in declared}
        scratch_aspects = {n: [read(scratch, n) for _, read in _TABLE_ASPECTS] for n in declared}
        scratch_indexes = {i: _index_shape(scratch, i) for (i,) in scratch.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}
    finally:
        scratch.close()
    # SQLite's names are case-insensitive: the schema's "Users" is the file's "users".
    existing_names = {n.lower() for n in existing}
    adopted = [n for n in declared if n.lower() in existing_names]
    _check_existing_rules(conn, adopted)
    for name in adopted:
        _check_adoptable(conn, name, _columns_as_declared(scratch_shapes[name]),
                         _columns_as_declared(conn.execute(f"PRAGMA table_xinfo({_quote(name)})")))
        for (aspect, read), want in zip(_TABLE_ASPECTS, scratch_aspects[name]):
            have = read(conn, name)
            if have != want:
                raise SchemaError(
                    f"Existing table {name!r} has {aspect} {sorted(have) or 'none'} but the "
                    f"schema declares {sorted(want) or 'none'}; a replay would create the "
                    f"schema's table. Make the schema describe the table as it is."
                )
    for index, shape in scratch_indexes.items():  # the schema's CREATE INDEX, already there
        have = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ? "
                            "COLLATE NOCASE", (index,)).fetchone()
        if have is not None and _index_shape(conn, index) != shape:
            raise SchemaError(
                f"Existing index {index!r} is not the one the schema declares (its columns, "
                f"UNIQUE or WHERE differ); a replay would create the schema's. Make the "
                f"schema describe it as it is, or drop it first."
            )
    declared_indexes = {i.lower() for i in scratch_indexes}
    for name in adopted:  # an index the schema lacks: replay would not make it, rebuild drops it
        extra = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT "
                             "NULL AND tbl_name = ? COLLATE NOCASE", (name,)).fetchall()
        extra = [i for (i,) in extra if i.lower() not in declared_indexes]
        if extra:
            raise SchemaError(
                f"Existing table {name!r} has index(es) {', '.join(map(repr, extra))} that the "
                f"schema does not declare; a replay would not create them and a rebuild "
                f"would drop them (with the constraint a UNIQUE one enforces). Add them to "
                f"the schema, or drop them first."
            )
    for statement in _schema_statements(schema):
        try:
            conn.execute(statement)
        except sqlite3.OperationalError as exc:
            if "already exists" not in str(exc):
                raise SchemaError(f"Schema statement failed: {exc}: {statement[:200]!r}") from exc
    sql_of = {n.lower(): sql for n, sql in conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table'")}
    for name in declared:
        if name.lower() not in sql_of:  # a view (or the like) holds the name
            kind = conn.execute("SELECT type FROM sqlite_master WHERE name = ? COLLATE NOCASE",
                                (name,)).fetchone()
            raise SchemaError(
                f"The schema's table {name!r} cannot be made: the database has a "
                f"{kind[0] if kind else 'object'} of that name. Rename one of them."
            )
    for name in declared:
        _check_new_table(conn, name, sql_of[name.lower()])
    ts = _utc_text(_clock_utc(clock))  # checked as a dispatch's: a naive one is not local time
    for name in adopted:  # an emptied table's counter counts too
        if conn.execute(f"SELECT 1 FROM {_quote(name)} LIMIT 1").fetchone() is None:
            _check_autoincrement_counter(conn, _read_table_info(conn, name), [])
    for seq, name in enumerate((n for n in _parents_first(conn, adopted) if conn.execute(
            f"SELECT 1 FROM {_quote(n)} LIMIT 1").fetchone()), 1):
        info = _read_table_info(conn, name)
        listed = ", ".join(_quote(c) for c in info.columns)
        cursor = conn.execute(f"SELECT {listed} FROM {info.q} ORDER BY {info.order_by}")
        # The journal keeps whole rows, as a live insert's does; the payload only what
        # an insert gives (generated columns are SQLite's to compute again).
        try:
            whole = [dict(zip(info.columns, r)) for r in cursor]
        except sqlite3.OperationalError as exc:
            if not str(exc).startswith("Could not decode to UTF-8"):
                raise
            raise SchemaError(  # written by a tool that does not check its text
                f"Cannot adopt table {name!r}: a row holds text that is not valid UTF-8 "
                f"({exc}); read-model values are None, bool, int, float or str. Nothing "
                f"was changed. Fix that column's text (or keep such bytes as hex()), "
                f"then adopt."
            ) from None
        rows = [{c: row[c] for c in info.writable_columns} for row in whole]
        for row in whole:
            for column, value in row.items():
                try:
                    _check_value(value, name, column)
                except ChangesetError as exc:
                    raise SchemaError(f"Cannot adopt table {name!r}: {exc}") from None
            if any(row[c] is None for c in info.pk):
                raise SchemaError(
                    f"Cannot adopt table {name!r}: a row has NULL in its primary key "
                    f"{info.pk} ({row}); fluxlite finds rows by key. Give those rows a "
                    f"key, or delete them, before adopting."
                )
        _check_autoincrement_counter(conn, info, rows)
        payload = _dumps({"table": name, "rows": rows})
        try:
            conn.execute(f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                         (seq, ids(), BASELINE, payload, "{}", ts))
            conn.executemany(
                "INSERT INTO fluxlite_journal VALUES (?, ?, ?, ?, 'insert', NULL, ?)",
                [(seq, n, name, _dumps(_key_json(info.key_of(row))), _dumps(row))
                 for n, row in enumerate(whole)])
        except sqlite3.DataError as exc:  # "string or blob too big": not "not a store"
            raise SchemaError(
                f"Cannot adopt table {name!r}: its {len(rows)} rows are one baseline event "
                f"of {len(payload)} characters of JSON, past the {_length_limit(conn)} bytes "
                f"SQLite stores in one value ({exc}). Nothing was changed. Adopt the table "
                f"with fewer rows, and dispatch events that insert the rest."
            ) from exc
    _check_baselines_replay(conn, schema, declared)
    _seal_unsealed(conn)
    return declared


def _check_existing_rules(conn: sqlite3.Connection, names: Iterable[str]) -> None:
    """An existing table that breaks a rule of the read model (a cascading
    reference, a per-run default, no primary key): the schema cannot both follow
    the rule and describe the table as it is, and each refusal alone sent the user
    to the other. SQLite changes neither in place: the table must be made again."""
    for name in names:
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ? "
                           "COLLATE NOCASE", (name,)).fetchone()[0]
        try:
            _check_new_table(conn, name, sql)
        except SchemaError as exc:
            raise SchemaError(
                f"Cannot adopt table {name!r} as it is: {exc} Nothing was changed. "
                f"SQLite cannot change this in an existing table: make the table again "
                f"as the rule asks (create it under a new name, copy the rows, drop the "
                f"old one, rename the new one: https://sqlite.org/lang_altertable.html"
                f"#otheralter), declare it so in the schema, then adopt."
            ) from None


def _parents_first(conn: sqlite3.Connection, names: List[str]) -> List[str]:
    """``names`` (in name order) ordered for an adoption's baselines: a table after
    the tables its foreign keys reference, so that every prefix of the baselines
    (at(k), replay(k)) has the rows its rows reference. Tables in a reference cycle
    cannot be: they keep name order among themselves; a self-reference is no edge."""
    by_lower = {n.lower(): n for n in names}
    parents = {n: {by_lower[r[2].lower()] for r in conn.execute(
        f"PRAGMA foreign_key_list({_quote(n)})") if r[2].lower() in by_lower} - {n}
        for n in names}
    reach: Dict[str, Set[str]] = {}
    for name in names:  # every table each one depends on, directly or not
        seen: Set[str] = set()
        stack = list(parents[name])
        while stack:
            parent = stack.pop()
            if parent not in seen:
                seen.add(parent)
                stack.extend(parents[parent])
        reach[name] = seen
    cycle = {n: {m for m in reach[n] if n in reach[m]} | {n} for n in names}
    ordered: List[str] = []
    placed: Set[str] = set()
    while len(ordered) < len(names):  # the first table (by name) whose parents are in,
        name = next(n for n in names if n not in placed and all(  # those of its cycle too
            parents[m] - cycle[n] <= placed for m in cycle[n]))
        group = [n for n in names if n in cycle[name]]  # itself, or its whole cycle
        ordered.extend(group)
        placed.update(group)
    return ordered


def _check_baselines_replay(conn: sqlite3.Connection, schema: str, declared: List[str]) -> None:
    """Replay the baselines just written into the schema's own tables, and compare:
    what the columns do not show (CHECK, COLLATE, a generated column's formula,
    STRICT, references to rows that are not there) is found here, before the
    store exists, instead of by the first verify() or rebuild()."""
    broken = _first_broken_reference(conn, {n.lower() for n in declared})
    if broken is not None:
        raise SchemaError(
            f"Cannot adopt table {broken[0]!r}: its row {broken[1]} references "
            f"{broken[2]!r} where no row has that key. Fix or delete the row before "
            f"adopting."
        )
    events = (_event_from_row(r) for r in conn.execute(  # a table at a time, not all at once
        f"SELECT {_EVENT_COLUMNS} FROM events ORDER BY seq"))
    replica = _scratch_model(schema, "", journal=False, new_schema=False)
    try:
        _apply_events(replica, lambda view, event: None, events, journal=False)
        live = _Model(conn, _table_infos(conn, declared), threading.RLock())
        problems = _compare(live, replica)
    except FluxliteError as exc:
        problems = [str(exc)]
    finally:
        replica.conn.close()
    if problems:
        raise SchemaError(
            "Cannot adopt: a replay of the adopted rows into the schema's tables does not "
            "give the tables as they are, so replay would never equal live. Make the schema "
            "describe the tables exactly (CHECK, COLLATE, generated columns, STRICT). "
            "Differences: " + "; ".join(problems[:5])
        )


def _columns_as_declared(xinfo: Iterable[Sequence[Any]]) -> List[Tuple[Any, ...]]:
    """PRAGMA table_xinfo rows without cid, for display: name, type, NOT NULL,
    default, position in the key, generated."""
    return [(r[1], r[2].upper(), r[3], r[4], r[5], r[6]) for r in xinfo]


def _table_features(conn: sqlite3.Connection, name: str) -> Set[str]:
    """The table options that change how rows are stored or keyed."""
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ? "
                       "COLLATE NOCASE", (name,)).fetchone()[0]
    code = "".join(_sql_code(sql, literals=False)).upper()
    tail = code[code.rfind(")") + 1:]  # table options come after the column list
    deferred = len(re.findall(r"(?<!NOT)DEFERRABLE\s*INITIALLY\s*DEFERRED", code))
    return ({"AUTOINCREMENT"} & {w for w in re.findall(r"[A-Z_]+", code)}) | \
        {option for option in ("STRICT", "WITHOUT ROWID")
         if re.search(option.replace(" ", r"\s*"), tail)} | \
        ({f"{deferred} reference(s) DEFERRABLE INITIALLY DEFERRED"} if deferred else set())


def _references(conn: sqlite3.Connection, name: str) -> Set[Tuple[Any, ...]]:
    """A table's foreign keys: (columns, parent table, parent columns, actions)."""
    keys: Dict[int, List[Any]] = {}
    for fk in conn.execute(f"PRAGMA foreign_key_list({_quote(name)})"):
        keys.setdefault(fk[0], []).append(fk)
    return {(tuple(r[3].lower() for r in rows), rows[0][2].lower(),
             _referenced_columns(conn, rows), rows[0][5], rows[0][6]) for rows in keys.values()}


def _referenced_columns(conn: sqlite3.Connection, rows: List[Any]) -> Any:
    """REFERENCES p and REFERENCES p(<p's key>) are one reference, whether or not p
    is there to look its key up in: both are "the key"."""
    if rows[0][4] is None:
        return "the key"
    named = tuple(r[4].lower() for r in rows)
    return "the key" if named == _primary_key(conn, rows[0][2]) else named


def _primary_key(conn: sqlite3.Connection, table: str) -> Tuple[str, ...]:
    columns = sorted((r[5], r[1].lower()) for r in conn.execute(
        f"PRAGMA table_info({_quote(table)})") if r[5])
    return tuple(c for _, c in columns)


def _index_shape(conn: sqlite3.Connection, index: str) -> Tuple[Any, ...]:
    """An index as it sorts and constrains: UNIQUE or not, and its table, columns or
    expressions and WHERE, as code (case and spacing outside literals aside)."""
    sql, table = conn.execute("SELECT sql, tbl_name FROM sqlite_master WHERE type = 'index' "
                              "AND name = ? COLLATE NOCASE", (index,)).fetchone()
    tokens = [t if t[0] in "'\"" else t.upper() for t in _sql_code(sql) if t != " "]
    on = tokens.index("ON") if "ON" in tokens else 0  # CREATE [UNIQUE] INDEX name ON ...
    where = tokens.index("WHERE") if "WHERE" in tokens else len(tokens)
    keys = tuple((r[2] and r[2].lower(), r[3], r[4].upper()) for r in conn.execute(
        f"PRAGMA index_xinfo({_quote(index)})") if r[5])  # quoting, ASC, BINARY: as SQLite reads
    expressions = "".join(tokens[on + 1:where]) if any(k[0] is None for k in keys) else ""
    return ("UNIQUE" in tokens[:on], table.lower(), keys, expressions, "".join(tokens[where:]))


def _inline_unique(conn: sqlite3.Connection, name: str) -> Set[Tuple[str, ...]]:
    """The column sets of a table's own UNIQUE constraints (not CREATE INDEX ones,
    which adopting runs from the schema anyway)."""
    return {tuple(r[2].lower() for r in conn.execute(f"PRAGMA index_info({_quote(index[1])})"))
            for index in conn.execute(f"PRAGMA index_list({_quote(name)})") if index[3] == "u"}


# What adoption compares between a table and the schema's, beyond its columns:
# (the label in the error, how to read it from a connection).
_TABLE_ASPECTS: Tuple[Tuple[str, Callable[[sqlite3.Connection, str], Set[Any]]], ...] = (
    ("the table options", _table_features), ("the references", _references),
    ("UNIQUE constraints on", _inline_unique),
    ("its key as the rowid:", lambda conn, name: {_read_table_info(conn, name).rowid_key}))


def _storing_alike(columns: List[Tuple[Any, ...]]) -> List[Tuple[Any, ...]]:
    """What decides how a column stores values: its name (as spelled: rows are
    dicts), affinity (INT is INTEGER, except for the key that is the rowid),
    NOT NULL, the default with whitespace outside literals dropped, its place in
    the key, and whether it is generated."""
    keys = [c for c in columns if c[4]]
    rowid = keys if len(keys) == 1 else []
    alias = [c for c in rowid if c[1] == "INTEGER"]  # NOT NULL changes nothing there
    return [(c[0], "integer" if _affinity(c[1]) == "numeric" else _affinity(c[1]),
             c in alias, c[2] and c not in alias,
             None if c[3] is None else _default_as_code(c[3]),
             c[4], c[5]) for c in columns]


_DEFAULT_CASELESS = re.compile(  # keywords and numbers: their case does not matter
    r"NULL|TRUE|FALSE|CURRENT_(?:DATE|TIME|TIMESTAMP)|\.?\d[\w.]*", re.I)


def _default_as_code(text: str) -> str:
    """A column default for comparing: spacing outside literals and the case of
    keywords, numbers and function names do not count; a bare word's does (SQLite
    takes DEFAULT Open as the text 'Open')."""
    tokens = [t for t in _sql_code(text) if t != " "]
    out = []
    for i, t in enumerate(tokens):
        following = tokens[i + 1] if i + 1 < len(tokens) else ""
        if t[0] in "'\"`[":
            out.append(t)
        elif following == "(" or _DEFAULT_CASELESS.fullmatch(t):  # a call, a keyword, a number
            out.append(t.upper())
        elif t in "xX" and following[:1] == "'":  # x'00' is a blob; a lone x, the text 'x'
            out.append("X")
        else:
            out.append(t)
    return "".join(out)



def _check_adoptable(conn: sqlite3.Connection, name: str, declared: List[Tuple[Any, ...]],
                     have: List[Tuple[Any, ...]]) -> None:
    """An adopted table must be what the schema says, and only fluxlite may write it:
    otherwise a replay (which creates the table from the schema) differs from it."""
    if _storing_alike(declared) != _storing_alike(have):
        def show(cols: Iterable[Sequence[Any]]) -> str:
            return ", ".join(
                f"{c[0]} {c[1]}".strip() + (" PRIMARY KEY" if c[4] else "") +
                (" NOT NULL" if c[2] else "") +
                (f" DEFAULT {c[3]}" if c[3] is not None else "") + (" GENERATED" if c[5] else "")
                for c in cols)

        raise SchemaError(
            f"Existing table {name!r} has columns ({show(have)}) but the schema declares "
            f"({show(declared)}); a replay would create the schema's table. Make the "
            f"schema describe the table as it is (same names, types, NOT NULL, defaults "
            f"and primary key)."
        )
    trigger = conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND "
                           "tbl_name = ? COLLATE NOCASE", (name,)).fetchone()
    if trigger is not None:
        raise SchemaError(
            f"Cannot adopt table {name!r}: trigger {trigger[0]!r} writes when it is "
            f"written, which a replay would not repeat. Drop the trigger and do its "
            f"work in a reducer."
        )


def _check_autoincrement_counter(conn: sqlite3.Connection, info: _TableInfo,
                                 rows: List[Dict[str, Any]]) -> None:
    if not info.rowid_key or conn.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").fetchone() is None:
        return
    counter = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ? COLLATE NOCASE",
                           (info.name,)).fetchone()
    largest = max((row[info.pk[0]] for row in rows), default=0)
    if counter is not None and counter[0] > largest:
        raise SchemaError(
            f"Cannot adopt table {info.name!r}: its AUTOINCREMENT counter is {counter[0]}, "
            f"past its largest key {largest} (rows were deleted), and a replay of the "
            f"baseline would hand out those keys again. To allow that, run UPDATE "
            f"sqlite_sequence SET seq = {largest} WHERE name = '{info.name}' first."
        )


@dataclasses.dataclass(frozen=True)
class App:
    """An application's store, described once: schema, reducer, middleware, version, upcasters.

    The one way to describe an application, to Python (``fluxlite.open(path,
    app=APP)`` or ``APP.open(path)``) and to the command line (``--app
    myapp:APP``).
    """

    schema: str
    reducer: Union[Reducer, Mapping[str, CollectionReducer]]
    middleware: Sequence[Middleware] = ()
    version: Any = None
    upcasters: Optional[Mapping[str, Upcaster]] = None

    # open()'s keywords that an App leaves to the caller, spelled out (not **options)
    # so that a type checker finds a misspelt one (durabilty="normal").
    def open(self, path: Union[str, "os.PathLike[str]"], *, durability: str = "full",
             adopt: bool = False, clock: Optional[Callable[[], datetime]] = None,
             ids: Optional[Callable[[], str]] = None, readonly: bool = False) -> "Store":
        """Open (or create) a store of this application: fluxlite.open(path, app=self, ...).

        ``durability``, ``adopt``, ``clock``, ``ids`` and ``readonly`` are open()'s."""
        return open(path, app=self, durability=durability, adopt=adopt, clock=clock, ids=ids,
                    readonly=readonly)


def _check_sqlite_version() -> None:
    if sqlite3.sqlite_version_info < _MIN_SQLITE:
        raise UsageError(
            f"fluxlite needs SQLite {'.'.join(map(str, _MIN_SQLITE))} or newer; this Python's "
            f"sqlite3 links SQLite {sqlite3.sqlite_version}, on which it cannot read a "
            f"table's columns (PRAGMA table_xinfo). Run a Python whose sqlite3 links a newer "
            f"SQLite (python.org's installers bundle one; python -c \"import sqlite3; "
            f"print(sqlite3.sqlite_version)\" tells which)."
        )


def open(path: Union[str, "os.PathLike[str]"], *, schema: Optional[str] = None,
         reducer: Union[None, Reducer, Mapping[str, CollectionReducer]] = None,
         middleware: Sequence[Middleware] = (), durability: str = "full",
         version: Any = None, upcasters: Optional[Mapping[str, Upcaster]] = None,
         adopt: bool = False, clock: Optional[Callable[[], datetime]] = None,
         ids: Optional[Callable[[], str]] = None, app: Optional[App] = None,
         readonly: bool = False) -> Store:
    """Open (or create) a store.

    ``path`` is a file path or ":memory:". A missing or empty file becomes a
    new store with ``schema`` (CREATE TABLE / CREATE INDEX statements).
    ``reducer`` is ``(view, event) -> changeset`` or a dict of table name ->
    ``(table, event) -> changeset`` (see combine); without it the store is
    read-only. ``middleware`` is applied first-to-last, outermost first.
    ``durability`` is "full" (fsync at every commit: nothing acknowledged is
    lost, even on power failure) or "normal" (WAL with synchronous=NORMAL:
    faster; a power failure or OS crash may lose the last commits, a process
    crash loses nothing; a background thread checkpoints the WAL, bounded by a
    4 MB ceiling, somewhat more under load: see README, SQLite settings).

    ``version`` (any JSON value; None means unchanged) and ``schema``: when
    either differs from what the file holds, the read model is rebuilt by
    replaying the log with this reducer into the new schema, swapped in one
    transaction. ``upcasters`` maps an event type to ``f(event) -> event``
    that upgrades old event shapes whenever events are read. ``adopt=True``
    takes over an existing SQLite database: its tables named in the schema
    keep their rows, recorded as ``fluxlite.baseline`` events. ``clock`` and
    ``ids`` replace the time and id sources (for reproducible tests).

    ``app`` (an App) gives schema, reducer, middleware, version and upcasters
    in one object. ``readonly=True`` opens an existing file through a
    connection that cannot write (for inspection, also while others write).
    """
    if app is not None:
        if not isinstance(app, App):
            raise UsageError(f"app must be a fluxlite.App; received {_describe(app)}.")
        given = [n for n, v in (("schema", schema), ("reducer", reducer), ("version", version),
                                ("upcasters", upcasters), ("middleware", middleware))
                 if v is not None and not (isinstance(v, (list, tuple, dict)) and not v)]
        # (0 and "" are given; an empty list of middleware or dict of upcasters is not)
        if given:
            raise UsageError(f"Pass either app= or {', '.join(given)}, not both.")
        schema, reducer, middleware = app.schema, app.reducer, app.middleware
        version, upcasters = app.version, app.upcasters
    _check_sqlite_version()
    path = _path_argument(path, "path")
    if schema is not None:  # also for a file that exists, where it is compared, not run
        # A NUL is refused before a file is made; for an existing file, only one SQLite
        # would read: a store made before that rule, with one in a comment after its
        # last statement (never run), opens with its own schema.
        _check_schema_text(schema, new=not os.path.isfile(path))
    for name, flag in (("adopt", adopt), ("readonly", readonly)):
        if not isinstance(flag, bool):  # "no" would be true
            raise UsageError(f"{name} must be True or False; received {_describe(flag)}.")
    if not isinstance(durability, str) or durability not in _DURABILITY:
        raise UsageError(
            f"durability must be 'full' or 'normal'; received {_describe(durability)}."
        )
    _check_sources(clock, ids)
    if isinstance(reducer, _Mapping):
        reducer = combine(reducer)
    if reducer is not None and not callable(reducer):
        raise UsageError(
            f"reducer must be a function (view, event) -> changeset or a dict of "
            f"table -> function; received {_describe(reducer)}."
        )
    if reducer is not None and not getattr(reducer, "fluxlite_tables", None):
        _check_takes_two(reducer, "The reducer", "(view, event)")
    # A one-shot iterator (a generator) would be used up by the checks below, and
    # the store would open with no middleware at all: an authorize() in it silently
    # gone (and an App holding one would lose it at its second open). Refused.
    if isinstance(middleware, collections.abc.Iterator) and not callable(middleware):
        raise UsageError(
            f"middleware must be a list (or tuple) of functions; received "
            f"{_describe(middleware)}, which can be read only once: the store would open "
            f"with none of them. Pass list(...) of it, e.g. middleware=[logger]."
        )
    # A set has no order, and the first middleware is the outermost: refused too.
    if isinstance(middleware, (_Mapping, str, collections.abc.Set)) or callable(middleware) \
            or not isinstance(middleware, collections.abc.Iterable):
        raise UsageError(
            f"middleware must be a list of functions store -> next -> event -> result, "
            f"outermost first; received {_describe(middleware)}. Pass a list, e.g. "
            f"middleware=[logger]."
        )
    for i, m in enumerate(middleware):
        if not callable(m):
            raise UsageError(
                f"Each middleware must be a function store -> next -> event -> result; "
                f"item {i} of middleware= is {_describe(m)}. Pass the functions "
                f"themselves, e.g. middleware=[logger]."
            )
    for m in middleware:
        _check_takes(m, 1, "A middleware", "(store)", "middleware",
                     " that returns wrap(next), which returns handle(event)")
    version = _json_version(version)  # kept as stored, as payloads are: (1, 2) is [1, 2]
    _make_upcaster(upcasters)  # validates the dict early
    foreign = None if readonly else _foreign_database(path, adopt)
    if foreign is not None and not adopt:
        raise _not_a_store(path, foreign[0])
    if foreign is not None:
        _check_adoptable_names(path, foreign[0])
    if schema is None and not readonly and path != ":memory:" and not os.path.exists(path):
        raise SchemaError(  # refused before the file is made: no file to remove again
            f"{path!r} does not exist: a new store needs a schema; pass schema= with the "
            f"CREATE TABLE statements of the read model (or check the path, if the store "
            f"should be there already)."
        )
    conn = _connect(path, durability, readonly)
    try:
        return _open_connection(conn, path, schema=schema, reducer=reducer,
                                middleware=middleware, durability=durability, version=version,
                                upcasters=upcasters, adopt=adopt, clock=clock or _utc_now,
                                ids=_checked_ids(ids) if ids else _new_id, readonly=readonly)
    except BaseException:
        if foreign is not None and foreign[1] != "wal":  # adoption refused: as it was
            with contextlib.suppress(sqlite3.Error):
                restore = sqlite3.connect(path, isolation_level=None)
                try:
                    restore.execute(f"PRAGMA journal_mode={foreign[1]}")
                finally:
                    restore.close()
        raise


def _path_argument(path: Any, name: str) -> str:
    """open()'s and fork()'s path: a str (or os.PathLike of one) naming a file, checked."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise UsageError(f"{name} must be a str path or ':memory:'; received {_describe(path)}.")
    text: str = os.fspath(path)
    _check_path(text)
    return text


def _check_path(path: str) -> None:
    if "\0" in path:  # else os and sqlite3 each fail with their own ValueError
        raise UsageError(f"path {path!r} contains a NUL character, which no file name "
                         f"may hold; check how the path was built.")
    try:  # a name from os.listdir() of non-UTF-8 bytes (surrogate escapes) is fine
        os.fsencode(path)
    except UnicodeEncodeError as exc:
        raise UsageError(f"path {_quoted(path)} cannot be a file name: it holds a lone "
                         f"surrogate at character {exc.start}, which the file system's "
                         f"encoding cannot write; check how the path was built.") from None
    if path.startswith("file:"):
        raise _uri_refused(path)
    if path == "" or os.path.isdir(path):
        raise UsageError(f"path must name a file (or be ':memory:'); {_quoted(path)} is "
                         f"{'a directory' if path else 'empty'}.")
    if path == ":memory:":
        return
    kind = _special_file_kind(path)
    if kind:  # SQLite fails on one with a bare "disk I/O error", or waits on a FIFO's writer
        raise UsageError(f"path must name a regular file (or be ':memory:'); {_quoted(path)} "
                         f"is {kind}, which cannot hold a store. Pass the path of a store file.")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise _missing_directory(path, directory)
    _check_name_length(path, directory)


def _uri_refused(path: str) -> UsageError:
    """A path that SQLite (built with SQLITE_USE_URI, as Debian's and Homebrew's are)
    reads as a URI even without uri=True: it would open another file than the one
    fluxlite checks, creates and names, e.g. notes.db for "file:notes.db"."""
    meant = urllib.parse.unquote(urllib.parse.urlsplit(path).path) or "notes.db"
    return UsageError(
        f"path {_quoted(path)} begins with 'file:', which SQLite reads as a URI; fluxlite "
        f"takes a plain file path (or ':memory:'). Pass the file's path, such as "
        f"{_quoted(meant)} (or put './' before it, for a file whose name begins with 'file:')."
    )


def _special_file_kind(path: str) -> Optional[str]:
    """What a path names that is neither missing nor a regular file (nor a directory)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # missing, a dangling link: a new file, checked on creation
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _missing_directory(path: str, directory: str) -> UsageError:
    if os.path.exists(directory):  # a regular file where the directory should be
        return UsageError(f"The directory of {_quoted(path)}, {_quoted(directory)}, is a file, "
                          f"not a directory; check the path.")
    # Not expanded, as by Python's open() and sqlite3: a "~" from a config file or a
    # quoted shell argument is a directory named "~".
    hint = (f" '~' is not expanded: pass os.path.expanduser(path), here "
            f"{_quoted(os.path.expanduser(path))}." if path.startswith("~") else "")
    return UsageError(f"The directory of {_quoted(path)} does not exist; create it first.{hint}")


def _check_name_length(path: str, directory: str) -> None:
    """SQLite keeps files beside a store, named after it: "-journal" (while it makes a new
    one), "-wal" and "-shm". A name the file system takes with no room for the longest
    suffix made an empty file that SQLite then could not open. An existing store needs
    only "-wal" and "-shm" (a store renamed to a longer name opens): not refused. The
    file system answers, not PC_NAME_MAX: that is -1 where there is no limit, and
    counts characters, not bytes, on some (vfat, HFS+)."""
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        return
    try:
        os.lstat(path + "-journal")
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise _name_too_long(path, directory) from None
    except ValueError:
        pass


def _name_too_long(path: str, directory: str) -> UsageError:
    length = len(os.fsencode(os.path.basename(path)))
    try:
        limit = os.pathconf(directory, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # Windows has no pathconf
        limit = -1
    if limit <= len("-journal") or length + len("-journal") <= limit:  # the whole path, then
        return UsageError(
            f"The path {_quoted(path)} is too long for this file system once SQLite adds "
            f"'-journal' to it for a file it keeps beside the store. Pass a shorter path.")
    return UsageError(
        f"The file name of {_quoted(path)} is {length} bytes long; this file system takes "
        f"names of at most {limit}, and SQLite adds '-journal' to it for a file it keeps "
        f"beside the store. Pass a name of at most {limit - len('-journal')} bytes."
    )


def _checked_ids(ids: Callable[[], Any]) -> Callable[[], str]:
    """The user's id source, each id checked as a given id is."""
    def checked() -> str:
        value = ids()
        if not isinstance(value, str) or not value.strip():
            raise UsageError(f"ids() must return a non-empty string; it returned "
                             f"{_describe(value)}.")
        _check_text(value, "An id from ids()", UsageError)
        return value
    return checked


def _open_connection(conn: sqlite3.Connection, path: str, *, schema: Optional[str],
                     reducer: Optional[Reducer], middleware: Sequence[Middleware],
                     durability: str, version: Any, upcasters: Optional[Mapping[str, Upcaster]],
                     adopt: bool, clock: Callable[[], datetime], ids: Callable[[], str],
                     readonly: bool = False, new_schema: bool = True) -> Store:
    """The rest of open(), on a connection already made (also used by fork and
    replay; ``new_schema=False``: the schema is a store's own, already accepted)."""
    try:
        try:
            with (_read_txn(conn) if readonly else _write_txn(conn)):
                if readonly:
                    meta = _read_existing_meta(conn, path)
                else:
                    meta = _initialise(conn, path, schema, version, adopt, clock, ids,
                                       new_schema)
                _check_finished(meta, path)
                if not readonly and reducer is not None:  # a store that can dispatch
                    _check_no_triggers(conn, path, meta["tables"])
                    _check_no_log_triggers(conn, path)
                tables = _table_infos(conn, meta["tables"])
                wanted_schema = meta["schema"] if schema is None else schema
                new_version = meta.get("version") if version is None else version
                rebuilding = not _same_code(wanted_schema, new_version, meta["schema"],
                                            meta.get("version"))
                if not rebuilding:  # refused inside the transaction: a new file stays empty
                    _check_reducer_tables(reducer, meta["tables"])
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            if isinstance(exc, sqlite3.DatabaseError) and _is_storage_problem(exc):
                raise _storage_error(exc, path) from exc
            raise SchemaError(
                f"{path!r} could not be read as a fluxlite store: {exc}."
            ) from exc
        store = Store(conn, path, tables, reducer, meta["schema"], durability=durability,
                      clock=clock, ids=ids, version=meta.get("version"),
                      generation=meta.get("generation", 0), upcasters=upcasters,
                      middleware=middleware, readonly_file=readonly)
        if rebuilding:
            if readonly:
                raise _readonly_rebuild(path, meta.get("version"), new_version)
            if reducer is None:
                raise SchemaError(
                    f"The schema or version passed to open() differs from {path!r}'s; "
                    f"rebuilding the read model needs the reducer: pass reducer=."
                )
            _rebuild_on_open(store, meta, wanted_schema, new_version)
        store._chain = _compose_chain(store, list(middleware))
        store._bare = not middleware
        store._reads_any_code = schema is None and version is None and reducer is None
    except BaseException:
        conn.close()
        raise
    return store


def _readonly_rebuild(path: str, version: Any, wanted: Any) -> SchemaError:
    other = ("schema" if _same_json(version, wanted) else
             f"version ({_quoted(wanted)}; the file's is {_quoted(version)})")
    return SchemaError(
        f"open({path!r}, readonly=True) was given another {other} than the file's; a "
        f"read-only store cannot rebuild its read model. Open it writable to rebuild, or "
        f"leave out schema= and version= to read the file as it is."
    )


def _rebuild_on_open(store: Store, meta: Dict[str, Any], schema: str, version: Any) -> None:
    """open()'s rebuild to the code it was given, said in the log (a deployment's
    processes rebuilding the file back and forth show there), and named in its error:
    a reducer's error alone does not tell that opening the store rebuilt it."""
    theirs = meta.get("version")
    older = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                for v in (theirs, version)) and version < theirs
    _log.log(logging.WARNING if older else logging.INFO,
             "open() is rebuilding the read model of %r from version %r to %s%r%s", store._path,
             theirs, "the OLDER version " if older else "version ", version,
             ": processes running the file's code will refuse to dispatch until reopened "
             "with this code" if older else "")
    target = f"version {version!r}" if not _same_json(theirs, version) else "another schema"
    try:
        _rebuild(store, schema, version)  # checks the reducer's tables
    except FluxliteError as exc:
        # The message amended in place: the type, __cause__ and traceback stay.
        exc.args = (f"{exc.args[0] if exc.args else exc} [open() was rebuilding the read "
                    f"model of {store._path!r} from version {theirs!r} to the code it was "
                    f"given ({target}); it changed nothing in the file, "
                    f"{_model_now(store, meta)}. If that code is older than the file's, "
                    f"open the file with the code that built it.]",) + exc.args[1:]
        raise


def _model_now(store: Store, meta: Dict[str, Any]) -> str:
    """Which code's model the file holds after open()'s rebuild failed: still the one
    it began from, unless another process rebuilt it meanwhile (the likely failure then:
    said so, not "still", which the error's own message would contradict)."""
    try:
        with store._lock:
            now = _read_meta(store._conn)
    except (sqlite3.Error, FluxliteError, KeyError, ValueError):
        return f"whose model was the one of version {meta.get('version')!r}"
    if _same_code(now["schema"], now.get("version"), meta["schema"], meta.get("version")):
        return f"whose model is still the one of version {meta.get('version')!r}"
    return (f"whose model another process has since rebuilt (to version "
            f"{now.get('version')!r})")


###############################################################################
# 13. Testing helpers: scenario (given / when / then)
###############################################################################


# What then_rejected() accepts without error=: the ways an application refuses an event.
_REFUSALS = (Rejected, Forbidden, InvalidEvent)


def _check_scenario_event(item: Any) -> None:
    if not (isinstance(item, (_Mapping, str)) or
            isinstance(item, tuple) and len(item) in (2, 3) and isinstance(item[0], str)):
        raise UsageError(
            f"A scenario event is a dict (type, payload, ...), a (type, payload) pair, a "
            f"(type, payload, meta) triple or a type string; received {_describe(item)}."
        )


def _as_action(item: Any) -> Dict[str, Any]:
    """An event for a scenario: a dict, a (type, payload[, meta]) tuple, or a bare type."""
    _check_scenario_event(item)
    if isinstance(item, _Mapping):
        return _action_from(item, None, None, None, None)
    if isinstance(item, tuple):
        return _action_from(item[0], item[1], item[2] if len(item) == 3 else None, None, None)
    return _action_from(item, None, None, None, None)


def _refused_by_fluxlite(item: Any) -> bool:
    """A scenario's event that fluxlite's own check of events refuses (its keys, type,
    id, meta, a payload that is not JSON), whatever the middleware and reducer."""
    try:
        _prepare(_as_action(item), lambda: "event")  # (not the scenario's ids: none taken)
    except InvalidEvent:
        return True
    except Exception:  # anything else: when()'s dispatch meets it and reports it
        return False
    return False


def _as_change(item: Any) -> Change:
    if isinstance(item, Change):
        return item
    if isinstance(item, _Mapping):
        return Change(item.get("op"), item.get("table"), item.get("key"),  # type: ignore[arg-type]
                      item.get("values"))
    raise UsageError(f"Expected changes are Change objects or dicts; received {_describe(item)}.")


def _diff_changes(expected: List[Change], actual: List[Change]) -> List[str]:
    """Op by op, field by field."""
    lines = []
    for number in range(max(len(expected), len(actual))):
        want = expected[number] if number < len(expected) else None
        got = actual[number] if number < len(actual) else None
        if want == got:
            continue
        if want is None or got is None:
            # Not "expected None": the lists differ in length, which is what to say.
            counted = f"the reducer returned {len(actual)} changes, {len(expected)} expected"
            lines.append(f"  change {number + 1}: not expected, got {got} ({counted})"
                         if want is None else
                         f"  change {number + 1}: expected {want}, missing ({counted})")
            continue
        lines.append(f"  change {number + 1} ({got.op} on {got.table!r} key {got.key!r}):")
        for field in ("op", "table", "key"):
            if getattr(want, field) != getattr(got, field):
                lines.append(f"    {field}: expected {getattr(want, field)!r}, "
                             f"got {getattr(got, field)!r}"
                             + (" (the reducer returned it as built by insert()/upsert(), "
                                "whose key is in its values: expect key None)"
                                if field == "key" and got.key is None
                                and got.op in ("insert", "upsert") else ""))
        wv, gv = dict(want.values or {}), dict(got.values or {})
        for column in sorted(set(wv) | set(gv)):
            if wv.get(column, _MISSING) != gv.get(column, _MISSING):
                lines.append(f"    values[{column!r}]: expected {_shown(wv.get(column, _MISSING))}, "
                             f"got {_shown(gv.get(column, _MISSING))}")
    return lines


def _refused(error: BaseException) -> str:
    """How a scenario's event ended: a ReducerError or ChangesetError is a bug in the
    code under test, which "refused" would take for the application's rule."""
    if isinstance(error, _REFUSALS):
        return "was refused"
    if isinstance(error, (ReducerError, ChangesetError)):
        return "failed (a bug in the code under test, not a refusal)"
    return "failed"  # a Conflict (an id reused by the test), a StorageError: said by its message


def _reordered(expected: List[Change], actual: List[Change]) -> bool:
    """The same changes (matchers included), in another order."""
    left = list(actual)
    if len(left) != len(expected):
        return False
    for want in expected:
        found = next((n for n, got in enumerate(left) if not _diff_changes([want], [got])), None)
        if found is None:
            return False
        del left[found]
    return True


class Scenario:
    """Given / when / then for reducers, on an in-memory store. See scenario().

    ``store`` is that Store, for reads the then_* methods do not cover.
    """

    def __init__(self, schema: str, reducer: Union[Reducer, Mapping[str, CollectionReducer]],
                 *, upcasters: Optional[Mapping[str, Upcaster]] = None,
                 middleware: Sequence[Middleware] = ()) -> None:
        start = datetime(2000, 1, 1, tzinfo=timezone.utc)
        ticks = iter(range(1, 1 << 62))
        serial = iter(range(1, 1 << 62))
        # Not self in the closure below: the finalizer (after open()) holds the store,
        # whose reducer it is; a closure holding self would keep the scenario alive.
        self._returned_by_id: Dict[str, List[Change]] = {}
        returned = self._returned_by_id
        root = combine(reducer) if isinstance(reducer, _Mapping) else reducer
        if not callable(root):
            raise UsageError(f"scenario() needs the reducer to test, a function (view, event) "
                             f"-> changeset or a dict of them; received {_describe(reducer)}.")

        def recording(view: View, event: Event) -> Any:
            out = root(view, event)
            returned[event.id] = _normalize_changes(out, event)
            return out

        # open() checks the reducer it is given, here this wrapper: the checks it would
        # make of the reducer itself are made here, so a scenario refuses what open() does.
        tables = getattr(root, "fluxlite_tables", None)
        if tables:
            recording.fluxlite_tables = tables  # type: ignore[attr-defined]
        else:
            _check_takes_two(root, "The reducer", "(view, event)")
        self.store = open(":memory:", schema=schema, reducer=recording, upcasters=upcasters,
                          middleware=middleware,
                          clock=lambda: start + timedelta(seconds=next(ticks)),
                          ids=lambda: f"event-{next(serial)}")
        # The README's chain (scenario(...).given(...).when(...).then(...)) never
        # closes it: its connection closes when the store is collected (not the
        # scenario: a test may keep only sc.store). Left to the collector, Python
        # 3.13 warns "unclosed database", which -W error or pytest's
        # filterwarnings=error makes a failure. The finalizer holds the connection,
        # not the store, so it does not keep the store alive.
        weakref.finalize(self.store, self.store._conn.close)
        self._outcome: Optional[Tuple[Optional[Event], Optional[BaseException]]] = None
        self._head_before = 0
        self._malformed = False  # the when() event fails fluxlite's own check of events

    def given(self, *events: Any) -> "Scenario":
        """Events that already happened; each must be accepted."""
        __tracebackhide__ = True  # pytest shows the test's line and this message, not ours
        for number, item in enumerate(events, 1):
            _check_scenario_event(item)  # not a refusal to assert on: the test's mistake
            try:
                self.store.dispatch(_as_action(item))
            except FluxliteError as exc:
                raise AssertionError(f"given event {number} ({_quoted(item)}) {_refused(exc)}: "
                                     f"{type(exc).__name__}: {exc}") from exc
        return self

    def when(self, event: Any) -> "Scenario":
        """The event under test; its outcome is checked by the then_* methods."""
        self._returned_by_id.clear()
        _check_scenario_event(event)  # not a refusal to assert on: the test's mistake
        self._head_before = self.store.head  # to tell "ended" from "committed, not returned"
        self._malformed = _refused_by_fluxlite(event)
        try:
            self._outcome = (self.store.dispatch(_as_action(event)), None)
        except FluxliteError as exc:
            self._outcome = (None, exc)
        return self

    def _accepted(self) -> Event:
        __tracebackhide__ = True
        if self._outcome is None:
            raise UsageError("Call when(event) before then(...).")
        event, error = self._outcome
        if error is not None:
            raise AssertionError(f"the event {_refused(error)}: {type(error).__name__}: "
                                 f"{error}") from error
        if event is None:
            raise AssertionError("the event was " + (self._not_returned() or (
                "neither committed nor refused: a middleware returned None without "
                "calling next(event)")))
        return event

    def _not_returned(self) -> Optional[str]:
        """A None from the middleware chain although events were committed: not "ended"."""
        head = self.store.head
        if head == self._head_before:
            return None
        return (f"not returned by the middleware chain (dispatch() returned None), though the "
                f"log grew from seq {self._head_before} to {head} meanwhile: a middleware "
                f"called next(event) without returning its result (return next(event)), or "
                f"dispatched other events in its place")

    def then(self, *changes: Any) -> "Scenario":
        """The reducer returned exactly these changes (Change objects or dicts), in order."""
        __tracebackhide__ = True
        event = self._accepted()
        expected = [_as_change(c) for c in (changes[0] if len(changes) == 1 and isinstance(
            changes[0], list) else changes)]
        lines = _diff_changes(expected, self._returned_by_id.get(event.id, []))
        if lines and event.id not in self._returned_by_id and event.seq <= self._head_before:
            # Not "the reducer returned nothing": it never saw the event (a reused id).
            raise AssertionError(
                f"the reducer did not run for the event: its id {event.id!r} was already "
                f"logged as seq {event.seq}, so dispatch() returned that event and no "
                f"changes. Give the when event an id of its own (or none).")
        if lines and event.type in _BUILTIN_REDUCERS:
            # Not "the reducer returned 0 changes": fluxlite applied the event itself.
            raise AssertionError(
                f"the event is a {event.type!r} event, which fluxlite applies itself: the "
                f"reducer never sees it, so then() (which compares the reducer's changes) has "
                f"none to compare. Check the rows it wrote with then_state().")
        if lines:
            returned = self._returned_by_id.get(event.id, [])
            if _reordered(expected, returned):  # not N changes that each differ
                raise AssertionError(
                    "the reducer returned the expected changes in another order (then() "
                    "compares them in order, as they are applied):\n" + "\n".join(
                        f"  change {n}: {c.op} on {c.table!r} key {c.key!r}, values "
                        f"{c.values!r}"  # two changes of one row differ only there
                        for n, c in enumerate(returned, 1)))
            # then() compares each change whole; a test that left columns out wanted
            # then_state(), which compares only the columns it is given.
            hint = ("\n(then() compares every value of each change: give them all, or "
                    "check the resulting rows with then_state(), which compares only the "
                    "columns given)" if any("expected (absent)" in line for line in lines)
                    else "")
            raise AssertionError("the reducer's changes differ from the expected ones:\n"
                                 + "\n".join(lines) + hint)
        return self

    def then_rejected(self, match: Optional[str] = None, *,
                      error: Optional[Type[FluxliteError]] = None) -> "Scenario":
        """The event was refused: with Rejected, Forbidden (access control) or InvalidEvent
        (a validating middleware's), whose message matches ``match``, a regex; with
        ``error`` (Forbidden, say), with that class of error only. fluxlite's own refusal
        of a malformed event (a key "paylod", a payload that is not JSON) is taken only
        with ``error=InvalidEvent`` or ``match``: else a typo in the test's event passed."""
        __tracebackhide__ = True
        if self._outcome is None:
            raise UsageError("Call when(event) before then_rejected().")
        if match is not None and not isinstance(match, str):
            raise UsageError(f"then_rejected(match=...) is a regular expression (a str) or "
                             f"None; received {_describe(match)}"
                             + (f". To name the error's class, pass error={match.__name__}."
                                if isinstance(match, type) else "."))
        if error is not None and not (isinstance(error, type) and issubclass(error, FluxliteError)):
            raise UsageError(f"then_rejected(error=...) is a class of fluxlite error "
                             f"(fluxlite.Forbidden, say) or None; received {_describe(error)}.")
        event, refusal = self._outcome
        # Rejected and Forbidden are not subclasses of each other: a test of access control
        # names Forbidden, or a reducer's Rejected for another reason would pass it. An
        # InvalidEvent is a refusal too (a validating middleware raises it for a payload of
        # the wrong shape); ReducerError, ChangesetError are bugs in the code, not refusals.
        if not isinstance(refusal, error or _REFUSALS):
            got = (f"{type(refusal).__name__}: {refusal}" if refusal else
                   f"accepted as seq {event.seq}" if event is not None else
                   self._not_returned() or "ended by a middleware that did not call next()")
            raise AssertionError("expected the event to be "
                                 + (f"refused with {error.__name__}" if error else "rejected")
                                 + f", but it was {got}")
        if error is None and match is None and self._malformed and isinstance(refusal, InvalidEvent):
            # Not taken as the application's refusal: a typo in the test's event (a key
            # "paylod", a datetime in the payload) passed a test of the reducer's rule.
            raise AssertionError(
                f"expected the event to be rejected, but the event given to when() is "
                f"malformed, and fluxlite itself refused it (InvalidEvent: {refusal}), "
                f"which tests no rule of the application. Fix the event, or, to test that "
                f"refusal, pass error=fluxlite.InvalidEvent (or match= its message).")
        if match is not None and not re.search(match, str(refusal)):
            raise AssertionError(f"rejected with {str(refusal)!r}, which does not match {match!r}")
        return self

    def then_state(self, table: str, rows: Sequence[Mapping[str, Any]]) -> "Scenario":
        """The table holds exactly these rows, by key, in any order; in each row the
        columns given (a column left out is not compared)."""
        __tracebackhide__ = True
        info = self.store._model.table(table, error=UsageError)
        actual = {info.key_of(r): r for r in self.store.view[table].all()}
        # A list, read once: a generator checked here would be empty below, and compare
        # as "no rows expected" (passing against an empty table).
        received = rows
        if not isinstance(rows, (str, _Mapping)) and isinstance(rows, collections.abc.Iterable):
            rows = list(rows)
        if not isinstance(rows, list) or not all(isinstance(r, _Mapping) for r in rows):
            raise UsageError(f"then_state() takes a list of row dicts; received {_describe(received)}.")
        keyless = [r for r in rows if not info.pk_set <= r.keys()]
        if keyless:
            raise UsageError(f"then_state({table!r}): every expected row needs its primary key "
                             f"{info.pk}; {keyless[0]} has not.")
        for r in rows:  # rows are matched by key: a matcher (ANY, approx()) cannot be one
            try:
                hash(info.key_of(r))
            except TypeError:
                raise UsageError(
                    f"then_state({table!r}): rows are matched by their primary key "
                    f"({', '.join(info.pk)}), so it must be the key's own value (str, int, "
                    f"float); {dict(r)} has "
                    f"{_describe(info.key_of(r))}. Give the key as stored; a matcher such as "
                    f"unittest.mock.ANY or pytest.approx() fits the other columns.") from None
        unknown = sorted({c for r in rows for c in r} - info.column_set)
        if unknown:
            raise UsageError(f"then_state({table!r}): the table has no column(s) "
                             f"{', '.join(map(repr, unknown))}; it has: {', '.join(info.columns)}.")
        wanted = {info.key_of(r): dict(r) for r in rows}
        if len(wanted) < len(rows):  # "exactly these rows": one row per key, else one is unchecked
            keys = [info.key_of(r) for r in rows]
            twice = rows[next(n for n, k in enumerate(keys) if k in keys[:n])]
            raise UsageError(f"then_state({table!r}): two expected rows have the key "
                             f"{info.key_of(twice)!r} (the second is {dict(twice)}); a table "
                             f"holds one row per key: give each row once.")
        lines: List[str] = []
        differing = [key for key in sorted(set(actual) | set(wanted), key=repr)
                     if not (key in actual and key in wanted
                             and all(actual[key][c] == wanted[key][c] for c in wanted[key]))]
        for key in differing[:20]:  # the first rows say what is wrong; 10,000 lines do not
            a, w = actual.get(key), wanted.get(key)
            by = self._written_by(table, key)
            if a is None:
                lines.append(f"  {key!r}: expected {w}, missing{by}")
            elif w is None:
                lines.append(f"  {key!r}: unexpected row {a}{by}")
            else:
                lines += [f"  {key!r}.{c}: expected {w[c]!r}, got {a[c]!r}{by}"
                          for c in sorted(w) if a[c] != w[c]]
        if len(differing) > 20:
            lines.append(f"  ... and {len(differing) - 20} more rows that differ "
                         f"({len(wanted)} expected, {len(actual)} in the table)")
        if lines:
            raise AssertionError(f"table {table!r} differs from the expected rows:\n"
                                 + "\n".join(lines) + self._refused_note())
        return self

    def _written_by(self, table: str, key: Any) -> str:
        """The event that last wrote (or deleted) the row: where to look in the reducer."""
        try:
            last = self.store._history(table, key, limit=1, reverse=True)
            event = self.store.event(last[0].seq) if last else None
        except FluxliteError:  # a key of the wrong shape for the table: no history to show
            return ""
        if event is None:
            return ""
        return (f" ({'deleted' if last[0].op == 'delete' else 'written'} by event "
                f"{event.seq}, {event.type!r} {_quoted(event.payload)})")

    def _refused_note(self) -> str:
        """then_state() checks the rows whatever when() did: a refused when event made
        no changes, which the diff alone does not say."""
        error = self._outcome[1] if self._outcome is not None else None
        if error is None:
            return ""
        return (f"\n(the when event {_refused(error)}, so none of its changes were "
                f"applied: {type(error).__name__}: {error})")

    def close(self) -> None:
        """Close the scenario's in-memory store."""
        self.store.close()

    def __enter__(self) -> "Scenario":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def scenario(schema: Optional[str] = None,
             reducer: Union[None, Reducer, Mapping[str, CollectionReducer]] = None, *,
             upcasters: Optional[Mapping[str, Upcaster]] = None,
             middleware: Sequence[Middleware] = (), app: Optional[App] = None) -> Scenario:
    """Test a reducer without ceremony: ``scenario(schema, reducer).given(...).when(...).then(...)``.

    Runs in memory with a deterministic clock and ids. ``then`` compares the
    changes the reducer returned for the ``when`` event; ``then_state`` the
    resulting rows; ``then_rejected`` a refusal. A failure raises
    AssertionError with a readable diff, so it works in pytest and unittest.
    ``middleware`` (access control, say) runs as it would in the store.
    ``app`` (an App) gives schema, reducer, middleware and upcasters in one object:
    a scenario of the application as it runs, its access control included.
    """
    if app is not None:
        if not isinstance(app, App):
            raise UsageError(f"app must be a fluxlite.App; received {_describe(app)}.")
        given = [name for name, value in (("schema", schema), ("reducer", reducer),
                                          ("upcasters", upcasters), ("middleware", middleware))
                 if value is not None and not (isinstance(value, (list, tuple, dict)) and not value)]
        if given:
            raise UsageError(f"Pass scenario() either app= or {', '.join(given)}, not both.")
        schema, reducer = app.schema, app.reducer
        upcasters, middleware = app.upcasters, app.middleware
    if schema is None or reducer is None:
        raise UsageError(f"scenario() needs the reducer to test and its schema (or app=, a "
                         f"fluxlite.App); received schema {_describe(schema)} and reducer "
                         f"{_describe(reducer)}.")
    return Scenario(schema, reducer, upcasters=upcasters, middleware=middleware)


###############################################################################
# 14. The command line: python -m fluxlite …, or the `fluxlite` script
###############################################################################


class _CliError(Exception):
    """A user error on the command line: one line on stderr, exit 1."""


def _load_app(spec: Optional[str]) -> App:
    """MODULE:ATTR names a fluxlite.App (the current directory is importable)."""
    import importlib
    if not spec:
        raise _CliError("this command needs --app MODULE:ATTR naming a fluxlite.App")
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise _CliError(f"--app {spec!r} is not MODULE:ATTR (for example myapp:APP)")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise _CliError(f"--app {spec!r}: cannot import {module_name!r}: "
                        f"{type(exc).__name__}: {exc}") from None
    if not hasattr(module, attr):
        raise _CliError(f"--app {spec!r}: {module_name} has no attribute {attr!r}")
    app = getattr(module, attr)
    if not isinstance(app, App):
        raise _CliError(f"--app {spec!r}: {module_name}.{attr} is {_describe(app)}, not a "
                        f"fluxlite.App(schema=..., reducer=...)")
    return app


def _parse_time(text: str) -> datetime:
    try:
        value = _parse_iso(text)
    except ValueError:
        raise _CliError(f"{text!r} is not an ISO-8601 time (e.g. 2026-01-31T12:00:00Z)") from None
    value = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    try:
        value.astimezone(timezone.utc)
    except OverflowError:
        raise _CliError(f"{text!r} is outside the years 1 to 9999 in UTC") from None
    return value


def _count(text: str) -> int:
    """argparse type: a whole number >= 0 (a seq, a limit, a count of events)."""
    import argparse
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0 (and below 2**63)")
    return value


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _CliError(f"{what} is not valid JSON ({exc}): {text[:80]!r}") from None
    except ValueError as exc:  # Python 3.11+: an int of more than 4300 digits
        raise _CliError(f"{what} holds an integer too long for this Python to read "
                        f"({exc}): {text[:80]!r}") from None
    except RecursionError:  # json's own limit, past the 200 levels an event may hold
        raise _CliError(f"{what} nests too deep for JSON to read (events hold at most "
                        f"200 levels): {text[:80]!r}. Flatten it.") from None


def _blob_as_hex(value: Any) -> Any:
    """json.dumps(default=...): a BLOB (which only query() can return) as x'..' text."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"x'{bytes(value).hex()}'"
    raise TypeError(f"{type(value).__name__} is not JSON")


# Control characters in data (a newline, an escape sequence) would break the
# columns or drive the terminal: tables show them escaped, as Python would.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _visible(text: str) -> str:
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def _short(value: Any, width: int = 48) -> str:
    text = value if isinstance(value, str) else _blob_as_hex(value) if isinstance(
        value, bytes) else json.dumps(value, ensure_ascii=False, default=_blob_as_hex)
    text = _visible(text)
    return text if len(text) <= width else text[:width - 1] + "…"


def _print_rows(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None,
                out: Any = None, least: Sequence[int] = ()) -> List[int]:
    """Rows under a header, in columns at least ``least`` wide; returns the widths."""
    out = out or sys.stdout
    columns = list(columns or (rows[0].keys() if rows else []))
    cells = [_cells(r, columns) for r in rows]
    header = [_visible(c) for c in columns]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(header)]
    widths = [max(w, m) for w, m in itertools.zip_longest(widths, least[:len(widths)],
                                                          fillvalue=0)]
    line = "  ".join("{:<%d}" % w for w in widths)
    print(line.format(*header).rstrip(), file=out)
    print(line.format(*["-" * w for w in widths]).rstrip(), file=out)
    for row in cells:
        print(line.format(*row).rstrip(), file=out)
    return widths


def _cells(row: Mapping[str, Any], columns: Sequence[str]) -> List[str]:
    """A row's cells as a table shows them (NULL empty, long ones cut)."""
    return ["" if row.get(c) is None else _short(row.get(c), 60) for c in columns]


class _Nowhere:
    """sys.stdout or sys.stderr when there is none (None under pythonw, in a
    windowed app, or with the descriptor closed): what is written is dropped, as
    print() drops it there."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _stdout() -> Any:
    return sys.stdout if sys.stdout is not None else _Nowhere()


def _progress(label: str, total: int) -> Optional[Callable[[int], None]]:
    """A progress bar on stderr, only when stderr is a terminal."""
    if sys.stderr is None or not sys.stderr.isatty() or total <= 0:
        return None

    def show(done: int) -> None:
        filled = int(30 * min(done, total) / total)
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def _logged_json(row: Mapping[str, Any], column: str) -> Any:
    """An event's payload or meta as logged (a NULL payload is None, an empty meta {})."""
    text = row[column]
    if text is None if column == "payload" else not text:
        return None if column == "payload" else {}
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _unreadable_event(row["seq"], exc) from None


def _event_line(row: Mapping[str, Any]) -> Dict[str, Any]:
    meta, payload = _logged_json(row, "meta"), _logged_json(row, "payload")
    return {"seq": row["seq"], "time": row["ts"][:19] + "Z", "type": row["type"],
            "id": row["id"], "actor": meta.get("actor", ""), "payload": payload}


def _raw_event(row: Mapping[str, Any]) -> Dict[str, Any]:
    """An event exactly as logged (no upcasting): the export format."""
    return {"seq": row["seq"], "id": row["id"], "type": row["type"],
            "payload": _logged_json(row, "payload"), "meta": _logged_json(row, "meta"),
            "ts": row["ts"]}


def _cmd_info(args: Any) -> int:
    # One snapshot for every figure: another process may be writing meanwhile,
    # and the head, the counts by type and the tables' rows must agree.
    with open(args.db, readonly=True) as store, store._lock, _read_txn(store._conn):
        q = store.query
        head = store.head
        first_last = q("SELECT (SELECT ts FROM events ORDER BY seq LIMIT 1) AS first, "  # ts
                       "(SELECT ts FROM events ORDER BY seq DESC LIMIT 1) AS last")[0]  # grows by seq
        info = {
            "file": os.path.abspath(args.db),
            # beside the file a symbolic link leads to, where SQLite puts the -wal
            "size_bytes": sum(os.path.getsize(store._file + s) for s in ("", "-wal")
                              if os.path.exists(store._file + s)),
            "format": _stored_format(store._conn, {r[0] for r in store._conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}),
            "schema_version": store.version,
            "head": head,
            "first_event": first_last["first"], "last_event": first_last["last"],
            "events_by_type": {r["type"]: r["n"] for r in q(
                "SELECT type, count(*) AS n FROM events GROUP BY type ORDER BY n DESC, type")},
            "tables": {t: store.view[t].count() for t in store.view.tables},
            "journal_rows": q("SELECT count(*) AS n FROM fluxlite_journal")[0]["n"],
            "consumers": {r["name"]: r["position"] for r in q(
                "SELECT name, position FROM fluxlite_consumers ORDER BY name")},
        }
    if args.json:
        print(json.dumps(info, ensure_ascii=False))
        return 0
    for key in ("file", "size_bytes", "format", "schema_version", "head", "first_event",
                "last_event", "journal_rows"):
        print(f"{key.replace('_', ' '):<15} {_visible(str(info[key]))}")  # a name, a version
    for title, key in (("events by type", "events_by_type"), ("tables (rows)", "tables"),
                       ("consumers (position)", "consumers")):
        print(f"{title}:" if info[key] else f"{title}: none")
        width = max([len(_visible(k)) for k in info[key]] + [0])
        for name, value in info[key].items():
            print(f"  {_visible(name):<{width}}  {value}")
    return 0


def _log_pages(store: Store, args: Any) -> Iterator[List[Dict[str, Any]]]:
    """The events log selects, a page of 1,000 at a time (memory flat in the log)."""
    # A time is a seq, found by binary search (ts never decreases along seq): a
    # "ts >= ?" filter read every event before the first it kept.
    after, upto = args.after, 2**63 - 1
    if args.since is not None:  # "" too: an empty --since is an error, not no filter
        after = max(after, store._seq_by_ts(_format_ts(_parse_time(args.since)), "<"))
    if args.until is not None:
        upto = store._seq_by_ts(_format_ts(_parse_time(args.until)), "<=")
    where, params = ["seq > ?", "seq <= ?"], [after, upto]
    if args.type and "" in args.type:
        raise _CliError("--type '' matches no event (an event type is non-empty text); "
                        "give a type, or leave --type out for every type")
    if args.type:
        where.append(f"type IN ({', '.join('?' for _ in args.type)})")
        params.extend(args.type)
    actor = getattr(args, "actor", None)  # (tail has none)
    if actor is not None and _has_json_functions(store):
        # meta["actor"] is in no index: every event of the window is read, but in
        # SQLite (a tenth of the time of reading each into Python). A meta that is
        # no JSON (damage, which verify() reports) is no actor's. Only a text actor
        # is: json_extract() gives a list or object as its JSON text ('{"a":1}'),
        # which matched --actor '{"a":1}' here but not when read in Python.
        where.append("CASE WHEN json_valid(meta) THEN json_extract(meta, '$.actor') = ? "
                     "AND json_type(meta, '$.actor') = 'text' END")
        params.append(actor)
        actor = None
    order, step = ("DESC", "<") if args.reverse else ("ASC", ">")
    remaining = args.limit
    position = 2**63 - 1 if args.reverse else 0
    while remaining is None or remaining > 0:
        # Filtered here (a SQLite without JSON functions), a page is 1,000 read, not shown.
        page = 1000 if remaining is None or actor is not None else min(1000, remaining)
        read = store.query(f"SELECT * FROM events WHERE {' AND '.join(where)} AND seq {step} ? "
                           f"ORDER BY seq {order} LIMIT ?", (*params, position, page))
        rows = read if actor is None else [r for r in read if _actor_of(r) == actor]
        rows = rows if remaining is None else rows[:remaining]
        if rows:
            yield rows
        if len(read) < page:
            return
        position = read[-1]["seq"]
        remaining = None if remaining is None else remaining - len(rows)


def _has_json_functions(store: Store) -> bool:
    """Whether ``store``'s SQLite (this process's) has the JSON functions."""
    return _sqlite_has_json()


def _actor_of(row: Mapping[str, Any]) -> Any:
    """An event's meta["actor"], as the log's actor column shows it (None for a
    meta that cannot be read: damage, no actor's, as in SQLite's filter)."""
    try:
        meta = _logged_json(row, "meta")
    except StorageError:
        return None
    return meta.get("actor") if isinstance(meta, dict) else None


def _actor_name(text: str) -> str:
    """argparse type of log --actor: an actor is non-empty text (dispatch's rule)."""
    import argparse
    if not text:  # an unset shell variable ("$USER"), more likely than a filter
        raise argparse.ArgumentTypeError(
            "'' is no actor (dispatch's actor= and --actor refuse an empty one); give a "
            "name, or leave --actor out for every actor")
    return text


_EVENT_LINE = ["seq", "time", "type", "id", "actor", "payload"]


def _print_events(rows: Sequence[Mapping[str, Any]], as_json: bool,
                  least: Sequence[int] = ()) -> List[int]:
    """The events, as JSON lines or in columns (at least ``least`` wide: the header
    alone, for no rows); returns the columns' widths."""
    if as_json:
        for row in rows:
            print(json.dumps(_raw_event(row), ensure_ascii=False))
    elif rows or least:
        return _print_rows([_event_line(r) for r in rows], _EVENT_LINE, least=least)
    return [0] * len(_EVENT_LINE)


def _cmd_log(args: Any) -> int:
    with open(args.db, readonly=True) as store:
        widths = None
        for rows in _log_pages(store, args):
            if widths is None or args.json:
                widths = _print_events(rows, args.json)
            else:  # a later page: in the columns printed so far
                widths = _print_more_events(rows, widths)
    if widths is None and not args.json:  # as query's "(no rows)": not a silent success
        print("(no events)")
    return 0


def _print_more_events(rows: Sequence[Mapping[str, Any]], widths: List[int]) -> List[int]:
    """Event lines under columns already printed (widening one where a cell needs it)."""
    for row in rows:
        cells = _cells(_event_line(row), _EVENT_LINE)
        widths = [max(w, len(c)) for w, c in zip(widths, cells)]
        print("  ".join(c.ljust(w) for w, c in zip(widths, cells)).rstrip())
    return widths


def _cmd_tail(args: Any) -> int:
    import argparse
    with open(args.db, readonly=True) as store:
        # The last N are the seqs after head - N (a log's seqs run 1..head, no gap),
        # read as log reads them, a page at a time: -n 1000000 held every row at once.
        head = store.head
        window = argparse.Namespace(after=max(0, head - args.n), since=None, until=None,
                                    type=None, limit=args.n, reverse=False)
        # Events to come are printed in the columns of those shown: set them wide
        # enough now (from the newest 1,000 lines and every type in the log). Set
        # from the lines shown alone (or none: -n 0, an empty log), each event to
        # come with a longer type, id or actor pushed every later column along.
        least = _follow_widths(store, head) if args.follow and not args.json else ()
        widths, position = None, head
        for rows in _log_pages(store, window):
            if widths is None or args.json:
                widths = _print_events(rows, args.json, least)
            else:
                widths = _print_more_events(rows, widths)
            position = rows[-1]["seq"]
        if not args.follow:
            if widths is None and not args.json:
                print("(no events)")
            return 0
        if widths is None:  # nothing shown: the header, for the events to come
            widths = _print_events([], args.json, least)
        # Ctrl-C sets a flag the loop checks between polls, rather than raising
        # KeyboardInterrupt wherever it lands (inside a lock, the close could hang).
        # So do kill's SIGTERM and a closed terminal's SIGHUP: killed outright, the
        # process left the -wal and -shm its read made beside the store.
        stop, ended = threading.Event(), [int(signal.SIGINT)]

        def end(signum: int, frame: Any) -> None:
            ended.insert(0, signum)
            stop.set()

        previous = _on_signals(("SIGINT", "SIGTERM", "SIGHUP"), end)
        # From the last event shown (else the head read before), not the head now:
        # one committed since the reads above would be neither shown nor followed.
        try:
            # Out now, not with the first new event: to a pipe or a file (`| grep`),
            # the last events sat in the buffer until one came, and a kill lost them.
            _stdout().flush()
            while not stop.is_set():
                _check_still_there(store, args.db)
                for event, _ in store.follow(after=position, timeout=0.2):
                    position = event.seq
                    row = store.query("SELECT * FROM events WHERE seq = ?", (event.seq,))
                    if args.json:
                        _print_events(row, True)
                    else:
                        widths = _print_more_events(row, widths)
                    _stdout().flush()
                    if stop.is_set():
                        break
        except KeyboardInterrupt:
            pass
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    # Ended by a signal, as every follow is: 128 + its number (130 for Ctrl-C), as a
    # shell reports for `tail -f`, so that `fluxlite tail -f db && next` stops there.
    return 128 + ended[0]


def _follow_widths(store: Store, head: int) -> List[int]:
    """tail -f's columns: as wide as the newest 1,000 events' cells (ids and actors
    as recent ones are), every type the log holds (found through its type index, a
    step per type) and a seq of one more digit than the head's."""
    recent = store.query("SELECT * FROM events WHERE seq > ? ORDER BY seq",
                         (max(0, head - 1000),))
    types = store.query(
        "WITH RECURSIVE t(type) AS (SELECT min(type) FROM events UNION ALL "
        "SELECT (SELECT min(type) FROM events WHERE type > t.type) FROM t "
        "WHERE t.type IS NOT NULL) SELECT type FROM t WHERE type IS NOT NULL LIMIT 1000")
    widths = [len(str(head)) + 1, 0, max([len(_short(r["type"], 60)) for r in types] + [0]),
              0, 0, 0]
    for row in recent:
        try:
            cells = _cells(_event_line(row), _EVENT_LINE)
        except StorageError:  # a damaged event, not shown (-n 0) or reported when it is:
            continue  # no reason for -f to refuse to start, which it did not before
        widths = [max(w, len(c)) for w, c in zip(widths, cells)]
    widths[_EVENT_LINE.index("time")] = len("2026-01-31T12:00:00Z")  # always that long
    if not recent:  # an empty log: the ids dispatch makes (a UUID) are 36 characters,
        widths[_EVENT_LINE.index("id")] = 36  # and a type as long as fluxlite's own
        widths[_EVENT_LINE.index("type")] = max(widths[2], len(RESTORE))
    widths[_EVENT_LINE.index("payload")] = 0  # the last column: no width to keep
    return widths


def _on_signals(names: Sequence[str], handler: Callable[[int, Any], Any]) -> Dict[int, Any]:
    """Handle the named signals that this platform has (Windows: no SIGHUP);
    returns the handlers they had, to put back."""
    previous = {}
    for name in names:
        signum = getattr(signal, name, None)
        # None: a handler set outside Python (by a host program), which could not be
        # put back; that signal is left to it
        if signum is not None and signal.getsignal(signum) is not None:
            with contextlib.suppress(ValueError):  # not the main thread: as they were
                previous[int(signum)] = signal.signal(signum, handler)
    return previous


def _check_still_there(store: Store, db: str) -> None:
    """A followed file deleted or replaced (a restore from a backup, an import into a
    new file of that name) gets no more events: following it on, silent, showed none
    of those written at that path."""
    if not store._file_is_its_own():
        raise _CliError(f"{db!r} was deleted, renamed or replaced while it was followed; "
                        f"stopped. Run tail -f again to follow the file now at that path.")


def _find_event(store: Store, key: str) -> Mapping[str, Any]:
    rows = store.query("SELECT * FROM events WHERE id = ?", (key,))
    # isdecimal, not isdigit: "²" is a digit that int() refuses. A seq past 64 bits
    # is no seq in the log (and no query parameter); 19 digits at most, so that int()
    # never meets Python 3.11+'s 4300-digit limit.
    digits = key.lstrip("0") or "0"
    if not rows and key.isdecimal() and len(digits) <= 19 and int(digits) < 2**63:
        rows = store.query("SELECT * FROM events WHERE seq = ?", (int(digits),))
    if not rows:
        raise _CliError(f"no event with seq or id {_quoted(key)} " + (
            f"(the log runs 1..{store.head})" if store.head else "(the log is empty)"))
    return rows[0]


def _cmd_show(args: Any) -> int:
    with open(args.db, readonly=True) as store:
        row = _find_event(store, args.event)
        event = _raw_event(row)
        changes = [c.to_dict() for c in store.changes(row["seq"])]
    if args.json:
        print(json.dumps({"event": event, "changes": changes}, ensure_ascii=False))
        return 0
    for key in ("seq", "id", "type", "ts"):
        print(f"{key:<8} {_visible(str(event[key]))}")
    # JSON escapes only the C0 controls: a C1 one (U+009B starts an escape sequence)
    # or a bidi override in the data is escaped here as in the tables.
    print(f"{'meta':<8} {_visible(json.dumps(event['meta'], ensure_ascii=False))}")
    print("payload  " + "\n         ".join(
        _visible(line) for line in json.dumps(event["payload"], ensure_ascii=False,
                                              indent=2).split("\n")))
    print(f"changes  ({len(changes)})" if changes else "changes  none")
    for c in changes:
        values = "" if c["values"] is None else " " + json.dumps(c["values"], ensure_ascii=False)
        print(_visible(f"  {c['op']:<6} {c['table']} "
                       f"{json.dumps(c['key'], ensure_ascii=False)}{values}"))
    return 0


def _cmd_query(args: Any) -> int:
    import csv
    params = args.params if args.params is not None else args.param or ()
    with open(args.db, readonly=True) as store:
        try:
            if args.at is not None or args.time is not None:
                past = store.at(args.at,
                                time=None if args.time is None else _parse_time(args.time))
                with past:
                    rows = past.query(args.sql, params)
            else:
                rows = store.query(args.sql, params)
        except QueryError as exc:
            raise _unbound_in_cli(exc, args) or exc
    if args.json:
        for row in rows:
            try:  # Python would write Infinity or NaN, which no other JSON reader takes
                line = json.dumps(row, ensure_ascii=False, default=_blob_as_hex,
                                  allow_nan=False)
            except ValueError:
                raise _CliError(f"--json writes JSON, which has no infinity or NaN; the row "
                                f"{row!r} holds one. Select it as text (CAST(x AS TEXT)), "
                                f"or use --csv.") from None
            print(line)
    elif args.csv:
        writer = csv.writer(_stdout(), lineterminator="\n")  # text mode: the platform's own
        if rows:
            writer.writerow(rows[0].keys())
        writer.writerows([_blob_as_hex(v) if isinstance(v, bytes) else v for v in r.values()]
                         for r in rows)
    elif rows:
        _print_rows(rows)
    else:
        print("(no rows)")
    return 0


_HOW_TO_BIND = ("Pass one --param VALUE per ?, in order (VALUE is a JSON number, true, "
                "false, null or \"quoted text\", else text as written), or --params with "
                "a JSON list (one value per ?) or a JSON object (for :name placeholders)")


def _unbound_in_cli(exc: QueryError, args: Any) -> Optional[_CliError]:
    """query()'s advice for parameters that do not fit the placeholders ("give one
    value per ? (a sequence), or a dict") in the command line's own terms."""
    cause = exc.__cause__
    if not (isinstance(cause, sqlite3.ProgrammingError) and "binding" in str(cause).lower()):
        return None
    if args.param is None and args.params is None:
        return _CliError(f"the SQL has a placeholder (? or :name) and no value was given for "
                         f"it: {args.sql[:200]!r}. {_HOW_TO_BIND}.")
    given = args.params if args.params is not None else args.param
    return _CliError(f"the values given do not fit the SQL's placeholders ({cause}): "
                     f"{args.sql[:200]!r}, given {_describe(given)}. {_HOW_TO_BIND}.")


def _param(text: str) -> Any:
    """argparse type of --param: a JSON scalar is that value ('5', 'true', 'null',
    '"5"'); any other text is itself (A1, 007, [1, 2], NaN): never an error."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # no JSON (or an int past 4300 digits)
        return text
    if isinstance(value, (dict, list)) or not _bindable(value):
        return text  # what SQLite cannot bind (a list, 1e999, 20 digits): the text
    return value


def _params(text: str) -> Any:
    """argparse type of --params: a JSON list, or an object for :name placeholders,
    of values SQLite binds."""
    import argparse
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise argparse.ArgumentTypeError(
            f"{text[:80]!r} is not JSON ({exc}); give a JSON list such as '[\"A1\", 5]' "
            f"(one value per ?) or an object such as '{{\"sku\": \"A1\"}}' (for :sku)"
        ) from None
    if not isinstance(value, (list, dict)):
        raise argparse.ArgumentTypeError(
            f"{text[:80]!r} is no JSON list or object; give a list such as '[\"A1\", 5]' "
            f"(one value per ?) or an object such as '{{\"sku\": \"A1\"}}' (for :sku)")
    for item in value.values() if isinstance(value, dict) else value:
        if isinstance(item, (dict, list)) or not _bindable(item):
            raise argparse.ArgumentTypeError(
                f"{_describe(item)} in {text[:80]!r} is no value SQLite binds: each value is "
                f"a JSON number within 64 bits, true, false, null or text (for a JSON "
                f"document, pass its text: \"[1, 2]\")")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # json.loads would give a float nan or inf


def _bindable(value: Any) -> bool:
    """A JSON scalar SQLite stores as it is (not an int past 64 bits, not an inf)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return -(2**63) <= value < 2**63
    return not isinstance(value, float) or math.isfinite(value)


def _cmd_history(args: Any) -> int:
    try:
        key = json.loads(args.key)
    except (ValueError, RecursionError):  # no JSON key (or past 4300 digits): text, as written
        key = args.key
    window = {"after": args.after, "upto": args.upto, "limit": args.limit,
              "reverse": args.reverse}
    with open(args.db, readonly=True) as store:
        json_is_a_key = True
        try:
            revisions = store.history(args.table, key, **window)
        except UsageError as exc:
            if "composite primary key" in str(exc):
                raise _CliError(f"{exc} On the command line, KEY is then a JSON list of the "
                                f"key's values in that order, such as '[\"2026-11\", 7]'."
                                ) from None
            if key is args.key:
                raise
            # JSON that is no key of this table: a text key "null", "NaN", "Infinity",
            # or digits past 64 bits. Tried as written below, which reports any error.
            revisions, json_is_a_key = [], False
        if not revisions and key != args.key:  # JSON that a text key looks like: true, 1e3
            try:
                revisions = store.history(args.table, args.key, **window)
            except UsageError:
                if not json_is_a_key:
                    raise
                # A composite key's JSON list with no versions (in the window): its
                # text is no key of that table. It has none; not "give a tuple".
    if args.json:
        for r in revisions:
            print(json.dumps(r.to_dict(), ensure_ascii=False))
        return 0
    if not revisions:
        print(f"no versions of {_visible(args.table)} {_visible(args.key)} in the journal"
              + _seq_window(args))
        return 0
    _print_rows([{"seq": r.seq, "time": _format_ts(r.ts)[:19] + "Z", "type": r.type,
                  "op": r.op, "after": r.after if r.after is not None else "(deleted)"}
                 for r in revisions])
    return 0


def _seq_window(args: Any) -> str:
    """History's --after and --upto, for its "no versions" line ("" for neither)."""
    if args.upto is None:
        return f" after seq {args.after}" if args.after else ""
    return f" after seq {args.after} up to seq {args.upto}"


def _cmd_dispatch(args: Any) -> int:
    app = _load_app(args.app)
    payload = _parse_json(args.payload, "PAYLOAD_JSON") if args.payload is not None else None
    meta = _parse_json(args.meta, "--meta") if args.meta is not None else None
    if not os.path.exists(args.db):
        raise _CliError(f"no such store file: {args.db!r}")
    _check_built_with(args, app, "dispatch with")
    with open(args.db, app=app) as store:
        head = store.head
        event = store.dispatch(args.type, payload, meta=meta, id=args.id, actor=args.actor)
        committed = [event] if isinstance(event, Event) else list(store.events(after=head))
        if not isinstance(event, Event):
            returned = "None" if event is None else _describe(event)
            if not committed:
                raise _CliError(f"the application's middleware returned {returned} and "
                                f"committed nothing: the event was not dispatched")
            print(f"fluxlite dispatch: warning: the application's middleware returned "
                  f"{returned} instead of the event (a middleware returns what next() "
                  f"returns); what it committed follows", file=sys.stderr)
        for done in committed:
            print(json.dumps({"event": done.to_dict(),
                              "changes": [c.to_dict() for c in store.changes(done.seq)]},
                             ensure_ascii=False))
    return 0


def _check_built_with(args: Any, app: App, doing: str) -> None:
    """verify, dispatch and import run the app's code on the file as it is: a file
    built with other code is refused. Opened with the app, dispatch and import would
    first rebuild the whole read model to the app's shape, unasked: an old checkout's
    app (or a cron job's) would roll a deployment back, and every process running
    the file's code would then refuse to dispatch. Changing the code is a rebuild's."""
    try:
        with open(args.db, readonly=True) as peek:
            built_with = (peek.schema, peek.version)
    except SchemaError:  # no store (a plain SQLite file): opened with the app, the error
        return  # says what to do with it (adopt=True), where a reader's cannot
    version = built_with[1] if app.version is None else app.version
    if not _same_code(app.schema, version, *built_with):
        versions = ("" if _same_json(version, built_with[1]) else
                    f" (the file's version is {built_with[1]!r}, the app's {version!r})")
        raise _CliError(f"{args.db!r} was built with another schema or version than "
                        f"{args.app}'s{versions}; run `fluxlite rebuild {args.db} --app "
                        f"{args.app}` first to change its code on purpose, or {doing} the "
                        f"app the file was built with")


def _cmd_verify(args: Any) -> int:
    app = _load_app(args.app)
    _check_built_with(args, app, "verify with")
    with open(args.db, app=app, readonly=True) as store:
        head = store.head
        try:
            store.verify(progress=_progress("verify", head))
        except ReplayMismatch as exc:
            print(str(exc), file=sys.stderr)
            return 1
    print(f"ok: replaying {head} events gives exactly the live read model")
    return 0


def _cmd_rebuild(args: Any) -> int:
    app = _load_app(args.app)
    if not os.path.exists(args.db):
        raise _CliError(f"no such store file: {args.db!r}")
    with open(args.db, readonly=True) as peek:
        head, old = peek.head, (peek.schema, peek.version)
    progress = _progress("rebuild", head)
    reducer = combine(app.reducer) if isinstance(app.reducer, _Mapping) else app.reducer
    # Opened with the file's own schema (so that the replay below reports its
    # progress) and given the reducer afterwards: open() checks that a combined
    # reducer's tables are in the schema, and a table the new version adds is in
    # the application's schema only, not yet in the file's (APP.open() rebuilds first).
    store = open(args.db, schema=old[0], version=old[1], middleware=app.middleware,
                 upcasters=app.upcasters)
    store._reducer = reducer
    with store:
        if _same_code(app.schema, old[1] if app.version is None else app.version, *old):
            store.rebuild(progress=progress)
        else:
            _rebuild(store, app.schema, app.version if app.version is not None else old[1], progress)
        print(f"rebuilt: {head} events replayed into {', '.join(store.view.tables)} "
              f"(version {store.version!r})")
    return 0


def _cmd_export(args: Any) -> int:
    with open(args.db, readonly=True) as store:
        after = args.after
        while True:
            rows = store.query("SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT 1000",
                               (after,))
            for row in rows:
                print(json.dumps(_raw_event(row), ensure_ascii=False))
            if len(rows) < 1000:
                return 0
            after = rows[-1]["seq"]


def _import_batches(path: str) -> Iterator[List[Tuple[int, Dict[str, Any]]]]:
    """The exported events of a file ("-": standard input), 1,000 at a time, each
    with its line number (an error names the line, to fix it in the file)."""
    try:
        yield from _read_import_batches(path)
    except UnicodeDecodeError as exc:
        raise _CliError(f"{_import_name(path)} is not UTF-8 text ({exc}); export writes "
                        f"UTF-8 JSON lines")


def _import_name(path: str) -> str:
    return "standard input" if path == "-" else path


def _import_lines(path: str) -> Any:
    # utf-8-sig: a byte-order mark (Windows editors write one) is not part of a line
    if path != "-":
        return builtins.open(path, encoding="utf-8-sig")  # open() here is fluxlite's
    if sys.stdin is None:
        raise _CliError("import - reads the events from standard input, and there is none")
    try:  # its bytes, decoded here: the locale's encoding (a Windows code page) misreads them
        return builtins.open(sys.stdin.fileno(), encoding="utf-8-sig", closefd=False)
    except (AttributeError, OSError, ValueError):  # a host's stream object, with no descriptor
        return contextlib.nullcontext(sys.stdin)


def _read_import_batches(path: str) -> Iterator[List[Tuple[int, Dict[str, Any]]]]:
    name = _import_name(path)
    with _import_lines(path) as lines:
        batch: List[Tuple[int, Dict[str, Any]]] = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            item = _parse_json(line, f"{name} line {number}")
            if not isinstance(item, dict) or not {"seq", "id", "type", "ts"} <= set(item):
                raise _CliError(f"{name} line {number} is not an exported event "
                                f"(needs seq, id, type, payload, meta, ts)")
            batch.append((number, item))
            if len(batch) == 1000:
                yield batch
                batch = []
        if batch:
            yield batch


def _imported(item: Dict[str, Any], seq: int, where: str) -> _Prepared:
    """An exported event, checked as a dispatched one is, keeping its seq and ts."""
    fields = {k: item.get(k) for k in ("type", "payload", "meta", "id")}
    baseline = fields["type"] == BASELINE  # dispatch refuses it; a copied log has it
    try:
        prepared = _prepare({**fields, "type": "baseline"} if baseline else fields, _new_id)
    except InvalidEvent as exc:
        raise _CliError(f"{where}: event at seq {seq}: {exc}") from None
    if baseline:
        prepared = dataclasses.replace(prepared, type=BASELINE)
    ts = item.get("ts")
    try:
        when = _parse_iso(ts) if isinstance(ts, str) else None
        when = when if when is None or when.tzinfo is None else when.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        when = None
    if when is None or when.tzinfo is None or not prepared.id_given:
        raise _CliError(f"{where}: event at seq {seq} needs an id and a ts with a time zone "
                        f"in the years 1 to 9999 in UTC (ISO-8601, as export writes); it "
                        f"has id {item.get('id')!r}, ts {ts!r}")
    return dataclasses.replace(prepared, seq=seq, ts=_format_ts(when))


def _cmd_import(args: Any) -> int:
    app = _load_app(args.app)
    if args.file != "-" and (not os.path.exists(args.file) or os.path.isdir(args.file)):
        raise _CliError(f"no such file: {args.file!r}")  # a pipe will do, and - for stdin
    present = _present(args.db)
    added = [0]  # committed so far, also when a later batch fails
    try:
        _import_into(args, app, added)
    except KeyboardInterrupt:
        if added[0]:  # Ctrl-C: say what is in the store now
            print(f"fluxlite import: interrupted: {added[0]} events are in {args.db}; "
                  f"import the file again to go on (the events already present are "
                  f"skipped)", file=sys.stderr)
        raise
    except BrokenPipeError:  # the closing line's reader gone (`| head -0`): quietly, as ever
        raise
    except (_CliError, FluxliteError, OSError) as exc:
        if not added[0]:  # nothing in: the error as it is (and no empty store left below)
            if not present[""]:
                _remove_made(args.db, present)
            raise
        # Batches commit one by one: the events before the failing one are in the store
        raise _CliError(f"{' '.join(str(exc).split())} ({_imported_so_far(args, added[0])})"
                        ) from exc
    except BaseException:
        if not present[""] and added[0] == 0:  # an empty store would pass for an import
            _remove_made(args.db, present)
        raise
    return 0


def _imported_so_far(args: Any, count: int) -> str:
    return (f"the {count} events imported before it are in {args.db}; fix the file and "
            f"import it again: the events already present are skipped")


def _import_into(args: Any, app: "App", added: List[int]) -> None:
    """_cmd_import's work; ``added[0]`` counts the events committed."""
    skipped, name = 0, _import_name(args.file)
    if os.path.exists(args.db) and os.path.getsize(args.db):  # (a new store takes the app's)
        _check_built_with(args, app, "import with")
    with open(args.db, app=app) as store:
        held: List[Tuple[int, _Prepared]] = []  # a transaction of the log cut by a batch's end
        for batch in _import_batches(args.file):
            fresh = held  # the held events come first: their seqs follow the head
            skipped += _import_batch(store, batch, fresh, name)
            held = _commit_imported(store, fresh, name, added, more=True)
            store._notify()  # and let go of the batch: memory stays flat in the log
        _commit_imported(store, held, name, added, more=False)
    print(f"imported {added[0]} events ({skipped} already present)")


def _import_batch(store: Store, batch: List[Tuple[int, Dict[str, Any]]],
                  fresh: List[Tuple[int, _Prepared]], name: str) -> int:
    """Check a batch of lines against the log and append its new events to
    ``fresh``; returns how many were in the log already."""
    skipped = 0
    head = store.head  # a commit with another head is refused (_timestamp)
    for number, item in batch:
        seq = item["seq"]
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise _CliError(f"{name} line {number}: event {item.get('id')!r} has seq "
                            f"{seq!r}; seqs start at 1")
        if seq > head + len(fresh) + 1:  # a gap, or lines out of order
            raise _CliError(
                f"{name} line {number} holds seq {seq}, but the next seq here is "
                f"{head + len(fresh) + 1}: events are imported in the order of "
                f"their seqs, with no gap (an export --after N imports onto a "
                f"store whose head is N)")
        prepared = _imported(item, seq, f"{name} line {number}")
        if seq <= head + len(fresh):
            if seq <= head:
                logged = store.query("SELECT id, type, payload FROM events WHERE seq = ?",
                                     (seq,))[0]
                have = (logged["id"], logged["type"], logged["payload"])
            else:
                earlier = fresh[seq - head - 1][1]
                have = (earlier.id, earlier.type, earlier.payload_text)
            if have != (prepared.id, prepared.type, prepared.payload_text):
                raise _CliError(
                    f"seq {seq} in {name} (line {number}) is {prepared.id!r} "
                    f"({prepared.type}) but {have[0]!r} ({have[1]}) is there "
                    f"already: the logs conflict; import into a new file instead")
            skipped += 1
            continue
        fresh.append((number, prepared))
    return skipped


# What an event of an import can fail on, itself: a reducer's refusal, changes that do
# not apply, a ts before the previous one. (Busy or a full disk are no event's fault.)
_EVENT_FAULTS = (Rejected, ReducerError, ChangesetError, InvalidEvent, Conflict, Forbidden)


# The most events an import holds back for a transaction cut by its batches: each
# next batch is tried with them, so a reference that never holds (other code than the
# log's) costs a bounded retry, not one over the rest of the file.
_IMPORT_HOLD = 10_000


def _commit_imported(store: Store, fresh: List[Tuple[int, _Prepared]], name: str,
                     added: List[int], more: bool) -> List[Tuple[int, _Prepared]]:
    """Commit a batch of imported events; return those held back for the next lines.

    The export does not say where the log's transactions end, and a batch of
    1,000 lines can cut one (a dispatch_many) whose deferred references hold only
    at its end: the events from where such a reference fails are held back and
    committed with the next lines (``more``: there may be some), as replay()
    copies whole transactions. Any other failure is an error naming the event's
    line, the events before it committed, as an import that stopped on that line
    leaves them."""
    while fresh:
        done, exc = _commit_imported_prefix(store, fresh, added)
        fresh = fresh[done:]
        if exc is None:
            return []
        deferred = isinstance(exc, ChangesetError) and "deferred constraint" in str(exc)
        if deferred and done:
            continue  # the rest of this batch may close the transaction
        if deferred and more and len(fresh) <= _IMPORT_HOLD:
            return fresh
        lead = next((i for i, (_, p) in enumerate(fresh) if p.type != BASELINE), len(fresh))
        if lead > 1:
            raise _CliError(f"{name} lines {fresh[0][0]}-{fresh[lead - 1][0]}, the adopted "
                            f"tables' {BASELINE} events, were not imported: {exc}") from exc
        number, prepared = fresh[0]
        raise _CliError(f"{name} line {number}: event seq {prepared.seq} "
                        f"({_quoted(prepared.type)}, id {_quoted(prepared.id)}) was not "
                        f"imported: {exc}") from exc
    return []


def _commit_imported_prefix(store: Store, fresh: List[Tuple[int, _Prepared]],
                            added: List[int]) -> Tuple[int, Optional[FluxliteError]]:
    """Commit as many of the first events as commit: all in one transaction, else
    in halves to find the failing one (log2 of 1,000 commits at most). Returns how
    many were committed and what the next one failed on."""
    try:
        store._commit_prepared([prepared for _, prepared in fresh])
    except _EVENT_FAULTS as exc:
        # An adoption's baselines stay together: they hold whole tables, and apart,
        # one could reference rows in another not yet in (refused at its commit).
        lead = next((i for i, (_, p) in enumerate(fresh) if p.type != BASELINE), len(fresh))
        if len(fresh) == 1 or lead == len(fresh):
            return 0, exc
        half = max(len(fresh) // 2, lead)
        done, first = _commit_imported_prefix(store, fresh[:half], added)
        if first is not None:
            return done, first
        rest, second = _commit_imported_prefix(store, fresh[half:], added)
        return half + rest, second
    added[0] += len(fresh)
    return len(fresh), None


def _cmd_backup(args: Any) -> int:
    if os.path.isdir(args.dest):
        raise _CliError(f"{args.dest!r} is a directory; backup writes a new file: name it, "
                        f"such as {os.path.join(args.dest, os.path.basename(args.db))!r}")
    if os.path.exists(args.dest) and os.path.getsize(args.dest):
        raise _CliError(f"{args.dest!r} exists; backup writes a new file")
    if os.path.islink(args.dest) and not os.path.exists(args.dest):
        # SQLite would create the file it names, past the 0600 creation below
        raise _CliError(f"{args.dest!r} is a symbolic link to a file that does not exist; "
                        f"backup writes a new file: name the file itself")
    _check_path(args.dest)  # a missing directory, a FIFO, a 'file:' URI: before the source opens
    # A fluxlite store, else say so, of the source; closing it tidies the -wal and
    # -shm that a read-only connection leaves beside the file.
    with open(args.db, readonly=True) as source:
        present = _present(args.dest)
        if not present[""]:
            _check_no_orphan_wal(args.dest)
        try:
            _create_file(args.dest)  # 0600; a read-only directory: a StorageError, not an OSError
            target = sqlite3.connect(args.dest)
            try:
                # The copy commits through a rollback journal, and its commit is the
                # journal's unlink: at FULL that unlink is not synced, so a power cut
                # after "backed up" could bring the journal back and roll the copy
                # back to an empty file. EXTRA syncs the directory after it.
                target.execute("PRAGMA synchronous=EXTRA")
                # One step, in one read snapshot: in WAL mode a reader does not hold
                # writers up, while a step-wise copy restarts whenever another
                # connection commits, and never ends under a busy writer.
                with source._lock:
                    source._conn.backup(target)
                target.execute("PRAGMA journal_mode=wal")
            finally:
                target.close()
        except BaseException as exc:
            if not present[""]:  # no half-made copy left behind
                _remove_made(args.dest, present)
            if isinstance(exc, sqlite3.OperationalError):  # a full disk, a read-only file
                raise _storage_error(exc, args.dest) from exc
            raise
    with open(args.dest, readonly=True) as copy:
        print(f"backed up {copy.head} events to {args.dest}")
    return 0


def _cmd_demo(args: Any) -> int:
    import shutil
    made = args.dir is None or not os.path.isdir(args.dir)
    directory = args.dir or tempfile.mkdtemp(prefix="fluxlite-demo-")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise _CliError(f"{directory!r} exists and is not a directory; demo builds its store "
                        f"in a directory: name a new one, or an existing directory.")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:  # a file on the way, a read-only parent
        raise _CliError(f"Could not create the directory {directory!r}: "
                        f"{exc.strerror or exc}. Check that its parent directories exist "
                        f"and are writable, or name another directory.") from exc
    path = os.path.join(directory, "demo.db")
    if os.path.lexists(path):  # never someone's file, nor an earlier tour they kept
        raise _CliError(f"{path!r} exists; demo writes a new store. Name a new directory, "
                        f"or delete that file first.")
    # What a failed tour made is removed (a full disk): a demo.db left behind would
    # be refused by the next `demo DIR` as someone's file.
    present = _present(path)
    try:
        _demo_tour(path)
    except BaseException:
        _remove_made(path, present)
        if made:
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise
    if args.dir is None and not args.keep:
        shutil.rmtree(directory, ignore_errors=True)
        _say("Run `python -m fluxlite demo DIR` to keep the store, then "
             "`python -m fluxlite log DIR/demo.db`.")
    else:
        _say(f"Look inside with: python -m fluxlite log {path}")
    return 0


def _say(text: str) -> None:
    print(f"\n» {text}")


def _demo_reducer(view: View, event: Event) -> Any:
    name = event.payload["name"]
    if event.type == "addUser":
        if name in view.users:
            raise Rejected(f"{name} is already a user")
        return view.users.insert(name=name)
    if event.type == "grantAccess":
        return view.users.update(name, role=event.payload["role"])
    if event.type == "removeUser":
        return view.users.delete(name)
    return None


def _demo_tour(path: str) -> None:
    """The demo's tour, in a new store at ``path``: each store closed on the way out,
    also on a failure (whose caller removes the files)."""
    schema = "CREATE TABLE users (name TEXT PRIMARY KEY, role TEXT);"
    _say(f"A store is one SQLite file: {path}")
    with open(path, schema=schema, reducer=_demo_reducer) as store:
        _demo_first_version(store)
    _say("A new schema, no migration: reopening with version=2 rebuilds by replaying the log.")
    schema2 = "CREATE TABLE users (name TEXT PRIMARY KEY, role TEXT, title TEXT);"

    def reducer2(view: View, event: Event) -> Any:
        if event.type == "grantAccess":
            role = event.payload["role"]
            return view.users.update(event.payload["name"], role=role, title=f"The {role}")
        return _demo_reducer(view, event)

    def restore_v2(event: Event) -> Event:  # the restore event carries a v1 row
        row = event.payload["row"]
        if "title" in row:
            return event
        title = f"The {row['role']}" if row["role"] else None
        return event.replace(payload={**event.payload, "row": {**row, "title": title}})

    print("   (an upcaster gives the old fluxlite.restore event's row the new column)")
    with open(path, schema=schema2, reducer=reducer2, version=2,
              upcasters={RESTORE: restore_v2}) as store:
        _print_rows(store.view.users.all())
        store.verify()
        _say(f"verify(): replaying all {store.head} events gives exactly the live tables.")


def _demo_first_version(store: Store) -> None:
    _say("A subscriber hears every committed event with the changes it made:")
    store.subscribe(lambda e, c: print(f"   heard #{e.seq} {e.type}: "
                                       + "; ".join(f"{x.op} {x.table} {x.key}" for x in c)))
    _say("Dispatching events: each is one transaction (event + row changes).")
    store.dispatch("addUser", {"name": "Barack"}, actor="demo")
    store.dispatch("grantAccess", {"name": "Barack", "role": "President"}, actor="demo")
    store.dispatch("addUser", {"name": "Joe"}, actor="demo")
    _say("A reducer refuses an event by raising Rejected; nothing is written:")
    try:
        store.dispatch("addUser", {"name": "Joe"})
    except Rejected as exc:
        print(f"   Rejected: {exc} (head is still {store.head})")
    _say("The log, which is the source of truth:")
    _print_rows([{"seq": e.seq, "type": e.type, "payload": e.payload} for e in store.events()])
    _say("Removing Barack, then time travel: the users table as it was after event 2:")
    store.dispatch("removeUser", {"name": "Barack"})
    with store.at(2) as past:
        _print_rows(past.users.all())
    _say("Restoring the deleted row from the log, as a new event:")
    restored = store.restore("users", "Barack")
    assert restored is not None  # (only a middleware could have ended the dispatch)
    print(f"   {restored.type}: {store.view.users.get('Barack')}")


def _parser() -> Any:
    import argparse
    parser = argparse.ArgumentParser(
        prog="fluxlite", description="Inspect, query, time-travel and maintain a fluxlite store.")
    parser.add_argument("--version", action="version", version=f"fluxlite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[Any], int], help: str) -> Any:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    def db(p: Any) -> None:
        p.add_argument("db", metavar="DB", help="the store file")

    def app(p: Any, required: bool = True) -> None:
        p.add_argument("--app", metavar="MODULE:ATTR", required=required,
                       help="a fluxlite.App in an importable module (e.g. myapp:APP)")

    p = command("info", _cmd_info, "size, versions, head, event counts, tables, consumers")
    db(p)
    p.add_argument("--json", action="store_true")
    p = command("log", _cmd_log, "the events, one per line")
    db(p)
    p.add_argument("--after", type=_count, default=0, metavar="SEQ")
    p.add_argument("--since", metavar="TIME")
    p.add_argument("--until", metavar="TIME")
    p.add_argument("--type", action="append", metavar="T")
    p.add_argument("--actor", type=_actor_name, metavar="NAME",
                   help="only the events whose meta[\"actor\"] is NAME (reads every event "
                        "of the window: narrow a long log with --after, --since, --type)")
    p.add_argument("--limit", type=_count, metavar="N")
    p.add_argument("--reverse", action="store_true", help="newest first")
    p.add_argument("--json", action="store_true", help="JSON Lines")
    p = command("tail", _cmd_tail, "the last events; -f follows new ones until Ctrl-C")
    db(p)
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("-n", type=_count, default=10, metavar="N")
    p.add_argument("--json", action="store_true")
    p = command("show", _cmd_show, "one event in full, with the changes it made")
    db(p)
    p.add_argument("event", metavar="SEQ_OR_ID")
    p.add_argument("--json", action="store_true")
    p = command("query", _cmd_query, "read-only SQL, on the live model or on the past")
    db(p)
    p.add_argument("sql", metavar="SQL")
    bind = p.add_mutually_exclusive_group()
    bind.add_argument("--param", action="append", type=_param, metavar="VALUE",
                      help="the value of the next ? (repeat in order): a JSON number, true, "
                           "false, null or \"quoted text\" is that value, else the text as "
                           "written")
    bind.add_argument("--params", type=_params, metavar="JSON",
                      help="all the values: a JSON list (one per ?) or a JSON object (for "
                           ":name placeholders)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--at", type=int, metavar="SEQ")
    when.add_argument("--time", metavar="TIME")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")
    p = command("history", _cmd_history, "the versions of one row and the events that made them")
    db(p)
    p.add_argument("table", metavar="TABLE")
    p.add_argument("key", metavar="KEY", help="the key; JSON for numbers or a composite key")
    p.add_argument("--after", type=_count, default=0, metavar="SEQ",
                   help="only the versions made by events after SEQ")
    p.add_argument("--upto", type=_count, metavar="SEQ",
                   help="only the versions made by events up to SEQ (included)")
    p.add_argument("--limit", type=_count, metavar="N", help="at most N versions")
    p.add_argument("--reverse", action="store_true", help="newest first")
    p.add_argument("--json", action="store_true")
    p = command("dispatch", _cmd_dispatch, "dispatch through the application's reducers")
    db(p)
    p.add_argument("type", metavar="TYPE")
    p.add_argument("payload", metavar="PAYLOAD_JSON", nargs="?")
    p.add_argument("--meta", metavar="JSON")
    p.add_argument("--id", metavar="ID")
    p.add_argument("--actor", metavar="NAME")
    app(p)
    p = command("verify", _cmd_verify, "replay the log and compare with the live tables")
    db(p)
    app(p)
    p = command("rebuild", _cmd_rebuild, "rebuild the read model with the application's code")
    db(p)
    app(p)
    p = command("export", _cmd_export, "the log as JSON Lines, ids and timestamps kept")
    db(p)
    p.add_argument("--after", type=_count, default=0, metavar="SEQ")
    p = command("import", _cmd_import, "append exported events (idempotent)")
    db(p)
    p.add_argument("file", metavar="EVENTS_JSONL")
    app(p)
    p = command("backup", _cmd_backup, "copy the store with SQLite's online backup API")
    db(p)
    p.add_argument("dest", metavar="DEST")
    p = command("demo", _cmd_demo, "a guided tour in a scratch directory")
    p.add_argument("dir", metavar="DIR", nargs="?")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return parser


def _output_in_utf8() -> List[Tuple[Any, str, Optional[str]]]:
    """Write UTF-8, whatever the locale says. On Windows a pipe or a file gets the
    ANSI code page: an event holding an emoji would fail to print, and one
    holding "Zoë" would be exported in a form `import` (UTF-8) refuses.
    Returns what was changed, for _restore_output()."""
    changed = []
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        # A file name that is not UTF-8 (held with surrogate escapes) is written as
        # its own bytes, as ls does: "strict" (a UTF-8 locale's) would fail on it.
        # (A host's own stream object may have write() and encoding, and no errors.)
        current = getattr(stream, "errors", None)
        errors = "surrogateescape" if current == "strict" else current
        if (encoding != "utf8" or errors != current) and hasattr(stream, "reconfigure"):
            changed.append((stream, stream.encoding, current))
            stream.reconfigure(encoding="utf-8", errors=errors)
    return changed


def _restore_output(changed: List[Tuple[Any, str, Optional[str]]]) -> None:
    """main() called by a host program (fluxlite.main([...])) gives its streams
    back as they were: its own later output stays in its own encoding."""
    for stream, encoding, errors in changed:
        with contextlib.suppress(Exception):  # closed, or a pipe gone: nothing to restore
            stream.reconfigure(encoding=encoding, errors=errors)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The `fluxlite` command. Returns the exit status.

    As argparse does, a usage error (exit status 2), ``--help`` and ``--version``
    raise SystemExit instead.
    """
    changed = _output_in_utf8()
    try:
        return _main(argv)
    finally:
        _restore_output(changed)


def _main(argv: Optional[Sequence[str]]) -> int:
    args = _parser().parse_args(argv)
    try:
        status: int = args.handler(args)
        return status
    except BrokenPipeError:  # e.g. `fluxlite log db | head` (before OSError, its base)
        with contextlib.suppress(OSError):  # no second error when Python flushes at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (_CliError, FluxliteError, OSError) as exc:
        # One line, all of it: SQLite's integrity_check rows ("*** in database main
        # ***\n...") and a reducer's own errors can hold newlines; the first line alone
        # dropped what is damaged, or which event failed, and what to do.
        message = " ".join(part.strip() for part in str(exc).splitlines() if part.strip()
                           ) or type(exc).__name__
        # The command line has no --adopt: taking a database over is done once, in code.
        message = message.replace("Pass adopt=True to take it over", "Take it over with "
                                  "fluxlite.open(path, ..., adopt=True) in Python")
        print(f"fluxlite {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run the CLI in the module applications import (`fluxlite`, or the name that
    # python -m was given: `myapp.vendor.fluxlite` for a vendored copy), not in this
    # second copy called __main__, so their fluxlite.App is our App. Under python -I
    # or -P (or PYTHONSAFEPATH) this file's folder is not on sys.path: when that
    # import finds no copy, this one is the module they import.
    import importlib
    _name = "fluxlite" if __spec__ is None or __spec__.name == "__main__" else __spec__.name
    try:
        _fluxlite = importlib.import_module(_name)
    except ImportError:
        _fluxlite = sys.modules[_name] = sys.modules[__name__]
    raise SystemExit(_fluxlite.main())
