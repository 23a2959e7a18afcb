//! `ListProducts`' text query stays bounded: a search among many products
//! finds the rare one on both backends, PostgreSQL serves it from the trigram
//! index, and a search that runs past its statement timeout is cancelled by
//! the database and answered with UNAVAILABLE and `SEARCH_TIMED_OUT` instead
//! of holding a connection.

use std::time::Duration;

use agora_catalog::domain::SearchQuery;
use agora_catalog::store::{
    CatalogStore, ProductFilter, SEARCH_TIMED_OUT, SqlCatalogStore, page_statement,
};
use agora_platform::config::Secret;
use agora_platform::db::Db;
use agora_platform::error::ErrorKind;
use agora_proto::catalog::v1 as pb;
use agora_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use agora_testkit::{Backend, TestEnv, TestServer, backend_tests, with_token};
use sqlx::Row as _;

/// Filler products: enough that reading them all is real work, and that
/// PostgreSQL's planner prefers an index to a scan.
const FILLERS: i64 = 20_000;

/// Adds `count` filler products straight into the catalog's tables (one
/// statement; the same SQL on both backends). None contains the letter "q"
/// nor the word "zebracorn".
async fn add_fillers(db: &Db, count: i64) -> anyhow::Result<()> {
    sqlx::query(
        "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < $1) \
         INSERT INTO products (id, sku, name, description, price_currency, \
         price_amount_minor, search_text, created_at, updated_at) \
         SELECT 'filler-' || n, 'FILLER-' || n, 'Filler ' || n, 'a plain thing, number ' || n, \
         'EUR', 100, 'filler ' || n || ' a plain thing, number ' || n, n, n FROM g",
    )
    .bind(count)
    .execute(db.pool())
    .await?;
    Ok(())
}

async fn connect(env: &TestEnv) -> anyhow::Result<Db> {
    Ok(Db::connect(&Secret::new(env.database_url().to_owned())).await?)
}

async fn a_rare_product_is_found_among_many(backend: Backend) -> anyhow::Result<()> {
    let env = TestEnv::new(backend).await?;
    let server = TestServer::start(vec![agora_catalog::hosted(&env.config).await?]).await?;
    let mut client = CatalogServiceClient::new(server.channel()?);
    let db = connect(&env).await?;
    add_fillers(&db, FILLERS).await?;
    let created = client
        .create_product(with_token(
            pb::CreateProductRequest {
                sku: "RARE".into(),
                name: "The Zebracorn".into(),
                description: "Striped, with one horn.".into(),
                price: Some(agora_proto::common::v1::Money {
                    currency_code: "EUR".into(),
                    amount_minor: 4200,
                }),
                categories: vec![],
            },
            &env.admin_token()?,
        ))
        .await?
        .into_inner()
        .product
        .expect("product");
    let search = |query: &str| pb::ListProductsRequest {
        page_size: 10,
        page_token: String::new(),
        query: query.into(),
        category: String::new(),
    };
    for query in ["zebracorn", "ZEBRA", "one horn", "e z"] {
        let page = client.list_products(search(query)).await?.into_inner();
        let skus: Vec<_> = page.products.iter().map(|p| p.sku.as_str()).collect();
        assert_eq!(skus, ["RARE"], "query {query:?}");
        assert_eq!(page.products[0].id, created.id);
        assert!(page.next_page_token.is_empty());
    }
    // A query that matches nothing reads through every product and says so.
    let page = client.list_products(search("q")).await?.into_inner();
    assert!(page.products.is_empty());
    // A common one fills its page and offers the next.
    let page = client.list_products(search("plain")).await?.into_inner();
    assert_eq!(page.products.len(), 10);
    assert!(!page.next_page_token.is_empty());
    // The longest query allowed is served; one more character is refused.
    let longest = "z".repeat(200);
    assert!(
        client
            .list_products(search(&longest))
            .await?
            .into_inner()
            .products
            .is_empty()
    );
    let status = client
        .list_products(search(&format!("{longest}z")))
        .await
        .expect_err("too long");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    server.stop().await
}

backend_tests!(a_rare_product_is_found_among_many);

/// PostgreSQL only (SQLite has no index for it): the statement a text search
/// runs is served by the trigram index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_serves_a_search_from_the_trigram_index() -> anyhow::Result<()> {
    let env = TestEnv::new(Backend::Postgres).await?;
    // Migrates the database.
    let _service = agora_catalog::hosted(&env.config).await?;
    let db = connect(&env).await?;
    add_fillers(&db, FILLERS).await?;
    sqlx::query("ANALYZE products").execute(db.pool()).await?;
    let pattern = SearchQuery::parse("zebracorn")
        .map_err(anyhow::Error::msg)?
        .expect("a query")
        .like_pattern();
    let explain = format!("EXPLAIN {}", page_statement(true, false));
    let rows = sqlx::query(sqlx::AssertSqlSafe(explain))
        .bind(i64::MAX)
        .bind("")
        .bind(51_i64)
        .bind(pattern)
        .fetch_all(db.pool())
        .await?;
    let mut plan = String::new();
    for row in &rows {
        plan.push_str(&row.try_get::<String, _>(0)?);
        plan.push('\n');
    }
    assert!(
        plan.contains("products_search_text_trgm_idx"),
        "the search does not use the trigram index:\n{plan}"
    );
    Ok(())
}

/// PostgreSQL only (SQLite has no statement timeout): a search that runs
/// past the store's timeout is cancelled by the database and reported as
/// such; the same search within the default timeout answers, and the
/// connection it ran on keeps no timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cancels_a_search_past_its_statement_timeout() -> anyhow::Result<()> {
    let env = TestEnv::new(Backend::Postgres).await?;
    let _service = agora_catalog::hosted(&env.config).await?;
    let db = connect(&env).await?;
    // Reading this many rows for a one-letter query that matches none (a
    // trigram index cannot serve one letter) takes well over a millisecond.
    add_fillers(&db, 5 * FILLERS).await?;
    let outbox = agora_platform_events::Outbox::new(db.clone());
    let filter = ProductFilter {
        query: SearchQuery::parse("q").map_err(anyhow::Error::msg)?,
        category: None,
    };
    let hasty = SqlCatalogStore::new(outbox.clone()).with_search_timeout(Duration::from_millis(1));
    let err = hasty
        .list(&filter, None, 51)
        .await
        .expect_err("cancelled by the statement timeout");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err:?}");
    assert_eq!(err.reason(), Some(SEARCH_TIMED_OUT));
    // Listings without a query run without the timeout, on the same pool.
    assert_eq!(
        hasty.list(&ProductFilter::default(), None, 5).await?.len(),
        5
    );
    let patient = SqlCatalogStore::new(outbox);
    assert!(patient.list(&filter, None, 51).await?.is_empty());
    // SET LOCAL ended with each search's transaction: pooled connections
    // (several at once, so not only the idle one) have no timeout set.
    let pool_size = 8;
    let checks = (0..pool_size).map(|_| {
        let db = db.clone();
        async move {
            let timeout: String = sqlx::query_scalar("SELECT current_setting('statement_timeout')")
                .fetch_one(db.pool())
                .await?;
            anyhow::Ok(timeout)
        }
    });
    for timeout in futures::future::try_join_all(checks).await? {
        assert_eq!(timeout, "0");
    }
    Ok(())
}
