"""A differential fuzzer of the past: random read-model schemas and values.

Each run is a random schema (1-3 tables: every key and column type, WITHOUT
ROWID, STRICT, COLLATE NOCASE, CHECK, UNIQUE and partial indexes, generated
columns, references, AUTOINCREMENT, defaults) and a few dozen random events,
whose changesets (carried in the payload, applied by a generic reducer) hold
odd values (ints near 2**63, 1 / 1.0 / True, -0.0, numeric-looking text,
astral characters, NUL). They are dispatched alike into a store on a real
file, one on ":memory:" and a plain-sqlite3 oracle. Then: verify(); at(k)
against replay(k) and the oracle for every k; every row's history (ordered,
chained, ending at the live row, matching at()); restores; rebuild() (model
and journal unchanged); a refused dispatch leaves the file byte for byte; a
subscriber's mirror equals the tables.

    python -m pytest -q test_fuzz_past.py                              # CI: 25 runs
    python -m pytest -q -m torture --torture-scale=full test_fuzz_past.py   # 600 runs
    python test_fuzz_past.py --runs 1000 --seed 0 [--minutes M] [--allow all]
    python test_fuzz_past.py --case FAILURE.json | --shrink FAILURE.json SIG

It found the bugs listed in CHANGELOG.md under "The past and replays". What
it still reports with --allow (KNOWN below) are documented limitations.
"""
import argparse
import collections
import copy
import hashlib
import json
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
import traceback
from datetime import datetime, timedelta, timezone

import pytest

import fluxlite
from fluxlite import Change, FluxliteError, Rejected

# Documented limitations the fuzzer would report; off unless --allow.
KNOWN = {
    "nocasehistory": "history() of a deleted row by a NOCASE-equal key spelling, and "
                     "restore() does not change a key's spelling (README: The past)",
    "boolkeyhistory": "history/restore with a bool key",
}
# Features that once found bugs, now fixed: always on.
FIXED = {"blobdefault", "overflowexpr", "negzerodefault", "emptyinsert", "pkcheck",
         "fkaffinity", "autoincfull"}


def key_as_wanted(t, got, want):
    """restore() keeps the live row's key as stored, the same row by SQL's equality
    (README, Known limitations): 1.0 for 1 in a column of no type."""
    if not got or not want:
        return got
    fixed = dict(got)
    for c in t.pk:
        g, w = got.get(c), want.get(c)
        if type(g) in (int, float) and type(w) in (int, float) and g == w:
            fixed[c] = w
    return fixed


def nocase_pk(t):
    return "nocasehistory" not in ALLOW and any(
        (t.col(c).collate or "").upper() == "NOCASE" for c in t.pk)
ALLOW = set(FIXED)

# ----------------------------------------------------------------------------
# typed values: 1, 1.0, True and -0.0 are all different here
# ----------------------------------------------------------------------------


def tv(v):
    if v is None:
        return ("n",)
    if isinstance(v, bool):
        return ("b", v)
    if isinstance(v, int):
        return ("i", v)
    if isinstance(v, float):
        return ("f", repr(v))
    if isinstance(v, str):
        return ("s", v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return ("y", bytes(v).hex())
    if isinstance(v, (list, tuple)):
        return ("t", tuple(tv(x) for x in v))
    return ("?", repr(v))


def trow(row):
    return None if row is None else tuple((k, tv(v)) for k, v in row.items())


def trows(rows):
    return [trow(r) for r in rows]


# ----------------------------------------------------------------------------
# schema generation
# ----------------------------------------------------------------------------

PLAIN_TYPES = ["", "INTEGER", "INT", "TEXT", "REAL", "NUMERIC", "BLOB", "BOOLEAN",
               "VARCHAR(20)", "DOUBLE", "FLOATING POINT", "DECIMAL(10,2)", "ANY", "DATETIME"]
STRICT_TYPES = ["INT", "INTEGER", "REAL", "TEXT", "BLOB", "ANY"]

DEFAULTS = ["0", "-1", "1.5", "'x'", "''", "NULL", "9223372036854775807",
            "-9223372036854775808", "'1'", "1e308", "TRUE", "'-0.0'", "(1+1)", "'A'",
            "2.0", "+7", "'𝄞'", "-0.0"]


def q(name):
    return '"' + name.replace('"', '""') + '"'


class Col:
    def __init__(self, name, decl, **kw):
        self.name = name
        self.decl = decl
        self.notnull = kw.get("notnull", False)
        self.default = kw.get("default")
        self.unique = kw.get("unique", False)
        self.check = kw.get("check")
        self.collate = kw.get("collate")
        self.generated = kw.get("generated")  # (expr, "VIRTUAL"/"STORED")
        self.fk = kw.get("fk")  # (table, column, clause)

    def ddl(self):
        parts = [q(self.name)]
        if self.decl:
            parts.append(self.decl)
        if self.generated:
            parts.append(f"GENERATED ALWAYS AS ({self.generated[0]}) {self.generated[1]}")
        if self.notnull:
            parts.append("NOT NULL")
        if self.default is not None and not self.generated:
            parts.append(f"DEFAULT {self.default}")
        if self.unique:
            parts.append("UNIQUE")
        if self.check:
            parts.append(f"CHECK ({self.check})")
        if self.collate:
            parts.append(f"COLLATE {self.collate}")
        if self.fk:
            parts.append(f"REFERENCES {q(self.fk[0])}({q(self.fk[1])}) {self.fk[2]}".rstrip())
        return " ".join(parts)


class TableSpec:
    def __init__(self, name):
        self.name = name
        self.cols = []
        self.pk = []
        self.pk_inline = None  # "INTEGER PRIMARY KEY [AUTOINCREMENT]" for rowid
        self.without_rowid = False
        self.strict = False
        self.autoinc = False
        self.rowid = False
        self.table_checks = []
        self.indexes = []
        self.keypool = []  # list of keys (scalars or lists)

    def col(self, name):
        return next(c for c in self.cols if c.name == name)

    def writable(self):
        return [c for c in self.cols if not c.generated]

    def ddl(self):
        items = []
        for c in self.cols:
            d = c.ddl()
            if self.pk_inline and c.name == self.pk[0]:
                d = d + " " + self.pk_inline
            items.append(d)
        if not self.pk_inline:
            items.append(f"PRIMARY KEY ({', '.join(q(c) for c in self.pk)})")
        for chk in self.table_checks:
            items.append(f"CHECK ({chk})")
        opts = []
        if self.without_rowid:
            opts.append("WITHOUT ROWID")
        if self.strict:
            opts.append("STRICT")
        sql = f"CREATE TABLE {q(self.name)} ({', '.join(items)})"
        if opts:
            sql += " " + ", ".join(opts)
        return sql + ";"


def gen_schema(rng, ntables=None):
    ntables = ntables or rng.choice([1, 1, 2, 2, 3])
    tables = []
    for ti in range(ntables):
        t = TableSpec(f"t{ti}")
        t.strict = rng.random() < 0.2
        t.without_rowid = rng.random() < 0.25
        types = STRICT_TYPES if t.strict else PLAIN_TYPES
        kind = rng.choice(["rowid", "rowid", "single", "single", "composite", "intdesc"])
        if kind == "rowid":
            t.cols.append(Col("id", "INTEGER"))
            t.pk = ["id"]
            t.pk_inline = "PRIMARY KEY"
            if not t.without_rowid:
                t.rowid = True
                if rng.random() < 0.4:
                    t.pk_inline += " AUTOINCREMENT"
                    t.autoinc = True
        elif kind == "intdesc":
            t.cols.append(Col("id", "INTEGER"))
            t.pk = ["id"]
            t.pk_inline = "PRIMARY KEY DESC"
        elif kind == "single":
            decl = rng.choice(types)
            c = Col("k", decl)
            if rng.random() < 0.3:
                c.collate = "NOCASE"
            t.cols.append(c)
            t.pk = ["k"]
            if rng.random() < 0.5:
                t.pk_inline = "PRIMARY KEY"
        else:
            for name in ("k0", "k1"):
                c = Col(name, rng.choice(types))
                if rng.random() < 0.2:
                    c.collate = "NOCASE"
                t.cols.append(c)
            t.pk = ["k0", "k1"]
        if t.strict:
            for c in t.cols:
                if not c.decl:
                    c.decl = "ANY"
        if "pkcheck" in ALLOW and rng.random() < 0.3:
            c = t.cols[0]
            c.check = rng.choice([f"typeof({q(c.name)}) <> 'real'", f"{q(c.name)} NOT GLOB '*[A-Z]*'",
                                  f"typeof({q(c.name)}) <> 'text' OR {q(c.name)} = lower({q(c.name)}) COLLATE BINARY"])
        if t.without_rowid and kind == "composite" and rng.random() < 0.3:
            pass
        # plain columns
        ncols = rng.randint(1, 4)
        for ci in range(ncols):
            decl = rng.choice(types)
            c = Col(f"c{ci}", decl)
            r = rng.random()
            if r < 0.15:
                c.notnull = True
                if rng.random() < 0.6:
                    c.default = rng.choice(DEFAULTS[:-1] if "negzerodefault" not in ALLOW
                                           else DEFAULTS)
                    if c.default == "NULL":
                        c.default = "0"
            elif r < 0.45:
                c.default = rng.choice(DEFAULTS[:-1] if "negzerodefault" not in ALLOW
                                       else DEFAULTS)
            if "blobdefault" in ALLOW and rng.random() < 0.03:
                c.default = rng.choice(["x'00ff'", "(zeroblob(2))"])
            if rng.random() < 0.12:
                c.unique = True
            if rng.random() < 0.15:
                c.check = rng.choice([
                    f"{q(c.name)} IS NOT 13",
                    f"{q(c.name)} IS NULL OR length({q(c.name)}) < 30",
                    f"typeof({q(c.name)}) != 'blob'",
                    f"{q(c.name)} <> 'bad'",
                ] + ([f"abs({q(c.name)}) >= 0 OR {q(c.name)} IS NULL OR typeof({q(c.name)}) = 'text'"]
                     if "overflowexpr" in ALLOW else []))
            if rng.random() < 0.1:
                c.collate = "NOCASE"
            t.cols.append(c)
        # generated columns
        if rng.random() < 0.3:
            src = rng.choice([c for c in t.cols if c.name.startswith("c")])
            exprs = [f"typeof({q(src.name)})", f"{q(src.name)} IS NULL",
                     f"coalesce({q(src.name)}, 'none')", f"length({q(src.name)})",
                     f"{q(src.name)}", f"{q(src.name)} || ''", f"upper({q(src.name)})"]
            if "overflowexpr" in ALLOW:
                exprs.append(f"abs({q(src.name)})")
            if "blobdefault" in ALLOW:
                exprs.append(f"CAST({q(src.name)} AS BLOB)")
            gdecl = rng.choice(STRICT_TYPES if t.strict else ["", "TEXT", "INTEGER", "REAL", "ANY"])
            if t.strict and gdecl != "ANY":
                gdecl = "ANY"  # a STRICT generated column must accept what the expression gives
            t.cols.append(Col("g", gdecl, generated=(rng.choice(exprs),
                                                    rng.choice(["VIRTUAL", "STORED"]))))
        if rng.random() < 0.15:
            c = rng.choice([c for c in t.cols if c.name.startswith("c")])
            t.table_checks.append(f"{q(c.name)} IS NOT 'forbidden'")
        # a weird column name sometimes: forces at()'s row-by-row undo
        if rng.random() < 0.1:
            t.cols.append(Col('we"ird', rng.choice(types) or ("ANY" if t.strict else "")))
        # foreign keys to earlier tables (or self)
        if ti > 0 or rng.random() < 0.2:
            if rng.random() < 0.6:
                parent = rng.choice(tables + [t]) if ti > 0 else t
                if len(parent.pk) == 1:
                    pcol = parent.col(parent.pk[0])
                    clause = rng.choice(["", "", "ON DELETE RESTRICT", "DEFERRABLE INITIALLY DEFERRED",
                                         "ON UPDATE NO ACTION"])
                    decl = pcol.decl if not t.strict else (pcol.decl or "ANY")
                    if t.strict and decl not in STRICT_TYPES:
                        decl = "ANY"
                    if not t.strict and decl in STRICT_TYPES and parent.strict:
                        pass
                    t.cols.append(Col("ref", decl, fk=(parent.name, pcol.name, clause)))
        # indexes
        if rng.random() < 0.3:
            c = rng.choice([c for c in t.cols if not c.generated and c.name.startswith("c")])
            kindx = rng.choice(["plain", "unique_partial", "expr"])
            if kindx == "plain":
                t.indexes.append(f"CREATE INDEX {q('ix_' + t.name)} ON {q(t.name)} ({q(c.name)});")
            elif kindx == "unique_partial":
                t.indexes.append(f"CREATE UNIQUE INDEX {q('ux_' + t.name)} ON {q(t.name)} "
                                 f"({q(c.name)}) WHERE {q(c.name)} IS NOT NULL AND {q(c.name)} <> '';")
            else:
                t.indexes.append(f"CREATE INDEX {q('ex_' + t.name)} ON {q(t.name)} "
                                 f"(typeof({q(c.name)}), {q(c.name)});")
        tables.append(t)
    for t in tables:
        t.keypool = gen_keypool(rng, t)
    return tables


def schema_sql(tables):
    out = []
    for t in tables:
        out.append(t.ddl())
        out.extend(t.indexes)
    return "\n".join(out)


# ----------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------

INTS = [0, 1, -1, 2, 13, 2**31, 2**53, 2**53 + 1, 2**63 - 1, -2**63, -2**63 + 1]
BAD_INTS = [2**63, -2**63 - 1]
FLOATS = [0.0, -0.0, 1.0, 1.5, -2.5, 1e308, -1e308, 5e-324, 1e-320, 2.2250738585072014e-308,
          0.1, 9.223372036854776e18, 1e16, 123456789.12345679, 2.0**53, 13.0, 1e-7]
BAD_FLOATS = [float("nan"), float("inf")]
TEXTS = ["", "1", "1.0", " 1", "1 ", "-0", "-0.0", "0x10", "1e5", "1e400", "9223372036854775808",
         "abc", "ABC", "a", "A", "é", "É", "𝄞", "a\x00b", "\x00", "NaN", "inf", "true", "null",
         "'", '"', "\\", "\u2028", "x" * 40, "13", "bad", "forbidden", "\\u0000", "-9223372036854775809",
         "0.1", "2.0", "1e-320"]


def gen_value(rng, col=None):
    r = rng.random()
    if r < 0.12:
        return None
    if r < 0.4:
        return rng.choice(INTS)
    if r < 0.6:
        return rng.choice(FLOATS)
    if r < 0.66:
        return rng.choice([True, False])
    if r < 0.97:
        return rng.choice(TEXTS)
    if r < 0.985:
        return {"$b": rng.choice(["", "00", "ff01"])}  # bytes: the reducer makes bytes
    return rng.choice(BAD_INTS)


def gen_key_part(rng, decl, rowid_like):
    if rowid_like:
        return rng.choice([1, 2, 3, 4, 5, 2**63 - 1, -2**63, 7, 8, 9, 10, "3", 2.0, "11", True])
    return rng.choice([1, 2, 3, 1.0, 1.5, -0.0, 0, "1", "a", "A", "", "𝄞", "a\x00b", 2**63 - 1,
                       -2**63, "é", "É", True, 1e308, "b", "1.0", " 1", 0.1])


def gen_keypool(rng, t):
    n = rng.randint(3, 6)
    pool = []
    for _ in range(n):
        parts = []
        for name in t.pk:
            decl = t.col(name).decl
            parts.append(gen_key_part(rng, decl, t.rowid or (decl.upper() in ("INTEGER", "INT")
                                                             and rng.random() < 0.7)))
        pool.append(parts[0] if len(parts) == 1 else parts)
    return pool


def fix_key(t, key):
    """A JSON key (list for composite) -> what view methods take."""
    return tuple(key) if isinstance(key, list) else key


def gen_row(rng, t, tables, with_key=True, partial=False):
    row = {}
    if with_key:
        key = rng.choice(t.keypool)
        parts = key if isinstance(key, list) else [key]
        for name, part in zip(t.pk, parts):
            row[name] = part
    for c in t.writable():
        if c.name in t.pk:
            continue
        if partial and rng.random() < 0.5:
            continue
        if c.fk:
            parent = next(p for p in tables if p.name == c.fk[0])
            row[c.name] = rng.choice(parent.keypool + [None]) if rng.random() < 0.9 else gen_value(rng)
            if isinstance(row[c.name], list):
                row[c.name] = row[c.name][0]
        elif rng.random() < 0.9:
            row[c.name] = gen_value(rng, c)
    return row


def gen_op(rng, tables):
    op = _gen_op(rng, tables)
    if op[0] in ("insert", "update", "delete") and rng.random() < 0.5:
        op[0] += "?"
    return op


def _gen_op(rng, tables):
    t = rng.choice(tables)
    r = rng.random()
    if r < 0.22:
        return ["insert", t.name, None, gen_row(rng, t, tables)]
    if r < 0.42:
        return ["upsert", t.name, None, gen_row(rng, t, tables, partial=rng.random() < 0.4)]
    if r < 0.62:
        row = gen_row(rng, t, tables, with_key=False, partial=True)
        if not row and t.writable():
            c = rng.choice([c for c in t.writable() if c.name not in t.pk] or t.writable())
            row = {c.name: gen_value(rng)}
        return ["update", t.name, rng.choice(t.keypool), row]
    if r < 0.77:
        return ["delete", t.name, rng.choice(t.keypool), None]
    if r < 0.82:
        row = gen_row(rng, t, tables, with_key=False)
        return ["insert_k", t.name, rng.choice(t.keypool), row]
    if r < 0.86:
        row = gen_row(rng, t, tables, with_key=False, partial=True)
        return ["upsert_k", t.name, rng.choice(t.keypool), row]
    if r < 0.91 and t.rowid:
        row = gen_row(rng, t, tables, with_key=False)
        if not row and "emptyinsert" not in ALLOW:
            row = {t.writable()[-1].name: None}
        if t.autoinc and "autoincfull" not in ALLOW and any(
                k == 2**63 - 1 for k in t.keypool):
            return ["reject", t.name, None, None]
        return ["insert", t.name, None, row]
    if r < 0.96:
        w = [c.name for c in t.writable() if c.name not in t.pk]
        if len(w) >= 1:
            return ["copy", t.name, rng.choice(t.keypool), [rng.choice(w + t.pk), rng.choice(w)]]
    if r < 0.98:
        return ["reject", t.name, None, None]
    return ["boom", t.name, None, None]


def gen_events(rng, tables, n=None):
    n = n or rng.randint(15, 45)
    steps = []
    for _ in range(n):
        r = rng.random()
        if r < 0.08:
            steps.append({"kind": "restore"})
            continue
        if r < 0.18:
            batch = [[gen_op(rng, tables) for _ in range(rng.randint(1, 2))]
                     for _ in range(rng.randint(2, 3))]
            steps.append({"kind": "many", "events": batch})
            continue
        steps.append({"kind": "one", "ops": [gen_op(rng, tables) for _ in range(rng.choice([1, 1, 2, 3]))]})
    return steps


# ----------------------------------------------------------------------------
# the generic reducer
# ----------------------------------------------------------------------------


def decode(v):
    if isinstance(v, dict) and set(v) == {"$b"}:
        return bytes.fromhex(v["$b"])
    return v


def decode_row(row):
    if not isinstance(row, dict):
        return row
    return {k: decode(v) for k, v in row.items()}


def _key_from(tab, values):
    pk = tab.primary_key
    if not all(c in values for c in pk):
        return None
    return values[pk[0]] if len(pk) == 1 else [values[c] for c in pk]


def reducer(view, event):
    out = []
    for op, table, key, values in event.payload["ops"]:
        tab = view[table]
        values = decode_row(values)
        if op.endswith("?"):  # soft: only if the row exists (update/delete) or not (insert)
            op = op[:-1]
            probe = key if key is not None else _key_from(tab, values)
            if probe is None:
                continue
            there = tab.get(fix_key(None, probe)) is not None
            if there != (op != "insert"):
                continue
        if op == "insert":
            out.append(tab.insert(values))
        elif op == "upsert":
            out.append(tab.upsert(values))
        elif op == "update":
            out.append(tab.update(fix_key(None, key), values))
        elif op == "delete":
            out.append(tab.delete(fix_key(None, key)))
        elif op == "insert_k":
            out.append(Change("insert", table, key, values))
        elif op == "upsert_k":
            out.append(Change("upsert", table, key, values))
        elif op == "copy":
            row = tab.get(fix_key(None, key))
            if row is not None:
                out.append(tab.update(fix_key(None, key), {values[1]: row[values[0]]}))
        elif op == "reject":
            raise Rejected("refused on purpose")
        elif op == "boom":
            raise ValueError("boom on purpose")
    return out


# ----------------------------------------------------------------------------
# the oracle: plain sqlite3, same schema, same ops
# ----------------------------------------------------------------------------


class OracleRefused(Exception):
    pass


class Oracle:
    def __init__(self, tables, sql):
        self.tables = {t.name: t for t in tables}
        self.conn = sqlite3.connect(":memory:", isolation_level=None)
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.executescript(sql)

    def where(self, t):
        return " AND ".join(f"{q(c)} = ?" for c in t.pk)

    def keyparams(self, t, key):
        if len(t.pk) == 1:
            if isinstance(key, (list, tuple)):
                if len(key) != 1:
                    raise OracleRefused("key shape")
                key = key[0]
            return (key,)
        if not isinstance(key, (list, tuple)) or len(key) != len(t.pk):
            raise OracleRefused("key shape")
        return tuple(key)

    def exists(self, t, kp):
        return self.conn.execute(f"SELECT 1 FROM {q(t.name)} WHERE {self.where(t)}", kp).fetchone()

    def insert(self, t, values):
        cols = list(values)
        if cols:
            self.conn.execute(f"INSERT INTO {q(t.name)} ({', '.join(q(c) for c in cols)}) VALUES "
                              f"({', '.join('?' for _ in cols)})", tuple(values.values()))
        else:
            self.conn.execute(f"INSERT INTO {q(t.name)} DEFAULT VALUES")

    def update(self, t, kp, values):
        if not self.exists(t, kp):
            raise OracleRefused("missing row")
        if values:
            self.conn.execute(f"UPDATE {q(t.name)} SET {', '.join(q(c) + ' = ?' for c in values)} "
                              f"WHERE {self.where(t)}", (*values.values(), *kp))

    def resolve(self, op, table, key, values):
        """Like the reducer: decide soft ops and read rows for copy against the state
        at the start of the event (a reducer's changes apply after it returns)."""
        t = self.tables[table]
        values = decode_row(values)
        if op.endswith("?"):
            op = op[:-1]
            probe = key
            if probe is None:
                if not all(c in values for c in t.pk):
                    return None
                probe = [values[c] for c in t.pk]
            there = self.exists(t, self.keyparams(t, probe)) is not None
            if there != (op != "insert"):
                return None
        if op == "copy":
            kp = self.keyparams(t, key)
            cur = self.conn.execute(f"SELECT * FROM {q(t.name)} WHERE {self.where(t)}", kp)
            names = [d[0] for d in cur.description]
            row = cur.fetchone()
            if row is None:
                return None
            row = dict(zip(names, row))
            return ["update", table, key, {values[1]: row[values[0]]}]
        if op in ("reject", "boom"):
            raise OracleRefused(op)
        return [op, table, key, values]

    def apply_op(self, op, table, key, values):
        t = self.tables[table]
        if op in ("insert", "upsert", "insert_k", "upsert_k"):
            values = dict(values or {})
            if key is not None:
                for c, part in zip(t.pk, self.keyparams(t, key)):
                    values[c] = part
            missing = [c for c in t.pk if c not in values]
            if missing:
                if op.startswith("insert") and t.rowid:
                    self.insert(t, values)
                    return
                raise OracleRefused("no key")
            kp = tuple(values[c] for c in t.pk)
            if op.startswith("upsert") and self.exists(t, kp):
                self.update(t, kp, {c: v for c, v in values.items() if c not in t.pk})
            else:
                if self.exists(t, kp):
                    raise OracleRefused("exists")
                self.insert(t, values)
        elif op == "update":
            if any(c in t.pk for c in values):
                raise OracleRefused("pk update")
            self.update(t, self.keyparams(t, key), values)
        elif op == "delete":
            kp = self.keyparams(t, key)
            if not self.exists(t, kp):
                raise OracleRefused("missing row")
            self.conn.execute(f"DELETE FROM {q(t.name)} WHERE {self.where(t)}", kp)
        elif op == "copy":
            kp = self.keyparams(t, key)
            cur = self.conn.execute(f"SELECT * FROM {q(t.name)} WHERE {self.where(t)}", kp)
            names = [d[0] for d in cur.description]
            row = cur.fetchone()
            if row is not None:
                row = dict(zip(names, row))
                self.update(t, kp, {values[1]: row[values[0]]})
        elif op == "reject":
            raise OracleRefused("reject")
        elif op == "boom":
            raise OracleRefused("boom")

    def apply_event(self, ops):
        resolved = [self.resolve(*op) for op in ops]
        for op in resolved:
            if op is not None:
                self.apply_op(*op)

    def apply_restore(self, payload):
        t = self.tables[payload["table"]]
        w = {c.name for c in t.writable()}
        row = {c: v for c, v in payload["row"].items() if c in w}
        kp = self.keyparams(t, payload["key"])
        if self.exists(t, kp):
            self.update(t, kp, {c: v for c, v in row.items() if c not in t.pk})
        else:
            self.insert(t, row)

    def begin(self):
        self.conn.execute("BEGIN")

    def commit(self):
        self.conn.execute("COMMIT")

    def rollback(self):
        if self.conn.in_transaction:  # SQLite ends it itself on SQLITE_FULL (AUTOINCREMENT)
            self.conn.execute("ROLLBACK")

    def state(self):
        out = {}
        for name, t in self.tables.items():
            cur = self.conn.execute(f"SELECT * FROM {q(name)} ORDER BY "
                                    f"{', '.join(q(c) for c in t.pk)}")
            names = [d[0] for d in cur.description]
            out[name] = [trow(dict(zip(names, r))) for r in cur]
        return out


# ----------------------------------------------------------------------------
# helpers on stores
# ----------------------------------------------------------------------------


class Failure(Exception):
    def __init__(self, sig, detail):
        super().__init__(f"{sig}: {detail}")
        self.sig = sig
        self.detail = detail


def raw_check(exc, where):
    """Any non-Fluxlite exception is a bug; so is a misleading StorageError."""
    if not isinstance(exc, FluxliteError):
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
        raise Failure(f"raw:{where}:{type(exc).__name__}:{str(exc)[:60]}", tb)
    if isinstance(exc, fluxlite.StorageError):
        import re as _re
        text = _re.sub(r"'[^']*store\.db'", "PATH", str(exc))  # one signature for any run
        raise Failure(f"storageerror:{where}:{text[:70]}", str(exc))


def model_state(view, tables):
    out = {}
    for t in tables:
        out[t.name] = trows(view[t.name].all())
    return out


def query_state(view, tables):
    out = {}
    for t in tables:
        cols = [c.name for c in t.cols]
        sel = ", ".join(f"{q(c)}, typeof({q(c)})" for c in cols)
        rows = view.query(f"SELECT {sel} FROM {q(t.name)} ORDER BY {', '.join(q(c) for c in t.pk)}")
        out[t.name] = trows(rows)
        out[t.name + "#count"] = view[t.name].count()
    return out


def dump(store):
    """Every table of the file (fluxlite_* and sqlite_sequence included), typed."""
    conn = store._conn
    out = []
    for name, sql in conn.execute("SELECT name, sql FROM sqlite_master ORDER BY type, name").fetchall():
        out.append(("schema", name, sql))
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name").fetchall():
        rows = conn.execute(f"SELECT * FROM {q(name)}").fetchall()
        out.append((name, sorted(repr(tuple(tv(v) for v in r)) for r in rows)))
    out.append(("user_version", conn.execute("PRAGMA user_version").fetchone()))
    return out


def file_bytes(path):
    h = hashlib.sha256()
    for suffix in ("", "-wal"):
        try:
            with open(path + suffix, "rb") as f:
                h.update(f.read())
        except FileNotFoundError:
            h.update(b"none")
    return h.hexdigest()


def journal_dump(store):
    return [tuple(tv(v) for v in r) for r in store._conn.execute(
        "SELECT seq, n, tbl, key, op, before, after FROM fluxlite_journal ORDER BY seq, n")]


def key_of_row(t, row):
    if len(t.pk) == 1:
        return row[t.pk[0]]
    return tuple(row[c] for c in t.pk)


# ----------------------------------------------------------------------------
# a run
# ----------------------------------------------------------------------------


class Run:
    def __init__(self, case, tmpdir, stats):
        self.case = case
        self.tables = [rebuild_spec(d) for d in case["tables"]]
        self.sql = case["schema"]
        self.tmpdir = tmpdir
        self.stats = stats
        self.failures = []

    def fail(self, sig, detail):
        self.failures.append((sig, detail))

    def open_store(self, path):
        start = datetime(2026, 1, 1, tzinfo=timezone.utc)
        counter = iter(range(10**9))
        ids = iter(range(10**9))
        return fluxlite.open(path, schema=self.sql, reducer=reducer,
                             clock=lambda: start + timedelta(seconds=next(counter)),
                             ids=lambda: f"id-{next(ids)}")

    def run(self):
        try:
            self._run()
        except Failure as f:
            self.fail(f.sig, f.detail)
        finally:
            for s in getattr(self, "stores", []):
                try:
                    s.close()
                except Exception:
                    pass
        return self.failures

    def _run(self):
        path = os.path.join(self.tmpdir, "store.db")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
        self.stores = []
        try:
            fs = self.open_store(path)
        except Exception as exc:
            if isinstance(exc, fluxlite.SchemaError):
                self.stats["schema_refused"] += 1
                self.stats["schema_refused:" + str(exc)[:50]] += 1
                return
            raw_check(exc, "open")
            raise Failure(f"open:{type(exc).__name__}:{str(exc)[:60]}", str(exc))
        ms = self.open_store(":memory:")
        self.stores = [fs, ms]
        self.path = path
        self.mirrors = []
        self.heard = []
        for s in self.stores:
            mirror = {t.name: {} for t in self.tables}
            self.mirrors.append(mirror)
            s.subscribe(self.make_listener(mirror))
        self.oracle = Oracle(self.tables, self.sql)
        self.snapshots = {0: self.oracle.state()}
        self.given_keys = set()
        self.midbatch = set()
        rng = random.Random(self.case["seed"] + 1)
        for i, step in enumerate(self.case["steps"]):
            try:
                self.do_step(step, rng)
            except Failure as f:
                f.detail = f"[step {i}: {json.dumps(step)[:600]}]\n{f.detail}"
                raise
        self.stats["events"] += fs.head
        self.final_checks(rng)

    def make_listener(self, mirror):
        tables = {t.name: t for t in self.tables}

        heard = {}
        self.heard.append(heard)

        def listener(event, changes):
            heard[event.seq] = [repr((c.op, c.table, tv(c.key), trow(c.values))) for c in changes]
            for ch in changes:
                m = mirror[ch.table]
                t = tables[ch.table]
                key = ch.key
                if ch.op == "insert":
                    if key in m:
                        self.fail("mirror:insert-existing", f"{ch}")
                    if key != key_of_row(t, ch.values):
                        self.fail("mirror:insert-key-mismatch", f"{ch}")
                    m[key] = dict(ch.values)
                elif ch.op == "update":
                    if key not in m:
                        self.fail("mirror:update-missing", f"{ch}")
                        continue
                    m[key].update(ch.values)
                elif ch.op == "delete":
                    if key not in m:
                        self.fail("mirror:delete-missing", f"{ch}")
                        continue
                    del m[key]
                else:
                    self.fail("mirror:op", f"{ch}")
        return listener

    # -- steps --

    def dispatch_both(self, fn):
        """fn(store) on both stores; same outcome required. Returns (results, exc)."""
        outcomes = []
        for s in self.stores:
            before = dump(s)
            fb = file_bytes(self.path) if s is self.stores[0] else None
            try:
                outcomes.append(("ok", fn(s)))
            except Exception as exc:  # noqa: BLE001
                raw_check(exc, "dispatch")
                outcomes.append(("err", exc))
                after = dump(s)
                if after != before:
                    diff = [(a, b) for a, b in zip(before, after) if a != b][:3]
                    raise Failure("refused-changed-file", f"{exc!r}\n{diff}")
                if fb is not None and file_bytes(self.path) != fb:
                    raise Failure("refused-changed-bytes", repr(exc))
        (k1, v1), (k2, v2) = outcomes
        if k1 != k2 or (k1 == "err" and type(v1) is not type(v2)):
            raise Failure("file-vs-memory-outcome", f"{outcomes}")
        return outcomes[0]

    def do_step(self, step, rng):
        fs = self.stores[0]
        if step["kind"] == "restore":
            target = self.pick_restorable(rng)
            if target is None:
                return
            table, key = target
            self.oracle.begin()
            kind, res = self.dispatch_both(lambda s: s.restore(table, key))
            if kind == "ok":
                self.stats["restores_mid"] += 1
                try:
                    self.oracle.apply_restore(res.payload)
                    self.oracle.commit()
                except Exception as exc:  # noqa: BLE001
                    self.oracle.rollback()
                    raise Failure("oracle-refused-restore", f"{exc!r} {res.payload}")
                self.snapshots[fs.head] = self.oracle.state()
            else:
                self.oracle.rollback()
                self.stats["restore_refused:" + type(res).__name__ + ":" + str(res)[:40]] += 1
            return
        if step["kind"] == "one":
            events = [step["ops"]]
        else:
            events = step["events"]
        # the oracle
        self.oracle.begin()
        oracle_exc = None
        seq = fs.head
        snaps = {}
        try:
            for ops in events:
                self.oracle.apply_event(ops)
                seq += 1
                snaps[seq] = self.oracle.state()
        except (OracleRefused, sqlite3.Error, OverflowError, ValueError, TypeError) as exc:
            oracle_exc = exc
        for ops in events:
            for op in ops:
                if op[2] is not None:
                    self.given_keys.add((op[1], json.dumps(op[2])))
        if step["kind"] == "one":
            kind, res = self.dispatch_both(lambda s: s.dispatch("ev", {"ops": step["ops"]}))
        else:
            kind, res = self.dispatch_both(
                lambda s: s.dispatch_many([{"type": "ev", "payload": {"ops": e}} for e in events]))
        if kind == "ok":
            if step["kind"] == "many":  # seqs that end inside a transaction
                self.midbatch.update(range(fs.head - len(events) + 1, fs.head))
            self.stats["accepted"] += len(events)
            if oracle_exc is not None:
                self.oracle.rollback()
                raise Failure(f"oracle-refused-accepted:{type(oracle_exc).__name__}:{str(oracle_exc)[:50]}",
                              f"{events}")
            self.oracle.commit()
            self.snapshots.update(snaps)
            # live vs oracle right away (catches semantics bugs early)
            live = model_state(fs.view, self.tables)
            ora = self.oracle.state()
            if live != ora:
                raise Failure("live-vs-oracle", diff_states(live, ora))
        else:
            self.oracle.rollback()
            self.stats["refused"] += 1
            msg = f"{type(res).__name__}:{str(res)[:45]}"
            self.stats["refusal:" + msg] += 1
            if oracle_exc is None:
                self.stats["refused-but-oracle-ok:" + msg] += 1

    def pick_restorable(self, rng):
        fs = self.stores[0]
        rows = fs._conn.execute(
            "SELECT tbl, key FROM fluxlite_journal GROUP BY tbl, key "
            "HAVING max(seq * 100000 + n) = max(CASE WHEN op = 'delete' THEN seq * 100000 + n END)"
        ).fetchall()
        if not rows:
            return None
        tbl, key = rng.choice(rows)
        key = json.loads(key)
        return tbl, (tuple(key) if isinstance(key, list) else key)

    # -- final checks --

    def final_checks(self, rng):
        fs, ms = self.stores
        head = fs.head
        if ms.head != head:
            raise Failure("head-mismatch", f"{fs.head} {ms.head}")
        # live: file vs memory vs oracle vs mirrors
        live = model_state(fs.view, self.tables)
        if model_state(ms.view, self.tables) != live:
            raise Failure("live-file-vs-memory", diff_states(live, model_state(ms.view, self.tables)))
        if self.oracle.state() != live:
            raise Failure("live-vs-oracle", diff_states(live, self.oracle.state()))
        for i, (s, mirror) in enumerate(zip(self.stores, self.mirrors)):
            for t in self.tables:
                got = sorted(map(repr, (trow(r) for r in mirror[t.name].values())))
                want = sorted(map(repr, live[t.name]))
                if got != want:
                    self.fail("mirror-vs-live", f"{t.name}: mirror {got}\nlive {want}")
        # changes(seq) (from the journal) == what subscribers heard
        for s, heard in zip(self.stores, self.heard):
            for seq in range(1, head + 1):
                got = [repr((c.op, c.table, tv(c.key), trow(c.values))) for c in s.changes(seq)]
                if got != heard.get(seq):
                    self.fail("changes-vs-subscriber", f"seq={seq} changes={got} heard={heard.get(seq)}")
                    break
        # at(time=ts) == at(last seq with ts <= time)
        for k in sorted(set(random.Random(head).sample(range(1, head + 1), min(head, 4)))):
            ts = fs.event(k).ts
            last = max(e.seq for e in fs.events() if e.ts <= ts)
            with fs.at(time=ts) as v1, fs.at(last) as v2:
                if model_state(v1, self.tables) != model_state(v2, self.tables):
                    self.fail("at-time-vs-at-seq", f"k={k} last={last}")
        # 1. verify
        self.verify_all("verify")
        # 2. at(k) vs replay(k) vs oracle snapshots
        self.check_past(head, "")
        # 3. history
        self.check_history()
        # 5. rebuild (before restores, so the journal can be compared)
        self.check_rebuild()
        # 4. restore every deleted row
        self.check_restores(rng)
        # reopen the file store; replay into a file
        self.check_reopen()

    def check_reopen(self):
        fs = self.stores[0]
        live = model_state(fs.view, self.tables)
        head = fs.head
        with fs.at(max(0, head - 1)) as v:
            before_head = model_state(v, self.tables)
        fs.close()
        try:
            fs2 = self.open_store(self.path)
        except Exception as exc:  # noqa: BLE001
            raw_check(exc, "reopen")
            raise Failure(f"reopen:{type(exc).__name__}:{str(exc)[:50]}", str(exc))
        self.stores[0] = fs2
        if model_state(fs2.view, self.tables) != live or fs2.head != head:
            raise Failure("reopen:model-changed", "")
        try:
            fs2.verify()
        except Exception as exc:  # noqa: BLE001
            raw_check(exc, "verify-after-reopen")
            raise Failure(f"verify-after-reopen:{type(exc).__name__}", str(exc)[:2000])
        target = self.path + ".replay.db"
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(target + suffix):
                os.remove(target + suffix)
        try:
            with fs2.replay(into=target) as r:
                if model_state(r.view, self.tables) != live:
                    raise Failure("replay-into-file:model-differs", "")
                r.verify()
        except FluxliteError as exc:
            raw_check(exc, "replay-into-file")
            if "deferred" not in str(exc):
                raise Failure(f"replay-into-file:{type(exc).__name__}:{str(exc)[:50]}", str(exc))
        except Failure:
            raise
        except Exception as exc:  # noqa: BLE001
            raw_check(exc, "replay-into-file")
        with fs2.at(max(0, head - 1)) as v1, fs2.at(head) as v2:
            if model_state(v2, self.tables) != live:
                raise Failure("reopen:at-head-differs", "")
            if model_state(v1, self.tables) != before_head:
                raise Failure("reopen:at-before-head-differs", "")
        self.check_schema_change(fs2, head)

    def check_schema_change(self, fs2, head):
        """Reopen with a changed schema (a new column, a type changed): rebuilt by replay;
        then at(k) == replay(k) under the new schema, and verify()."""
        rng = random.Random(self.case["seed"] + 7)
        tables = [rebuild_spec(spec_dict(t)) for t in self.tables]
        t = rng.choice(tables)
        t.cols.append(Col("zz", rng.choice(["TEXT", "", "INTEGER", "REAL"]) if not t.strict else "ANY",
                          default=rng.choice(["'new'", "0", "NULL", "1.5"])))
        changeable = [c for c in t.cols if c.name.startswith("c") and not c.generated
                      and not c.check and not c.unique]
        if changeable and not t.strict and rng.random() < 0.5:
            rng.choice(changeable).decl = rng.choice(PLAIN_TYPES)
        sql = schema_sql(tables)
        fs2.close()
        try:
            fs3 = fluxlite.open(self.path, schema=sql, reducer=reducer, version=2)
        except Exception as exc:  # noqa: BLE001
            raw_check(exc, "schema-change")
            self.stats["schema-change-refused:" + str(exc)[:50]] += 1
            self.stores[0] = fluxlite.open(self.path, schema=self.sql, reducer=reducer)
            return
        self.stores[0] = fs3
        self.stats["schema_changes"] += 1
        try:
            fs3.verify()
        except Exception as exc:  # noqa: BLE001
            raw_check(exc, "verify-after-schema-change")
            raise Failure(f"verify-after-schema-change:{type(exc).__name__}", str(exc)[:2000])
        ks = sorted(set([0, head] + rng.sample(range(head + 1), min(head + 1, 5))))
        for k in ks:
            with fs3.at(k) as v:
                a = model_state(v, tables)
                aq = query_state(v, tables)
            try:
                r = fs3.replay(k)
            except FluxliteError as exc:
                if k in self.midbatch and "deferred" in str(exc):
                    continue
                raise Failure(f"replay-after-schema-change:{type(exc).__name__}:{str(exc)[:40]}", str(exc))
            with r:
                b = model_state(r.view, tables)
                bq = query_state(r.view, tables)
            if a != b or aq != bq:
                raise Failure("past-after-schema-change:at-vs-replay", f"k={k}\n" + diff_states(aq, bq))
        # history's last after == live row for every journaled key
        for tbl, key in fs3._conn.execute("SELECT DISTINCT tbl, key FROM fluxlite_journal").fetchall():
            k = json.loads(key)
            k = tuple(k) if isinstance(k, list) else k
            revs = fs3.history(tbl, k)
            tspec = next(x for x in tables if x.name == tbl)
            if revs and trow(revs[-1].after) != trow(fs3.view[tbl].get(k)) and not nocase_pk(tspec):
                self.fail("history-after-schema-change:last-after-vs-live", f"{tbl} {k!r}")

    def verify_all(self, where):
        for s in self.stores:
            try:
                s.verify()
            except Exception as exc:  # noqa: BLE001
                raw_check(exc, where)
                raise Failure(f"{where}:{type(exc).__name__}", str(exc)[:2000])

    def check_past(self, head, tag, ks=None):
        fs, ms = self.stores
        ks = range(head + 1) if ks is None else ks
        for k in ks:
            states = {}
            for name, s in (("file", fs), ("mem", ms)):
                try:
                    with s.at(k) as v:
                        states[name + ".at"] = model_state(v, self.tables)
                        states[name + ".atq"] = query_state(v, self.tables)
                except Exception as exc:  # noqa: BLE001
                    raw_check(exc, "at")
                    raise Failure(f"at{tag}:{type(exc).__name__}:{str(exc)[:50]}", f"k={k} {exc}")
                try:
                    r = s.replay(k)
                except Exception as exc:  # noqa: BLE001
                    raw_check(exc, "replay")
                    if k in self.midbatch and "deferred" in str(exc):
                        self.stats["replay-midbatch-deferred"] += 1
                        states = None
                        break
                    raise Failure(f"replay{tag}:{type(exc).__name__}:{str(exc)[:50]}", f"k={k} {exc}")
                with r:
                    states[name + ".replay"] = model_state(r.view, self.tables)
                    states[name + ".replayq"] = query_state(r.view, self.tables)
            if states is None:
                continue
            ref = states["file.replay"]
            for n in ("file.at", "mem.at", "mem.replay"):
                if states[n] != ref:
                    raise Failure(f"past{tag}:{n}-vs-file.replay", f"k={k}\n" + diff_states(states[n], ref))
            for n in ("file.atq", "mem.atq", "mem.replayq"):
                if states[n] != states["file.replayq"]:
                    raise Failure(f"past{tag}:{n}-vs-replay-query", f"k={k}\n" +
                                  diff_states(states[n], states["file.replayq"]))
            if not tag and k in self.snapshots and self.snapshots[k] != ref:
                raise Failure("past:oracle-vs-replay", f"k={k}\n" + diff_states(self.snapshots[k], ref))
            self.stats["at_checks"] += 1

    def check_history(self):
        fs, ms = self.stores
        tables = {t.name: t for t in self.tables}
        keys = set()
        for tbl, key in fs._conn.execute("SELECT DISTINCT tbl, key FROM fluxlite_journal"):
            k = json.loads(key)
            keys.add((tbl, json.dumps(k), True))
        for tbl, key in self.given_keys:
            keys.add((tbl, key, False))
        ats = {}
        for tbl, keytext, stored in sorted(keys):
            t = tables[tbl]
            key = json.loads(keytext)
            key = tuple(key) if isinstance(key, list) else key
            try:
                revs = fs.history(tbl, key)
                revs_m = ms.history(tbl, key)
            except Exception as exc:  # noqa: BLE001
                if isinstance(exc, FluxliteError):
                    self.stats["history_refused:" + str(exc)[:40]] += 1
                    continue
                raw_check(exc, "history")
            if [tuple(map(repr, (r.seq, r.op, trow(r.before), trow(r.after)))) for r in revs] != \
               [tuple(map(repr, (r.seq, r.op, trow(r.before), trow(r.after)))) for r in revs_m]:
                self.fail("history:file-vs-memory", f"{tbl} {key!r}")
            try:
                live = fs.view[tbl].get(key)
            except FluxliteError:
                live = None
            if not revs:
                if live is not None and not (nocase_pk(t) and not stored):
                    kind = "stored" if stored else "given"
                    self.fail(f"history:empty-but-row-exists:{kind}",
                              f"{tbl} key={key!r} live={live!r}")
                continue
            self.stats["history_checks"] += 1
            prev = None
            last_seq = (0, 0)
            for i, r in enumerate(revs):
                if (r.seq,) < (last_seq[0],):
                    self.fail("history:order", f"{tbl} {key!r}")
                last_seq = (r.seq, 0)
                if i > 0 and trow(r.before) != trow(prev.after):
                    self.fail("history:chain", f"{tbl} key={key!r} rev{i} before={r.before!r} "
                                               f"prev.after={prev.after!r}")
                if i == 0 and r.before is not None and stored:
                    self.fail("history:first-before-not-none", f"{tbl} {key!r} {r}")
                if (r.op == "delete") != (r.after is None):
                    self.fail("history:delete-after", f"{r}")
                prev = r
            if trow(revs[-1].after) != trow(live) and not nocase_pk(t):
                kind = "stored" if stored else "given"
                self.fail(f"history:last-after-vs-live:{kind}",
                          f"{tbl} key={key!r} last.after={revs[-1].after!r} live={live!r}")
            # at(rev.seq) has rev.after (the last revision of that seq)
            last_per_seq = {}
            for r in revs:
                last_per_seq[r.seq] = r
            for seq, r in last_per_seq.items():
                if seq not in ats:
                    with fs.at(seq) as v:
                        ats[seq] = {tn.name: {repr(tv(key_of_row(tn, row))): row
                                              for row in v[tn.name].all()} for tn in self.tables}
                got = self.lookup(ats[seq][tbl], t, r.after if r.after is not None else r.before)
                if trow(got) != trow(r.after):
                    self.fail("history:at-vs-after", f"{tbl} key={key!r} seq={seq} at={got!r} "
                                                     f"after={r.after!r}")

    def lookup(self, rows, t, row):
        if row is None:
            return None
        return rows.get(repr(tv(key_of_row(t, row))))

    def check_rebuild(self):
        for s in self.stores:
            before_model = model_state(s.view, self.tables)
            before_journal = journal_dump(s)
            try:
                s.rebuild()
            except Exception as exc:  # noqa: BLE001
                raw_check(exc, "rebuild")
                if ("fkaffinity" not in ALLOW and "breaks a foreign key" in str(exc)
                        and s._conn.execute("PRAGMA foreign_key_check").fetchone()):
                    self.stats["rebuild-refused-fk-affinity"] += 1  # known: see KNOWN
                    return
                raise Failure(f"rebuild:{type(exc).__name__}:{str(exc)[:50]}", str(exc))
            after_model = model_state(s.view, self.tables)
            if after_model != before_model:
                raise Failure("rebuild:model-changed", diff_states(before_model, after_model))
            after_journal = journal_dump(s)
            if after_journal != before_journal:
                d = [(a, b) for a, b in zip(before_journal, after_journal) if a != b][:3]
                raise Failure("rebuild:journal-changed", f"{len(before_journal)} vs "
                                                         f"{len(after_journal)} {d}")
            try:
                s.verify()
            except Exception as exc:  # noqa: BLE001
                raw_check(exc, "verify-after-rebuild")
                raise Failure(f"verify-after-rebuild:{type(exc).__name__}", str(exc)[:2000])
        head = self.stores[0].head
        ks = sorted(set([0, head] + random.Random(head).sample(range(head + 1), min(head + 1, 6))))
        self.check_past(head, ":after-rebuild", ks)

    def check_restores(self, rng):
        fs, ms = self.stores
        did = 0
        for _ in range(6):
            target = self.pick_restorable(rng)
            if target is None:
                break
            table, key = target
            revs = fs.history(table, key)
            want = [r for r in revs if r.op == "delete"][-1].before
            kind, res = self.dispatch_both(lambda s: s.restore(table, key))
            if kind == "err":
                self.stats["restore_refused:" + type(res).__name__ + ":" + str(res)[:40]] += 1
                if "did not exist" in str(res) or "already as it was" in str(res):
                    break
                break
            did += 1
            self.stats["restores"] += 1
            t = next(t for t in self.tables if t.name == table)
            for s in self.stores:
                got = key_as_wanted(t, s.view[table].get(key), want)
                if nocase_pk(t):
                    got = json.loads(json.dumps(got).lower()) if got else got
                    want = json.loads(json.dumps(want).lower()) if want else want
                if trow(got) != trow(want):
                    self.fail("restore:row-differs", f"{table} {key!r} got={got!r} want={want!r}")
        # restore(at=k) of a random changed row
        rows = fs._conn.execute("SELECT DISTINCT tbl, key FROM fluxlite_journal").fetchall()
        for _ in range(3):
            if not rows or not fs.head:
                break
            tbl, key = rng.choice(rows)
            key = json.loads(key)
            key = tuple(key) if isinstance(key, list) else key
            at = rng.randint(1, fs.head)
            t = next(t for t in self.tables if t.name == tbl)
            with fs.at(at) as v:
                then = v[tbl].get(key)
            now = fs.view[tbl].get(key)
            kind, res = self.dispatch_both(lambda s: s.restore(tbl, key, at=at))
            if kind == "ok":
                did += 1
                got = key_as_wanted(t, fs.view[tbl].get(key), then)
                if nocase_pk(t):
                    got = json.loads(json.dumps(got).lower()) if got else got
                    then = json.loads(json.dumps(then).lower()) if then else then
                if trow(got) != trow(then):
                    self.fail("restore-at:row-differs", f"{tbl} {key!r} at={at} got={got!r} "
                                                        f"want={then!r}")
            else:
                msg = str(res)
                if "already as it was" in msg and trow(now) != trow(then):
                    self.fail("restore-at:already-but-differs", f"{tbl} {key!r} at={at} now={now!r} "
                                                                f"then={then!r}")
                if "did not exist" in msg and then is not None and not nocase_pk(t):
                    self.fail("restore-at:did-not-exist-but-did", f"{tbl} {key!r} at={at} then={then!r}")
                self.stats["restore_at_refused:" + type(res).__name__ + ":" + msg[:40]] += 1
        if did:
            self.verify_all("verify-after-restore")
            live = model_state(fs.view, self.tables)
            for mirror in self.mirrors:
                for t in self.tables:
                    got = sorted(map(repr, (trow(r) for r in mirror[t.name].values())))
                    want = sorted(map(repr, live[t.name]))
                    if got != want:
                        self.fail("mirror-vs-live-after-restore", f"{t.name}: {got}\n{want}")
            head = fs.head
            self.check_past(head, ":after-restore", sorted({head, head - 1, max(0, head - did - 1)}))


def diff_states(a, b):
    out = []
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            x, y = a.get(name), b.get(name)
            if isinstance(x, list) and isinstance(y, list):
                sx, sy = set(map(repr, x)), set(map(repr, y))
                out.append(f"{name}: only left {sorted(sx - sy)[:4]}\n   only right {sorted(sy - sx)[:4]}")
            else:
                out.append(f"{name}: {x!r} != {y!r}")
    return "\n".join(out)[:3000]


# ----------------------------------------------------------------------------
# cases: generation, serialisation
# ----------------------------------------------------------------------------


def spec_dict(t):
    d = dict(t.__dict__)
    d["cols"] = [dict(c.__dict__) for c in t.cols]
    return d


def rebuild_spec(d):
    t = TableSpec(d["name"])
    for k, v in d.items():
        if k != "cols":
            setattr(t, k, v)
    t.cols = []
    for cd in d["cols"]:
        c = Col(cd["name"], cd["decl"])
        c.__dict__.update(cd)
        t.cols.append(c)
    return t


def gen_case(seed):
    rng = random.Random(seed)
    tables = gen_schema(rng)
    steps = gen_events(rng, tables)
    return {"seed": seed, "schema": schema_sql(tables), "tables": [spec_dict(t) for t in tables],
            "steps": steps}


def run_case(case, tmpdir, stats=None):
    stats = stats if stats is not None else collections.Counter()
    return Run(case, tmpdir, stats).run()


def shrink(case, prefix, tmpdir):
    """Greedy: drop steps, then ops, then tables' extra columns, while a failure whose
    signature starts with ``prefix`` still happens."""
    def fails(c):
        try:
            return any(prefix in sig for sig, _ in run_case(c, tmpdir))
        except Exception:  # noqa: BLE001
            return False
    assert fails(case), "does not reproduce"
    changed = True
    while changed:
        changed = False
        i = 0
        while i < len(case["steps"]):
            c = copy.deepcopy(case)
            del c["steps"][i]
            if fails(c):
                case, changed = c, True
            else:
                i += 1
        for i, step in enumerate(case["steps"]):
            lists = [step["ops"]] if step["kind"] == "one" else step.get("events", [])
            for li in range(len(lists)):
                j = 0
                while j < len(lists[li]) and len(lists[li]) > 1:
                    c = copy.deepcopy(case)
                    cl = [c["steps"][i]["ops"]] if step["kind"] == "one" else c["steps"][i]["events"]
                    del cl[li][j]
                    if fails(c):
                        case, changed = c, True
                        lists = [case["steps"][i]["ops"]] if step["kind"] == "one" else case["steps"][i]["events"]
                    else:
                        j += 1
            if step["kind"] == "many" and len(step["events"]) > 1:
                for li in range(len(step["events"])):
                    c = copy.deepcopy(case)
                    del c["steps"][i]["events"][li]
                    if fails(c):
                        case, changed = c, True
                        break
            if step["kind"] == "many" and len(case["steps"][i]["events"]) == 1:
                c = copy.deepcopy(case)
                c["steps"][i] = {"kind": "one", "ops": case["steps"][i]["events"][0]}
                if fails(c):
                    case, changed = c, True
        # values: drop columns from rows
        for i, step in enumerate(case["steps"]):
            if step["kind"] != "one":
                continue
            for j, op in enumerate(step["ops"]):
                if isinstance(op[3], dict):
                    for col in list(op[3]):
                        c = copy.deepcopy(case)
                        del c["steps"][i]["ops"][j][3][col]
                        if fails(c):
                            case, changed = c, True
    return case


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shrink", nargs=2, metavar=("CASE", "SIG_PREFIX"))
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=0)
    ap.add_argument("--allow", nargs="*", default=[])
    ap.add_argument("--case")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "fluxlite-fuzz"))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    ALLOW.update(KNOWN if "all" in args.allow else args.allow)
    os.makedirs(args.out, exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix="fuzz-")
    stats = collections.Counter()
    sigs = collections.Counter()
    first = {}
    start = time.time()
    try:
        if args.shrink:
            with open(args.shrink[0]) as f:
                case = json.load(f)
            small = shrink(case, args.shrink[1], tmpdir)
            print(small["schema"])
            for st in small["steps"]:
                print(json.dumps(st))
            with open(args.shrink[0].replace(".json", ".small.json"), "w") as f:
                json.dump(small, f)
            for sig, detail in run_case(small, tmpdir):
                print(sig, "\n", detail)
            return
        if args.case:
            with open(args.case) as f:
                case = json.load(f)
            for sig, detail in run_case(case, tmpdir, stats):
                print(sig, "\n", detail)
            return
        n = 0
        for i in range(args.runs):
            if args.minutes and time.time() - start > args.minutes * 60:
                break
            seed = args.seed + i
            case = gen_case(seed)
            try:
                fails = run_case(case, tmpdir, stats)
            except Exception as exc:  # noqa: BLE001 - a bug in the fuzzer or fluxlite
                fails = [(f"harness:{type(exc).__name__}:{str(exc)[:60]}", traceback.format_exc())]
            n += 1
            stats["runs"] += 1
            seen_here = set()
            for sig, detail in fails:
                if sig in seen_here:
                    continue
                seen_here.add(sig)
                sigs[sig] += 1
                if sig not in first:
                    first[sig] = seed
                    fn = os.path.join(args.out, f"seed{seed}.json")
                    with open(fn, "w") as f:
                        json.dump(case, f)
                    if not args.quiet:
                        print(f"[seed {seed}] NEW {sig}\n  {detail[:1500]}", flush=True)
            if not args.quiet and n % 50 == 0:
                print(f"... {n} runs, {time.time() - start:.0f}s, failures {sum(sigs.values())}",
                      flush=True)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    print(f"\n== {stats['runs']} runs in {time.time() - start:.0f}s; events {stats['events']}, "
          f"accepted {stats['accepted']}, refused {stats['refused']}, at-checks {stats['at_checks']}, "
          f"history-checks {stats['history_checks']}, restores {stats['restores']}+{stats['restores_mid']} mid, "
          f"schemas refused {stats['schema_refused']}")
    print("== failure signatures (count, first seed):")
    for sig, c in sigs.most_common():
        print(f"  {c:5d}  seed {first[sig]:6d}  {sig}")
    if "-v" in sys.argv or os.environ.get("FUZZ_STATS"):
        for k, v in sorted(stats.items()):
            print(f"   {v:6d} {k}")


@pytest.mark.slow
@pytest.mark.torture
def test_random_schemas_keep_the_past(tmp_path, torture_scale, figure):
    runs = 600 if torture_scale == "full" else 25
    seed = int(os.environ.get("TORTURE_SEED", random.randrange(10**6)))
    stats, failures = collections.Counter(), []
    for i in range(runs):
        case = gen_case(seed + i)
        try:
            fails = run_case(case, str(tmp_path), stats)
        except Exception:  # noqa: BLE001 - the fuzzer's own failure is a failure too
            fails = [("harness", traceback.format_exc())]
        failures += [(seed + i, sig, detail) for sig, detail in fails]
    figure(f"Fuzz: random schemas and values, the past ({runs} runs from seed {seed})",
           f"{stats['events']:,} events ({stats['refused']:,} ops refused), "
           f"{stats['at_checks']:,} at() checks, {stats['history_checks']:,} history checks, "
           f"{stats['restores'] + stats['restores_mid']:,} restores; {len(failures)} failures")
    assert not failures, "\n".join(
        f"seed {s} (TORTURE_SEED={s} to replay it): {sig}\n{detail[:1500]}"
        for s, sig, detail in failures[:5])


if __name__ == "__main__":
    main()
