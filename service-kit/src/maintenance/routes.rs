//! The backup and restore routes of the metrics port, for callers
//! presenting the ingest token (the operator's, as for the outbox and
//! maintenance routes):
//!
//! | route | does |
//! |---|---|
//! | `GET /store` | the live data's schema version and counts |
//! | `POST /backups/{name}` | writes backup `name` into `BACKUP_DIR/name` |
//! | `POST /restore/{name}/load` | verifies backup `name` and loads it beside the live data |
//! | `POST /restore/discard` | drops a loaded backup |
//! | `POST /restore/switch` | in maintenance: the loaded backup becomes live, the replaced data is kept |
//! | `POST /restore/undo` | in maintenance: the kept data becomes live again |
//! | `POST /restore/confirm` | drops the kept data |
//!
//! A refusal (nothing changed) answers 409, a store failure 500, each with
//! `{"error": "…"}`: this surface is the operator's, who needs the reason.

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    http::HeaderMap,
    routing::{get, post},
    Router,
};
use serde_json::{json, Value};

use super::{Maintainer, Refusal, StoreMaintenance};

type Reply = (http::StatusCode, String);

struct Routes<S> {
    maintainer: Arc<Maintainer<S>>,
    token: Arc<str>,
}

// By hand: a derive would ask `S: Clone`, and a store's maintenance is
// shared, not cloned.
impl<S> Clone for Routes<S> {
    fn clone(&self) -> Self {
        Self {
            maintainer: self.maintainer.clone(),
            token: self.token.clone(),
        }
    }
}

fn answer(outcome: Result<Value, Refusal>) -> Reply {
    match outcome {
        Ok(body) => (http::StatusCode::OK, body.to_string()),
        Err(Refusal::Refused(err)) => (
            http::StatusCode::CONFLICT,
            json!({ "error": format!("{err:#}") }).to_string(),
        ),
        Err(Refusal::Failed(err)) => {
            tracing::error!(error = format!("{err:#}"), "maintenance step failed");
            (
                http::StatusCode::INTERNAL_SERVER_ERROR,
                json!({ "error": format!("{err:#}") }).to_string(),
            )
        }
    }
}

/// Runs `step` for an authorized caller.
async fn authorized<S, F>(routes: &Routes<S>, headers: &HeaderMap, step: F) -> Reply
where
    F: std::future::Future<Output = Result<Value, Refusal>>,
{
    if let Err(refused) = crate::relay::operator_authorized(headers, &routes.token) {
        return refused;
    }
    answer(step.await)
}

/// The routes above for `maintainer`.
pub fn routes<S: StoreMaintenance>(maintainer: Arc<Maintainer<S>>, ingest_token: &str) -> Router {
    Router::new()
        .route(
            "/store",
            get(|State(r): State<Routes<S>>, h: HeaderMap| async move {
                authorized(&r, &h, async { Ok(json!(r.maintainer.inspect().await?)) }).await
            }),
        )
        .route(
            "/backups/{name}",
            post(
                |State(r): State<Routes<S>>, Path(name): Path<String>, h: HeaderMap| async move {
                    authorized(&r, &h, async { Ok(json!(r.maintainer.backup(&name).await?)) }).await
                },
            ),
        )
        .route(
            "/restore/{name}/load",
            post(
                |State(r): State<Routes<S>>, Path(name): Path<String>, h: HeaderMap| async move {
                    authorized(&r, &h, async {
                        let (before, backup) = r.maintainer.load(&name).await?;
                        Ok(json!({ "before": before, "backup": backup }))
                    })
                    .await
                },
            ),
        )
        .route(
            "/restore/discard",
            post(|State(r): State<Routes<S>>, h: HeaderMap| async move {
                authorized(&r, &h, async {
                    r.maintainer.discard().await?;
                    Ok(json!({}))
                })
                .await
            }),
        )
        .route(
            "/restore/switch",
            post(|State(r): State<Routes<S>>, h: HeaderMap| async move {
                authorized(&r, &h, async {
                    let (before, after, backup) = r.maintainer.switch().await?;
                    Ok(json!({ "before": before, "after": after, "backup": backup }))
                })
                .await
            }),
        )
        .route(
            "/restore/undo",
            post(|State(r): State<Routes<S>>, h: HeaderMap| async move {
                authorized(&r, &h, async { Ok(json!({ "after": r.maintainer.undo().await? })) }).await
            }),
        )
        .route(
            "/restore/confirm",
            post(|State(r): State<Routes<S>>, h: HeaderMap| async move {
                authorized(&r, &h, async {
                    r.maintainer.confirm().await?;
                    Ok(json!({}))
                })
                .await
            }),
        )
        .with_state(Routes {
            maintainer,
            token: Arc::from(ingest_token),
        })
}
