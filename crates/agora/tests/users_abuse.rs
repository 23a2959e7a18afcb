//! The users service under a login flood, as the real binary runs it.
//!
//! `agora serve users` (SQLite in a temporary folder) gets 60 and then 500
//! concurrent anonymous `Authenticate` calls, most with unknown emails (each
//! verified against the dummy hash, 19 MiB of argon2 memory) and one in ten
//! with a known user and the right password. Every call must end OK,
//! UNAUTHENTICATED or RESOURCE_EXHAUSTED; the process's peak resident
//! memory (`VmHWM`) must stay under [`PEAK_RSS_BOUND_MIB`]; afterwards the
//! service answers `Health/Check` SERVING and the known user logs in.
//! Unbounded, sixty such calls took the process to 1.2 GB.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use agora_platform::error::reason_of;
use agora_proto::users::v1 as pb;
use agora_proto::users::v1::user_service_client::UserServiceClient;
use anyhow::Context as _;
use common::{AgoraProcess, memory};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The peak resident memory allowed to the users process, in MiB: the
/// memory limit of the users pod in `deploy/k8s/users.yaml` (256Mi), past
/// which Kubernetes kills it.
const PEAK_RSS_BOUND_MIB: u64 = 256;

/// The memory limit the process is sized for, as in its pod.
const POD_MEMORY_BYTES: u64 = 256 * 1024 * 1024;

/// Connections the calls are spread over, so that HTTP/2's streams per
/// connection do not queue them on the client side.
const CONNECTIONS: usize = 8;

/// A call that has no answer after this long fails the test.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

const KNOWN_EMAIL: &str = "flood-known@example.com";
const KNOWN_PASSWORD: &str = "correct horse battery staple";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_keeps_users_memory_bounded_and_every_answer_well_formed()
-> anyhow::Result<()> {
    // What `passwords.max_concurrent_hashes = 0` chooses in the pod (its
    // cgroup's 256 MiB), stated here so that the test does not depend on
    // this machine's memory: min(cores, 256 MiB / 4 / 19 MiB = 3).
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let hashes_at_once = agora_platform::work::permits_for(
        cores,
        Some(POD_MEMORY_BYTES),
        agora_users::passwords::BYTES_PER_HASH,
    );
    let process = tokio::task::spawn_blocking(move || {
        AgoraProcess::start_logged(
            &["users"],
            &[
                (
                    "AGORA_PASSWORDS__MAX_CONCURRENT_HASHES",
                    &hashes_at_once.to_string(),
                ),
                // The startup line stating the hashing bound is at INFO.
                ("RUST_LOG", "info"),
            ],
        )
    })
    .await??;
    let pid = process.pid();
    let url = format!("http://{}", process.addr("users"));
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(Endpoint::from_shared(url.clone())?.connect().await?);
    }
    let mut client = UserServiceClient::new(channels[0].clone());
    client
        .create_user(pb::CreateUserRequest {
            email: KNOWN_EMAIL.into(),
            name: "Known User".into(),
            password: KNOWN_PASSWORD.into(),
        })
        .await
        .context("signing up the known user")?;
    let idle = memory(pid)?;
    eprintln!(
        "users before the flood: VmRSS {} MiB, VmHWM {} MiB ({hashes_at_once} hashes at once)",
        idle.rss_kib / 1024,
        idle.peak_kib / 1024,
    );

    let mut failures = Vec::new();
    for calls in [60, 500] {
        let tally = flood(&channels, calls).await?;
        let after = memory(pid)?;
        eprintln!(
            "{calls} concurrent Authenticate: {:?}; VmRSS {} MiB, VmHWM {} MiB",
            tally.codes,
            after.rss_kib / 1024,
            after.peak_kib / 1024
        );
        failures.extend(tally.failures.iter().cloned());
        assert!(
            after.peak_kib / 1024 < PEAK_RSS_BOUND_MIB,
            "users peaked at {} MiB resident after {calls} concurrent logins (bound {} MiB)",
            after.peak_kib / 1024,
            PEAK_RSS_BOUND_MIB
        );
        // The service did real work, not only refusals.
        assert!(tally.codes.get("OK").is_some_and(|n| *n > 0), "{tally:?}");
        assert!(
            tally.codes.get("Unauthenticated").is_some_and(|n| *n > 0),
            "{tally:?}"
        );
    }
    assert!(
        failures.is_empty(),
        "unexpected answers:\n{}",
        failures.join("\n")
    );

    // Still serving, and the known user still logs in.
    let status = HealthClient::new(channels[0].clone())
        .check(HealthCheckRequest {
            service: pb::SERVICE_NAME.to_owned(),
        })
        .await?
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    client.authenticate(known_login()).await?;
    let logs = process.logs()?;
    let bound = format!("hashes_at_once={hashes_at_once}");
    assert!(
        logs.lines()
            .any(|line| line.contains("password hashing bounded") && line.contains(&bound)),
        "no startup line stating the hashing bound:\n{logs}"
    );
    assert!(!logs.contains("panicked"), "a panic in the logs:\n{logs}");
    assert!(
        !logs.contains("internal error"),
        "INTERNAL in the logs:\n{logs}"
    );
    Ok(())
}

fn known_login() -> pb::AuthenticateRequest {
    pb::AuthenticateRequest {
        email: KNOWN_EMAIL.into(),
        password: KNOWN_PASSWORD.into(),
    }
}

/// How many calls ended with each code, and the calls that ended wrong.
#[derive(Debug, Default)]
struct Tally {
    codes: BTreeMap<String, usize>,
    failures: Vec<String>,
}

/// `calls` concurrent `Authenticate` calls over `channels`: every tenth one
/// with the known user and the right password (OK, or RESOURCE_EXHAUSTED),
/// the others with unknown emails (UNAUTHENTICATED, or RESOURCE_EXHAUSTED).
async fn flood(channels: &[Channel], calls: usize) -> anyhow::Result<Tally> {
    let tasks: Vec<_> = (0..calls)
        .map(|i| {
            let mut client = UserServiceClient::new(channels[i % channels.len()].clone());
            let known = i % 10 == 0;
            let request = if known {
                known_login()
            } else {
                pb::AuthenticateRequest {
                    email: format!("nobody-{i}@example.com"),
                    password: "some password or other".into(),
                }
            };
            tokio::spawn(async move {
                let answer = tokio::time::timeout(CALL_TIMEOUT, client.authenticate(request)).await;
                (known, answer)
            })
        })
        .collect();
    let mut tally = Tally::default();
    for task in tasks {
        let (known, answer) = task.await?;
        let (code, expected, what) = match answer {
            Err(_) => ("no answer".to_owned(), false, String::new()),
            Ok(Ok(_)) => ("OK".to_owned(), known, String::new()),
            Ok(Err(status)) => {
                let expected = match status.code() {
                    Code::Unauthenticated => !known,
                    // Hashing saturated, or the service shedding load.
                    Code::ResourceExhausted => matches!(
                        reason_of(&status).as_deref(),
                        Some("PASSWORD_HASHING_BUSY" | "OVERLOADED")
                    ),
                    _ => false,
                };
                (
                    format!("{:?}", status.code()),
                    expected,
                    format!("{status:?}"),
                )
            }
        };
        if !expected {
            tally
                .failures
                .push(format!("known user: {known}, {code} {what}"));
        }
        *tally.codes.entry(code).or_default() += 1;
    }
    Ok(tally)
}
