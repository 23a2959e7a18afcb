//! Traces leave the real binary over OTLP and continue the caller's trace.

mod common;

use std::time::Duration;

use agora_proto::users::v1 as pb;
use agora_proto::users::v1::user_service_client::UserServiceClient;
use agora_testkit::OtlpCollector;

use common::AgoraProcess;
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_spans_are_exported_as_children_of_the_callers_span() -> anyhow::Result<()> {
    let collector = OtlpCollector::start().await?;
    let endpoint = collector.endpoint();
    let users = tokio::task::spawn_blocking(move || {
        AgoraProcess::start(&["users"], &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)])
    })
    .await??;
    let listen = users.addr("users");

    let mut client = UserServiceClient::connect(format!("http://{listen}")).await?;
    let mut request = tonic::Request::new(pb::CreateUserRequest {
        email: "traced@example.com".into(),
        name: "Traced".into(),
        password: "correct horse battery".into(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01").parse()?,
    );
    client.create_user(request).await?;
    let invalid = pb::CreateUserRequest {
        email: "not-an-email".into(),
        ..Default::default()
    };
    let status = client.create_user(invalid).await.expect_err("invalid");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // Spans are batched; SIGTERM flushes them on the way out.
    let exit = tokio::task::spawn_blocking(move || users.terminate()).await??;
    assert!(exit.success(), "{exit}");

    let mut span = None;
    for _ in 0..50 {
        span = collector
            .spans()
            .into_iter()
            .find(|s| s.name == "agora.users.v1.UserService/CreateUser");
        if span.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let span = span
        .ok_or_else(|| anyhow::anyhow!("no CreateUser span exported: {:?}", collector.spans()))?;
    assert_eq!(span.service_name, "agora-users");
    assert_eq!(span.trace_id, TRACE_ID);
    assert_eq!(span.parent_span_id, PARENT_SPAN_ID);
    assert_eq!(
        span.attributes.get("rpc.system").map(String::as_str),
        Some("grpc")
    );
    assert_eq!(
        span.attributes.get("rpc.service").map(String::as_str),
        Some(pb::SERVICE_NAME)
    );
    assert_eq!(
        span.attributes.get("rpc.method").map(String::as_str),
        Some("CreateUser")
    );
    assert_eq!(
        span.attributes
            .get("rpc.grpc.status_code")
            .map(String::as_str),
        Some("0")
    );
    Ok(())
}
