//! The one Agora binary.
//!
//! `agora serve <target>...` runs one service per process (production, one
//! target per pod), several, or `all` of them in one process (monolith mode
//! for a laptop), each on its own port. `agora keygen` makes a development
//! token-signing key pair; `agora health` prints the health of running
//! services; `agora seed` adds a demo catalog and an admin account; `agora
//! events` tails domain events and lists or replays dead letters.
//!
//! # Layout
//! - [`Cli`]: the command line.
//! - [`serve`]: building and running the servers of the chosen targets.
//! - [`health`]: the health table printed by `agora health` and `just status`.
//! - [`seed`]: the demo data `just up` loads.
//! - [`events`]: `agora events tail | dlq list | dlq replay`.

#![forbid(unsafe_code)]

pub mod events;
pub mod health;
pub mod seed;
pub mod serve;

use std::path::PathBuf;
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
    /// Write a development Ed25519 key pair for signing access tokens.
    Keygen(KeygenArgs),
    /// Print the gRPC health of running services; exits non-zero unless all serve.
    Health(health::HealthArgs),
    /// Add a demo catalog with stock and an admin account to running services.
    Seed(seed::SeedArgs),
    /// Watch domain events on NATS; list and replay dead letters.
    Events(events::EventsArgs),
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

impl Target {
    /// The services a target stands for.
    pub fn expand(self) -> &'static [Target] {
        match self {
            Self::All => &SERVICES,
            Self::Users => &[Self::Users],
            Self::Catalog => &[Self::Catalog],
            Self::Inventory => &[Self::Inventory],
            Self::Payments => &[Self::Payments],
            Self::Orders => &[Self::Orders],
            Self::Notifications => &[Self::Notifications],
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
        }
    }

    /// The fully qualified gRPC service name (empty for `all`).
    pub fn grpc_service(self) -> &'static str {
        match self {
            Self::All => "",
            Self::Users => agora_proto::users::v1::SERVICE_NAME,
            Self::Catalog => agora_proto::catalog::v1::SERVICE_NAME,
            Self::Inventory => agora_proto::inventory::v1::SERVICE_NAME,
            Self::Payments => agora_proto::payments::v1::SERVICE_NAME,
            Self::Orders => agora_proto::orders::v1::SERVICE_NAME,
            Self::Notifications => agora_proto::notifications::v1::SERVICE_NAME,
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
        }
    }
}

/// Arguments of `agora keygen`.
#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// Folder for `jwt_ed25519.pem` (private) and `jwt_ed25519.pub.pem` (public).
    #[arg(long, default_value = ".data/keys")]
    pub dir: PathBuf,
    /// Replace an existing pair (every issued token becomes invalid).
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
    }
}

fn keygen(args: &KeygenArgs) -> anyhow::Result<()> {
    let private = args.dir.join(agora_platform::config::PRIVATE_KEY_FILE);
    let public = args.dir.join(agora_platform::config::PUBLIC_KEY_FILE);
    if private.exists() && !args.force {
        println!(
            "key pair exists: {} (use --force to replace it)",
            private.display()
        );
        return Ok(());
    }
    std::fs::create_dir_all(&args.dir)?;
    let (private_pem, public_pem) = agora_platform::auth::generate_keypair_pem()?;
    write_private(&private, private_pem.expose())?;
    std::fs::write(&public, public_pem)?;
    println!("wrote {} and {}", private.display(), public.display());
    Ok(())
}

/// Writes the private key readable by its owner only.
fn write_private(path: &std::path::Path, pem: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(pem.as_bytes())
}
