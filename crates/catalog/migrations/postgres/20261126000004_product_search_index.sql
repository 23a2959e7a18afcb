-- ListProducts' text query is `search_text LIKE '%<query>%'`: no B-tree can
-- serve a match in the middle of the text, so without this index every
-- search reads the whole table. A trigram index (pg_trgm, a trusted
-- extension shipped with PostgreSQL's contrib modules: the official images
-- and the embedded test server have it) answers LIKE with any query of 3 or
-- more characters from the index; shorter ones match so many products that
-- walking products_created_at_id_idx until the page is full is cheap. The
-- service bounds each search with a statement timeout besides.
--
-- Creating the extension needs the CREATE privilege on the database (which
-- its owner has, a plain role granted only its schema does not), and the
-- contrib modules must be installed on the server. Neither is needed to run
-- the catalog: without them the migration skips the index with a NOTICE
-- and searches are bounded by the statement timeout alone. An
-- administrator can add it later (then searches use it at once):
--   CREATE EXTENSION pg_trgm;
--   CREATE INDEX products_search_text_trgm_idx ON products
--     USING gin (search_text gin_trgm_ops);
--
-- The index is built in this migration's transaction, which holds a lock on
-- products that blocks writes (reads go on) until it commits: on a large
-- catalog, run the migration at a quiet time, or build the index first with
-- CREATE INDEX CONCURRENTLY under the same name (this migration then keeps
-- it), since CONCURRENTLY cannot run inside a transaction or a DO block.
DO $$
DECLARE
    trgm_schema name;
BEGIN
    BEGIN
        CREATE EXTENSION IF NOT EXISTS pg_trgm;
    EXCEPTION
        WHEN insufficient_privilege OR undefined_file OR feature_not_supported THEN
            RAISE NOTICE 'pg_trgm not created (%): product search runs without its trigram index',
                SQLERRM;
    END;
    SELECT n.nspname INTO trgm_schema
    FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'pg_trgm';
    IF trgm_schema IS NOT NULL THEN
        -- Qualified: an administrator may have put the extension in a schema
        -- that is not on this role's search_path.
        EXECUTE format(
            'CREATE INDEX IF NOT EXISTS products_search_text_trgm_idx '
            'ON products USING gin (search_text %I.gin_trgm_ops)',
            trgm_schema
        );
    END IF;
END
$$;
