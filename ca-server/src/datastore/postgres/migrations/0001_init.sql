-- Sigil schema version 1. Applied once, in one transaction, under the
-- migration advisory lock (see schema.rs). Text keys use the "C" collation
-- so that ORDER BY matches the byte order the sled store lists in.

-- The revision counter: one row, locked by every mutation for the rest of
-- its transaction, so revisions are handed out in commit order without gaps.
-- `floor`: every change with a revision above it is still in sigil_changes.
CREATE TABLE sigil_revision (
    id smallint PRIMARY KEY CHECK (id = 1),
    rev bigint NOT NULL,
    floor bigint NOT NULL
);
INSERT INTO sigil_revision (id, rev, floor) VALUES (1, 0, 0);

-- The change feed: one row per revision, the serialized change.
CREATE TABLE sigil_changes (
    rev bigint PRIMARY KEY,
    change jsonb NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sigil_entries (
    id text COLLATE "C" PRIMARY KEY,
    -- SPIFFE ID, parent and selectors: one registration, one entry.
    entry_key bytea NOT NULL UNIQUE,
    spiffe_id text COLLATE "C" NOT NULL,
    parent_id text COLLATE "C" NOT NULL,
    owner text COLLATE "C" NOT NULL,
    revision bigint NOT NULL,
    body jsonb NOT NULL
);
CREATE INDEX sigil_entries_parent ON sigil_entries (parent_id);
CREATE INDEX sigil_entries_spiffe_id ON sigil_entries (spiffe_id);

CREATE TABLE sigil_agents (
    id text COLLATE "C" PRIMARY KEY,
    banned boolean NOT NULL,
    -- Unix seconds of the agent SVID's expiry (pruning).
    expires_at bigint NOT NULL,
    body jsonb NOT NULL
);

CREATE TABLE sigil_join_tokens (
    hash text COLLATE "C" PRIMARY KEY,
    expires_at bigint NOT NULL,
    body jsonb NOT NULL
);

CREATE TABLE sigil_bundles (
    trust_domain text COLLATE "C" PRIMARY KEY,
    sequence bigint NOT NULL,
    body jsonb NOT NULL
);

-- The CA journal of each server replica, opaque to the datastore.
CREATE TABLE sigil_ca_journals (
    server_id text COLLATE "C" PRIMARY KEY,
    journal bytea NOT NULL
);

-- Audit records, one row per written batch keyed by its first sequence
-- number; `max_time` (Unix seconds, the latest event in it) for pruning.
CREATE TABLE sigil_audit (
    first_seq bigint PRIMARY KEY,
    max_time bigint NOT NULL,
    records jsonb NOT NULL
);

-- Where the audit chain stands: its head and (after pruning) its anchor.
CREATE TABLE sigil_audit_chain (
    id smallint PRIMARY KEY CHECK (id = 1),
    head_seq bigint NOT NULL,
    head_hash bytea NOT NULL,
    anchor_seq bigint,
    anchor_hash bytea
);
INSERT INTO sigil_audit_chain (id, head_seq, head_hash)
    VALUES (1, 0, '\x0000000000000000000000000000000000000000000000000000000000000000');

CREATE TABLE sigil_audit_checkpoints (
    size bigint PRIMARY KEY,
    note text NOT NULL
);
