//! Persistence of payments.
//!
//! [`PaymentStore`] is what the service needs; [`SqlPaymentStore`] implements
//! it on PostgreSQL and SQLite with the same SQL.
//!
//! No transaction here ever waits for the card provider. A charge first
//! *claims* its payment id: the row is inserted as `processing` and
//! committed at once (the primary key lets one attempt in; every other
//! attempt with the id finds that row). The provider is then asked outside
//! any transaction, and the outcome is *settled* by a conditional update
//! (`WHERE status = 'processing'`) that commits with its event. Several
//! settlers of one payment (concurrent retries, a refund, the sweeper) ask
//! the provider under the same idempotency key, get the same outcome, and
//! only the first update changes the row; the others re-read it. A refund is
//! the same shape: the provider refunds (idempotently), then a conditional
//! update moves SUCCEEDED to REFUNDED.
//!
//! (The first migration's comment says `processing` is never committed;
//! that was true when the provider was called inside the claiming
//! transaction, and is not any more.)

use std::future::Future;

use agora_platform::db::{Db, is_unique_violation};
use agora_platform::error::{Error, ErrorKind, Result};
use agora_platform::money::Money;
use agora_platform::time::now_micros;
use agora_platform_events::Outbox;
use agora_proto::payments::v1::{PaymentCaptured, PaymentRefunded};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::domain::{ChargeAttempt, Payment, PaymentStatus, reason};
use crate::processor::ChargeOutcome;

/// Storage of payments.
pub trait PaymentStore: Send + Sync + 'static {
    /// Claims the payment id for `attempt`: inserts it as PROCESSING and
    /// commits, or, when the id is taken, returns the payment stored under
    /// it, whatever its status, if it is the same charge (same user, amount
    /// and last four digits) or VOIDED. ALREADY_EXISTS (reason
    /// `PAYMENT_ID_REUSED`) when the id was used for a different charge.
    fn claim(&self, attempt: &ChargeAttempt) -> impl Future<Output = Result<Payment>> + Send;

    /// Records the provider's `outcome` for a PROCESSING payment (SUCCEEDED
    /// with its `PaymentCaptured` event, DECLINED with the reason, or
    /// VOIDED) and returns it. A payment that is no longer PROCESSING
    /// (someone else settled it) is returned as it is.
    fn settle(
        &self,
        payment_id: &str,
        outcome: &ChargeOutcome,
    ) -> impl Future<Output = Result<Payment>> + Send;

    /// Records a tombstone for an id that was never charged (VOIDED, no
    /// amount), so that a later charge with it is refused, and returns it.
    /// When the id exists (a charge claimed it first), returns that payment
    /// unchanged instead.
    fn void_unknown(&self, payment_id: &str) -> impl Future<Output = Result<Payment>> + Send;

    /// Moves a SUCCEEDED payment, refunded at the provider, to REFUNDED with
    /// its `PaymentRefunded` event. A payment in any other status is
    /// returned as it is.
    fn mark_refunded(&self, payment_id: &str) -> impl Future<Output = Result<Payment>> + Send;

    /// The payment with this id.
    fn get(&self, payment_id: &str) -> impl Future<Output = Result<Option<Payment>>> + Send;

    /// Up to `limit` ids of payments PROCESSING since before `claimed_before`
    /// (microseconds since the epoch), oldest first: claims whose attempt
    /// died before it settled.
    fn stale_processing(
        &self,
        claimed_before: i64,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<String>>> + Send;
}

/// [`PaymentStore`] on a SQL database (PostgreSQL or SQLite).
#[derive(Clone, Debug)]
pub struct SqlPaymentStore {
    db: Db,
    outbox: Outbox,
}

impl SqlPaymentStore {
    /// A store on a migrated database, recording `PaymentCaptured` and
    /// `PaymentRefunded` in its outbox.
    pub fn new(outbox: Outbox) -> Self {
        Self {
            db: outbox.db().clone(),
            outbox,
        }
    }
}

const SELECT_PAYMENT: &str = "SELECT id, user_id, currency_code, amount_minor, status, \
     card_last4, decline_reason, created_at, updated_at \
     FROM payments WHERE id = $1";

impl PaymentStore for SqlPaymentStore {
    async fn claim(&self, attempt: &ChargeAttempt) -> Result<Payment> {
        let payment_id = attempt.payment_id.as_str();
        // A retry of a known payment needs no write.
        if let Some(existing) = self.get(payment_id).await? {
            return retry_outcome(existing, attempt);
        }
        let now = now_micros();
        // One statement, committed on its own: the claim must be visible to
        // every other attempt (and to the sweeper) while the provider works.
        let claimed = sqlx::query(
            "INSERT INTO payments (id, user_id, currency_code, amount_minor, status, \
             card_last4, decline_reason, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, '', $7, $7)",
        )
        .bind(payment_id)
        .bind(attempt.user_id.as_str())
        .bind(&attempt.amount.currency_code)
        .bind(attempt.amount.amount_minor)
        .bind(PaymentStatus::Processing.as_str())
        .bind(&attempt.card_last4)
        .bind(now)
        .execute(self.db.pool())
        .await;
        match claimed {
            Ok(_) => Ok(Payment {
                id: payment_id.to_owned(),
                user_id: attempt.user_id.as_str().to_owned(),
                amount: attempt.amount.clone(),
                status: PaymentStatus::Processing,
                card_last4: attempt.card_last4.clone(),
                decline_reason: String::new(),
                created_at: now,
                updated_at: now,
            }),
            Err(err) if is_unique_violation(&err) => {
                // Another attempt (or a refund's tombstone) took the id
                // between our read and our insert; its row is committed.
                let existing = self.get(payment_id).await?.ok_or_else(|| {
                    Error::new(
                        ErrorKind::Conflict,
                        format!("payment {payment_id} changed concurrently: retry"),
                    )
                })?;
                retry_outcome(existing, attempt)
            }
            Err(err) => Err(err.into()),
        }
    }

    async fn settle(&self, payment_id: &str, outcome: &ChargeOutcome) -> Result<Payment> {
        let (status, decline_reason) = match outcome {
            ChargeOutcome::Approved { .. } => (PaymentStatus::Succeeded, ""),
            ChargeOutcome::Declined { reason, .. } => (PaymentStatus::Declined, reason.as_str()),
            ChargeOutcome::Voided => (PaymentStatus::Voided, ""),
        };
        let mut work = self.outbox.begin().await?;
        let settled = sqlx::query(
            "UPDATE payments SET status = $1, decline_reason = $2, updated_at = $3 \
             WHERE id = $4 AND status = $5 RETURNING id, user_id, currency_code, \
             amount_minor, status, card_last4, decline_reason, created_at, updated_at",
        )
        .bind(status.as_str())
        .bind(decline_reason)
        .bind(now_micros())
        .bind(payment_id)
        .bind(PaymentStatus::Processing.as_str())
        .fetch_optional(work.tx())
        .await?;
        let Some(row) = settled else {
            // Settled by someone else first: theirs is the same outcome.
            work.rollback().await?;
            return self.existing(payment_id).await;
        };
        let payment = payment_from_row(&row)?;
        if payment.status == PaymentStatus::Succeeded {
            work.record(&PaymentCaptured {
                payment_id: payment.id.clone(),
                user_id: payment.user_id.clone(),
                amount: Some(payment.amount.to_proto()),
                card_last4: payment.card_last4.clone(),
                version: 1,
            })
            .await?;
        }
        work.commit().await?;
        Ok(payment)
    }

    async fn void_unknown(&self, payment_id: &str) -> Result<Payment> {
        // Of a tombstone and a claim racing for the id, the primary key lets
        // exactly one in; whichever it was is what the read returns.
        sqlx::query(
            "INSERT INTO payments (id, user_id, currency_code, amount_minor, status, \
             card_last4, decline_reason, created_at, updated_at) \
             VALUES ($1, '', '', 0, $2, '', '', $3, $3) ON CONFLICT (id) DO NOTHING",
        )
        .bind(payment_id)
        .bind(PaymentStatus::Voided.as_str())
        .bind(now_micros())
        .execute(self.db.pool())
        .await?;
        self.existing(payment_id).await
    }

    async fn mark_refunded(&self, payment_id: &str) -> Result<Payment> {
        let mut work = self.outbox.begin().await?;
        // The conditional update decides which of concurrent refunds records
        // the event; the provider refunded once whoever asked.
        let refunded = sqlx::query(
            "UPDATE payments SET status = $1, updated_at = $2 \
             WHERE id = $3 AND status = $4 RETURNING id, user_id, currency_code, \
             amount_minor, status, card_last4, decline_reason, created_at, updated_at",
        )
        .bind(PaymentStatus::Refunded.as_str())
        .bind(now_micros())
        .bind(payment_id)
        .bind(PaymentStatus::Succeeded.as_str())
        .fetch_optional(work.tx())
        .await?;
        let Some(row) = refunded else {
            work.rollback().await?;
            return self.existing(payment_id).await;
        };
        let payment = payment_from_row(&row)?;
        work.record(&PaymentRefunded {
            payment_id: payment.id.clone(),
            user_id: payment.user_id.clone(),
            amount: Some(payment.amount.to_proto()),
            version: 2,
        })
        .await?;
        work.commit().await?;
        Ok(payment)
    }

    async fn get(&self, payment_id: &str) -> Result<Option<Payment>> {
        sqlx::query(SELECT_PAYMENT)
            .bind(payment_id)
            .fetch_optional(self.db.pool())
            .await?
            .map(|row| payment_from_row(&row))
            .transpose()
    }

    async fn stale_processing(&self, claimed_before: i64, limit: i64) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT id FROM payments WHERE status = $1 AND updated_at < $2 \
             ORDER BY updated_at LIMIT $3",
        )
        .bind(PaymentStatus::Processing.as_str())
        .bind(claimed_before)
        .bind(limit)
        .fetch_all(self.db.pool())
        .await?;
        rows.iter()
            .map(|row| Ok(row.try_get("id")?))
            .collect::<Result<_>>()
    }
}

impl SqlPaymentStore {
    /// A payment that must exist (it was just written or found taken).
    async fn existing(&self, payment_id: &str) -> Result<Payment> {
        self.get(payment_id).await?.ok_or_else(|| {
            Error::new(
                ErrorKind::Internal,
                format!("payment {payment_id} vanished"),
            )
        })
    }
}

/// The answer to a charge whose id is already taken: the stored payment when
/// the attempt is a retry of the same charge or the id was voided (the
/// caller answers PAYMENT_VOIDED whatever was asked), else ALREADY_EXISTS.
fn retry_outcome(existing: Payment, attempt: &ChargeAttempt) -> Result<Payment> {
    if existing.status == PaymentStatus::Voided {
        return Ok(existing);
    }
    let differences = existing.differences(attempt);
    if differences.is_empty() {
        Ok(existing)
    } else {
        Err(Error::new(
            ErrorKind::AlreadyExists,
            format!(
                "payment {} already exists with a different {}",
                existing.id,
                differences.join(", ")
            ),
        )
        .with_reason(reason::PAYMENT_ID_REUSED))
    }
}

fn payment_from_row(row: &AnyRow) -> Result<Payment> {
    let status: String = row.try_get("status")?;
    let status = PaymentStatus::parse(&status).ok_or_else(|| {
        Error::new(
            ErrorKind::Internal,
            format!("unknown stored payment status {status:?}"),
        )
    })?;
    Ok(Payment {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        amount: Money {
            currency_code: row.try_get("currency_code")?,
            amount_minor: row.try_get("amount_minor")?,
        },
        status,
        card_last4: row.try_get("card_last4")?,
        decline_reason: row.try_get("decline_reason")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}
