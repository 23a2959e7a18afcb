//! The README's grpcurl walkthrough, run as written against a fresh server, so
//! the documentation cannot drift from the code.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{AgoraProcess, DEFAULT_PORTS};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The shell block between the walkthrough markers.
fn walkthrough() -> anyhow::Result<String> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md"))?;
    let start = readme
        .find("<!-- walkthrough:start -->")
        .ok_or_else(|| anyhow::anyhow!("README lacks the walkthrough:start marker"))?;
    let end = readme
        .find("<!-- walkthrough:end -->")
        .ok_or_else(|| anyhow::anyhow!("README lacks the walkthrough:end marker"))?;
    let block = &readme[start..end];
    let body = block
        .lines()
        .skip_while(|line| !line.starts_with("```sh"))
        .skip(1)
        .take_while(|line| !line.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n");
    Ok(body)
}

#[test]
fn readme_walkthrough_runs_as_written_against_the_seeded_monolith() -> anyhow::Result<()> {
    let grpcurl = workspace_root().join(".venv/bin/grpcurl");
    anyhow::ensure!(
        grpcurl.exists(),
        "{} is missing: run `just test`, which installs it",
        grpcurl.display()
    );
    let admin = "admin@agora.localhost";
    let admin_emails = format!("[\"{admin}\"]");
    let runtime = tokio::runtime::Runtime::new()?;
    let nats = runtime.block_on(agora_testkit::NatsServer::start())?;
    let agora = AgoraProcess::start(
        &["all"],
        &[
            ("AGORA_AUTH__ADMIN_EMAILS", &admin_emails),
            ("AGORA_NATS_URL", nats.url()),
        ],
    )?;
    let (seeded, output) = agora.seed(admin)?;
    assert!(seeded, "seed failed:\n{output}");
    assert!(output.contains("password:"), "{output}");
    // A second seed changes nothing and prints no password.
    let (seeded, output) = agora.seed(admin)?;
    assert!(seeded, "second seed failed:\n{output}");
    assert!(!output.contains("password:"), "{output}");
    assert!(output.contains("already has products"), "{output}");

    // The gateway serves once every service behind it does.
    let gateway = agora.addr("gateway");
    let health = Command::new(common::AGORA)
        .args(["health", "--wait", "30", &format!("gateway={gateway}")])
        .output()?;
    assert!(
        health.status.success(),
        "the gateway is not serving:\n{}",
        String::from_utf8_lossy(&health.stdout)
    );

    // The README talks to the default ports with grpcurl from .venv/: point
    // both at this test's gateway and services and the repository's grpcurl.
    let mut script = walkthrough()?.replace(".venv/bin/grpcurl", &grpcurl.display().to_string());
    script = script.replace("localhost:8080", &gateway);
    for (name, port) in DEFAULT_PORTS {
        script = script.replace(&format!("localhost:{port}"), &agora.addr(name));
    }
    let dir = tempfile::tempdir()?;
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(dir.path())
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "walkthrough failed:\n{stdout}\n{stderr}"
    );
    for expected in [
        "agora.users.v1.UserService",
        "grpc.reflection.v1alpha.ServerReflection",
        "\"status\": \"SERVING\"",
        "\"userCreated\"",
        "\"userEmailUpdated\"",
        "\"version\": \"2\"",
        "Ferris Mug",
        "\"available\"",
        "nextPageToken",
        "\"status\": \"ORDER_STATUS_COMPLETED\"",
        "CARD_DECLINED",
        "\"status\": \"ORDER_STATUS_FAILED\"",
        "\"failureCode\": \"CARD_DECLINED\"",
        // Through the gateway: Connect JSON by curl, its errors, the edge's refusal.
        "\"code\":\"not_found\"",
        "(HTTP 404)",
        "PermissionDenied",
        "Welcome to Agora, Ada Lovelace",
    ] {
        assert!(
            stdout.contains(expected),
            "output lacks {expected}:\n{stdout}"
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())?.collect();
    assert!(
        leftovers.is_empty(),
        "walkthrough leaves files behind: {leftovers:?}"
    );
    Ok(())
}
