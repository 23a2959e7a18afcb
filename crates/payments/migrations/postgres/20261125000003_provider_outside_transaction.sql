-- The provider is no longer called inside the charging transaction. A charge
-- now claims its payment id by committing the row as 'processing', calls the
-- provider with no transaction open, then settles the row with a conditional
-- update. So, unlike what the first migration says, 'processing' IS
-- committed, and outlives a crash until a retry, a refund or the sweeper
-- settles it. A refund of an id that was never charged records a tombstone:
-- 'voided', without user, amount or card.
ALTER TABLE payments DROP CONSTRAINT payments_status_check;
ALTER TABLE payments ADD CONSTRAINT payments_status_known
    CHECK (status IN ('processing', 'succeeded', 'declined', 'refunded', 'voided'));
ALTER TABLE payments DROP CONSTRAINT payments_amount_minor_check;
ALTER TABLE payments ADD CONSTRAINT payments_amount_positive
    CHECK (amount_minor > 0 OR (status = 'voided' AND amount_minor = 0));
-- The sweeper's question: which payments have been processing for too long.
CREATE INDEX payments_processing_since ON payments (updated_at) WHERE status = 'processing';

-- The simulated provider's books belong to the provider, as a real
-- provider's would (elsewhere): they no longer point at payments, they are
-- keyed by the idempotency key the service sends (its payment id), they
-- remember why a card was declined, and they record voids.
ALTER TABLE provider_ledger DROP CONSTRAINT provider_ledger_payment_id_fkey;
ALTER TABLE provider_ledger RENAME COLUMN payment_id TO idempotency_key;
ALTER TABLE provider_ledger DROP CONSTRAINT provider_ledger_operation_check;
ALTER TABLE provider_ledger ADD CONSTRAINT provider_ledger_operation_known
    CHECK (operation IN ('charge', 'decline', 'void', 'refund'));
ALTER TABLE provider_ledger ADD COLUMN decline_reason TEXT NOT NULL DEFAULT '';
UPDATE provider_ledger SET decline_reason = payments.decline_reason
    FROM payments
    WHERE payments.id = provider_ledger.idempotency_key
      AND provider_ledger.operation = 'decline';
-- One outcome per key, whichever came first: a charge, a decline or a void.
-- (provider_ledger_payment_operation_key, now on (idempotency_key,
-- operation), still allows one refund per key.)
CREATE UNIQUE INDEX provider_ledger_one_outcome ON provider_ledger (idempotency_key)
    WHERE operation IN ('charge', 'decline', 'void');
