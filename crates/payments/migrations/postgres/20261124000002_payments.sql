-- One row per payment id. The primary key is the idempotency guard: of two
-- concurrent charges with one id, the second insert fails and that attempt
-- re-reads the first one's outcome instead of charging again.
CREATE TABLE payments (
    id               TEXT PRIMARY KEY,
    user_id          TEXT NOT NULL,
    currency_code    TEXT NOT NULL,
    amount_minor     BIGINT NOT NULL CHECK (amount_minor > 0),
    -- 'processing' exists only inside the charging transaction, between the
    -- insert that claims the id and the provider's answer; it is never
    -- committed.
    status           TEXT NOT NULL
        CHECK (status IN ('processing', 'succeeded', 'declined', 'refunded')),
    -- The only part of the card number that is kept.
    card_last4       TEXT NOT NULL,
    -- SHA-256 of the number salted with the payment id: recognises a retry
    -- with the same card without storing the card.
    decline_reason   TEXT NOT NULL DEFAULT '',
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);

-- The simulated provider's books: one row per operation it performed.
-- At most one of each kind per payment, so even a bug above cannot charge
-- or refund a payment twice.
CREATE TABLE provider_ledger (
    id                 TEXT PRIMARY KEY,
    payment_id         TEXT NOT NULL REFERENCES payments (id),
    operation          TEXT NOT NULL CHECK (operation IN ('charge', 'decline', 'refund')),
    currency_code      TEXT NOT NULL,
    amount_minor       BIGINT NOT NULL,
    provider_reference TEXT NOT NULL,
    occurred_at        BIGINT NOT NULL,
    CONSTRAINT provider_ledger_payment_operation_key UNIQUE (payment_id, operation)
);
