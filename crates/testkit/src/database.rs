//! A fresh database per test.

use agora_platform::config::Secret;
use agora_platform::db::Db;
use anyhow::Context as _;

/// Which database engine a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A new database on the test PostgreSQL server.
    Postgres,
    /// A new SQLite file in a temp folder.
    Sqlite,
}

/// A database that exists for one test and is dropped after it.
#[derive(Debug)]
pub struct TestDatabase {
    url: String,
    /// For PostgreSQL: (server admin URL, database name), to drop it.
    postgres: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

/// The server tests create their databases on: `AGORA_TEST_POSTGRES_URL`,
/// which `just test` points at a throwaway cluster of its own. Never a
/// default address: a machine's own PostgreSQL is not the tests' to use.
fn admin_url() -> anyhow::Result<String> {
    std::env::var("AGORA_TEST_POSTGRES_URL").map_err(|_| {
        anyhow::anyhow!(
            "AGORA_TEST_POSTGRES_URL is not set: run the tests with `just test`, or \
             `scripts/pg.sh with-test-cluster cargo test ...`, which start a throwaway PostgreSQL"
        )
    })
}

impl TestDatabase {
    /// Creates an empty database on `backend`.
    pub async fn create(backend: Backend) -> anyhow::Result<Self> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir()?;
                let url = format!("sqlite://{}?mode=rwc", dir.path().join("test.db").display());
                Ok(Self {
                    url,
                    postgres: None,
                    _dir: Some(dir),
                })
            }
            Backend::Postgres => {
                let admin = admin_url()?;
                Self::create_on_server(&admin).await
            }
        }
    }

    /// Creates an empty database on the PostgreSQL server `admin_url` points at.
    pub async fn create_on_server(admin_url: &str) -> anyhow::Result<Self> {
        let name = format!("agora_test_{}", uuid::Uuid::new_v4().simple());
        let db = Db::connect(&Secret::new(admin_url.to_owned()))
            .await
            .with_context(|| {
                format!("cannot reach the test PostgreSQL server at {admin_url} (set AGORA_TEST_POSTGRES_URL)")
            })?;
        // The name is ours (hex), so formatting it into the statement is safe.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(db.pool())
            .await
            .context("creating a test database")?;
        db.close().await;
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url, |(base, _)| base);
        Ok(Self {
            url: format!("{base}/{name}"),
            postgres: Some((admin_url.to_owned(), name)),
            _dir: None,
        })
    }

    /// The database URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some((admin, name)) = self.postgres.take() else {
            return;
        };
        // Drop runs outside async context; use a runtime of our own on a thread.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let db = Db::connect(&Secret::new(admin)).await?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(db.pool())
                .await?;
                db.close().await;
                anyhow::Ok(())
            })
        })
        .join();
        if let Ok(Err(err)) = dropped {
            eprintln!("warning: could not drop a test database: {err:#}");
        }
    }
}
