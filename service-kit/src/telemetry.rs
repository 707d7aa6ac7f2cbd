//! Log output. Every RPC gets a span (see [`crate::server`]) carrying its
//! method and request id, so any event logged while serving it names both.

use tracing_subscriber::{fmt, prelude::*, EnvFilter};

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG` filters (default `info`).
///
/// Calling it twice is harmless: tests start many services in one process and
/// the first subscriber stays.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Pretty => registry.with(fmt::layer()).try_init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().with_current_span(true).with_span_list(false))
            .try_init(),
    };
    // An Err only means a subscriber is already installed.
    drop(result);
}
