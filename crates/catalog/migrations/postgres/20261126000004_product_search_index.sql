-- ListProducts' text query is `search_text LIKE '%<query>%'`: no B-tree can
-- serve a match in the middle of the text, so without this index every
-- search reads the whole table. A trigram index (pg_trgm, a trusted
-- extension shipped with PostgreSQL's contrib modules: the official images
-- and the embedded test server have it) answers LIKE with any query of 3 or
-- more characters from the index; shorter ones match so many products that
-- walking products_created_at_id_idx until the page is full is cheap. The
-- service bounds each search with a statement timeout besides.
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE INDEX products_search_text_trgm_idx ON products USING gin (search_text gin_trgm_ops);
