//! The abuse suite: for every RPC of every Agora service, a generated set of
//! hostile requests against the real mesh (`agora serve all`: six services
//! on their own ports, the gateway, SQLite in a temporary data folder, a
//! private nats-server), each sent over real gRPC on loopback.
//!
//! The RPCs come from the contract's descriptor pool and the cases from
//! their input messages ([`cases`]): empty, plausible and maximal messages;
//! each string alone at 1 MiB (and one byte over its declared limit, when
//! the contract declares one); each list with up to 100,000 elements
//! under the 256 KiB message limit and just over it; invalid UTF-8, NUL and control characters; numbers at their
//! extremes; every field with the wrong wire type; unknown, invalid and
//! deeply nested fields; truncated messages; seeded random bodies from 0
//! bytes to 4 MiB; bad, forged, expired and misaddressed tokens and
//! `authorization` that is not text; `grpc-timeout` of 0, of years and
//! malformed; broken gRPC framing; and a subset through the gateway.
//!
//! Every case must end, within [`exchange::CASE_TIMEOUT`], with a
//! well-formed status from [`cases::ALLOWED`] (never INTERNAL, UNKNOWN,
//! DATA_LOSS, UNIMPLEMENTED or UNAVAILABLE, save UNIMPLEMENTED for a
//! compression the server does not support, as the gRPC spec has it; and
//! CANCELLED for deadline cases). Afterwards every
//! service answers `Health/Check` SERVING, the process's logs hold no panic
//! and no `internal error`, and its peak resident memory stays under
//! [`PEAK_RSS_BOUND_MIB`]. Every failure is listed (RPC, case, code,
//! message) before the test fails, with the number of cases per RPC.

mod common;

#[path = "abuse/cases.rs"]
mod cases;
#[path = "abuse/exchange.rs"]
mod exchange;
#[path = "abuse/tokens.rs"]
mod tokens;
#[path = "abuse/wire.rs"]
mod wire;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use agora_proto::catalog::v1 as catalog;
use agora_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use agora_proto::common::v1::Money;
use agora_proto::inventory::v1 as inventory;
use agora_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use agora_testkit::{NatsServer, with_token};
use anyhow::Context as _;
use common::{AgoraProcess, memory};
use futures::StreamExt as _;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::cases::{Context, Known, Route};
use crate::exchange::Outcome;
use crate::tokens::Tokens;

/// Cases in flight at once: enough to overlap the slow ones (a password
/// hash, a large body) on two cores, few enough that the suite measures
/// the services' own limits rather than a flood.
const CONCURRENCY: usize = 16;
/// The peak resident memory allowed to the whole `serve all` process (six
/// services and the gateway), in MiB. The users pod alone is capped at
/// 256 MiB in Kubernetes; the other services idle at a few tens of MiB
/// together, and 16 concurrent requests of at most 256 KiB each (larger
/// ones are refused from their length prefix) add little. Unbounded password hashing (19 MiB a
/// hash, 16 at once) or a request that makes a service buffer without
/// bound goes over it.
const PEAK_RSS_BOUND_MIB: u64 = 384;
/// The longest the cases may take together: a mesh where every call hangs
/// must fail the suite in minutes, listing every case, not after each has
/// waited out its own timeout (cases still waiting then end with no status).
const SUITE_DEADLINE: Duration = Duration::from_secs(300);
/// Runs only the cases whose `<rpc path> <case name>` contains this text,
/// to reproduce a failure (cases are deterministic).
const FILTER_VAR: &str = "AGORA_ABUSE_FILTER";
/// Set to print how every case ended, not only the failures.
const VERBOSE_VAR: &str = "AGORA_ABUSE_VERBOSE";
const ADMIN_EMAIL: &str = "abuse-admin@example.com";
const USER_EMAIL: &str = "abuse-user@example.com";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_of_every_service_holds_under_hostile_requests() -> anyhow::Result<()> {
    let started = Instant::now();
    let nats = NatsServer::start().await?;
    let nats_url = nats.url().to_owned();
    let admin_emails = format!("[\"{ADMIN_EMAIL}\"]");
    let process = tokio::task::spawn_blocking(move || {
        AgoraProcess::start_logged(
            &["all"],
            &[
                ("AGORA_NATS_URL", nats_url.as_str()),
                ("AGORA_AUTH__ADMIN_EMAILS", admin_emails.as_str()),
            ],
        )
    })
    .await??;
    let rss_at_start = memory(process.pid())?;

    let channel = |service: &str| -> anyhow::Result<Channel> {
        Ok(Endpoint::from_shared(format!("http://{}", process.addr(service)))?.connect_lazy())
    };
    let tokens = Tokens::obtain(channel("users")?, &process.data, USER_EMAIL, ADMIN_EMAIL).await?;
    let rpcs = cases::rpcs()?;
    harness_self_check(&rpcs, &process).await?;
    // A product of its own for each RPC, with plenty of stock: the cases
    // of one RPC (`SetStock` setting it to 0, `ReserveStock` taking it)
    // must not decide how far another's (`PlaceOrder`) get.
    let mut known = Vec::with_capacity(rpcs.len());
    for _ in &rpcs {
        known.push(Known {
            product_id: product(channel("catalog")?, channel("inventory")?, &tokens.admin).await?,
            user_id: tokens.user_id.clone(),
        });
    }

    // Generated one RPC at a time (an RPC's cases hold tens of MiB of
    // bodies), sent CONCURRENCY at a time; only how each ended is kept.
    let generation_errors = Mutex::new(Vec::new());
    // What is in flight, so that the memory watch can say what was running
    // when the process grew.
    let in_flight = Arc::new(Mutex::new(BTreeMap::<u64, String>::new()));
    let next_id = AtomicU64::new(0);
    let watch = MemoryWatch::start(process.pid(), Arc::clone(&in_flight));
    let filter = std::env::var(FILTER_VAR).unwrap_or_default();
    let cases_started = Instant::now();
    let suite_deadline = tokio::time::Instant::now() + SUITE_DEADLINE;
    let records: Vec<Record> = futures::stream::iter(rpcs.iter().enumerate())
        .flat_map(|(index, rpc)| {
            let context = Context {
                tokens: &tokens,
                known: &known[index],
            };
            let list = cases::cases_for(index, rpc, &context).unwrap_or_else(|err| {
                lock(&generation_errors).push(format!("{}: {err:#}", rpc.path));
                Vec::new()
            });
            let selected = list
                .into_iter()
                .filter(|case| format!("{} {}", rpc.path, case.name).contains(&filter));
            futures::stream::iter(selected.collect::<Vec<_>>())
        })
        .map(|case| {
            let rpc = &rpcs[case.rpc];
            let addr = match case.route {
                Route::Gateway => process.addr("gateway"),
                Route::Service | Route::Raw => process.addr(&rpc.service),
            };
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            let in_flight = Arc::clone(&in_flight);
            async move {
                lock(&in_flight).insert(id, format!("{} {}", rpc.path, case.name));
                let outcome = exchange::send(&case, rpc, &addr, suite_deadline).await;
                lock(&in_flight).remove(&id);
                Record {
                    allowed: outcome.code.is_some_and(|code| case.allows(code)),
                    rpc: case.rpc,
                    name: case.name,
                    outcome,
                }
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let cases_took = cases_started.elapsed();
    let setup_took = cases_started.duration_since(started);
    let growth = watch.stop().await;
    let generation_errors = generation_errors
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    anyhow::ensure!(
        generation_errors.is_empty(),
        "case generation failed:\n{}",
        generation_errors.join("\n")
    );

    let total = records.len();
    let mut per_rpc: BTreeMap<&str, usize> = BTreeMap::new();
    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for record in &records {
        *per_rpc.entry(rpcs[record.rpc].path.as_str()).or_default() += 1;
        let code = record
            .outcome
            .code
            .map_or_else(|| "(none)".to_owned(), |c| format!("{c:?}"));
        *by_code.entry(code.clone()).or_default() += 1;
        let row = format!(
            "{:<50} {:<48} {:<18} {}",
            rpcs[record.rpc].path,
            record.name,
            code,
            one_line(&record.outcome.message, 200)
        );
        if std::env::var_os(VERBOSE_VAR).is_some() {
            println!("{row}");
        }
        if !record.allowed {
            failures.push(row);
        }
    }
    failures.sort();

    // After the storm: every service still serving, no panic, no internal
    // error, memory bounded.
    let mut after = Vec::new();
    for rpc in &rpcs {
        if after
            .iter()
            .any(|(service, _): &(String, _)| *service == rpc.grpc_service)
        {
            continue;
        }
        let status = health(channel(&rpc.service)?, &rpc.grpc_service).await;
        after.push((rpc.grpc_service.clone(), status));
    }
    let memory_after = memory(process.pid())?;
    let logs = process.logs()?;
    let panics: Vec<&str> = logs.lines().filter(|l| l.contains("panicked")).collect();
    let internal: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("internal error"))
        .collect();
    if std::env::var_os(VERBOSE_VAR).is_some() {
        println!("--- the process's logs\n{logs}--- end of logs");
    }
    let log_lines = logs.lines().count();
    let warnings = logs.lines().filter(|l| l.contains("WARN")).count();
    let other_errors: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("ERROR") && !l.contains("internal error"))
        .collect();

    let mut report = String::new();
    writeln!(
        report,
        "abuse suite: {total} cases over {} RPCs of {} services in {:.1?} (after {:.1?} of \
         setup), {} failed; peak RSS {} MiB (bound {PEAK_RSS_BOUND_MIB} MiB; {} MiB at start, \
         {} MiB after)",
        rpcs.len(),
        after.len(),
        cases_took,
        setup_took,
        failures.len(),
        memory_after.peak_kib / 1024,
        rss_at_start.rss_kib / 1024,
        memory_after.rss_kib / 1024,
    )?;
    writeln!(report, "cases per RPC:")?;
    for (path, count) in &per_rpc {
        writeln!(report, "  {count:>5}  {path}")?;
    }
    writeln!(report, "codes: {by_code:?}")?;
    writeln!(
        report,
        "logs: {log_lines} lines, {warnings} WARN, {} ERROR, {} panics",
        other_errors.len() + internal.len(),
        panics.len()
    )?;
    writeln!(
        report,
        "resident memory as it grew (each {GROWTH_STEP_MIB} MiB step, with what was in flight):"
    )?;
    for line in &growth {
        writeln!(report, "  {}", one_line(line, 600))?;
    }
    for (service, status) in &after {
        writeln!(report, "health {service}: {status}")?;
    }
    if !failures.is_empty() {
        writeln!(report, "\nFAILURES ({}):", failures.len())?;
        writeln!(
            report,
            "{:<50} {:<48} {:<18} message",
            "rpc", "case", "code"
        )?;
        for failure in &failures {
            writeln!(report, "{failure}")?;
        }
    }
    for (title, lines) in [
        ("panics in the logs", &panics),
        ("internal errors in the logs", &internal),
        ("other ERROR lines in the logs (not failing)", &other_errors),
    ] {
        if !lines.is_empty() {
            writeln!(report, "\n{title} ({}):", lines.len())?;
            for line in lines.iter().take(40) {
                writeln!(report, "  {}", one_line(line, 300))?;
            }
        }
    }
    println!("{report}");

    let unhealthy: Vec<_> = after
        .iter()
        .filter(|(_, status)| status != "SERVING")
        .collect();
    anyhow::ensure!(
        failures.is_empty()
            && unhealthy.is_empty()
            && panics.is_empty()
            && internal.is_empty()
            && memory_after.peak_kib / 1024 < PEAK_RSS_BOUND_MIB,
        "the abuse suite failed (see the report above):\n{report}"
    );
    Ok(())
}

/// Checks that the harness tells a wrong answer from a right one before
/// trusting it with thousands: an RPC no service has must come back
/// UNIMPLEMENTED from the real server and count as a failure, and a plain
/// `Health/Check`-free public call must come back OK.
async fn harness_self_check(rpcs: &[cases::Rpc], process: &AgoraProcess) -> anyhow::Result<()> {
    let public = rpcs
        .iter()
        .position(|rpc| {
            rpc.level == agora_platform::access::AccessLevel::Public && !rpc.server_streaming
        })
        .context("no public unary RPC")?;
    let mut missing = rpcs[public].clone();
    missing.path = format!("/{}/NoSuchRpc", missing.grpc_service);
    let mut case = cases::Case::plain(public, "self-check", bytes::Bytes::new());
    let deadline = tokio::time::Instant::now() + exchange::CASE_TIMEOUT;
    let outcome = exchange::send(&case, &missing, &process.addr(&missing.service), deadline).await;
    anyhow::ensure!(
        outcome.code == Some(tonic::Code::Unimplemented)
            && !case.allows(tonic::Code::Unimplemented),
        "self-check: an unknown RPC ended {outcome:?}"
    );
    case.route = Route::Raw;
    let framed = bytes::Bytes::from(wire::frame(0, 0, &[]));
    case.body = framed;
    let outcome = exchange::send(&case, &missing, &process.addr(&missing.service), deadline).await;
    anyhow::ensure!(
        outcome.code == Some(tonic::Code::Unimplemented),
        "self-check (raw): an unknown RPC ended {outcome:?}"
    );
    Ok(())
}

/// The steps in which the memory watch reports growth.
const GROWTH_STEP_MIB: u64 = 32;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Samples the process's resident memory every 50 ms while the cases run,
/// noting each time it first passes another [`GROWTH_STEP_MIB`] and which
/// cases were in flight then.
struct MemoryWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl MemoryWatch {
    fn start(pid: u32, in_flight: Arc<Mutex<BTreeMap<u64, String>>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = Arc::clone(&stop);
            async move {
                let started = Instant::now();
                let mut steps = Vec::new();
                let mut reached = 0;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(memory) = memory(pid) {
                        let step = memory.rss_kib / 1024 / GROWTH_STEP_MIB;
                        if step > reached {
                            reached = step;
                            let names: Vec<String> = lock(&in_flight).values().cloned().collect();
                            steps.push(format!(
                                "{} MiB at {:.1?}: {}",
                                memory.rss_kib / 1024,
                                started.elapsed(),
                                names.join("; ")
                            ));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                steps
            }
        });
        Self { stop, task }
    }

    async fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// How one case ended (its body is dropped as soon as it is sent).
struct Record {
    rpc: usize,
    name: String,
    outcome: Outcome,
    /// Whether the outcome is one the case allows.
    allowed: bool,
}

/// A product with plenty of stock, for requests that name one.
async fn product(catalog: Channel, inventory: Channel, admin: &str) -> anyhow::Result<String> {
    let created = CatalogServiceClient::new(catalog)
        .create_product(with_token(
            catalog::CreateProductRequest {
                sku: format!("abuse-{}", uuid::Uuid::now_v7().simple()),
                name: "Abuse suite notebook".into(),
                description: "Takes a beating".into(),
                price: Some(Money {
                    currency_code: "EUR".into(),
                    amount_minor: 1_000,
                }),
                categories: vec!["stationery".into()],
            },
            admin,
        ))
        .await
        .context("creating the product")?
        .into_inner()
        .product
        .context("no product")?;
    InventoryServiceClient::new(inventory)
        .set_stock(with_token(
            inventory::SetStockRequest {
                product_id: created.id.clone(),
                quantity: 1_000_000,
            },
            admin,
        ))
        .await
        .context("setting its stock")?;
    Ok(created.id)
}

/// `grpc.health.v1.Health/Check` of `service`: its status's name, or what
/// went wrong.
async fn health(channel: Channel, service: &str) -> String {
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        HealthClient::new(channel).check(HealthCheckRequest {
            service: service.to_owned(),
        }),
    )
    .await;
    match answer {
        Ok(Ok(response)) => match ServingStatus::try_from(response.into_inner().status) {
            Ok(status) => status.as_str_name().to_owned(),
            Err(_) => "an unknown status".to_owned(),
        },
        Ok(Err(status)) => format!("{:?}: {}", status.code(), status.message()),
        Err(_) => "no answer within 10 s".to_owned(),
    }
}

/// `text` on one line, at most `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() > max {
        format!("{}...", flat.chars().take(max).collect::<String>())
    } else {
        flat
    }
}
