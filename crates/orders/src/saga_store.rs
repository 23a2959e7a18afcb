//! Persistence of checkout sagas: one `checkout_sagas` row per order, plus
//! the history of the steps it left (`checkout_saga_steps`).
//!
//! Every change is a conditional update on the saga's `version` (optimistic
//! concurrency): a replica that lost its lease, or a stale copy of a saga,
//! changes nothing and learns it (`None`). A step's saga update, its order
//! status change (with the order's event in the outbox) and its history row
//! commit in one transaction, so a crash leaves the saga either before the
//! step or after it, never half-way.

use agora_platform::db::Db;
use agora_platform::error::{Error, ErrorKind, Result};
use agora_platform::time::now_micros;
use agora_platform_events::UnitOfWork;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::domain::OrderStatus;
use crate::saga::SagaStep;
use crate::store::{Failure, Moved, OrderStore, SqlOrderStore, move_order};

/// How often a step's transaction is retried when the order changed under it.
const ADVANCE_ATTEMPTS: usize = 3;

/// What a new saga starts with, written with its order.
#[derive(Clone, Debug)]
pub struct SagaStart {
    /// The replica that will drive it.
    pub lease_owner: String,
    /// Until when (µs since the epoch) that replica holds it.
    pub lease_until: i64,
    /// When it must have reached CONFIRMING (µs since the epoch).
    pub deadline_at: i64,
}

/// A saga as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Saga {
    /// The order's id.
    pub id: String,
    /// Where it is.
    pub step: SagaStep,
    /// Why it compensates or failed; empty while all goes well.
    pub failure: Failure,
    /// Bumped by every change; the condition of the next one.
    pub version: i64,
    /// The replica driving it.
    pub lease_owner: String,
    /// Until when that replica holds it (µs since the epoch).
    pub lease_until: i64,
    /// When it must have reached CONFIRMING (µs since the epoch).
    pub deadline_at: i64,
    /// When it started (µs since the epoch).
    pub created_at: i64,
    /// When it entered its current step (µs since the epoch).
    pub updated_at: i64,
}

/// One step a saga left, for `agora sagas show`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepRecord {
    /// The step left.
    pub step: String,
    /// `ok`, or the failure code that ended the step.
    pub outcome: String,
    /// What happened, in words.
    pub detail: String,
    /// When the step began (µs since the epoch).
    pub started_at: i64,
    /// When it ended (µs since the epoch).
    pub finished_at: i64,
}

/// A move of a saga to its next step.
#[derive(Clone, Debug)]
pub struct Advance {
    /// The next step.
    pub to: SagaStep,
    /// `ok`, or the failure code that ended the current step.
    pub outcome: String,
    /// What happened, in words.
    pub detail: String,
    /// Set when this move decides that the checkout fails (or is cancelled).
    pub failure: Option<Failure>,
    /// The order status this move makes, in the same transaction.
    pub order: Option<OrderStatus>,
}

/// Writes a new saga inside the transaction that creates its order.
pub(crate) async fn insert_saga(
    work: &mut UnitOfWork,
    id: &str,
    start: &SagaStart,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO checkout_sagas (id, step, version, lease_owner, lease_until, deadline_at, \
         created_at, updated_at) VALUES ($1, $2, 1, $3, $4, $5, $6, $6)",
    )
    .bind(id)
    .bind(SagaStep::Reserving.as_str())
    .bind(&start.lease_owner)
    .bind(start.lease_until)
    .bind(start.deadline_at)
    .bind(now)
    .execute(work.tx())
    .await?;
    Ok(())
}

/// Sagas, with `$tail` (a condition and order) after the table.
macro_rules! select_sagas {
    ($tail:literal) => {
        concat!(
            "SELECT id, step, failure_code, failure_message, version, lease_owner, \
             lease_until, deadline_at, created_at, updated_at FROM checkout_sagas ",
            $tail
        )
    };
}

/// Checkout sagas on the orders database.
#[derive(Clone, Debug)]
pub struct SagaStore {
    orders: SqlOrderStore,
}

impl SagaStore {
    /// Sagas beside `orders` (same database, same outbox, same notifier).
    pub fn new(orders: SqlOrderStore) -> Self {
        Self { orders }
    }

    fn db(&self) -> &Db {
        self.orders.outbox().db()
    }

    /// The saga of order `id`.
    pub async fn get(&self, id: &str) -> Result<Option<Saga>> {
        let row = sqlx::query(select_sagas!("WHERE id = $1"))
            .bind(id)
            .fetch_optional(self.db().pool())
            .await?;
        row.as_ref().map(saga_from_row).transpose()
    }

    /// Moves `saga` on, with its order change and history row, leasing it to
    /// its `lease_owner` until `lease_until`. `None` when the saga changed since it was read
    /// (another replica took it over): the caller must stop driving it.
    pub async fn advance(
        &self,
        saga: &Saga,
        advance: &Advance,
        lease_until: i64,
    ) -> Result<Option<Saga>> {
        for _ in 0..ADVANCE_ATTEMPTS {
            let mut work = self.orders.outbox().begin().await?;
            let failure = advance.failure.as_ref().unwrap_or(&saga.failure);
            if let Some(status) = advance.order {
                match move_order(&mut work, &saga.id, status, failure).await? {
                    Moved::Changed(_) | Moved::Already(_) => {}
                    // The order moved between move_order's read and its
                    // write (only sagas move orders, so rarely): the same
                    // move again, on a fresh read.
                    Moved::Raced => continue,
                }
            }
            let now = now_micros().max(saga.updated_at.saturating_add(1));
            let next = Saga {
                step: advance.to,
                failure: failure.clone(),
                version: saga.version.saturating_add(1),
                lease_until,
                updated_at: now,
                ..saga.clone()
            };
            let moved = sqlx::query(
                "UPDATE checkout_sagas SET step = $1, failure_code = $2, failure_message = $3, \
                 version = $4, lease_owner = $9, lease_until = $5, updated_at = $6 \
                 WHERE id = $7 AND version = $8",
            )
            .bind(next.step.as_str())
            .bind(&next.failure.code)
            .bind(&next.failure.message)
            .bind(next.version)
            .bind(next.lease_until)
            .bind(next.updated_at)
            .bind(&next.id)
            .bind(saga.version)
            .bind(&next.lease_owner)
            .execute(work.tx())
            .await?
            .rows_affected();
            if moved == 0 {
                work.rollback().await?;
                return Ok(None);
            }
            sqlx::query(
                "INSERT INTO checkout_saga_steps (saga_id, seq, step, outcome, detail, \
                 started_at, finished_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&next.id)
            .bind(next.version)
            .bind(saga.step.as_str())
            .bind(&advance.outcome)
            .bind(crate::domain::failure_reason(&advance.detail))
            .bind(saga.updated_at)
            .bind(now)
            .execute(work.tx())
            .await?;
            work.commit().await?;
            // Watchers and a waiting PlaceOrder re-read on this notice.
            self.orders.changes().notify(&next.id);
            return Ok(Some(next));
        }
        Err(Error::new(
            ErrorKind::Conflict,
            format!("order {} keeps changing under its saga", saga.id),
        ))
    }

    /// Extends the lease of `saga` (held by its `lease_owner`) to
    /// `lease_until`. `None` when the saga changed since it was read.
    pub async fn renew(&self, saga: &Saga, lease_until: i64) -> Result<Option<Saga>> {
        self.claim_if(saga, &saga.lease_owner, lease_until, i64::MAX)
            .await
    }

    /// Takes `saga` over for `owner` until `lease_until`, provided it has not
    /// changed since it was read and its lease ran out before `expired_before`.
    pub async fn claim_if(
        &self,
        saga: &Saga,
        owner: &str,
        lease_until: i64,
        expired_before: i64,
    ) -> Result<Option<Saga>> {
        let version = saga.version.saturating_add(1);
        let claimed = sqlx::query(
            "UPDATE checkout_sagas SET lease_owner = $1, lease_until = $2, version = $3 \
             WHERE id = $4 AND version = $5 AND lease_until < $6",
        )
        .bind(owner)
        .bind(lease_until)
        .bind(version)
        .bind(&saga.id)
        .bind(saga.version)
        .bind(expired_before)
        .execute(self.db().pool())
        .await?
        .rows_affected();
        Ok((claimed == 1).then(|| Saga {
            lease_owner: owner.to_owned(),
            lease_until,
            version,
            ..saga.clone()
        }))
    }

    /// Running sagas whose lease ran out before `now`, oldest lease first, at
    /// most `limit`.
    pub async fn expired(&self, now: i64, limit: i64) -> Result<Vec<Saga>> {
        let rows = sqlx::query(select_sagas!(
            "WHERE step NOT IN ('COMPLETED', 'FAILED', 'CANCELLED') \
             AND lease_until < $1 ORDER BY lease_until LIMIT $2"
        ))
        .bind(now)
        .bind(limit)
        .fetch_all(self.db().pool())
        .await?;
        rows.iter().map(saga_from_row).collect()
    }

    /// The newest sagas first, at most `limit`; only running ones that have
    /// not moved since `stuck_since` (µs since the epoch) when it is given.
    pub async fn list(&self, stuck_since: Option<i64>, limit: i64) -> Result<Vec<Saga>> {
        let rows = match stuck_since {
            Some(since) => {
                sqlx::query(select_sagas!(
                    "WHERE step NOT IN ('COMPLETED', 'FAILED', 'CANCELLED') \
                     AND updated_at < $1 ORDER BY created_at DESC, id DESC LIMIT $2"
                ))
                .bind(since)
                .bind(limit)
                .fetch_all(self.db().pool())
                .await?
            }
            None => {
                sqlx::query(select_sagas!("ORDER BY created_at DESC, id DESC LIMIT $1"))
                    .bind(limit)
                    .fetch_all(self.db().pool())
                    .await?
            }
        };
        rows.iter().map(saga_from_row).collect()
    }

    /// The steps saga `id` left, in order.
    pub async fn steps(&self, id: &str) -> Result<Vec<StepRecord>> {
        let rows = sqlx::query(
            "SELECT step, outcome, detail, started_at, finished_at FROM checkout_saga_steps \
             WHERE saga_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(self.db().pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(StepRecord {
                    step: row.try_get("step")?,
                    outcome: row.try_get("outcome")?,
                    detail: row.try_get("detail")?,
                    started_at: row.try_get("started_at")?,
                    finished_at: row.try_get("finished_at")?,
                })
            })
            .collect()
    }
}

fn saga_from_row(row: &AnyRow) -> Result<Saga> {
    let step: String = row.try_get("step")?;
    Ok(Saga {
        id: row.try_get("id")?,
        step: SagaStep::parse(&step).ok_or_else(|| {
            Error::new(
                ErrorKind::Internal,
                format!("unknown stored saga step {step:?}"),
            )
        })?,
        failure: Failure::new(
            row.try_get::<String, _>("failure_code")?,
            row.try_get::<String, _>("failure_message")?,
        ),
        version: row.try_get("version")?,
        lease_owner: row.try_get("lease_owner")?,
        lease_until: row.try_get("lease_until")?,
        deadline_at: row.try_get("deadline_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changes::OrderChanges;

    async fn sagas(dir: &tempfile::TempDir) -> SagaStore {
        SagaStore::new(crate::test_support::sqlite_store(dir, OrderChanges::new()).await)
    }

    /// A new order with its saga, leased to `owner` until `lease_until`.
    async fn started(store: &SagaStore, owner: &str, lease_until: i64) -> Saga {
        let new = crate::test_support::new_order();
        let start = SagaStart {
            lease_owner: owner.into(),
            lease_until,
            deadline_at: i64::MAX,
        };
        let (order, created) = store
            .orders
            .create_order(new, Some(&start))
            .await
            .expect("order");
        assert!(created);
        store.get(&order.id).await.expect("read").expect("saga")
    }

    fn to(step: SagaStep) -> Advance {
        Advance {
            to: step,
            outcome: "ok".into(),
            detail: String::new(),
            failure: None,
            order: None,
        }
    }

    #[tokio::test]
    async fn a_stale_copy_of_a_saga_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = sagas(&dir).await;
        let saga = started(&store, "a", i64::MAX).await;
        let moved = store
            .advance(&saga, &to(SagaStep::Charging), i64::MAX)
            .await
            .expect("advance")
            .expect("moved");
        assert_eq!(moved.step, SagaStep::Charging);
        assert_eq!(moved.version, saga.version + 1);
        // The copy read before the move is stale: nothing happens, and the
        // caller learns it must stop.
        assert!(
            store
                .advance(&saga, &to(SagaStep::Releasing), i64::MAX)
                .await
                .expect("advance")
                .is_none()
        );
        assert!(store.renew(&saga, i64::MAX).await.expect("renew").is_none());
        let now = store.get(&saga.id).await.expect("read").expect("saga");
        assert_eq!(now.step, SagaStep::Charging);
        let history = store.steps(&saga.id).await.expect("steps");
        assert_eq!(history.len(), 1);
        assert_eq!(history[0].step, "RESERVING");
    }

    #[tokio::test]
    async fn of_two_replicas_taking_over_an_expired_saga_one_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = sagas(&dir).await;
        let now = now_micros();
        // A live lease cannot be taken.
        let live = started(&store, "a", now + 60_000_000).await;
        assert!(
            store
                .claim_if(&live, "b", now + 60_000_000, now)
                .await
                .expect("claim")
                .is_none()
        );
        // An expired one is found, and taken by exactly one of two racers.
        let dead = started(&store, "a", now - 1).await;
        let expired = store.expired(now, 10).await.expect("scan");
        assert_eq!(
            expired.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            [dead.id.as_str()]
        );
        let (b, c) = tokio::join!(
            store.claim_if(&dead, "b", now + 60_000_000, now),
            store.claim_if(&dead, "c", now + 60_000_000, now),
        );
        let winners: Vec<_> = [b.expect("claim b"), c.expect("claim c")]
            .into_iter()
            .flatten()
            .collect();
        assert_eq!(winners.len(), 1, "{winners:?}");
        // The old owner's copy is stale now: it can neither renew nor move it.
        assert!(store.renew(&dead, i64::MAX).await.expect("renew").is_none());
        assert!(
            store
                .advance(&dead, &to(SagaStep::Charging), i64::MAX)
                .await
                .expect("advance")
                .is_none()
        );
        let owner = &winners[0].lease_owner;
        let stored = store.get(&dead.id).await.expect("read").expect("saga");
        assert_eq!(&stored.lease_owner, owner);
        // Terminal sagas are never resumed.
        let done = store
            .advance(&stored, &to(SagaStep::Failed), now - 1)
            .await
            .expect("advance")
            .expect("moved");
        assert!(done.step.is_terminal());
        assert!(store.expired(now, 10).await.expect("scan").is_empty());
    }
}
