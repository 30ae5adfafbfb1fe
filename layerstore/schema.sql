-- layerfs store index (SQLite, schema version 2). One file, STORE/index.db, in WAL mode (readers,
-- such as a mounted image, never wait for an import's commit). A failed import writes nothing
-- to it; a killed one leaves at most an uncommitted WAL tail that SQLite discards. Version: PRAGMA user_version.
-- Paths are BLOBs (tar names need not be UTF-8). Digests are TEXT 'sha256:<hex>'.

-- A layer: one DiffID, extracted once whatever number of images use it. A row exists only
-- once the whole blob was verified (blob digest and DiffID): there is no "incomplete" row;
-- an import in progress lives in STORE/tmp/ (see ingest.py) until its single commit.
CREATE TABLE layers (
    id            INTEGER PRIMARY KEY,   -- internal layer number, the `layer` of entries/xattrs
    diff_id       TEXT NOT NULL UNIQUE,  -- sha256 of the uncompressed tar (OCI DiffID)
    blob_digest   TEXT NOT NULL,         -- sha256 of the blob as first imported (= diff_id if uncompressed)
    media_type    TEXT NOT NULL,         -- media type of that blob's descriptor
    blob_size     INTEGER NOT NULL,      -- bytes of that blob
    tar_size      INTEGER NOT NULL,      -- bytes of the uncompressed tar
    files         INTEGER NOT NULL,      -- number of rows in entries for this layer
    logical_bytes INTEGER NOT NULL,      -- sum of regular-file sizes, each inode once
    new_bytes     INTEGER NOT NULL,      -- content bytes this layer added to the store (not deduped)
    imported      REAL NOT NULL,         -- unix time of the commit
    tarsplit      INTEGER NOT NULL       -- 1: STORE/tarsplit/<diff_id hex> rebuilds the exact tar
);

-- One name in one layer. Primary key (layer, parent, name): a lookup is one B-tree probe and
-- a directory listing one range scan, whatever the number of layers or images.
CREATE TABLE entries (
    layer     INTEGER NOT NULL REFERENCES layers(id),
    parent    BLOB NOT NULL,     -- absolute path of the directory: '/' for top-level names, '/etc' ...; '' for the root itself
    name      BLOB NOT NULL,     -- one path component ('' for the root itself)
    kind      INTEGER NOT NULL,  -- model.EntryKind: 1 file 2 dir 3 symlink 4 hardlink 5 char 6 block 7 fifo 8 socket 9 whiteout
    mode      INTEGER NOT NULL,  -- permission bits with setuid/setgid/sticky, no file-type bits
    uid       INTEGER NOT NULL,  -- numeric owner from the tar header (names are ignored)
    gid       INTEGER NOT NULL,  -- numeric group
    size      INTEGER NOT NULL,  -- content bytes (file/hardlink), target length (symlink), else 0
    mtime_ns  INTEGER NOT NULL,  -- modification time, nanoseconds since the epoch (PAX precision kept)
    rdev_major INTEGER,          -- char/block devices only
    rdev_minor INTEGER,          -- char/block devices only
    link      BLOB,              -- symlink target (verbatim, never resolved) or hard link target (absolute path in this layer)
    content   TEXT,              -- content key (file/hardlink): '<xxh3-128 hex>-<size>[.<n>]', file content/<key[:2]>/<key>
    opaque    INTEGER NOT NULL DEFAULT 0,  -- dirs: 1 hides every lower-layer child (.wh..wh..opq, or whiteout+dir in one layer)
    nlink     INTEGER NOT NULL DEFAULT 1,  -- names of this inode in this layer (hard links); 1 otherwise
    implicit  INTEGER NOT NULL DEFAULT 0,  -- dirs: 1 if the tar never listed it (missing parent): 0755 root:root, mtime 0
    nxattrs   INTEGER NOT NULL DEFAULT 0,  -- number of rows in xattrs for this entry
    PRIMARY KEY (layer, parent, name)
) WITHOUT ROWID;
CREATE INDEX entries_by_content ON entries(content) WHERE content IS NOT NULL;
-- The other names of a hard-linked inode (Store.layer_hardlinks).
CREATE INDEX entries_by_link ON entries(layer, link) WHERE kind = 4;

-- Extended attributes of entries (from PAX SCHILY.xattr.* / LIBARCHIVE.xattr.*).
CREATE TABLE xattrs (
    layer  INTEGER NOT NULL,
    parent BLOB NOT NULL,
    name   BLOB NOT NULL,
    key    BLOB NOT NULL,  -- attribute name, e.g. 'user.comment', 'security.capability'
    value  BLOB NOT NULL,  -- attribute value, raw bytes
    PRIMARY KEY (layer, parent, name, key)
) WITHOUT ROWID;

-- Stored contents (one plain uncompressed file each). refs = number of entries rows whose
-- content is this key (fsck checks it); gc deletes a content when refs reaches 0.
CREATE TABLE contents (
    key  TEXT PRIMARY KEY,
    size INTEGER NOT NULL,  -- bytes
    refs INTEGER NOT NULL   -- entries rows referencing it
) WITHOUT ROWID;

-- An image: its config (identity) and the manifest it was imported from.
CREATE TABLE images (
    id              TEXT PRIMARY KEY,  -- sha256 of the config blob = docker image ID
    config          BLOB NOT NULL,     -- the config JSON, byte-exact
    manifest_digest TEXT NOT NULL,     -- sha256 of the manifest first imported for it
    manifest        BLOB NOT NULL,     -- that manifest JSON, byte-exact
    media_type      TEXT NOT NULL,     -- its media type (OCI or Docker v2 schema 2)
    platform        TEXT NOT NULL,     -- 'os/arch[/variant]' from the config
    created         TEXT NOT NULL,     -- config 'created' ('' if absent)
    size            INTEGER NOT NULL,  -- sum of its layers' tar_size
    imported        REAL NOT NULL      -- unix time of the import
);

-- The layers of an image, bottom first (position 0 is the base layer).
CREATE TABLE image_layers (
    image    TEXT NOT NULL REFERENCES images(id),
    position INTEGER NOT NULL,  -- 0 = bottom
    layer    INTEGER NOT NULL REFERENCES layers(id),
    PRIMARY KEY (image, position)
) WITHOUT ROWID;
CREATE INDEX image_layers_by_layer ON image_layers(layer);

-- Mutable names: 'repo:tag' -> image.
CREATE TABLE tags (
    name  TEXT PRIMARY KEY,  -- e.g. 'docker.io/library/busybox:latest' or 'demo:1'
    image TEXT NOT NULL REFERENCES images(id)
) WITHOUT ROWID;

-- Immutable names: 'repo@sha256:<manifest digest>' -> image.
CREATE TABLE repo_digests (
    name  TEXT PRIMARY KEY,
    image TEXT NOT NULL REFERENCES images(id)
) WITHOUT ROWID;

PRAGMA user_version = 2;
