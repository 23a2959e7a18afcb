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

/// What a failed database call means for its caller: the classes of the
/// one table from database errors to gRPC codes (applied by
/// `impl From<sqlx::Error> for Error`), the same for both backends.
///
/// | class | PostgreSQL SQLSTATE | SQLite result code | gRPC code | RetryInfo |
/// |---|---|---|---|---|
/// | [`Conflict`](Self::Conflict) | 40001 serialization failure, 40P01 deadlock | 517 BUSY_SNAPSHOT | ABORTED | 50 ms |
/// | [`Busy`](Self::Busy) | 55P03 lock not available | 5 BUSY, 6 LOCKED and their extended codes (261, 773, 262, ...) | UNAVAILABLE | 100 ms |
/// | [`Unreachable`](Self::Unreachable) | 08xxx connection exception, 57P01..57P05 shutdown/terminated, 58xxx system error, 25006 read-only transaction (a write sent to a standby during a failover); no connection (I/O, TLS, pool timed out or closed) | 10 IOERR, 14 CANTOPEN | UNAVAILABLE | 500 ms |
/// | [`Exhausted`](Self::Exhausted) | 53xxx insufficient resources (53300 too many connections, 53100 disk full) | 7 NOMEM, 13 FULL | UNAVAILABLE | 1 s |
/// | [`TimedOut`](Self::TimedOut) | 57014 query canceled (statement timeout) | 9 INTERRUPT | DEADLINE_EXCEEDED | none |
/// | [`Duplicate`](Self::Duplicate) | 23505 unique violation | 2067 CONSTRAINT_UNIQUE, 1555 CONSTRAINT_PRIMARYKEY | ALREADY_EXISTS | none |
/// | [`MissingReference`](Self::MissingReference) | 23503 foreign key violation | 787 CONSTRAINT_FOREIGNKEY | FAILED_PRECONDITION | none |
/// | [`InvalidData`](Self::InvalidData) | 22xxx data exception, 23502 not null, 23514 check | 18 TOOBIG, 20 MISMATCH, 1299 CONSTRAINT_NOTNULL, 275 CONSTRAINT_CHECK | INVALID_ARGUMENT | none |
/// | [`Other`](Self::Other) | everything else (42xxx, XX000, 25P02 in failed transaction, ...) | everything else (1 ERROR, 11 CORRUPT, ...) | INTERNAL | none |
///
/// Why ABORTED for some and UNAVAILABLE for others: ABORTED says the
/// caller's transaction lost a race and the whole read-modify-write must
/// start again (a serialization failure, a deadlock victim, a SQLite
/// snapshot that went stale before its write); UNAVAILABLE says the
/// database could not take the work now and the same call can simply be
/// sent again (a lock held by another writer past the busy timeout, a lost
/// connection). Both carry `google.rpc.RetryInfo`, so clients retry either
/// after the hinted delay. A write refused as read-only (25006) is a
/// failover in progress: the pool still holds connections to the old
/// primary, now a standby, and the call succeeds once they are replaced,
/// so it is UNAVAILABLE like a lost connection. A statement timeout is
/// DEADLINE_EXCEEDED without a hint: the same query would likely time out
/// again, and standard gRPC retry policies (which retry UNAVAILABLE on
/// their own) would multiply exactly the expensive queries the timeout is
/// there to stop. 25P02 (a statement in a transaction that already failed)
/// means the service ignored an error: INTERNAL.
///
/// The classes a caller can cause (Duplicate, MissingReference,
/// InvalidData) keep their caller's codes, but services validate before
/// any database work, so reaching them is almost always a server bug: the
/// [`Error`] keeps the database error as its source and answering with it
/// logs it at WARN with its code (see `From<Error> for Status`), never
/// sending the database's words. SQLite reports extended result codes
/// (517, 773, ...), so its classes go by the primary code (`code & 0xff`),
/// but for BUSY_SNAPSHOT. A unique violation a service did not expect (it
/// checks [`is_unique_violation`] where a duplicate has a meaning of its
/// own) is still the caller's doing: ALREADY_EXISTS, never INTERNAL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbFailure {
    /// The transaction lost a race with a concurrent one: start it again.
    Conflict,
    /// Another writer holds the lock: send the same call again shortly.
    Busy,
    /// No connection to the database, or it is going away.
    Unreachable,
    /// The database is out of connections, memory or disk.
    Exhausted,
    /// The statement was cancelled for running too long: DEADLINE_EXCEEDED,
    /// which retry policies do not repeat.
    TimedOut,
    /// A row with the same unique key exists.
    Duplicate,
    /// A row refers to one that does not exist.
    MissingReference,
    /// A value does not fit its column (too long, malformed, a check).
    InvalidData,
    /// Anything else: a bug or corruption, for the server log.
    Other,
}

impl DbFailure {
    /// The class of a `sqlx` error (of either backend, through the `Any`
    /// driver).
    pub fn of(err: &sqlx::Error) -> Self {
        match err {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => Self::Unreachable,
            sqlx::Error::Database(db) => {
                let backend = if db
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .is_some()
                {
                    Backend::Postgres
                } else if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                    Backend::Sqlite
                } else {
                    return Self::Other;
                };
                db.code()
                    .map_or(Self::Other, |code| Self::classify(backend, &code))
            }
            _ => Self::Other,
        }
    }

    /// The class of error `code` of `backend`: a PostgreSQL SQLSTATE
    /// (`40001`) or a SQLite extended result code (`517`), as `sqlx`
    /// reports them.
    pub fn classify(backend: Backend, code: &str) -> Self {
        match backend {
            Backend::Postgres => Self::classify_sqlstate(code),
            Backend::Sqlite => code
                .parse::<i32>()
                .map_or(Self::Other, Self::classify_sqlite),
        }
    }

    fn classify_sqlstate(code: &str) -> Self {
        let class = code.get(..2).unwrap_or_default();
        match (class, code) {
            (_, "40001" | "40P01") => Self::Conflict,
            (_, "55P03") => Self::Busy,
            (_, "25006") => Self::Unreachable,
            (_, "57014") => Self::TimedOut,
            (_, "23505") => Self::Duplicate,
            (_, "23503") => Self::MissingReference,
            (_, "23502" | "23514") | ("22", _) => Self::InvalidData,
            ("08" | "58", _) => Self::Unreachable,
            ("57", _) if code.starts_with("57P") => Self::Unreachable,
            ("53", _) => Self::Exhausted,
            _ => Self::Other,
        }
    }

    fn classify_sqlite(code: i32) -> Self {
        // https://www.sqlite.org/rescode.html
        const BUSY_SNAPSHOT: i32 = 517;
        const CONSTRAINT_CHECK: i32 = 275;
        const CONSTRAINT_FOREIGNKEY: i32 = 787;
        const CONSTRAINT_NOTNULL: i32 = 1299;
        const CONSTRAINT_PRIMARYKEY: i32 = 1555;
        const CONSTRAINT_UNIQUE: i32 = 2067;
        match code {
            BUSY_SNAPSHOT => return Self::Conflict,
            CONSTRAINT_UNIQUE | CONSTRAINT_PRIMARYKEY => return Self::Duplicate,
            CONSTRAINT_FOREIGNKEY => return Self::MissingReference,
            CONSTRAINT_NOTNULL | CONSTRAINT_CHECK => return Self::InvalidData,
            _ => {}
        }
        match code & 0xff {
            // BUSY, LOCKED
            5 | 6 => Self::Busy,
            // IOERR, CANTOPEN
            10 | 14 => Self::Unreachable,
            // NOMEM, FULL
            7 | 13 => Self::Exhausted,
            // INTERRUPT
            9 => Self::TimedOut,
            // TOOBIG, MISMATCH
            18 | 20 => Self::InvalidData,
            _ => Self::Other,
        }
    }

    /// The kind of [`Error`] (and so the gRPC code) of this class.
    pub fn kind(self) -> ErrorKind {
        match self {
            Self::Conflict => ErrorKind::Conflict,
            Self::Busy | Self::Unreachable | Self::Exhausted => ErrorKind::Unavailable,
            Self::TimedOut => ErrorKind::DeadlineExceeded,
            Self::Duplicate => ErrorKind::AlreadyExists,
            Self::MissingReference => ErrorKind::FailedPrecondition,
            Self::InvalidData => ErrorKind::InvalidArgument,
            Self::Other => ErrorKind::Internal,
        }
    }

    /// When the caller should try again (`google.rpc.RetryInfo`), for the
    /// classes where trying again helps.
    pub fn retry_after(self) -> Option<Duration> {
        match self {
            Self::Conflict => Some(Duration::from_millis(50)),
            Self::Busy => Some(Duration::from_millis(100)),
            Self::Unreachable => Some(Duration::from_millis(500)),
            Self::Exhausted => Some(Duration::from_secs(1)),
            Self::TimedOut
            | Self::Duplicate
            | Self::MissingReference
            | Self::InvalidData
            | Self::Other => None,
        }
    }

    /// The message the caller sees: what happened, never the database's
    /// own words (which name tables and constraints).
    pub fn message(self) -> &'static str {
        match self {
            Self::Conflict => "concurrent update: retry",
            Self::Busy => "the database is busy: retry shortly",
            Self::Unreachable => "database unavailable",
            Self::Exhausted => "the database is out of resources: retry later",
            Self::TimedOut => "the database did not answer in time",
            Self::Duplicate => "already exists",
            Self::MissingReference => "refers to something that does not exist",
            Self::InvalidData => "a value is malformed, too long or out of range",
            Self::Other => "database error",
        }
    }
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
    fn database_error_codes_map_to_their_class_and_grpc_code() {
        use DbFailure::*;
        use tonic::Code;
        let table: &[(Backend, &str, DbFailure, Code)] = &[
            // PostgreSQL
            (Backend::Postgres, "40001", Conflict, Code::Aborted),
            (Backend::Postgres, "40P01", Conflict, Code::Aborted),
            (Backend::Postgres, "55P03", Busy, Code::Unavailable),
            (Backend::Postgres, "53300", Exhausted, Code::Unavailable),
            (Backend::Postgres, "53100", Exhausted, Code::Unavailable),
            (Backend::Postgres, "53200", Exhausted, Code::Unavailable),
            (Backend::Postgres, "57014", TimedOut, Code::DeadlineExceeded),
            (Backend::Postgres, "25006", Unreachable, Code::Unavailable),
            (Backend::Postgres, "25P02", Other, Code::Internal),
            (Backend::Postgres, "25001", Other, Code::Internal),
            (Backend::Postgres, "08006", Unreachable, Code::Unavailable),
            (Backend::Postgres, "08P01", Unreachable, Code::Unavailable),
            (Backend::Postgres, "57P01", Unreachable, Code::Unavailable),
            (Backend::Postgres, "57P02", Unreachable, Code::Unavailable),
            (Backend::Postgres, "57P03", Unreachable, Code::Unavailable),
            (Backend::Postgres, "58030", Unreachable, Code::Unavailable),
            (Backend::Postgres, "23505", Duplicate, Code::AlreadyExists),
            (
                Backend::Postgres,
                "23503",
                MissingReference,
                Code::FailedPrecondition,
            ),
            (
                Backend::Postgres,
                "23502",
                InvalidData,
                Code::InvalidArgument,
            ),
            (
                Backend::Postgres,
                "23514",
                InvalidData,
                Code::InvalidArgument,
            ),
            (
                Backend::Postgres,
                "22001",
                InvalidData,
                Code::InvalidArgument,
            ),
            (
                Backend::Postgres,
                "22P02",
                InvalidData,
                Code::InvalidArgument,
            ),
            (
                Backend::Postgres,
                "22021",
                InvalidData,
                Code::InvalidArgument,
            ),
            (
                Backend::Postgres,
                "22003",
                InvalidData,
                Code::InvalidArgument,
            ),
            (Backend::Postgres, "42P01", Other, Code::Internal),
            (Backend::Postgres, "42601", Other, Code::Internal),
            (Backend::Postgres, "XX000", Other, Code::Internal),
            (Backend::Postgres, "40003", Other, Code::Internal),
            (Backend::Postgres, "57000", Other, Code::Internal),
            (Backend::Postgres, "", Other, Code::Internal),
            (Backend::Postgres, "5", Other, Code::Internal),
            // SQLite: primary and extended result codes
            (Backend::Sqlite, "5", Busy, Code::Unavailable),
            (Backend::Sqlite, "261", Busy, Code::Unavailable),
            (Backend::Sqlite, "773", Busy, Code::Unavailable),
            (Backend::Sqlite, "517", Conflict, Code::Aborted),
            (Backend::Sqlite, "6", Busy, Code::Unavailable),
            (Backend::Sqlite, "262", Busy, Code::Unavailable),
            (Backend::Sqlite, "518", Busy, Code::Unavailable),
            (Backend::Sqlite, "7", Exhausted, Code::Unavailable),
            (Backend::Sqlite, "13", Exhausted, Code::Unavailable),
            (Backend::Sqlite, "10", Unreachable, Code::Unavailable),
            (Backend::Sqlite, "266", Unreachable, Code::Unavailable),
            (Backend::Sqlite, "14", Unreachable, Code::Unavailable),
            (Backend::Sqlite, "9", TimedOut, Code::DeadlineExceeded),
            (Backend::Sqlite, "2067", Duplicate, Code::AlreadyExists),
            (Backend::Sqlite, "1555", Duplicate, Code::AlreadyExists),
            (
                Backend::Sqlite,
                "787",
                MissingReference,
                Code::FailedPrecondition,
            ),
            (Backend::Sqlite, "1299", InvalidData, Code::InvalidArgument),
            (Backend::Sqlite, "275", InvalidData, Code::InvalidArgument),
            (Backend::Sqlite, "18", InvalidData, Code::InvalidArgument),
            (Backend::Sqlite, "20", InvalidData, Code::InvalidArgument),
            (Backend::Sqlite, "1", Other, Code::Internal),
            (Backend::Sqlite, "11", Other, Code::Internal),
            (Backend::Sqlite, "19", Other, Code::Internal),
            (Backend::Sqlite, "40001", Other, Code::Internal),
            (Backend::Sqlite, "busy", Other, Code::Internal),
        ];
        for &(backend, code, class, grpc) in table {
            let classified = DbFailure::classify(backend, code);
            assert_eq!(classified, class, "{backend:?} {code}");
            assert_eq!(classified.kind().code(), grpc, "{backend:?} {code}");
        }
    }

    #[test]
    fn transient_classes_and_only_they_carry_a_retry_hint() {
        use DbFailure::*;
        for class in [Conflict, Busy, Unreachable, Exhausted] {
            assert!(class.retry_after().is_some(), "{class:?}");
        }
        for class in [TimedOut, Duplicate, MissingReference, InvalidData, Other] {
            assert_eq!(class.retry_after(), None, "{class:?}");
        }
    }

    #[test]
    fn connection_errors_without_a_code_are_unreachable() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        for err in [io, sqlx::Error::PoolTimedOut, sqlx::Error::PoolClosed] {
            assert_eq!(DbFailure::of(&err), DbFailure::Unreachable, "{err}");
        }
        assert_eq!(
            DbFailure::of(&sqlx::Error::ColumnNotFound("x".into())),
            DbFailure::Other
        );
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
