-- One row per email, caused by one event.
CREATE TABLE notifications (
    id                TEXT PRIMARY KEY,
    -- Normalized (lower-case) address; listed by it, newest first.
    recipient         TEXT NOT NULL,
    subject           TEXT NOT NULL,
    body_text         TEXT NOT NULL,
    -- SENDING while a sender owns delivery, then SENT or FAILED.
    status            TEXT NOT NULL,
    -- Why delivery failed; empty unless FAILED.
    failure_reason    TEXT NOT NULL,
    source_event_type TEXT NOT NULL,
    source_event_id   TEXT NOT NULL,
    -- Delivery attempts started; identifies the attempt that owns the claim.
    attempts          BIGINT NOT NULL,
    created_at        BIGINT NOT NULL,
    -- Last status change; a SENDING row not updated for a while was abandoned.
    updated_at        BIGINT NOT NULL,
    -- The idempotency key: one notification per event, however often delivered.
    CONSTRAINT notifications_source_event_id_key UNIQUE (source_event_id)
);

-- ListNotifications: one recipient's rows in (created_at, id) order.
CREATE INDEX notifications_recipient_created_idx
    ON notifications (recipient, created_at DESC, id DESC);
