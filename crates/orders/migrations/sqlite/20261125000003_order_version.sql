-- Each order's version: 1 when placed, one more per status change, carried
-- by its events so a consumer can tell which of two is the newer.
ALTER TABLE orders ADD COLUMN version BIGINT NOT NULL DEFAULT 1;
