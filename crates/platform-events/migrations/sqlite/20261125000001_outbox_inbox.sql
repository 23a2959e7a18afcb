-- The transactional outbox: one row per domain event, inserted in the same
-- transaction as the state change it describes. The relay publishes rows in
-- id order per aggregate and marks them published; nothing else writes here.
CREATE TABLE event_outbox (
    -- Insertion order. Never used as a polling cursor: the relay scans
    -- `published_at IS NULL`.
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    -- ce-id and Nats-Msg-Id: a UUIDv7.
    event_id          TEXT NOT NULL UNIQUE,
    subject           TEXT NOT NULL,
    event_type        TEXT NOT NULL,
    aggregate_id      TEXT NOT NULL,
    aggregate_version INTEGER NOT NULL,
    payload           BLOB NOT NULL,
    -- W3C trace context of the transaction that wrote the row.
    traceparent       TEXT,
    tracestate        TEXT,
    occurred_at       INTEGER NOT NULL,
    published_at      INTEGER,
    attempts          INTEGER NOT NULL DEFAULT 0,
    last_error        TEXT
);

CREATE INDEX event_outbox_unpublished ON event_outbox (id) WHERE published_at IS NULL;
CREATE INDEX event_outbox_published_at ON event_outbox (published_at) WHERE published_at IS NOT NULL;

-- The inbox of idempotent consumers: one row per (consumer, event) applied,
-- written in the same transaction as the consumer's side effect.
CREATE TABLE event_inbox (
    consumer     TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    subject      TEXT NOT NULL,
    received_at  INTEGER NOT NULL,
    PRIMARY KEY (consumer, event_id)
);

CREATE INDEX event_inbox_received_at ON event_inbox (received_at);
