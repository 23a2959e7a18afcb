//! `agora seed`: a demo catalog with stock and an admin account, through the
//! services' public gRPC APIs. Safe to run again: an existing admin account
//! and a non-empty catalog are left alone.

use std::path::{Path, PathBuf};

use agora_platform::auth::TokenIssuer;
use agora_platform::config;
use agora_proto::catalog::v1 as catalog;
use agora_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use agora_proto::common::v1::Money;
use agora_proto::inventory::v1 as inventory;
use agora_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use agora_proto::users::v1 as users;
use agora_proto::users::v1::user_service_client::UserServiceClient;
use anyhow::Context as _;
use tonic::Request;
use tonic::transport::Channel;

/// The admin account `just up` creates (listed in `auth.admin_emails`).
pub const DEFAULT_ADMIN_EMAIL: &str = "admin@agora.localhost";

/// Arguments of `agora seed`.
#[derive(Debug, clap::Args)]
pub struct SeedArgs {
    /// The users service.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub users: String,
    /// The catalog service.
    #[arg(long, default_value = "http://127.0.0.1:50052")]
    pub catalog: String,
    /// The inventory service.
    #[arg(long, default_value = "http://127.0.0.1:50053")]
    pub inventory: String,
    /// Email of the admin account; the users service must list it in
    /// `auth.admin_emails` for the account to get the admin role.
    #[arg(long, default_value = DEFAULT_ADMIN_EMAIL)]
    pub admin_email: String,
    /// TOML configuration file (for the token signing key).
    #[arg(long, env = "AGORA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data folder holding the development key pair.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// A demo product: SKU, name, description, price in euro cents, categories, stock.
type DemoProduct = (
    &'static str,
    &'static str,
    &'static str,
    i64,
    &'static [&'static str],
    i64,
);

const DEMO_CATALOG: &[DemoProduct] = &[
    (
        "BOOK-RUST-001",
        "The Rust Programming Language",
        "The official book on Rust, from ownership to async.",
        3999,
        &["books", "programming"],
        25,
    ),
    (
        "BOOK-DDIA-002",
        "Designing Data-Intensive Applications",
        "Reliable, scalable and maintainable systems.",
        4499,
        &["books", "distributed-systems"],
        12,
    ),
    (
        "MUG-FERRIS-003",
        "Ferris Mug",
        "A 330 ml ceramic mug with Ferris the crab.",
        1299,
        &["merch", "kitchen"],
        40,
    ),
    (
        "TSHIRT-GRPC-004",
        "gRPC T-Shirt",
        "Organic cotton, printed with the gRPC logo.",
        2199,
        &["merch", "clothing"],
        30,
    ),
    (
        "KBD-MECH-005",
        "Mechanical Keyboard",
        "Tenkeyless, hot-swappable switches, USB-C.",
        11900,
        &["hardware"],
        8,
    ),
    (
        "STICKER-PACK-006",
        "Sticker Pack",
        "Twenty vinyl stickers for your laptop.",
        599,
        &["merch"],
        200,
    ),
    (
        "HEADSET-007",
        "Noise-Cancelling Headset",
        "For focused work in noisy places.",
        18900,
        &["hardware", "audio"],
        5,
    ),
    (
        "LAST-ONE-008",
        "Limited Edition Poster",
        "Signed, numbered, and only one left.",
        2999,
        &["merch", "art"],
        1,
    ),
];

/// Runs the seed against running services.
pub async fn run(args: SeedArgs) -> anyhow::Result<()> {
    // The seed is an operator tool holding the signing key: it acts as admin
    // directly rather than logging in with a password it does not know.
    let admin_token = operator_admin_token(
        args.config.as_deref(),
        args.data_dir.as_deref(),
        &args.admin_email,
        "agora-seed",
    )?;

    seed_admin(&args).await?;
    seed_catalog(&args, &admin_token).await?;
    Ok(())
}

/// An admin access token signed with the user-token key of the configuration
/// (`config_file`, else `AGORA_*`; the key files under `data_dir/keys`), as
/// the users service would issue it. For operator tools on the machine that
/// holds the key (`agora seed`, `agora loadgen`): they need no admin password.
/// `subject` names the tool in the services' logs.
pub(crate) fn operator_admin_token(
    config_file: Option<&Path>,
    data_dir: Option<&Path>,
    admin_email: &str,
    subject: &str,
) -> anyhow::Result<String> {
    let mut overrides = serde_json::Map::new();
    if let Some(dir) = data_dir {
        overrides.insert("data_dir".into(), serde_json::json!(dir));
    }
    let mut config = config::load(config_file, serde_json::Value::Object(overrides))?;
    // The user-token key, as the users service holds it.
    config.use_default_key_files(&["users"]);
    let issuer = TokenIssuer::from_config(&config.auth).context("loading the signing key")?;
    Ok(issuer
        .issue_user_token(subject, admin_email, &["admin".to_owned()])?
        .token)
}

/// Signs a user up (`CreateUser`); the status as the service returned it, so
/// that callers can tell an existing account (ALREADY_EXISTS) from a failure.
pub(crate) async fn sign_up(
    users: &mut UserServiceClient<Channel>,
    request: Request<users::CreateUserRequest>,
) -> Result<users::User, tonic::Status> {
    Ok(users
        .create_user(request)
        .await?
        .into_inner()
        .user
        .unwrap_or_default())
}

async fn seed_admin(args: &SeedArgs) -> anyhow::Result<()> {
    let mut users = UserServiceClient::connect(args.users.clone())
        .await
        .with_context(|| format!("connecting to the users service at {}", args.users))?;
    let password = uuid::Uuid::new_v4().simple().to_string();
    let request = users::CreateUserRequest {
        email: args.admin_email.clone(),
        name: "Agora Admin".into(),
        password: password.clone(),
    };
    match sign_up(&mut users, Request::new(request)).await {
        Ok(user) => {
            if !user.roles.iter().any(|r| r == "admin") {
                eprintln!(
                    "warning: {} was created without the admin role: add it to auth.admin_emails",
                    args.admin_email
                );
            }
            println!("admin account created (shown once, keep it):");
            println!("  email:    {}", args.admin_email);
            println!("  password: {password}");
        }
        Err(status) if status.code() == tonic::Code::AlreadyExists => {
            println!(
                "admin account {} exists (its password was printed when it was created)",
                args.admin_email
            );
        }
        Err(status) => return Err(status).context("creating the admin account"),
    }
    Ok(())
}

/// `message` with `authorization: Bearer <token>`.
pub(crate) fn with_token<T>(message: T, token: &str) -> anyhow::Result<Request<T>> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(request)
}

async fn seed_catalog(args: &SeedArgs, admin_token: &str) -> anyhow::Result<()> {
    let mut catalog = CatalogServiceClient::connect(args.catalog.clone())
        .await
        .with_context(|| format!("connecting to the catalog service at {}", args.catalog))?;
    let mut inventory = InventoryServiceClient::connect(args.inventory.clone())
        .await
        .with_context(|| format!("connecting to the inventory service at {}", args.inventory))?;
    let existing = catalog
        .list_products(catalog::ListProductsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    if !existing.products.is_empty() {
        println!("catalog already has products; not seeding it");
        return Ok(());
    }
    for (sku, name, description, cents, categories, stock) in DEMO_CATALOG {
        let request = catalog::CreateProductRequest {
            sku: (*sku).into(),
            name: (*name).into(),
            description: (*description).into(),
            price: Some(Money {
                currency_code: "EUR".into(),
                amount_minor: *cents,
            }),
            categories: categories.iter().map(|c| (*c).to_owned()).collect(),
        };
        let product = catalog
            .create_product(with_token(request, admin_token)?)
            .await
            .with_context(|| format!("creating product {sku}"))?
            .into_inner()
            .product
            .context("catalog returned no product")?;
        let request = inventory::SetStockRequest {
            product_id: product.id.clone(),
            quantity: *stock,
        };
        inventory
            .set_stock(with_token(request, admin_token)?)
            .await
            .with_context(|| format!("setting the stock of {sku}"))?;
        println!(
            "  {sku:<18} {name:<40} EUR {:>4}.{:02}  stock {stock}",
            cents / 100,
            cents % 100
        );
    }
    println!("seeded {} products with stock", DEMO_CATALOG.len());
    Ok(())
}
