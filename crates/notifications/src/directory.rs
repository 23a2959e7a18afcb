//! The directory of recipients: each user's current address (and name), kept
//! from `UserCreated` and `UserEmailUpdated`. Order events name the user
//! only; the email goes to whatever address the user has when it is sent.

use agora_platform::db::Db;
use agora_platform::error::Result;
use agora_platform::time::now_micros;
use sqlx::{AnyConnection, Row as _};

/// A user's address as last seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipient {
    /// The user.
    pub user_id: String,
    /// Where to write.
    pub email: String,
    /// Their display name, once `UserCreated` was seen.
    pub name: Option<String>,
    /// The user's version this reflects.
    pub version: i64,
}

/// Records `email` (and `name`, when given) for `user_id` at `version`.
/// Events of one user may be applied out of order (a retried one comes
/// later): the address of the newest version wins, and a name fills in
/// whenever it is first known (only `UserCreated` carries it).
pub async fn record(
    conn: &mut AnyConnection,
    user_id: &str,
    email: &str,
    name: Option<&str>,
    version: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO recipients (user_id, email, name, version, updated_at) \
         VALUES ($1, $2, $3, $4, $5) \
                  ON CONFLICT (user_id) DO UPDATE SET \
         email = CASE WHEN EXCLUDED.version > recipients.version \
             THEN EXCLUDED.email ELSE recipients.email END, \
         name = COALESCE(recipients.name, EXCLUDED.name), \
         version = CASE WHEN EXCLUDED.version > recipients.version \
             THEN EXCLUDED.version ELSE recipients.version END, \
         updated_at = EXCLUDED.updated_at",
    )
    .bind(user_id)
    .bind(email)
    .bind(name)
    .bind(version)
    .bind(now_micros())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The recipient `user_id`, if known.
pub async fn find(conn: &mut AnyConnection, user_id: &str) -> Result<Option<Recipient>> {
    sqlx::query("SELECT user_id, email, name, version FROM recipients WHERE user_id = $1")
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await?
        .map(|row| {
            Ok(Recipient {
                user_id: row.try_get("user_id")?,
                email: row.try_get("email")?,
                name: row.try_get("name")?,
                version: row.try_get("version")?,
            })
        })
        .transpose()
}

/// [`find`] on a pooled connection.
pub async fn lookup(db: &Db, user_id: &str) -> Result<Option<Recipient>> {
    let mut conn = db.pool().acquire().await?;
    find(&mut conn, user_id).await
}
