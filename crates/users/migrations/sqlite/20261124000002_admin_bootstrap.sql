-- The one-time admin bootstrap: the first sign-up with an email listed in
-- `auth.admin_emails` becomes admin. It claims the one row of this table
-- (the primary key is the constant 1) in the transaction that creates the
-- user, so of racing sign-ups exactly one gets the role; the others find the
-- row taken and are created as plain users.
CREATE TABLE admin_bootstrap (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    -- The user who claimed it: the first admin.
    user_id    TEXT NOT NULL,
    claimed_at INTEGER NOT NULL
);

-- A database that already has an admin: the bootstrap is closed.
INSERT INTO admin_bootstrap (id, user_id, claimed_at)
SELECT 1, id, created_at FROM users
WHERE roles LIKE '%"admin"%'
ORDER BY created_at, id
LIMIT 1;
