//! An OTLP/gRPC trace receiver that only counts: what `chirp bench
//! --tracing` exports to, so that tracing's cost is measured with a real
//! exporter sending real batches, but without a collector's own cost on the
//! same two cores.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

/// The running receiver; stops when dropped.
pub struct Sink {
    pub endpoint: String,
    spans: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

struct Counter(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Counter {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Sink {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let spans = Arc::new(AtomicU64::new(0));
        let service = TraceServiceServer::new(Counter(spans.clone()))
            // A batch of 512 spans is well under a megabyte; leave room.
            .max_decoding_message_size(16 * 1024 * 1024);
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let task = tokio::spawn(async move {
            drop(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(incoming)
                    .await,
            );
        });
        Ok(Self { endpoint, spans, task })
    }

    pub fn spans(&self) -> u64 {
        self.spans.load(Ordering::Relaxed)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}
