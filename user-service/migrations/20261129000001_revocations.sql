-- The latest revocation per user, written in the same transaction as the
-- TokensRevoked event it mirrors (deleted users included, whose rows in
-- `users` are gone): what ListRevocations serves to a service catching up
-- after an outage. Read in (issued_before, user_id) order from a horizon.
CREATE TABLE revocations (
    user_id       UUID PRIMARY KEY,
    issued_before TIMESTAMPTZ NOT NULL,
    reason        TEXT NOT NULL
);
CREATE INDEX revocations_by_cutoff ON revocations (issued_before, user_id);
