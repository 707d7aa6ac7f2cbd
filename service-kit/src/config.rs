//! Settings shared by every service binary.
//!
//! Each service flattens [`CommonArgs`] into its own clap parser, so a flag and
//! its environment variable are the same setting and `--help` lists both.

use std::{net::SocketAddr, time::Duration};

use clap::{Args, ValueEnum};

/// How logs are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable, coloured when stdout is a terminal.
    #[default]
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Settings every Chirp service has.
#[derive(Clone, Debug, Args)]
pub struct CommonArgs {
    /// gRPC listen address [default: 0.0.0.0 and the service's own port]
    #[arg(long, env = "LISTEN_ADDR")]
    pub listen_addr: Option<SocketAddr>,

    /// Address of the HTTP server for Prometheus `/metrics`
    /// [default: 0.0.0.0 and the service's own metrics port]
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Log format
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,

    /// Upper bound on any one RPC's handling time; a client's shorter
    /// grpc-timeout wins
    #[arg(long, env = "REQUEST_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    pub request_timeout: Duration,

    /// RPCs handled at once; beyond it, requests are shed with RESOURCE_EXHAUSTED
    /// rather than queued
    #[arg(long, env = "CONCURRENCY_LIMIT", default_value_t = 512)]
    pub concurrency_limit: usize,

    /// On SIGTERM, how long to keep serving after health turns NOT_SERVING, so
    /// load balancers stop routing here before connections drain
    #[arg(long, env = "SHUTDOWN_DELAY", value_parser = parse_duration, default_value = "0s")]
    pub shutdown_delay: Duration,

    /// Longest wait for in-flight RPCs during shutdown
    #[arg(long, env = "DRAIN_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub drain_timeout: Duration,

    /// How often the service's own store is probed to drive health
    #[arg(long, env = "STORE_PROBE_INTERVAL", value_parser = parse_duration, default_value = "1s")]
    pub store_probe_interval: Duration,

    /// Shared secret Chirp's services present to each other as
    /// `x-chirp-ingest-token`: event delivery, revocation catch-up, and the
    /// operator routes on the metrics port
    #[arg(
        long,
        env = "INGEST_TOKEN",
        hide_env_values = true,
        default_value = "chirp-dev-ingest-token"
    )]
    pub ingest_token: String,

    /// Directory the service writes its backups into and restores them
    /// from (`chirp backup` and `chirp restore` ask for them through the
    /// operator routes); unset, the service takes no backups
    #[arg(long, env = "BACKUP_DIR")]
    pub backup_dir: Option<std::path::PathBuf>,
}

impl CommonArgs {
    /// `LISTEN_ADDR`, or all interfaces on the service's own port.
    #[must_use]
    pub fn listen_addr(&self, default_port: u16) -> SocketAddr {
        self.listen_addr
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], default_port)))
    }

    /// `METRICS_ADDR`, or all interfaces on the service's metrics port.
    #[must_use]
    pub fn metrics_addr(&self, default_port: u16) -> SocketAddr {
        self.metrics_addr
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], default_port)))
    }
}

/// Parses durations such as `250ms`, `5s`, `2m`, as configuration writes them.
///
/// # Errors
/// When the number or the unit is missing or unknown.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{text}` has no unit (ms, s or m)"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` does not start with a number"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(number)),
        "s" => Ok(Duration::from_secs(number)),
        "m" => Ok(Duration::from_secs(number * 60)),
        _ => Err(format!("`{unit}` is not a unit: use ms, s or m")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_their_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5h").is_err());
    }
}
