//! The transactional outbox: events are rows written in the same database
//! transaction as the state change they describe, so both commit or neither
//! does. [`OutboxRelay`](crate::relay::OutboxRelay) publishes them later.
//!
//! ```ignore
//! let mut work = outbox.begin().await?;
//! sqlx::query("UPDATE users ...").execute(work.tx()).await?;
//! work.record(&UserEmailUpdated { .. }).await?;
//! work.commit().await?; // and wakes the relay
//! ```

use std::sync::Arc;

use agora_platform::db::Db;
use agora_platform::error::{Error, Result};
use agora_platform::time::now_micros;
use sqlx::{Any, AnyConnection, Transaction};
use tokio::sync::Notify;

use crate::envelope::DomainEvent;

/// Where a service's events are recorded: its own database. Cheap to clone;
/// clones share the wake-up signal of the relay.
#[derive(Clone, Debug)]
pub struct Outbox {
    db: Db,
    /// Signalled after a commit that recorded events: the relay publishes at
    /// once instead of at its next poll.
    committed: Arc<Notify>,
}

impl Outbox {
    /// The outbox in `db`, which must have the events migrations applied
    /// ([`crate::migrate`]).
    pub fn new(db: Db) -> Self {
        Self {
            db,
            committed: Arc::new(Notify::new()),
        }
    }

    /// The database it lives in.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Starts a write transaction whose events are recorded with it.
    pub async fn begin(&self) -> Result<UnitOfWork> {
        Ok(UnitOfWork {
            tx: self.db.begin_write().await?,
            committed: Arc::clone(&self.committed),
            recorded: 0,
        })
    }

    /// The signal the relay waits on.
    pub(crate) fn committed_signal(&self) -> Arc<Notify> {
        Arc::clone(&self.committed)
    }
}

/// A write transaction and the events it records: a state change and its
/// events commit together, or neither does (dropping it rolls back).
pub struct UnitOfWork {
    tx: Transaction<'static, Any>,
    committed: Arc<Notify>,
    recorded: usize,
}

impl std::fmt::Debug for UnitOfWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnitOfWork")
            .field("recorded", &self.recorded)
            .finish_non_exhaustive()
    }
}

impl UnitOfWork {
    /// The connection, for the state change's queries.
    pub fn tx(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }

    /// Records `event` to be published once this transaction commits. Call it
    /// after the state change's own writes: rows of one aggregate then get
    /// ids in commit order (the aggregate's row lock or version check orders
    /// the writers), which the relay's per-aggregate order relies on.
    pub async fn record<E: DomainEvent>(&mut self, event: &E) -> Result<String> {
        let event_id = uuid::Uuid::now_v7().to_string();
        let trace = agora_platform::telemetry::current_trace_headers();
        let traceparent = trace.get("traceparent").cloned();
        let tracestate = trace.get("tracestate").cloned().filter(|s| !s.is_empty());
        sqlx::query(
            "INSERT INTO event_outbox (event_id, subject, event_type, aggregate_id, \
             aggregate_version, payload, traceparent, tracestate, occurred_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&event_id)
        .bind(E::SUBJECT)
        .bind(E::TYPE)
        .bind(event.aggregate_id())
        .bind(event.aggregate_version())
        .bind(event.encode_to_vec())
        .bind(traceparent)
        .bind(tracestate)
        .bind(now_micros())
        .execute(&mut *self.tx)
        .await
        .map_err(Error::from)?;
        self.recorded += 1;
        Ok(event_id)
    }

    /// Rolls back the state change and its events (dropping the unit of
    /// work does too; this waits for it and reports errors).
    pub async fn rollback(self) -> Result<()> {
        self.tx.rollback().await?;
        Ok(())
    }

    /// Commits the state change and its events, then wakes the relay.
    pub async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        if self.recorded > 0 {
            self.committed.notify_one();
        }
        Ok(())
    }
}
