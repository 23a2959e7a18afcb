//! `agora serve` with `clients.discovery = "nats"` registers what it runs
//! and deregisters on SIGTERM; `agora registry` shows it.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{AGORA, AgoraProcess};

/// `agora registry` against `nats_url`: its table.
fn registry(nats_url: &str) -> anyhow::Result<String> {
    let output = Command::new(AGORA)
        .args(["registry", "--nats-url", nats_url])
        .env_remove("NATS_URL")
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "agora registry failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

#[test]
fn served_services_are_registered_until_they_stop() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let nats = runtime.block_on(agora_testkit::NatsServer::start())?;
    assert!(registry(nats.url())?.starts_with("no instance registered"));

    let agora = AgoraProcess::start(
        &["catalog"],
        &[
            ("AGORA_NATS_URL", nats.url()),
            ("AGORA_CLIENTS__DISCOVERY", "nats"),
            ("AGORA_CLIENTS__HEARTBEAT_SECS", "1"),
            ("AGORA_CLIENTS__INSTANCE_TTL_SECS", "3"),
        ],
    )?;
    let address = format!("http://{}", agora.addr("catalog"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let table = loop {
        let table = registry(nats.url())?;
        if table.contains("SERVING") && !table.contains("NOT_SERVING") {
            break table;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "never registered as serving:\n{table}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let row = table
        .lines()
        .find(|line| line.starts_with("catalog"))
        .ok_or_else(|| anyhow::anyhow!("no catalog row:\n{table}"))?;
    assert!(row.contains(&address), "{table}");
    assert!(row.contains("s ago"), "{table}");
    assert!(table.starts_with("SERVICE"), "{table}");

    // SIGTERM: the entry is deleted before the server drains and exits,
    // without waiting for it to expire.
    let exit = agora.terminate()?;
    assert!(exit.success(), "{exit:?}");
    let table = registry(nats.url())?;
    assert!(table.starts_with("no instance registered"), "{table}");
    Ok(())
}
