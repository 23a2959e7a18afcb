-- How many units of each product can still be reserved, and how many are
-- held by open reservations. A row exists once an admin set the stock; stock
-- is never deleted, so a reservation's products can always be found again.
CREATE TABLE stock (
    product_id TEXT PRIMARY KEY,
    available  BIGINT NOT NULL,
    reserved   BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    -- The last line of defence against overselling: a reservation racing
    -- past the application's `available >= $q` guard fails here instead.
    CONSTRAINT stock_quantities_not_negative CHECK (available >= 0 AND reserved >= 0)
);

-- One row per reservation id ever seen, including tombstones (released
-- before they were made: status 'released' and no items), so that a retried
-- or late ReserveStock is answered from here and never reserves twice.
CREATE TABLE reservations (
    reservation_id TEXT PRIMARY KEY,
    status         TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    CONSTRAINT reservations_status_known CHECK (status IN ('reserved', 'committed', 'released'))
);

-- The units a reservation holds, one row per product (duplicates in a
-- request are merged before they get here).
CREATE TABLE reservation_items (
    reservation_id TEXT NOT NULL REFERENCES reservations (reservation_id),
    product_id     TEXT NOT NULL,
    quantity       BIGINT NOT NULL,
    PRIMARY KEY (reservation_id, product_id),
    CONSTRAINT reservation_items_quantity_positive CHECK (quantity > 0)
);
