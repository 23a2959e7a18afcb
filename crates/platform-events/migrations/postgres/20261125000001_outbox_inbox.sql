-- The transactional outbox: one row per domain event, inserted in the same
-- transaction as the state change it describes. The relay publishes rows in
-- id order per aggregate and marks them published; nothing else writes here.
CREATE TABLE event_outbox (
    -- Insertion order. Never used as a polling cursor (a transaction that took
    -- a lower id may commit later): the relay scans `published_at IS NULL`.
    id                BIGSERIAL PRIMARY KEY,
    -- ce-id and Nats-Msg-Id: a UUIDv7.
    event_id          TEXT NOT NULL UNIQUE,
    subject           TEXT NOT NULL,
    event_type        TEXT NOT NULL,
    aggregate_id      TEXT NOT NULL,
    aggregate_version BIGINT NOT NULL,
    payload           BYTEA NOT NULL,
    -- W3C trace context of the transaction that wrote the row, so the relay
    -- publishes under the original trace.
    traceparent       TEXT,
    tracestate        TEXT,
    occurred_at       BIGINT NOT NULL,
    published_at      BIGINT,
    -- Failed publish attempts, and the last error, for operators.
    attempts          INTEGER NOT NULL DEFAULT 0,
    last_error        TEXT
);

-- The relay's scan: only unpublished rows, in id order.
CREATE INDEX event_outbox_unpublished ON event_outbox (id) WHERE published_at IS NULL;
-- Pruning published rows after their retention.
CREATE INDEX event_outbox_published_at ON event_outbox (published_at) WHERE published_at IS NOT NULL;

-- The inbox of idempotent consumers: one row per (consumer, event) applied,
-- written in the same transaction as the consumer's side effect, so a
-- redelivered event is recognised and skipped.
CREATE TABLE event_inbox (
    consumer     TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    subject      TEXT NOT NULL,
    received_at  BIGINT NOT NULL,
    PRIMARY KEY (consumer, event_id)
);

CREATE INDEX event_inbox_received_at ON event_inbox (received_at);
