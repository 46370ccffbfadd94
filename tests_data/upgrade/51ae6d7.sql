-- A store made by fluxlite.py of commit 51ae6d7 (git show 51ae6d7:fluxlite.py),
-- written out by the sqlite3 module's iterdump(); the header's marks first.
PRAGMA user_version = 2;
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
CREATE TABLE fluxlite_consumers (
    name TEXT PRIMARY KEY,
    position INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0
) WITHOUT ROWID;
INSERT INTO "fluxlite_consumers" VALUES('mailer',1,NULL,0.0);
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
INSERT INTO "fluxlite_meta" VALUES('format','2');
INSERT INTO "fluxlite_meta" VALUES('generation','0');
INSERT INTO "fluxlite_meta" VALUES('schema','"CREATE TABLE users (name TEXT PRIMARY KEY, role TEXT);\nCREATE TABLE pairs (a TEXT, b INTEGER, v, PRIMARY KEY (a, b))"');
INSERT INTO "fluxlite_meta" VALUES('tables','["pairs","users"]');
INSERT INTO "fluxlite_meta" VALUES('version','1');
CREATE TABLE fluxlite_seals (
        seq INTEGER PRIMARY KEY,
        events TEXT NOT NULL,
        journal TEXT NOT NULL
    );
INSERT INTO "fluxlite_seals" VALUES(1,'d9c8f21527c4e15df8bbe282f2919f965350f0043f8fdcb0645f7414ebf39a29','0ff0ba3395caea8086134cfdf7684cea87af159de906451a74e20fa109198356');
INSERT INTO "fluxlite_seals" VALUES(2,'a9444aa2ef55ffae02e8301eef03af5fea717fad0ea3d9ff574b0c24380004dd','1af211a599ce17b247b6444677e1be2464ee1842922085ebf97c1c8a11f309f2');
INSERT INTO "fluxlite_seals" VALUES(3,'9f323556fc35b977256fa2ac4491569dc880cbf198371c726a3bd41e73ca2dec','6dfebbc542c2bcd3a05bb30a7b09af395a416ae4ba8b3f37b6274c394c142287');
INSERT INTO "fluxlite_seals" VALUES(5,'88daa3f17482bb04e6e4643a18700a0123acb4b75ed3f0ef9f7556106fdc148b','5494aafc23eada1f54361d885f8fccdf505023ecfd9d84c3aa07b1ab627fd403');
INSERT INTO "fluxlite_seals" VALUES(6,'8834957d5418dddb28a828ab2e2276ce8e0f45a84a467c0cefcf30f69eff7f63','43ba267c414126ec782845a1ede998f998557db52efaafac78119992d9e94fd6');
CREATE TABLE pairs (a TEXT, b INTEGER, v, PRIMARY KEY (a, b));
INSERT INTO "pairs" VALUES('x',1,'é');
CREATE TABLE users (name TEXT PRIMARY KEY, role TEXT);
INSERT INTO "users" VALUES('ann','admin');
CREATE INDEX fluxlite_events_type ON events (type, seq);
CREATE TRIGGER fluxlite_events_no_update BEFORE UPDATE ON events
       BEGIN SELECT RAISE(ABORT, 'fluxlite: the events log is append-only; UPDATE is refused'); END;
CREATE TRIGGER fluxlite_events_no_delete BEFORE DELETE ON events
       BEGIN SELECT RAISE(ABORT, 'fluxlite: the events log is append-only; DELETE is refused'); END;
CREATE TRIGGER fluxlite_events_no_replace BEFORE INSERT ON events
       WHEN EXISTS (SELECT 1 FROM events WHERE seq = NEW.seq OR id = NEW.id)
       BEGIN SELECT RAISE(ABORT, 'fluxlite: the events log is append-only; REPLACE is refused'); END;
CREATE INDEX fluxlite_journal_row ON fluxlite_journal (tbl, key, seq);
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('events',6);
COMMIT;
