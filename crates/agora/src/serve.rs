//! `agora serve`: configuration, telemetry and one server per target.

use std::net::SocketAddr;
use std::path::PathBuf;

use agora_platform::config::{self, DiscoveryMode, LogFormat};
use agora_platform::server::{HostedService, Server};
use agora_platform::{shutdown, telemetry};
use agora_platform_client::Discovery;
use agora_platform_events::EventBus;
use anyhow::{Context as _, bail};
use serde_json::{Map, Value, json};
use tokio::task::JoinSet;

use crate::Target;

/// Shown after `agora serve --help`.
pub const AFTER_HELP: &str = "\
Configuration is layered: built-in defaults < the --config TOML file < AGORA_*
environment variables (nested keys joined by `__`, e.g. AGORA_USERS__DATABASE_URL,
AGORA_AUTH__TOKEN_TTL_SECS) < these flags.

Defaults: users, catalog, inventory, payments, orders, notifications on
127.0.0.1:50051..50056, the gateway on 127.0.0.1:8080; SQLite at
<data-dir>/<service>.db; token keys at <data-dir>/keys/jwt_ed25519{,.pub}.pem
(make them with `agora keygen`). `all` runs every service and the gateway in
this one process, each on its own port.

Examples:
  agora serve users
  agora serve users --database-url postgres://postgres@127.0.0.1:5432/agora_users
  agora serve all --log-format json";

/// Arguments of `agora serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Services to run (`all` for every one, in this process).
    #[arg(required = true, value_enum)]
    pub targets: Vec<Target>,
    /// TOML configuration file.
    #[arg(long, env = "AGORA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (only with a single target; default from config).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Database URL, postgres://... or sqlite://... (only with a single target).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// NATS server for domain events.
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    /// Folder for SQLite files, development keys and .eml files.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormatArg>,
}

/// `--log-format` values.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormatArg {
    /// Human-readable.
    Pretty,
    /// JSON lines.
    Json,
}

impl ServeArgs {
    /// The services to run, each once, in a stable order.
    pub fn services(&self) -> Vec<Target> {
        let mut services: Vec<Target> = Vec::new();
        for target in &self.targets {
            for service in target.expand() {
                if !services.contains(service) {
                    services.push(*service);
                }
            }
        }
        services
    }

    /// The flags as a configuration layer (only those given).
    pub fn overrides(&self) -> anyhow::Result<Value> {
        let services = self.services();
        let mut root = Map::new();
        if let Some(dir) = &self.data_dir {
            root.insert("data_dir".into(), json!(dir));
        }
        if let Some(url) = &self.nats_url {
            root.insert("nats_url".into(), json!(url));
        }
        if let Some(format) = self.log_format {
            let format = match format {
                LogFormatArg::Pretty => LogFormat::Pretty,
                LogFormatArg::Json => LogFormat::Json,
            };
            root.insert("log_format".into(), serde_json::to_value(format)?);
        }
        if self.database_url.is_some() && services.contains(&Target::Gateway) {
            bail!(
                "the gateway has no database: --database-url and DATABASE_URL apply to a service"
            );
        }
        if self.listen.is_some() || self.database_url.is_some() {
            let [single] = services.as_slice() else {
                bail!(
                    "--listen, --database-url and DATABASE_URL apply to a single service; \
                     with several use AGORA_<SERVICE>__LISTEN_ADDR / AGORA_<SERVICE>__DATABASE_URL"
                );
            };
            let mut service = Map::new();
            if let Some(addr) = self.listen {
                service.insert("listen_addr".into(), json!(addr.to_string()));
            }
            if let Some(url) = &self.database_url {
                service.insert("database_url".into(), json!(url));
            }
            root.insert(single.name().into(), Value::Object(service));
        }
        Ok(Value::Object(root))
    }
}

/// Loads configuration, starts every requested service on its own port and
/// runs until SIGTERM/SIGINT; a server that fails stops the others.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = config::load(args.config.as_deref(), args.overrides()?)?;
    let services = args.services();
    // Only the private keys of the services run here: in the mesh no process
    // holds another service's signing key, and only users' the user-token key.
    let names: Vec<&str> = services.iter().map(|service| service.name()).collect();
    config.use_default_key_files(&names);
    let label = match services.as_slice() {
        [single] => format!("agora-{}", single.name()),
        _ => "agora".to_owned(),
    };
    let _telemetry = telemetry::init(&label, config.log_format)?;
    let stop = shutdown::on_signal();

    // With `clients.discovery = "nats"`, each service is registered once
    // bound and deregistered before its server drains.
    let registrar = crate::registry::Registrar::connect(&config, &label).await?;
    let mut servers = JoinSet::new();
    // Request bytes held while read whole (`server.max_buffered_request_bytes`)
    // are bounded for the process, not per hosted service.
    let request_budget =
        agora_platform::limits::RequestBudget::new(config.server.max_buffered_request_bytes);
    for service in services {
        if service == Target::Gateway {
            let discovery = match config.clients.discovery {
                DiscoveryMode::Static => Discovery::Static,
                DiscoveryMode::Nats => Discovery::Nats(
                    EventBus::connect_as_tool(&config.nats_url, "gateway-discovery")
                        .await?
                        .client()
                        .clone(),
                ),
            };
            let gateway = agora_gateway::Gateway::bind(&config, discovery)
                .await
                .context("starting the gateway")?;
            tracing::info!(service = "gateway", addr = %gateway.local_addr(), "listening");
            servers.spawn(gateway.run_until_stopped(stop.child_token()));
            continue;
        }
        let hosted = hosted(service, &config)
            .await
            .with_context(|| format!("starting the {} service", service.name()))?;
        let addr = config
            .service(service.name())
            .map(|s| s.listen_addr)
            .context("no configuration for the service")?;
        let app = Server::new()
            .limits(&config.server)
            // One budget for the process, however many services it hosts.
            .request_budget(request_budget.clone())
            .host(hosted)
            .bind(addr)
            .await?;
        tracing::info!(service = service.name(), addr = %app.local_addr(), "listening");
        let server_stop = match &registrar {
            Some(registrar) => registrar.register(service, &config, app.local_addr(), &stop)?,
            None => stop.child_token(),
        };
        servers.spawn(app.run_until_stopped(server_stop));
    }

    let mut failure = None;
    while let Some(joined) = servers.join_next().await {
        let result = joined.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(err) = result {
            tracing::error!(error = %format!("{err:#}"), "server failed, stopping the others");
            stop.cancel();
            failure.get_or_insert(err);
        }
    }
    failure.map_or(Ok(()), Err)
}

async fn hosted(service: Target, config: &config::Config) -> anyhow::Result<HostedService> {
    match service {
        Target::Users => agora_users::hosted(config).await,
        Target::Catalog => agora_catalog::hosted(config).await,
        Target::Inventory => agora_inventory::hosted(config).await,
        Target::Payments => agora_payments::hosted(config).await,
        Target::Orders => agora_orders::hosted(config).await,
        Target::Notifications => agora_notifications::hosted(config).await,
        Target::All | Target::Gateway => {
            bail!("`all` is expanded and the gateway started before services start")
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::{Cli, Command};

    fn serve_args(argv: &[&str]) -> ServeArgs {
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Serve(args) => args,
            other => panic!("not serve: {other:?}"),
        }
    }

    #[test]
    fn flags_become_the_single_services_overrides() {
        let args = serve_args(&[
            "agora",
            "serve",
            "users",
            "--listen",
            "127.0.0.1:7000",
            "--database-url",
            "sqlite://x.db",
        ]);
        let overrides = args.overrides().expect("valid");
        assert_eq!(overrides["users"]["listen_addr"], "127.0.0.1:7000");
        assert_eq!(overrides["users"]["database_url"], "sqlite://x.db");
    }

    #[test]
    fn all_expands_once_per_service() {
        let args = serve_args(&["agora", "serve", "all", "users"]);
        assert_eq!(args.services(), crate::ALL_TARGETS);
        let args = serve_args(&["agora", "serve", "orders", "users", "orders"]);
        assert_eq!(args.services(), [Target::Orders, Target::Users]);
    }

    #[test]
    fn single_service_flags_are_refused_with_several_services() {
        let args = serve_args(&["agora", "serve", "all", "--listen", "127.0.0.1:1"]);
        let err = args.overrides().expect_err("ambiguous");
        assert!(err.to_string().contains("single service"), "{err}");
    }

    #[test]
    fn unknown_targets_are_rejected_by_name() {
        let err = Cli::try_parse_from(["agora", "serve", "userz"]).expect_err("typo");
        assert!(err.to_string().contains("userz"), "{err}");
    }
}
