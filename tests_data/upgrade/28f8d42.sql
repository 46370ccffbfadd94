-- A store made by fluxlite.py of commit 28f8d42 (git show 28f8d42:fluxlite.py),
-- written out by the sqlite3 module's iterdump(); the header's marks first.
PRAGMA user_version = 1;
PRAGMA application_id = 1179408468;
BEGIN TRANSACTION;
CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        payload TEXT,
        meta TEXT,
        ts TEXT NOT NULL
    );
INSERT INTO "events" VALUES(1,'id-1','add','{"name":"ann"}','{"actor":"alice"}','2026-01-02T03:04:05.123456+00:00');
INSERT INTO "events" VALUES(2,'id-2','add','{"name":"bob"}','{}','2026-01-02T03:04:06.123456+00:00');
INSERT INTO "events" VALUES(3,'id-3','grant','{"name":"ann","role":"admin"}','{}','2026-01-02T03:04:07.123456+00:00');
INSERT INTO "events" VALUES(4,'id-4','pair','{"a":"x","b":1,"v":0.5}','{}','2026-01-02T03:04:08.123456+00:00');
INSERT INTO "events" VALUES(5,'id-5','pair','{"a":"x","b":1,"v":"é"}','{}','2026-01-02T03:04:09.123456+00:00');
INSERT INTO "events" VALUES(6,'id-6','drop','{"name":"bob"}','{}','2026-01-02T03:04:10.123456+00:00');
CREATE TABLE fluxlite_journal (
        seq INTEGER NOT NULL,
        n INTEGER NOT NULL,
        tbl TEXT NOT NULL,
        key TEXT NOT NULL,
        op TEXT NOT NULL,
        before TEXT,
        after TEXT,
        PRIMARY KEY (seq, n)
    ) WITHOUT ROWID;
INSERT INTO "fluxlite_journal" VALUES(1,0,'users','"ann"','insert',NULL,'{"name":"ann","role":null}');
INSERT INTO "fluxlite_journal" VALUES(2,0,'users','"bob"','insert',NULL,'{"name":"bob","role":null}');
INSERT INTO "fluxlite_journal" VALUES(3,0,'users','"ann"','update','{"name":"ann","role":null}','{"name":"ann","role":"admin"}');
INSERT INTO "fluxlite_journal" VALUES(4,0,'pairs','["x",1]','insert',NULL,'{"a":"x","b":1,"v":0.5}');
INSERT INTO "fluxlite_journal" VALUES(5,0,'pairs','["x",1]','update','{"a":"x","b":1,"v":0.5}','{"a":"x","b":1,"v":"é"}');
INSERT INTO "fluxlite_journal" VALUES(6,0,'users','"bob"','delete','{"name":"bob","role":null}',NULL);
CREATE TABLE fluxlite_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
INSERT INTO "fluxlite_meta" VALUES('created_by','"fluxlite 0.1.0"');
INSERT INTO "fluxlite_meta" VALUES('format','1');
INSERT INTO "fluxlite_meta" VALUES('schema','"CREATE TABLE users (name TEXT PRIMARY KEY, role TEXT);\nCREATE TABLE pairs (a TEXT, b INTEGER, v, PRIMARY KEY (a, b))"');
INSERT INTO "fluxlite_meta" VALUES('tables','["pairs","users"]');
CREATE TABLE pairs (a TEXT, b INTEGER, v, PRIMARY KEY (a, b));
INSERT INTO "pairs" VALUES('x',1,'é');
CREATE TABLE users (name TEXT PRIMARY KEY, role TEXT);
INSERT INTO "users" VALUES('ann','admin');
CREATE INDEX fluxlite_events_type ON events (type, seq);
CREATE TRIGGER fluxlite_events_no_update BEFORE UPDATE ON events
       BEGIN SELECT RAISE(ABORT, 'fluxlite: the events log is append-only; UPDATE is refused'); END;
CREATE TRIGGER fluxlite_events_no_delete BEFORE DELETE ON events
       BEGIN SELECT RAISE(ABORT, 'fluxlite: the events log is append-only; DELETE is refused'); END;
CREATE INDEX fluxlite_journal_row ON fluxlite_journal (tbl, key, seq);
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('events',6);
COMMIT;
