-- Events the relay set aside: rejected by their destination, or unreadable
-- by this version. Kept as stored, with the reason, until an operator sends
-- them back to the outbox (chirp outbox retry user-service). `id` is the
-- outbox row's id, so a retried event keeps its place in the order.
CREATE TABLE outbox_dead_letters (
    id          BIGINT PRIMARY KEY,
    destination TEXT NOT NULL,
    event_id    UUID NOT NULL,
    event       TEXT NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    reason      TEXT NOT NULL,
    failed_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX outbox_dead_letters_by_destination ON outbox_dead_letters (destination, id);
