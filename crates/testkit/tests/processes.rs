//! The private servers the test kit starts: nats-server and an SMTP server.

use agora_testkit::NatsServer;
use tokio::io::{AsyncBufReadExt as _, BufReader};

#[tokio::test]
async fn private_nats_server_runs_jetstream_on_its_own_port() -> anyhow::Result<()> {
    let mut nats = NatsServer::start().await?;
    assert_ne!(
        nats.port(),
        4222,
        "must not use the machine's shared server"
    );
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", nats.port())).await?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).await?;
    let info: serde_json::Value = serde_json::from_str(
        line.strip_prefix("INFO ")
            .ok_or_else(|| anyhow::anyhow!("no INFO: {line}"))?,
    )?;
    assert_eq!(info["jetstream"], true, "{info}");
    let version = info["version"].as_str().unwrap_or_default().to_owned();
    let minor: u32 = version.split('.').nth(1).unwrap_or("0").parse()?;
    assert!(
        version.starts_with("2.") && minor >= 12,
        "version {version}"
    );

    nats.kill().await?;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", nats.port()))
            .await
            .is_err()
    );
    Ok(())
}

#[tokio::test]
async fn private_smtp_server_accepts_connections() -> anyhow::Result<()> {
    let smtp = agora_testkit::SmtpServer::start().await?;
    let port: u16 = smtp.url().rsplit(':').next().unwrap_or_default().parse()?;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).await?;
    assert!(line.starts_with("220"), "{line}");
    assert!(smtp.messages()?.is_empty());
    Ok(())
}
