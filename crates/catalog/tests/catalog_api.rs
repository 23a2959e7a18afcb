//! The catalog service over real gRPC on loopback, against a fresh database.
//! Every test runs twice: on PostgreSQL and on SQLite.

use agora_testkit::bad_fields;
use agora_testkit::with_token;
use std::collections::HashSet;

use agora_catalog::domain::{PriceChange, ProductChanges, ProductName};
use agora_catalog::store::{CatalogStore, SqlCatalogStore};
use agora_platform::config::Secret;
use agora_platform::db::Db;
use agora_platform::money::Money;
use agora_platform::pagination::Cursor;
use agora_proto::catalog::v1 as pb;
use agora_proto::catalog::v1::ProductPriceChanged;
use agora_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use agora_proto::common::v1::Money as PbMoney;
use agora_testkit::{Backend, TestEnv, TestServer, backend_tests};
use futures::StreamExt as _;
use prost_types::FieldMask;
use sqlx::Row as _;
use tonic::Code;
use tonic::transport::Channel;

struct Harness {
    env: TestEnv,
    server: TestServer,
    client: CatalogServiceClient<Channel>,
    admin: String,
}

async fn start(backend: Backend) -> anyhow::Result<Harness> {
    let env = TestEnv::new(backend).await?;
    let server = TestServer::start(vec![agora_catalog::hosted(&env.config).await?]).await?;
    let client = CatalogServiceClient::new(server.channel()?);
    let admin = env.admin_token()?;
    Ok(Harness {
        env,
        server,
        client,
        admin,
    })
}

fn eur(amount_minor: i64) -> Option<PbMoney> {
    Some(PbMoney {
        currency_code: "EUR".into(),
        amount_minor,
    })
}

fn new_product(
    sku: &str,
    name: &str,
    description: &str,
    categories: &[&str],
) -> pb::CreateProductRequest {
    pb::CreateProductRequest {
        sku: sku.into(),
        name: name.into(),
        description: description.into(),
        price: eur(1999),
        categories: categories.iter().map(|c| (*c).to_owned()).collect(),
    }
}

/// Creates a product as admin.
async fn create(h: &mut Harness, request: pb::CreateProductRequest) -> anyhow::Result<pb::Product> {
    let product = h
        .client
        .create_product(with_token(request, &h.admin))
        .await?
        .into_inner()
        .product
        .expect("product");
    Ok(product)
}

/// Creates `count` products `{prefix}-{i}` as admin, 16 at a time.
async fn create_many(h: &Harness, prefix: &str, count: usize) -> anyhow::Result<Vec<pb::Product>> {
    let requests = (0..count).map(|i| {
        let mut client = h.client.clone();
        let request = with_token(
            new_product(&format!("{prefix}-{i}"), &format!("Product {i}"), "", &[]),
            &h.admin,
        );
        async move { client.create_product(request).await }
    });
    let results: Vec<_> = futures::stream::iter(requests)
        .buffer_unordered(16)
        .collect()
        .await;
    let mut products = Vec::with_capacity(count);
    for result in results {
        products.push(result?.into_inner().product.expect("product"));
    }
    Ok(products)
}

fn list(page_size: i32, page_token: &str, query: &str, category: &str) -> pb::ListProductsRequest {
    pb::ListProductsRequest {
        page_size,
        page_token: page_token.into(),
        query: query.into(),
        category: category.into(),
    }
}

/// Every page of a listing, as one list of products; anonymous.
async fn list_all(
    h: &mut Harness,
    page_size: i32,
    query: &str,
    category: &str,
) -> anyhow::Result<Vec<pb::Product>> {
    let mut products = Vec::new();
    let mut token = String::new();
    loop {
        let page = h
            .client
            .list_products(list(page_size, &token, query, category))
            .await?
            .into_inner();
        products.extend(page.products);
        if page.next_page_token.is_empty() {
            return Ok(products);
        }
        token = page.next_page_token;
    }
}

fn skus(products: &[pb::Product]) -> Vec<String> {
    products.iter().map(|p| p.sku.clone()).collect()
}

fn update(product: pb::Product, paths: &[&str]) -> pb::UpdateProductRequest {
    pb::UpdateProductRequest {
        product: Some(product),
        update_mask: Some(FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
    }
}

async fn create_and_get_round_trip(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let created = create(
        &mut h,
        pb::CreateProductRequest {
            sku: " BOOK-RUST_1.0 ".into(),
            name: "  The Rust Programming Language ".into(),
            description: "From ownership\nto async. ".into(),
            price: eur(3999),
            categories: vec!["books".into(), "programming".into(), "books".into()],
        },
    )
    .await?;
    assert!(uuid::Uuid::parse_str(&created.id).is_ok());
    assert_eq!(created.sku, "BOOK-RUST_1.0");
    assert_eq!(created.name, "The Rust Programming Language");
    assert_eq!(created.description, "From ownership\nto async.");
    assert_eq!(created.price, eur(3999));
    // Duplicates removed, first-given order kept.
    assert_eq!(created.categories, ["books", "programming"]);
    assert!(created.created_at.is_some());
    assert_eq!(created.created_at, created.updated_at);

    // Anyone may read it, and reads give back exactly what was created.
    let read = h
        .client
        .get_product(pb::GetProductRequest {
            id: created.id.to_uppercase(),
        })
        .await?
        .into_inner()
        .product
        .expect("product");
    assert_eq!(read, created);

    // Unknown ids are NOT_FOUND; malformed ones are INVALID_ARGUMENT on `id`.
    let status = h
        .client
        .get_product(pb::GetProductRequest {
            id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound);
    for bad in [
        "",
        "x'; DROP TABLE products; --",
        "\u{0}",
        &"f".repeat(100_000),
    ] {
        let status = h
            .client
            .get_product(pb::GetProductRequest { id: bad.into() })
            .await
            .expect_err("bad id");
        assert_eq!(bad_fields(&status), ["id"]);
    }

    // A product without categories or description reads back as such.
    let plain = create(&mut h, new_product("PLAIN", "Plain", "", &[])).await?;
    let read = h
        .client
        .get_product(pb::GetProductRequest {
            id: plain.id.clone(),
        })
        .await?
        .into_inner()
        .product
        .expect("product");
    assert!(read.categories.is_empty());
    assert_eq!(read, plain);
    h.server.stop().await
}

async fn duplicate_sku_is_already_exists(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    create(&mut h, new_product("MUG-1", "Mug", "", &[])).await?;
    let status = h
        .client
        .create_product(with_token(
            new_product(" MUG-1 ", "Other", "", &[]),
            &h.admin,
        ))
        .await
        .expect_err("duplicate sku");
    assert_eq!(status.code(), Code::AlreadyExists);
    // SKUs are case-sensitive: another case is another SKU.
    create(&mut h, new_product("mug-1", "Mug", "", &[])).await?;
    // The failed attempt left nothing behind.
    let all = list_all(&mut h, 0, "", "").await?;
    assert_eq!(skus(&all), ["mug-1", "MUG-1"]);
    h.server.stop().await
}

async fn create_validation_names_every_bad_field(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let mut create_status = async |request: pb::CreateProductRequest| {
        h.client
            .create_product(with_token(request, &h.admin))
            .await
            .expect_err("invalid")
    };

    let status = create_status(pb::CreateProductRequest {
        sku: "no spaces allowed".into(),
        name: "   ".into(),
        description: "d".repeat(5001),
        price: None,
        categories: vec![
            "ok".into(),
            "Not-Lowercase".into(),
            "ok".into(),
            String::new(),
        ],
    })
    .await;
    assert_eq!(
        bad_fields(&status),
        [
            "categories[1]",
            "categories[3]",
            "description",
            "name",
            "price",
            "sku"
        ]
    );

    let status = create_status(pb::CreateProductRequest {
        price: Some(PbMoney {
            currency_code: "eur".into(),
            amount_minor: 0,
        }),
        ..new_product("OK", "Ok", "", &[])
    })
    .await;
    assert_eq!(
        bad_fields(&status),
        ["price.amount_minor", "price.currency_code"]
    );
    let status = create_status(pb::CreateProductRequest {
        price: eur(-5),
        ..new_product("OK", "Ok", "", &[])
    })
    .await;
    assert_eq!(bad_fields(&status), ["price.amount_minor"]);

    // Each rule on its own.
    let cases: Vec<(pb::CreateProductRequest, &str)> = vec![
        (new_product("", "Ok", "", &[]), "sku"),
        (new_product(&"S".repeat(65), "Ok", "", &[]), "sku"),
        (new_product("SKU/1", "Ok", "", &[]), "sku"),
        (new_product("OK", &"n".repeat(201), "", &[]), "name"),
        (new_product("OK", "Tab\tin name", "", &[]), "name"),
        (
            new_product("OK", "Ok", "nul \u{0} byte", &[]),
            "description",
        ),
        (
            new_product("OK", "Ok", "", &[&"c".repeat(51)]),
            "categories[0]",
        ),
        (
            new_product("OK", "Ok", "", &["under_score"]),
            "categories[0]",
        ),
    ];
    for (request, field) in cases {
        let status = create_status(request).await;
        assert_eq!(bad_fields(&status), [field]);
    }
    let twenty_one: Vec<String> = (0..21).map(|i| format!("c{i}")).collect();
    let status = create_status(pb::CreateProductRequest {
        categories: twenty_one,
        ..new_product("OK", "Ok", "", &[])
    })
    .await;
    assert_eq!(bad_fields(&status), ["categories"]);

    // Garbage and oversized input is rejected, never a panic, and a huge list
    // of bad categories gives one violation, not one per entry. The server
    // refuses what is over the contract's length limits before the handler
    // runs, so the price (within them) is not looked at. (Sizes stay under
    // `server.max_request_bytes`, 256 KiB: a larger message is refused
    // whole, as too large, before its fields are looked at.)
    let status = create_status(pb::CreateProductRequest {
        sku: "\u{0}".repeat(10_000),
        name: "\u{feff}\u{7}".repeat(5_000),
        description: "x".repeat(100_000),
        price: Some(PbMoney {
            currency_code: "€€€".into(),
            amount_minor: i64::MIN,
        }),
        categories: (0..5_000).map(|i| format!("BAD {i}")).collect(),
    })
    .await;
    assert_eq!(
        bad_fields(&status),
        ["categories", "description", "name", "sku"]
    );

    // Nothing was stored by any of these.
    let all = list_all(&mut h, 0, "", "").await?;
    assert!(all.is_empty(), "{all:?}");
    // The limits themselves are accepted.
    let twenty: Vec<String> = (0..20).map(|i| format!("c{i}")).collect();
    create(
        &mut h,
        pb::CreateProductRequest {
            sku: "S".repeat(64),
            name: "n".repeat(200),
            description: "d".repeat(5000),
            price: eur(1),
            categories: twenty,
        },
    )
    .await?;
    h.server.stop().await
}

async fn pages_default_to_50_and_cap_at_500(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let created = create_many(&h, "BULK", 501).await?;

    let page = h
        .client
        .list_products(list(0, "", "", ""))
        .await?
        .into_inner();
    assert_eq!(page.products.len(), 50);
    assert!(!page.next_page_token.is_empty());

    let page = h
        .client
        .list_products(list(i32::MAX, "", "", ""))
        .await?
        .into_inner();
    assert_eq!(page.products.len(), 500);
    let rest = h
        .client
        .list_products(list(i32::MAX, &page.next_page_token, "", ""))
        .await?
        .into_inner();
    assert_eq!(rest.products.len(), 1);
    assert!(rest.next_page_token.is_empty(), "no page after the last");

    // Walking every default-sized page returns each product exactly once.
    let all = list_all(&mut h, 0, "", "").await?;
    assert_eq!(all.len(), 501);
    let listed: HashSet<_> = all.iter().map(|p| p.id.clone()).collect();
    let expected: HashSet<_> = created.iter().map(|p| p.id.clone()).collect();
    assert_eq!(listed, expected);

    let status = h
        .client
        .list_products(list(-1, "", "", ""))
        .await
        .expect_err("negative page size");
    assert_eq!(bad_fields(&status), ["page_size"]);
    h.server.stop().await
}

/// Pages through the catalog while products are added between pages: every
/// product that existed at the start is returned exactly once, newest first.
async fn pagination_is_stable_while_products_are_added(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let mut original = Vec::new();
    for i in 0..23 {
        original.push(create(&mut h, new_product(&format!("OLD-{i:02}"), "Old", "", &[])).await?);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = h
            .client
            .list_products(list(5, &token, "", ""))
            .await?
            .into_inner();
        assert!(page.products.len() <= 5);
        seen.extend(page.products);
        pages += 1;
        // New products arrive while the client is between pages.
        for j in 0..3 {
            create(
                &mut h,
                new_product(&format!("NEW-{pages}-{j}"), "New", "", &[]),
            )
            .await?;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 5);
    let expected: Vec<String> = original.iter().rev().map(|p| p.sku.clone()).collect();
    assert_eq!(skus(&seen), expected, "no skip, no duplicate, newest first");
    h.server.stop().await
}

async fn bad_list_input_is_invalid_argument(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let cursor = |id: &str| {
        Cursor {
            key: 1,
            id: id.to_owned(),
        }
        .encode()
    };
    for token in [
        "garbage!".to_owned(),
        // base64url of `not json` and of `{}`.
        "bm90IGpzb24".to_owned(),
        "e30".to_owned(),
        // Well-formed cursors whose id is not one of ours.
        cursor("not-a-uuid"),
        cursor("\u{0}"),
        "A".repeat(100_000),
    ] {
        let status = h
            .client
            .list_products(list(0, &token, "", ""))
            .await
            .expect_err("bad token");
        assert_eq!(bad_fields(&status), ["page_token"], "{token:.40}");
    }
    // All bad fields at once.
    let status = h
        .client
        .list_products(list(-5, "garbage!", &"q".repeat(201), "Not A Slug"))
        .await
        .expect_err("four bad fields");
    assert_eq!(
        bad_fields(&status),
        ["category", "page_size", "page_token", "query"]
    );
    let status = h
        .client
        .list_products(list(0, "", "nul\u{0}", ""))
        .await
        .expect_err("control character");
    assert_eq!(bad_fields(&status), ["query"]);
    h.server.stop().await
}

async fn query_and_category_filter_and_combine(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let catalog = [
        (
            "RUST",
            "Rust Book",
            "Ownership to async.",
            &["books", "programming"][..],
        ),
        (
            "MUG",
            "Ferris Mug",
            "A ceramic MUG with Ferris.",
            &["merch", "kitchen"][..],
        ),
        (
            "SHIRT",
            "100% Cotton Shirt",
            "Printed gRPC logo.",
            &["merch", "clothing"][..],
        ),
        (
            "GUIDE",
            "snake_case guide",
            "Naming, explained.",
            &["books"][..],
        ),
        ("ALBUM", "ÉTÉ Älbum", "Músic for summer.", &["music"][..]),
        ("PATH", "Path Poster", r"C:\Windows in art.", &["merch"][..]),
    ];
    for (sku, name, description, categories) in catalog {
        create(&mut h, new_product(sku, name, description, categories)).await?;
    }
    let cases: &[(&str, &str, &[&str])] = &[
        // Case-insensitive substring of name or description, newest first.
        ("rust", "", &["RUST"]),
        ("FERRIS", "", &["MUG"]),
        ("ceramic mug", "", &["MUG"]),
        ("  explained ", "", &["GUIDE"]),
        // LIKE's own characters match only themselves.
        ("100%", "", &["SHIRT"]),
        ("%", "", &["SHIRT"]),
        ("_", "", &["GUIDE"]),
        ("\\", "", &["PATH"]),
        ("c:\\w", "", &["PATH"]),
        // Case folding beyond ASCII, the same on both backends.
        ("été älbum", "", &["ALBUM"]),
        ("MÚSIC", "", &["ALBUM"]),
        // Category only, then both together.
        ("", "merch", &["PATH", "SHIRT", "MUG"]),
        ("", "books", &["GUIDE", "RUST"]),
        ("", "unknown", &[]),
        ("cotton", "merch", &["SHIRT"]),
        ("mug", "books", &[]),
        ("e", "books", &["GUIDE", "RUST"]),
        // No match across the name/description boundary.
        ("book ownership", "", &[]),
        ("nothing like this", "", &[]),
    ];
    for (query, category, expected) in cases {
        let found = list_all(&mut h, 0, query, category).await?;
        assert_eq!(
            skus(&found),
            *expected,
            "query {query:?} category {category:?}"
        );
        // The same listing one product per page gives the same answer.
        let paged = list_all(&mut h, 1, query, category).await?;
        assert_eq!(skus(&paged), *expected, "paged {query:?} {category:?}");
    }
    h.server.stop().await
}

async fn update_changes_only_masked_fields(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let original = create(
        &mut h,
        new_product("MUG", "Ferris Mug", "Ceramic.", &["merch", "kitchen"]),
    )
    .await?;

    // The mask names the price only: the other (different) fields are ignored.
    let mut change = original.clone();
    change.name = "Ignored".into();
    change.description = "Ignored".into();
    change.categories = vec!["ignored".into()];
    change.price = eur(1499);
    let updated = h
        .client
        .update_product(with_token(update(change, &["price"]), &h.admin))
        .await?
        .into_inner()
        .product
        .expect("product");
    assert_eq!(updated.price, eur(1499));
    assert_eq!(
        (&updated.name, &updated.description, &updated.categories),
        (&original.name, &original.description, &original.categories)
    );
    assert_eq!(updated.created_at, original.created_at);
    let updated_at = |p: &pb::Product| p.updated_at.map(|t| (t.seconds, t.nanos));
    assert!(
        updated_at(&updated) > updated_at(&original),
        "updated_at bumps"
    );

    // Several fields at once; an empty category list clears the categories.
    let change = pb::Product {
        id: original.id.clone(),
        name: " Big Ferris Mug ".into(),
        description: "Now 500 ml.".into(),
        categories: vec![],
        ..Default::default()
    };
    let again = h
        .client
        .update_product(with_token(
            update(change, &["name", "description", "categories"]),
            &h.admin,
        ))
        .await?
        .into_inner()
        .product
        .expect("product");
    assert_eq!(again.name, "Big Ferris Mug");
    assert_eq!(again.description, "Now 500 ml.");
    assert!(again.categories.is_empty());
    assert_eq!(again.price, eur(1499));
    assert!(updated_at(&again) > updated_at(&updated));

    // New categories replace the old ones, in the given order.
    let change = pb::Product {
        id: original.id.clone(),
        categories: vec!["kitchen".into(), "gifts".into(), "kitchen".into()],
        ..Default::default()
    };
    let recategorized = h
        .client
        .update_product(with_token(update(change, &["categories"]), &h.admin))
        .await?
        .into_inner()
        .product
        .expect("product");
    assert_eq!(recategorized.categories, ["kitchen", "gifts"]);

    // Reads and filters see the stored result.
    let read = h
        .client
        .get_product(pb::GetProductRequest {
            id: original.id.clone(),
        })
        .await?
        .into_inner()
        .product
        .expect("product");
    assert_eq!(read, recategorized);
    assert!(list_all(&mut h, 0, "", "merch").await?.is_empty());
    assert_eq!(skus(&list_all(&mut h, 0, "", "gifts").await?), ["MUG"]);
    assert_eq!(skus(&list_all(&mut h, 0, "500 ml", "").await?), ["MUG"]);
    assert!(list_all(&mut h, 0, "ceramic", "").await?.is_empty());

    // Unknown products are NOT_FOUND.
    let change = pb::Product {
        id: uuid::Uuid::now_v7().to_string(),
        price: eur(1),
        ..Default::default()
    };
    let status = h
        .client
        .update_product(with_token(update(change, &["price"]), &h.admin))
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound);
    h.server.stop().await
}

async fn update_validation_names_every_bad_field(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let product = create(&mut h, new_product("MUG", "Mug", "", &[])).await?;
    let admin = h.admin.clone();
    let mut update_status = async |request: pb::UpdateProductRequest| {
        h.client
            .update_product(with_token(request, &admin))
            .await
            .expect_err("invalid")
    };

    let status = update_status(pb::UpdateProductRequest {
        product: Some(product.clone()),
        update_mask: None,
    })
    .await;
    assert_eq!(bad_fields(&status), ["update_mask"]);
    let status = update_status(update(product.clone(), &[])).await;
    assert_eq!(bad_fields(&status), ["update_mask"]);
    for path in ["sku", "id", "price.amount_minor", "*", "created_at", ""] {
        let status = update_status(update(product.clone(), &["name", path])).await;
        assert_eq!(bad_fields(&status), ["update_mask"], "path {path:?}");
    }
    let status = update_status(pb::UpdateProductRequest {
        product: None,
        update_mask: Some(FieldMask {
            paths: vec!["name".into()],
        }),
    })
    .await;
    assert_eq!(bad_fields(&status), ["product"]);

    // Every masked field is checked, and all bad ones are named at once.
    let bad = pb::Product {
        id: "not-a-uuid".into(),
        name: String::new(),
        description: "\u{0}".into(),
        price: Some(PbMoney {
            currency_code: "EUR".into(),
            amount_minor: 0,
        }),
        categories: vec!["fine".into(), "Not Fine".into()],
        ..Default::default()
    };
    let status = update_status(update(
        bad,
        &["name", "description", "price", "categories", "bogus"],
    ))
    .await;
    assert_eq!(
        bad_fields(&status),
        [
            "product.categories[1]",
            "product.description",
            "product.id",
            "product.name",
            "product.price.amount_minor",
            "update_mask"
        ]
    );
    let status = update_status(update(
        pb::Product {
            id: product.id.clone(),
            price: None,
            ..Default::default()
        },
        &["price"],
    ))
    .await;
    assert_eq!(bad_fields(&status), ["product.price"]);
    let status = update_status(update(pb::Product::default(), &["name"])).await;
    assert_eq!(bad_fields(&status), ["product.id", "product.name"]);

    // Fields outside the mask are not validated (nor applied).
    let unmasked_garbage = pb::Product {
        id: product.id.clone(),
        name: String::new(),
        price: eur(250),
        categories: vec!["NOT A SLUG".into()],
        ..Default::default()
    };
    let updated = h
        .client
        .update_product(with_token(update(unmasked_garbage, &["price"]), &h.admin))
        .await?
        .into_inner()
        .product
        .expect("product");
    assert_eq!((updated.name.as_str(), updated.price), ("Mug", eur(250)));
    h.server.stop().await
}

fn money(currency_code: &str, amount_minor: i64) -> Money {
    Money {
        currency_code: currency_code.into(),
        amount_minor,
    }
}

/// The store's update reports price changes (old and new), for the
/// `ProductPriceChanged` event, and only real ones.
async fn store_update_reports_price_changes(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let product = create(&mut h, new_product("MUG", "Mug", "", &[])).await?;
    let db = Db::connect(&Secret::new(h.env.database_url().to_owned())).await?;
    let store = SqlCatalogStore::new(agora_platform_events::Outbox::new(db));

    let to_1499 = ProductChanges {
        price: Some(money("EUR", 1499)),
        ..ProductChanges::default()
    };
    let outcome = store.update(&product.id, &to_1499).await?;
    assert_eq!(
        outcome.price_change,
        Some(PriceChange {
            old: money("EUR", 1999),
            new: money("EUR", 1499),
        })
    );
    // A change of currency alone is a price change too.
    let to_usd = ProductChanges {
        price: Some(money("USD", 1499)),
        ..ProductChanges::default()
    };
    let outcome = store.update(&product.id, &to_usd).await?;
    assert_eq!(
        outcome.price_change.map(|c| (c.old, c.new)),
        Some((money("EUR", 1499), money("USD", 1499)))
    );

    // Setting the same price again, or changing something else, is not.
    let before = store.get(&product.id).await?.expect("product");
    let same = store.update(&product.id, &to_usd).await?;
    assert_eq!(same.price_change, None);
    assert_eq!(same.product, before, "a no-op update changes nothing");
    let rename = ProductChanges {
        name: ProductName::parse("Renamed").ok(),
        ..ProductChanges::default()
    };
    let renamed = store.update(&product.id, &rename).await?;
    assert_eq!(renamed.price_change, None);
    assert_eq!(renamed.product.name, "Renamed");
    assert!(renamed.product.updated_at > before.updated_at);

    let missing = store
        .update(&uuid::Uuid::now_v7().to_string(), &to_1499)
        .await
        .expect_err("unknown product");
    assert_eq!(missing.kind(), agora_platform::ErrorKind::NotFound);
    h.server.stop().await
}

/// Concurrent price updates queue: each sees the price the previous one left,
/// so the reported changes form one unbroken chain (no lost update, no two
/// events claiming the same old price).
async fn concurrent_price_updates_form_one_chain(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let product = create(&mut h, new_product("MUG", "Mug", "", &[])).await?;
    let db = Db::connect(&Secret::new(h.env.database_url().to_owned())).await?;
    let store = std::sync::Arc::new(SqlCatalogStore::new(agora_platform_events::Outbox::new(
        db.clone(),
    )));
    let db = db.pool().clone();
    let racers: Vec<_> = (1..=8)
        .map(|i| {
            let store = store.clone();
            let id = product.id.clone();
            tokio::spawn(async move {
                let changes = ProductChanges {
                    price: Some(money("EUR", 100 * i)),
                    ..ProductChanges::default()
                };
                store.update(&id, &changes).await
            })
        })
        .collect();
    let mut changes = Vec::new();
    for racer in racers {
        let outcome = racer.await??;
        changes.push(outcome.price_change.expect("every racer changes the price"));
    }
    // Follow the chain from the original price: it must visit every change.
    let mut price = money("EUR", 1999);
    for _ in 0..changes.len() {
        let next = changes
            .iter()
            .filter(|c| c.old == price)
            .map(|c| c.new.clone())
            .collect::<Vec<_>>();
        assert_eq!(
            next.len(),
            1,
            "exactly one update saw {price:?}: {changes:?}"
        );
        price = next.into_iter().next().expect("one");
    }
    let stored = store.get(&product.id).await?.expect("product");
    assert_eq!(
        stored.price, price,
        "the last change in the chain is stored"
    );

    // Each change recorded its ProductPriceChanged in its own transaction,
    // with the product's version after it: 2..=9, in commit (id) order, and
    // the newest version carries the stored price.
    let rows = sqlx::query(
        "SELECT aggregate_version, payload FROM event_outbox \
         WHERE aggregate_id = $1 ORDER BY id",
    )
    .bind(&product.id)
    .fetch_all(&db)
    .await?;
    let events: Vec<(i64, ProductPriceChanged)> = rows
        .iter()
        .map(|row| {
            let payload: Vec<u8> = row.try_get("payload")?;
            Ok((
                row.try_get("aggregate_version")?,
                prost::Message::decode(payload.as_slice())?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let versions: Vec<i64> = events.iter().map(|(v, _)| *v).collect();
    assert_eq!(versions, (2..=9).collect::<Vec<_>>());
    for (version, event) in &events {
        assert_eq!(event.version, *version);
        assert_eq!(event.sku, "MUG");
    }
    let newest = &events.last().expect("eight events").1;
    assert_eq!(newest.new_price.as_ref(), Some(&price.to_proto()));
    h.server.stop().await
}

async fn access_rules_per_caller(backend: Backend) -> anyhow::Result<()> {
    let mut h = start(backend).await?;
    let user = h
        .env
        .user_token(&uuid::Uuid::now_v7().to_string(), "ada@example.com", &[])?;
    let service = h.env.service_token("orders", "catalog")?;
    let forged = "eyJhbGciOiJFZERTQSJ9.e30.AAAA";
    let product = create(&mut h, new_product("MUG", "Mug", "", &[])).await?;

    // Admin RPCs: anonymous and forged tokens are UNAUTHENTICATED (even with
    // invalid input), users and services PERMISSION_DENIED.
    let status = h
        .client
        .create_product(new_product("A", "A", "", &[]))
        .await
        .expect_err("anonymous");
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = h
        .client
        .create_product(new_product("", "", "", &[]))
        .await
        .expect_err("anonymous, invalid");
    assert_eq!(status.code(), Code::Unauthenticated);
    let change = || update(product.clone(), &["name"]);
    let status = h
        .client
        .update_product(change())
        .await
        .expect_err("anonymous");
    assert_eq!(status.code(), Code::Unauthenticated);
    for (token, code) in [
        (forged, Code::Unauthenticated),
        (user.as_str(), Code::PermissionDenied),
        (service.as_str(), Code::PermissionDenied),
    ] {
        let status = h
            .client
            .create_product(with_token(new_product("B", "B", "", &[]), token))
            .await
            .expect_err("not admin");
        assert_eq!(status.code(), code, "create with {token:.20}");
        let status = h
            .client
            .update_product(with_token(change(), token))
            .await
            .expect_err("not admin");
        assert_eq!(status.code(), code, "update with {token:.20}");
    }
    // None of them changed anything.
    let all = list_all(&mut h, 0, "", "").await?;
    assert_eq!(all, std::slice::from_ref(&product));

    // Public RPCs: anyone, whatever token they carry.
    h.client
        .get_product(pb::GetProductRequest {
            id: product.id.clone(),
        })
        .await?;
    for token in [user.as_str(), service.as_str(), h.admin.as_str(), forged] {
        let read = h
            .client
            .get_product(with_token(
                pb::GetProductRequest {
                    id: product.id.clone(),
                },
                token,
            ))
            .await?
            .into_inner()
            .product;
        assert_eq!(read.as_ref(), Some(&product));
        let page = h
            .client
            .list_products(with_token(list(0, "", "", ""), token))
            .await?
            .into_inner();
        assert_eq!(page.products, std::slice::from_ref(&product));
    }

    // Admins may write.
    let updated = h
        .client
        .update_product(with_token(
            update(
                pb::Product {
                    name: "Admin Mug".into(),
                    ..product.clone()
                },
                &["name"],
            ),
            &h.admin,
        ))
        .await?
        .into_inner()
        .product
        .expect("product");
    assert_eq!(updated.name, "Admin Mug");
    h.server.stop().await
}

backend_tests!(
    create_and_get_round_trip,
    duplicate_sku_is_already_exists,
    create_validation_names_every_bad_field,
    pages_default_to_50_and_cap_at_500,
    pagination_is_stable_while_products_are_added,
    bad_list_input_is_invalid_argument,
    query_and_category_filter_and_combine,
    update_changes_only_masked_fields,
    update_validation_names_every_bad_field,
    store_update_reports_price_changes,
    concurrent_price_updates_form_one_chain,
    access_rules_per_caller,
);
