//! Database access for both backends behind one pool type.
//!
//! The backend is chosen by the URL scheme: `postgres://` (production, tests)
//! or `sqlite://` (the zero-setup default of `just up`). Services write their
//! SQL once, in the dialect both share (`$1` placeholders, integers, text and
//! blobs), against [`Db`]; migrations differ per backend and are passed as a
//! [`Migrations`] pair. Timestamps are stored as microseconds since the epoch
//! (see [`crate::time`]) so both backends keep them exactly.

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::{Any, AnyPool, Transaction};

use crate::config::Secret;
use crate::error::{Error, ErrorKind};

/// Which database engine a [`Db`] talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL.
    Postgres,
    /// SQLite (one file per service).
    Sqlite,
}

impl Backend {
    /// The backend a URL selects, by its scheme.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else {
            Err(Error::new(
                ErrorKind::InvalidArgument,
                "database url must start with postgres:// or sqlite:",
            ))
        }
    }
}

/// The per-backend migrations of one service, embedded with `sqlx::migrate!`.
#[derive(Clone, Copy, Debug)]
pub struct Migrations {
    /// Applied on PostgreSQL.
    pub postgres: &'static Migrator,
    /// Applied on SQLite.
    pub sqlite: &'static Migrator,
}

/// A connection pool to one service's database.
#[derive(Clone, Debug)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
    /// The SQLite file, checked by [`Db::ping`]: a file deleted under a
    /// running service still answers queries (the inode stays open) but
    /// everything written from then on is lost at the next restart.
    sqlite_file: Option<PathBuf>,
}

/// How long a request waits for a free connection before failing with
/// UNAVAILABLE, rather than hanging while the database is down.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

impl Db {
    /// Opens a pool. SQLite files (and their folders) are created when missing
    /// and run in WAL mode with a busy timeout, so readers never block writers.
    pub async fn connect(url: &Secret<String>) -> Result<Self, Error> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(install_default_drivers);

        let url = url.expose();
        let backend = Backend::from_url(url)?;
        let mut options = AnyPoolOptions::new().acquire_timeout(ACQUIRE_TIMEOUT);
        match backend {
            Backend::Postgres => {
                options = options.max_connections(10);
            }
            Backend::Sqlite => {
                let folder = sqlite_path(url)
                    .and_then(Path::parent)
                    .filter(|dir| !dir.as_os_str().is_empty());
                if let Some(dir) = folder {
                    std::fs::create_dir_all(dir).map_err(|err| {
                        Error::new(
                            ErrorKind::Unavailable,
                            format!("cannot create database folder {}", dir.display()),
                        )
                        .with_source(err)
                    })?;
                }
                // SQLite allows one writer at a time; a handful of connections
                // serve concurrent readers, writes queue on the busy timeout.
                options = options.max_connections(4).after_connect(|conn, _| {
                    Box::pin(async move {
                        sqlx::raw_sql(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                             PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;",
                        )
                        .execute(conn)
                        .await?;
                        Ok(())
                    })
                });
            }
        }
        // SQLite: `mode=rwc` creates the file, once. The pool's connections
        // must not: a connection opened after the file was deleted would
        // silently start an empty database (and hide the loss from health).
        let pool_url = if backend == Backend::Sqlite && url.contains("mode=rwc") {
            use sqlx::Connection as _;
            sqlx::AnyConnection::connect(url)
                .await
                .map_err(|err| {
                    Error::new(ErrorKind::Unavailable, "cannot create the database")
                        .with_source(err)
                })?
                .close()
                .await
                .map_err(|err| Error::internal("closing the first connection", err))?;
            url.replacen("mode=rwc", "mode=rw", 1)
        } else {
            url.to_owned()
        };
        let url = pool_url.as_str();
        let pool = match options.clone().connect(url).await {
            // A service owns its database: on a fresh PostgreSQL server it
            // creates it (given the privilege) rather than failing.
            Err(err) if backend == Backend::Postgres && is_missing_database(&err) => {
                tracing::info!("database does not exist yet, creating it");
                <Any as MigrateDatabase>::create_database(url)
                    .await
                    .map_err(|create| {
                        Error::new(ErrorKind::Unavailable, "cannot create the database")
                            .with_source(create)
                    })?;
                options.connect(url).await
            }
            other => other,
        }
        .map_err(|err| {
            Error::new(ErrorKind::Unavailable, "cannot connect to the database").with_source(err)
        })?;
        let sqlite_file = sqlite_path(url).map(Path::to_path_buf);
        Ok(Self {
            pool,
            backend,
            sqlite_file,
        })
    }

    /// Connects and applies the pending migrations of this backend.
    pub async fn connect_and_migrate(
        url: &Secret<String>,
        migrations: Migrations,
    ) -> Result<Self, Error> {
        let db = Self::connect(url).await?;
        db.migrate(migrations).await?;
        Ok(db)
    }

    /// Applies the pending migrations of this backend.
    pub async fn migrate(&self, migrations: Migrations) -> Result<(), Error> {
        let migrator = match self.backend {
            Backend::Postgres => migrations.postgres,
            Backend::Sqlite => migrations.sqlite,
        };
        migrator
            .run(&self.pool)
            .await
            .map_err(|err| Error::internal("applying database migrations", err))
    }

    /// The pool, for queries.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Which backend this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Starts a transaction that will write. On SQLite it takes the write lock
    /// up front (`BEGIN IMMEDIATE`): a deferred transaction that reads first and
    /// writes later would fail with "database is locked" instead of waiting.
    pub async fn begin_write(&self) -> Result<Transaction<'static, Any>, Error> {
        let tx = match self.backend {
            Backend::Postgres => self.pool.begin().await?,
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
        };
        Ok(tx)
    }

    /// Checks that the database answers a query within `timeout`; health
    /// checks call it.
    pub async fn ping(&self, timeout: Duration) -> Result<(), Error> {
        if let Some(file) = self.sqlite_file.as_deref().filter(|f| !f.exists()) {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!("database file {} is gone", file.display()),
            ));
        }
        let query = sqlx::query("SELECT 1").execute(&self.pool);
        match tokio::time::timeout(timeout, query).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => {
                Err(Error::new(ErrorKind::Unavailable, "database unavailable").with_source(err))
            }
            Err(_) => Err(Error::new(
                ErrorKind::Unavailable,
                "database did not answer in time",
            )),
        }
    }

    /// Closes every connection; pending queries finish first.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Whether connecting failed because the database does not exist (3D000).
fn is_missing_database(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000"))
}

/// Whether a query failed on a unique constraint (a duplicate key).
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

fn sqlite_path(url: &str) -> Option<&Path> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    (!path.is_empty() && path != ":memory:").then(|| Path::new(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_follows_the_scheme() {
        assert_eq!(
            Backend::from_url("postgres://x/y").ok(),
            Some(Backend::Postgres)
        );
        assert_eq!(
            Backend::from_url("postgresql://x/y").ok(),
            Some(Backend::Postgres)
        );
        assert_eq!(
            Backend::from_url("sqlite://a.db").ok(),
            Some(Backend::Sqlite)
        );
        assert!(Backend::from_url("mysql://x").is_err());
    }

    #[test]
    fn sqlite_paths_are_extracted_from_urls() {
        assert_eq!(
            sqlite_path("sqlite://.data/u.db?mode=rwc"),
            Some(Path::new(".data/u.db"))
        );
        assert_eq!(
            sqlite_path("sqlite:/tmp/x.db"),
            Some(Path::new("/tmp/x.db"))
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
    }

    #[tokio::test]
    async fn sqlite_file_and_folder_are_created_and_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!(
            "sqlite://{}/nested/db.sqlite?mode=rwc",
            dir.path().display()
        );
        let db = Db::connect(&Secret::new(url)).await.expect("connect");
        db.ping(Duration::from_secs(2)).await.expect("ping");
        assert!(dir.path().join("nested/db.sqlite").exists());
    }
}
