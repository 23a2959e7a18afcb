//! `agora events`: watch the domain events and manage dead letters.
//!
//! - `agora events tail [SUBJECT]` prints every event published from now on
//!   (default: all of `agora.>`) as one JSON object per line: subject,
//!   headers, and the payload decoded with the proto3 JSON mapping.
//! - `agora events dlq list` prints the dead letters (the events a consumer
//!   gave up on) with why; `agora events dlq replay --id SEQ` (or `--all`)
//!   publishes them again on their original subject.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agora_platform::config::{self, Config};
use agora_platform_events::bus::redact_url;
use agora_platform_events::{EventBus, dead_letters};
use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::{Map, Value, json};

/// Arguments of `agora events`.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// NATS server (default: `nats_url` of the configuration, i.e.
    /// AGORA_NATS_URL or nats://127.0.0.1:4222; `just events` points it at
    /// the server `just up` started).
    #[arg(long, env = "NATS_URL", global = true)]
    pub nats_url: Option<String>,
    /// TOML configuration file.
    #[arg(long, env = "AGORA_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: EventsCommand,
}

/// `agora events` commands.
#[derive(Debug, clap::Subcommand)]
pub enum EventsCommand {
    /// Print events as they are published, one JSON object per line.
    Tail {
        /// A subject or pattern, e.g. `agora.users.>` (default `agora.>`).
        subject: Option<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
    /// The dead-letter stream.
    Dlq {
        /// What to do with it.
        #[command(subcommand)]
        command: DlqCommand,
    },
}

/// `agora events dlq` commands.
#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first, as JSON lines.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Publish dead letters again on their original subject and remove them.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["id", "all"])))]
    Replay {
        /// The dead letter's sequence number (`seq` in `dlq list`).
        #[arg(long)]
        id: Option<u64>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
}

/// The most dead letters one `replay --all` handles; run it again for more.
const REPLAY_ALL_LIMIT: usize = 10_000;

/// The configuration (`config_file`, with `nats_url` over its NATS URL) and
/// a connection to NATS as a command-line tool, ready: what every CLI verb
/// that talks to NATS starts with. A tool reads and publishes; it never
/// creates or resizes streams.
pub async fn connect_tool(
    nats_url: Option<&str>,
    config_file: Option<&Path>,
) -> anyhow::Result<(Config, EventBus)> {
    let mut overrides = Map::new();
    if let Some(url) = nats_url {
        overrides.insert("nats_url".into(), json!(url));
    }
    let config = config::load(config_file, Value::Object(overrides))?;
    let bus = EventBus::connect_as_tool(&config.nats_url, "agora-cli").await?;
    tokio::time::timeout(Duration::from_secs(10), bus.wait_ready())
        .await
        .with_context(|| format!("NATS at {} is not reachable", redact_url(&config.nats_url)))?;
    Ok((config, bus))
}

/// Runs `agora events ...`.
pub async fn run(args: EventsArgs) -> anyhow::Result<()> {
    let (_, bus) = connect_tool(args.nats_url.as_deref(), args.config.as_deref()).await?;
    match args.command {
        EventsCommand::Tail { subject, count } => {
            tail(&bus, subject.as_deref().unwrap_or("agora.>"), count).await
        }
        EventsCommand::Dlq {
            command: DlqCommand::List { limit },
        } => {
            for letter in dead_letters::list(&bus, limit).await? {
                let mut line = describe(&letter.subject, &letter.headers, &letter.payload);
                line.insert("seq".into(), json!(letter.sequence));
                line.insert("consumer".into(), json!(letter.consumer));
                line.insert("durable".into(), json!(letter.durable));
                line.insert("deliveries".into(), json!(letter.deliveries));
                line.insert("reason".into(), json!(letter.reason));
                line.insert("origin".into(), json!(letter.origin));
                println!("{}", Value::Object(line));
            }
            Ok(())
        }
        EventsCommand::Dlq {
            command: DlqCommand::Replay { id, all },
        } => {
            let letters = match id {
                Some(id) if !all => match dead_letters::get(&bus, id).await? {
                    Some(letter) => vec![letter],
                    None => bail!("no dead letter {id} (see `agora events dlq list`)"),
                },
                _ => dead_letters::list(&bus, REPLAY_ALL_LIMIT).await?,
            };
            if letters.is_empty() {
                println!("no dead letters");
            }
            for letter in &letters {
                dead_letters::replay(&bus, letter).await?;
                println!(
                    "replayed dead letter {} ({} {}) on {}",
                    letter.sequence, letter.event_type, letter.event_id, letter.subject
                );
            }
            Ok(())
        }
    }
}

async fn tail(bus: &EventBus, subject: &str, count: Option<usize>) -> anyhow::Result<()> {
    let mut messages = bus.client().subscribe(subject.to_owned()).await?;
    bus.client().flush().await?;
    eprintln!("listening on {subject} (Ctrl-C to stop)");
    let mut seen = 0;
    while let Some(message) = messages.next().await {
        let headers = message.headers.clone().unwrap_or_default();
        println!(
            "{}",
            Value::Object(describe(
                message.subject.as_str(),
                &headers,
                &message.payload
            ))
        );
        seen += 1;
        if count.is_some_and(|count| seen >= count) {
            break;
        }
    }
    Ok(())
}

/// `{subject, headers, event}` with the payload decoded by its `ce-type`.
fn describe(subject: &str, headers: &async_nats::HeaderMap, payload: &[u8]) -> Map<String, Value> {
    let mut header_map = Map::new();
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        let value = values
            .iter()
            .map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        header_map.insert(name.to_owned(), json!(value));
    }
    let event_type = headers
        .get(agora_platform_events::envelope::header::CE_TYPE)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    let mut line = Map::new();
    line.insert("subject".into(), json!(subject));
    line.insert("headers".into(), Value::Object(header_map));
    line.insert("event".into(), decode(&event_type, payload));
    line
}

/// The payload as proto3 JSON, or what went wrong (never fails the tail).
fn decode(event_type: &str, payload: &[u8]) -> Value {
    let Some(descriptor) = pool().and_then(|pool| pool.get_message_by_name(event_type)) else {
        return json!({ "undecoded": format!("unknown event type {event_type:?}"), "bytes": payload.len() });
    };
    match DynamicMessage::decode(descriptor, payload) {
        Ok(message) => serde_json::to_value(&message)
            .unwrap_or_else(|err| json!({ "undecoded": err.to_string() })),
        Err(err) => json!({ "undecoded": err.to_string(), "bytes": payload.len() }),
    }
}

fn pool() -> Option<&'static DescriptorPool> {
    static POOL: std::sync::OnceLock<Option<DescriptorPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(agora_proto::FILE_DESCRIPTOR_SET).ok())
        .as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_decode_to_proto3_json() {
        let event = agora_proto::users::v1::UserCreated {
            user_id: "u-1".into(),
            email: "ada@example.com".into(),
            name: "Ada".into(),
            roles: vec![],
            version: 3,
        };
        let json = decode(
            "agora.users.v1.UserCreated",
            &prost::Message::encode_to_vec(&event),
        );
        assert_eq!(json["userId"], "u-1");
        assert_eq!(json["version"], "3", "int64 is a string in proto3 JSON");
        assert!(decode("nope.Nope", b"").get("undecoded").is_some());
    }
}
