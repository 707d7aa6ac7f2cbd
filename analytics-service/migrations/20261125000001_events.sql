-- Every event ever applied, keyed by its id: the unique key is what makes
-- RecordEvents idempotent (a redelivered event hits ON CONFLICT DO NOTHING).
CREATE TABLE events (
    event_id    TEXT PRIMARY KEY,
    producer    TEXT NOT NULL,
    kind        TEXT NOT NULL,
    occurred_at INTEGER NOT NULL, -- Unix milliseconds
    message_id  TEXT,
    payload     TEXT NOT NULL     -- the event as JSON, for replays
);

-- TopMessages: comments added in a window, per message.
CREATE INDEX events_by_kind_time ON events (kind, occurred_at, message_id);

-- Aggregates, maintained in the same transaction as the event rows.
CREATE TABLE user_stats (
    user_id                 TEXT PRIMARY KEY,
    message_count           INTEGER NOT NULL DEFAULT 0,
    comment_count           INTEGER NOT NULL DEFAULT 0,
    follower_count          INTEGER NOT NULL DEFAULT 0,
    following_count         INTEGER NOT NULL DEFAULT 0,
    comments_received_count INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE message_stats (
    message_id    TEXT PRIMARY KEY,
    author_id     TEXT,
    comment_count INTEGER NOT NULL DEFAULT 0,
    deleted       INTEGER NOT NULL DEFAULT 0
);

-- One row per minute with activity; coarser buckets are sums of these.
CREATE TABLE activity (
    minute           INTEGER PRIMARY KEY, -- Unix minutes
    messages_posted  INTEGER NOT NULL DEFAULT 0,
    comments_added   INTEGER NOT NULL DEFAULT 0,
    users_registered INTEGER NOT NULL DEFAULT 0,
    follows          INTEGER NOT NULL DEFAULT 0
);
