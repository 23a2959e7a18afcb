//! Runs the real `agora` binary for the binary-level tests.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub const AGORA: &str = env!("CARGO_BIN_EXE_agora");

/// The six services and their default ports (shared/CONTRACT.md).
pub const DEFAULT_PORTS: [(&str, u16); 6] = [
    ("users", 50051),
    ("catalog", 50052),
    ("inventory", 50053),
    ("payments", 50054),
    ("orders", 50055),
    ("notifications", 50056),
];

/// `agora serve <targets>` with every service on a free port and its own
/// data folder (SQLite files and a fresh key pair), healthy when returned;
/// killed when dropped.
pub struct AgoraProcess {
    /// Service name -> `127.0.0.1:<port>`, for every service (started or not),
    /// and `gateway` -> the gateway's port (`agora serve all` includes it;
    /// [`AgoraProcess::health`] does not wait for it).
    pub addrs: BTreeMap<&'static str, String>,
    /// The data folder.
    pub data: PathBuf,
    /// Where the process's stderr (its logs) goes, when started with
    /// [`AgoraProcess::start_logged`]; otherwise it is the test's own.
    log: Option<PathBuf>,
    started: Vec<&'static str>,
    child: Child,
    _dir: tempfile::TempDir,
}

impl AgoraProcess {
    /// Starts `agora serve <targets>` with extra environment variables and
    /// waits until the started services are healthy.
    pub fn start(targets: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        Self::start_in(dir, data, targets, env)
    }

    /// [`AgoraProcess::start`] on data folder `data` (created if missing;
    /// its keys are kept if it has some, so that processes sharing it trust
    /// each other's tokens), kept alive by `dir`.
    pub fn start_in(
        dir: tempfile::TempDir,
        data: PathBuf,
        targets: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::spawn(dir, data, targets, env, None)
    }

    /// [`AgoraProcess::start`] with the process's logs (stderr) written to a
    /// file, for tests that inspect them ([`AgoraProcess::logs`]).
    pub fn start_logged(targets: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        let log = dir.path().join("agora.log");
        Self::spawn(dir, data, targets, env, Some(log))
    }

    fn spawn(
        dir: tempfile::TempDir,
        data: PathBuf,
        targets: &[&str],
        env: &[(&str, &str)],
        log: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let keygen = Command::new(AGORA)
            .arg("keygen")
            .arg("--dir")
            .arg(data.join("keys"))
            .output()?;
        anyhow::ensure!(keygen.status.success(), "keygen failed");
        let mut command = Command::new(AGORA);
        command
            .arg("serve")
            .args(targets)
            .env_remove("DATABASE_URL")
            .env_remove("NATS_URL")
            .env("AGORA_DATA_DIR", &data)
            // Never the machine's own NATS; tests that want events pass
            // their own NatsServer's URL in `env`.
            .env("AGORA_NATS_URL", agora_testkit::UNREACHABLE_NATS)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        let mut addrs = BTreeMap::new();
        for (name, _) in DEFAULT_PORTS {
            let addr = format!("127.0.0.1:{}", agora_testkit::free_port()?);
            command.env(format!("AGORA_{}__LISTEN_ADDR", name.to_uppercase()), &addr);
            addrs.insert(name, addr);
        }
        // Never the default 8080: tests run side by side.
        let gateway = format!("127.0.0.1:{}", agora_testkit::free_port()?);
        command.env("AGORA_GATEWAY__LISTEN_ADDR", &gateway);
        addrs.insert("gateway", gateway);
        for (key, value) in env {
            command.env(key, value);
        }
        if let Some(log) = &log {
            command.stderr(std::fs::File::create(log)?);
        }
        let started = DEFAULT_PORTS
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| targets.contains(&"all") || targets.contains(name))
            .collect();
        let process = Self {
            addrs,
            data,
            log,
            started,
            child: command.spawn()?,
            _dir: dir,
        };
        let (serving, table) = process.health(60)?;
        anyhow::ensure!(serving, "not healthy:\n{table}");
        Ok(process)
    }

    /// The process id of the running `agora`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process has logged so far, when started with
    /// [`AgoraProcess::start_logged`] (empty otherwise).
    pub fn logs(&self) -> anyhow::Result<String> {
        match &self.log {
            Some(log) => Ok(String::from_utf8_lossy(&std::fs::read(log)?).into_owned()),
            None => Ok(String::new()),
        }
    }

    /// The address of a service.
    pub fn addr(&self, service: &str) -> String {
        self.addrs.get(service).cloned().unwrap_or_default()
    }

    /// `agora health --wait <secs>` for the started services: (all serving, table).
    pub fn health(&self, wait_secs: u64) -> anyhow::Result<(bool, String)> {
        let output = Command::new(AGORA)
            .args(["health", "--wait", &wait_secs.to_string()])
            .args(
                self.started
                    .iter()
                    .map(|name| format!("{name}={}", self.addr(name))),
            )
            .output()?;
        Ok((output.status.success(), String::from_utf8(output.stdout)?))
    }

    /// Runs `agora seed` against this process: (success, stdout).
    pub fn seed(&self, admin_email: &str) -> anyhow::Result<(bool, String)> {
        let output = Command::new(AGORA)
            .arg("seed")
            .args(["--admin-email", admin_email])
            .arg("--users")
            .arg(format!("http://{}", self.addr("users")))
            .arg("--catalog")
            .arg(format!("http://{}", self.addr("catalog")))
            .arg("--inventory")
            .arg(format!("http://{}", self.addr("inventory")))
            .arg("--data-dir")
            .arg(&self.data)
            .output()?;
        let stdout = String::from_utf8(output.stdout)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        Ok((output.status.success(), format!("{stdout}{stderr}")))
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

impl Drop for AgoraProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process, from `/proc/<pid>/status`.
pub struct Memory {
    /// `VmRSS`: now.
    pub rss_kib: u64,
    /// `VmHWM`: the peak since it started.
    pub peak_kib: u64,
}

/// The resident memory of process `pid` now and at its peak.
pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok(Memory {
        rss_kib: field("VmRSS:")?,
        peak_kib: field("VmHWM:")?,
    })
}
