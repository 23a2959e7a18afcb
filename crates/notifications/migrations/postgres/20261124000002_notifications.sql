-- One row per email, caused by one event.
CREATE TABLE notifications (
    id                TEXT PRIMARY KEY,
    -- The user the notification belongs to (canonical UUID, from the event):
    -- users list their own notifications by it, never by address, since an
    -- address can change hands.
    user_id           TEXT NOT NULL,
    -- Normalized (lower-case) address the email was sent to; admins list by it.
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

-- ListNotifications for a user: their rows in (created_at, id) order.
CREATE INDEX notifications_user_created_idx
    ON notifications (user_id, created_at DESC, id DESC);

-- ListNotifications for an admin: one recipient's rows in (created_at, id) order.
CREATE INDEX notifications_recipient_created_idx
    ON notifications (recipient, created_at DESC, id DESC);
