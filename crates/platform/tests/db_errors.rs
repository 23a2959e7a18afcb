//! The database error table against real databases: each test makes
//! PostgreSQL or SQLite fail the way it does in production (a writer
//! holding the lock, a stale snapshot, a serialization failure, a real
//! deadlock, a connection terminated mid-query, ...) and checks the gRPC
//! status a service answers with it: the code and, where trying again
//! helps, `google.rpc.RetryInfo`; and, for the classes a caller could in
//! principle cause (which a validating service never lets reach the
//! database, so they point at a server bug), that answering logs the
//! database's code and words at WARN while the caller sees neither.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use agora_platform::config::Secret;
use agora_platform::db::{Db, DbFailure};
use agora_platform::error::Error;
use agora_testkit::{Backend, TestDatabase};
use sqlx::pool::PoolConnection;
use sqlx::{Any, Row as _};
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

async fn open(backend: Backend) -> anyhow::Result<(TestDatabase, Db)> {
    let database = TestDatabase::create(backend).await?;
    let db = Db::connect(&Secret::new(database.url().to_owned())).await?;
    Ok((database, db))
}

async fn execute(conn: &mut PoolConnection<Any>, sql: &'static str) -> Result<(), sqlx::Error> {
    sqlx::query(sql).execute(&mut **conn).await.map(drop)
}

/// The error's code as the driver reports it (SQLSTATE or SQLite extended
/// result code), for messages.
fn code_of(err: &sqlx::Error) -> String {
    match err {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()).unwrap_or_default(),
        other => format!("{other:?}"),
    }
}

/// What a service would answer for `err`, and the class it was put in.
fn answer(err: sqlx::Error) -> (DbFailure, String, Status) {
    let (class, code, status, _) = answer_logged(err);
    (class, code, status)
}

/// Log lines written while answering, captured by a subscriber of our own.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// [`answer`], with what answering logged.
fn answer_logged(err: sqlx::Error) -> (DbFailure, String, Status, String) {
    let class = DbFailure::of(&err);
    let code = code_of(&err);
    // Shown with --nocapture and on failure: which code the driver gave.
    println!("database error {code} -> {class:?}");
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let status = tracing::subscriber::with_default(subscriber, || Status::from(Error::from(err)));
    let log = String::from_utf8_lossy(&captured.0.lock().unwrap_or_else(PoisonError::into_inner))
        .into_owned();
    print!("{log}");
    (class, code, status, log)
}

/// Asserts that answering logged a WARN naming the database's `code` and
/// containing `cause` (the database's own words), which the caller's
/// status does not contain.
fn assert_logged_not_sent(status: &Status, log: &str, code: &str, cause: &str, what: &str) {
    let line = log
        .lines()
        .find(|line| line.contains(code))
        .unwrap_or_else(|| panic!("{what}: no log line names {code}: {log:?}"));
    assert!(line.contains("WARN"), "{what}: not a warning: {line}");
    assert!(
        line.contains(cause),
        "{what}: the cause is not logged: {line}"
    );
    assert!(
        !status.message().contains(cause),
        "{what}: the database's words reached the caller: {status:?}"
    );
}

/// Asserts `status` is `code` with a `RetryInfo` of a positive delay.
fn assert_retry(status: &Status, code: Code, what: &str) {
    assert_eq!(status.code(), code, "{what}: {status:?}");
    let retry = status
        .get_details_retry_info()
        .unwrap_or_else(|| panic!("{what}: no RetryInfo in {status:?}"));
    let delay = retry.retry_delay.expect("a retry delay");
    assert!(delay > Duration::ZERO, "{what}: {delay:?}");
}

async fn sqlite_table(db: &Db) -> anyhow::Result<()> {
    sqlx::query(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL UNIQUE, \
         n INTEGER NOT NULL DEFAULT 0 CHECK (n >= 0))",
    )
    .execute(db.pool())
    .await?;
    Ok(())
}

#[tokio::test]
async fn sqlite_busy_is_unavailable_with_retry_info() -> anyhow::Result<()> {
    let (_database, db) = open(Backend::Sqlite).await?;
    sqlite_table(&db).await?;
    let mut holder = db.pool().acquire().await?;
    execute(&mut holder, "BEGIN IMMEDIATE").await?;
    execute(&mut holder, "INSERT INTO t (v) VALUES ('held')").await?;

    // A second writer that does not wait for the lock.
    let mut writer = db.pool().acquire().await?;
    execute(&mut writer, "PRAGMA busy_timeout = 0").await?;
    let err = execute(&mut writer, "INSERT INTO t (v) VALUES ('blocked')")
        .await
        .expect_err("the write lock is held");
    let (class, code, status) = answer(err);
    assert_eq!(
        code.parse::<i32>().map(|c| c & 0xff),
        Ok(5),
        "SQLITE_BUSY: {code}"
    );
    assert_eq!(class, DbFailure::Busy, "{code}");
    assert_retry(&status, Code::Unavailable, "SQLITE_BUSY");

    // The same from `BEGIN IMMEDIATE`, as `Db::begin_write` does.
    let err = execute(&mut writer, "BEGIN IMMEDIATE")
        .await
        .expect_err("the write lock is held");
    let (class, code, status) = answer(err);
    assert_eq!(class, DbFailure::Busy, "{code}");
    assert_retry(&status, Code::Unavailable, "BEGIN IMMEDIATE");

    // With a (short) busy timeout, it waits, then fails the same way.
    execute(&mut writer, "PRAGMA busy_timeout = 50").await?;
    let err = execute(&mut writer, "INSERT INTO t (v) VALUES ('blocked')")
        .await
        .expect_err("the write lock is still held");
    let (class, code, status) = answer(err);
    assert_eq!(class, DbFailure::Busy, "{code}");
    assert_retry(&status, Code::Unavailable, "SQLITE_BUSY after the timeout");

    execute(&mut holder, "ROLLBACK").await?;
    execute(&mut writer, "INSERT INTO t (v) VALUES ('free')").await?;
    Ok(())
}

#[tokio::test]
async fn sqlite_busy_snapshot_is_aborted_with_retry_info() -> anyhow::Result<()> {
    let (_database, db) = open(Backend::Sqlite).await?;
    sqlite_table(&db).await?;
    // A deferred transaction reads: its snapshot is taken.
    let mut reader = db.pool().acquire().await?;
    execute(&mut reader, "BEGIN").await?;
    sqlx::query("SELECT count(*) FROM t")
        .fetch_one(&mut *reader)
        .await?;
    // Another connection writes and commits (WAL: it does not wait).
    let mut other = db.pool().acquire().await?;
    execute(&mut other, "INSERT INTO t (v) VALUES ('newer')").await?;
    // The reader's write would be based on a stale snapshot.
    let err = execute(&mut reader, "INSERT INTO t (v) VALUES ('stale')")
        .await
        .expect_err("the snapshot is stale");
    let (class, code, status) = answer(err);
    assert_eq!(code, "517", "SQLITE_BUSY_SNAPSHOT");
    assert_eq!(class, DbFailure::Conflict);
    assert_retry(&status, Code::Aborted, "SQLITE_BUSY_SNAPSHOT");
    execute(&mut reader, "ROLLBACK").await?;
    Ok(())
}

#[tokio::test]
async fn sqlite_constraint_violations_are_the_callers_not_internal() -> anyhow::Result<()> {
    let (_database, db) = open(Backend::Sqlite).await?;
    sqlite_table(&db).await?;
    let mut conn = db.pool().acquire().await?;
    execute(&mut conn, "INSERT INTO t (v) VALUES ('one')").await?;
    let cases: [(&'static str, &str, Code, &str); 3] = [
        (
            "INSERT INTO t (v) VALUES ('one')",
            "2067",
            Code::AlreadyExists,
            "UNIQUE constraint failed",
        ),
        (
            "INSERT INTO t (v, n) VALUES ('two', -1)",
            "275",
            Code::InvalidArgument,
            "CHECK constraint failed",
        ),
        (
            "INSERT INTO t (v) VALUES (NULL)",
            "1299",
            Code::InvalidArgument,
            "NOT NULL constraint failed",
        ),
    ];
    for (sql, expected, grpc, cause) in cases {
        let err = execute(&mut conn, sql).await.expect_err(sql);
        let (_, code, status, log) = answer_logged(err);
        assert_eq!(code, expected, "{sql}");
        assert_eq!(status.code(), grpc, "{sql}: {status:?}");
        assert!(
            !status.message().contains("UNIQUE") && !status.message().contains("t.v"),
            "the database's words stay in the log: {status:?}"
        );
        // A validating service never lets these reach the database: the
        // server's log says so, with the code.
        assert_logged_not_sent(&status, &log, expected, cause, sql);
    }
    Ok(())
}

async fn postgres_table(db: &Db) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "CREATE TABLE t (id INT PRIMARY KEY, v INT NOT NULL, label VARCHAR(3)); \
         INSERT INTO t (id, v) VALUES (1, 0), (2, 0); \
         CREATE TABLE child (id INT PRIMARY KEY, parent INT NOT NULL REFERENCES t (id));",
    )
    .execute(db.pool())
    .await?;
    Ok(())
}

#[tokio::test]
async fn postgres_serialization_failure_is_aborted_with_retry_info() -> anyhow::Result<()> {
    let (_database, db) = open(Backend::Postgres).await?;
    postgres_table(&db).await?;
    let mut first = db.pool().acquire().await?;
    let mut second = db.pool().acquire().await?;
    for conn in [&mut first, &mut second] {
        execute(conn, "BEGIN ISOLATION LEVEL SERIALIZABLE").await?;
        sqlx::query("SELECT v FROM t WHERE id = 1")
            .fetch_one(&mut **conn)
            .await?;
    }
    execute(&mut first, "UPDATE t SET v = v + 1 WHERE id = 1").await?;
    execute(&mut first, "COMMIT").await?;
    let err = execute(&mut second, "UPDATE t SET v = v + 1 WHERE id = 1")
        .await
        .expect_err("the second transaction read a row changed since");
    let (class, code, status) = answer(err);
    assert_eq!(code, "40001");
    assert_eq!(class, DbFailure::Conflict);
    assert_retry(&status, Code::Aborted, "40001");
    execute(&mut second, "ROLLBACK").await?;
    Ok(())
}

#[tokio::test]
async fn postgres_deadlock_is_aborted_with_retry_info() -> anyhow::Result<()> {
    let (_database, db) = open(Backend::Postgres).await?;
    postgres_table(&db).await?;
    let mut first = db.pool().acquire().await?;
    let mut second = db.pool().acquire().await?;
    for conn in [&mut first, &mut second] {
        // Detect it sooner than the default second (a superuser setting:
        // the test cluster's user is one; the default works too).
        let _ = execute(conn, "SET deadlock_timeout = '100ms'").await;
        execute(conn, "BEGIN").await?;
    }
    execute(&mut first, "UPDATE t SET v = 1 WHERE id = 1").await?;
    execute(&mut second, "UPDATE t SET v = 2 WHERE id = 2").await?;
    // Each now waits for the row the other holds.
    let (a, b) = tokio::join!(
        execute(&mut first, "UPDATE t SET v = 1 WHERE id = 2"),
        execute(&mut second, "UPDATE t SET v = 2 WHERE id = 1"),
    );
    let mut failures = Vec::new();
    for (result, conn) in [(a, &mut first), (b, &mut second)] {
        if let Err(err) = result {
            failures.push(answer(err));
        }
        execute(conn, "ROLLBACK").await?;
    }
    assert_eq!(failures.len(), 1, "exactly one victim: {failures:?}");
    let (class, code, status) = failures.remove(0);
    assert_eq!(code, "40P01");
    assert_eq!(class, DbFailure::Conflict);
    assert_retry(&status, Code::Aborted, "40P01");
    Ok(())
}

#[tokio::test]
async fn postgres_connection_terminated_mid_query_is_unavailable_with_retry_info()
-> anyhow::Result<()> {
    let (_database, db) = open(Backend::Postgres).await?;
    let mut victim = db.pool().acquire().await?;
    let pid: i32 = sqlx::query("SELECT pg_backend_pid()")
        .fetch_one(&mut *victim)
        .await?
        .try_get(0)?;
    let pool = db.pool().clone();
    let terminate = async move {
        // Once the victim is busy with its query, end its backend.
        for _ in 0..500 {
            let busy: i64 = sqlx::query(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE pid = $1 AND state = 'active' AND query LIKE '%pg_sleep%'",
            )
            .bind(pid)
            .fetch_one(&pool)
            .await?
            .try_get(0)?;
            if busy > 0 {
                let done: bool = sqlx::query("SELECT pg_terminate_backend($1)")
                    .bind(pid)
                    .fetch_one(&pool)
                    .await?
                    .try_get(0)?;
                anyhow::ensure!(done, "pg_terminate_backend did not end {pid}");
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::bail!("the victim's query never showed as active")
    };
    let (slept, terminated) = tokio::join!(execute(&mut victim, "SELECT pg_sleep(30)"), terminate);
    terminated?;
    let err = slept.expect_err("the connection was terminated mid-query");
    let (class, code, status) = answer(err);
    assert_eq!(class, DbFailure::Unreachable, "{code}");
    assert_retry(&status, Code::Unavailable, "terminated mid-query");

    // The dead connection's next query fails the same way.
    let err = execute(&mut victim, "SELECT 1")
        .await
        .expect_err("the connection is gone");
    let (class, code, status) = answer(err);
    assert_eq!(class, DbFailure::Unreachable, "{code}");
    assert_retry(&status, Code::Unavailable, "query on a dead connection");
    victim.close_on_drop();
    Ok(())
}

#[tokio::test]
async fn postgres_lock_not_available_is_unavailable_and_statement_timeout_deadline_exceeded()
-> anyhow::Result<()> {
    let (_database, db) = open(Backend::Postgres).await?;
    postgres_table(&db).await?;
    let mut holder = db.pool().acquire().await?;
    let mut other = db.pool().acquire().await?;
    execute(&mut holder, "BEGIN").await?;
    execute(&mut holder, "SELECT v FROM t WHERE id = 1 FOR UPDATE").await?;
    let err = execute(&mut other, "SELECT v FROM t WHERE id = 1 FOR UPDATE NOWAIT")
        .await
        .expect_err("the row is locked");
    let (class, code, status) = answer(err);
    assert_eq!(code, "55P03");
    assert_eq!(class, DbFailure::Busy);
    assert_retry(&status, Code::Unavailable, "55P03");
    execute(&mut holder, "ROLLBACK").await?;

    execute(&mut other, "SET statement_timeout = 100").await?;
    let err = execute(&mut other, "SELECT pg_sleep(30)")
        .await
        .expect_err("the statement times out");
    let (class, code, status, log) = answer_logged(err);
    assert_eq!(code, "57014");
    assert_eq!(class, DbFailure::TimedOut);
    // Not UNAVAILABLE, which retry policies repeat on their own: the same
    // query would likely time out again, so no hint to retry either.
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.get_details_retry_info().is_none(), "{status:?}");
    assert_logged_not_sent(&status, &log, "57014", "statement timeout", "57014");
    execute(&mut other, "RESET statement_timeout").await?;
    Ok(())
}

/// A write that reaches a standby (the pool still holds connections to the
/// old primary during a failover) fails with 25006, as a write in a
/// read-only transaction does: UNAVAILABLE with RetryInfo, since the same
/// call succeeds once the pool reaches the new primary.
#[tokio::test]
async fn postgres_write_to_a_read_only_server_is_unavailable_with_retry_info() -> anyhow::Result<()>
{
    let (_database, db) = open(Backend::Postgres).await?;
    postgres_table(&db).await?;
    let mut conn = db.pool().acquire().await?;
    // What a hot standby enforces for every transaction.
    execute(&mut conn, "SET default_transaction_read_only = on").await?;
    let err = execute(&mut conn, "UPDATE t SET v = 1 WHERE id = 1")
        .await
        .expect_err("the session is read-only");
    let (class, code, status) = answer(err);
    assert_eq!(code, "25006");
    assert_eq!(class, DbFailure::Unreachable);
    assert_retry(&status, Code::Unavailable, "25006");
    // Reads still work there.
    execute(&mut conn, "SELECT v FROM t").await?;
    execute(&mut conn, "RESET default_transaction_read_only").await?;
    Ok(())
}

/// A statement in a transaction that already failed (25P02) means the
/// service went on after an error: a bug, INTERNAL, cause in the log only.
#[tokio::test]
async fn postgres_statement_in_a_failed_transaction_is_internal() -> anyhow::Result<()> {
    let (_database, db) = open(Backend::Postgres).await?;
    postgres_table(&db).await?;
    let mut conn = db.pool().acquire().await?;
    execute(&mut conn, "BEGIN").await?;
    execute(&mut conn, "INSERT INTO t (id, v) VALUES (1, 0)")
        .await
        .expect_err("a duplicate key");
    let err = execute(&mut conn, "SELECT v FROM t")
        .await
        .expect_err("the transaction is aborted");
    let (class, code, status, log) = answer_logged(err);
    assert_eq!(code, "25P02");
    assert_eq!(class, DbFailure::Other);
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert_eq!(status.message(), "internal error");
    let line = log
        .lines()
        .find(|l| l.contains("25P02"))
        .unwrap_or_default();
    assert!(line.contains("ERROR"), "logged as an error: {log:?}");
    execute(&mut conn, "ROLLBACK").await?;
    Ok(())
}

#[tokio::test]
async fn postgres_too_many_connections_is_unavailable_with_retry_info() -> anyhow::Result<()> {
    let (database, db) = open(Backend::Postgres).await?;
    let role = format!("limited_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN CONNECTION LIMIT 0"
    )))
    .execute(db.pool())
    .await?;
    let url = database
        .url()
        .replacen("://postgres@", &format!("://{role}@"), 1);
    anyhow::ensure!(url != database.url(), "unexpected test URL shape");
    let connected = {
        use sqlx::Connection as _;
        sqlx::AnyConnection::connect(&url).await
    };
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE {role}")))
        .execute(db.pool())
        .await?;
    let err = connected.expect_err("a role allowed no connection");
    let (class, code, status) = answer(err);
    assert_eq!(code, "53300");
    assert_eq!(class, DbFailure::Exhausted);
    assert_retry(&status, Code::Unavailable, "53300");
    Ok(())
}

#[tokio::test]
async fn postgres_data_and_constraint_errors_are_the_callers_not_internal() -> anyhow::Result<()> {
    let (_database, db) = open(Backend::Postgres).await?;
    postgres_table(&db).await?;
    let cases: [(&'static str, Option<&'static str>, &str, Code, &str); 7] = [
        // A string longer than its column.
        (
            "UPDATE t SET label = $1 WHERE id = 1",
            Some("four"),
            "22001",
            Code::InvalidArgument,
            "value too long",
        ),
        // Text that is not a number.
        (
            "SELECT CAST($1 AS INTEGER)",
            Some("abc"),
            "22P02",
            Code::InvalidArgument,
            "invalid input syntax",
        ),
        // A NUL byte, which PostgreSQL text cannot hold.
        (
            "UPDATE t SET label = $1 WHERE id = 1",
            Some("a\0b"),
            "22021",
            Code::InvalidArgument,
            "invalid byte sequence",
        ),
        (
            "INSERT INTO t (id, v) VALUES (3, NULL)",
            None,
            "23502",
            Code::InvalidArgument,
            "not-null constraint",
        ),
        (
            "INSERT INTO t (id, v) VALUES (1, 0)",
            None,
            "23505",
            Code::AlreadyExists,
            "duplicate key",
        ),
        (
            "INSERT INTO child (id, parent) VALUES (1, 99)",
            None,
            "23503",
            Code::FailedPrecondition,
            "foreign key constraint",
        ),
        (
            "ALTER TABLE t ADD CONSTRAINT v_small CHECK (v < 10); \
             UPDATE t SET v = 11 WHERE id = 1",
            None,
            "23514",
            Code::InvalidArgument,
            "check constraint",
        ),
    ];
    for (sql, param, expected, grpc, cause) in cases {
        let err = match param {
            Some(param) => sqlx::query(sql).bind(param).execute(db.pool()).await,
            None => sqlx::raw_sql(sql).execute(db.pool()).await,
        }
        .expect_err(sql);
        let (_, code, status, log) = answer_logged(err);
        assert_eq!(code, expected, "{sql}");
        assert_eq!(status.code(), grpc, "{sql}: {status:?}");
        assert!(
            status.get_details_retry_info().is_none(),
            "{sql}: retrying does not help: {status:?}"
        );
        // Services validate first: reaching these is a server bug, logged
        // with the SQLSTATE and the database's words, which stay there.
        assert_logged_not_sent(&status, &log, expected, cause, sql);
    }
    Ok(())
}
