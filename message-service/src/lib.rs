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
use service_kit::{
    auth::TokenVerifier,
    relay::{self, Analytics, RelayConfig, Relays},
    revocation::Revocations,
    server::{Health, ServeOptions},
    store::{StoreMonitor, StoreStatus},
};
use tokio::net::TcpListener;

use crate::{
    clients::{CommentClient, CommentEvents, UserClient},
    config::Config,
    service::{CacheSettings, Messages},
    store::Store,
};

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
    let revocations = Revocations::catching_up_from(user_peer.clone(), &config.ingest_token)?;
    let verifier = Arc::new(
        TokenVerifier::configured(&config.jwt_public_key_file, user_peer.clone())?
            .with_revocations(revocations.clone()),
    );

    let status = StoreStatus::new();
    let store = Store::connect_lazy(&config.mongodb_uri, &config.mongodb_database, status.clone())
        .await
        .context("MONGODB_URI")?;
    let registry = prometheus::Registry::new();
    service_kit::client::register_metrics(&registry)?;
    let mut relays = Relays::new(&registry)?.gated_by(status.clone());
    relays.spawn(
        RelayConfig::new(store::ANALYTICS),
        store.outbox(store::ANALYTICS),
        Analytics::new(
            peer("analytics-service", &config.analytics_service_url)?,
            &config.ingest_token,
        )?,
    );
    relays.spawn(
        RelayConfig::new(store::COMMENTS),
        store.outbox(store::COMMENTS),
        CommentEvents::new(comment_peer.clone(), &config.ingest_token)?,
    );
    let relays = Arc::new(relays);
    let _revocation_sync = revocations.sync(store.revocation_store());
    let erasures = service_kit::jobs::spawn(
        "erasures_pending",
        "Erasures of deleted users' messages recorded and not finished",
        service::Erasures(store.clone()),
        &registry,
    )?;
    let visibility = service_kit::jobs::spawn(
        "visibility_changes_pending",
        "Bans and unbans whose users' messages are not all hidden or shown yet",
        service::Visibility(store.clone()),
        &registry,
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
        &registry,
        revocations,
        service::Wakers {
            erasures: erasures.waker(),
            visibility: visibility.waker(),
        },
    )?);

    let apis = vec![grpc::v1::SERVICE_NAME, grpc::v2::SERVICE_NAME];
    let health = Health::new();
    let _monitor = StoreMonitor::watch(
        "mongodb",
        health.clone(),
        &registry,
        apis.clone(),
        config.store_probe_interval,
        status.clone(),
        messages.clone(),
    )?;

    let shared = Arc::new(grpc::Shared { messages, verifier });
    let routes = tonic::service::Routes::new(
        grpc::v1::MessageServiceServer::new(grpc::v1::Api(shared.clone()))
            .max_decoding_message_size(grpc::MAX_REQUEST_BYTES),
    )
    .add_service(
        grpc::v2::MessageServiceServer::new(grpc::v2::Api(shared)).max_decoding_message_size(grpc::MAX_REQUEST_BYTES),
    );
    service_kit::server::serve(
        ServeOptions::new("message-service", apis, &config.common)
            .with_operator_routes(relay::operator_routes(relays, &config.ingest_token)),
        health,
        registry,
        listener,
        metrics_listener,
        routes,
        shutdown,
    )
    .await
}
