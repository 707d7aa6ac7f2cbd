-- The latest TokensRevoked per user: tokens of user_id with iat below
-- issued_before (Unix seconds) are refused. Pruned past the longest token
-- lifetime.
CREATE TABLE revocations (
    user_id       TEXT PRIMARY KEY,
    issued_before INTEGER NOT NULL,
    reason        TEXT NOT NULL
);
CREATE INDEX revocations_by_cutoff ON revocations (issued_before);

-- Users erased by DeleteUser: their aggregates are gone, and events about
-- them that arrive later (their messages' and comments' deletions) must not
-- bring a row back.
CREATE TABLE erased_users (
    user_id TEXT PRIMARY KEY
);
