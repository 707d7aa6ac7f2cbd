//! The page's HTTP side: the page itself (HTML, script and style compiled
//! into the binary, so nothing is built or fetched at run time), its state
//! once and as a stream of server-sent events, and the commands its buttons
//! send.

use std::{convert::Infallible, sync::Arc};

use axum::{
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Response,
    },
    routing::{get, post},
    Json, Router,
};
use futures::{future::BoxFuture, Stream, StreamExt as _};
use serde::Deserialize;
use tokio_stream::wrappers::WatchStream;

use super::Live;

/// Runs one control command (`stop redis`, `slow redis 300ms`, `load
/// start`, …) as the control socket would: whether it succeeded, and what
/// to tell the user.
pub type Commands = Arc<dyn Fn(String) -> BoxFuture<'static, (bool, String)> + Send + Sync>;

#[derive(Clone)]
struct App {
    live: Arc<Live>,
    commands: Commands,
}

/// Serves the page on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, live: Arc<Live>, commands: Commands) {
    let app = Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", include_str!("assets/index.html")) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", include_str!("assets/app.js")) }),
        )
        .route(
            "/style.css",
            get(|| async { asset("text/css; charset=utf-8", include_str!("assets/style.css")) }),
        )
        .route("/api/state", get(state))
        .route("/api/events", get(events))
        .route("/api/command", post(command))
        .with_state(App { live, commands });
    if let Err(err) = axum::serve(listener, app).await {
        println!("[chirp] the page stopped serving: {err}");
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn state(State(app): State<App>) -> Response {
    let json = app.live.subscribe().borrow().to_string();
    ([(header::CONTENT_TYPE, "application/json")], json).into_response()
}

async fn events(State(app): State<App>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream =
        WatchStream::new(app.live.subscribe()).map(|json| Ok(Event::default().event("state").data(json.as_str())));
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[derive(Deserialize)]
struct Command {
    command: String,
}

/// A command from the page. Only the page's own origin may send one: a
/// JSON body cannot be sent across origins without a preflight this server
/// never answers, and a request that says where it comes from must come
/// from here, so another site open in the same browser cannot stop the
/// mesh.
async fn command(State(app): State<App>, headers: HeaderMap, body: Json<Command>) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
        if origin.split_once("://").map(|(_, rest)| rest) != Some(host) {
            return (StatusCode::FORBIDDEN, "commands come from the page itself").into_response();
        }
    }
    if body.command.len() > 200 {
        return (StatusCode::BAD_REQUEST, "command too long").into_response();
    }
    let (ok, message) = (app.commands)(body.0.command).await;
    let status = if ok { StatusCode::OK } else { StatusCode::BAD_REQUEST };
    (status, Json(serde_json::json!({"ok": ok, "message": message}))).into_response()
}
