//! A PostgreSQL cluster of a test's own, for tests that stop the database.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};

/// A private PostgreSQL cluster (initdb + pg_ctl) on a free port, stopped
/// and deleted when dropped. Running as root, it runs as the `postgres` user,
/// since PostgreSQL refuses to run as root.
pub struct PrivatePostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl PrivatePostgres {
    /// Creates and starts a cluster with trust authentication.
    pub fn start() -> anyhow::Result<Self> {
        let bin = find_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("agora-pg-").tempdir()?;
        let port = crate::free_port()?;
        let pg = Self { bin, dir, port };
        if running_as_root() {
            run(Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(pg.dir.path()))?;
        }
        pg.pg_command("initdb", |cmd| {
            cmd.arg("-D").arg(pg.data_dir()).args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
            ]);
        })?;
        pg.start_again()?;
        Ok(pg)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`, like a crash).
    pub fn stop(&self) -> anyhow::Result<()> {
        self.pg_command("pg_ctl", |cmd| {
            cmd.arg("-D")
                .arg(self.data_dir())
                .args(["-m", "immediate", "-w", "stop"]);
        })
    }

    /// Starts the (stopped) server again on the same port and data.
    pub fn start_again(&self) -> anyhow::Result<()> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories='{}' -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        self.pg_command("pg_ctl", |cmd| {
            cmd.arg("-D")
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.dir.path().join("log"))
                .arg("-o")
                .arg(&options)
                .args(["-w", "start"]);
        })
    }

    fn pg_command(&self, tool: &str, args: impl FnOnce(&mut Command)) -> anyhow::Result<()> {
        let program = self.bin.join(tool);
        let mut cmd = if running_as_root() {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(&program);
            cmd
        } else {
            Command::new(&program)
        };
        args(&mut cmd);
        run(&mut cmd)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let output = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !output.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The newest `/usr/lib/postgresql/<version>/bin`, or `AGORA_PG_BIN`.
fn find_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("AGORA_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context(
            "PostgreSQL server binaries not found under /usr/lib/postgresql (set AGORA_PG_BIN)",
        )?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .context("no PostgreSQL version with initdb under /usr/lib/postgresql")
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}
