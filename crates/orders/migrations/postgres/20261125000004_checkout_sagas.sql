-- A stable, machine-readable reason beside the human one: the same code a
-- failed PlaceOrder carries as google.rpc.ErrorInfo (INSUFFICIENT_STOCK,
-- CARD_DECLINED, PAYMENT_UNAVAILABLE ...). Empty unless FAILED or CANCELLED.
ALTER TABLE orders ADD COLUMN failure_code TEXT NOT NULL DEFAULT '';

-- One checkout saga per order (same id). Each transition is a conditional
-- update on `version`, in the same transaction as its outbox events, so two
-- replicas can never both move one saga. The replica driving a saga holds a
-- lease (`lease_owner` until `lease_until`); a dead replica's sagas are
-- taken over once their lease has run out.
CREATE TABLE checkout_sagas (
    id              TEXT PRIMARY KEY REFERENCES orders (id),
    -- Where the saga is: RESERVING, CHARGING, CONFIRMING, COMMITTING,
    -- REFUNDING, RELEASING, CANCEL_REFUNDING, CANCEL_RESTOCKING (running) or
    -- COMPLETED, FAILED, CANCELLED (terminal).
    step            TEXT NOT NULL,
    -- Why the saga compensates or failed; empty while all goes well.
    failure_code    TEXT NOT NULL DEFAULT '',
    failure_message TEXT NOT NULL DEFAULT '',
    version         BIGINT NOT NULL,
    lease_owner     TEXT NOT NULL DEFAULT '',
    lease_until     BIGINT NOT NULL DEFAULT 0,
    -- The checkout must have reached CONFIRMING by then, or it compensates.
    deadline_at     BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);

-- The resumer's scan: running sagas whose lease has run out. Only running
-- sagas are indexed, so the index stays as small as the work in flight.
CREATE INDEX checkout_sagas_running_idx ON checkout_sagas (lease_until)
    WHERE step NOT IN ('COMPLETED', 'FAILED', 'CANCELLED');

-- What each step did and when, for `agora sagas show`: one row per step
-- left, written in the transaction that leaves it.
CREATE TABLE checkout_saga_steps (
    saga_id     TEXT NOT NULL REFERENCES checkout_sagas (id),
    seq         BIGINT NOT NULL,
    step        TEXT NOT NULL,
    -- ok, or the failure code that ended the step.
    outcome     TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT '',
    started_at  BIGINT NOT NULL,
    finished_at BIGINT NOT NULL,
    PRIMARY KEY (saga_id, seq)
);
