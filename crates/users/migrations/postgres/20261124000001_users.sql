-- The append-only history every user's state is rebuilt from.
CREATE TABLE user_events (
    event_id    TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    -- 1 for a user's first event, then one more per event: a second writer of
    -- the same version hits the unique constraint (optimistic concurrency).
    version     BIGINT NOT NULL,
    event_type  TEXT NOT NULL,
    payload     TEXT NOT NULL,
    occurred_at BIGINT NOT NULL,
    CONSTRAINT user_events_user_version_key UNIQUE (user_id, version)
);

-- The current state of each user (a projection of user_events, updated in the
-- same transaction), for lookups by id and by email.
CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    email         TEXT NOT NULL,
    name          TEXT NOT NULL,
    status        TEXT NOT NULL,
    roles         TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    version       BIGINT NOT NULL,
    CONSTRAINT users_email_key UNIQUE (email)
);
