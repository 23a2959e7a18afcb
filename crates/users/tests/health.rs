//! Health follows the real database: a private PostgreSQL cluster is stopped
//! under the running service and started again.

use std::net::SocketAddr;
use std::time::Duration;

use agora_proto::users::v1 as pb;
use agora_proto::users::v1::user_service_client::UserServiceClient;
use agora_testkit::{PrivatePostgres, TestDatabase, TestEnv, TestServer};
use tonic::Code;
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn wait_for(addr: SocketAddr, want: ServingStatus) -> anyhow::Result<Duration> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?.connect_lazy();
    let mut client = HealthClient::new(channel);
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        let status = client
            .check(HealthCheckRequest {
                service: pb::SERVICE_NAME.into(),
            })
            .await?
            .into_inner()
            .status();
        if status == want {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("health never became {want:?}")
}

fn new_user(email: &str) -> pb::CreateUserRequest {
    pb::CreateUserRequest {
        email: email.into(),
        name: "Ada".into(),
        password: "correct horse battery".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_while_the_database_is_down() -> anyhow::Result<()> {
    let postgres = tokio::task::spawn_blocking(PrivatePostgres::start).await??;
    let database = TestDatabase::create_on_server(&postgres.admin_url()).await?;
    let env = TestEnv::with_database(database)?;
    let server = TestServer::start(vec![agora_users::hosted(&env.config).await?]).await?;
    let mut users = UserServiceClient::new(server.channel()?);

    wait_for(server.addr(), ServingStatus::Serving).await?;
    users.create_user(new_user("before@example.com")).await?;

    postgres.stop()?;
    let took = wait_for(server.addr(), ServingStatus::NotServing).await?;
    assert!(
        took < Duration::from_secs(10),
        "NOT_SERVING only after {took:?}"
    );
    // Requests fail as UNAVAILABLE (retryable), never INTERNAL or a hang.
    let status = users
        .create_user(new_user("during@example.com"))
        .await
        .expect_err("database is down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    postgres.start_again()?;
    wait_for(server.addr(), ServingStatus::Serving).await?;
    users.create_user(new_user("after@example.com")).await?;
    // Nothing written before the outage was lost.
    let status = users
        .create_user(new_user("before@example.com"))
        .await
        .expect_err("still registered");
    assert_eq!(status.code(), Code::AlreadyExists);

    server.stop().await?;
    drop(env);
    drop(postgres);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_when_the_sqlite_file_is_deleted() -> anyhow::Result<()> {
    let env = TestEnv::new(agora_testkit::Backend::Sqlite).await?;
    let server = TestServer::start(vec![agora_users::hosted(&env.config).await?]).await?;
    wait_for(server.addr(), ServingStatus::Serving).await?;
    let path = env
        .database_url()
        .strip_prefix("sqlite://")
        .and_then(|rest| rest.split('?').next())
        .ok_or_else(|| anyhow::anyhow!("not a sqlite url"))?
        .to_owned();
    std::fs::remove_file(&path)?;
    wait_for(server.addr(), ServingStatus::NotServing).await?;
    server.stop().await
}
