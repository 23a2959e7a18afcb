//! External clients nobody here wrote, against the gateway of `agora serve
//! all`: grpcurl and `buf curl` (list, describe, call over gRPC, grpc-web and
//! Connect), curl with Connect JSON, grpc-web-text and grpc-web exchanges
//! checked byte for byte, CORS preflights from an allowed and a refused
//! browser origin, connect-es (`tests/clients/node`) over its grpc-web,
//! Connect and gRPC transports, and Python grpcio (`tests/clients/python`)
//! over native gRPC.
//!
//! `just tools` installs every client; a missing one fails the test with that
//! advice, never skips it. Each step runs even when an earlier one failed
//! (falling back to the services' own ports for what later steps need), and
//! the test fails listing every failed step with its command and output.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agora_testkit::workspace_root;
use common::AgoraProcess;
use serde_json::Value;

/// The browser origin the gateway is configured to allow.
const ALLOWED_ORIGIN: &str = "http://localhost:5173";
/// A browser origin it is not.
const REFUSED_ORIGIN: &str = "http://evil.example";
const ADMIN: &str = "admin@agora.localhost";
const PASSWORD: &str = "correct horse battery";
/// The longest any one external command may take: every client also has a
/// deadline of its own, this only turns a hang into a failure.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The six services of the contract, as reflection lists them.
const AGORA_SERVICES: [&str; 6] = [
    "agora.users.v1.UserService",
    "agora.catalog.v1.CatalogService",
    "agora.inventory.v1.InventoryService",
    "agora.payments.v1.PaymentService",
    "agora.orders.v1.OrderService",
    "agora.notifications.v1.NotificationService",
];

// The grpc-web exchanges checked byte for byte. Expected bytes are written
// out by hand from the protobuf encoding and the grpc-web framing (flag
// byte, 4-byte big-endian length, payload; 0x80 marks the trailer frame),
// not computed by code that could share the gateway's mistakes.

/// `ListProducts{query: "zzz-no-such-product"}` (field 3, tag 0x1a, 19 bytes)
/// in one data frame, base64: matches nothing, so the answer is
/// deterministic.
const NO_MATCH_REQUEST_TEXT: &str = "AAAAABUaE3p6ei1uby1zdWNoLXByb2R1Y3Q=";
/// The same request frame, binary.
const NO_MATCH_REQUEST: &[u8] = b"\x00\x00\x00\x00\x15\x1a\x13zzz-no-such-product";
/// The reply: an empty `ListProducts` response (a zero-length data frame),
/// then the trailer frame holding the backend's only trailer,
/// `grpc-status:0\r\n` (15 bytes). In text mode each frame is base64-encoded
/// on its own, padding included.
const NO_MATCH_REPLY_TEXT: &str = "AAAAAAA=gAAAAA9ncnBjLXN0YXR1czowDQo=";
/// The reply in binary mode.
const NO_MATCH_REPLY: &[u8] = b"\x00\x00\x00\x00\x00\x80\x00\x00\x00\x0fgrpc-status:0\r\n";
/// `grpc.health.v1.HealthCheckRequest{}`: one empty data frame, base64.
const HEALTH_REQUEST_TEXT: &str = "AAAAAAA=";
/// `HealthCheckResponse{status: SERVING}` (field 1 = 1: `08 01`), then the
/// trailer frame `grpc-status:0\r\n`, each frame base64-encoded on its own.
const HEALTH_REPLY_TEXT: &str = "AAAAAAIIAQ==gAAAAA9ncnBjLXN0YXR1czowDQo=";

/// The clients, as `just tools` installs them.
struct Tools {
    grpcurl: PathBuf,
    buf: PathBuf,
    python: PathBuf,
    node_dir: PathBuf,
    python_client: PathBuf,
}

impl Tools {
    /// Finds every client, or fails naming the first one missing.
    fn find() -> anyhow::Result<Self> {
        let root = workspace_root();
        let node_dir = root.join("tests/clients/node");
        let tools = Self {
            grpcurl: root.join(".venv/bin/grpcurl"),
            buf: root.join(".tools/node_modules/.bin/buf"),
            python: root.join(".venv/bin/python"),
            python_client: root.join("tests/clients/python/grpc_client.py"),
            node_dir,
        };
        for (what, path) in [
            ("grpcurl", tools.grpcurl.clone()),
            ("buf", tools.buf.clone()),
            ("the project's Python", tools.python.clone()),
            (
                "protoc-gen-es",
                tools.node_dir.join("node_modules/.bin/protoc-gen-es"),
            ),
            (
                "@connectrpc/connect-node",
                tools
                    .node_dir
                    .join("node_modules/@connectrpc/connect-node/package.json"),
            ),
        ] {
            anyhow::ensure!(
                path.exists(),
                "{what} ({}) is missing: run `just tools`",
                path.display()
            );
        }
        for program in ["node", "curl"] {
            let found = Command::new(program)
                .arg("--version")
                .output()
                .is_ok_and(|output| output.status.success());
            anyhow::ensure!(
                found,
                "`{program}` is not on PATH: install it (Debian: apt-get install nodejs npm curl), \
                 then run `just tools`"
            );
        }
        let modules = run(Command::new(&tools.python).args([
            "-c",
            "import grpc, grpc_tools.protoc, grpc_status.rpc_status, google.rpc.error_details_pb2",
        ]))?;
        anyhow::ensure!(
            modules.ok(),
            "grpcio, grpcio-tools or grpcio-status is missing from .venv/: run `just tools`\n{}",
            modules.report()
        );
        Ok(tools)
    }
}

/// One external command's run, kept whole for the failure report.
struct Ran {
    shown: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// The command line, exit status and output.
    fn report(&self) -> String {
        format!(
            "$ {}\nexit: {}\n--- stdout\n{}\n--- stderr\n{}",
            self.shown,
            self.code
                .map_or_else(|| "killed".to_owned(), |code| code.to_string()),
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }

    /// Fails with the report unless the command exited 0.
    fn success(self) -> anyhow::Result<Self> {
        anyhow::ensure!(self.ok(), "command failed\n{}", self.report());
        Ok(self)
    }

    /// Fails with the report unless stdout holds every one of `needles`.
    fn stdout_has(&self, needles: &[&str]) -> anyhow::Result<()> {
        for needle in needles {
            anyhow::ensure!(
                self.stdout.contains(needle),
                "stdout lacks {needle:?}\n{}",
                self.report()
            );
        }
        Ok(())
    }

    /// Stdout as one JSON document.
    fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.stdout)
            .map_err(|error| anyhow::anyhow!("stdout is not JSON ({error})\n{}", self.report()))
    }
}

/// Runs `command` to its end (killed after [`COMMAND_TIMEOUT`]), printing
/// the command line.
fn run(command: &mut Command) -> anyhow::Result<Ran> {
    let envs: Vec<String> = command
        .get_envs()
        .filter_map(|(key, value)| {
            Some(format!(
                "{}={}",
                key.to_string_lossy(),
                value?.to_string_lossy()
            ))
        })
        .collect();
    let args: Vec<String> = command
        .get_args()
        .map(|arg| shell_quote(&arg.to_string_lossy()))
        .collect();
    let shown = [
        envs,
        vec![command.get_program().to_string_lossy().into_owned()],
        args,
    ]
    .concat()
    .join(" ");
    println!("$ {shown}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| anyhow::anyhow!("cannot run {shown}: {error}"))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let code = loop {
        if let Some(status) = child.try_wait()? {
            break status.code();
        }
        if Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let text = |reader: std::thread::JoinHandle<Vec<u8>>| {
        String::from_utf8_lossy(&reader.join().unwrap_or_default()).into_owned()
    };
    Ok(Ran {
        shown,
        code,
        stdout: text(stdout),
        stderr: text(stderr),
    })
}

/// Reads a child's pipe to its end on a thread of its own, so that neither
/// pipe can fill up and stall the child.
fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+".contains(c))
    {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// An HTTP exchange made with curl.
struct Reply {
    ran: Ran,
    status: u16,
    /// Header names lowercased, in arrival order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    /// Every value of header `name`, joined with ", " (as HTTP allows).
    fn header(&self, name: &str) -> Option<String> {
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    }

    /// The comma-separated items of header `name`, lowercased.
    fn header_items(&self, name: &str) -> Vec<String> {
        self.header(name)
            .unwrap_or_default()
            .split(',')
            .map(|item| item.trim().to_ascii_lowercase())
            .filter(|item| !item.is_empty())
            .collect()
    }

    /// The exchange: command, status line, headers and body (escaped).
    fn report(&self) -> String {
        let headers: String = self
            .headers
            .iter()
            .map(|(key, value)| format!("{key}: {value}\n"))
            .collect();
        format!(
            "$ {}\nexit: {:?}\nstderr: {}\nHTTP {}\n{headers}\nbody ({} bytes): {}",
            self.ran.shown,
            self.ran.code,
            self.ran.stderr.trim_end(),
            self.status,
            self.body.len(),
            self.body.escape_ascii()
        )
    }

    fn ensure(&self, condition: bool, what: &str) -> anyhow::Result<()> {
        anyhow::ensure!(condition, "{what}\n{}", self.report());
        Ok(())
    }

    fn ensure_status(&self, status: u16) -> anyhow::Result<()> {
        self.ensure(
            self.status == status,
            &format!("expected HTTP {status}, got {}", self.status),
        )
    }

    /// The body as JSON.
    fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_slice(&self.body)
            .map_err(|error| anyhow::anyhow!("body is not JSON ({error})\n{}", self.report()))
    }
}

/// `curl` over HTTP/1.1 (as a browser's fetch to a plain-HTTP origin):
/// `method` to `url` with `headers` and `body`.
fn curl(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> anyhow::Result<Reply> {
    let dir = tempfile::tempdir()?;
    let head_file = dir.path().join("head");
    let body_file = dir.path().join("body");
    let mut command = Command::new("curl");
    command
        .args(["-sS", "--http1.1", "--max-time", "20", "-X", method])
        .arg("-D")
        .arg(&head_file)
        .arg("-o")
        .arg(&body_file);
    for (name, value) in headers {
        command.args(["-H", &format!("{name}: {value}")]);
    }
    if let Some(body) = body {
        let request_file = dir.path().join("request");
        std::fs::write(&request_file, body)?;
        command
            .arg("--data-binary")
            .arg(format!("@{}", request_file.display()));
    }
    command.arg(url);
    let ran = run(&mut command)?;
    let head = std::fs::read_to_string(&head_file).unwrap_or_default();
    // The last response head (after any 100 Continue).
    let last = head
        .split("\r\n\r\n")
        .filter(|block| block.starts_with("HTTP/"))
        .last()
        .unwrap_or_default();
    let mut lines = last.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let body = std::fs::read(&body_file).unwrap_or_default();
    anyhow::ensure!(ran.ok(), "curl failed\n{}", ran.report());
    Ok(Reply {
        ran,
        status,
        headers,
        body,
    })
}

/// A Connect unary call with the JSON codec.
fn connect_json(
    base: &str,
    method: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Reply> {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    curl(
        "POST",
        &format!("{base}/{method}"),
        &all,
        Some(body.as_bytes()),
    )
}

/// A Connect unary call that must fail with HTTP `status` and a JSON error
/// body of `code` with a message: the reply and that body.
fn connect_error(
    base: &str,
    method: &str,
    body: &str,
    headers: &[(&str, &str)],
    (status, code): (u16, &str),
) -> anyhow::Result<(Reply, Value)> {
    let mut all = vec![("connect-protocol-version", "1")];
    all.extend_from_slice(headers);
    let reply = connect_json(base, method, body, &all)?;
    reply.ensure_status(status)?;
    reply.ensure(
        reply
            .header("content-type")
            .is_some_and(|value| value.starts_with("application/json")),
        "an error's content-type is not application/json",
    )?;
    let json = reply.json()?;
    reply.ensure(
        json["code"] == code,
        &format!("expected \"code\": \"{code}\""),
    )?;
    reply.ensure(
        json["message"]
            .as_str()
            .is_some_and(|message| !message.is_empty()),
        "no message",
    )?;
    Ok((reply, json))
}

/// The steps that failed, each with its command and output.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    /// Runs one step, recording its failure instead of stopping.
    fn step<T>(&mut self, name: &str, step: impl FnOnce() -> anyhow::Result<T>) -> Option<T> {
        println!("\n== {name}");
        match step() {
            Ok(value) => {
                println!("ok: {name}");
                Some(value)
            }
            Err(error) => {
                println!("FAILED: {name}: {error:#}");
                self.0.push(format!("{name}: {error:#}"));
                None
            }
        }
    }
}

/// A user signed up and logged in: (user id, access token), from
/// `Authenticate`'s JSON as grpcurl prints it.
fn sign_up(tools: &Tools, addr: &str, email: &str) -> anyhow::Result<(String, String)> {
    let created = run(Command::new(&tools.grpcurl).args([
        "-plaintext",
        "-max-time",
        "20",
        "-d",
        &serde_json::json!({"email": email, "name": "Grace Hopper", "password": PASSWORD})
            .to_string(),
        addr,
        "agora.users.v1.UserService/CreateUser",
    ]))?
    .success()?;
    created.stdout_has(&[email, "\"USER_STATUS_"])?;
    let auth = run(Command::new(&tools.grpcurl).args([
        "-plaintext",
        "-max-time",
        "20",
        "-d",
        &serde_json::json!({"email": email, "password": PASSWORD}).to_string(),
        addr,
        "agora.users.v1.UserService/Authenticate",
    ]))?
    .success()?;
    let json = auth.json()?;
    let token = json["accessToken"].as_str().unwrap_or_default().to_owned();
    let user_id = json["user"]["id"].as_str().unwrap_or_default().to_owned();
    anyhow::ensure!(
        !token.is_empty() && !user_id.is_empty(),
        "no accessToken or user.id\n{}",
        auth.report()
    );
    Ok((user_id, token))
}

/// The id of the Ferris Mug (40 in stock after `agora seed`), found by
/// grpcurl's text search at `addr`.
fn mug_id(tools: &Tools, addr: &str) -> anyhow::Result<String> {
    let found = run(Command::new(&tools.grpcurl).args([
        "-plaintext",
        "-max-time",
        "20",
        "-d",
        r#"{"query": "ferris mug"}"#,
        addr,
        "agora.catalog.v1.CatalogService/ListProducts",
    ]))?
    .success()?;
    let json = found.json()?;
    let product = &json["products"][0];
    anyhow::ensure!(
        product["name"] == "Ferris Mug",
        "the first match is not the Ferris Mug\n{}",
        found.report()
    );
    Ok(product["id"].as_str().unwrap_or_default().to_owned())
}

/// Waits (up to 30 s) for the gateway's `/readyz` to answer 200.
fn wait_until_ready(gateway: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = curl("GET", &format!("http://{gateway}/readyz"), &[], None);
        match reply {
            Ok(reply) if reply.status == 200 => return Ok(()),
            Ok(reply) if Instant::now() > deadline => {
                anyhow::bail!("the gateway is not ready after 30 s\n{}", reply.report())
            }
            Err(error) if Instant::now() > deadline => anyhow::bail!(
                "the gateway never answered on {gateway} (does `agora serve all` start it, \
                 on AGORA_GATEWAY__LISTEN_ADDR?): {error:#}"
            ),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

#[test]
fn external_clients_talk_to_the_gateway() -> anyhow::Result<()> {
    let started = Instant::now();
    let tools = Tools::find()?;

    // Generated ES code for the Node client, made while the mesh starts, in
    // a folder of this run's own (under the gitignored gen/, so that its
    // imports resolve to the client's node_modules).
    let generated_root = tools.node_dir.join("gen");
    std::fs::create_dir_all(&generated_root)?;
    let generated = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&generated_root)?;
    let es_code = generated.path().join("gen");
    let generate = {
        let mut command = Command::new(&tools.buf);
        command
            .args(["generate", "--template", "buf.gen.yaml", "--output"])
            .arg(generated.path())
            .arg(workspace_root().join("proto"))
            .current_dir(&tools.node_dir);
        std::thread::spawn(move || run(&mut command))
    };

    let admin_emails = format!("[\"{ADMIN}\"]");
    let cors_origins = format!("[\"{ALLOWED_ORIGIN}\"]");
    let agora = AgoraProcess::start(
        &["all"],
        &[
            ("AGORA_AUTH__ADMIN_EMAILS", &admin_emails),
            ("AGORA_GATEWAY__CORS_ALLOWED_ORIGINS", &cors_origins),
        ],
    )?;
    let gateway = agora.addr("gateway");
    let base = format!("http://{gateway}");
    wait_until_ready(&gateway)?;
    let (seeded, output) = agora.seed(ADMIN)?;
    anyhow::ensure!(seeded, "agora seed failed:\n{output}");

    let mut failures = Failures::default();
    failures.step("GET /healthz", || {
        curl("GET", &format!("{base}/healthz"), &[], None)?.ensure_status(200)
    });

    // grpcurl (reflection v1alpha only): list, describe, call.
    failures.step("grpcurl list", || {
        let mut expected = AGORA_SERVICES.to_vec();
        expected.extend([
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        ]);
        run(Command::new(&tools.grpcurl).args(["-plaintext", "-max-time", "20", &gateway, "list"]))?
            .success()?
            .stdout_has(&expected)
    });
    for (symbol, expected) in [
        (
            "agora.orders.v1.OrderService",
            [
                "agora.orders.v1.OrderService is a service:",
                "rpc WatchOrder ( .agora.orders.v1.WatchOrderRequest ) returns ( stream .agora.orders.v1.WatchOrderResponse )",
            ],
        ),
        (
            "agora.orders.v1.PlaceOrderRequest",
            [
                "agora.orders.v1.PlaceOrderRequest is a message:",
                // With its length limit: reflection serves the whole contract.
                "string card_number = 3 [(.agora.common.v1.limits) = { max_bytes:64 }];",
            ],
        ),
    ] {
        failures.step(&format!("grpcurl describe {symbol}"), || {
            run(Command::new(&tools.grpcurl).args([
                "-plaintext",
                "-max-time",
                "20",
                &gateway,
                "describe",
                symbol,
            ]))?
            .success()?
            .stdout_has(&expected)
        });
    }
    failures.step("grpcurl call grpc.health.v1.Health/Check", || {
        run(Command::new(&tools.grpcurl).args([
            "-plaintext",
            "-max-time",
            "20",
            "-d",
            "{}",
            &gateway,
            "grpc.health.v1.Health/Check",
        ]))?
        .success()?
        .stdout_has(&["\"status\": \"SERVING\""])
    });
    let email = format!("grace-{}@example.com", std::process::id());
    let (_user_id, token) = match failures.step("grpcurl call CreateUser and Authenticate", || {
        sign_up(&tools, &gateway, &email)
    }) {
        Some(user) => user,
        // Later steps still need a user: sign up on the users service itself.
        None => sign_up(&tools, &agora.addr("users"), &format!("direct-{email}"))?,
    };
    let mug = match failures.step("grpcurl call ListProducts", || mug_id(&tools, &gateway)) {
        Some(id) => id,
        None => mug_id(&tools, &agora.addr("catalog"))?,
    };
    let authorization = format!("Bearer {token}");
    let reserve =
        serde_json::json!({"reservation_id": "from-outside", "items": [{"product_id": mug, "quantity": 1}]})
            .to_string();
    failures.step(
        "grpcurl call a service-level RPC (ReserveStock) as a user",
        || {
            let ran = run(Command::new(&tools.grpcurl).args([
                "-plaintext",
                "-max-time",
                "20",
                "-H",
                &format!("authorization: {authorization}"),
                "-d",
                &reserve,
                &gateway,
                "agora.inventory.v1.InventoryService/ReserveStock",
            ]))?;
            anyhow::ensure!(
                !ran.ok() && ran.stderr.contains("Code: PermissionDenied"),
                "expected PermissionDenied\n{}",
                ran.report()
            );
            Ok(())
        },
    );

    // buf curl: reflection v1 over gRPC; calls over each protocol.
    let buf_curl = |args: &[&str]| {
        let mut command = Command::new(&tools.buf);
        command.args(["curl", "--connect-timeout", "10"]).args(args);
        run(&mut command)
    };
    failures.step("buf curl --list-services (reflection v1)", || {
        let mut expected = AGORA_SERVICES.to_vec();
        expected.extend([
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]);
        buf_curl(&[
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            "--reflect-protocol",
            "grpc-v1",
            "--list-services",
            &base,
        ])?
        .success()?
        .stdout_has(&expected)
    });
    failures.step("buf curl --list-methods (reflection v1)", || {
        buf_curl(&[
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            "--reflect-protocol",
            "grpc-v1",
            "--list-methods",
            &base,
        ])?
        .success()?
        .stdout_has(&[
            "agora.orders.v1.OrderService/WatchOrder",
            "agora.catalog.v1.CatalogService/GetProduct",
            "agora.users.v1.UserService/Authenticate",
        ])
    });
    let get_mug = serde_json::json!({"id": mug}).to_string();
    let get_product = format!("{base}/agora.catalog.v1.CatalogService/GetProduct");
    let schema = workspace_root().join("proto").display().to_string();
    for (protocol, extra) in [
        // Native gRPC, schema by reflection v1 through the gateway.
        (
            "grpc",
            ["--http2-prior-knowledge", "--reflect-protocol", "grpc-v1"],
        ),
        // grpc-web and Connect over HTTP/1.1, as browsers: the schema from
        // proto/ (reflection is a bidi stream, out of reach of HTTP/1.1).
        ("grpcweb", ["--schema", &schema, "--reflect=false"]),
        ("connect", ["--schema", &schema, "--reflect=false"]),
    ] {
        failures.step(
            &format!("buf curl --protocol {protocol}: GetProduct"),
            || {
                let mut args = vec!["--protocol", protocol];
                args.extend(extra);
                args.extend(["-d", &get_mug, &get_product]);
                buf_curl(&args)?
                    .success()?
                    .stdout_has(&["\"name\": \"Ferris Mug\"", "\"amountMinor\": \"1299\""])
            },
        );
        failures.step(
            &format!("buf curl --protocol {protocol}: GetProduct of an unknown id"),
            || {
                let mut args = vec!["--protocol", protocol];
                args.extend(extra);
                args.extend([
                    "-d",
                    r#"{"id": "0190b3c2-0000-7000-8000-000000000000"}"#,
                    &get_product,
                ]);
                let ran = buf_curl(&args)?;
                anyhow::ensure!(
                    !ran.ok() && ran.stderr.contains("\"code\": \"not_found\""),
                    "expected not_found\n{}",
                    ran.report()
                );
                Ok(())
            },
        );
    }

    // curl with the Connect protocol, JSON codec.
    failures.step("curl Connect JSON: ListProducts", || {
        // As the gateway's own example: no connect-protocol-version, the
        // proto field name rather than its JSON name.
        let reply = connect_json(
            &base,
            "agora.catalog.v1.CatalogService/ListProducts",
            r#"{"page_size": 3}"#,
            &[],
        )?;
        reply.ensure_status(200)?;
        reply.ensure(
            reply
                .header("content-type")
                .is_some_and(|value| value.starts_with("application/json")),
            "content-type is not application/json",
        )?;
        let json = reply.json()?;
        let products = json["products"].as_array().cloned().unwrap_or_default();
        reply.ensure(products.len() == 3, "expected 3 products")?;
        reply.ensure(
            json["nextPageToken"]
                .as_str()
                .is_some_and(|token| !token.is_empty()),
            "no nextPageToken (8 products, pages of 3)",
        )?;
        // proto3 JSON: int64 as a string, lowerCamelCase names.
        reply.ensure(
            products
                .iter()
                .all(|product| product["price"]["amountMinor"].is_string()),
            "price.amountMinor is not a JSON string",
        )
    });
    failures.step(
        "curl Connect JSON: GetProduct of an unknown id is 404 not_found",
        || {
            connect_error(
                &base,
                "agora.catalog.v1.CatalogService/GetProduct",
                r#"{"id": "0190b3c2-0000-7000-8000-000000000000"}"#,
                &[],
                (404, "not_found"),
            )
        },
    );
    failures.step(
        "curl Connect JSON: GetProduct of a malformed id is 400 invalid_argument with a BadRequest",
        || {
            let (reply, json) = connect_error(
                &base,
                "agora.catalog.v1.CatalogService/GetProduct",
                r#"{"id": "not-a-product-id"}"#,
                &[],
                (400, "invalid_argument"),
            )?;
            // The BadRequest travels as a detail: its full name, unpadded base64.
            let detail = &json["details"][0];
            let value = detail["value"].as_str().unwrap_or_default();
            reply.ensure(
                detail["type"] == "google.rpc.BadRequest"
                    && !value.is_empty()
                    && !value.ends_with('='),
                "expected a google.rpc.BadRequest detail in unpadded base64",
            )
        },
    );
    failures.step(
        "curl Connect JSON: a user RPC without a token is 401 unauthenticated",
        || {
            connect_error(
                &base,
                "agora.orders.v1.OrderService/ListOrders",
                "{}",
                &[],
                (401, "unauthenticated"),
            )
        },
    );
    failures.step(
        "curl Connect JSON: a service-level RPC is 403 permission_denied",
        || {
            connect_error(
                &base,
                "agora.inventory.v1.InventoryService/ReserveStock",
                &reserve,
                &[("authorization", &authorization)],
                (403, "permission_denied"),
            )
        },
    );
    failures.step("curl Connect: an unsupported codec is 415", || {
        curl(
            "POST",
            &format!("{base}/agora.catalog.v1.CatalogService/ListProducts"),
            &[("content-type", "application/xml")],
            Some(b"<page_size>3</page_size>"),
        )?
        .ensure_status(415)
    });

    // grpc-web, text and binary, checked byte for byte.
    let grpc_web_text = |method: &str, body: &str| {
        curl(
            "POST",
            &format!("{base}/{method}"),
            &[
                ("content-type", "application/grpc-web-text"),
                ("accept", "application/grpc-web-text"),
                ("x-grpc-web", "1"),
            ],
            Some(body.as_bytes()),
        )
    };
    let text_reply = |reply: &Reply, expected: &str| -> anyhow::Result<()> {
        reply.ensure_status(200)?;
        reply.ensure(
            reply
                .header("content-type")
                .is_some_and(|value| value.starts_with("application/grpc-web-text")),
            "content-type is not application/grpc-web-text(+proto)",
        )?;
        reply.ensure(
            reply.body == expected.as_bytes(),
            &format!("body differs from the expected {expected:?}"),
        )
    };
    failures.step(
        "grpc-web-text: ListProducts matching nothing, byte for byte",
        || {
            let reply = grpc_web_text(
                "agora.catalog.v1.CatalogService/ListProducts",
                NO_MATCH_REQUEST_TEXT,
            )?;
            text_reply(&reply, NO_MATCH_REPLY_TEXT)
        },
    );
    failures.step(
        "grpc-web-text: grpc.health.v1.Health/Check, byte for byte",
        || {
            let reply = grpc_web_text("grpc.health.v1.Health/Check", HEALTH_REQUEST_TEXT)?;
            text_reply(&reply, HEALTH_REPLY_TEXT)
        },
    );
    failures.step("grpc-web-text: an error is a trailers-only reply", || {
        // GetProduct{id: "0190b3c2-0000-7000-8000-000000000000"}: field 1,
        // 36 bytes, in one data frame.
        let reply = grpc_web_text(
            "agora.catalog.v1.CatalogService/GetProduct",
            "AAAAACYKJDAxOTBiM2MyLTAwMDAtNzAwMC04MDAwLTAwMDAwMDAwMDAwMA==",
        )?;
        reply.ensure_status(200)?;
        reply.ensure(
            reply.header("grpc-status").as_deref() == Some("5"),
            "expected the header grpc-status: 5 (NOT_FOUND)",
        )?;
        reply.ensure(
            reply
                .header("grpc-message")
                .is_some_and(|message| message.contains("not")),
            "expected a grpc-message header",
        )?;
        reply.ensure(
            reply.body.is_empty(),
            "a trailers-only reply must have an empty body",
        )
    });
    failures.step(
        "grpc-web (binary): ListProducts matching nothing, byte for byte",
        || {
            let reply = curl(
                "POST",
                &format!("{base}/agora.catalog.v1.CatalogService/ListProducts"),
                &[
                    ("content-type", "application/grpc-web+proto"),
                    ("x-grpc-web", "1"),
                ],
                Some(NO_MATCH_REQUEST),
            )?;
            reply.ensure_status(200)?;
            reply.ensure(
                reply.header("content-type").is_some_and(|value| {
                    value.starts_with("application/grpc-web")
                        && !value.starts_with("application/grpc-web-text")
                }),
                "content-type is not application/grpc-web(+proto)",
            )?;
            reply.ensure(
                reply.body == NO_MATCH_REPLY,
                &format!(
                    "body differs from the expected {}",
                    NO_MATCH_REPLY.escape_ascii()
                ),
            )
        },
    );

    // CORS, as a browser on another origin asks.
    let requested_headers = [
        "content-type",
        "x-grpc-web",
        "x-user-agent",
        "grpc-timeout",
        "authorization",
        "connect-protocol-version",
        "connect-timeout-ms",
        // Custom metadata a browser client sends.
        "x-request-id",
    ];
    let preflight = |origin: &str| {
        curl(
            "OPTIONS",
            &format!("{base}/agora.orders.v1.OrderService/WatchOrder"),
            &[
                ("origin", origin),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    &requested_headers.join(","),
                ),
            ],
            None,
        )
    };
    failures.step("CORS preflight from an allowed origin", || {
        let reply = preflight(ALLOWED_ORIGIN)?;
        reply.ensure_status(204)?;
        reply.ensure(
            reply.header("access-control-allow-origin").as_deref() == Some(ALLOWED_ORIGIN),
            &format!("access-control-allow-origin is not {ALLOWED_ORIGIN}"),
        )?;
        reply.ensure(
            reply
                .header_items("access-control-allow-methods")
                .contains(&"post".to_owned()),
            "access-control-allow-methods lacks POST",
        )?;
        let allowed = reply.header_items("access-control-allow-headers");
        for header in requested_headers {
            reply.ensure(
                allowed.contains(&header.to_owned()),
                &format!("access-control-allow-headers lacks {header}"),
            )?;
        }
        reply.ensure(
            reply.header("access-control-max-age").is_some(),
            "no access-control-max-age",
        )?;
        reply.ensure(
            reply.header_items("vary").contains(&"origin".to_owned()),
            "vary lacks Origin",
        )
    });
    failures.step(
        "CORS: a grpc-web call from an allowed origin exposes the gRPC headers",
        || {
            let reply = curl(
                "POST",
                &format!("{base}/agora.catalog.v1.CatalogService/ListProducts"),
                &[
                    ("origin", ALLOWED_ORIGIN),
                    ("content-type", "application/grpc-web+proto"),
                    ("x-grpc-web", "1"),
                ],
                Some(NO_MATCH_REQUEST),
            )?;
            reply.ensure_status(200)?;
            reply.ensure(
                reply.header("access-control-allow-origin").as_deref() == Some(ALLOWED_ORIGIN),
                &format!("access-control-allow-origin is not {ALLOWED_ORIGIN}"),
            )?;
            let exposed = reply.header_items("access-control-expose-headers");
            for header in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
                reply.ensure(
                    exposed.contains(&header.to_owned()),
                    &format!("access-control-expose-headers lacks {header}"),
                )?;
            }
            reply.ensure(
                reply.header_items("vary").contains(&"origin".to_owned()),
                "vary lacks Origin",
            )
        },
    );
    failures.step("CORS: a refused origin gets no allow-origin", || {
        let reply = preflight(REFUSED_ORIGIN)?;
        reply.ensure(
            reply.header("access-control-allow-origin").is_none(),
            "a preflight from a refused origin got access-control-allow-origin",
        )?;
        let reply = curl(
            "POST",
            &format!("{base}/agora.catalog.v1.CatalogService/ListProducts"),
            &[
                ("origin", REFUSED_ORIGIN),
                ("content-type", "application/grpc-web+proto"),
            ],
            Some(NO_MATCH_REQUEST),
        )?;
        reply.ensure(
            reply.header("access-control-allow-origin").is_none(),
            "a call from a refused origin got access-control-allow-origin",
        )
    });

    // connect-es, then Python grpcio.
    failures.step(
        "node: connect-es over grpc-web, Connect (JSON, proto) and gRPC",
        || {
            let generated = generate
                .join()
                .map_err(|_| anyhow::anyhow!("the buf generate thread panicked"))??;
            generated.success()?;
            run(Command::new("node")
                .arg("client.mjs")
                .current_dir(&tools.node_dir)
                .env("AGORA_ES_GEN_DIR", &es_code)
                .env("AGORA_GATEWAY_URL", &base)
                .env("AGORA_USER_TOKEN", &token)
                .env("AGORA_PRODUCT_ID", &mug))?
            .success()?
            .stdout_has(&[
                "[grpc-web] WatchOrder(",
                "[connect-json] WatchOrder(",
                "[connect-proto] WatchOrder(",
                "[grpc] WatchOrder(",
                "node client: all checks passed",
            ])
        },
    );
    failures.step(
        "python: grpcio over native gRPC, BadRequest details",
        || {
            run(Command::new(&tools.python)
                .arg(&tools.python_client)
                .args(["--gateway", &gateway])
                .env("AGORA_USER_TOKEN", &token))?
            .success()?
            .stdout_has(&[
                "BadRequest fields ['email', 'name', 'password']",
                "python client: all checks passed",
            ])
        },
    );

    println!(
        "\nall steps done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    anyhow::ensure!(
        failures.0.is_empty(),
        "{} step(s) failed:\n\n{}",
        failures.0.len(),
        failures.0.join("\n\n")
    );
    Ok(())
}
