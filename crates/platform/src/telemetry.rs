//! Logs and traces, set up once per process.
//!
//! [`init`] installs a tracing subscriber that writes pretty or JSON logs to
//! stderr (level from `RUST_LOG`, default `info`) and feeds every span to
//! OpenTelemetry (filtered separately by `AGORA_TRACE_FILTER`, default
//! `info`). Spans and metrics (through the global meter provider) are
//! exported over OTLP/gRPC only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; without it trace context still flows
//! through the process, so a `traceparent` arriving at a service leaves it on
//! every call and event the service makes.
//!
//! [`extract_parent`] reads W3C `traceparent`/`tracestate` from incoming gRPC
//! metadata; [`inject_current`] writes the current span's context into
//! outgoing metadata (and [`TracePropagation`] does it for every call of a
//! tonic client).

use std::io::IsTerminal as _;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// Flushes buffered spans when dropped; keep it alive until `main` returns.
#[must_use = "dropping the guard shuts telemetry down"]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
    /// Set when metrics are exported (OTLP endpoint configured).
    meters: Option<SdkMeterProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(err) = self.provider.shutdown() {
            eprintln!("telemetry shutdown: {err}");
        }
        if let Some(meters) = self.meters.take()
            && let Err(err) = meters.shutdown()
        {
            eprintln!("metrics shutdown: {err}");
        }
    }
}

/// Installs the global subscriber and propagator. `service` becomes the OTel
/// `service.name` (overridable with `OTEL_SERVICE_NAME`).
pub fn init(service: &str, format: LogFormat) -> anyhow::Result<TelemetryGuard> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let service_name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
    // Replicas of a service export the same series; the instance id keeps
    // them apart (a counter of one is not the reset of another's).
    let instance = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .map_or_else(
            || format!("{}-{}", uuid::Uuid::new_v4().simple(), std::process::id()),
            |host| format!("{host}-{}", std::process::id()),
        );
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name)
        .with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            instance,
        ))
        .build();
    let mut provider = SdkTracerProvider::builder().with_resource(resource.clone());
    let exporting = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
    let mut meters = None;
    if exporting {
        // Reads the endpoint, headers and timeout from the standard OTEL_* variables.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?;
        provider = provider.with_batch_exporter(exporter);
        // Metrics (the outbox backlog, ...) go the same way, every
        // OTEL_METRIC_EXPORT_INTERVAL milliseconds (default 60 s).
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .build()?;
        let meter_provider = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_periodic_exporter(exporter)
            .build();
        opentelemetry::global::set_meter_provider(meter_provider.clone());
        meters = Some(meter_provider);
    }
    let provider = provider.build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    // Traces and logs are filtered separately: RUST_LOG=warn must quiet the
    // console without dropping the INFO-level RPC spans a trace backend wants.
    let otel_filter = EnvFilter::try_from_env("AGORA_TRACE_FILTER")
        .unwrap_or_else(|_| EnvFilter::new("info,h2=off,hyper=off,tower=off,sqlx=off"));
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("agora"))
        .with_filter(otel_filter);

    let log_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,h2=warn,hyper=warn,tower=warn,sqlx=warn,opentelemetry_sdk=warn")
    });
    let fmt_layer = match format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_current_span(true)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(fmt_layer.with_filter(log_filter))
        .with(otel_layer)
        .try_init()?;
    if exporting {
        tracing::info!("exporting traces and metrics over OTLP");
    }
    Ok(TelemetryGuard { provider, meters })
}

/// The remote parent context carried by request headers, if any.
pub fn extract_parent(headers: &http::HeaderMap) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    })
}

/// Writes the current span's trace context into outgoing gRPC metadata.
pub fn inject_current(metadata: &mut tonic::metadata::MetadataMap) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(metadata));
    });
}

/// The current span's W3C trace context (`traceparent`, and `tracestate`
/// when set), for carriers other than gRPC metadata: outbox rows, NATS
/// headers. Empty when there is no active trace.
pub fn current_trace_headers() -> std::collections::HashMap<String, String> {
    let context = tracing::Span::current().context();
    let mut headers = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut headers);
    });
    headers.retain(|_, value| !value.is_empty());
    headers
}

/// The remote parent context stored as `traceparent` / `tracestate` text.
pub fn context_from_trace_headers(
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> opentelemetry::Context {
    let mut headers = std::collections::HashMap::new();
    if let Some(value) = traceparent {
        headers.insert("traceparent".to_owned(), value.to_owned());
    }
    if let Some(value) = tracestate {
        headers.insert("tracestate".to_owned(), value.to_owned());
    }
    opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&headers))
}

/// A tonic interceptor that propagates the current trace to the callee:
/// `FooClient::with_interceptor(channel, TracePropagation)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TracePropagation;

impl tonic::service::Interceptor for TracePropagation {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        inject_current(request.metadata_mut());
        Ok(request)
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let key = tonic::metadata::MetadataKey::from_bytes(key.as_bytes());
        let value = tonic::metadata::MetadataValue::try_from(value.as_str());
        if let (Ok(key), Ok(value)) = (key, value) {
            self.0.insert(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanContext, TraceContextExt, TraceFlags, TraceState};
    use opentelemetry::trace::{SpanId, TraceId};

    use super::*;

    #[test]
    fn traceparent_round_trips_through_metadata() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("hex");
        let span_id = SpanId::from_hex("00f067aa0ba902b7").expect("hex");
        let context = opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ));
        let mut metadata = tonic::metadata::MetadataMap::new();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&context, &mut MetadataInjector(&mut metadata));
        });
        assert_eq!(
            metadata.get("traceparent").and_then(|v| v.to_str().ok()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        let headers = metadata.into_headers();
        let extracted = extract_parent(&headers);
        assert_eq!(extracted.span().span_context().trace_id(), trace_id);
        assert_eq!(extracted.span().span_context().span_id(), span_id);
    }
}
