//! Card numbers never reach the logs: every event of every crate, at TRACE,
//! is captured while the service charges, declines, rejects and refunds,
//! and the captured text is searched for the numbers.
//!
//! A binary of its own, because it installs the process-wide subscriber.

use agora_testkit::with_token;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use agora_payments::processor::{DECLINED_CARD, SUCCEEDING_CARD};
use agora_proto::common::v1::Money;
use agora_proto::payments::v1 as pb;
use agora_proto::payments::v1::payment_service_client::PaymentServiceClient;
use agora_testkit::{Backend, TestEnv, TestServer, backend_tests};
use tracing_subscriber::fmt::MakeWriter;

/// Everything logged by the process so far.
#[derive(Clone, Default)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    fn text(&self) -> String {
        self.0
            .lock()
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }
}

impl Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut bytes) = self.0.lock() {
            bytes.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for CapturedLogs {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// The process-wide capture, installed once for all tests of this binary.
fn captured() -> &'static CapturedLogs {
    static LOGS: OnceLock<CapturedLogs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = CapturedLogs::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(logs.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("first subscriber");
        logs
    })
}

async fn no_card_number_is_logged(backend: Backend) -> anyhow::Result<()> {
    let logs = captured();
    let env = TestEnv::new(backend).await?;
    let server = TestServer::start(vec![agora_payments::hosted(&env.config).await?]).await?;
    let mut client = PaymentServiceClient::new(server.channel()?);
    let service = env.service_token("orders", "payments")?;
    let user_id = uuid::Uuid::now_v7().to_string();
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let cards = [
        SUCCEEDING_CARD,
        "5555 5555 5555 4444",
        DECLINED_CARD,
        // Fails the Luhn check: rejected, and still not logged.
        "4242424242424241",
    ];
    for (i, card) in cards.iter().enumerate() {
        let request = pb::ChargeRequest {
            payment_id: format!("log-{tag}-{i}"),
            user_id: user_id.clone(),
            amount: Some(Money {
                currency_code: "EUR".into(),
                amount_minor: 100,
            }),
            card_number: (*card).to_owned(),
        };
        // Twice each: the retry path logs too.
        for _ in 0..2 {
            let _outcome = client.charge(with_token(request.clone(), &service)).await;
        }
    }
    client
        .refund(with_token(
            pb::RefundRequest {
                payment_id: format!("log-{tag}-0"),
            },
            &service,
        ))
        .await?;
    server.stop().await?;

    let text = logs.text();
    // The capture works: this test's charges were logged by id.
    assert!(
        text.contains(&format!("log-{tag}-0")),
        "the charges were not logged at all"
    );
    for card in cards {
        let digits: String = card.chars().filter(char::is_ascii_digit).collect();
        assert!(!text.contains(&digits), "a card number was logged");
        assert!(!text.contains(card), "a card number was logged");
    }
    Ok(())
}

backend_tests!(no_card_number_is_logged);
