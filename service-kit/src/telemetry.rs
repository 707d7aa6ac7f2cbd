//! Logs and traces.
//!
//! Logs: every RPC gets a span (see [`crate::server`]) carrying its method
//! and request id, so any event logged while serving it names both; with
//! tracing on, the span carries the trace and span ids too.
//!
//! Traces: OpenTelemetry, exported over OTLP/gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//! set, configured by the standard variables (`OTEL_SERVICE_NAME`,
//! `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_SDK_DISABLED`). Without an endpoint
//! nothing is exported and nothing is built: the spans that exist only for
//! traces (peer calls, store operations, deliveries) are not even created,
//! so a service that is not traced pays nothing for it.
//!
//! Context travels as W3C `traceparent`/`tracestate`: read from incoming
//! metadata by the server layer, written on every outgoing call by the peer
//! client stack, and kept with every outbox event ([`current_traceparent`])
//! so that a delivery minutes later links back to the request that caused
//! it.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, Ordering},
};

use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator as _},
    trace::{TraceContextExt as _, TracerProvider as _},
};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider, Resource};
use tracing::{level_filters::LevelFilter, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{filter::DynFilterFn, fmt, prelude::*, EnvFilter};

use crate::config::LogFormat;

/// Target prefix of the spans and events that exist for traces (peer calls,
/// store operations, relay deliveries, event applications, retries): the
/// exporter takes them at DEBUG whatever `RUST_LOG` says, the log output
/// only as `RUST_LOG` allows.
pub const TARGET_PREFIX: &str = "chirp";

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported: the code that creates spans only for traces
/// asks this first.
#[must_use]
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Whether the environment asks for an exporter.
fn endpoint_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim().eq_ignore_ascii_case("none"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The process's logging and tracing; [`Telemetry::shutdown`] flushes the
/// spans not exported yet.
#[must_use = "dropping it without shutdown loses the last spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Installs the global subscriber: logs filtered by `RUST_LOG` (default
    /// `info`) in `format`, and, when an OTLP endpoint is configured, an
    /// exporter naming the process `service_name` (unless
    /// `OTEL_SERVICE_NAME` says otherwise). Needs a Tokio runtime (the
    /// exporter's connection lives on it).
    ///
    /// Calling it twice is harmless: tests start many services in one
    /// process and the first subscriber stays.
    pub fn init(service_name: &'static str, format: LogFormat) -> Self {
        let provider = configured_provider(service_name);
        // Warnings and errors from anywhere become events of the span they
        // happened in.
        let traces = provider.as_ref().map(|p| traces_layer(p, service_name, true));
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let logs = match format {
            LogFormat::Pretty => fmt::layer().with_filter(filter).boxed(),
            LogFormat::Json => fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .with_filter(filter)
                .boxed(),
        };
        let installed = tracing_subscriber::registry()
            .with(logs)
            .with(traces)
            .try_init()
            .is_ok();
        Self::started(provider, installed)
    }

    /// For a command-line tool: traces only, when an endpoint is configured;
    /// no log output (the tool prints its own).
    pub fn for_tool(name: &'static str) -> Self {
        let provider = configured_provider(name);
        let traces = provider.as_ref().map(|p| traces_layer(p, name, false));
        let installed = tracing_subscriber::registry().with(traces).try_init().is_ok();
        Self::started(provider, installed)
    }

    /// Turns exporting on once the subscriber holding `provider`'s layer is
    /// installed. An uninstalled one (a subscriber was there already) would
    /// never see a span, so it is dropped.
    fn started(provider: Option<SdkTracerProvider>, installed: bool) -> Self {
        let provider = provider.filter(|_| installed);
        if provider.is_some() {
            opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
            EXPORTING.store(true, Ordering::Relaxed);
        }
        Self { provider }
    }

    /// Exports what is still buffered and stops the exporter. Blocks the
    /// calling thread until the export is done (or its timeout passes), so
    /// call it last, or from `spawn_blocking`.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            EXPORTING.store(false, Ordering::Relaxed);
            if let Err(err) = provider.shutdown() {
                tracing::warn!(%err, "flushing the last spans");
            }
        }
    }

    /// [`Self::shutdown`] without blocking the runtime.
    pub async fn shutdown_async(self) {
        if self.provider.is_some() {
            drop(tokio::task::spawn_blocking(move || self.shutdown()).await);
        }
    }
}

/// The exporter the environment asks for, if any. A process that cannot
/// build one still serves, untraced.
fn configured_provider(name: &'static str) -> Option<SdkTracerProvider> {
    if !endpoint_configured() {
        return None;
    }
    match exporter(name) {
        Ok(provider) => Some(provider),
        Err(err) => {
            // Logging is not up yet.
            eprintln!("{name}: tracing disabled: {err:#}");
            None
        }
    }
}

/// The layer that turns Chirp's spans into OpenTelemetry spans for
/// `provider`; with `warnings`, warnings and errors from anywhere become
/// span events too.
fn traces_layer<S>(
    provider: &SdkTracerProvider,
    name: &'static str,
    warnings: bool,
) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(name))
        .with_context_activation(false)
        .with_threads(false)
        .with_location(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_filter(traces_filter(warnings))
}

fn exporter(service_name: &'static str) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig as _;
    // The exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT itself; the
    // protocol is gRPC whatever OTEL_EXPORTER_OTLP_PROTOCOL says, because
    // only that one is built in.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_protocol(opentelemetry_otlp::Protocol::Grpc)
        .build()?;
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |v| v.trim().is_empty()) {
        resource = resource.with_service_name(service_name);
    }
    // The builder's defaults read OTEL_TRACES_SAMPLER(_ARG) and the
    // resource detectors OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME.
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// What the exporter takes: Chirp's own spans and events (targets under
/// [`TARGET_PREFIX`]) at DEBUG and above, and, with `warnings`, warnings
/// and errors from anywhere as events of the span they happen in.
///
/// The filter answers "sometimes" for every callsite, so that it is asked
/// for each span as it is created: with a cached "always" the per-layer
/// filter state can be stale on a thread, and a span would then be missing
/// from the trace (its children turning into roots).
fn traces_filter<S>(
    warnings: bool,
) -> DynFilterFn<
    S,
    impl Fn(&tracing::Metadata<'_>, &tracing_subscriber::layer::Context<'_, S>) -> bool,
    impl Fn(&'static tracing::Metadata<'static>) -> tracing::subscriber::Interest,
> {
    DynFilterFn::new(move |meta, _| {
        (meta.target().starts_with(TARGET_PREFIX) && *meta.level() <= LevelFilter::DEBUG)
            || (warnings && meta.is_event() && *meta.level() <= LevelFilter::WARN)
    })
    .with_callsite_filter(|_| tracing::subscriber::Interest::sometimes())
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
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

/// Makes `span` continue the trace whose context `headers` carry (a caller's
/// `traceparent`), if any, and records its ids in the span's `trace_id` and
/// `span_id` fields for the logs. Does nothing unless [`exporting`].
/// Answers whether the span is recorded (sampled); `false` unless
/// [`exporting`].
pub fn continue_from_headers(span: &Span, headers: &http::HeaderMap) -> bool {
    if !exporting() {
        return false;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if parent.span().span_context().is_valid() {
        drop(span.set_parent(parent));
    }
    record_ids(span)
}

/// Records `span`'s trace and span ids in its `trace_id`/`span_id` fields
/// when it is sampled; answers whether it is.
pub fn record_ids(span: &Span) -> bool {
    if !exporting() {
        return false;
    }
    let context = span.context();
    let otel = context.span();
    let ids = otel.span_context();
    if !ids.is_sampled() {
        return false;
    }
    span.record("trace_id", tracing::field::display(ids.trace_id()));
    span.record("span_id", tracing::field::display(ids.span_id()));
    true
}

/// Whether work here gets spans of its own: traces are exported, and the
/// request being served (if any) is sampled. Outside a request (relays,
/// jobs) the sampler decides at their root span.
#[must_use]
pub fn tracing_here() -> bool {
    exporting() && crate::context::sampled().unwrap_or(true)
}

/// Writes `span`'s context into outgoing `headers` as `traceparent` (and
/// `tracestate`).
pub fn inject(span: &Span, headers: &mut http::HeaderMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(headers));
}

/// The current span's context as a W3C `traceparent`, for keeping with
/// work done later (an outbox event, a recorded purge); `None` when not
/// [`exporting`] or not inside a sampled trace.
#[must_use]
pub fn current_traceparent() -> Option<String> {
    if !tracing_here() {
        return None;
    }
    let context = Span::current().context();
    if !context.span().span_context().is_sampled() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// Links `span` to the span a kept `traceparent` names (the request that
/// wrote an event, say). Ignores text that is not a valid `traceparent`.
pub fn link(span: &Span, traceparent: &str) {
    if !exporting() {
        return;
    }
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    let linked = context.span().span_context().clone();
    if linked.is_valid() {
        span.add_link(linked);
    }
}

/// Notes in the current span (the RPC's) that a part of its reply is
/// degraded, so a trace shows which answers were partial and why.
pub fn degraded(part: &'static str) {
    tracing::debug!(target: "chirp::reply", part, "reply part degraded");
}

/// Whether `text` is a well-formed W3C `traceparent`, for checking one that
/// came from a peer before keeping it.
#[must_use]
pub fn is_traceparent(text: &str) -> bool {
    // Most events carry none: answer those without building a carrier.
    if text.is_empty() || text.len() > 55 {
        return false;
    }
    let carrier = HashMap::from([("traceparent".to_owned(), text.to_owned())]);
    TraceContextPropagator::new()
        .extract(&carrier)
        .span()
        .span_context()
        .is_valid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_traceparents_are_kept() {
        assert!(is_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!is_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!is_traceparent("garbage"));
        assert!(!is_traceparent(""));
    }

    #[test]
    fn without_an_endpoint_nothing_is_exported() {
        // The test process has no OTEL_EXPORTER_OTLP_ENDPOINT.
        if !endpoint_configured() {
            let telemetry = Telemetry::init("test", LogFormat::Pretty);
            assert!(telemetry.provider.is_none());
            assert!(!exporting());
            assert_eq!(current_traceparent(), None);
        }
    }
}
