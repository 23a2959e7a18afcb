-- The directory of where to write to each user, kept from the users
-- service's events (UserCreated, UserEmailUpdated) rather than copied into
-- every order event, where an address would go stale after a change.
CREATE TABLE recipients (
    user_id    TEXT PRIMARY KEY,
    email      TEXT NOT NULL,
    -- From UserCreated; an email change does not carry it.
    name       TEXT,
    -- The user's version the row reflects: an older event is dropped.
    version    BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
