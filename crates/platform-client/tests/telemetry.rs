//! What the client stack tells observability, received by a real OTLP
//! collector: a client span per call whose context the callee receives as
//! its parent, and the circuit breaker gauge.

mod common;

use std::time::Duration;

use agora_platform_client::Discovery;
use common::{Backend, catalog, config, dead_address, eventually, get};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt as _;

/// Spans and metrics of this process go to `endpoint`, as
/// `agora_platform::telemetry::init` sends them with an OTLP endpoint set.
fn export_to(endpoint: &str) -> anyhow::Result<(SdkTracerProvider, SdkMeterProvider)> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let spans = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    let tracer_provider = SdkTracerProvider::builder()
        .with_batch_exporter(spans)
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(tracer_provider.tracer("test")));
    tracing::subscriber::set_global_default(subscriber)?;
    let metrics = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    let reader = PeriodicReader::builder(metrics)
        .with_interval(Duration::from_millis(200))
        .build();
    let meter_provider = SdkMeterProvider::builder().with_reader(reader).build();
    opentelemetry::global::set_meter_provider(meter_provider.clone());
    Ok((tracer_provider, meter_provider))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_traced_and_breakers_exported() -> anyhow::Result<()> {
    let collector = agora_testkit::OtlpCollector::start().await?;
    let (tracer_provider, _meter_provider) = export_to(&collector.endpoint())?;

    // Trace context: the backend's parent is the client span of the call,
    // itself a child of the caller's span.
    let backend = Backend::start("a").await?;
    let config = config(&[backend.address()], |_| {});
    let (mut client, _channel) = catalog(&config, Discovery::Static)?;
    let root = tracing::info_span!("checkout");
    let root_traceparent = root
        .in_scope(agora_platform::telemetry::current_trace_headers)
        .remove("traceparent")
        .expect("the root span has a trace context");
    get(&mut client).instrument(root).await?;
    let seen = backend.seen()[0]
        .traceparent
        .clone()
        .expect("the backend got a traceparent");
    let fields =
        |traceparent: &str| -> Vec<String> { traceparent.split('-').map(str::to_owned).collect() };
    let (root_fields, seen_fields) = (fields(&root_traceparent), fields(&seen));
    assert_eq!(seen_fields.len(), 4, "{seen}");
    assert_eq!(seen_fields[1], root_fields[1], "same trace");
    assert_ne!(
        seen_fields[2], root_fields[2],
        "the parent is the client span"
    );
    let provider = tracer_provider.clone();
    tokio::task::spawn_blocking(move || provider.force_flush()).await??;
    let client_span = collector
        .spans()
        .into_iter()
        .find(|span| span.span_id == seen_fields[2])
        .expect("the client span was exported");
    assert_eq!(
        client_span.name,
        "agora.catalog.v1.CatalogService/GetProduct"
    );
    assert_eq!(client_span.trace_id, root_fields[1]);
    assert_eq!(client_span.parent_span_id, root_fields[2]);
    assert_eq!(
        client_span
            .attributes
            .get("rpc.grpc.status_code")
            .map(String::as_str),
        Some("0")
    );
    assert_eq!(
        client_span
            .attributes
            .get("peer.service")
            .map(String::as_str),
        Some("catalog")
    );

    // The breaker gauge: 1 while open.
    let dead = dead_address()?;
    let config = common::config(std::slice::from_ref(&dead), |clients| {
        clients.breaker_failure_threshold = 1;
        clients.max_retries = 0;
    });
    let (mut client, _channel) = catalog(&config, Discovery::Static)?;
    assert!(get(&mut client).await.is_err());
    let is_open_point = |metric: &agora_testkit::ReceivedMetric| {
        metric.name == "agora.client.circuit_breaker.state"
            && metric.attributes.get("endpoint") == Some(&dead)
            && metric.attributes.get("service").map(String::as_str) == Some("catalog")
            && metric.value == 1
    };
    eventually(Duration::from_secs(5), || {
        collector.metrics().iter().any(is_open_point)
    })
    .await?;
    Ok(())
}
