-- Each product's version: one more per update, carried by its events
-- (ProductPriceChanged), so a consumer can tell the newer of two changes.
ALTER TABLE products ADD COLUMN version BIGINT NOT NULL DEFAULT 1;
