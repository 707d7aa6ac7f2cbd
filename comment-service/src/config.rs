//! comment-service's settings: flags, each mirrored by an environment variable.

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use service_kit::config::{parse_duration, CommonArgs};

/// Chirp's comment-service: comments on messages, in a Redis that no other
/// service touches. Whether a message exists is asked of message-service.
#[derive(Clone, Debug, Parser)]
#[command(name = "comment-service", version)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Redis URL of the service's own Redis (run it with appendonly yes)
    #[arg(
        long,
        env = "REDIS_URL",
        hide_env_values = true,
        required_unless_present = "redis_cluster_urls",
        conflicts_with = "redis_cluster_urls"
    )]
    pub redis_url: Option<String>,

    /// Instead of REDIS_URL: seed nodes of the service's own Redis Cluster,
    /// comma-separated `redis://host:port` URLs (the client learns the rest)
    #[arg(long, env = "REDIS_CLUSTER_URLS", hide_env_values = true, value_delimiter = ',')]
    pub redis_cluster_urls: Vec<String>,

    /// Prefix of every key this service writes, so one Redis can be shared by
    /// several deployments (and tests) without collisions
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "chirp:comments:")]
    pub redis_key_prefix: String,

    /// message-service's gRPC endpoint: does a message exist?
    #[arg(long, env = "MESSAGE_SERVICE_URL", default_value = "http://127.0.0.1:50052")]
    pub message_service_url: String,

    /// user-service's gRPC endpoint: token keys
    #[arg(long, env = "USER_SERVICE_URL", default_value = "http://127.0.0.1:50051")]
    pub user_service_url: String,

    /// analytics-service's gRPC endpoint: where events are delivered
    #[arg(long, env = "ANALYTICS_SERVICE_URL", default_value = "http://127.0.0.1:50054")]
    pub analytics_service_url: String,

    /// Deadline of each call to a peer (cut further by the caller's own deadline)
    #[arg(long, env = "PEER_TIMEOUT", value_parser = parse_duration, default_value = "250ms")]
    pub peer_timeout: Duration,

    /// PEM Ed25519 public keys that verify tokens (deployments mount them
    /// from a Secret: the current key, and retired keys until their tokens
    /// expire), comma-separated files. Without them the keys are fetched from
    /// user-service and cached (local development)
    #[arg(long, env = "JWT_PUBLIC_KEY_FILE", value_delimiter = ',')]
    pub jwt_public_key_file: Vec<PathBuf>,

    /// How long "this message exists" is remembered (0s: always ask). A
    /// message deleted within this window can still receive a comment
    #[arg(long, env = "MESSAGE_EXISTS_CACHE_TTL", value_parser = parse_duration, default_value = "5s")]
    pub message_exists_cache_ttl: Duration,
}

/// gRPC port of comment-service in ARCHITECTURE.md.
pub const DEFAULT_PORT: u16 = 50053;
/// Port of `/metrics` unless METRICS_ADDR says otherwise.
pub const DEFAULT_METRICS_PORT: u16 = 9453;

impl Config {
    /// Where the store is: one server or a cluster.
    #[must_use]
    pub fn redis(&self) -> crate::store::Address {
        match &self.redis_url {
            Some(url) => crate::store::Address::Node(url.clone()),
            None => crate::store::Address::Cluster(self.redis_cluster_urls.clone()),
        }
    }
}
