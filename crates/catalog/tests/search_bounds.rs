//! `ListProducts`' text query stays bounded: a search among many products
//! finds the rare one on both backends, PostgreSQL serves it from the trigram
//! index, and a search that runs past its statement timeout is cancelled by
//! the database and answered with DEADLINE_EXCEEDED (no RetryInfo) and
//! `SEARCH_TIMED_OUT` instead of holding a connection.

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
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded, "{err:?}");
    assert_eq!(err.reason(), Some(SEARCH_TIMED_OUT));
    // Retrying the same search at once would time out again.
    assert_eq!(err.retry_after(), None, "{err:?}");
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        agora_platform::error::reason_of(&status).as_deref(),
        Some(SEARCH_TIMED_OUT)
    );
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

/// Whether the catalog's trigram index exists in `db`.
async fn has_trigram_index(db: &Db) -> anyhow::Result<bool> {
    let found: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_indexes WHERE indexname = 'products_search_text_trgm_idx'",
    )
    .fetch_one(db.pool())
    .await?;
    Ok(found > 0)
}

/// Migrates a fresh catalog database as a role that is not its owner and
/// lacks CREATE on it (it may create tables in `public` only), after the
/// owner installed `pg_trgm` or not, then searches through the service.
/// Returns whether the trigram index was created.
async fn migrate_as_a_plain_role(extension_installed: bool) -> anyhow::Result<bool> {
    let mut env = TestEnv::new(Backend::Postgres).await?;
    let owner = connect(&env).await?;
    let role = format!("catalog_{}", uuid::Uuid::new_v4().simple());
    // The role's name is ours (hex), so formatting it in is safe.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN; GRANT CREATE, USAGE ON SCHEMA public TO {role}"
    )))
    .execute(owner.pool())
    .await?;
    if extension_installed {
        sqlx::query("CREATE EXTENSION pg_trgm")
            .execute(owner.pool())
            .await?;
    }
    let role_url = env
        .database_url()
        .replacen("://postgres@", &format!("://{role}@"), 1);
    anyhow::ensure!(role_url != env.database_url(), "unexpected test URL shape");
    env.config.catalog.database_url = Some(Secret::new(role_url));
    let outcome = async {
        // Migrates as the role: it must start either way.
        let server = TestServer::start(vec![agora_catalog::hosted(&env.config).await?]).await?;
        let indexed = has_trigram_index(&owner).await?;
        add_fillers(&owner, 1_000).await?;
        let mut client = CatalogServiceClient::new(server.channel()?);
        client
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
            .await?;
        let page = client
            .list_products(pb::ListProductsRequest {
                page_size: 10,
                page_token: String::new(),
                query: "zebracorn".into(),
                category: String::new(),
            })
            .await?
            .into_inner();
        let skus: Vec<_> = page.products.iter().map(|p| p.sku.as_str()).collect();
        assert_eq!(skus, ["RARE"]);
        server.stop().await?;
        anyhow::Ok(indexed)
    }
    .await;
    // The role owns the catalog's tables: drop them with it (best effort:
    // the throwaway cluster goes away after the run anyway).
    let dropped = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP OWNED BY {role}; DROP ROLE {role}"
    )))
    .execute(owner.pool())
    .await;
    if let Err(err) = dropped {
        eprintln!("could not drop the test role {role}: {err}");
    }
    outcome
}

/// A database user without CREATE on the database cannot create `pg_trgm`:
/// the migration skips the index (with a NOTICE) instead of failing, so the
/// catalog still starts and searches, bounded by the statement timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrates_without_the_extension_privilege_and_searches_without_the_index()
-> anyhow::Result<()> {
    assert!(
        !migrate_as_a_plain_role(false).await?,
        "no extension, no index"
    );
    Ok(())
}

/// When an administrator installed `pg_trgm`, the same plain role's
/// migration builds the index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_builds_the_index_when_the_extension_was_installed_for_the_role()
-> anyhow::Result<()> {
    assert!(
        migrate_as_a_plain_role(true).await?,
        "the extension is there: the index must be built"
    );
    Ok(())
}
