# Test shim (newsqlite review): `import sqlite3` gives pysqlite3-binary, which
# bundles a newer SQLite (3.51.1). pysqlite3's Connection lacks iterdump() (the
# tests use it to compare files), so connections get it from CPython's dump.py.
import sys
import pysqlite3.dbapi2 as _m

import importlib.util
import os
import sysconfig

# CPython's dump.py, loaded by path: importing the sqlite3 package would load
# the system's _sqlite3 (SQLite 3.40.1) into the process beside pysqlite3's.
_spec = importlib.util.spec_from_file_location(
    "_shim_sqlite3_dump", os.path.join(sysconfig.get_paths()["stdlib"], "sqlite3", "dump.py"))
_dump = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_dump)
_iterdump = _dump._iterdump


class _Connection(_m.Connection):
    def iterdump(self):
        return _iterdump(self)


_connect = _m.connect


def connect(*args, **kwargs):
    kwargs.setdefault("factory", _Connection)
    return _connect(*args, **kwargs)


_m.connect = connect
sys.modules["sqlite3"] = _m
sys.modules["sqlite3.dbapi2"] = _m
