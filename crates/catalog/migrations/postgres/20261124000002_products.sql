-- What the shop sells. Prices are integer minor units with their currency.
CREATE TABLE products (
    id                 TEXT PRIMARY KEY,
    sku                TEXT NOT NULL,
    name               TEXT NOT NULL,
    description        TEXT NOT NULL,
    price_currency     TEXT NOT NULL,
    price_amount_minor BIGINT NOT NULL,
    -- Lower-cased name and description, computed by the service (the same
    -- Unicode case folding on both backends) for ListProducts' `query`.
    search_text        TEXT NOT NULL,
    -- Microseconds since the epoch. created_at never changes: with id it is
    -- the pagination order (newest first).
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL,
    CONSTRAINT products_sku_key UNIQUE (sku)
);

CREATE INDEX products_created_at_id_idx ON products (created_at DESC, id DESC);

-- A product's categories, one row each, in the order they were given. A table
-- rather than a JSON column so that filtering by category uses an index.
CREATE TABLE product_categories (
    product_id TEXT NOT NULL REFERENCES products (id) ON DELETE CASCADE,
    position   BIGINT NOT NULL,
    category   TEXT NOT NULL,
    PRIMARY KEY (product_id, category)
);

CREATE INDEX product_categories_category_idx ON product_categories (category, product_id);
