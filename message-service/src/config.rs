//! message-service's settings: flags, each mirrored by an environment variable.

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use service_kit::config::{parse_duration, CommonArgs};

/// Chirp's message-service: messages in MongoDB, which no other service
/// touches. Authors, comments and follows come from their owners over gRPC,
/// each under its own deadline.
#[derive(Clone, Debug, Parser)]
#[command(name = "message-service", version)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    /// MongoDB URI of the service's own deployment (a replica set)
    #[arg(long, env = "MONGODB_URI", hide_env_values = true)]
    pub mongodb_uri: String,

    /// Database holding the messages collection
    #[arg(long, env = "MONGODB_DATABASE", default_value = "chirp_messages")]
    pub mongodb_database: String,

    /// user-service's gRPC endpoint: authors, following lists, token keys
    #[arg(long, env = "USER_SERVICE_URL", default_value = "http://127.0.0.1:50051")]
    pub user_service_url: String,

    /// comment-service's gRPC endpoint: comment counts and previews
    #[arg(long, env = "COMMENT_SERVICE_URL", default_value = "http://127.0.0.1:50053")]
    pub comment_service_url: String,

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

    /// How long a following list fetched from user-service is used as is
    #[arg(long, env = "FOLLOWING_CACHE_TTL", value_parser = parse_duration, default_value = "30s")]
    pub following_cache_ttl: Duration,

    /// How long a following list may still stand in while user-service is
    /// down (the timeline is then marked degraded)
    #[arg(long, env = "FOLLOWING_CACHE_MAX_AGE", value_parser = parse_duration, default_value = "60m")]
    pub following_cache_max_age: Duration,

    /// Followed user ids the following-list cache holds in all (a list
    /// weighs its length plus one), so memory stays bounded whoever follows
    /// how many: 16 bytes an id, about 3 MiB by default
    #[arg(long, env = "FOLLOWING_CACHE_MAX_IDS", default_value_t = 200_000)]
    pub following_cache_max_ids: u64,

    /// Comments shown under a message by GetMessage
    #[arg(long, env = "COMMENT_PREVIEW_SIZE", default_value_t = 3)]
    pub comment_preview_size: u32,
}

/// gRPC port of message-service in ARCHITECTURE.md.
pub const DEFAULT_PORT: u16 = 50052;
/// Port of `/metrics` unless METRICS_ADDR says otherwise.
pub const DEFAULT_METRICS_PORT: u16 = 9452;
