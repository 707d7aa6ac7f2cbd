-- Accounts. Usernames are stored lower-case, so the unique index is the
-- case-insensitive uniqueness rule.
CREATE TABLE users (
    id            UUID PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE,
    display_name  TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'moderator', 'admin')),
    banned_at     TIMESTAMPTZ,
    ban_reason    TEXT,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The follow graph. The primary key serves "whom does X follow" in cursor
-- order; the second index serves "who follows X".
CREATE TABLE follows (
    follower_id UUID NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    followee_id UUID NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (follower_id, followee_id),
    CHECK (follower_id <> followee_id)
);

CREATE INDEX follows_by_followee ON follows (followee_id, follower_id);
