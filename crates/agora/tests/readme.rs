//! The README's grpcurl walkthrough, run as written against a fresh server, so
//! the documentation cannot drift from the code.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const AGORA: &str = env!("CARGO_BIN_EXE_agora");

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

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn readme_walkthrough_runs_as_written() -> anyhow::Result<()> {
    let grpcurl = workspace_root().join(".venv/bin/grpcurl");
    anyhow::ensure!(
        grpcurl.exists(),
        "{} is missing: run `just test`, which installs it",
        grpcurl.display()
    );
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let keygen = Command::new(AGORA)
        .arg("keygen")
        .arg("--dir")
        .arg(data.join("keys"))
        .output()?;
    anyhow::ensure!(keygen.status.success(), "keygen failed");
    let port = agora_testkit::free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let _server = Killed(
        Command::new(AGORA)
            .args(["serve", "users", "--listen", &listen, "--data-dir"])
            .arg(&data)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    );
    let health = Command::new(AGORA)
        .args(["health", "--wait", "20"])
        .arg(format!("users={listen}"))
        .output()?;
    anyhow::ensure!(health.status.success(), "server not healthy");

    // The README talks to the default port with grpcurl from .venv/: point
    // both at this test's server and the repository's grpcurl.
    let script = walkthrough()?
        .replace("localhost:50051", &listen)
        .replace(".venv/bin/grpcurl", &grpcurl.display().to_string());
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
    ] {
        assert!(
            stdout.contains(expected),
            "output lacks {expected}:\n{stdout}"
        );
    }
    assert!(
        !dir.path().join("auth.json").exists(),
        "walkthrough cleans up"
    );
    Ok(())
}
