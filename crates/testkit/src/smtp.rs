//! A real SMTP server per test: aiosmtpd (installed into `.venv/` by the
//! justfile) delivering every message into a temp Maildir.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

/// An SMTP server on a free port, killed when dropped.
pub struct SmtpServer {
    port: u16,
    child: Child,
    maildir: tempfile::TempDir,
}

impl SmtpServer {
    /// Starts aiosmtpd with its Maildir handler and waits until it accepts.
    pub async fn start() -> anyhow::Result<Self> {
        let binary = std::env::var_os("AGORA_AIOSMTPD")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::workspace_root().join(".venv/bin/aiosmtpd"));
        let maildir = tempfile::tempdir()?;
        let port = crate::free_port()?;
        let child = Command::new(&binary)
            .args(["-n", "-l", &format!("127.0.0.1:{port}")])
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(maildir.path().join("mail"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (run `just test`, which installs it)",
                    binary.display()
                )
            })?;
        let mut server = Self {
            port,
            child,
            maildir,
        };
        for _ in 0..100 {
            if let Some(status) = server.child.try_wait()? {
                bail!("aiosmtpd exited during start-up: {status}");
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server.child.kill().await?;
        bail!("aiosmtpd did not accept connections within 5 s")
    }

    /// `smtp://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every message delivered so far, as raw RFC 5322 text.
    pub fn messages(&self) -> anyhow::Result<Vec<String>> {
        let new = self.maildir.path().join("mail/new");
        let mut messages = Vec::new();
        if new.exists() {
            for entry in std::fs::read_dir(new)? {
                messages.push(std::fs::read_to_string(entry?.path())?);
            }
        }
        Ok(messages)
    }
}
