-- The provider is no longer called inside the charging transaction. A charge
-- now claims its payment id by committing the row as 'processing', calls the
-- provider with no transaction open, then settles the row with a conditional
-- update. So, unlike what the first migration says, 'processing' IS
-- committed, and outlives a crash until a retry, a refund or the sweeper
-- settles it. A refund of an id that was never charged records a tombstone:
-- 'voided', without user, amount or card.
--
-- SQLite cannot alter a CHECK constraint or drop a foreign key: both tables
-- are rebuilt, the ledger first (it referenced payments), then payments
-- (once nothing references it).

-- The simulated provider's books belong to the provider, as a real
-- provider's would (elsewhere): they no longer point at payments, they are
-- keyed by the idempotency key the service sends (its payment id), they
-- remember why a card was declined, and they record voids.
CREATE TABLE provider_ledger_rebuilt (
    id                 TEXT PRIMARY KEY,
    idempotency_key    TEXT NOT NULL,
    operation          TEXT NOT NULL
        CHECK (operation IN ('charge', 'decline', 'void', 'refund')),
    currency_code      TEXT NOT NULL,
    amount_minor       INTEGER NOT NULL,
    provider_reference TEXT NOT NULL,
    occurred_at        INTEGER NOT NULL,
    decline_reason     TEXT NOT NULL DEFAULT '',
    CONSTRAINT provider_ledger_payment_operation_key UNIQUE (idempotency_key, operation)
);
INSERT INTO provider_ledger_rebuilt (id, idempotency_key, operation, currency_code,
    amount_minor, provider_reference, occurred_at, decline_reason)
SELECT l.id, l.payment_id, l.operation, l.currency_code, l.amount_minor,
    l.provider_reference, l.occurred_at,
    CASE WHEN l.operation = 'decline'
        THEN COALESCE((SELECT p.decline_reason FROM payments p WHERE p.id = l.payment_id), '')
        ELSE '' END
FROM provider_ledger l;
DROP TABLE provider_ledger;
ALTER TABLE provider_ledger_rebuilt RENAME TO provider_ledger;
-- One outcome per key, whichever came first: a charge, a decline or a void.
-- (The unique (idempotency_key, operation) still allows one refund per key.)
CREATE UNIQUE INDEX provider_ledger_one_outcome ON provider_ledger (idempotency_key)
    WHERE operation IN ('charge', 'decline', 'void');

CREATE TABLE payments_rebuilt (
    id               TEXT PRIMARY KEY,
    user_id          TEXT NOT NULL,
    currency_code    TEXT NOT NULL,
    amount_minor     INTEGER NOT NULL,
    status           TEXT NOT NULL,
    card_last4       TEXT NOT NULL,
    decline_reason   TEXT NOT NULL DEFAULT '',
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    CONSTRAINT payments_status_known
        CHECK (status IN ('processing', 'succeeded', 'declined', 'refunded', 'voided')),
    CONSTRAINT payments_amount_positive
        CHECK (amount_minor > 0 OR (status = 'voided' AND amount_minor = 0))
);
INSERT INTO payments_rebuilt (id, user_id, currency_code, amount_minor, status, card_last4,
    decline_reason, created_at, updated_at)
SELECT id, user_id, currency_code, amount_minor, status, card_last4, decline_reason,
    created_at, updated_at
FROM payments;
DROP TABLE payments;
ALTER TABLE payments_rebuilt RENAME TO payments;
-- The sweeper's question: which payments have been processing for too long.
CREATE INDEX payments_processing_since ON payments (updated_at) WHERE status = 'processing';
