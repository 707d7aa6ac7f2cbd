-- The transactional outbox: events written in the same transaction as the
-- change that caused them, one row per destination, deleted once that
-- destination acknowledged them.
CREATE TABLE outbox (
    id          BIGSERIAL PRIMARY KEY,
    destination TEXT NOT NULL,
    event_id    UUID NOT NULL,
    event       TEXT NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    UNIQUE (destination, event_id)
);

CREATE INDEX outbox_by_destination ON outbox (destination, id);
