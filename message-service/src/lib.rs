//! Chirp's message-service: messages in a MongoDB database that no other
//! service touches, served as chirp.message.v1 and chirp.message.v2 from one
//! collection.
//!
//! Layout: [`domain`] (types that parse), [`store`] (the only MongoDB code),
//! [`clients`] (calls to user- and comment-service), [`service`] (the rules
//! and fallbacks), [`grpc`] (the edge).

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
    clients::{CommentClient, CommentEvents, UserClient},
    config::Config,
    service::{CacheSettings, Messages},
    store::Store,
};

/// This binary, for [`service_kit::bootstrap::main`].
pub const BINARY: service_kit::bootstrap::Binary = service_kit::bootstrap::Binary {
    name: "message-service",
    api: "chirp.message.v1.MessageService",
    default_port: config::DEFAULT_PORT,
    default_metrics_port: config::DEFAULT_METRICS_PORT,
};

/// The store's backup and restore (see `service_kit::maintenance`), for
/// the operator routes and for `message-service backup|restore`.
///
/// # Errors
/// Never: the client is made when first used (a `Result` like the other
/// services' so that `bootstrap::main` takes one shape).
pub fn maintenance(config: &Config) -> anyhow::Result<store::Maintenance> {
    Ok(store::Maintenance::new(&config.mongodb_uri, &config.mongodb_database))
}

/// Runs message-service on `listener` until `shutdown` resolves. Starts even
/// while MongoDB or its peers are down.
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
    let comment_peer = peer("comment-service", &config.comment_service_url)?;
    let (verifier, revocations) = TokenVerifier::with_revocations_from(
        user_peer.clone(),
        &config.jwt_public_key_file,
        &config.common.ingest_token,
    )?;

    let apis = vec![grpc::v1::SERVICE_NAME, grpc::v2::SERVICE_NAME];
    let mut service = Service::new("message-service", apis)?;
    let store = Store::connect_lazy(&config.mongodb_uri, &config.mongodb_database, service.store_status())
        .await
        .context("MONGODB_URI")?;
    service.relay(
        store::ANALYTICS,
        store.outbox(store::ANALYTICS),
        Analytics::new(
            peer("analytics-service", &config.analytics_service_url)?,
            &config.common.ingest_token,
        )?,
    );
    service.relay(
        store::COMMENTS,
        store.outbox(store::COMMENTS),
        CommentEvents::new(comment_peer.clone(), &config.common.ingest_token)?,
    );
    service.keep(revocations.sync(store.revocation_store(), service.store_status()));
    let erasures = service.job(
        "erasures_pending",
        "Erasures of deleted users' messages recorded and not finished",
        service::Erasures(store.clone()),
    )?;
    let visibility = service.job(
        "visibility_changes_pending",
        "Bans and unbans whose users' messages are not all hidden or shown yet",
        service::Visibility(store.clone()),
    )?;
    let messages = Arc::new(Messages::new(
        store,
        UserClient::new(user_peer),
        CommentClient::new(comment_peer),
        &CacheSettings {
            ttl: config.following_cache_ttl,
            max_age: config.following_cache_max_age,
            max_ids: config.following_cache_max_ids,
        },
        config.comment_preview_size,
        service.registry(),
        revocations,
        service::Wakers { erasures, visibility },
    )?);
    service.watch_store("mongodb", config.common.store_probe_interval, messages.clone())?;

    let shared = Arc::new(grpc::Shared { messages, verifier });
    let routes = tonic::service::Routes::new(
        grpc::v1::MessageServiceServer::new(grpc::v1::Api(shared.clone()))
            .max_decoding_message_size(grpc::MAX_REQUEST_BYTES),
    )
    .add_service(
        grpc::v2::MessageServiceServer::new(grpc::v2::Api(shared)).max_decoding_message_size(grpc::MAX_REQUEST_BYTES),
    );
    // Backups and restores (`chirp backup|restore`) on the metrics port.
    service.maintenance(maintenance(&config)?, config.common.backup_dir.clone());
    service.operator_routes(&config.common.ingest_token);
    service
        .serve(&config.common, routes, listener, metrics_listener, shutdown)
        .await
}
