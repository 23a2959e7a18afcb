//! Domain events end to end through the real binary and a private
//! nats-server: a sign-up becomes a welcome email, in one trace, and the
//! services keep answering while NATS is down.

mod common;

use std::path::Path;
use std::time::Duration;

use agora_proto::notifications::v1 as notifications;
use agora_proto::notifications::v1::notification_service_client::NotificationServiceClient;
use agora_proto::users::v1 as users;
use agora_proto::users::v1::user_service_client::UserServiceClient;
use agora_testkit::{NatsServer, OtlpCollector, ReceivedSpan, with_token};
use tokio::io::AsyncBufReadExt as _;

use common::AgoraProcess;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const TRACE_ID: &str = "5af92f3577b34da6a3ce929d0e0e4737";
const PARENT_SPAN_ID: &str = "10f067aa0ba902b8";

fn sign_up(email: &str) -> users::CreateUserRequest {
    users::CreateUserRequest {
        email: email.into(),
        name: "Ada Lovelace".into(),
        password: "correct horse battery".into(),
    }
}

/// The `.eml` files written so far.
fn emails(data: &Path) -> anyhow::Result<Vec<String>> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(data.join("mail")) {
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "eml") {
                found.push(std::fs::read_to_string(path)?);
            }
        }
    }
    Ok(found)
}

async fn wait_for_emails(data: &Path, count: usize) -> anyhow::Result<Vec<String>> {
    for _ in 0..300 {
        let found = emails(data)?;
        if found.len() >= count {
            return Ok(found);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("expected {count} emails, have {}", emails(data)?.len())
}

async fn wait_for_health(
    agora: &AgoraProcess,
    service: &str,
    want: ServingStatus,
) -> anyhow::Result<()> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", agora.addr("users")))?
            .connect()
            .await?;
    let mut health = HealthClient::new(channel);
    for _ in 0..100 {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner()
            .status();
        if status == want {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("{service} never became {want:?}")
}

fn find<'a>(spans: &'a [ReceivedSpan], name: &str) -> anyhow::Result<&'a ReceivedSpan> {
    spans
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| anyhow::anyhow!("no span {name:?} among {spans:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_up_is_one_trace_from_the_rpc_through_the_relay_to_the_welcome_email()
-> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let collector = OtlpCollector::start().await?;
    let env = [
        ("AGORA_NATS_URL", nats.url().to_owned()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint()),
    ];
    let agora = tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        AgoraProcess::start(&["users", "notifications"], &env)
    })
    .await??;
    let mut users = UserServiceClient::connect(format!("http://{}", agora.addr("users"))).await?;
    let mut request = tonic::Request::new(sign_up("ada@example.com"));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01").parse()?,
    );
    let user = users
        .create_user(request)
        .await?
        .into_inner()
        .user
        .ok_or_else(|| anyhow::anyhow!("no user"))?;

    // The welcome email, once, as a file and in ListNotifications.
    let mail = wait_for_emails(&agora.data, 1).await?;
    assert!(mail[0].contains("To: ada@example.com"), "{}", mail[0]);
    assert!(
        mail[0].contains("Welcome to Agora, Ada Lovelace"),
        "{}",
        mail[0]
    );
    let token = users
        .authenticate(users::AuthenticateRequest {
            email: "ada@example.com".into(),
            password: "correct horse battery".into(),
        })
        .await?
        .into_inner()
        .access_token;
    let mut notifications =
        NotificationServiceClient::connect(format!("http://{}", agora.addr("notifications")))
            .await?;
    let listed = notifications
        .list_notifications(with_token(
            notifications::ListNotificationsRequest::default(),
            &token,
        ))
        .await?
        .into_inner()
        .notifications;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0].subject.contains("Welcome"), "{listed:?}");
    assert!(!user.id.is_empty());
    assert_eq!(listed[0].recipient, "ada@example.com");

    // Spans are batched; SIGTERM flushes them on the way out.
    let exit = tokio::task::spawn_blocking(move || agora.terminate()).await??;
    assert!(exit.success(), "{exit}");
    let mut spans = Vec::new();
    for _ in 0..50 {
        spans = collector.spans();
        if spans
            .iter()
            .any(|s| s.name == "agora.users.user_created process")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rpc = find(&spans, "agora.users.v1.UserService/CreateUser")?;
    let publish = find(&spans, "agora.users.user_created publish")?;
    let process = find(&spans, "agora.users.user_created process")?;
    // One trace: caller -> CreateUser -> publish (relay) -> process (consumer).
    assert_eq!(rpc.trace_id, TRACE_ID);
    assert_eq!(rpc.parent_span_id, PARENT_SPAN_ID);
    assert_eq!(publish.trace_id, TRACE_ID);
    assert_eq!(publish.parent_span_id, rpc.span_id);
    assert_eq!(process.trace_id, TRACE_ID);
    assert_eq!(process.parent_span_id, publish.span_id);
    assert_eq!(
        process
            .attributes
            .get("messaging.system")
            .map(String::as_str),
        Some("nats")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_answer_while_nats_is_down_and_publish_when_it_is_back() -> anyhow::Result<()> {
    let mut nats = NatsServer::start().await?;
    let url = nats.url().to_owned();
    let agora = tokio::task::spawn_blocking(move || {
        AgoraProcess::start(&["users", "notifications"], &[("AGORA_NATS_URL", &url)])
    })
    .await??;
    let mut users = UserServiceClient::connect(format!("http://{}", agora.addr("users"))).await?;
    users.create_user(sign_up("first@example.com")).await?;
    wait_for_emails(&agora.data, 1).await?;

    nats.kill().await?;
    // Still serving: the sign-ups commit, their events wait in the outbox,
    // and health says what is degraded without failing the service.
    for i in 0..3 {
        users
            .create_user(sign_up(&format!("offline-{i}@example.com")))
            .await?;
    }
    let (serving, table) = agora.health(5)?;
    assert!(serving, "{table}");
    wait_for_health(
        &agora,
        "agora.users.v1.UserService/nats",
        ServingStatus::NotServing,
    )
    .await?;
    assert_eq!(emails(&agora.data)?.len(), 1);

    nats.restart().await?;
    wait_for_health(
        &agora,
        "agora.users.v1.UserService/nats",
        ServingStatus::Serving,
    )
    .await?;
    let mail = wait_for_emails(&agora.data, 4).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        emails(&agora.data)?.len(),
        4,
        "one email per sign-up: {mail:#?}"
    );
    Ok(())
}

fn agora_events(nats: &NatsServer, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(std::process::Command::new(common::AGORA)
        .arg("events")
        .args(args)
        .env("NATS_URL", nats.url())
        .output()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_tails_events_and_lists_and_replays_dead_letters() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let url = nats.url().to_owned();
    let agora = tokio::task::spawn_blocking(move || {
        AgoraProcess::start(
            &["users", "notifications"],
            &[
                ("AGORA_NATS_URL", &url),
                ("AGORA_EVENTS__DEAD_LETTER_AFTER", "2"),
            ],
        )
    })
    .await??;

    // tail: the next event, decoded. It says on stderr when it listens.
    let mut tail = tokio::process::Command::new(common::AGORA)
        .args(["events", "tail", "agora.users.>", "--count", "1"])
        .env("NATS_URL", nats.url())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stderr = tail
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let listening = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if line.starts_with("listening on") {
                return anyhow::Ok(());
            }
        }
        anyhow::bail!("tail exited before listening")
    });
    listening.await??;
    let mut users = UserServiceClient::connect(format!("http://{}", agora.addr("users"))).await?;
    users.create_user(sign_up("tailed@example.com")).await?;
    let output = tokio::time::timeout(Duration::from_secs(30), tail.wait_with_output()).await??;
    assert!(output.status.success(), "{output:?}");
    let line: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(line["subject"], "agora.users.user_created");
    assert_eq!(line["headers"]["ce-type"], "agora.users.v1.UserCreated");
    assert_eq!(line["headers"]["ce-source"], "users");
    assert_eq!(line["event"]["email"], "tailed@example.com");
    assert_eq!(line["event"]["version"], "1");

    // A poison message (a UserCreated that does not decode) reaches the
    // notifications consumer, fails twice and becomes a dead letter.
    let client = async_nats::connect(nats.url()).await?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("ce-id", "poison-1");
    headers.insert("ce-type", "agora.users.v1.UserCreated");
    headers.insert("Nats-Msg-Id", "poison-1");
    client
        .publish_with_headers("agora.users.user_created", headers, vec![0xff, 0xff].into())
        .await?;
    client.flush().await?;
    let mut listed = String::new();
    for _ in 0..100 {
        let output = agora_events(&nats, &["dlq", "list"])?;
        assert!(output.status.success(), "{output:?}");
        listed = String::from_utf8(output.stdout)?;
        if !listed.trim().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let letter: serde_json::Value = serde_json::from_str(listed.trim())?;
    assert_eq!(letter["headers"]["ce-id"], "poison-1");
    assert_eq!(letter["consumer"], "notifications");
    assert_eq!(letter["durable"], "notifications-users");
    assert_eq!(letter["deliveries"], "2");
    assert!(
        letter["reason"]
            .as_str()
            .is_some_and(|r| r.contains("decode")),
        "{letter}"
    );
    let seq = letter["seq"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no seq"))?;

    // Replaying it publishes it again (and, still poison, it comes back).
    let output = agora_events(&nats, &["dlq", "replay", "--id", &seq.to_string()])?;
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8(output.stdout)?.contains("replayed dead letter"));
    let output = agora_events(&nats, &["dlq", "replay", "--id", &seq.to_string()])?;
    assert!(!output.status.success(), "a replayed letter is gone");
    let mut again = None;
    for _ in 0..100 {
        let output = agora_events(&nats, &["dlq", "list"])?;
        let text = String::from_utf8(output.stdout)?;
        if let Some(line) = text.lines().next() {
            again = Some(serde_json::from_str::<serde_json::Value>(line)?);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let again = again.ok_or_else(|| anyhow::anyhow!("the replayed poison never came back"))?;
    assert_eq!(again["headers"]["ce-id"], "poison-1");
    assert_ne!(again["seq"], letter["seq"]);
    drop(agora);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_backlog_is_exported_as_metrics_while_nats_is_down() -> anyhow::Result<()> {
    let collector = OtlpCollector::start().await?;
    let endpoint = collector.endpoint();
    // No NATS: the sign-ups' events wait in the outbox, and the backlog shows.
    let agora = tokio::task::spawn_blocking(move || {
        AgoraProcess::start(
            &["users"],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
                ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
            ],
        )
    })
    .await??;
    let mut users = UserServiceClient::connect(format!("http://{}", agora.addr("users"))).await?;
    users.create_user(sign_up("queued-1@example.com")).await?;
    users.create_user(sign_up("queued-2@example.com")).await?;
    let mut seen = None;
    for _ in 0..100 {
        seen = collector
            .metrics()
            .into_iter()
            .rfind(|m| m.name == "agora.outbox.backlog");
        if seen.as_ref().is_some_and(|m| m.value >= 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let backlog = seen.ok_or_else(|| {
        anyhow::anyhow!("no agora.outbox.backlog among {:?}", collector.metrics())
    })?;
    assert_eq!(backlog.value, 2, "{backlog:?}");
    assert_eq!(backlog.service_name, "agora-users");
    assert_eq!(
        backlog.attributes.get("agora.source").map(String::as_str),
        Some("users")
    );
    let age = collector
        .metrics()
        .into_iter()
        .rfind(|m| m.name == "agora.outbox.oldest_unpublished_age")
        .ok_or_else(|| anyhow::anyhow!("no age metric"))?;
    assert!(age.value >= 0, "{age:?}");
    drop(agora);
    Ok(())
}
