//! Persistence of notifications.
//!
//! [`NotificationStore`] is what the service needs; [`SqlNotificationStore`]
//! implements it on PostgreSQL and SQLite with the same SQL. The unique
//! `source_event_id` is the idempotency key: [`NotificationStore::claim`]
//! inserts the row (or takes over a failed or abandoned one) in one write
//! transaction before anything is sent, so however often an event is
//! delivered, and however many consumers race on it, one sender at a time
//! owns its email, and a sent one is never sent again.

use std::future::Future;

use agora_platform::db::Db;
use agora_platform::error::{Error, ErrorKind, Result};
use agora_platform::pagination::Cursor;
use agora_platform::time::now_micros;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use crate::domain::{Notification, NotificationStatus};

/// A notification about to be sent for the first time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewNotification {
    /// A fresh UUIDv7; kept only if this is the first claim for the event.
    pub id: String,
    /// The canonical id of the user it belongs to.
    pub user_id: String,
    /// The normalized recipient address.
    pub recipient: String,
    /// The subject line.
    pub subject: String,
    /// The plain-text body.
    pub body_text: String,
    /// The `ce-type` of the causing event.
    pub source_event_type: String,
    /// The `ce-id` of the causing event: the idempotency key.
    pub source_event_id: String,
}

/// What [`NotificationStore::claim`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The caller now owns delivery: the row is new, or was FAILED, or its
    /// previous sender's claim expired. The row is SENDING and its
    /// `attempts` identifies this attempt for [`NotificationStore::record_outcome`].
    Claimed(Notification),
    /// Already delivered: nothing to do.
    AlreadySent(Notification),
    /// Another sender holds a live claim on it.
    InProgress(Notification),
}

/// Storage of notifications.
pub trait NotificationStore: Send + Sync + 'static {
    /// Claims delivery of the notification for `new.source_event_id`: inserts
    /// it as SENDING, or takes over an existing row that is FAILED or has
    /// been SENDING since before `stale_before` (microseconds; a sender that
    /// crashed), refreshing its content from `new`. A SENT row, or one
    /// another sender claimed recently, is returned as it is.
    fn claim(
        &self,
        new: &NewNotification,
        stale_before: i64,
    ) -> impl Future<Output = Result<Claim>> + Send;

    /// Records how attempt `attempt` of notification `id` ended: SENT on
    /// `Ok`, FAILED with the reason on `Err`. Only the attempt that holds the
    /// claim may record; for any other the current row is returned unchanged.
    fn record_outcome(
        &self,
        id: &str,
        attempt: i64,
        outcome: Result<(), String>,
    ) -> impl Future<Output = Result<Notification>> + Send;

    /// The notification caused by event `source_event_id`.
    fn get_by_event(
        &self,
        source_event_id: &str,
    ) -> impl Future<Output = Result<Option<Notification>>> + Send;

    /// Notifications belonging to user `user_id`, newest first
    /// (`created_at`, then `id`, descending), starting after `after`, at most
    /// `limit`. With `recipient`, only those of them sent to that address:
    /// the filter narrows the user's own list and never reaches anyone
    /// else's rows.
    fn list_for_user(
        &self,
        user_id: &str,
        recipient: Option<&str>,
        after: Option<&Cursor>,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<Notification>>> + Send;

    /// Notifications sent to `recipient`, whoever they belong to (for
    /// admins), newest first (`created_at`, then `id`, descending), starting
    /// after `after`, at most `limit`.
    fn list_for_recipient(
        &self,
        recipient: &str,
        after: Option<&Cursor>,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<Notification>>> + Send;
}

/// [`NotificationStore`] on a SQL database (PostgreSQL or SQLite).
#[derive(Clone, Debug)]
pub struct SqlNotificationStore {
    db: Db,
}

impl SqlNotificationStore {
    /// A store on a migrated database.
    pub fn new(db: Db) -> Self {
        Self { db }
    }
}

macro_rules! select_notification {
    ($rest:literal) => {
        concat!(
            "SELECT id, user_id, recipient, subject, body_text, status, failure_reason, \
             source_event_type, source_event_id, attempts, created_at, updated_at \
             FROM notifications ",
            $rest
        )
    };
}

impl NotificationStore for SqlNotificationStore {
    async fn claim(&self, new: &NewNotification, stale_before: i64) -> Result<Claim> {
        let now = now_micros();
        let mut tx = self.db.begin_write().await?;
        // ON CONFLICT DO NOTHING rather than catching the unique violation:
        // on PostgreSQL a failed statement would poison the transaction, and
        // a concurrent inserter of the same event waits for ours and then
        // inserts nothing.
        let inserted = sqlx::query(
            "INSERT INTO notifications (id, user_id, recipient, subject, body_text, status, \
             failure_reason, source_event_type, source_event_id, attempts, created_at, \
             updated_at) VALUES ($1, $2, $3, $4, $5, $6, '', $7, $8, 1, $9, $9) \
             ON CONFLICT (source_event_id) DO NOTHING",
        )
        .bind(&new.id)
        .bind(&new.user_id)
        .bind(&new.recipient)
        .bind(&new.subject)
        .bind(&new.body_text)
        .bind(NotificationStatus::Sending.as_str())
        .bind(&new.source_event_type)
        .bind(&new.source_event_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 1 {
            tx.commit().await?;
            return Ok(Claim::Claimed(Notification {
                id: new.id.clone(),
                user_id: new.user_id.clone(),
                recipient: new.recipient.clone(),
                subject: new.subject.clone(),
                body_text: new.body_text.clone(),
                status: NotificationStatus::Sending,
                failure_reason: String::new(),
                source_event_type: new.source_event_type.clone(),
                source_event_id: new.source_event_id.clone(),
                attempts: 1,
                created_at: now,
                updated_at: now,
            }));
        }
        // The row exists. Taking it over is one conditional UPDATE, so of
        // several racing senders exactly one sees a row affected.
        let taken_over = sqlx::query(
            "UPDATE notifications SET status = $1, failure_reason = '', user_id = $2, \
             recipient = $3, subject = $4, body_text = $5, attempts = attempts + 1, \
             updated_at = $6 WHERE source_event_id = $7 \
             AND (status = $8 OR (status = $1 AND updated_at < $9))",
        )
        .bind(NotificationStatus::Sending.as_str())
        .bind(&new.user_id)
        .bind(&new.recipient)
        .bind(&new.subject)
        .bind(&new.body_text)
        .bind(now)
        .bind(&new.source_event_id)
        .bind(NotificationStatus::Failed.as_str())
        .bind(stale_before)
        .execute(&mut *tx)
        .await?;
        let current = fetch_by_event(&mut tx, &new.source_event_id)
            .await?
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Internal,
                    "notification vanished while it was being claimed",
                )
            })?;
        tx.commit().await?;
        Ok(if taken_over.rows_affected() == 1 {
            Claim::Claimed(current)
        } else if current.status == NotificationStatus::Sent {
            Claim::AlreadySent(current)
        } else {
            Claim::InProgress(current)
        })
    }

    async fn record_outcome(
        &self,
        id: &str,
        attempt: i64,
        outcome: Result<(), String>,
    ) -> Result<Notification> {
        let (status, reason) = match outcome {
            Ok(()) => (NotificationStatus::Sent, String::new()),
            Err(reason) => (NotificationStatus::Failed, reason),
        };
        let mut tx = self.db.begin_write().await?;
        let updated = sqlx::query(
            "UPDATE notifications SET status = $1, failure_reason = $2, updated_at = $3 \
             WHERE id = $4 AND attempts = $5 AND status = $6",
        )
        .bind(status.as_str())
        .bind(&reason)
        .bind(now_micros())
        .bind(id)
        .bind(attempt)
        .bind(NotificationStatus::Sending.as_str())
        .execute(&mut *tx)
        .await?;
        let current = sqlx::query(select_notification!("WHERE id = $1"))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| notification_from_row(&row))
            .transpose()?
            .ok_or_else(|| Error::not_found(format_args!("notification {id}")))?;
        tx.commit().await?;
        if updated.rows_affected() != 1 {
            tracing::warn!(
                notification_id = %id,
                attempt,
                current_attempt = current.attempts,
                "delivery outcome not recorded: another sender took the notification over"
            );
        }
        Ok(current)
    }

    async fn get_by_event(&self, source_event_id: &str) -> Result<Option<Notification>> {
        sqlx::query(select_notification!("WHERE source_event_id = $1"))
            .bind(source_event_id)
            .fetch_optional(self.db.pool())
            .await?
            .map(|row| notification_from_row(&row))
            .transpose()
    }

    async fn list_for_user(
        &self,
        user_id: &str,
        recipient: Option<&str>,
        after: Option<&Cursor>,
        limit: i64,
    ) -> Result<Vec<Notification>> {
        // No recipient filter is bound as '' (never a stored address), which
        // keeps one statement per case on both backends.
        let recipient = recipient.unwrap_or_default();
        let rows = match after {
            None => {
                sqlx::query(select_notification!(
                    "WHERE user_id = $1 AND ($2 = '' OR recipient = $2) \
                     ORDER BY created_at DESC, id DESC LIMIT $3"
                ))
                .bind(user_id)
                .bind(recipient)
                .bind(limit)
                .fetch_all(self.db.pool())
                .await?
            }
            Some(cursor) => {
                sqlx::query(select_notification!(
                    "WHERE user_id = $1 AND ($2 = '' OR recipient = $2) \
                     AND (created_at < $3 OR (created_at = $3 AND id < $4)) \
                     ORDER BY created_at DESC, id DESC LIMIT $5"
                ))
                .bind(user_id)
                .bind(recipient)
                .bind(cursor.key)
                .bind(&cursor.id)
                .bind(limit)
                .fetch_all(self.db.pool())
                .await?
            }
        };
        rows.iter().map(notification_from_row).collect()
    }

    async fn list_for_recipient(
        &self,
        recipient: &str,
        after: Option<&Cursor>,
        limit: i64,
    ) -> Result<Vec<Notification>> {
        let rows =
            match after {
                None => {
                    sqlx::query(select_notification!(
                        "WHERE recipient = $1 ORDER BY created_at DESC, id DESC LIMIT $2"
                    ))
                    .bind(recipient)
                    .bind(limit)
                    .fetch_all(self.db.pool())
                    .await?
                }
                Some(cursor) => sqlx::query(select_notification!(
                    "WHERE recipient = $1 AND (created_at < $2 OR (created_at = $2 AND id < $3)) \
                     ORDER BY created_at DESC, id DESC LIMIT $4"
                ))
                .bind(recipient)
                .bind(cursor.key)
                .bind(&cursor.id)
                .bind(limit)
                .fetch_all(self.db.pool())
                .await?,
            };
        rows.iter().map(notification_from_row).collect()
    }
}

async fn fetch_by_event(
    tx: &mut Transaction<'static, Any>,
    source_event_id: &str,
) -> Result<Option<Notification>> {
    sqlx::query(select_notification!("WHERE source_event_id = $1"))
        .bind(source_event_id)
        .fetch_optional(&mut **tx)
        .await?
        .map(|row| notification_from_row(&row))
        .transpose()
}

fn notification_from_row(row: &AnyRow) -> Result<Notification> {
    let status: String = row.try_get("status")?;
    Ok(Notification {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        recipient: row.try_get("recipient")?,
        subject: row.try_get("subject")?,
        body_text: row.try_get("body_text")?,
        status: NotificationStatus::parse(&status).ok_or_else(|| {
            Error::new(
                ErrorKind::Internal,
                format!("unknown stored notification status {status:?}"),
            )
        })?,
        failure_reason: row.try_get("failure_reason")?,
        source_event_type: row.try_get("source_event_type")?,
        source_event_id: row.try_get("source_event_id")?,
        attempts: row.try_get("attempts")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}
