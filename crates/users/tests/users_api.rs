//! The users service over real gRPC on loopback, against a fresh database.
//! Every test runs twice: on PostgreSQL and on SQLite.

use agora_platform::config::Secret;
use agora_platform::db::Db;
use agora_proto::users::v1 as pb;
use agora_proto::users::v1::user_service_client::UserServiceClient;
use agora_testkit::with_token;
use agora_testkit::{Backend, TestEnv, TestServer, backend_tests};
use agora_users::events::UserState;
use agora_users::store::{SqlUserStore, UserStore};
use tonic::transport::Channel;
use tonic::{Code, Request};
use tonic_types::StatusExt;

struct Harness {
    env: TestEnv,
    server: TestServer,
    client: UserServiceClient<Channel>,
}

async fn start(backend: Backend) -> anyhow::Result<Harness> {
    let env = TestEnv::new(backend).await?;
    let server = TestServer::start(vec![agora_users::hosted(&env.config).await?]).await?;
    let client = UserServiceClient::new(server.channel()?);
    Ok(Harness {
        env,
        server,
        client,
    })
}

fn update_email(
    id: &str,
    email: &str,
    expected_version: Option<i64>,
    token: &str,
) -> Request<pb::UpdateEmailRequest> {
    let message = pb::UpdateEmailRequest {
        id: id.to_owned(),
        email: email.to_owned(),
        expected_version,
    };
    with_token(message, token)
}

fn new_user(email: &str) -> pb::CreateUserRequest {
    pb::CreateUserRequest {
        email: email.to_owned(),
        name: "Ada Lovelace".to_owned(),
        password: "correct horse battery".to_owned(),
    }
}

/// Creates a user and logs in: (user, token).
async fn sign_up(h: &mut Harness, email: &str) -> anyhow::Result<(pb::User, String)> {
    let user = h
        .client
        .create_user(new_user(email))
        .await?
        .into_inner()
        .user
        .expect("user");
    let auth = h
        .client
        .authenticate(pb::AuthenticateRequest {
            email: email.to_owned(),
            password: "correct horse battery".to_owned(),
        })
        .await?
        .into_inner();
    Ok((user, auth.access_token))
}

async fn sign_up_log_in_and_read_yourself(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let created = h
        .client
        .create_user(new_user("  Ada@Example.com "))
        .await?
        .into_inner()
        .user
        .expect("user");
    assert_eq!(created.email, "ada@example.com");
    assert_eq!(created.status(), pb::UserStatus::Pending);
    assert_eq!(created.version, 1);
    assert!(uuid::Uuid::parse_str(&created.id).is_ok());

    let auth = h
        .client
        .authenticate(pb::AuthenticateRequest {
            email: "ADA@example.com".into(),
            password: "correct horse battery".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        auth.user.as_ref().map(|u| u.id.as_str()),
        Some(created.id.as_str())
    );
    assert!(auth.expires_at.expect("expiry").seconds > 0);

    let read = h
        .client
        .get_user(with_token(
            pb::GetUserRequest {
                id: created.id.clone(),
            },
            &auth.access_token,
        ))
        .await?
        .into_inner()
        .user
        .expect("user");
    assert_eq!(read, created);
    h.server.stop().await
}

async fn invalid_input_names_every_bad_field(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let status = h
        .client
        .create_user(pb::CreateUserRequest {
            email: "not-an-email".into(),
            name: "   ".into(),
            password: "short".into(),
        })
        .await
        .expect_err("three bad fields");
    assert_eq!(status.code(), Code::InvalidArgument);
    let details = status
        .get_details_bad_request()
        .expect("BadRequest details");
    let mut fields: Vec<_> = details
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    fields.sort();
    assert_eq!(fields, ["email", "name", "password"]);

    // Ids, login input and oversized values are rejected too, never a panic.
    let (_, token) = sign_up(&mut h, "grace@example.com").await?;
    let status = h
        .client
        .get_user(with_token(
            pb::GetUserRequest {
                id: "x'; DROP TABLE users; --".into(),
            },
            &token,
        ))
        .await
        .expect_err("bad id");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status
            .get_details_bad_request()
            .expect("details")
            .field_violations[0]
            .field,
        "id"
    );
    let status = h
        .client
        .authenticate(pb::AuthenticateRequest {
            email: String::new(),
            password: String::new(),
        })
        .await
        .expect_err("empty login");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = h
        .client
        .create_user(pb::CreateUserRequest {
            email: format!("{}@example.com", "a".repeat(10_000)),
            name: "\u{0}".repeat(1000),
            password: "p".repeat(100_000),
        })
        .await
        .expect_err("oversized");
    assert_eq!(status.code(), Code::InvalidArgument);
    h.server.stop().await
}

async fn duplicate_email_is_already_exists(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    h.client.create_user(new_user("ada@example.com")).await?;
    let status = h
        .client
        .create_user(new_user("ADA@example.com"))
        .await
        .expect_err("same email, other case");
    assert_eq!(status.code(), Code::AlreadyExists);

    // Taking someone else's email with UpdateEmail is refused the same way.
    let (grace, token) = sign_up(&mut h, "grace@example.com").await?;
    let status = h
        .client
        .update_email(update_email(&grace.id, "ada@example.com", None, &token))
        .await
        .expect_err("taken");
    assert_eq!(status.code(), Code::AlreadyExists);
    h.server.stop().await
}

async fn wrong_password_does_not_reveal_the_email(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    h.client.create_user(new_user("ada@example.com")).await?;
    let wrong_password = h
        .client
        .authenticate(pb::AuthenticateRequest {
            email: "ada@example.com".into(),
            password: "wrong password".into(),
        })
        .await
        .expect_err("wrong password");
    let unknown_email = h
        .client
        .authenticate(pb::AuthenticateRequest {
            email: "nobody@example.com".into(),
            password: "wrong password".into(),
        })
        .await
        .expect_err("unknown email");
    assert_eq!(wrong_password.code(), Code::Unauthenticated);
    assert_eq!(unknown_email.code(), Code::Unauthenticated);
    assert_eq!(wrong_password.message(), unknown_email.message());
    h.server.stop().await
}

async fn stale_version_is_aborted(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let (user, token) = sign_up(&mut h, "ada@example.com").await?;
    let updated = h
        .client
        .update_email(update_email(&user.id, "ada2@example.com", Some(1), &token))
        .await?
        .into_inner()
        .user
        .expect("user");
    assert_eq!(
        (updated.version, updated.email.as_str()),
        (2, "ada2@example.com")
    );

    let status = h
        .client
        .update_email(update_email(&user.id, "ada3@example.com", Some(1), &token))
        .await
        .expect_err("stale");
    assert_eq!(status.code(), Code::Aborted);
    let current = h
        .client
        .get_user(with_token(pb::GetUserRequest { id: user.id }, &token))
        .await?
        .into_inner()
        .user
        .expect("user");
    assert_eq!(
        (current.version, current.email.as_str()),
        (2, "ada2@example.com")
    );
    h.server.stop().await
}

/// Racing writers that all expect the same version: exactly one wins, the
/// others get ABORTED, and the history has no gap and no duplicate.
async fn concurrent_writers_of_one_version_conflict(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let (user, token) = sign_up(&mut h, "ada@example.com").await?;
    let racers = (0..8).map(|i| {
        let mut client = h.client.clone();
        let request = update_email(&user.id, &format!("ada{i}@example.com"), Some(1), &token);
        tokio::spawn(async move { client.update_email(request).await })
    });
    let mut wins = 0;
    for racer in racers {
        match racer.await? {
            Ok(_) => wins += 1,
            Err(status) => assert_eq!(status.code(), Code::Aborted, "{status:?}"),
        }
    }
    assert_eq!(wins, 1);
    let events = h
        .client
        .list_user_events(with_token(
            pb::ListUserEventsRequest { id: user.id },
            &token,
        ))
        .await?
        .into_inner()
        .events;
    let versions: Vec<i64> = events.iter().map(|e| e.version).collect();
    assert_eq!(versions, [1, 2]);
    h.server.stop().await
}

async fn state_is_the_replay_of_the_events(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let (user, token) = sign_up(&mut h, "ada@example.com").await?;
    let admin = h.env.admin_token()?;
    h.client
        .update_email(update_email(&user.id, "ada@lovelace.org", None, &token))
        .await?;
    h.client
        .activate_user(with_token(
            pb::ActivateUserRequest {
                id: user.id.clone(),
                expected_version: None,
            },
            &admin,
        ))
        .await?;

    let events = h
        .client
        .list_user_events(with_token(
            pb::ListUserEventsRequest {
                id: user.id.clone(),
            },
            &token,
        ))
        .await?
        .into_inner()
        .events;
    let kinds: Vec<_> = events
        .iter()
        .map(|e| match &e.event {
            Some(pb::user_event::Event::UserCreated(_)) => "created",
            Some(pb::user_event::Event::UserEmailUpdated(_)) => "email_updated",
            Some(pb::user_event::Event::UserActivated(_)) => "activated",
            None => "none",
        })
        .collect();
    assert_eq!(kinds, ["created", "email_updated", "activated"]);

    // Replaying the stored history yields exactly the stored current state.
    let db = Db::connect(&Secret::new(h.env.database_url().to_owned())).await?;
    let store = SqlUserStore::new(agora_platform_events::Outbox::new(db));
    let history = store.events(&user.id).await?;
    let replayed = UserState::replay(&history)?.expect("user exists");
    let projected = store.get(&user.id).await?.expect("user exists");
    assert_eq!(replayed, projected);
    assert_eq!(replayed.email, "ada@lovelace.org");
    assert_eq!(replayed.version, 3);
    h.server.stop().await
}

async fn access_rules_per_caller(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let (ada, ada_token) = sign_up(&mut h, "ada@example.com").await?;
    let (_grace, grace_token) = sign_up(&mut h, "grace@example.com").await?;
    let get = |token: &str| with_token(pb::GetUserRequest { id: ada.id.clone() }, token);

    // Anonymous: UNAUTHENTICATED. A forged token: UNAUTHENTICATED.
    let status = h
        .client
        .get_user(pb::GetUserRequest { id: ada.id.clone() })
        .await
        .expect_err("anonymous");
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = h
        .client
        .get_user(get("eyJhbGciOiJFZERTQSJ9.e30.AAAA"))
        .await
        .expect_err("forged");
    assert_eq!(status.code(), Code::Unauthenticated);
    // Another user: NOT_FOUND, indistinguishable from an unknown id.
    let status = h
        .client
        .get_user(get(&grace_token))
        .await
        .expect_err("other user");
    assert_eq!(status.code(), Code::NotFound);
    let status = h
        .client
        .list_user_events(with_token(
            pb::ListUserEventsRequest { id: ada.id.clone() },
            &grace_token,
        ))
        .await
        .expect_err("other user's history");
    assert_eq!(status.code(), Code::NotFound);
    let status = h
        .client
        .update_email(update_email(&ada.id, "x@example.com", None, &grace_token))
        .await
        .expect_err("other user's email");
    assert_eq!(status.code(), Code::NotFound);
    // Self, admin and services may read.
    h.client.get_user(get(&ada_token)).await?;
    h.client.get_user(get(&h.env.admin_token()?)).await?;
    h.client
        .get_user(get(&h.env.service_token("orders", "users")?))
        .await?;
    // Only the services the contract lists: others are refused before any
    // lookup (so the answer says nothing about the id).
    let status = h
        .client
        .get_user(get(&h.env.service_token("catalog", "users")?))
        .await
        .expect_err("catalog may not read users");
    assert_eq!(status.code(), Code::PermissionDenied);
    // A service may not read the audit trail.
    let status = h
        .client
        .list_user_events(with_token(
            pb::ListUserEventsRequest { id: ada.id.clone() },
            &h.env.service_token("orders", "users")?,
        ))
        .await
        .expect_err("service and history");
    assert_eq!(status.code(), Code::PermissionDenied);

    // Activation is for admins only.
    let activate = |token: &str| {
        with_token(
            pb::ActivateUserRequest {
                id: ada.id.clone(),
                expected_version: None,
            },
            token,
        )
    };
    let status = h
        .client
        .activate_user(activate(&ada_token))
        .await
        .expect_err("self-activation");
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = h
        .client
        .activate_user(pb::ActivateUserRequest {
            id: ada.id.clone(),
            expected_version: None,
        })
        .await
        .expect_err("anonymous");
    assert_eq!(status.code(), Code::Unauthenticated);
    let admin = h.env.admin_token()?;
    let active = h
        .client
        .activate_user(activate(&admin))
        .await?
        .into_inner()
        .user
        .expect("user");
    assert_eq!(active.status(), pb::UserStatus::Active);
    // Activating twice changes nothing (no second event).
    let again = h
        .client
        .activate_user(activate(&admin))
        .await?
        .into_inner()
        .user
        .expect("user");
    assert_eq!(again.version, active.version);
    // Unknown users are NOT_FOUND for admins as well.
    let status = h
        .client
        .activate_user(with_token(
            pb::ActivateUserRequest {
                id: uuid::Uuid::now_v7().to_string(),
                expected_version: None,
            },
            &admin,
        ))
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound);
    h.server.stop().await
}

backend_tests!(
    sign_up_log_in_and_read_yourself,
    invalid_input_names_every_bad_field,
    duplicate_email_is_already_exists,
    wrong_password_does_not_reveal_the_email,
    stale_version_is_aborted,
    concurrent_writers_of_one_version_conflict,
    state_is_the_replay_of_the_events,
    access_rules_per_caller,
);

mod bootstrap {
    use super::*;

    /// An email listed in `auth.admin_emails` signs up with the admin role
    /// while there is no admin yet, and its token can do admin-only things;
    /// once an admin exists, listed emails sign up as plain users.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn configured_admin_emails_sign_up_as_admins() -> anyhow::Result<()> {
        let mut env = TestEnv::new(Backend::Sqlite).await?;
        env.config.auth.admin_emails = vec!["Boss@Example.com".into(), "late@example.com".into()];
        let server = TestServer::start(vec![agora_users::hosted(&env.config).await?]).await?;
        let mut h = Harness {
            client: UserServiceClient::new(server.channel()?),
            env,
            server,
        };
        let (boss, boss_token) = sign_up(&mut h, "boss@example.com").await?;
        assert_eq!(boss.roles, ["admin"]);
        let (ada, _) = sign_up(&mut h, "ada@example.com").await?;
        assert!(ada.roles.is_empty());
        let request = pb::ActivateUserRequest {
            id: ada.id,
            expected_version: None,
        };
        h.client
            .activate_user(with_token(request, &boss_token))
            .await?;
        h.server.stop().await
    }
}
