-- One row per order. The status moves PENDING -> COMPLETED | FAILED and
-- COMPLETED -> CANCELLED; the store enforces the order of moves, the CHECK
-- only keeps unknown values out.
CREATE TABLE orders (
    id             TEXT PRIMARY KEY,
    user_id        TEXT NOT NULL,
    -- Chosen by the client: the same (user_id, request_id) is the same order,
    -- so a retried checkout can never create a second one.
    request_id     TEXT NOT NULL,
    status         TEXT NOT NULL
        CHECK (status IN ('PENDING', 'COMPLETED', 'CANCELLED', 'FAILED')),
    failure_reason TEXT NOT NULL DEFAULT '',
    -- Every line of an order is priced in this one currency.
    currency       TEXT NOT NULL,
    total_minor    INTEGER NOT NULL CHECK (total_minor > 0),
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    CONSTRAINT orders_user_request_key UNIQUE (user_id, request_id)
);

-- ListOrders: a user's orders newest first, resumed from a (created_at, id) cursor.
CREATE INDEX orders_user_created_idx ON orders (user_id, created_at DESC, id DESC);

-- The lines of an order, written once with it and never changed.
CREATE TABLE order_items (
    order_id         TEXT NOT NULL REFERENCES orders (id),
    -- Position in the order as placed, so lines read back in the same order.
    line             INTEGER NOT NULL,
    product_id       TEXT NOT NULL,
    quantity         INTEGER NOT NULL CHECK (quantity > 0),
    -- In the order's currency, as priced when the order was placed.
    unit_price_minor INTEGER NOT NULL CHECK (unit_price_minor > 0),
    PRIMARY KEY (order_id, line)
);
