//! Chirp's comment-service: comments on messages, in a Redis that no other
//! service touches. The data model is documented in [`store`].
//!
//! Layout: [`domain`] (types that parse), [`store`] (the only Redis code),
//! [`clients`] (the message existence check), [`service`] (the rules),
//! [`grpc`] (the edge).

pub mod clients;
pub mod config;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod service;
pub mod store;

use std::{future::Future, sync::Arc};

use anyhow::Context as _;
use service_kit::{auth::TokenVerifier, bootstrap::Service, relay::Analytics};
use tokio::net::TcpListener;

use crate::{
    clients::{MessageClient, UserClient},
    config::Config,
    grpc::SERVICE_NAME,
    service::Comments,
    store::Store,
};

/// This binary, for [`service_kit::bootstrap::main`].
pub const BINARY: service_kit::bootstrap::Binary = service_kit::bootstrap::Binary {
    name: "comment-service",
    api: "chirp.comment.v1.CommentService",
    default_port: config::DEFAULT_PORT,
    default_metrics_port: config::DEFAULT_METRICS_PORT,
};

/// The store's backup and restore (see `service_kit::maintenance`), for
/// the operator routes and for `comment-service backup|restore`.
///
/// # Errors
/// When the store's address is not valid.
pub fn maintenance(config: &Config) -> anyhow::Result<store::Maintenance> {
    store::Maintenance::new(&config.redis(), &config.redis_key_prefix).context("REDIS_URL or REDIS_CLUSTER_URLS")
}

/// Runs comment-service on `listener` until `shutdown` resolves. Starts even
/// while Redis or its peers are down.
///
/// # Errors
/// When the configuration is unusable or the server fails.
pub async fn run(
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let peer = |name: &'static str, url: &str| service_kit::client::peer(name, url, config.peer_timeout);
    let user_peer = peer("user-service", &config.user_service_url)?;
    let (verifier, revocations) = TokenVerifier::with_revocations_from(
        user_peer.clone(),
        &config.jwt_public_key_file,
        &config.common.ingest_token,
    )?;
    let messages = MessageClient::new(peer("message-service", &config.message_service_url)?);

    let mut service = Service::new("comment-service", vec![SERVICE_NAME])?;
    let store = Store::connect_lazy(&config.redis(), &config.redis_key_prefix, service.store_status())
        .context("REDIS_URL or REDIS_CLUSTER_URLS")?;
    service.relay(
        "analytics",
        store.outbox(),
        Analytics::new(
            peer("analytics-service", &config.analytics_service_url)?,
            &config.common.ingest_token,
        )?,
    );
    service.keep(revocations.sync(store.revocation_store(), service.store_status()));
    let purges = service.job(
        "erasures_pending",
        "Purges of users' and deleted messages' comments recorded and not finished",
        service::Purges(store.clone()),
    )?;
    let comments = Arc::new(Comments::new(
        store,
        messages,
        UserClient::new(user_peer),
        revocations,
        purges,
        config.message_exists_cache_ttl,
    ));
    service.watch_store("redis", config.common.store_probe_interval, comments.clone())?;

    let api = grpc::CommentApi::new(comments, verifier, config.common.ingest_token.clone());
    let routes = tonic::service::Routes::new(
        grpc::CommentServiceServer::new(api).max_decoding_message_size(grpc::MAX_REQUEST_BYTES),
    );
    // Backups and restores (`chirp backup|restore`) on the metrics port.
    service.maintenance(maintenance(&config)?, config.common.backup_dir.clone());
    service.operator_routes(&config.common.ingest_token);
    service
        .serve(&config.common, routes, listener, metrics_listener, shutdown)
        .await
}
