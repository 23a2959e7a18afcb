//! Persistence of payments and of the provider's ledger.
//!
//! [`PaymentStore`] is what the service needs; [`SqlPaymentStore`] implements
//! it on PostgreSQL and SQLite with the same SQL.
//!
//! Charging once is the point of this module. A charge claims its payment id
//! by inserting the payment row *first*, inside the write transaction, and
//! only then asks the provider; the provider's answer, the final status and
//! the ledger row are written in the same transaction. A concurrent attempt
//! with the same id fails on the primary key (PostgreSQL makes it wait for
//! the first transaction to finish; SQLite's `BEGIN IMMEDIATE` queues it
//! behind), re-reads the committed outcome and returns it. The ledger's
//! unique `(payment_id, operation)` constraint backs this up in the schema.

use std::future::Future;

use agora_platform::db::{Db, is_unique_violation};
use agora_platform::error::{Error, ErrorKind, Result};
use agora_platform::money::Money;
use agora_platform::time::now_micros;
use agora_platform_events::{Outbox, UnitOfWork};
use agora_proto::payments::v1::{PaymentCaptured, PaymentRefunded};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::domain::{ChargeAttempt, Payment, PaymentStatus};
use crate::processor::Authorization;

/// The status of a payment row between its insert and the provider's answer,
/// inside one transaction; no reader ever sees it committed.
const PROCESSING: &str = "processing";

/// An operation the provider performed, as recorded in the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LedgerOperation {
    /// Money was taken from the card.
    Charge,
    /// The provider was asked to charge and declined; nothing was taken.
    Decline,
    /// Money was given back.
    Refund,
}

impl LedgerOperation {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Charge => "charge",
            Self::Decline => "decline",
            Self::Refund => "refund",
        }
    }
}

/// Storage of payments and the provider's ledger.
pub trait PaymentStore: Send + Sync + 'static {
    /// Records the charge `attempt`, calling `authorize` (the provider) only
    /// when this attempt is the first for its payment id, and at most once.
    ///
    /// Returns the payment with the provider's outcome: SUCCEEDED or
    /// DECLINED. For a retry (same payment id, user, amount and card) it is
    /// the stored payment, whatever its status now, and `authorize` is not
    /// called. ALREADY_EXISTS when the id was used for a different charge.
    fn charge<F>(
        &self,
        attempt: &ChargeAttempt,
        authorize: F,
    ) -> impl Future<Output = Result<Payment>> + Send
    where
        F: FnOnce() -> Authorization + Send;

    /// Moves a SUCCEEDED payment to REFUNDED, calling `refund` (the provider,
    /// which returns its reference) exactly once per payment. A REFUNDED
    /// payment is returned as it is; DECLINED is FAILED_PRECONDITION; an
    /// unknown id is NOT_FOUND.
    fn refund<F>(
        &self,
        payment_id: &str,
        refund: F,
    ) -> impl Future<Output = Result<Payment>> + Send
    where
        F: FnOnce(&Payment) -> String + Send;

    /// The payment with this id.
    fn get(&self, payment_id: &str) -> impl Future<Output = Result<Option<Payment>>> + Send;

    /// How many `operation`s the provider performed for a payment: at most
    /// one each, which is what tests check to prove "charged once".
    fn count_ledger_entries(
        &self,
        payment_id: &str,
        operation: LedgerOperation,
    ) -> impl Future<Output = Result<i64>> + Send;
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
    async fn charge<F>(&self, attempt: &ChargeAttempt, authorize: F) -> Result<Payment>
    where
        F: FnOnce() -> Authorization + Send,
    {
        let payment_id = attempt.payment_id.as_str();
        // A retry of a settled payment needs no write lock.
        if let Some(existing) = self.get(payment_id).await? {
            return retry_outcome(existing, attempt);
        }

        let mut work = self.outbox.begin().await?;
        let now = now_micros();
        let claimed = sqlx::query(
            "INSERT INTO payments (id, user_id, currency_code, amount_minor, status, \
             card_last4, decline_reason, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, '', $7, $7)",
        )
        .bind(payment_id)
        .bind(attempt.user_id.as_str())
        .bind(&attempt.amount.currency_code)
        .bind(attempt.amount.amount_minor)
        .bind(PROCESSING)
        .bind(&attempt.card_last4)
        .bind(now)
        .execute(work.tx())
        .await;
        match claimed {
            Ok(_) => {}
            Err(err) if is_unique_violation(&err) => {
                // Another attempt claimed the id first and has committed its
                // outcome by now (the insert waited for it): that is ours too.
                work.rollback().await?;
                let existing = self.get(payment_id).await?.ok_or_else(|| {
                    Error::new(
                        ErrorKind::Conflict,
                        format!("payment {payment_id} changed concurrently: retry"),
                    )
                })?;
                return retry_outcome(existing, attempt);
            }
            Err(err) => return Err(err.into()),
        }

        // The id is ours: now, and only now, the provider is asked.
        let (status, decline_reason, operation, reference) = match authorize() {
            Authorization::Approved { reference } => (
                PaymentStatus::Succeeded,
                String::new(),
                LedgerOperation::Charge,
                reference,
            ),
            Authorization::Declined { reference, reason } => (
                PaymentStatus::Declined,
                reason,
                LedgerOperation::Decline,
                reference,
            ),
        };
        sqlx::query("UPDATE payments SET status = $1, decline_reason = $2 WHERE id = $3")
            .bind(status.as_str())
            .bind(&decline_reason)
            .bind(payment_id)
            .execute(work.tx())
            .await?;
        insert_ledger_entry(
            &mut work,
            payment_id,
            operation,
            &attempt.amount,
            &reference,
            now,
        )
        .await?;
        if status == PaymentStatus::Succeeded {
            work.record(&PaymentCaptured {
                payment_id: payment_id.to_owned(),
                user_id: attempt.user_id.as_str().to_owned(),
                amount: Some(attempt.amount.to_proto()),
                card_last4: attempt.card_last4.clone(),
                version: 1,
            })
            .await?;
        }
        work.commit().await?;
        Ok(Payment {
            id: payment_id.to_owned(),
            user_id: attempt.user_id.as_str().to_owned(),
            amount: attempt.amount.clone(),
            status,
            card_last4: attempt.card_last4.clone(),
            decline_reason,
            created_at: now,
            updated_at: now,
        })
    }

    async fn refund<F>(&self, payment_id: &str, refund: F) -> Result<Payment>
    where
        F: FnOnce(&Payment) -> String + Send,
    {
        // Settled answers (already refunded, declined, unknown) need no lock.
        let current = self
            .get(payment_id)
            .await?
            .ok_or_else(|| Error::not_found(format_args!("payment {payment_id}")))?;
        if current.status != PaymentStatus::Succeeded {
            return not_refundable_now(current);
        }

        let mut work = self.outbox.begin().await?;
        let now = now_micros();
        // The conditional update is the claim: of two concurrent refunds only
        // one changes the row; the other sees zero rows and re-reads.
        let claimed = sqlx::query(
            "UPDATE payments SET status = $1, updated_at = $2 WHERE id = $3 AND status = $4",
        )
        .bind(PaymentStatus::Refunded.as_str())
        .bind(now)
        .bind(payment_id)
        .bind(PaymentStatus::Succeeded.as_str())
        .execute(work.tx())
        .await?;
        if claimed.rows_affected() != 1 {
            work.rollback().await?;
            let current = self
                .get(payment_id)
                .await?
                .ok_or_else(|| Error::not_found(format_args!("payment {payment_id}")))?;
            return not_refundable_now(current);
        }
        let refunded = sqlx::query(SELECT_PAYMENT)
            .bind(payment_id)
            .fetch_one(work.tx())
            .await
            .map_err(|err| Error::internal("re-reading a refunded payment", err))
            .and_then(|row| payment_from_row(&row))?;
        let reference = refund(&refunded);
        insert_ledger_entry(
            &mut work,
            payment_id,
            LedgerOperation::Refund,
            &refunded.amount,
            &reference,
            now,
        )
        .await?;
        work.record(&PaymentRefunded {
            payment_id: payment_id.to_owned(),
            user_id: refunded.user_id.clone(),
            amount: Some(refunded.amount.to_proto()),
            version: 2,
        })
        .await?;
        work.commit().await?;
        Ok(refunded)
    }

    async fn get(&self, payment_id: &str) -> Result<Option<Payment>> {
        sqlx::query(SELECT_PAYMENT)
            .bind(payment_id)
            .fetch_optional(self.db.pool())
            .await?
            .map(|row| payment_from_row(&row))
            .transpose()
    }

    async fn count_ledger_entries(
        &self,
        payment_id: &str,
        operation: LedgerOperation,
    ) -> Result<i64> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS entries FROM provider_ledger \
             WHERE payment_id = $1 AND operation = $2",
        )
        .bind(payment_id)
        .bind(operation.as_str())
        .fetch_one(self.db.pool())
        .await?;
        Ok(row.try_get("entries")?)
    }
}

/// The answer to a charge whose id is already taken: the stored payment when
/// the attempt is a retry of the same charge, else ALREADY_EXISTS.
fn retry_outcome(existing: Payment, attempt: &ChargeAttempt) -> Result<Payment> {
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
        ))
    }
}

/// The answer to a refund of a payment that is not (or no longer) SUCCEEDED.
fn not_refundable_now(payment: Payment) -> Result<Payment> {
    match payment.status {
        PaymentStatus::Refunded => Ok(payment),
        PaymentStatus::Declined => Err(Error::new(
            ErrorKind::FailedPrecondition,
            format!(
                "payment {} was declined: there is nothing to refund",
                payment.id
            ),
        )),
        PaymentStatus::Succeeded => Err(Error::new(
            ErrorKind::Conflict,
            format!("payment {} changed concurrently: retry", payment.id),
        )),
    }
}

async fn insert_ledger_entry(
    work: &mut UnitOfWork,
    payment_id: &str,
    operation: LedgerOperation,
    amount: &Money,
    reference: &str,
    occurred_at: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO provider_ledger (id, payment_id, operation, currency_code, amount_minor, \
         provider_reference, occurred_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(payment_id)
    .bind(operation.as_str())
    .bind(&amount.currency_code)
    .bind(amount.amount_minor)
    .bind(reference)
    .bind(occurred_at)
    .execute(work.tx())
    .await
    .map_err(|err| {
        if is_unique_violation(&err) {
            // The claims above make this unreachable; the schema refuses to
            // record a second charge or refund even if they did not.
            Error::internal(
                format!("payment {payment_id} already has a {}", operation.as_str()),
                err,
            )
        } else {
            err.into()
        }
    })?;
    Ok(())
}

fn payment_from_row(row: &AnyRow) -> Result<Payment> {
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let status = match PaymentStatus::parse(&status) {
        Some(status) => status,
        // Only visible inside the transaction that wrote it; seeing it here
        // would mean reading uncommitted data, so ask for a retry.
        None if status == PROCESSING => {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("payment {id} is being processed: retry"),
            ));
        }
        None => {
            return Err(Error::new(
                ErrorKind::Internal,
                format!("unknown stored payment status {status:?}"),
            ));
        }
    };
    Ok(Payment {
        id,
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
