//! `agora health`: the `grpc.health.v1` status of running services as a table.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Arguments of `agora health`.
#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// Services to check, as NAME=HOST:PORT (for example
    /// users=127.0.0.1:50051); default: all six on their default ports.
    pub endpoints: Vec<String>,
    /// Keep checking until every service is SERVING or this many seconds pass.
    #[arg(long, default_value_t = 0)]
    pub wait: u64,
}

/// One row of the table.
#[derive(Debug)]
struct Row {
    name: String,
    addr: String,
    grpc_service: String,
    status: String,
    /// The service's NATS connection (`<service>/nats`): degraded-only, it
    /// does not decide the exit code.
    events: String,
}

/// Prints the table; exit code 0 only when every service is SERVING.
pub async fn run(args: HealthArgs) -> anyhow::Result<ExitCode> {
    let targets = parse_targets(&args.endpoints)?;
    let deadline = Instant::now() + Duration::from_secs(args.wait);
    let rows = loop {
        let mut rows = Vec::new();
        for (name, addr, grpc_service) in &targets {
            // One connection per service for both questions.
            let (status, events) = match connect(addr).await {
                Ok(channel) => (
                    check(&channel, grpc_service).await,
                    events_status(&channel, grpc_service).await,
                ),
                Err(down) => (down, "-".to_owned()),
            };
            rows.push(Row {
                name: name.clone(),
                addr: addr.clone(),
                grpc_service: grpc_service.clone(),
                status,
                events,
            });
        }
        let all_serving = rows.iter().all(|r| r.status == "SERVING");
        if all_serving || Instant::now() >= deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!(
        "{:<14} {:<22} {:<44} {:<12} EVENTS (NATS)",
        "SERVICE", "ADDRESS", "GRPC SERVICE", "STATUS"
    );
    for row in &rows {
        println!(
            "{:<14} {:<22} {:<44} {:<12} {}",
            row.name, row.addr, row.grpc_service, row.status, row.events
        );
    }
    Ok(if rows.iter().all(|r| r.status == "SERVING") {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn parse_targets(endpoints: &[String]) -> anyhow::Result<Vec<(String, String, String)>> {
    if endpoints.is_empty() {
        return Ok(crate::ALL_TARGETS
            .iter()
            .map(|t| {
                let addr = format!("127.0.0.1:{}", t.default_port());
                (t.name().to_owned(), addr, t.grpc_service().to_owned())
            })
            .collect());
    }
    endpoints
        .iter()
        .map(|spec| {
            let (name, addr) = spec
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("expected NAME=HOST:PORT, got {spec:?}"))?;
            let grpc_service = crate::ALL_TARGETS
                .iter()
                .find(|t| t.name() == name)
                .map(|t| t.grpc_service().to_owned())
                .ok_or_else(|| anyhow::anyhow!("unknown service {name:?}"))?;
            Ok((name.to_owned(), addr.to_owned(), grpc_service))
        })
        .collect()
}

/// The status of the service's event bus: `connected`, `NOT READY`, or
/// `-` when the server does not report one.
async fn events_status(channel: &Channel, grpc_service: &str) -> String {
    match check(channel, &format!("{grpc_service}/nats"))
        .await
        .as_str()
    {
        "SERVING" => "connected".to_owned(),
        "NOT_SERVING" => "NOT READY (events wait in the outbox)".to_owned(),
        _ => "-".to_owned(),
    }
}

/// A channel to `addr`, or the status to show when there is none.
async fn connect(addr: &str) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|err| format!("bad address: {err}"))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2));
    endpoint
        .connect()
        .await
        .map_err(|_| "DOWN (connection refused)".to_owned())
}

/// The status of one service, or why it could not be read.
async fn check(channel: &Channel, service: &str) -> String {
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    match HealthClient::new(channel.clone()).check(request).await {
        Ok(response) => match response.into_inner().status() {
            ServingStatus::Serving => "SERVING".to_owned(),
            ServingStatus::NotServing => "NOT_SERVING".to_owned(),
            other => format!("{other:?}").to_uppercase(),
        },
        Err(status) => format!("ERROR ({:?}: {})", status.code(), status.message()),
    }
}
