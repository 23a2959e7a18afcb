//! The notifications service over real gRPC on loopback, against a fresh
//! database, sending through a real SMTP server (aiosmtpd) or into the
//! mail folder. Every test runs twice: on PostgreSQL and on SQLite.
//!
//! Messages are parsed with Python's `email` package (from the same `.venv/`
//! as aiosmtpd): an independent RFC 5322 / MIME parser, so "parseable" means
//! parseable by someone else's code, not by ours.

use agora_testkit::bad_fields;
use agora_testkit::with_token;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use agora_notifications::directory;
use agora_notifications::domain::NotificationStatus;
use agora_notifications::store::{NotificationStore, SqlNotificationStore};
use agora_notifications::{NotificationRequest, Notifier, TemplateData};
use agora_platform::config::Secret;
use agora_platform::db::Db;
use agora_platform::error::ErrorKind;
use agora_proto::common::v1::Money;
use agora_proto::notifications::v1 as pb;
use agora_proto::notifications::v1::notification_service_client::NotificationServiceClient;
use agora_testkit::{Backend, SmtpServer, TestEnv, TestServer, backend_tests};
use anyhow::{Context as _, bail};
use tokio::io::AsyncWriteExt as _;
use tonic::transport::Channel;
use tonic::{Code, Status};

struct Harness {
    env: TestEnv,
    server: TestServer,
    client: NotificationServiceClient<Channel>,
    notifier: Notifier,
}

/// Starts the service on `env` as configured (SMTP or file mode).
async fn start_with(env: TestEnv) -> anyhow::Result<Harness> {
    let (hosted, notifier) = agora_notifications::build(&env.config).await?;
    let server = TestServer::start(vec![hosted]).await?;
    let client = NotificationServiceClient::new(server.channel()?);
    Ok(Harness {
        env,
        server,
        client,
        notifier,
    })
}

/// The service in file mode (no `smtp_url`).
async fn start(backend: Backend) -> anyhow::Result<Harness> {
    start_with(TestEnv::new(backend).await?).await
}

/// The service sending through `smtp`.
async fn start_smtp(backend: Backend, smtp: &SmtpServer) -> anyhow::Result<Harness> {
    let mut env = TestEnv::new(backend).await?;
    env.config.smtp_url = Some(Secret::new(smtp.url()));
    start_with(env).await
}

fn event_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// A fresh user id, as the users service assigns them (and puts in tokens).
fn user_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn welcome(event_id: &str, user_id: &str, recipient: &str, name: &str) -> NotificationRequest {
    NotificationRequest {
        source_event_type: "agora.users.user_created".into(),
        source_event_id: event_id.into(),
        user_id: user_id.into(),
        recipient: recipient.into(),
        template: TemplateData::Welcome { name: name.into() },
    }
}

fn order_completed(
    event_id: &str,
    user_id: &str,
    recipient: &str,
    order_id: &str,
) -> NotificationRequest {
    NotificationRequest {
        source_event_type: "agora.orders.order_completed".into(),
        source_event_id: event_id.into(),
        user_id: user_id.into(),
        recipient: recipient.into(),
        template: TemplateData::OrderCompleted {
            order_id: order_id.into(),
            total: Money {
                currency_code: "EUR".into(),
                amount_minor: 1999,
            },
        },
    }
}

fn list_request(recipient: &str, page_size: i32, page_token: &str) -> pb::ListNotificationsRequest {
    pb::ListNotificationsRequest {
        recipient: recipient.into(),
        page_size,
        page_token: page_token.into(),
    }
}

/// Lists as the holder of `token`.
async fn list(
    h: &mut Harness,
    token: &str,
    recipient: &str,
) -> Result<Vec<pb::Notification>, Status> {
    Ok(h.client
        .list_notifications(with_token(list_request(recipient, 0, ""), token))
        .await?
        .into_inner()
        .notifications)
}

/// The parts of a message that the tests look at, as Python's parser sees them.
#[derive(Debug, serde::Deserialize)]
struct ParsedEmail {
    to: String,
    from: String,
    subject: String,
    message_id: String,
    content_type: String,
    text: Option<String>,
    html: Option<String>,
    defects: Vec<String>,
}

const PARSE_EMAIL_PY: &str = r#"
import email, json, sys
from email import policy
msg = email.message_from_bytes(sys.stdin.buffer.read(), policy=policy.default)
def body(kind):
    part = msg.get_body(preferencelist=(kind,))
    return None if part is None else part.get_content()
print(json.dumps({
    "to": str(msg["To"]),
    "from": str(msg["From"]),
    "subject": str(msg["Subject"]),
    "message_id": str(msg["Message-ID"]),
    "content_type": msg.get_content_type(),
    "text": body("plain"),
    "html": body("html"),
    "defects": [repr(d) for part in msg.walk() for d in part.defects],
}))
"#;

async fn parse_email(raw: &[u8]) -> anyhow::Result<ParsedEmail> {
    let python = agora_testkit::workspace_root().join(".venv/bin/python");
    let mut child = tokio::process::Command::new(&python)
        .args(["-c", PARSE_EMAIL_PY])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", python.display()))?;
    let mut stdin = child.stdin.take().context("python stdin")?;
    stdin.write_all(raw).await?;
    drop(stdin);
    let output = child.wait_with_output().await?;
    if !output.status.success() {
        bail!(
            "python could not parse the message: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// Polls the SMTP server's Maildir until `count` messages arrived (bounded).
async fn wait_for_messages(smtp: &SmtpServer, count: usize) -> anyhow::Result<Vec<String>> {
    for _ in 0..200 {
        let messages = smtp.messages()?;
        if messages.len() >= count {
            return Ok(messages);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "expected {count} messages, got {} after 10 s",
        smtp.messages()?.len()
    )
}

/// The `.eml` files in the mail folder (temp files are dot-files and excluded).
fn mail_files(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    if dir.exists() {
        for entry in std::fs::read_dir(dir)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

async fn smtp_delivers_both_parts_to_the_recipient(backend: Backend) -> anyhow::Result<()> {
    let smtp = SmtpServer::start().await?;
    let mut h = start_smtp(backend, &smtp).await?;
    let event = event_id();
    let ada_id = user_id();
    let sent = h
        .notifier
        .notify(&welcome(
            &event,
            &ada_id,
            " Ada@Example.com ",
            "Ada <script>x</script>",
        ))
        .await?;
    assert_eq!(sent.status, NotificationStatus::Sent, "{sent:?}");
    assert_eq!(sent.recipient, "ada@example.com");
    assert_eq!(sent.user_id, ada_id);
    assert_eq!(sent.source_event_id, event);
    assert!(sent.failure_reason.is_empty());

    let messages = wait_for_messages(&smtp, 1).await?;
    assert_eq!(messages.len(), 1);
    let email = parse_email(messages[0].as_bytes()).await?;
    assert!(email.defects.is_empty(), "{:?}", email.defects);
    assert_eq!(email.to, "ada@example.com");
    assert_eq!(email.from, h.env.config.mail_from);
    assert_eq!(email.subject, "Welcome to Agora, Ada <script>x</script>");
    assert_eq!(email.subject, sent.subject);
    assert!(email.message_id.contains(&sent.id), "{email:?}");
    assert_eq!(email.content_type, "multipart/alternative");
    let text = email.text.context("text/plain part")?;
    let html = email.html.context("text/html part")?;
    assert!(text.contains("Ada <script>x</script>") && text.contains("ada@example.com"));
    assert_eq!(
        text.replace("\r\n", "\n").trim_end(),
        sent.body_text.trim_end()
    );
    assert!(!html.contains("<script>"), "{html}");
    assert!(
        html.contains("Ada &lt;script&gt;x&lt;/script&gt;"),
        "{html}"
    );

    // The user finds it in their list, as sent.
    let token = h.env.user_token(&ada_id, "ada@example.com", &[])?;
    let listed = list(&mut h, &token, "").await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, sent.id);
    assert_eq!(listed[0].status(), pb::NotificationStatus::Sent);
    assert_eq!(listed[0].source_event_type, "agora.users.user_created");
    assert_eq!(listed[0].body_text, sent.body_text);
    h.server.stop().await
}

async fn file_mode_writes_a_parseable_eml_in_the_mail_folder(
    backend: Backend,
) -> anyhow::Result<()> {
    let h = start(backend).await?;
    let sent = h
        .notifier
        .notify(&order_completed(
            &event_id(),
            &user_id(),
            "grace@example.com",
            "o-42",
        ))
        .await?;
    assert_eq!(sent.status, NotificationStatus::Sent, "{sent:?}");

    let mail = h.env.config.data_dir.join("mail");
    // Exactly the finished file: no temp file left behind.
    assert_eq!(mail_files(&mail)?, [format!("{}.eml", sent.id)]);
    let raw = std::fs::read(mail.join(format!("{}.eml", sent.id)))?;
    let email = parse_email(&raw).await?;
    assert!(email.defects.is_empty(), "{:?}", email.defects);
    assert_eq!(email.to, "grace@example.com");
    assert_eq!(email.subject, "Your Agora order o-42 is confirmed");
    assert_eq!(email.content_type, "multipart/alternative");
    assert!(email.text.context("text part")?.contains("EUR 19.99"));
    assert!(email.html.context("html part")?.contains("EUR 19.99"));

    // A cancellation lands next to it.
    let cancelled = h
        .notifier
        .notify(&NotificationRequest {
            source_event_type: "agora.orders.order_cancelled".into(),
            source_event_id: event_id(),
            user_id: sent.user_id.clone(),
            recipient: "grace@example.com".into(),
            template: TemplateData::OrderCancelled {
                order_id: "o-43".into(),
                reason: "payment declined".into(),
            },
        })
        .await?;
    assert_eq!(mail_files(&mail)?.len(), 2);
    let raw = std::fs::read(mail.join(format!("{}.eml", cancelled.id)))?;
    let email = parse_email(&raw).await?;
    assert!(email.subject.contains("o-43") && email.subject.contains("cancelled"));
    assert!(
        email
            .text
            .context("text part")?
            .contains("payment declined")
    );
    h.server.stop().await
}

async fn the_same_event_twice_sends_one_email_and_keeps_one_row(
    backend: Backend,
) -> anyhow::Result<()> {
    let smtp = SmtpServer::start().await?;
    let mut h = start_smtp(backend, &smtp).await?;
    let event = event_id();
    let ada_id = user_id();
    let first = h
        .notifier
        .notify(&welcome(&event, &ada_id, "ada@example.com", "Ada"))
        .await?;
    // Redelivery, even with different data, is a no-op returning the stored row.
    let second = h
        .notifier
        .notify(&welcome(&event, &ada_id, "ada@example.com", "Someone Else"))
        .await?;
    assert_eq!(second, first);
    assert_eq!(second.status, NotificationStatus::Sent);
    assert_eq!(second.attempts, 1);

    // A different event is a different email: once it has arrived, everything
    // sent before it has too, so the count below is final.
    h.notifier
        .notify(&welcome(&event_id(), &ada_id, "ada@example.com", "Ada"))
        .await?;
    let messages = wait_for_messages(&smtp, 2).await?;
    assert_eq!(messages.len(), 2);
    let mut ids = Vec::new();
    for raw in &messages {
        ids.push(parse_email(raw.as_bytes()).await?.message_id);
    }
    let for_first = ids.iter().filter(|id| id.contains(&first.id)).count();
    assert_eq!(for_first, 1, "{ids:?}");

    let admin = h.env.admin_token()?;
    let listed = list(&mut h, &admin, "ada@example.com").await?;
    assert_eq!(listed.len(), 2);
    assert_eq!(
        listed.iter().filter(|n| n.source_event_id == event).count(),
        1
    );
    h.server.stop().await
}

/// Concurrent deliveries of one event: one sender wins the claim, the others
/// see it sent or in progress; one email, one row.
async fn racing_deliveries_of_one_event_send_one_email(backend: Backend) -> anyhow::Result<()> {
    let smtp = SmtpServer::start().await?;
    let h = start_smtp(backend, &smtp).await?;
    let event = event_id();
    let ada_id = user_id();
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let notifier = h.notifier.clone();
            let request = welcome(&event, &ada_id, "ada@example.com", "Ada");
            tokio::spawn(async move { notifier.notify(&request).await })
        })
        .collect();
    let mut ids = Vec::new();
    for racer in racers {
        match racer.await? {
            Ok(notification) => {
                assert_eq!(notification.status, NotificationStatus::Sent);
                ids.push(notification.id);
            }
            Err(err) => assert_eq!(err.kind(), ErrorKind::Conflict, "{err:?}"),
        }
    }
    assert!(!ids.is_empty());
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");

    // A later event's email arriving bounds the wait for any duplicate.
    h.notifier
        .notify(&welcome(
            &event_id(),
            &user_id(),
            "grace@example.com",
            "Grace",
        ))
        .await?;
    let messages = wait_for_messages(&smtp, 2).await?;
    assert_eq!(messages.len(), 2);
    let db = Db::connect(&Secret::new(h.env.database_url().to_owned())).await?;
    let stored = SqlNotificationStore::new(db).get_by_event(&event).await?;
    let stored = stored.context("row for the event")?;
    assert_eq!((stored.id.as_str(), stored.attempts), (ids[0].as_str(), 1));
    h.server.stop().await
}

async fn unreachable_smtp_is_stored_as_failed_and_retried_on_redelivery(
    backend: Backend,
) -> anyhow::Result<()> {
    let mut env = TestEnv::new(backend).await?;
    // A port nobody listens on.
    let dead = agora_testkit::free_port()?;
    env.config.smtp_url = Some(Secret::new(format!("smtp://127.0.0.1:{dead}")));
    let mut h = start_with(env).await?;
    let event = event_id();
    let ada_id = user_id();
    let failed = h
        .notifier
        .notify(&welcome(&event, &ada_id, "ada@example.com", "Ada"))
        .await?;
    assert_eq!(failed.status, NotificationStatus::Failed, "{failed:?}");
    assert!(failed.failure_reason.starts_with("smtp:"), "{failed:?}");

    let admin = h.env.admin_token()?;
    let listed = list(&mut h, &admin, "ada@example.com").await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].status(), pb::NotificationStatus::Failed);
    assert_eq!(listed[0].failure_reason, failed.failure_reason);

    // The server comes back (a notifier configured with a live one, on the
    // same database) and the event is delivered again: now it is sent, as
    // the same notification.
    let smtp = SmtpServer::start().await?;
    let mut config = h.env.config.clone();
    config.smtp_url = Some(Secret::new(smtp.url()));
    let (_, recovered) = agora_notifications::build(&config).await?;
    let sent = recovered
        .notify(&welcome(&event, &ada_id, "ada@example.com", "Ada"))
        .await?;
    assert_eq!(sent.status, NotificationStatus::Sent, "{sent:?}");
    assert_eq!((sent.id.as_str(), sent.attempts), (failed.id.as_str(), 2));
    assert!(sent.failure_reason.is_empty());
    let messages = wait_for_messages(&smtp, 1).await?;
    let email = parse_email(messages[0].as_bytes()).await?;
    assert!(email.message_id.contains(&failed.id), "{email:?}");
    assert_eq!(list(&mut h, &admin, "ada@example.com").await?.len(), 1);
    h.server.stop().await
}

async fn an_unwritable_mail_folder_is_stored_as_failed(backend: Backend) -> anyhow::Result<()> {
    let h = start(backend).await?;
    // A file where the mail folder should be.
    std::fs::write(h.env.config.data_dir.join("mail"), b"in the way")?;
    let failed = h
        .notifier
        .notify(&welcome(&event_id(), &user_id(), "ada@example.com", "Ada"))
        .await?;
    assert_eq!(failed.status, NotificationStatus::Failed, "{failed:?}");
    assert!(
        failed.failure_reason.starts_with("mail folder:"),
        "{failed:?}"
    );
    h.server.stop().await
}

/// A sender that died mid-send leaves its claim behind: while it is fresh,
/// redelivery is ABORTED (to be retried later) rather than sending twice;
/// once it has expired, the next sender takes over, and the dead one's late
/// outcome is not recorded over the new attempt.
async fn abandoned_claims_expire_and_stale_senders_cannot_record(
    backend: Backend,
) -> anyhow::Result<()> {
    use agora_notifications::store::{Claim, NewNotification};

    let h = start(backend).await?;
    let db = Db::connect(&Secret::new(h.env.database_url().to_owned())).await?;
    let store = SqlNotificationStore::new(db);
    let event = event_id();
    let ada_id = user_id();
    let new = NewNotification {
        id: uuid::Uuid::now_v7().to_string(),
        user_id: ada_id.clone(),
        recipient: "ada@example.com".into(),
        subject: "Welcome to Agora, Ada".into(),
        body_text: "Hello Ada".into(),
        source_event_type: "agora.users.user_created".into(),
        source_event_id: event.clone(),
    };
    let Claim::Claimed(dead) = store.claim(&new, 0).await? else {
        bail!("a new event must be claimed");
    };
    assert_eq!(
        (dead.status, dead.attempts),
        (NotificationStatus::Sending, 1)
    );

    // Fresh claim: another sender keeps off, and so does the notifier.
    assert!(matches!(store.claim(&new, 0).await?, Claim::InProgress(_)));
    let err = h
        .notifier
        .notify(&welcome(&event, &ada_id, "ada@example.com", "Ada"))
        .await
        .expect_err("claimed by another sender");
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert_eq!(Status::from(err).code(), Code::Aborted);

    // Expired claim (stale_before in the future): taken over, same row.
    let Claim::Claimed(taken) = store.claim(&new, i64::MAX).await? else {
        bail!("an expired claim must be taken over");
    };
    assert_eq!((taken.id.as_str(), taken.attempts), (dead.id.as_str(), 2));
    // The dead sender wakes up: its outcome does not overwrite attempt 2.
    let after_late = store
        .record_outcome(&dead.id, 1, Err("late failure".into()))
        .await?;
    assert_eq!(after_late.status, NotificationStatus::Sending);
    assert!(after_late.failure_reason.is_empty());
    let done = store.record_outcome(&taken.id, 2, Ok(())).await?;
    assert_eq!(done.status, NotificationStatus::Sent);
    assert!(matches!(
        store.claim(&new, i64::MAX).await?,
        Claim::AlreadySent(_)
    ));
    // Sent now: the notifier returns it without sending (nothing in the mail folder).
    let again = h
        .notifier
        .notify(&welcome(&event, &ada_id, "ada@example.com", "Ada"))
        .await?;
    assert_eq!(again, done);
    assert!(mail_files(&h.env.config.data_dir.join("mail"))?.is_empty());
    h.server.stop().await
}

async fn invalid_notify_requests_name_every_bad_field(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let err = h
        .notifier
        .notify(&NotificationRequest {
            source_event_type: " ".into(),
            source_event_id: "has spaces".into(),
            user_id: "u-1".into(),
            recipient: "not-an-email".into(),
            template: TemplateData::OrderCompleted {
                order_id: "o\n1".into(),
                total: Money {
                    currency_code: "euro".into(),
                    amount_minor: -1,
                },
            },
        })
        .await
        .expect_err("every field is bad");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let status = Status::from(err);
    assert_eq!(
        bad_fields(&status),
        [
            "recipient",
            "source_event_id",
            "source_event_type",
            "template.order_id",
            "template.total.amount_minor",
            "template.total.currency_code",
            "user_id",
        ]
    );

    // Oversized and hostile values are rejected, never a panic.
    let huge = "x".repeat(1_000_000);
    let err = h
        .notifier
        .notify(&NotificationRequest {
            source_event_type: huge.clone(),
            source_event_id: huge.clone(),
            user_id: huge.clone(),
            recipient: format!("{huge}@example.com"),
            template: TemplateData::OrderCancelled {
                order_id: huge.clone(),
                reason: format!("{huge}\u{0}"),
            },
        })
        .await
        .expect_err("oversized");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert_eq!(bad_fields(&Status::from(err)).len(), 6);
    let err = h
        .notifier
        .notify(&welcome(
            &event_id(),
            &user_id(),
            "ada@example.com",
            "Ada\r\nBcc: eve@example.com",
        ))
        .await
        .expect_err("header injection");
    assert_eq!(bad_fields(&Status::from(err)), ["template.name"]);
    // A missing total (as an event without one would give) names the field.
    let err = h
        .notifier
        .notify(&NotificationRequest::order_completed(
            "agora.orders.order_completed",
            event_id(),
            &agora_proto::orders::v1::OrderCompleted {
                order_id: "o-1".into(),
                user_id: user_id(),
                total: None,
                version: 2,
                ..Default::default()
            },
            "ada@example.com",
        ))
        .await
        .expect_err("no total");
    assert_eq!(
        bad_fields(&Status::from(err)),
        ["template.total.currency_code"]
    );
    // Every notification has an owner: an event without a user id (or with
    // the nil UUID) is rejected, however valid the address.
    for missing in ["", "00000000-0000-0000-0000-000000000000"] {
        let err = h
            .notifier
            .notify(&NotificationRequest::user_created(
                "agora.users.user_created",
                event_id(),
                &agora_proto::users::v1::UserCreated {
                    user_id: missing.into(),
                    email: "ada@example.com".into(),
                    name: "Ada".into(),
                    roles: vec![],
                    version: 1,
                },
                "ada@example.com",
            ))
            .await
            .expect_err("no owner");
        assert_eq!(bad_fields(&Status::from(err)), ["user_id"], "{missing:?}");
    }

    // Nothing was stored or written.
    let mail = h.env.config.data_dir.join("mail");
    assert!(mail_files(&mail)?.is_empty());
    let admin = h.env.admin_token()?;
    assert!(list(&mut h, &admin, "ada@example.com").await?.is_empty());
    h.server.stop().await
}

async fn listing_access_per_caller(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let ada_event = event_id();
    let ada_id = user_id();
    h.notifier
        .notify(&NotificationRequest::user_created(
            "agora.users.user_created",
            ada_event.clone(),
            &agora_proto::users::v1::UserCreated {
                user_id: ada_id.clone(),
                email: "ada@example.com".into(),
                name: "Ada".into(),
                roles: vec![],
                version: 1,
            },
            "ada@example.com",
        ))
        .await?;
    h.notifier
        .notify(&welcome(
            &event_id(),
            &user_id(),
            "grace@example.com",
            "Grace",
        ))
        .await?;
    let ada = h.env.user_token(&ada_id, "Ada@Example.com", &[])?;

    // Anonymous and forged tokens: UNAUTHENTICATED.
    let status = h
        .client
        .list_notifications(list_request("", 0, ""))
        .await
        .expect_err("anonymous");
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = list(&mut h, "eyJhbGciOiJFZERTQSJ9.e30.AAAA", "")
        .await
        .expect_err("forged");
    assert_eq!(status.code(), Code::Unauthenticated);

    // A user: their own, by default or named (in any letter case).
    let own = list(&mut h, &ada, "").await?;
    assert_eq!(own.len(), 1);
    assert_eq!(own[0].source_event_id, ada_event);
    assert_eq!(own[0].recipient, "ada@example.com");
    assert_eq!(list(&mut h, &ada, "ADA@example.com").await?, own);
    // ... but not someone else's: naming their address only narrows Ada's
    // own list, here to nothing.
    assert!(list(&mut h, &ada, "grace@example.com").await?.is_empty());
    // Ownership is the token's user id: a token whose email claim is no
    // usable address still lists its user's own.
    let no_email = h.env.user_token(&ada_id, "", &[])?;
    assert_eq!(list(&mut h, &no_email, "").await?, own);
    // ... and a stranger's token naming Ada's address gets nothing.
    let stranger = h.env.user_token(&user_id(), "grace@example.com", &[])?;
    assert!(list(&mut h, &stranger, "").await?.is_empty());
    assert!(list(&mut h, &stranger, "ada@example.com").await?.is_empty());

    // An admin: anyone's, but must say whose.
    let admin = h.env.admin_token()?;
    let graces = list(&mut h, &admin, "grace@example.com").await?;
    assert_eq!(graces.len(), 1);
    assert_eq!(graces[0].recipient, "grace@example.com");
    assert!(list(&mut h, &admin, "nobody@example.com").await?.is_empty());
    let status = list(&mut h, &admin, "").await.expect_err("no recipient");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&status), ["recipient"]);

    // Services have no business here.
    let service = h.env.service_token("orders", "notifications")?;
    let status = list(&mut h, &service, "ada@example.com")
        .await
        .expect_err("service");
    assert_eq!(status.code(), Code::PermissionDenied);
    h.server.stop().await
}

/// Notifications belong to user ids, not to addresses. Addresses are not
/// verified and a user may change theirs, which frees the old one: whoever
/// signs up with it next must not see the previous owner's notifications
/// (they once did, as ListNotifications went by the token's email), and the
/// previous owner keeps seeing theirs under the new address.
async fn a_reused_email_address_shows_nothing_of_its_previous_owner(
    backend: Backend,
) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let (ada_id, eve_id) = (user_id(), user_id());
    let welcome_to = |user_id: &str, name: &str| {
        NotificationRequest::user_created(
            "agora.users.user_created",
            event_id(),
            &agora_proto::users::v1::UserCreated {
                user_id: user_id.into(),
                email: "ada@example.com".into(),
                name: name.into(),
                roles: vec![],
                version: 1,
            },
            "ada@example.com",
        )
    };
    // Ada signs up as ada@example.com and orders.
    let ada_welcome = h.notifier.notify(&welcome_to(&ada_id, "Ada")).await?;
    let ada_order = h
        .notifier
        .notify(&NotificationRequest::order_completed(
            "agora.orders.order_completed",
            event_id(),
            &agora_proto::orders::v1::OrderCompleted {
                order_id: uuid::Uuid::now_v7().to_string(),
                user_id: ada_id.clone(),
                total: Some(Money {
                    currency_code: "EUR".into(),
                    amount_minor: 1999,
                }),
                version: 2,
                ..Default::default()
            },
            "ada@example.com",
        ))
        .await?;
    assert_eq!(ada_welcome.user_id, ada_id);
    assert_eq!(ada_order.user_id, ada_id);
    let adas = [ada_order.id.clone(), ada_welcome.id.clone()];
    // Ada changes her email to ada2@example.com; Eve signs up with the freed
    // address and is welcomed there.
    let eve_welcome = h.notifier.notify(&welcome_to(&eve_id, "Eve")).await?;
    let ids = |listed: Vec<pb::Notification>| -> Vec<String> {
        listed.into_iter().map(|n| n.id).collect()
    };

    // Eve's token says ada@example.com: she sees her own welcome, nothing of
    // Ada's, whether or not she names the address.
    let eve = h.env.user_token(&eve_id, "ada@example.com", &[])?;
    let eves = vec![eve_welcome.id.clone()];
    assert_eq!(ids(list(&mut h, &eve, "").await?), eves);
    assert_eq!(ids(list(&mut h, &eve, "ada@example.com").await?), eves);

    // Ada, with a token carrying her new address, still sees hers (newest
    // first); naming the old address narrows to what was sent there (hers
    // only, not Eve's), naming the new one finds nothing yet.
    let ada = h.env.user_token(&ada_id, "ada2@example.com", &[])?;
    assert_eq!(ids(list(&mut h, &ada, "").await?), adas);
    assert_eq!(ids(list(&mut h, &ada, "ada@example.com").await?), adas);
    assert!(list(&mut h, &ada, "ada2@example.com").await?.is_empty());
    // Ada's old token, still valid, names the old address: still only hers.
    let ada_old = h.env.user_token(&ada_id, "ada@example.com", &[])?;
    assert_eq!(ids(list(&mut h, &ada_old, "").await?), adas);

    // Admins still list by address: everything sent to it, whoever's it is.
    let admin = h.env.admin_token()?;
    assert_eq!(
        ids(list(&mut h, &admin, "ada@example.com").await?),
        [eve_welcome.id.clone(), adas[0].clone(), adas[1].clone()]
    );
    h.server.stop().await
}

async fn listing_pages_newest_first_without_gaps(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let ada_id = user_id();
    let mut created = Vec::new();
    for i in 0..7 {
        let n = h
            .notifier
            .notify(&order_completed(
                &event_id(),
                &ada_id,
                "ada@example.com",
                &format!("o-{i}"),
            ))
            .await?;
        created.push(n.id);
    }
    // Someone else's never show up in Ada's pages, even when sent to the
    // same address.
    h.notifier
        .notify(&welcome(
            &event_id(),
            &user_id(),
            "grace@example.com",
            "Grace",
        ))
        .await?;
    h.notifier
        .notify(&welcome(&event_id(), &user_id(), "ada@example.com", "Eve"))
        .await?;
    let ada = h.env.user_token(&ada_id, "ada@example.com", &[])?;

    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut token = String::new();
    loop {
        let page = h
            .client
            .list_notifications(with_token(list_request("", 3, &token), &ada))
            .await?
            .into_inner();
        sizes.push(page.notifications.len());
        seen.extend(page.notifications.into_iter().map(|n| n.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        // A notification arriving while paging does not shift later pages.
        if sizes.len() == 1 {
            h.notifier
                .notify(&welcome(&event_id(), &ada_id, "ada@example.com", "Ada"))
                .await?;
        }
    }
    assert_eq!(sizes, [3, 3, 1]);
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);

    // page_size 0 means the default, which holds them all.
    let all = h
        .client
        .list_notifications(with_token(list_request("", 0, ""), &ada))
        .await?
        .into_inner();
    assert_eq!(all.notifications.len(), 8);
    assert!(all.next_page_token.is_empty());
    let times: Vec<_> = all
        .notifications
        .iter()
        .map(|n| n.created_at.map(|t| (t.seconds, t.nanos)))
        .collect();
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(times, sorted);
    h.server.stop().await
}

async fn invalid_list_requests_name_every_bad_field(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let ada = h.env.user_token(&user_id(), "ada@example.com", &[])?;
    let status = h
        .client
        .list_notifications(with_token(
            list_request("not-an-email", -1, "not*a*token"),
            &ada,
        ))
        .await
        .expect_err("three bad fields");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        bad_fields(&status),
        ["page_size", "page_token", "recipient"]
    );

    // Oversized and hostile input: INVALID_ARGUMENT, never a panic (under
    // `server.max_request_bytes`, 256 KiB, beyond which the message is
    // refused whole as too large).
    let admin = h.env.admin_token()?;
    let huge = "x".repeat(100_000);
    let status = h
        .client
        .list_notifications(with_token(
            list_request(&format!("{huge}@example.com"), i32::MAX, &huge),
            &admin,
        ))
        .await
        .expect_err("oversized");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&status), ["page_token", "recipient"]);
    let status = list(
        &mut h,
        &admin,
        "x'; DROP TABLE notifications; --@example.com",
    )
    .await
    .expect_err("sql in the address");
    assert_eq!(bad_fields(&status), ["recipient"]);
    // The table is still there: the service still answers.
    assert!(list(&mut h, &admin, "ada@example.com").await?.is_empty());
    h.server.stop().await
}

/// `hosted()` serves the API alone, healthy while its database answers.
async fn hosted_service_reports_serving(backend: Backend) -> anyhow::Result<()> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let env = TestEnv::new(backend).await?;
    let server = TestServer::start(vec![agora_notifications::hosted(&env.config).await?]).await?;
    let mut health = HealthClient::new(server.channel()?);
    let mut status = ServingStatus::Unknown;
    for _ in 0..100 {
        status = health
            .check(HealthCheckRequest {
                service: pb::SERVICE_NAME.into(),
            })
            .await?
            .into_inner()
            .status();
        if status == ServingStatus::Serving {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, ServingStatus::Serving);
    let mut client = NotificationServiceClient::new(server.channel()?);
    let token = env.user_token(&user_id(), "ada@example.com", &[])?;
    let listed = client
        .list_notifications(with_token(list_request("", 0, ""), &token))
        .await?
        .into_inner();
    assert!(listed.notifications.is_empty() && listed.next_page_token.is_empty());
    server.stop().await
}

/// Events of one user applied out of order (a retried `UserCreated` after
/// the `UserEmailUpdated` that followed it) leave the newest address, and
/// the name once it is known.
async fn the_directory_keeps_the_newest_address_whatever_the_order(
    backend: Backend,
) -> anyhow::Result<()> {
    let h = start(backend).await?;
    let db = agora_platform::db::Db::connect(&Secret::new(h.env.database_url().to_owned())).await?;
    let mut conn = db.pool().acquire().await?;
    let user = user_id();
    directory::record(&mut conn, &user, "second@example.com", None, 2).await?;
    directory::record(&mut conn, &user, "first@example.com", Some("Ada"), 1).await?;
    let found = directory::find(&mut conn, &user).await?.expect("recorded");
    assert_eq!(
        (found.email.as_str(), found.name.as_deref(), found.version),
        ("second@example.com", Some("Ada"), 2)
    );
    directory::record(&mut conn, &user, "third@example.com", None, 3).await?;
    let found = directory::find(&mut conn, &user).await?.expect("recorded");
    assert_eq!(
        (found.email.as_str(), found.name.as_deref(), found.version),
        ("third@example.com", Some("Ada"), 3)
    );
    drop(conn);
    h.server.stop().await
}

backend_tests!(
    the_directory_keeps_the_newest_address_whatever_the_order,
    smtp_delivers_both_parts_to_the_recipient,
    file_mode_writes_a_parseable_eml_in_the_mail_folder,
    the_same_event_twice_sends_one_email_and_keeps_one_row,
    racing_deliveries_of_one_event_send_one_email,
    unreachable_smtp_is_stored_as_failed_and_retried_on_redelivery,
    an_unwritable_mail_folder_is_stored_as_failed,
    abandoned_claims_expire_and_stale_senders_cannot_record,
    invalid_notify_requests_name_every_bad_field,
    listing_access_per_caller,
    a_reused_email_address_shows_nothing_of_its_previous_owner,
    listing_pages_newest_first_without_gaps,
    invalid_list_requests_name_every_bad_field,
    hosted_service_reports_serving,
);
