//! `chirp status`: every part of a running mesh, and what the services say
//! about themselves (health, store, circuit breakers, outbox depths,
//! erasures in progress, dead letters).

use std::time::Duration;

use serde::Serialize;
use tonic::transport::Channel;
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

use crate::layout::{Instance, Ports};

/// Whether a service's API is SERVING; `None` when it cannot be asked.
pub async fn health(ports: Ports, at: impl Into<Instance>) -> Option<bool> {
    let at = at.into();
    let service = at.part.grpc_service()?;
    let channel = Channel::from_shared(ports.url(at))
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy();
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: service.into(),
    });
    request.set_timeout(Duration::from_secs(1));
    let reply = HealthClient::new(channel).check(request).await.ok()?;
    Some(reply.into_inner().status == ServingStatus::Serving as i32)
}

#[derive(Debug, Serialize)]
pub struct ServiceReport {
    /// The service, or `service-N` for a further replica.
    pub service: String,
    pub serving: Option<bool>,
    /// `store_up` from its metrics.
    pub store_up: Option<bool>,
    /// `peer_circuit_state` per peer: closed, half-open or open.
    pub circuits: Vec<(String, &'static str)>,
    /// `outbox_depth` per destination.
    pub outbox: Vec<(String, i64)>,
    /// `outbox_dead_letters` per destination: events set aside, waiting for
    /// `chirp outbox retry`.
    pub dead_letters: Vec<(String, i64)>,
    /// `erasures_pending`: erasures this service accepted and has not
    /// finished (a deleted user's messages or comments still going); `None`
    /// for a service that erases in one step.
    pub erasures_pending: Option<i64>,
}

/// One HTTP/1.1 request to a service's metrics port (where `/metrics` and
/// the operator endpoints live): the status code and body, or `None` when it
/// cannot be reached within a second.
pub async fn ops_request(ports: Ports, at: impl Into<Instance>, request: &str) -> Option<(u16, String)> {
    ops_request_within(ports, at, request, Duration::from_secs(5)).await
}

/// [`ops_request`] with a time limit of one's own (a backup takes as long
/// as the store is big).
pub async fn ops_request_within(
    ports: Ports,
    at: impl Into<Instance>,
    request: &str,
    limit: Duration,
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let port = ports.metrics(at);
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.ok()?;
        let (head, body) = reply.split_once("\r\n\r\n")?;
        let code = head.split(' ').nth(1)?.parse().ok()?;
        Some((code, body.to_owned()))
    };
    tokio::time::timeout(limit, fetch).await.ok().flatten()
}

/// A call to one of a service's operator routes (`POST /outbox/retry`,
/// `POST /maintenance/on`, …), opened with the mesh's ingest token from
/// `data_dir`: the body of a 200 answer.
///
/// # Errors
/// When the token cannot be read, the service does not answer, or answers
/// anything but 200.
pub async fn operator_call(
    data_dir: &std::path::Path,
    ports: Ports,
    at: impl Into<Instance>,
    method: &str,
    path: &str,
) -> anyhow::Result<String> {
    let at = at.into();
    let (code, body) = operator_request(data_dir, ports, at, method, path, Duration::from_secs(5)).await?;
    anyhow::ensure!(code == 200, "{} answered {code}: {body}", at.name());
    Ok(body)
}

/// An operator call that may take up to `limit`: the status code and body,
/// whatever the code.
///
/// # Errors
/// When the token cannot be read or the service does not answer in time.
pub async fn operator_request(
    data_dir: &std::path::Path,
    ports: Ports,
    at: impl Into<Instance>,
    method: &str,
    path: &str,
    limit: Duration,
) -> anyhow::Result<(u16, String)> {
    use anyhow::Context as _;
    let at = at.into();
    let file = crate::layout::ingest_token_file(data_dir);
    let token =
        std::fs::read_to_string(&file).with_context(|| format!("reading the ingest token from {}", file.display()))?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{}: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        service_kit::relay::INGEST_TOKEN_HEADER,
        token.trim()
    );
    ops_request_within(ports, at, &request, limit)
        .await
        .ok_or_else(|| anyhow::anyhow!("{} does not answer on its metrics port", at.name()))
}

/// What a service's `/metrics` says.
pub async fn metrics(ports: Ports, at: impl Into<Instance>) -> Option<String> {
    let request = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    ops_request(ports, at, request).await.map(|(_, body)| body)
}

/// `name{label="value"} number` lines of one metric.
fn samples(text: &str, metric: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|line| line.starts_with(metric) && !line.starts_with('#'))
        .filter_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            let label = key
                .split_once('"')
                .and_then(|(_, rest)| rest.split_once('"'))
                .map(|(label, _)| label.to_owned())
                .unwrap_or_default();
            let name = key.split('{').next()?;
            (name == metric).then_some(())?;
            Some((label, value.parse().ok()?))
        })
        .collect()
}

#[allow(clippy::cast_possible_truncation)]
fn per_destination(text: &str, metric: &str) -> Vec<(String, i64)> {
    samples(text, metric)
        .into_iter()
        .map(|(destination, v)| (destination, v as i64))
        .collect()
}

pub async fn report(ports: Ports, at: impl Into<Instance>) -> ServiceReport {
    let at = at.into();
    let (serving, text) = tokio::join!(health(ports, at), metrics(ports, at));
    ServiceReport::read(at, serving, &text.unwrap_or_default())
}

impl ServiceReport {
    /// What a service's health answer and `/metrics` text say of it.
    #[must_use]
    pub fn read(at: Instance, serving: Option<bool>, text: &str) -> Self {
        Self {
            service: at.name(),
            serving,
            store_up: samples(text, "store_up").first().map(|(_, v)| *v > 0.0),
            circuits: samples(text, "peer_circuit_state")
                .into_iter()
                .map(|(peer, v)| {
                    let state = match v as i64 {
                        0 => "closed",
                        1 => "half-open",
                        _ => "open",
                    };
                    (peer, state)
                })
                .collect(),
            outbox: per_destination(text, "outbox_depth"),
            dead_letters: per_destination(text, "outbox_dead_letters"),
            #[allow(clippy::cast_possible_truncation)]
            erasures_pending: samples(text, "erasures_pending").first().map(|(_, v)| *v as i64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_samples_are_read_by_name_and_label() {
        let text =
            "# HELP outbox_depth x\noutbox_depth{destination=\"analytics\"} 3\noutbox_depth_other 9\nstore_up 1\n";
        assert_eq!(samples(text, "outbox_depth"), [("analytics".to_owned(), 3.0)]);
        assert_eq!(samples(text, "store_up"), [(String::new(), 1.0)]);
        assert!(samples(text, "erasures_pending").is_empty());
    }
}
