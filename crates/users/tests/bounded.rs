//! The users service under pressure, over real gRPC on loopback against a
//! fresh database (PostgreSQL and SQLite): the admin bootstrap under racing
//! sign-ups, password lengths checked before any work, and password hashing
//! refusing what it cannot take on with RESOURCE_EXHAUSTED.

use std::time::Duration;

use agora_platform::db::{Backend as DbBackend, Db};
use agora_platform::error::reason_of;
use agora_proto::users::v1 as pb;
use agora_proto::users::v1::user_service_client::UserServiceClient;
use agora_testkit::{Backend, TestEnv, TestServer, backend_tests, bad_fields};
use tonic::Code;
use tonic_types::StatusExt;

const PASSWORD: &str = "correct horse battery";

fn new_user(email: &str) -> pb::CreateUserRequest {
    pb::CreateUserRequest {
        email: email.to_owned(),
        name: "Ada Lovelace".to_owned(),
        password: PASSWORD.to_owned(),
    }
}

/// How many listed admin emails sign up at once in the bootstrap race.
const RACERS: usize = 20;

/// How many times the race is run, each on a fresh database: the check made
/// outside the transaction let two or more admins through in most single
/// runs, not in all of them.
const RACE_ROUNDS: usize = 3;

/// Twenty sign-ups with twenty different listed admin emails, all at once:
/// exactly one becomes admin and the others are plain users, none of them an
/// error. Hashing is allowed to run for all of them at once and to wait long,
/// so that the sign-ups reach the database together.
async fn racing_admin_bootstraps_make_exactly_one_admin(backend: Backend) -> anyhow::Result<()> {
    for _ in 0..RACE_ROUNDS {
        race_admin_bootstraps(backend).await?;
    }
    Ok(())
}

async fn race_admin_bootstraps(backend: Backend) -> anyhow::Result<()> {
    let mut env = TestEnv::new(backend).await?;
    let emails: Vec<String> = (0..RACERS)
        .map(|i| format!("boss{i}@example.com"))
        .collect();
    env.config.auth.admin_emails = emails.clone();
    env.config.auth.admin_emails.push("late@example.com".into());
    env.config.passwords.max_concurrent_hashes = RACERS;
    env.config.passwords.max_wait_ms = 120_000;
    let server = TestServer::start(vec![agora_users::hosted(&env.config).await?]).await?;
    let client = UserServiceClient::new(server.channel()?);
    let racers: Vec<_> = emails
        .iter()
        .map(|email| {
            let mut client = client.clone();
            let request = new_user(email);
            tokio::spawn(async move { client.create_user(request).await })
        })
        .collect();
    let mut admins = Vec::new();
    for racer in racers {
        let user = racer.await??.into_inner().user.expect("user");
        if user.roles.iter().any(|role| role == "admin") {
            admins.push(user.email);
        } else {
            assert!(user.roles.is_empty(), "{:?}", user.roles);
        }
    }
    assert_eq!(admins.len(), 1, "admins: {admins:?}");

    // The bootstrap stays closed: one more listed email is a plain user, and
    // the admin's token (logged in afresh) carries the role.
    let mut client = client.clone();
    let late = client
        .create_user(new_user("late@example.com"))
        .await?
        .into_inner()
        .user
        .expect("user");
    assert!(late.roles.is_empty());
    let admin = client
        .authenticate(pb::AuthenticateRequest {
            email: admins[0].clone(),
            password: PASSWORD.to_owned(),
        })
        .await?
        .into_inner()
        .user
        .expect("user");
    assert_eq!(admin.roles, ["admin"]);
    server.stop().await
}

/// A password longer than `passwords.max_password_bytes` is INVALID_ARGUMENT
/// naming `password`, for sign-up and login alike, before any hashing or
/// database work: with no hashing slot and no waiting room at all, the
/// answer is still INVALID_ARGUMENT, never RESOURCE_EXHAUSTED.
async fn over_long_passwords_are_invalid_before_any_work(backend: Backend) -> anyhow::Result<()> {
    let mut env = TestEnv::new(backend).await?;
    env.config.passwords.max_password_bytes = 64;
    let server = TestServer::start(vec![agora_users::hosted(&env.config).await?]).await?;
    let mut client = UserServiceClient::new(server.channel()?);
    client.create_user(new_user("ada@example.com")).await?;

    // At the limit: accepted (multi-byte characters count in bytes).
    let at_limit = "é".repeat(32);
    client
        .create_user(pb::CreateUserRequest {
            password: at_limit.clone(),
            ..new_user("grace@example.com")
        })
        .await?;
    client
        .authenticate(pb::AuthenticateRequest {
            email: "grace@example.com".into(),
            password: at_limit,
        })
        .await?;

    // The longest still under `server.max_request_bytes` (256 KiB): a
    // larger message is refused whole, as too large, before any work too.
    for password in ["é".repeat(33), "x".repeat(65), "p".repeat(200 * 1024)] {
        let status = client
            .create_user(pb::CreateUserRequest {
                password: password.clone(),
                ..new_user("hedy@example.com")
            })
            .await
            .expect_err("over-long sign-up password");
        assert_eq!(bad_fields(&status), ["password"], "{status:?}");
        for email in ["ada@example.com", "nobody@example.com"] {
            let status = client
                .authenticate(pb::AuthenticateRequest {
                    email: email.into(),
                    password: password.clone(),
                })
                .await
                .expect_err("over-long login password");
            assert_eq!(bad_fields(&status), ["password"], "{status:?}");
        }
    }
    // Nothing was created by the refused sign-ups.
    let status = client
        .authenticate(pb::AuthenticateRequest {
            email: "hedy@example.com".into(),
            password: PASSWORD.into(),
        })
        .await
        .expect_err("never created");
    assert_eq!(status.code(), Code::Unauthenticated);
    server.stop().await
}

/// With one hashing slot and no waiting room, a burst of logins gets some
/// answers of RESOURCE_EXHAUSTED, reason `PASSWORD_HASHING_BUSY` and a
/// `RetryInfo`, and the rest their real answer; once the burst is over a
/// login succeeds again.
async fn saturated_hashing_is_resource_exhausted_with_retry_info(
    backend: Backend,
) -> anyhow::Result<()> {
    let mut env = TestEnv::new(backend).await?;
    env.config.passwords.max_concurrent_hashes = 1;
    env.config.passwords.max_waiting = 0;
    let server = TestServer::start(vec![agora_users::hosted(&env.config).await?]).await?;
    let mut client = UserServiceClient::new(server.channel()?);
    client.create_user(new_user("ada@example.com")).await?;

    let burst: Vec<_> = (0..24)
        .map(|i| {
            let mut client = client.clone();
            let request = pb::AuthenticateRequest {
                email: format!("nobody{i}@example.com"),
                password: PASSWORD.into(),
            };
            tokio::spawn(async move { client.authenticate(request).await })
        })
        .collect();
    let (mut refused, mut unauthenticated) = (0, 0);
    for call in burst {
        let status = call.await?.expect_err("unknown emails never log in");
        match status.code() {
            Code::Unauthenticated => unauthenticated += 1,
            Code::ResourceExhausted => {
                refused += 1;
                assert_eq!(reason_of(&status).as_deref(), Some("PASSWORD_HASHING_BUSY"));
                let retry = status.get_details_retry_info().expect("RetryInfo");
                assert!(retry.retry_delay.is_some_and(|d| d > Duration::ZERO));
            }
            other => panic!("unexpected {other:?}: {status:?}"),
        }
    }
    assert!(refused > 0, "no call refused ({unauthenticated} answered)");
    assert!(unauthenticated > 0, "every call refused");

    client
        .authenticate(pb::AuthenticateRequest {
            email: "ada@example.com".into(),
            password: PASSWORD.into(),
        })
        .await?;
    server.stop().await
}

/// A database that had an admin before the bootstrap was a table (made
/// by the first migration, as the old code did): upgrading closes the
/// bootstrap, so a listed email signing up now is a plain user.
async fn an_existing_admin_closes_the_bootstrap_on_upgrade(backend: Backend) -> anyhow::Result<()> {
    /// The last migration without the `admin_bootstrap` table.
    const BEFORE_BOOTSTRAP_TABLE: i64 = 20261124000001;
    let mut env = TestEnv::new(backend).await?;
    let db = Db::connect(&env.config.database_url("users")).await?;
    let migrator = match db.backend() {
        DbBackend::Postgres => agora_users::MIGRATIONS.postgres,
        DbBackend::Sqlite => agora_users::MIGRATIONS.sqlite,
    };
    migrator.run_to(BEFORE_BOOTSTRAP_TABLE, db.pool()).await?;
    sqlx::query(
        "INSERT INTO users (id, email, name, status, roles, password_hash, created_at, \
         updated_at, version) VALUES ($1, 'old-boss@example.com', 'Old Boss', 'active', \
         '[\"admin\"]', 'x', 1, 1, 1)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .execute(db.pool())
    .await?;
    db.close().await;

    env.config.auth.admin_emails = vec!["new-boss@example.com".into()];
    let server = TestServer::start(vec![agora_users::hosted(&env.config).await?]).await?;
    let mut client = UserServiceClient::new(server.channel()?);
    let user = client
        .create_user(new_user("new-boss@example.com"))
        .await?
        .into_inner()
        .user
        .expect("user");
    assert!(user.roles.is_empty(), "{:?}", user.roles);
    server.stop().await
}

backend_tests!(
    racing_admin_bootstraps_make_exactly_one_admin,
    an_existing_admin_closes_the_bootstrap_on_upgrade,
    over_long_passwords_are_invalid_before_any_work,
    saturated_hashing_is_resource_exhausted_with_retry_info,
);
