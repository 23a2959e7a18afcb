//! The payments service over real gRPC on loopback, against a fresh database.
//! Every test runs twice: on PostgreSQL and on SQLite.
//!
//! Tests of what happens around the provider call (a crash after the charge,
//! a slow provider, a charge still in flight when its refund arrives) put a
//! [`TestNetwork`] between the service and the simulated provider: it stands
//! in for the card network, which can lose an answer or take its time.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agora_payments::domain::{CardNumber, reason};
use agora_payments::processor::{
    CardProvider, ChargeOutcome, DECLINED_CARD, INSUFFICIENT_FUNDS, LedgerOperation, ProviderError,
    SUCCEEDING_CARD, SimulatedProvider,
};
use agora_platform::config::{Config, Secret};
use agora_platform::db::{Backend as DbBackend, Db};
use agora_platform::error::{Error, ErrorKind, reason_of};
use agora_platform::money::Money as DomainMoney;
use agora_proto::common::v1::Money;
use agora_proto::payments::v1 as pb;
use agora_proto::payments::v1::payment_service_client::PaymentServiceClient;
use agora_testkit::bad_fields;
use agora_testkit::with_token;
use agora_testkit::{Backend, TestEnv, TestServer, backend_tests};
use sqlx::Row;
use tokio::sync::Notify;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

struct Harness {
    env: TestEnv,
    server: TestServer,
    client: PaymentServiceClient<Channel>,
    /// The provider's books, read as their auditor.
    provider: SimulatedProvider,
    /// The service's database, read (and in fault tests written) directly.
    db: Db,
    /// A service token, as the orders service would hold.
    service: String,
}

async fn start(backend: Backend) -> anyhow::Result<Harness> {
    let env = TestEnv::new(backend).await?;
    let server = TestServer::start(vec![agora_payments::hosted(&env.config).await?]).await?;
    harness(env, server).await
}

/// The service charging through a [`TestNetwork`] to the simulated
/// provider, with its configuration changed by `adjust` first.
async fn start_networked(
    backend: Backend,
    adjust: impl FnOnce(&mut Config),
) -> anyhow::Result<(Harness, TestNetwork)> {
    let mut env = TestEnv::new(backend).await?;
    adjust(&mut env.config);
    let url = Secret::new(env.database_url().to_owned());
    let db = Db::connect_and_migrate(&url, agora_payments::MIGRATIONS).await?;
    let network = TestNetwork::new(SimulatedProvider::new(db));
    let hosted = agora_payments::hosted_with_provider(&env.config, network.clone()).await?;
    let server = TestServer::start(vec![hosted]).await?;
    Ok((harness(env, server).await?, network))
}

async fn harness(env: TestEnv, server: TestServer) -> anyhow::Result<Harness> {
    let client = PaymentServiceClient::new(server.channel()?);
    let db = Db::connect(&Secret::new(env.database_url().to_owned())).await?;
    let service = env.service_token("orders", "payments")?;
    Ok(Harness {
        provider: SimulatedProvider::new(db.clone()),
        db,
        service,
        env,
        server,
        client,
    })
}

/// Stands between the service and the simulated provider as the card
/// network does: it can lose the answer to a charge that went through (what
/// payments dying right after the provider charged looks like), or hold a
/// charge on its way to the provider until the test lets it go.
#[derive(Clone)]
struct TestNetwork {
    provider: SimulatedProvider,
    faults: Arc<Faults>,
}

#[derive(Default)]
struct Faults {
    /// Keys whose next charge goes through at the provider, its answer lost.
    lose_answer: Mutex<HashSet<String>>,
    /// Keys whose next charge waits, before reaching the provider.
    held: Mutex<HashMap<String, Hold>>,
}

/// A held charge: `arrived` is signalled when it waits, `release` lets it go.
#[derive(Clone, Default)]
struct Hold {
    arrived: Arc<Notify>,
    release: Arc<Notify>,
}

impl TestNetwork {
    fn new(provider: SimulatedProvider) -> Self {
        Self {
            provider,
            faults: Arc::default(),
        }
    }

    fn lose_next_answer(&self, key: &str) {
        if let Ok(mut keys) = self.faults.lose_answer.lock() {
            keys.insert(key.to_owned());
        }
    }

    fn hold_next_charge(&self, key: &str) -> Hold {
        let hold = Hold::default();
        if let Ok(mut held) = self.faults.held.lock() {
            held.insert(key.to_owned(), hold.clone());
        }
        hold
    }
}

impl CardProvider for TestNetwork {
    async fn charge(
        &self,
        key: &str,
        card: &CardNumber,
        amount: &DomainMoney,
    ) -> Result<ChargeOutcome, ProviderError> {
        let hold = self
            .faults
            .held
            .lock()
            .ok()
            .and_then(|mut held| held.remove(key));
        if let Some(hold) = hold {
            hold.arrived.notify_one();
            hold.release.notified().await;
        }
        let outcome = self.provider.charge(key, card, amount).await?;
        let lost = self
            .faults
            .lose_answer
            .lock()
            .is_ok_and(|mut keys| keys.remove(key));
        if lost {
            return Err(ProviderError::Unavailable(Error::new(
                ErrorKind::Unavailable,
                "connection reset after the charge",
            )));
        }
        Ok(outcome)
    }

    async fn lookup(&self, key: &str) -> Result<Option<ChargeOutcome>, ProviderError> {
        self.provider.lookup(key).await
    }

    async fn void(&self, key: &str) -> Result<ChargeOutcome, ProviderError> {
        self.provider.void(key).await
    }

    async fn refund(&self, key: &str) -> Result<String, ProviderError> {
        self.provider.refund(key).await
    }
}

fn eur(amount_minor: i64) -> Option<Money> {
    Some(Money {
        currency_code: "EUR".into(),
        amount_minor,
    })
}

fn charge_request(payment_id: &str, user_id: &str, card: &str) -> pb::ChargeRequest {
    pb::ChargeRequest {
        payment_id: payment_id.into(),
        user_id: user_id.into(),
        amount: eur(2599),
        card_number: card.into(),
    }
}

fn new_user_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

impl Harness {
    async fn charge(&mut self, request: pb::ChargeRequest) -> Result<pb::Payment, Status> {
        let response = self
            .client
            .charge(with_token(request, &self.service))
            .await?;
        response
            .into_inner()
            .payment
            .ok_or_else(|| Status::internal("no payment in the response"))
    }

    async fn refund(&mut self, payment_id: &str) -> Result<pb::Payment, Status> {
        let request = pb::RefundRequest {
            payment_id: payment_id.into(),
        };
        let response = self
            .client
            .refund(with_token(request, &self.service))
            .await?;
        response
            .into_inner()
            .payment
            .ok_or_else(|| Status::internal("no payment in the response"))
    }

    async fn get_as(&mut self, id: &str, token: &str) -> Result<pb::Payment, Status> {
        let request = with_token(pb::GetPaymentRequest { id: id.into() }, token);
        let response = self.client.get_payment(request).await?;
        response
            .into_inner()
            .payment
            .ok_or_else(|| Status::internal("no payment in the response"))
    }

    async fn ledger(&self, payment_id: &str, operation: LedgerOperation) -> anyhow::Result<i64> {
        Ok(self.provider.ledger_entries(payment_id, operation).await?)
    }

    /// The stored status of a payment, read from the database.
    async fn stored_status(&self, payment_id: &str) -> anyhow::Result<Option<String>> {
        Ok(sqlx::query("SELECT status FROM payments WHERE id = $1")
            .bind(payment_id)
            .fetch_optional(self.db.pool())
            .await?
            .map(|row| row.try_get("status"))
            .transpose()?)
    }

    /// `(event type, aggregate id, version)` of every recorded event.
    async fn recorded_events(&self) -> anyhow::Result<Vec<(String, String, i64)>> {
        sqlx::query(
            "SELECT event_type, aggregate_id, aggregate_version FROM event_outbox ORDER BY id",
        )
        .fetch_all(self.db.pool())
        .await?
        .iter()
        .map(|row| {
            Ok((
                row.try_get("event_type")?,
                row.try_get("aggregate_id")?,
                row.try_get("aggregate_version")?,
            ))
        })
        .collect()
    }

    async fn payment_rows(&self) -> anyhow::Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM payments")
            .fetch_one(self.db.pool())
            .await?;
        Ok(row.try_get("n")?)
    }
}

async fn charge_succeeds_and_the_payer_reads_it(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let user_id = new_user_id();
    let payment = h
        .charge(charge_request(
            "order-1:charge",
            &user_id,
            "4242 4242 4242 4242",
        ))
        .await?;
    assert_eq!(payment.id, "order-1:charge");
    assert_eq!(payment.user_id, user_id);
    assert_eq!(payment.amount, eur(2599));
    assert_eq!(payment.status(), pb::PaymentStatus::Succeeded);
    assert_eq!(payment.card_last4, "4242");
    assert!(payment.decline_reason.is_empty());
    let (Some(created), Some(updated)) = (&payment.created_at, &payment.updated_at) else {
        anyhow::bail!("timestamps missing");
    };
    // Claimed first, settled when the provider answered.
    assert!((created.seconds, created.nanos) <= (updated.seconds, updated.nanos));

    let token = h.env.user_token(&user_id, "ada@example.com", &[])?;
    let read = h.get_as(&payment.id, &token).await?;
    assert_eq!(read, payment);
    assert_eq!(h.ledger(&payment.id, LedgerOperation::Charge).await?, 1);

    // Any other Luhn-valid number is approved too (a 15-digit Amex here).
    let amex = h
        .charge(charge_request(
            "order-2:charge",
            &user_id,
            "3782-822463-10005",
        ))
        .await?;
    assert_eq!(
        (amex.status(), amex.card_last4.as_str()),
        (pb::PaymentStatus::Succeeded, "0005")
    );
    h.server.stop().await
}

/// Sixteen identical charges at once: one payment, one charge at the
/// provider, and every caller sees that same payment.
async fn parallel_retries_charge_once(backend: Backend) -> anyhow::Result<()> {
    let h = start(backend).await?;
    let user_id = new_user_id();
    let racers: Vec<_> = (0..16)
        .map(|_| {
            let mut client = h.client.clone();
            let request = with_token(
                charge_request("saga-7:charge", &user_id, SUCCEEDING_CARD),
                &h.service,
            );
            tokio::spawn(async move { client.charge(request).await })
        })
        .collect();
    let mut seen = Vec::new();
    for racer in racers {
        let payment = racer.await??.into_inner().payment.expect("payment");
        seen.push(payment);
    }
    let first = seen.first().cloned().expect("16 answers");
    assert_eq!(first.id, "saga-7:charge");
    assert_eq!(first.status(), pb::PaymentStatus::Succeeded);
    for payment in &seen {
        // The same payment, down to its timestamps: one row was written.
        assert_eq!(payment, &first);
    }
    assert_eq!(h.payment_rows().await?, 1);
    assert_eq!(h.ledger("saga-7:charge", LedgerOperation::Charge).await?, 1);
    assert_eq!(
        h.ledger("saga-7:charge", LedgerOperation::Decline).await?,
        0
    );

    // The same race on a declined card: one decline, one answer for all.
    let racers: Vec<_> = (0..16)
        .map(|_| {
            let mut client = h.client.clone();
            let request = with_token(
                charge_request("saga-8:charge", &user_id, DECLINED_CARD),
                &h.service,
            );
            tokio::spawn(async move { client.charge(request).await })
        })
        .collect();
    for racer in racers {
        let status = racer.await?.expect_err("declined");
        assert_eq!(
            (status.code(), status.message()),
            (Code::FailedPrecondition, INSUFFICIENT_FUNDS)
        );
    }
    assert_eq!(h.payment_rows().await?, 2);
    assert_eq!(
        h.ledger("saga-8:charge", LedgerOperation::Decline).await?,
        1
    );
    assert_eq!(h.ledger("saga-8:charge", LedgerOperation::Charge).await?, 0);
    h.server.stop().await
}

async fn declined_card_is_kept_and_retried_the_same(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let user_id = new_user_id();
    let request = charge_request("p-declined", &user_id, "4000-0000-0000-0002");
    let status = h.charge(request.clone()).await.expect_err("declined card");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(status.message(), INSUFFICIENT_FUNDS);
    assert_eq!(reason_of(&status).as_deref(), Some(reason::CARD_DECLINED));

    // The decline is stored, visible to the payer with its reason.
    let token = h.env.user_token(&user_id, "ada@example.com", &[])?;
    let stored = h.get_as("p-declined", &token).await?;
    assert_eq!(stored.status(), pb::PaymentStatus::Declined);
    assert_eq!(stored.decline_reason, INSUFFICIENT_FUNDS);
    assert_eq!(stored.card_last4, "0002");

    // A retry gets the same answer from the stored payment: the provider is
    // not asked again.
    let again = h.charge(request).await.expect_err("still declined");
    assert_eq!(
        (again.code(), again.message()),
        (status.code(), status.message())
    );
    assert_eq!(reason_of(&again).as_deref(), Some(reason::CARD_DECLINED));
    assert_eq!(h.ledger("p-declined", LedgerOperation::Decline).await?, 1);
    assert_eq!(h.ledger("p-declined", LedgerOperation::Charge).await?, 0);
    assert_eq!(h.get_as("p-declined", &token).await?, stored);

    // Refunding a declined payment (a saga compensating) is fine and
    // changes nothing: nothing was charged.
    assert_eq!(h.refund("p-declined").await?, stored);
    assert_eq!(h.ledger("p-declined", LedgerOperation::Refund).await?, 0);
    h.server.stop().await
}

/// Reusing a payment id for another user, amount or card is refused, and
/// the first payment is untouched.
async fn same_id_for_another_charge_is_already_exists(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let user_id = new_user_id();
    let original = charge_request("p-1", &user_id, SUCCEEDING_CARD);
    let first = h.charge(original.clone()).await?;

    let other_user = pb::ChargeRequest {
        user_id: new_user_id(),
        ..original.clone()
    };
    let other_amount = pb::ChargeRequest {
        amount: eur(2600),
        ..original.clone()
    };
    let other_currency = pb::ChargeRequest {
        amount: Some(Money {
            currency_code: "USD".into(),
            amount_minor: 2599,
        }),
        ..original.clone()
    };
    let other_card = pb::ChargeRequest {
        card_number: "5555555555554444".into(),
        ..original.clone()
    };
    for conflicting in [other_user, other_amount, other_currency, other_card] {
        let status = h.charge(conflicting).await.expect_err("conflicting reuse");
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
        assert_eq!(
            reason_of(&status).as_deref(),
            Some(reason::PAYMENT_ID_REUSED)
        );
    }
    // The same card typed differently is the same card: a plain retry.
    let retry = pb::ChargeRequest {
        card_number: "4242-4242-4242-4242".into(),
        user_id: user_id.to_uppercase(),
        ..original.clone()
    };
    assert_eq!(h.charge(retry).await?, first);
    // A different card sharing the last four digits cannot be told apart
    // (nothing more of a number is kept): it is answered as the retry it
    // most likely is, and is never charged.
    let same_last4 = pb::ChargeRequest {
        card_number: "4000000000104242".into(),
        ..original.clone()
    };
    assert_eq!(h.charge(same_last4).await?, first);
    assert_eq!(h.ledger("p-1", LedgerOperation::Charge).await?, 1);
    assert_eq!(h.payment_rows().await?, 1);
    h.server.stop().await
}

async fn invalid_input_names_every_bad_field(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let all_bad = pb::ChargeRequest {
        payment_id: "has spaces/slashes".into(),
        user_id: "not-a-uuid".into(),
        amount: Some(Money {
            currency_code: "eur".into(),
            amount_minor: 0,
        }),
        card_number: "4242424242424241".into(),
    };
    let status = h.charge(all_bad).await.expect_err("every field is bad");
    assert_eq!(
        bad_fields(&status),
        [
            "amount.amount_minor",
            "amount.currency_code",
            "card_number",
            "payment_id",
            "user_id"
        ]
    );
    assert!(!status.message().contains("4242"), "{status:?}");

    let user_id = new_user_id();
    let status = h
        .charge(pb::ChargeRequest {
            amount: None,
            ..charge_request("p", &user_id, SUCCEEDING_CARD)
        })
        .await
        .expect_err("no amount");
    assert_eq!(bad_fields(&status), ["amount"]);
    let status = h
        .charge(pb::ChargeRequest {
            amount: eur(-5),
            ..charge_request("p", &user_id, SUCCEEDING_CARD)
        })
        .await
        .expect_err("negative amount");
    assert_eq!(bad_fields(&status), ["amount.amount_minor"]);
    let status = h
        .charge(charge_request("", &user_id, SUCCEEDING_CARD))
        .await
        .expect_err("empty id");
    assert_eq!(bad_fields(&status), ["payment_id"]);
    let status = h
        .charge(charge_request(&"p".repeat(129), &user_id, SUCCEEDING_CARD))
        .await
        .expect_err("long id");
    assert_eq!(bad_fields(&status), ["payment_id"]);
    let status = h
        .charge(charge_request(
            "p",
            &uuid::Uuid::nil().to_string(),
            SUCCEEDING_CARD,
        ))
        .await
        .expect_err("nil user");
    assert_eq!(bad_fields(&status), ["user_id"]);

    // Card numbers: Luhn failures, wrong lengths, stray characters. The
    // reason never repeats the number.
    for bad_card in [
        "4242424242424241",
        "4242 4242 4242 4243",
        "4000000000000001",
        "1234567890123",
        "0000000000000001",
        "42424242420",
        "42424242424242424242",
        "4242424242424242a",
        "4242.4242.4242.4242",
        "٤٢٤٢٤٢٤٢٤٢٤٢٤٢٤٢",
        "",
        " - ",
    ] {
        let status = h
            .charge(charge_request("p", &user_id, bad_card))
            .await
            .expect_err("bad card");
        assert_eq!(bad_fields(&status), ["card_number"], "{bad_card:?}");
        let details = status.get_details_bad_request().expect("details");
        let text = format!("{} {:?}", status.message(), details);
        let digits: String = bad_card.chars().filter(char::is_ascii_digit).collect();
        if digits.len() >= 8 {
            assert!(!text.contains(&digits), "{text} echoes the number");
            assert!(!text.contains(bad_card), "{text} echoes the input");
        }
    }

    // Oversized and garbage input is rejected, never a panic.
    let status = h
        .charge(pb::ChargeRequest {
            payment_id: "x".repeat(100_000),
            user_id: "\u{0}".repeat(10_000),
            amount: Some(Money {
                currency_code: "€".repeat(1000),
                amount_minor: i64::MIN,
            }),
            // Under `server.max_request_bytes` (256 KiB) with the rest,
            // so that each field is looked at.
            card_number: "9".repeat(100_000),
        })
        .await
        .expect_err("oversized");
    // Every field over its length limit in the contract, refused before the
    // handler: the amount (within them) is not looked at.
    assert_eq!(
        bad_fields(&status),
        [
            "amount.currency_code",
            "card_number",
            "payment_id",
            "user_id"
        ]
    );

    // Refund and GetPayment validate their ids too.
    let status = h.refund("drop table payments;").await.expect_err("bad id");
    assert_eq!(bad_fields(&status), ["payment_id"]);
    let status = h.refund("").await.expect_err("empty id");
    assert_eq!(bad_fields(&status), ["payment_id"]);
    let admin = h.env.admin_token()?;
    let status = h
        .get_as(&"x".repeat(10_000), &admin)
        .await
        .expect_err("long id");
    assert_eq!(bad_fields(&status), ["id"]);

    // Nothing was recorded by any of it.
    assert_eq!(h.payment_rows().await?, 0);
    h.server.stop().await
}

async fn refund_transitions_and_is_idempotent(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let user_id = new_user_id();
    let charged = h
        .charge(charge_request("p-refund", &user_id, SUCCEEDING_CARD))
        .await?;
    let refunded = h.refund("p-refund").await?;
    assert_eq!(refunded.status(), pb::PaymentStatus::Refunded);
    assert_eq!(
        (&refunded.id, &refunded.amount, &refunded.created_at),
        (&charged.id, &charged.amount, &charged.created_at)
    );
    let (Some(created), Some(updated)) = (&refunded.created_at, &refunded.updated_at) else {
        anyhow::bail!("timestamps missing");
    };
    assert!((updated.seconds, updated.nanos) >= (created.seconds, created.nanos));
    assert_eq!(h.ledger("p-refund", LedgerOperation::Refund).await?, 1);

    // Refunding again returns the refunded payment and refunds nothing more.
    assert_eq!(h.refund("p-refund").await?, refunded);
    assert_eq!(h.ledger("p-refund", LedgerOperation::Refund).await?, 1);

    // Concurrent refunds of one payment: one refund at the provider.
    h.charge(charge_request("p-race", &user_id, SUCCEEDING_CARD))
        .await?;
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let mut client = h.client.clone();
            let request = with_token(
                pb::RefundRequest {
                    payment_id: "p-race".into(),
                },
                &h.service,
            );
            tokio::spawn(async move { client.refund(request).await })
        })
        .collect();
    for racer in racers {
        let payment = racer.await??.into_inner().payment.expect("payment");
        assert_eq!(payment.status(), pb::PaymentStatus::Refunded);
    }
    assert_eq!(h.ledger("p-race", LedgerOperation::Refund).await?, 1);

    // A retried charge after the refund reports the stored outcome and does
    // not charge again.
    let retried = h
        .charge(charge_request("p-refund", &user_id, SUCCEEDING_CARD))
        .await?;
    assert_eq!(retried, refunded);
    assert_eq!(h.ledger("p-refund", LedgerOperation::Charge).await?, 1);

    h.server.stop().await
}

/// A capture and a refund each record their event with the state change;
/// a decline and a repeated refund record nothing.
async fn captures_and_refunds_record_their_events(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let user_id = new_user_id();
    h.charge(charge_request("p-events", &user_id, SUCCEEDING_CARD))
        .await?;
    h.charge(charge_request("p-events", &user_id, SUCCEEDING_CARD))
        .await?;
    let declined = h
        .charge(charge_request("p-declined", &user_id, DECLINED_CARD))
        .await;
    assert!(declined.is_err());
    h.refund("p-events").await?;
    h.refund("p-events").await?;
    // A refund of a payment never charged voids it: nothing to record.
    h.refund("p-never").await?;
    assert_eq!(
        h.recorded_events().await?,
        [
            (
                "agora.payments.v1.PaymentCaptured".to_owned(),
                "p-events".to_owned(),
                1
            ),
            (
                "agora.payments.v1.PaymentRefunded".to_owned(),
                "p-events".to_owned(),
                2
            ),
        ]
    );
    h.server.stop().await
}

/// Every column of every table of the service's database, as text, with
/// where it came from: `(table.column, value)`.
async fn every_stored_value(db: &Db) -> anyhow::Result<Vec<(String, String)>> {
    let columns_sql = match db.backend() {
        DbBackend::Postgres => {
            "SELECT CAST(table_name AS TEXT) AS t, CAST(column_name AS TEXT) AS c \
             FROM information_schema.columns WHERE table_schema = 'public'"
        }
        DbBackend::Sqlite => {
            "SELECT m.name AS t, p.name AS c FROM sqlite_master m \
             JOIN pragma_table_info(m.name) p WHERE m.type = 'table'"
        }
    };
    let columns: Vec<(String, String)> = sqlx::query(columns_sql)
        .fetch_all(db.pool())
        .await?
        .iter()
        .map(|row| Ok((row.try_get("t")?, row.try_get("c")?)))
        .collect::<Result<_, sqlx::Error>>()?;
    let mut values = Vec::new();
    for (table, column) in columns {
        // Names come from the database's own catalog, quoted as identifiers.
        let as_text = match db.backend() {
            DbBackend::Postgres => format!("CAST(\"{column}\" AS TEXT)"),
            DbBackend::Sqlite => format!("quote(\"{column}\")"),
        };
        let sql = format!("SELECT {as_text} AS v FROM \"{table}\"");
        for row in sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(db.pool())
            .await?
        {
            let value: Option<String> = row.try_get("v")?;
            values.push((format!("{table}.{column}"), value.unwrap_or_default()));
        }
    }
    Ok(values)
}

async fn card_numbers_are_stored_nowhere(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let user_id = new_user_id();
    let cards = [
        (SUCCEEDING_CARD, "4242 4242 4242 4242"),
        ("5555555555554444", "5555-5555-5555-4444"),
        ("378282246310005", "378282246310005"),
        ("6011111111111117", "6011 1111 1111 1117"),
        (DECLINED_CARD, "4000 0000 0000 0002"),
    ];
    for (i, (_, typed)) in cards.iter().enumerate() {
        let outcome = h
            .charge(charge_request(&format!("scan-{i}"), &user_id, typed))
            .await;
        if typed.starts_with("4000") {
            assert_eq!(
                outcome.expect_err("declined").code(),
                Code::FailedPrecondition
            );
        } else {
            outcome?;
        }
    }
    h.refund("scan-0").await?;

    let values = every_stored_value(&h.db).await?;
    // The scan does see the service's data: ids and last four digits.
    for i in 0..cards.len() {
        let id = format!("scan-{i}");
        assert!(
            values
                .iter()
                .any(|(at, v)| at == "payments.id" && v.contains(&id)),
            "{id} not seen: the scan is blind"
        );
    }
    assert!(
        values
            .iter()
            .any(|(at, v)| at == "payments.card_last4" && v.contains("4444"))
    );
    assert!(
        values
            .iter()
            .any(|(at, _)| at.starts_with("provider_ledger."))
    );
    for (digits, typed) in cards {
        for (at, value) in &values {
            assert!(!value.contains(digits), "{at} holds a full card number");
            assert!(!value.contains(typed), "{at} holds a full card number");
        }
    }

    // On SQLite, not even the raw database files hold the number.
    if backend == Backend::Sqlite {
        let url = h.env.database_url();
        let path = url
            .trim_start_matches("sqlite://")
            .split('?')
            .next()
            .unwrap_or_default()
            .to_owned();
        let mut scanned = 0;
        for file in [path.clone(), format!("{path}-wal")] {
            let Ok(bytes) = std::fs::read(&file) else {
                continue;
            };
            scanned += 1;
            for (digits, _) in cards {
                assert!(
                    !bytes.windows(digits.len()).any(|w| w == digits.as_bytes()),
                    "{file} holds a full card number"
                );
            }
        }
        assert!(scanned > 0, "no database file found at {path}");
    }
    h.server.stop().await
}

async fn charge_and_refund_are_for_services_only(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let user_id = new_user_id();
    let user = h.env.user_token(&user_id, "ada@example.com", &[])?;
    let admin = h.env.admin_token()?;
    let charge = || charge_request("p-access", &user_id, SUCCEEDING_CARD);

    let status = h.client.charge(charge()).await.expect_err("anonymous");
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = h
        .client
        .charge(with_token(charge(), "eyJhbGciOiJFZERTQSJ9.e30.AAAA"))
        .await
        .expect_err("forged");
    assert_eq!(status.code(), Code::Unauthenticated);
    for token in [&user, &admin] {
        let status = h
            .client
            .charge(with_token(charge(), token))
            .await
            .expect_err("not a service");
        assert_eq!(status.code(), Code::PermissionDenied);
    }
    // Even invalid input is refused before it is looked at.
    let status = h
        .client
        .charge(with_token(pb::ChargeRequest::default(), &user))
        .await
        .expect_err("not a service");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(h.payment_rows().await?, 0);
    h.charge(charge()).await?;

    let refund = || pb::RefundRequest {
        payment_id: "p-access".into(),
    };
    let status = h.client.refund(refund()).await.expect_err("anonymous");
    assert_eq!(status.code(), Code::Unauthenticated);
    for token in [&user, &admin] {
        let status = h
            .client
            .refund(with_token(refund(), token))
            .await
            .expect_err("not a service");
        assert_eq!(status.code(), Code::PermissionDenied);
    }
    assert_eq!(h.ledger("p-access", LedgerOperation::Refund).await?, 0);
    assert_eq!(
        h.refund("p-access").await?.status(),
        pb::PaymentStatus::Refunded
    );
    h.server.stop().await
}

async fn payments_are_read_by_the_payer_and_admins(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let payer_id = new_user_id();
    // The saga may send the id in any UUID spelling; the payer still owns it.
    let payment = h
        .charge(charge_request(
            "p-read",
            &payer_id.to_uppercase(),
            SUCCEEDING_CARD,
        ))
        .await?;
    assert_eq!(payment.user_id, payer_id);

    let payer = h.env.user_token(&payer_id, "ada@example.com", &[])?;
    let stranger = h.env.user_token(&new_user_id(), "eve@example.com", &[])?;
    let admin = h.env.admin_token()?;

    assert_eq!(h.get_as("p-read", &payer).await?, payment);
    assert_eq!(h.get_as("p-read", &admin).await?, payment);

    let status = h
        .client
        .get_payment(pb::GetPaymentRequest {
            id: "p-read".into(),
        })
        .await
        .expect_err("anonymous");
    assert_eq!(status.code(), Code::Unauthenticated);
    // Someone else's payment looks exactly like a missing one.
    let other = h.get_as("p-read", &stranger).await.expect_err("stranger");
    let missing = h.get_as("p-nope", &stranger).await.expect_err("unknown");
    assert_eq!(other.code(), Code::NotFound);
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(
        other.message().replace("p-read", "ID"),
        missing.message().replace("p-nope", "ID")
    );
    let status = h.get_as("p-nope", &admin).await.expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound);
    // Services charge and refund but do not read payments.
    let service = h.service.clone();
    let status = h.get_as("p-read", &service).await.expect_err("service");
    assert_eq!(status.code(), Code::PermissionDenied);
    h.server.stop().await
}

impl Harness {
    /// Waits (up to 10 s) until an admin reads the payment with `status`.
    async fn await_status(
        &mut self,
        payment_id: &str,
        status: pb::PaymentStatus,
    ) -> anyhow::Result<pb::Payment> {
        let admin = self.env.admin_token()?;
        let mut seen = None;
        for _ in 0..100 {
            match self.get_as(payment_id, &admin).await {
                Ok(payment) if payment.status() == status => return Ok(payment),
                Ok(payment) => seen = Some(payment.status()),
                // Still processing.
                Err(err) if err.code() == Code::Aborted => {}
                Err(err) => return Err(err.into()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("payment {payment_id} is {seen:?}, expected {status:?}")
    }

    async fn expect_voided(&mut self, request: pb::ChargeRequest) -> anyhow::Result<()> {
        let status = self.charge(request).await.expect_err("voided");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(reason_of(&status).as_deref(), Some(reason::PAYMENT_VOIDED));
        Ok(())
    }
}

/// The provider charged, and the answer was lost before the outcome was
/// recorded (payments died, the connection dropped): the payment stays
/// PROCESSING; the retry, or the saga's refund without the card, settles
/// it, and the card was charged once.
async fn a_charge_interrupted_after_the_provider_is_settled_once(
    backend: Backend,
) -> anyhow::Result<()> {
    let (mut h, network) = start_networked(backend, |_| {}).await?;
    let user_id = new_user_id();
    let request = charge_request("p-lost", &user_id, SUCCEEDING_CARD);
    network.lose_next_answer("p-lost");
    let status = h.charge(request.clone()).await.expect_err("answer lost");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(h.ledger("p-lost", LedgerOperation::Charge).await?, 1);
    assert_eq!(
        h.stored_status("p-lost").await?.as_deref(),
        Some("processing")
    );
    let payer = h.env.user_token(&user_id, "ada@example.com", &[])?;
    let status = h.get_as("p-lost", &payer).await.expect_err("processing");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");

    // The retry asks the provider again under the same key: same charge.
    let payment = h.charge(request.clone()).await?;
    assert_eq!(payment.status(), pb::PaymentStatus::Succeeded);
    assert_eq!(h.charge(request).await?, payment);
    assert_eq!(h.get_as("p-lost", &payer).await?, payment);
    assert_eq!(h.ledger("p-lost", LedgerOperation::Charge).await?, 1);

    // The same loss, then the saga compensates without the card: the
    // refund finds the charge at the provider, records it, refunds it.
    network.lose_next_answer("p-lost-2");
    h.charge(charge_request("p-lost-2", &user_id, SUCCEEDING_CARD))
        .await
        .expect_err("answer lost");
    let refunded = h.refund("p-lost-2").await?;
    assert_eq!(refunded.status(), pb::PaymentStatus::Refunded);
    assert_eq!(refunded.amount, eur(2599));
    assert_eq!(h.ledger("p-lost-2", LedgerOperation::Charge).await?, 1);
    assert_eq!(h.ledger("p-lost-2", LedgerOperation::Refund).await?, 1);

    // A decline whose answer was lost is a decline on the retry.
    network.lose_next_answer("p-lost-3");
    let declined = charge_request("p-lost-3", &user_id, DECLINED_CARD);
    let status = h.charge(declined.clone()).await.expect_err("answer lost");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let status = h.charge(declined).await.expect_err("declined");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::FailedPrecondition, Some(reason::CARD_DECLINED))
    );
    assert_eq!(h.ledger("p-lost-3", LedgerOperation::Decline).await?, 1);

    let captured = "agora.payments.v1.PaymentCaptured".to_owned();
    assert_eq!(
        h.recorded_events().await?,
        [
            (captured.clone(), "p-lost".to_owned(), 1),
            (captured, "p-lost-2".to_owned(), 1),
            (
                "agora.payments.v1.PaymentRefunded".to_owned(),
                "p-lost-2".to_owned(),
                2
            ),
        ]
    );
    h.server.stop().await
}

/// A refund of a payment id that was never charged (the saga compensating
/// a charge it never sent, or whose request was lost) leaves a tombstone:
/// VOIDED, and a charge with that id arriving later is refused.
async fn refunding_an_unknown_payment_voids_it(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let voided = h.refund("p-ghost").await?;
    assert_eq!(voided.id, "p-ghost");
    assert_eq!(voided.status(), pb::PaymentStatus::Voided);
    assert_eq!(
        (voided.amount.as_ref(), voided.user_id.as_str()),
        (None, "")
    );
    assert_eq!(h.refund("p-ghost").await?, voided);

    let user_id = new_user_id();
    for card in [SUCCEEDING_CARD, DECLINED_CARD] {
        h.expect_voided(charge_request("p-ghost", &user_id, card))
            .await?;
    }
    for operation in [LedgerOperation::Charge, LedgerOperation::Decline] {
        assert_eq!(h.ledger("p-ghost", operation).await?, 0);
    }
    let admin = h.env.admin_token()?;
    assert_eq!(h.get_as("p-ghost", &admin).await?, voided);
    assert_eq!(h.recorded_events().await?, []);
    h.server.stop().await
}

/// A refund arriving while its charge is still on its way to the provider
/// voids the payment there, so the charge, landing afterwards, cannot
/// succeed: no money moves.
async fn a_refund_overtaking_its_charge_voids_it(backend: Backend) -> anyhow::Result<()> {
    let (mut h, network) = start_networked(backend, |_| {}).await?;
    let user_id = new_user_id();
    let hold = network.hold_next_charge("p-race");
    let mut client = h.client.clone();
    let request = with_token(
        charge_request("p-race", &user_id, SUCCEEDING_CARD),
        &h.service,
    );
    let charging = tokio::spawn(async move { client.charge(request).await });
    // Claimed, and not at the provider yet.
    hold.arrived.notified().await;
    let refunded = h.refund("p-race").await?;
    assert_eq!(refunded.status(), pb::PaymentStatus::Voided);
    assert_eq!(refunded.amount, eur(2599));
    assert_eq!(refunded.user_id, user_id);

    hold.release.notify_one();
    let status = charging.await?.expect_err("voided in flight");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::FailedPrecondition, Some(reason::PAYMENT_VOIDED))
    );
    h.expect_voided(charge_request("p-race", &user_id, SUCCEEDING_CARD))
        .await?;
    assert_eq!(h.ledger("p-race", LedgerOperation::Charge).await?, 0);
    assert_eq!(h.ledger("p-race", LedgerOperation::Void).await?, 1);
    assert_eq!(h.recorded_events().await?, []);
    h.server.stop().await
}

/// Payments died between the claim and the settling, and nobody retried:
/// the sweeper settles the payment from the provider's books, or voids it
/// (there too) when the provider has nothing.
async fn the_sweeper_settles_what_a_crash_left_processing(backend: Backend) -> anyhow::Result<()> {
    let (mut h, network) = start_networked(backend, |config| {
        config.checkout.sweep_interval_ms = 100;
        config.checkout.payment_settle_after_ms = 300;
    })
    .await?;
    let user_id = new_user_id();
    // Died after the provider charged.
    network.lose_next_answer("p-charged");
    h.charge(charge_request("p-charged", &user_id, SUCCEEDING_CARD))
        .await
        .expect_err("answer lost");
    // Died after the claim, before the provider was asked.
    let now = agora_platform::time::now_micros();
    sqlx::query(
        "INSERT INTO payments (id, user_id, currency_code, amount_minor, status, card_last4, \
         decline_reason, created_at, updated_at) \
         VALUES ('p-claimed', $1, 'EUR', 2599, 'processing', '4242', '', $2, $2)",
    )
    .bind(&user_id)
    .bind(now)
    .execute(h.db.pool())
    .await?;

    let charged = h
        .await_status("p-charged", pb::PaymentStatus::Succeeded)
        .await?;
    h.await_status("p-claimed", pb::PaymentStatus::Voided)
        .await?;
    assert_eq!(h.ledger("p-charged", LedgerOperation::Charge).await?, 1);
    assert_eq!(h.ledger("p-claimed", LedgerOperation::Void).await?, 1);
    assert_eq!(h.ledger("p-claimed", LedgerOperation::Charge).await?, 0);

    // What the saga sees when it comes back.
    assert_eq!(
        h.charge(charge_request("p-charged", &user_id, SUCCEEDING_CARD))
            .await?,
        charged
    );
    h.expect_voided(charge_request("p-claimed", &user_id, SUCCEEDING_CARD))
        .await?;
    assert_eq!(
        h.recorded_events().await?,
        [(
            "agora.payments.v1.PaymentCaptured".to_owned(),
            "p-charged".to_owned(),
            1
        )]
    );
    h.server.stop().await
}

/// No database lock is held while the provider works: with one charge held
/// at the provider, its claim is committed, and other charges, refunds and
/// reads, and even a write to the claimed row, go through meanwhile.
async fn no_lock_is_held_during_the_provider_call(backend: Backend) -> anyhow::Result<()> {
    let (mut h, network) = start_networked(backend, |_| {}).await?;
    let user_id = new_user_id();
    let payer = h.env.user_token(&user_id, "ada@example.com", &[])?;
    let other = h
        .charge(charge_request("p-other", &user_id, SUCCEEDING_CARD))
        .await?;
    let hold = network.hold_next_charge("p-slow");
    let mut client = h.client.clone();
    let request = with_token(
        charge_request("p-slow", &user_id, SUCCEEDING_CARD),
        &h.service,
    );
    let charging = tokio::spawn(async move { client.charge(request).await });
    hold.arrived.notified().await;

    // Each well within SQLite's 5 s busy timeout, which a held write lock
    // would make them wait for.
    let soon = Duration::from_secs(2);
    assert_eq!(
        h.stored_status("p-slow").await?.as_deref(),
        Some("processing")
    );
    let read = tokio::time::timeout(soon, h.get_as("p-other", &payer)).await??;
    assert_eq!(read, other);
    let fast = tokio::time::timeout(
        soon,
        h.charge(charge_request("p-fast", &user_id, SUCCEEDING_CARD)),
    )
    .await??;
    assert_eq!(fast.status(), pb::PaymentStatus::Succeeded);
    let refunded = tokio::time::timeout(soon, h.refund("p-other")).await??;
    assert_eq!(refunded.status(), pb::PaymentStatus::Refunded);
    tokio::time::timeout(
        soon,
        sqlx::query("UPDATE payments SET updated_at = updated_at WHERE id = 'p-slow'")
            .execute(h.db.pool()),
    )
    .await??;
    assert!(!charging.is_finished(), "the held charge went on");

    hold.release.notify_one();
    let slow = charging.await??.into_inner().payment.expect("payment");
    assert_eq!(slow.status(), pb::PaymentStatus::Succeeded);
    assert_eq!(h.ledger("p-slow", LedgerOperation::Charge).await?, 1);
    h.server.stop().await
}

backend_tests!(
    charge_succeeds_and_the_payer_reads_it,
    parallel_retries_charge_once,
    declined_card_is_kept_and_retried_the_same,
    same_id_for_another_charge_is_already_exists,
    invalid_input_names_every_bad_field,
    refund_transitions_and_is_idempotent,
    captures_and_refunds_record_their_events,
    card_numbers_are_stored_nowhere,
    charge_and_refund_are_for_services_only,
    payments_are_read_by_the_payer_and_admins,
    a_charge_interrupted_after_the_provider_is_settled_once,
    refunding_an_unknown_payment_voids_it,
    a_refund_overtaking_its_charge_voids_it,
    the_sweeper_settles_what_a_crash_left_processing,
    no_lock_is_held_during_the_provider_call,
);
