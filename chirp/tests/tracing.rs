//! Traces across the mesh: `chirp up --otlp-endpoint` against an in-process
//! OTLP receiver. Each request is sent with a `traceparent` of the test's
//! own, so its trace is found among everything the mesh exports; the span
//! trees are printed for the record.

mod common;

use std::{
    collections::HashSet,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use chirp_proto::{
    comment::v1::{self as cpb, comment_service_client::CommentServiceClient},
    message::v2::{self as m2, message_service_client::MessageServiceClient},
    user::v1::{self as upb, user_service_client::UserServiceClient},
};
use common::{free_port_base, settled, Up};
use test_support::otlp::{tree, Collector, Span};
use tonic::transport::Channel;

const DEMO_PASSWORD: &str = "chirp-demo-password";
const ADMIN: &str = "admin";
const ADMIN_PASSWORD: &str = "chirp-admin-password";
/// Exporters send every 200 ms here (OTEL_BSP_SCHEDULE_DELAY); a trace's
/// last span may come from a service that answered last.
const EXPORT_WAIT: Duration = Duration::from_secs(20);

/// A caller's span: a fresh trace id and the span id the mesh's first
/// span must name as its parent.
struct Caller {
    trace_id: String,
    span_id: String,
}

impl Caller {
    fn new() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(1);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        Self {
            trace_id: format!("{nanos:016x}{:08x}{n:08x}", std::process::id()),
            span_id: format!("{:016x}", nanos ^ (n << 40) | 1),
        }
    }

    fn request<T>(&self, message: T, token: Option<&str>) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let traceparent = format!("00-{}-{}-01", self.trace_id, self.span_id);
        request
            .metadata_mut()
            .insert("traceparent", traceparent.parse().expect("a header value"));
        if let Some(token) = token {
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {token}").parse().expect("a header value"),
            );
        }
        request.set_timeout(Duration::from_secs(5));
        request
    }

    fn spans<'a>(&self, all: &'a [Span]) -> Vec<&'a Span> {
        all.iter().filter(|s| s.trace_id == self.trace_id).collect()
    }
}

fn find<'a>(spans: &[&'a Span], service: &str, name: &str) -> Option<&'a Span> {
    spans.iter().copied().find(|s| s.service == service && s.name == name)
}

fn children<'a>(spans: &[&'a Span], parent: &Span) -> Vec<&'a Span> {
    spans
        .iter()
        .copied()
        .filter(|s| s.parent_span_id == parent.span_id)
        .collect()
}

/// analytics-service's `apply message_posted` linked to the post's trace,
/// once its delivery trace holds analytics' RecordEvents server span and
/// message-service's `deliver to analytics` (the last to end there).
fn delivered_apply<'a>(all: &'a [Span], post_trace: &str) -> Option<&'a Span> {
    all.iter()
        .filter(|s| s.service == "analytics-service" && s.name == "apply message_posted" && links_to(s, post_trace))
        .find(|apply| {
            let in_trace = |service: &str, name: &str| {
                all.iter()
                    .any(|s| s.trace_id == apply.trace_id && s.service == service && s.name == name)
            };
            in_trace("analytics-service", "chirp.analytics.v1.AnalyticsService/RecordEvents")
                && in_trace("message-service", "deliver to analytics")
        })
}

fn links_to(span: &Span, trace_id: &str) -> bool {
    span.links.iter().any(|(trace, _)| trace == trace_id)
}

/// `chirp up` with `args`, its exporters sending every `schedule_delay_ms`,
/// once every service is SERVING with empty outboxes (up to 60 s).
fn settled_mesh(dir: &std::path::Path, args: &[&str], schedule_delay_ms: &str) -> Up {
    let up = Up::start_env(
        dir,
        free_port_base(),
        args,
        &[("OTEL_BSP_SCHEDULE_DELAY", schedule_delay_ms)],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !settled(&up.status()) {
        assert!(Instant::now() < deadline, "the mesh did not settle:\n{}", up.tail());
        std::thread::sleep(Duration::from_millis(200));
    }
    up
}

/// A GetMessage of a message that does not exist (a mesh without seed
/// data): NOT_FOUND, after message-service's MongoDB read.
async fn get_missing_message(up: &Up, caller: &Caller) {
    let reply = MessageServiceClient::new(up.channel(2))
        .get_message(caller.request(
            m2::GetMessageRequest {
                message_id: "0190d7a4-0000-7000-8000-000000000000".into(),
            },
            None,
        ))
        .await;
    assert_eq!(reply.unwrap_err().code(), tonic::Code::NotFound);
}

/// The session token and user id of a login.
async fn login(channel: &Channel, username: &str, password: &str) -> (String, String) {
    let reply = UserServiceClient::new(channel.clone())
        .login(upb::LoginRequest {
            username: username.into(),
            password: password.into(),
        })
        .await
        .expect("login")
        .into_inner();
    (reply.access_token, reply.user.unwrap_or_default().id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_one_trace_across_services_stores_and_outboxes_and_failures_show_in_them() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let up = settled_mesh(dir.path(), &["--otlp-endpoint", &collector.endpoint()], "200");
    let users = up.channel(1);
    let messages = up.channel(2);
    let comments = up.channel(3);
    let (alice, _) = login(&users, "alice", DEMO_PASSWORD).await;
    let (bob, bob_id) = login(&users, "bob", DEMO_PASSWORD).await;

    // PostMessage: its event reaches analytics through message-service's
    // outbox; the delivery links back to the post's trace.
    let post = Caller::new();
    let message_id = MessageServiceClient::new(messages.clone())
        .post_message(post.request(
            m2::PostMessageRequest {
                body: "traced from end to end".into(),
            },
            Some(&alice),
        ))
        .await
        .expect("PostMessage")
        .into_inner()
        .message
        .unwrap_or_default()
        .id;
    CommentServiceClient::new(comments.clone())
        .add_comment(Caller::new().request(
            cpb::AddCommentRequest {
                message_id: message_id.clone(),
                body: "a comment by bob".into(),
            },
            Some(&bob),
        ))
        .await
        .expect("AddComment");

    // GetMessage: one trace through message-, user- and comment-service.
    let get = Caller::new();
    let reply = MessageServiceClient::new(messages.clone())
        .get_message(get.request(
            m2::GetMessageRequest {
                message_id: message_id.clone(),
            },
            None,
        ))
        .await
        .expect("GetMessage")
        .into_inner();
    assert_eq!(reply.message.unwrap_or_default().comments.unwrap_or_default().count, 1);
    let all = collector
        .wait_for(EXPORT_WAIT, |all| {
            // A process exports a span once it ends and its children end
            // first, so each service's server span comes with (or after)
            // everything under it.
            ["message-service", "user-service", "comment-service"]
                .iter()
                .all(|service| {
                    all.iter()
                        .any(|s| s.trace_id == get.trace_id && s.service == *service && s.kind == "Server")
                })
        })
        .await;
    let spans = get.spans(&all);
    println!("GetMessage, trace {}:\n{}", get.trace_id, tree(&all, &get.trace_id));
    let server = find(&spans, "message-service", "chirp.message.v2.MessageService/GetMessage")
        .expect("message-service's server span");
    assert_eq!(
        server.parent_span_id, get.span_id,
        "the server span continues the caller's"
    );
    assert_eq!(server.kind, "Server");
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    for span in &spans {
        assert!(
            span.parent_span_id == get.span_id || ids.contains(span.parent_span_id.as_str()),
            "{} {} hangs outside the trace",
            span.service,
            span.name
        );
    }
    let under_server = children(&spans, server);
    assert!(
        under_server
            .iter()
            .any(|s| s.name == "mongodb get" && s.kind == "Client"),
        "the MongoDB read is a child of the server span: {under_server:#?}"
    );
    for (peer, store) in [("user-service", "postgresql "), ("comment-service", "redis ")] {
        let call = under_server
            .iter()
            .find(|s| s.kind == "Client" && s.attributes.get("peer.service").map(String::as_str) == Some(peer))
            .unwrap_or_else(|| panic!("no client span for {peer} under GetMessage"));
        let remote = children(&spans, call);
        let remote_server = remote
            .iter()
            .find(|s| s.service == peer && s.kind == "Server" && s.name == call.name)
            .unwrap_or_else(|| panic!("{peer}'s server span is not a child of the call to it: {remote:#?}"));
        assert!(
            children(&spans, remote_server)
                .iter()
                .any(|s| s.service == peer && s.name.starts_with(store)),
            "{peer}'s server span has its store span"
        );
    }

    // The CLI traces too: `chirp get` is the root of the GetMessage trace.
    let output = common::chirp()
        .args(["get", &message_id])
        .env("CHIRP_DATA_DIR", &up.data_dir)
        .env("CHIRP_PORT_BASE", up.base.to_string())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint())
        .output()
        .expect("chirp get runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let all = collector
        .wait_for(EXPORT_WAIT, |all| {
            all.iter().any(|s| s.service == "chirp" && s.name == "chirp get")
        })
        .await;
    let root = all
        .iter()
        .find(|s| s.service == "chirp" && s.name == "chirp get")
        .expect("chirp exports its command's span");
    assert!(root.parent_span_id.is_empty(), "the command is the root");
    let all = collector
        .wait_for(EXPORT_WAIT, |all| {
            all.iter()
                .any(|s| s.trace_id == root.trace_id && s.service == "message-service" && s.kind == "Server")
        })
        .await;
    println!("chirp get, trace {}:\n{}", root.trace_id, tree(&all, &root.trace_id));
    let cli_call = all
        .iter()
        .find(|s| s.trace_id == root.trace_id && s.service == "chirp" && s.kind == "Client")
        .expect("chirp's call to message-service");
    assert_eq!(cli_call.parent_span_id, root.span_id);
    assert!(
        all.iter().any(|s| s.trace_id == root.trace_id
            && s.service == "message-service"
            && s.parent_span_id == cli_call.span_id),
        "message-service continues chirp's call"
    );

    // The post's delivery to analytics links to the post; analytics applies
    // the event in a span that continues the delivery.
    let all = collector
        .wait_for(EXPORT_WAIT, |all| {
            // The whole chain: the apply, analytics' server span above it,
            // and message-service's delivery (which ends last there).
            delivered_apply(all, &post.trace_id).is_some()
        })
        .await;
    println!("PostMessage, trace {}:\n{}", post.trace_id, tree(&all, &post.trace_id));
    let apply = delivered_apply(&all, &post.trace_id)
        .expect("analytics applies the post's event in a span linked to the post, under its delivery");
    let delivery_trace: Vec<&Span> = all.iter().filter(|s| s.trace_id == apply.trace_id).collect();
    println!(
        "its delivery, trace {}:\n{}",
        apply.trace_id,
        tree(&all, &apply.trace_id)
    );
    let by_id = |id: &str| delivery_trace.iter().copied().find(|s| s.span_id == id);
    // Apply runs inside the SQLite transaction that records the batch.
    let mut record = by_id(&apply.parent_span_id).expect("apply has a parent in the delivery's trace");
    while record.kind != "Server" {
        record = by_id(&record.parent_span_id).expect("apply is under the RecordEvents server span");
    }
    assert_eq!(record.name, "chirp.analytics.v1.AnalyticsService/RecordEvents");
    assert_eq!(record.service, "analytics-service");
    let call = by_id(&record.parent_span_id).expect("RecordEvents continues a call");
    assert_eq!(
        (call.service.as_str(), call.kind.as_str()),
        ("message-service", "Client")
    );
    let delivery = by_id(&call.parent_span_id).expect("the call is part of a delivery");
    assert_eq!(delivery.name, "deliver to analytics");
    assert!(links_to(delivery, &post.trace_id), "the delivery links to the post");

    // A ban: the purge of bob's comments in comment-service, done later by
    // its worker, links to the BanUser trace.
    let (admin, _) = login(&users, ADMIN, ADMIN_PASSWORD).await;
    let ban = Caller::new();
    UserServiceClient::new(users.clone())
        .ban_user(ban.request(
            upb::BanUserRequest {
                user_id: bob_id,
                reason: "traced".into(),
            },
            Some(&admin),
        ))
        .await
        .expect("BanUser");
    let all = collector
        .wait_for(EXPORT_WAIT, |all| {
            let linked = |service: &str, name: &str| {
                all.iter()
                    .any(|s| s.service == service && s.name == name && links_to(s, &ban.trace_id))
            };
            linked("comment-service", "purge batch") && linked("user-service", "deliver to comments")
        })
        .await;
    println!("BanUser, trace {}:\n{}", ban.trace_id, tree(&all, &ban.trace_id));
    let linked: Vec<&Span> = all.iter().filter(|s| links_to(s, &ban.trace_id)).collect();
    assert!(
        linked
            .iter()
            .any(|s| s.name == "deliver to comments" && s.service == "user-service"),
        "user-service's delivery to comment-service links to the ban: {linked:#?}"
    );
    let purge = linked
        .iter()
        .find(|s| s.name == "purge batch")
        .expect("the purge links to the ban");
    println!("spans linked to the ban:");
    for span in &linked {
        println!("  {:<18} {} (trace {})", span.service, span.name, span.trace_id);
    }
    println!("the purge, trace {}:\n{}", purge.trace_id, tree(&all, &purge.trace_id));
    assert!(
        all.iter()
            .any(|s| s.trace_id == purge.trace_id && s.parent_span_id == purge.span_id && s.name.starts_with("redis")),
        "the purge's Redis work is under it"
    );

    // The comment store down: the comment call's span carries the error and
    // the reply's degraded part shows in the server span.
    let (code, out) = up.run(&["chaos", "stop", "redis"]);
    assert_eq!(code, 0, "{out}");
    let degraded = Caller::new();
    let reply = MessageServiceClient::new(messages.clone())
        .get_message(degraded.request(m2::GetMessageRequest { message_id }, None))
        .await
        .expect("GetMessage answers with the comments part degraded")
        .into_inner();
    assert_eq!(
        reply.message.unwrap_or_default().comments.unwrap_or_default().status,
        m2::PartStatus::Unavailable as i32
    );
    let all = collector
        .wait_for(EXPORT_WAIT, |all| {
            all.iter().any(|s| {
                s.trace_id == degraded.trace_id
                    && s.name == "chirp.message.v2.MessageService/GetMessage"
                    && s.events.iter().any(|(name, _)| name == "reply part degraded")
            })
        })
        .await;
    println!(
        "GetMessage with redis down, trace {}:\n{}",
        degraded.trace_id,
        tree(&all, &degraded.trace_id)
    );
    let spans = degraded.spans(&all);
    let server =
        find(&spans, "message-service", "chirp.message.v2.MessageService/GetMessage").expect("the server span");
    assert!(
        server
            .events
            .iter()
            .any(|(name, attrs)| name == "reply part degraded"
                && attrs.get("part").map(String::as_str) == Some("comments")),
        "the server span says which part is degraded: {:?}",
        server.events
    );
    let failed_calls: Vec<&&Span> = spans
        .iter()
        .filter(|s| {
            s.kind == "Client"
                && s.attributes.get("peer.service").map(String::as_str) == Some("comment-service")
                && s.status.starts_with("error")
        })
        .collect();
    assert!(
        !failed_calls.is_empty(),
        "the call to comment-service carries its error: {spans:#?}"
    );
    assert!(
        server
            .events
            .iter()
            .any(|(name, attrs)| name == "retrying after UNAVAILABLE"
                && attrs.get("peer").map(String::as_str) == Some("comment-service")),
        "the retry is an event of the server span: {:?}",
        server.events
    );
    // The logs name the trace: message-service's warning about the
    // degraded part carries the trace id of the request it happened in.
    let logs = up.output();
    let warning = logs
        .lines()
        .find(|l| l.contains("serving a degraded part") && l.contains(&format!("trace_id={}", degraded.trace_id)));
    assert!(
        warning.is_some(),
        "message-service's log line names the trace {}:\n{}",
        degraded.trace_id,
        logs.lines()
            .filter(|l| l.contains("degraded"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Metrics beside the traces: message-service counted the failed calls
    // to comment-service by method and code, and timed its MongoDB reads.
    let metrics = scrape(up.base + 12);
    let has = |name: &str, labels: &[&str]| {
        metrics
            .lines()
            .any(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|label| l.contains(label)))
    };
    assert!(
        has(
            "grpc_client_handled_total",
            &[
                "peer=\"comment-service\"",
                "grpc_method=\"chirp.comment.v1.CommentService/ListComments\"",
                "grpc_code=\"Unavailable\""
            ]
        ),
        "client RED metrics by peer, method and code"
    );
    assert!(has(
        "grpc_client_handling_seconds_bucket",
        &[
            "peer=\"user-service\"",
            "grpc_method=\"chirp.user.v1.UserService/BatchGetUsers\""
        ]
    ));
    assert!(has(
        "store_operation_seconds_count",
        &["store=\"mongodb\"", "operation=\"get\"", "outcome=\"ok\""]
    ));
    // analytics-service registers the client metrics too (one start-up
    // for all), so its circuit to user-service shows in chirp status.
    let status = up.status();
    let analytics = status["services"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["service"] == "analytics-service"))
        .cloned()
        .unwrap_or_default();
    assert!(
        analytics["circuits"].to_string().contains("user-service"),
        "analytics-service's circuit to user-service: {analytics}"
    );
    let (code, out) = up.run(&["chaos", "start", "redis"]);
    assert_eq!(code, 0, "{out}");
    drop(up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_no_service_opens_an_otlp_connection() {
    // Where an exporter with no endpoint would go: the OTLP default.
    let default_port =
        std::net::TcpListener::bind("127.0.0.1:4317").expect("the OTLP default port 4317 is free for this test");
    default_port.set_nonblocking(true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let up = settled_mesh(dir.path(), &["--no-seed"], "200");
    // A request that would be traced.
    get_missing_message(&up, &Caller::new()).await;
    // Several export intervals.
    tokio::time::sleep(Duration::from_secs(2)).await;
    match default_port.accept() {
        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("something connected to the OTLP port: {other:?}"),
    }
    drop(up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_still_buffered_when_the_mesh_stops_are_exported_on_the_way_out() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Batches leave only every 10 minutes (or at 512 spans): what arrives
    // before then was flushed at shutdown.
    let up = settled_mesh(
        dir.path(),
        &["--no-seed", "--otlp-endpoint", &collector.endpoint()],
        "600000",
    );
    let get = Caller::new();
    get_missing_message(&up, &get).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        get.spans(&collector.spans()).is_empty(),
        "nothing is exported before the schedule or the shutdown"
    );
    up.stop();
    let all = collector.spans();
    let spans = get.spans(&all);
    assert!(
        spans
            .iter()
            .any(|s| s.service == "message-service" && s.name == "chirp.message.v2.MessageService/GetMessage"),
        "the GetMessage span was flushed when message-service stopped: {spans:#?}"
    );
    assert!(
        spans.iter().any(|s| s.name == "mongodb get"),
        "and its store span with it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_recent_requests_carry_the_trace_id_their_spans_were_exported_under() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let up = settled_mesh(
        dir.path(),
        &["--no-seed", "--otlp-endpoint", &collector.endpoint()],
        "200",
    );
    let (code, out) = up.run(&["load", "start", "--rate", "10"]);
    assert_eq!(code, 0, "{out}");
    // A timeline read the page lists with its trace id.
    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let state = up.page_state();
        let found = state["recent"].as_array().and_then(|rows| {
            rows.iter()
                .find(|r| r["rpc"] == "HomeTimeline" && r["code"] == "OK" && r["trace_id"].is_string())
                .cloned()
        });
        if let Some(row) = found {
            break row;
        }
        assert!(Instant::now() < deadline, "no traced request listed: {state:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let trace_id = listed["trace_id"].as_str().unwrap().to_owned();
    assert_eq!(trace_id.len(), 32, "{listed}");
    // Its server span in message-service, with the store read under the
    // same trace.
    let traced = |all: &[Span], service: &str, name: &str| {
        all.iter()
            .any(|s| s.trace_id == trace_id && s.service == service && s.name.contains(name))
    };
    let spans = collector
        .wait_for(Duration::from_secs(20), |all| {
            traced(all, "message-service", "MessageService/HomeTimeline")
                && traced(all, "message-service", "mongodb by_authors")
        })
        .await;
    assert!(
        traced(&spans, "message-service", "MessageService/HomeTimeline")
            && traced(&spans, "message-service", "mongodb by_authors"),
        "the listed trace holds the request and its work: {}",
        tree(&spans, &trace_id)
    );
    let (code, out) = up.run(&["load", "stop"]);
    assert_eq!(code, 0, "{out}");
    up.stop();
}

/// `GET /metrics` on a service's metrics port.
fn scrape(port: u16) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("the metrics port");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("a request");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("a reply");
    text
}
