-- Per-SVID revocation (issue 15): issued X509-SVIDs (so every SVID of an
-- entry can be revoked), revoked ones, and each CA's signed CRL. Rows are
-- pruned after the certificate's (or CA's) NotAfter, Unix seconds.
CREATE TABLE sigil_issuances (
    serial text COLLATE "C" PRIMARY KEY,
    spiffe_id text COLLATE "C" NOT NULL,
    not_after bigint NOT NULL,
    record jsonb NOT NULL
);
CREATE INDEX sigil_issuances_spiffe_id ON sigil_issuances (spiffe_id);
CREATE INDEX sigil_issuances_not_after ON sigil_issuances (not_after);

CREATE TABLE sigil_revocations (
    serial text COLLATE "C" PRIMARY KEY,
    not_after bigint NOT NULL,
    record jsonb NOT NULL
);

CREATE TABLE sigil_crls (
    issuer text COLLATE "C" PRIMARY KEY,
    number bigint NOT NULL,
    not_after bigint NOT NULL,
    record jsonb NOT NULL
);
