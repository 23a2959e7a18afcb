//! Unit-test helpers: an orders store on a fresh SQLite file, and a new
//! order to put in it.

use agora_platform::config::Secret;
use agora_platform::db::Db;
use agora_platform::money::Money;

use crate::changes::OrderChanges;
use crate::domain::{NewOrder, OrderItem};
use crate::store::SqlOrderStore;

/// A store on a migrated SQLite database in `dir`, signalling `changes`.
pub(crate) async fn sqlite_store(dir: &tempfile::TempDir, changes: OrderChanges) -> SqlOrderStore {
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("orders.db").display()
    );
    let db = Db::connect_and_migrate(&Secret::new(url), crate::MIGRATIONS)
        .await
        .expect("sqlite database");
    agora_platform_events::migrate(&db)
        .await
        .expect("events tables");
    SqlOrderStore::with_changes(agora_platform_events::Outbox::new(db), changes)
}

/// One unit of product `p1` for user `u1`, under a new request id.
pub(crate) fn new_order() -> NewOrder {
    NewOrder {
        user_id: "u1".into(),
        request_id: uuid::Uuid::new_v4().to_string(),
        items: vec![OrderItem {
            product_id: "p1".into(),
            quantity: 1,
            unit_price: Money {
                currency_code: "EUR".into(),
                amount_minor: 100,
            },
        }],
        currency: "EUR".into(),
    }
}
