#!/usr/bin/env bash
# Build SQLite 3.40.1 (Debian 12's source) without the JSON functions, as DIR/lib/
# libsqlite3.so.0, for Python's _sqlite3 to load in place of the system's through
# LD_LIBRARY_PATH: fluxlite's fallbacks for such a build (-DSQLITE_OMIT_JSON, or a
# SQLite before 3.38 without JSON1) then run for real, not monkeypatched. Debian's
# own options (debian/rules) otherwise, so that only the JSON functions differ.
# About 80 s on two cores (the compile of the amalgamation is most of it); needs
# curl, tclsh (make sqlite3.c), gcc and make. Exits 2, having built nothing, when
# the archive cannot be reached.
set -euo pipefail
dir=${1:?usage: build.sh DIR}
orig=sqlite3_3.40.1.orig.tar.xz
# The sha256 that sqlite3_3.40.1-2+deb12u2.dsc (Debian 12) publishes for it:
sum=aaa776260ab4dc976db34aa7891819484c8676b5b2783123ebc6301e2ca5d655
mkdir -p "$dir/lib"
if ! curl -fsS --retry 3 -o "$dir/$orig" \
    "https://deb.debian.org/debian/pool/main/s/sqlite3/$orig"; then
  exit 2
fi
echo "$sum  $dir/$orig" | sha256sum -c --quiet -
tar -xJf "$dir/$orig" -C "$dir"
(cd "$dir/sqlite3-3.40.1" && ./configure >/dev/null && make sqlite3.c >/dev/null)
# Debian's CFLAGS less -DSQLITE_ENABLE_JSON1, plus FTS4/FTS5 (its --enable-fts4/5)
# and DESERIALIZE (Python 3.11's _sqlite3 needs sqlite3_deserialize).
gcc -shared -fPIC -O2 -fno-strict-aliasing \
  -DSQLITE_OMIT_JSON -DSQLITE_ENABLE_DESERIALIZE \
  -DSQLITE_SECURE_DELETE -DSQLITE_ENABLE_COLUMN_METADATA \
  -DSQLITE_ENABLE_FTS3 -DSQLITE_ENABLE_FTS3_PARENTHESIS -DSQLITE_ENABLE_FTS4 \
  -DSQLITE_ENABLE_FTS5 -DSQLITE_ENABLE_RTREE=1 -DSQLITE_SOUNDEX=1 \
  -DSQLITE_ENABLE_UNLOCK_NOTIFY -DSQLITE_OMIT_LOOKASIDE=1 -DSQLITE_ENABLE_DBSTAT_VTAB \
  -DSQLITE_ALLOW_ROWID_IN_VIEW -DSQLITE_ENABLE_UPDATE_DELETE_LIMIT=1 \
  -DSQLITE_ENABLE_LOAD_EXTENSION -DSQLITE_LIKE_DOESNT_MATCH_BLOBS -DSQLITE_THREADSAFE=1 \
  -DSQLITE_ENABLE_FTS3_TOKENIZER=1 -DSQLITE_USE_URI=1 -DSQLITE_MAX_SCHEMA_RETRY=25 \
  -DSQLITE_ENABLE_PREUPDATE_HOOK -DSQLITE_ENABLE_SESSION -DSQLITE_ENABLE_STMTVTAB \
  -DSQLITE_MAX_VARIABLE_NUMBER=250000 \
  "$dir/sqlite3-3.40.1/sqlite3.c" -Wl,-soname,libsqlite3.so.0 \
  -o "$dir/lib/libsqlite3.so.0" -lpthread -ldl -lm
