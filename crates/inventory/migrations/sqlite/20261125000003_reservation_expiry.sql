-- Reservations expire: a reservation not committed by `expires_at`
-- (microseconds since the epoch) is released by inventory's sweeper, so
-- that stock held by a checkout that never finishes comes back. NULL for
-- tombstones, which hold nothing.
ALTER TABLE reservations ADD COLUMN expires_at INTEGER;
-- Set when the sweeper released the reservation because it expired (status
-- 'released'): a late CommitReservation may then take the units again,
-- where a reservation released by ReleaseReservation stays released.
ALTER TABLE reservations ADD COLUMN expired_at INTEGER;
-- Reservations made before expiry existed get the default lifetime (900 s).
UPDATE reservations SET expires_at = created_at + 900000000 WHERE status = 'reserved';
-- The sweeper's question: which open reservations are past their time.
CREATE INDEX reservations_open_by_expiry ON reservations (expires_at) WHERE status = 'reserved';
