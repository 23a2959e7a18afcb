//! `agora sagas`: look into the checkout sagas of the orders database.
//!
//! - `agora sagas list [--stuck]` prints the newest sagas, one line each:
//!   id, step, outcome, age, lease holder. `--stuck` keeps the running ones
//!   that have not moved for longer than the checkout deadline (a replica
//!   died and nobody took over, or a dependency has been down for that
//!   long).
//! - `agora sagas show ID` prints one saga and every step it took, with
//!   times and outcomes.
//!
//! Both read the orders database directly (`DATABASE_URL`, or the orders
//! database of the configuration) and change nothing in it; a SQLite file is
//! opened read-only.

use std::path::PathBuf;

use agora_orders::saga_store::{Saga, SagaStore};
use agora_orders::store::SqlOrderStore;
use agora_platform::config::{self, Secret};
use agora_platform::db::Db;
use agora_platform::time::{micros_to_rfc3339, now_micros};
use agora_platform_events::Outbox;
use anyhow::{Context as _, bail};

/// Arguments of `agora sagas`.
#[derive(Debug, clap::Args)]
pub struct SagasArgs {
    /// The orders database (default: the orders database of the
    /// configuration, e.g. `.data/orders.db`).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,
    /// TOML configuration file.
    #[arg(long, env = "AGORA_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: SagasCommand,
}

/// `agora sagas` commands.
#[derive(Debug, clap::Subcommand)]
pub enum SagasCommand {
    /// The newest sagas, one per line.
    List {
        /// Only running sagas that have not moved for longer than the
        /// checkout deadline (`checkout.saga_timeout_ms`).
        #[arg(long)]
        stuck: bool,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// One saga and the steps it took.
    Show {
        /// The saga's (and its order's) id.
        id: String,
    },
}

/// Runs `agora sagas ...`.
pub async fn run(args: SagasArgs) -> anyhow::Result<()> {
    let config = config::load(args.config.as_deref(), serde_json::json!({}))?;
    let url = match args.database_url {
        Some(url) => Secret::new(url),
        None => {
            let url = config.database_url("orders");
            // Never create an empty SQLite file where the service keeps none.
            Secret::new(url.expose().replace("?mode=rwc", "?mode=ro"))
        }
    };
    let db = Db::connect(&url)
        .await
        .context("opening the orders database")?;
    let sagas = SagaStore::new(SqlOrderStore::new(Outbox::new(db)));
    match args.command {
        SagasCommand::List { stuck, limit } => {
            let timeout = i64::try_from(config.checkout.saga_timeout_ms)
                .unwrap_or(i64::MAX)
                .saturating_mul(1000);
            let since = stuck.then(|| now_micros().saturating_sub(timeout));
            let list = sagas.list(since, limit.clamp(1, 10_000)).await?;
            print!("{}", list_table(&list, now_micros()));
            if list.is_empty() {
                eprintln!(
                    "{}",
                    if stuck {
                        "no stuck sagas"
                    } else {
                        "no sagas yet"
                    }
                );
            }
        }
        SagasCommand::Show { id } => {
            let Some(saga) = sagas.get(id.trim()).await? else {
                bail!("no saga {id}");
            };
            let steps = sagas.steps(&saga.id).await?;
            println!("saga      {}", saga.id);
            println!("step      {}", saga.step);
            if !saga.failure.code.is_empty() {
                println!("failure   {}: {}", saga.failure.code, saga.failure.message);
            }
            println!("started   {}", micros_to_rfc3339(saga.created_at));
            println!("deadline  {}", micros_to_rfc3339(saga.deadline_at));
            if !saga.step.is_terminal() {
                println!(
                    "lease     {} until {}",
                    saga.lease_owner,
                    micros_to_rfc3339(saga.lease_until)
                );
            }
            println!();
            println!(
                "{:<18} {:<24} {:>10}  {:<28} DETAIL",
                "STEP", "OUTCOME", "TOOK", "FINISHED"
            );
            for step in &steps {
                println!(
                    "{:<18} {:<24} {:>10}  {:<28} {}",
                    step.step,
                    step.outcome,
                    duration(step.finished_at.saturating_sub(step.started_at)),
                    micros_to_rfc3339(step.finished_at),
                    step.detail
                );
            }
            if !saga.step.is_terminal() {
                println!(
                    "{:<18} {:<24} {:>10}  (running)",
                    saga.step.as_str(),
                    "-",
                    duration(now_micros().saturating_sub(saga.updated_at))
                );
            }
        }
    }
    Ok(())
}

fn list_table(sagas: &[Saga], now: i64) -> String {
    let mut out = String::new();
    if sagas.is_empty() {
        return out;
    }
    out.push_str(&format!(
        "{:<36}  {:<18} {:<22} {:>10} {:>10}  LEASE\n",
        "ID", "STEP", "FAILURE", "AGE", "IN STEP"
    ));
    for saga in sagas {
        let lease = if saga.step.is_terminal() {
            "-".to_owned()
        } else if saga.lease_until < now {
            format!("{} (expired)", saga.lease_owner)
        } else {
            saga.lease_owner.clone()
        };
        out.push_str(&format!(
            "{:<36}  {:<18} {:<22} {:>10} {:>10}  {}\n",
            saga.id,
            saga.step.as_str(),
            if saga.failure.code.is_empty() {
                "-"
            } else {
                &saga.failure.code
            },
            duration(now.saturating_sub(saga.created_at)),
            duration(now.saturating_sub(saga.updated_at)),
            lease
        ));
    }
    out
}

/// Microseconds as `850µs`, `12.3ms`, `4.2s`, `3m05s`, `2h10m`.
fn duration(micros: i64) -> String {
    let micros = micros.max(0);
    match micros {
        0..1_000 => format!("{micros}µs"),
        1_000..1_000_000 => format!("{:.1}ms", micros as f64 / 1e3),
        1_000_000..60_000_000 => format!("{:.1}s", micros as f64 / 1e6),
        60_000_000..3_600_000_000 => {
            format!("{}m{:02}s", micros / 60_000_000, micros / 1_000_000 % 60)
        }
        _ => format!(
            "{}h{:02}m",
            micros / 3_600_000_000,
            micros / 60_000_000 % 60
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(duration(850), "850µs");
        assert_eq!(duration(12_345), "12.3ms");
        assert_eq!(duration(4_200_000), "4.2s");
        assert_eq!(duration(185_000_000), "3m05s");
        assert_eq!(duration(7_800_000_000), "2h10m");
        assert_eq!(duration(-5), "0µs");
    }
}
