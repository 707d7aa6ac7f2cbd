//! An in-process OTLP/gRPC trace receiver: services under test export to
//! it, the test reads back every span with the service that sent it (the
//! `service.name` of its resource), its parent, links, events and status.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::{any_value::Value, KeyValue},
};
use tokio_stream::wrappers::TcpListenerStream;

/// One exported span, in hex ids.
#[derive(Clone, Debug)]
pub struct Span {
    pub service: String,
    pub name: String,
    pub kind: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub attributes: BTreeMap<String, String>,
    /// Each event's name and attributes.
    pub events: Vec<(String, BTreeMap<String, String>)>,
    /// Each link's (trace id, span id).
    pub links: Vec<(String, String)>,
    /// `error` with its message, `ok`, or empty when unset.
    pub status: String,
    pub start_unix_nano: u64,
}

/// The receiver; stops when dropped.
pub struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

fn text(value: Option<&Value>) -> String {
    match value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(list: &[KeyValue]) -> BTreeMap<String, String> {
    list.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref().and_then(|v| v.value.as_ref()))))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .as_ref()
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                let status = match &span.status {
                    Some(s) if s.code == 2 => format!("error: {}", s.message),
                    Some(s) if s.code == 1 => "ok".to_owned(),
                    _ => String::new(),
                };
                received.push(Span {
                    service: service.clone(),
                    kind: format!("{:?}", span.kind()),
                    name: span.name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: attributes(&span.attributes),
                    events: span
                        .events
                        .iter()
                        .map(|e| (e.name.clone(), attributes(&e.attributes)))
                        .collect(),
                    links: span.links.iter().map(|l| (hex(&l.trace_id), hex(&l.span_id))).collect(),
                    status,
                    start_unix_nano: span.start_time_unix_nano,
                });
            }
        }
        self.spans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Listens on a free loopback port.
    ///
    /// # Panics
    /// When no port can be bound.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let addr = listener.local_addr().expect("an address");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        let incoming = tokio_stream::StreamExt::map(TcpListenerStream::new(listener), move |conn| {
            counted.fetch_add(1, Ordering::SeqCst);
            conn
        });
        let service = TraceServiceServer::new(Receiver { spans: spans.clone() });
        let task = tokio::spawn(async move {
            drop(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(incoming)
                    .await,
            );
        });
        Self {
            addr,
            spans,
            connections,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    #[must_use]
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Every span received so far.
    #[must_use]
    pub fn spans(&self) -> Vec<Span> {
        self.spans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The spans of `trace_id` once `done` says they are all there, or
    /// whatever arrived by `limit` (exporters send in batches, seconds
    /// apart).
    pub async fn wait_for(&self, limit: Duration, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + limit;
        loop {
            let spans = self.spans();
            if done(&spans) || Instant::now() >= deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The spans of one trace as an indented tree (service, name, status),
/// children under their parent in start order; spans whose parent is not
/// in the trace are printed as roots.
#[must_use]
pub fn tree(spans: &[Span], trace_id: &str) -> String {
    let of_trace: Vec<&Span> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let known: std::collections::HashSet<&str> = of_trace.iter().map(|s| s.span_id.as_str()).collect();
    let mut out = String::new();
    fn walk(out: &mut String, all: &[&Span], parent: &str, depth: usize) {
        let mut children: Vec<&&Span> = all.iter().filter(|s| s.parent_span_id == parent).collect();
        children.sort_by_key(|s| s.start_unix_nano);
        for span in children {
            let links = if span.links.is_empty() {
                String::new()
            } else {
                format!("  (links: {})", span.links.len())
            };
            let status = if span.status.is_empty() {
                String::new()
            } else {
                format!("  [{}]", span.status)
            };
            out.push_str(&format!(
                "{}{:<18} {}{}{}\n",
                "  ".repeat(depth),
                span.service,
                span.name,
                status,
                links
            ));
            walk(out, all, &span.span_id, depth + 1);
        }
    }
    let mut roots: Vec<&str> = of_trace
        .iter()
        .filter(|s| !known.contains(s.parent_span_id.as_str()))
        .map(|s| s.parent_span_id.as_str())
        .collect();
    roots.sort_unstable();
    roots.dedup();
    for root in roots {
        walk(&mut out, &of_trace, root, 0);
    }
    out
}
