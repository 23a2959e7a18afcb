//! Persistence of user histories.
//!
//! [`UserStore`] is what the service needs; [`SqlUserStore`] implements it on
//! PostgreSQL and SQLite with the same SQL. Each write appends one event to
//! `user_events` and updates the `users` projection in one transaction, so the
//! projection can never disagree with the history; the unique constraint on
//! `(user_id, version)` makes concurrent writers of the same version fail with
//! a conflict instead of both succeeding.
//!
//! The history is not the outbox: it keeps what the service needs to rebuild
//! a user (the password hash included) for ever, while the outbox holds the
//! public protobuf event until it is published. Both are written in the same
//! unit of work ([`Outbox::begin`]), so an event is published if and only if
//! the change committed.
//!
//! The admin bootstrap (the first listed email to sign up becomes admin) is
//! the one-row table `admin_bootstrap`: a sign-up that may bootstrap claims
//! its row in the transaction that creates the user, and only the claim that
//! inserted the row gets the role. Racing sign-ups cannot both see "no admin
//! yet": the primary key decides, and the losers are created as plain users.

use std::future::Future;

use agora_platform::auth::ADMIN_ROLE;
use agora_platform::config::Secret;
use agora_platform::db::{Db, is_unique_violation};
use agora_platform::error::{Error, ErrorKind, Result};
use agora_platform::time::now_micros;
use agora_platform_events::{Outbox, UnitOfWork};
use agora_proto::users::v1 as pb;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::events::{StoredEvent, UserEventData, UserState, UserStatus};

/// Storage of user histories and their current state.
pub trait UserStore: Send + Sync + 'static {
    /// Starts a new user's history with `created` (a `UserCreated` event).
    /// ALREADY_EXISTS when the email is taken. With `claim_admin`, the user
    /// claims the one-time admin bootstrap in the same transaction: the
    /// first such user ever gets the admin role added to `created`, every
    /// later one (racing or not) is created as `created` says, without it.
    fn create(
        &self,
        user_id: &str,
        created: UserEventData,
        claim_admin: bool,
    ) -> impl Future<Output = Result<UserState>> + Send;

    /// Appends the event `decide` returns for the user's current state.
    /// NOT_FOUND for an unknown user; ABORTED when `expected_version` is set
    /// and differs, or when another writer appended first. `decide` returning
    /// `None` means "nothing to change": the current state is returned.
    fn append<F>(
        &self,
        user_id: &str,
        expected_version: Option<i64>,
        decide: F,
    ) -> impl Future<Output = Result<UserState>> + Send
    where
        F: FnOnce(&UserState) -> Result<Option<UserEventData>> + Send;

    /// The current state of a user.
    fn get(&self, user_id: &str) -> impl Future<Output = Result<Option<UserState>>> + Send;

    /// The current state of the user with this (normalized) email.
    fn find_by_email(&self, email: &str) -> impl Future<Output = Result<Option<UserState>>> + Send;

    /// A user's history, oldest first.
    fn events(&self, user_id: &str) -> impl Future<Output = Result<Vec<StoredEvent>>> + Send;
}

/// [`UserStore`] on a SQL database (PostgreSQL or SQLite), recording the
/// published events in the same database's outbox.
#[derive(Clone, Debug)]
pub struct SqlUserStore {
    db: Db,
    outbox: Outbox,
}

impl SqlUserStore {
    /// A store on a migrated database, with its outbox.
    pub fn new(outbox: Outbox) -> Self {
        Self {
            db: outbox.db().clone(),
            outbox,
        }
    }
}

macro_rules! select_user {
    ($filter:literal) => {
        concat!(
            "SELECT id, email, name, status, roles, password_hash, created_at, updated_at, \
             version FROM users WHERE ",
            $filter
        )
    };
}

impl UserStore for SqlUserStore {
    async fn create(
        &self,
        user_id: &str,
        mut created: UserEventData,
        claim_admin: bool,
    ) -> Result<UserState> {
        let mut work = self.outbox.begin().await?;
        if claim_admin
            && let UserEventData::UserCreated { roles, .. } = &mut created
            && claim_admin_bootstrap(&mut work, user_id).await?
        {
            roles.push(ADMIN_ROLE.to_owned());
        }
        let event = StoredEvent {
            event_id: uuid::Uuid::now_v7().to_string(),
            user_id: user_id.to_owned(),
            version: 1,
            occurred_at: now_micros(),
            data: created,
        };
        let state = UserState::apply(None, &event)
            .map_err(|err| Error::internal("applying user_created", err))?;
        insert_event(&mut work, &event).await?;
        sqlx::query(
            "INSERT INTO users (id, email, name, status, roles, password_hash, \
             created_at, updated_at, version) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&state.id)
        .bind(&state.email)
        .bind(&state.name)
        .bind(state.status.as_str())
        .bind(encode_roles(&state.roles)?)
        .bind(state.password_hash.expose())
        .bind(state.created_at)
        .bind(state.updated_at)
        .bind(state.version)
        .execute(work.tx())
        .await
        .map_err(email_taken_or)?;
        record_published(&mut work, &event).await?;
        work.commit().await?;
        Ok(state)
    }

    async fn append<F>(
        &self,
        user_id: &str,
        expected_version: Option<i64>,
        decide: F,
    ) -> Result<UserState>
    where
        F: FnOnce(&UserState) -> Result<Option<UserEventData>> + Send,
    {
        let mut work = self.outbox.begin().await?;
        let current = sqlx::query(select_user!("id = $1"))
            .bind(user_id)
            .fetch_optional(work.tx())
            .await?
            .map(|row| user_from_row(&row))
            .transpose()?
            .ok_or_else(|| Error::not_found(format_args!("user {user_id}")))?;
        if let Some(expected) = expected_version.filter(|v| *v != current.version) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "user {user_id} is at version {}, not {expected}: re-read and retry",
                    current.version
                ),
            ));
        }
        let Some(data) = decide(&current)? else {
            return Ok(current);
        };
        let event = StoredEvent {
            event_id: uuid::Uuid::now_v7().to_string(),
            user_id: user_id.to_owned(),
            version: current.version + 1,
            occurred_at: now_micros(),
            data,
        };
        let next = UserState::apply(Some(current.clone()), &event)
            .map_err(|err| Error::internal("applying an event", err))?;
        insert_event(&mut work, &event).await?;
        let updated = sqlx::query(
            "UPDATE users SET email = $1, name = $2, status = $3, roles = $4, \
             updated_at = $5, version = $6 WHERE id = $7 AND version = $8",
        )
        .bind(&next.email)
        .bind(&next.name)
        .bind(next.status.as_str())
        .bind(encode_roles(&next.roles)?)
        .bind(next.updated_at)
        .bind(next.version)
        .bind(&next.id)
        .bind(current.version)
        .execute(work.tx())
        .await
        .map_err(email_taken_or)?;
        if updated.rows_affected() != 1 {
            return Err(concurrent_write(user_id));
        }
        record_published(&mut work, &event).await?;
        work.commit().await?;
        Ok(next)
    }

    async fn get(&self, user_id: &str) -> Result<Option<UserState>> {
        sqlx::query(select_user!("id = $1"))
            .bind(user_id)
            .fetch_optional(self.db.pool())
            .await?
            .map(|row| user_from_row(&row))
            .transpose()
    }

    async fn find_by_email(&self, email: &str) -> Result<Option<UserState>> {
        sqlx::query(select_user!("email = $1"))
            .bind(email)
            .fetch_optional(self.db.pool())
            .await?
            .map(|row| user_from_row(&row))
            .transpose()
    }

    async fn events(&self, user_id: &str) -> Result<Vec<StoredEvent>> {
        sqlx::query(
            "SELECT event_id, user_id, version, payload, occurred_at FROM user_events \
             WHERE user_id = $1 ORDER BY version",
        )
        .bind(user_id)
        .fetch_all(self.db.pool())
        .await?
        .iter()
        .map(|row| {
            let payload: String = row.try_get("payload")?;
            let data = serde_json::from_str(&payload)
                .map_err(|err| Error::internal("decoding a stored event", err))?;
            Ok(StoredEvent {
                event_id: row.try_get("event_id")?,
                user_id: row.try_get("user_id")?,
                version: row.try_get("version")?,
                occurred_at: row.try_get("occurred_at")?,
                data,
            })
        })
        .collect()
    }
}

/// Claims the admin bootstrap for `user_id` within `work`: whether this
/// transaction inserted the one row of `admin_bootstrap`. A concurrent claim
/// waits for ours to commit or roll back (PostgreSQL: the primary key;
/// SQLite: one writer at a time) and then finds the row taken, or free again.
async fn claim_admin_bootstrap(work: &mut UnitOfWork, user_id: &str) -> Result<bool> {
    let claimed = sqlx::query(
        "INSERT INTO admin_bootstrap (id, user_id, claimed_at) VALUES (1, $1, $2) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(user_id)
    .bind(now_micros())
    .execute(work.tx())
    .await?;
    Ok(claimed.rows_affected() == 1)
}

/// Records the public protobuf form of `event` in the outbox: never the
/// password hash.
async fn record_published(work: &mut UnitOfWork, event: &StoredEvent) -> Result<()> {
    use pb::user_event::Event;
    match event.to_published() {
        Event::UserCreated(published) => work.record(&published).await?,
        Event::UserEmailUpdated(published) => work.record(&published).await?,
        Event::UserActivated(published) => work.record(&published).await?,
    };
    Ok(())
}

async fn insert_event(work: &mut UnitOfWork, event: &StoredEvent) -> Result<()> {
    let payload = serde_json::to_string(&event.data)
        .map_err(|err| Error::internal("encoding an event", err))?;
    sqlx::query(
        "INSERT INTO user_events (event_id, user_id, version, event_type, payload, occurred_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&event.event_id)
    .bind(&event.user_id)
    .bind(event.version)
    .bind(event.data.event_type())
    .bind(payload)
    .bind(event.occurred_at)
    .execute(work.tx())
    .await
    .map_err(|err| {
        if is_unique_violation(&err) {
            concurrent_write(&event.user_id)
        } else {
            err.into()
        }
    })?;
    Ok(())
}

fn concurrent_write(user_id: &str) -> Error {
    Error::new(
        ErrorKind::Conflict,
        format!("user {user_id} was changed concurrently: re-read and retry"),
    )
}

/// The only unique constraint of the `users` table besides the primary key
/// (which the event insert guards first) is the email.
fn email_taken_or(err: sqlx::Error) -> Error {
    if is_unique_violation(&err) {
        Error::new(ErrorKind::AlreadyExists, "email is already registered")
    } else {
        err.into()
    }
}

fn encode_roles(roles: &[String]) -> Result<String> {
    serde_json::to_string(roles).map_err(|err| Error::internal("encoding roles", err))
}

fn user_from_row(row: &AnyRow) -> Result<UserState> {
    let status: String = row.try_get("status")?;
    let roles: String = row.try_get("roles")?;
    Ok(UserState {
        id: row.try_get("id")?,
        email: row.try_get("email")?,
        name: row.try_get("name")?,
        status: UserStatus::parse(&status).ok_or_else(|| {
            Error::new(
                ErrorKind::Internal,
                format!("unknown stored user status {status:?}"),
            )
        })?,
        roles: serde_json::from_str(&roles)
            .map_err(|err| Error::internal("decoding stored roles", err))?,
        password_hash: Secret::new(row.try_get("password_hash")?),
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        version: row.try_get("version")?,
    })
}
