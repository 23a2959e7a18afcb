//! The one Agora binary.
//!
//! `agora serve <target>...` runs one service per process (production, one
//! target per pod), several, or `all` of them in one process (monolith mode
//! for a laptop), each on its own port. `agora keygen` makes development
//! token-signing key pairs (the user-token pair and one per service); `agora
//! health` prints the health of running
//! services; `agora seed` adds a demo catalog and an admin account; `agora
//! events` tails domain events and lists or replays dead letters; `agora
//! sagas` lists checkout sagas and shows one's steps.
//!
//! # Layout
//! - [`Cli`]: the command line.
//! - [`serve`]: building and running the servers of the chosen targets.
//! - [`health`]: the health table printed by `agora health` and `just status`.
//! - [`seed`]: the demo data `just up` loads.
//! - [`events`]: `agora events tail | dlq list | dlq replay`.
//! - [`registry`]: `agora registry`, the instances registered for discovery,
//!   and the registration `agora serve` keeps with `clients.discovery = "nats"`.
//! - [`sagas`]: `agora sagas list [--stuck] | show ID`.
//! - [`loadgen`]: `agora loadgen`, shoppers browsing and checking out, with latency percentiles.

#![forbid(unsafe_code)]

pub mod events;
pub mod health;
pub mod loadgen;
pub mod registry;
pub mod sagas;
pub mod seed;
pub mod serve;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Agora: an e-commerce backend as a gRPC microservice mesh.
#[derive(Debug, Parser)]
#[command(name = "agora", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands of the binary.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one or more services until SIGTERM or Ctrl-C.
    #[command(after_long_help = serve::AFTER_HELP)]
    Serve(serve::ServeArgs),
    /// Write development Ed25519 key pairs: one for user tokens, one per service for service tokens.
    Keygen(KeygenArgs),
    /// Print the gRPC health of running services; exits non-zero unless all serve.
    Health(health::HealthArgs),
    /// Add a demo catalog with stock and an admin account to running services.
    Seed(seed::SeedArgs),
    /// Watch domain events on NATS; list and replay dead letters.
    Events(events::EventsArgs),
    /// List the service instances registered in NATS for discovery.
    Registry(registry::RegistryArgs),
    /// List checkout sagas (`--stuck` for those that stopped moving) and show one's steps.
    Sagas(sagas::SagasArgs),
    /// Drive running services with virtual users browsing and checking out; print latency percentiles.
    Loadgen(loadgen::LoadgenArgs),
}

/// A service `agora serve` can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// Every service below, in one process (monolith mode).
    All,
    /// Accounts, login, JWTs (default port 50051).
    Users,
    /// Products and prices (default port 50052).
    Catalog,
    /// Stock levels and reservations (default port 50053).
    Inventory,
    /// Card charges and refunds (default port 50054).
    Payments,
    /// Orders and their live updates (default port 50055).
    Orders,
    /// Emails sent in reaction to events (default port 50056).
    Notifications,
    /// The edge gateway: gRPC, grpc-web and Connect on one public port
    /// (default port 8080).
    Gateway,
}

/// Every service, in start order.
pub const SERVICES: [Target; 6] = [
    Target::Users,
    Target::Catalog,
    Target::Inventory,
    Target::Payments,
    Target::Orders,
    Target::Notifications,
];

/// What `all` runs: every service, then the gateway in front of them.
pub const ALL_TARGETS: [Target; 7] = [
    Target::Users,
    Target::Catalog,
    Target::Inventory,
    Target::Payments,
    Target::Orders,
    Target::Notifications,
    Target::Gateway,
];

impl Target {
    /// The services a target stands for.
    pub fn expand(self) -> &'static [Target] {
        match self {
            Self::All => &ALL_TARGETS,
            Self::Users => &[Self::Users],
            Self::Catalog => &[Self::Catalog],
            Self::Inventory => &[Self::Inventory],
            Self::Payments => &[Self::Payments],
            Self::Orders => &[Self::Orders],
            Self::Notifications => &[Self::Notifications],
            Self::Gateway => &[Self::Gateway],
        }
    }

    /// The name used in configuration keys and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Users => "users",
            Self::Catalog => "catalog",
            Self::Inventory => "inventory",
            Self::Payments => "payments",
            Self::Orders => "orders",
            Self::Notifications => "notifications",
            Self::Gateway => "gateway",
        }
    }

    /// The fully qualified gRPC service name (empty for `all`, and for the
    /// gateway, whose health "" stands for all of its backends).
    pub fn grpc_service(self) -> &'static str {
        match self {
            Self::All => "",
            Self::Users => agora_proto::users::v1::SERVICE_NAME,
            Self::Catalog => agora_proto::catalog::v1::SERVICE_NAME,
            Self::Inventory => agora_proto::inventory::v1::SERVICE_NAME,
            Self::Payments => agora_proto::payments::v1::SERVICE_NAME,
            Self::Orders => agora_proto::orders::v1::SERVICE_NAME,
            Self::Notifications => agora_proto::notifications::v1::SERVICE_NAME,
            Self::Gateway => "",
        }
    }

    /// The default port of shared/CONTRACT.md.
    pub fn default_port(self) -> u16 {
        match self {
            Self::All => 0,
            Self::Users => 50051,
            Self::Catalog => 50052,
            Self::Inventory => 50053,
            Self::Payments => 50054,
            Self::Orders => 50055,
            Self::Notifications => 50056,
            Self::Gateway => 8080,
        }
    }
}

/// Arguments of `agora keygen`.
#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// Folder for the user-token pair, `jwt_ed25519.pem` (private) and
    /// `jwt_ed25519.pub.pem` (public), and for one service-token pair per
    /// service, `services/<service>.pem` and `services/<service>.pub.pem`.
    #[arg(long, default_value = ".data/keys")]
    pub dir: PathBuf,
    /// Replace existing pairs (every issued token becomes invalid); without
    /// it, only missing pairs are written.
    #[arg(long)]
    pub force: bool,
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Keygen(args) => keygen(&args).map(|()| ExitCode::SUCCESS),
        Command::Health(args) => health::run(args).await,
        Command::Seed(args) => seed::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Events(args) => events::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Registry(args) => registry::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Sagas(args) => sagas::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Loadgen(args) => loadgen::run(args).await,
    }
}

fn keygen(args: &KeygenArgs) -> anyhow::Result<()> {
    use agora_platform::config::{
        PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, SERVICE_KEYS_DIR, service_private_key_file,
        service_public_key_file,
    };
    // The service pairs first: whoever waits for the user-token public key
    // (deploy/compose.yaml) then finds every key in place.
    let services = args.dir.join(SERVICE_KEYS_DIR);
    std::fs::create_dir_all(&services)?;
    for service in SERVICES {
        let name = service.name();
        write_pair(
            &services.join(service_private_key_file(name)),
            &services.join(service_public_key_file(name)),
            args.force,
        )?;
    }
    write_pair(
        &args.dir.join(PRIVATE_KEY_FILE),
        &args.dir.join(PUBLIC_KEY_FILE),
        args.force,
    )
}

/// Writes a new key pair unless its private key exists (or `force`).
fn write_pair(private: &Path, public: &Path, force: bool) -> anyhow::Result<()> {
    if private.exists() && !force {
        println!(
            "key pair exists: {} (use --force to replace it)",
            private.display()
        );
        return Ok(());
    }
    let (private_pem, public_pem) = agora_platform::auth::generate_keypair_pem()?;
    write_private(private, private_pem.expose())?;
    std::fs::write(public, public_pem)?;
    println!("wrote {} and {}", private.display(), public.display());
    Ok(())
}

/// Writes the private key readable by its owner only.
fn write_private(path: &Path, pem: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(pem.as_bytes())
}
