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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_through_the_gateway_is_one_trace_from_the_client_to_the_service()
-> anyhow::Result<()> {
    let collector = OtlpCollector::start().await?;
    let endpoint = collector.endpoint();
    let agora = tokio::task::spawn_blocking(move || {
        AgoraProcess::start(
            &["users", "gateway"],
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)],
        )
    })
    .await??;
    let gateway = agora.addr("gateway");
    // The gateway starts after the services it fronts.
    let mut client = None;
    for _ in 0..100 {
        if let Ok(connected) = UserServiceClient::connect(format!("http://{gateway}")).await {
            client = Some(connected);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut client = client.ok_or_else(|| anyhow::anyhow!("the gateway never listened"))?;
    let mut request = tonic::Request::new(pb::CreateUserRequest {
        email: "edge-traced@example.com".into(),
        name: "Traced".into(),
        password: "correct horse battery".into(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01").parse()?,
    );
    client.create_user(request).await?;
    let exit = tokio::task::spawn_blocking(move || agora.terminate()).await??;
    assert!(exit.success(), "{exit}");

    let name = "agora.users.v1.UserService/CreateUser";
    let mut spans = Vec::new();
    for _ in 0..50 {
        spans = collector
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == TRACE_ID)
            .collect();
        if spans.iter().filter(|s| s.name == name).count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The gateway's server span continues the client's trace ...
    let edge = spans
        .iter()
        .find(|s| s.name == name && s.attributes.contains_key("rpc.protocol"))
        .ok_or_else(|| anyhow::anyhow!("no gateway span in {spans:#?}"))?;
    assert_eq!(edge.parent_span_id, PARENT_SPAN_ID);
    assert_eq!(
        edge.attributes.get("rpc.protocol").map(String::as_str),
        Some("grpc")
    );
    assert_eq!(
        edge.attributes
            .get("rpc.grpc.status_code")
            .map(String::as_str),
        Some("0")
    );
    // ... and the users service's span descends from it, in the same trace.
    let service = spans
        .iter()
        .find(|s| s.name == name && !s.attributes.contains_key("rpc.protocol"))
        .ok_or_else(|| anyhow::anyhow!("no users span in {spans:#?}"))?;
    let mut parent = service.parent_span_id.clone();
    let mut hops = 0;
    while parent != edge.span_id {
        let next = spans.iter().find(|s| s.span_id == parent).ok_or_else(|| {
            anyhow::anyhow!("the users span's ancestry leaves the trace: {spans:#?}")
        })?;
        parent = next.parent_span_id.clone();
        hops += 1;
        anyhow::ensure!(hops < 5, "no path from the users span to the gateway's");
    }
    Ok(())
}
