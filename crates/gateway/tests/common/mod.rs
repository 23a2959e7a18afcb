//! A gateway in front of real users and catalog services on loopback, and
//! a raw HTTP/1.1 client that sends exactly the bytes a test gives it.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use agora_gateway::Gateway;
use agora_platform::config::Config;
use agora_platform::shutdown::CancellationToken;
use agora_platform_client::Discovery;
use agora_testkit::{Backend, TestEnv, TestServer};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tonic::transport::Channel;

/// Users and catalog behind a gateway.
pub struct Mesh {
    /// Keys and tokens.
    pub env: TestEnv,
    /// Users and catalog on one port.
    pub backends: TestServer,
    /// The gateway's address.
    pub gateway: SocketAddr,
    /// Stops the gateway.
    pub stop: CancellationToken,
    /// The gateway's task.
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Mesh {
    /// Starts users and catalog, then a gateway whose configuration
    /// `tweak` may change; waits until the gateway sees catalog serving.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        let mesh = Self::start_tls(tweak).await?;
        mesh.wait_serving("agora.catalog.v1.CatalogService").await?;
        Ok(mesh)
    }

    /// [`Mesh::start`] without waiting through a cleartext channel (the
    /// gateway may speak TLS).
    pub async fn start_tls(tweak: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        let mut env = TestEnv::per_service(Backend::Sqlite).await?;
        let backends = TestServer::start(vec![
            agora_users::hosted(&env.config).await?,
            agora_catalog::hosted(&env.config).await?,
        ])
        .await?;
        let addr = format!("http://{}", backends.addr());
        env.config.users.addresses = vec![addr.clone()];
        env.config.catalog.addresses = vec![addr];
        env.config.gateway.listen_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        env.config.gateway.rate_limit_per_sec = 0;
        tweak(&mut env.config);
        let gateway = Gateway::bind(&env.config, Discovery::Static).await?;
        let addr = gateway.local_addr();
        let stop = CancellationToken::new();
        let task = tokio::spawn(gateway.run_until_stopped(stop.clone()));
        Ok(Self {
            env,
            backends,
            gateway: addr,
            stop,
            task,
        })
    }

    /// A gRPC channel to the gateway.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(format!("http://{}", self.gateway))?
            .connect()
            .await?)
    }

    /// Waits (10 s at most) until the gateway's health says `service` serves.
    pub async fn wait_serving(&self, service: &str) -> anyhow::Result<()> {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::health_client::HealthClient;
        let mut client = HealthClient::new(self.channel().await?);
        for _ in 0..100 {
            let status = client
                .check(HealthCheckRequest {
                    service: service.to_owned(),
                })
                .await
                .map(|r| r.into_inner().status);
            if status.ok() == Some(ServingStatus::Serving as i32) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("{service} never became SERVING at the gateway")
    }

    /// Stops the gateway and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await??;
        self.backends.stop().await
    }
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// Header (lowercase name, value) pairs in order.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `request` (a whole HTTP/1.1 request, `Connection: close` added by
/// the caller) and reads the response to the end (10 s at most).
pub async fn raw(addr: SocketAddr, request: &[u8]) -> anyhow::Result<RawResponse> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes)).await??;
    parse_response(&bytes)
}

/// An HTTP/1.1 POST with the given headers and body, closing the connection.
pub fn post(path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut request = format!("POST {path} HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// An HTTP/1.1 request without a body.
pub fn bodyless(method: &str, path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

fn parse_response(bytes: &[u8]) -> anyhow::Result<RawResponse> {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no end of head in {:?}", String::from_utf8_lossy(bytes)))?;
    let head = std::str::from_utf8(&bytes[..end])?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("bad status line {status_line:?}"))?
        .parse()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &bytes[end + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_vec()
    };
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = bytes
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow::anyhow!("truncated chunk size"))?;
        let size_text = std::str::from_utf8(&bytes[..line_end])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
        bytes = &bytes[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        anyhow::ensure!(bytes.len() >= size + 2, "truncated chunk");
        body.extend_from_slice(&bytes[..size]);
        bytes = &bytes[size + 2..];
    }
}

/// A gRPC frame: flag, big-endian length, message.
pub fn frame(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![flags];
    bytes.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    bytes.extend_from_slice(payload);
    bytes
}

/// Splits a body into its frames: (flags, payload).
pub fn frames(mut body: &[u8]) -> anyhow::Result<Vec<(u8, Vec<u8>)>> {
    let mut frames = Vec::new();
    while !body.is_empty() {
        anyhow::ensure!(body.len() >= 5, "truncated frame header");
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        anyhow::ensure!(body.len() >= 5 + len, "truncated frame");
        frames.push((body[0], body[5..5 + len].to_vec()));
        body = &body[5 + len..];
    }
    Ok(frames)
}
