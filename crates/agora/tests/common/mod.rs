//! Runs the real `agora` binary for the binary-level tests.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub const AGORA: &str = env!("CARGO_BIN_EXE_agora");

/// `agora serve users` on a free port with its own data folder (SQLite and a
/// fresh key pair), healthy when returned; killed when dropped.
pub struct UsersProcess {
    /// `127.0.0.1:<port>`.
    pub listen: String,
    /// The `--data-dir`.
    pub data: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl UsersProcess {
    /// Starts the service with extra environment variables.
    pub fn start(env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        let keygen = Command::new(AGORA)
            .arg("keygen")
            .arg("--dir")
            .arg(data.join("keys"))
            .output()?;
        anyhow::ensure!(keygen.status.success(), "keygen failed");
        let listen = format!("127.0.0.1:{}", agora_testkit::free_port()?);
        let mut command = Command::new(AGORA);
        command
            .args(["serve", "users", "--listen", &listen, "--data-dir"])
            .arg(&data)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        for (key, value) in env {
            command.env(key, value);
        }
        let process = Self {
            listen,
            data,
            child: command.spawn()?,
            _dir: dir,
        };
        let health = process.health(20)?;
        anyhow::ensure!(health.0, "server not healthy:\n{}", health.1);
        Ok(process)
    }

    /// `agora health --wait <secs>` against this server: (all serving, table).
    pub fn health(&self, wait_secs: u64) -> anyhow::Result<(bool, String)> {
        let output = Command::new(AGORA)
            .args(["health", "--wait", &wait_secs.to_string()])
            .arg(format!("users={}", self.listen))
            .output()?;
        Ok((output.status.success(), String::from_utf8(output.stdout)?))
    }

    /// Sends SIGTERM and waits (up to 20 s) for the exit status.
    pub fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        anyhow::ensure!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()?
                .success()
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(exit) = self.child.try_wait()? {
                return Ok(exit);
            }
            anyhow::ensure!(Instant::now() < deadline, "no exit within 20 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for UsersProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
