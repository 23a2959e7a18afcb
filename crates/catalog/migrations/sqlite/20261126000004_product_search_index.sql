-- PostgreSQL gets a trigram index for ListProducts' text query in this
-- migration. SQLite has no index type that serves `LIKE '%<query>%'`
-- (FTS5's trigram tokenizer needs a virtual table kept in step by triggers,
-- and other SQL): here a search walks products_created_at_id_idx newest
-- first and stops once the page is full, so a common query reads little,
-- while a rare one reads the whole table. SQLite is for single-node
-- development setups; nothing to change in the schema.
SELECT 1;
