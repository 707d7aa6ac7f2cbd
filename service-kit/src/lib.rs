//! The runtime every Chirp service stands on.
//!
//! - [`bootstrap`]: every service's `main` and the parts that run beside its
//!   routes (metrics registry, store monitor, relays, jobs), built one way.
//! - [`config`]: settings shared by every binary (flags mirror environment
//!   variables, so `--help` documents the whole surface).
//! - [`telemetry`]: pretty or JSON logs, and OpenTelemetry traces over OTLP
//!   with W3C trace context carried through calls and outbox events.
//! - [`context`]: the request id and incoming deadline of the RPC being served,
//!   so outgoing calls can carry them on.
//! - [`server`]: health, reflection, metrics, tower layers and graceful
//!   shutdown around a service's routes.
//! - [`store`]: watches a service's store and drives its health status.
//! - [`files`]: files holding secrets or users' data, born private.
//! - [`maintenance`]: backup and restore, done by the store's owner, in
//!   steps that prove a backup before it replaces anything.
//! - [`client`]: the stack for calling peers (deadline, retries with a
//!   budget, circuit breaker, concurrency limit).
//! - [`auth`]: Ed25519 JWT claims and verification, service tokens.
//! - [`revocation`]: the projection of revoked tokens every verifying
//!   service keeps, and its sync from the service's own store.
//! - [`events`]: the events producers write to their outboxes.
//! - [`relay`]: delivers outbox events to their destinations.
//! - [`jobs`]: background work kept in a service's own store (erasures),
//!   done in bounded chunks and resumed after a crash.
//! - [`validate`]: field violations and the text rules every service shares.
//! - [`error`]: the failures every service's error enum shares, and the one
//!   mapping of them to a gRPC status.
//! - [`domain`]: the ids, texts and page requests every service's domain
//!   shares.

pub mod auth;
pub mod bootstrap;
pub mod client;
pub mod config;
pub mod context;
pub mod domain;
pub mod error;
pub mod events;
pub mod files;
pub mod jobs;
pub mod maintenance;
pub mod relay;
pub mod revocation;
pub mod server;
pub mod store;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod validate;
