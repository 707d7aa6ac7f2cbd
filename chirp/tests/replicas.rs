//! `chirp up --replicas message-service=2,comment-service=2`: every caller
//! balances across a peer's replicas, and a replica killed under load costs
//! at most the calls it had in flight (`chirp up` starts it again); a
//! graceful restart of a replica under load costs nothing, since callers
//! stop sending to a replica once its health says NOT_SERVING.
//!
//! The load goes in at the first replica of each service (as a client of one
//! address would); what is balanced is the hop between services:
//! message-service → comment-service (`ListComments`, for GetMessage) and
//! comment-service → message-service (`CheckMessage`, for AddComment on a
//! message it has not seen).

mod common;

use std::{
    os::unix::fs::PermissionsExt as _,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use chirp_proto::{
    comment::v1::{self as cpb, comment_service_client::CommentServiceClient},
    message::{v1 as m1, v2 as m2},
    user::v1::{self as upb, user_service_client::UserServiceClient},
};
use common::{free_port_base, kill9, Up};
use test_support::grpc::{authed, with_deadline};

const DEMO_PASSWORD: &str = "chirp-demo-password";
const DEADLINE: Duration = Duration::from_secs(2);
/// Callers, each with one request in flight at a time.
const WORKERS: usize = 8;

/// What the load saw.
#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    /// Errors, and GetMessage replies with the comments part not OK.
    failed: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut failures) = self.failures.lock() {
            failures.push(what);
        }
    }

    fn take(&self) -> (usize, usize, Vec<String>) {
        let failures = self
            .failures
            .lock()
            .map(|mut f| std::mem::take(&mut *f))
            .unwrap_or_default();
        (
            self.ok.swap(0, Ordering::Relaxed),
            self.failed.swap(0, Ordering::Relaxed),
            failures,
        )
    }
}

/// Each worker comments on the next message (comment-service asks
/// message-service whether it exists, unless it has just asked), then reads
/// the message back enriched (message-service asks comment-service).
fn load(
    up: &Up,
    token: &str,
    messages: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let next = Arc::new(AtomicUsize::new(0));
    (0..WORKERS)
        .map(|_| {
            let (messages, stop, tally, next) = (messages.clone(), stop.clone(), tally.clone(), next.clone());
            let mut comments = CommentServiceClient::new(up.channel(3));
            let mut reads = m2::message_service_client::MessageServiceClient::new(up.channel(2));
            let token = token.to_owned();
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    // Round and round: by the time a message comes back, the
                    // replica's cached "it exists" (5 s) has mostly expired.
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let message = &messages[i % messages.len()];
                    let mut add = authed(
                        cpb::AddCommentRequest {
                            message_id: message.clone(),
                            body: format!("comment {i}"),
                        },
                        &token,
                    );
                    add.set_timeout(DEADLINE);
                    match comments.add_comment(add).await {
                        Ok(_) => tally.ok.fetch_add(1, Ordering::Relaxed),
                        Err(status) => {
                            tally.fail(format!("AddComment: {status}"));
                            continue;
                        }
                    };
                    let read = with_deadline(
                        m2::GetMessageRequest {
                            message_id: message.clone(),
                        },
                        DEADLINE,
                    );
                    match reads.get_message(read).await {
                        Ok(reply) => {
                            let comments = reply
                                .into_inner()
                                .message
                                .unwrap_or_default()
                                .comments
                                .unwrap_or_default();
                            if comments.status == m2::PartStatus::Ok as i32 {
                                tally.ok.fetch_add(1, Ordering::Relaxed);
                            } else {
                                tally.fail(format!("GetMessage: comments part {}", comments.status));
                            }
                        }
                        Err(status) => tally.fail(format!("GetMessage: {status}")),
                    }
                }
            })
        })
        .collect()
}

/// Completed calls of one method a replica answered, from its `/metrics`.
fn handled(metrics_port: u16, method: &str) -> u64 {
    let Ok(text) = get_metrics(metrics_port) else {
        return 0;
    };
    text.lines()
        .filter(|l| l.starts_with("grpc_server_handled_total") && l.contains(&format!("/{method}\"")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// GET /metrics over a plain TCP connection.
fn get_metrics(port: u16) -> std::io::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// Calls of `method` on each of two replicas since `before`, and the share
/// of the first.
fn split(metrics: [u16; 2], method: &str, before: [u64; 2]) -> ([u64; 2], f64) {
    let now = metrics.map(|port| handled(port, method));
    let calls = [now[0].saturating_sub(before[0]), now[1].saturating_sub(before[1])];
    let total = (calls[0] + calls[1]).max(1);
    (calls, calls[0] as f64 / total as f64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_calls_and_one_killed_under_load_costs_only_its_calls_in_flight() {
    let data = tempfile::tempdir().unwrap();
    std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let base = free_port_base();
    let up = Up::start_with(
        data.path(),
        base,
        &["--no-seed", "--replicas", "message-service=2,comment-service=2"],
    );
    let names: Vec<String> = up.status()["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names.len(), 9, "{names:?}");
    assert!(
        names.contains(&"message-service-2".to_owned()) && names.contains(&"comment-service-2".to_owned()),
        "{names:?}"
    );
    let (code, table) = up.run(&["status"]);
    assert_eq!(code, 0, "{table}");
    println!("chirp status:\n{table}");
    assert!(
        table.contains("comment-service-2") && table.contains("SERVING"),
        "{table}"
    );

    // Someone to post and comment as, and messages to comment on.
    let mut users = UserServiceClient::new(up.channel(1));
    users
        .register(upb::RegisterRequest {
            username: "replica_tester".into(),
            password: DEMO_PASSWORD.into(),
            display_name: "Replica Tester".into(),
        })
        .await
        .unwrap();
    let token = users
        .login(upb::LoginRequest {
            username: "replica_tester".into(),
            password: DEMO_PASSWORD.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .access_token;
    let posters: Vec<_> = (0..WORKERS)
        .map(|w| {
            let mut posts = m1::message_service_client::MessageServiceClient::new(up.channel(2));
            let token = token.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..300 {
                    let body = format!("message {w}/{i}");
                    let reply = posts
                        .post_message(authed(m1::PostMessageRequest { body }, &token))
                        .await;
                    ids.push(reply.unwrap().into_inner().message.unwrap().id);
                }
                ids
            })
        })
        .collect();
    let mut messages = Vec::new();
    for poster in posters {
        messages.extend(poster.await.unwrap());
    }
    let messages = Arc::new(messages);

    let comment_metrics = [base + 13, base + 113];
    let message_metrics = [base + 12, base + 112];
    let before_comments = comment_metrics.map(|p| handled(p, "ListComments"));
    let before_messages = message_metrics.map(|p| handled(p, "CheckMessage"));
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let workers = load(&up, &token, messages.clone(), stop.clone(), tally.clone());

    // Spread: both hops, over enough load to judge (at least 200 calls on
    // each; how long that takes depends on the machine, so poll for it).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut waited = Duration::ZERO;
    let (comment_calls, comment_share, message_calls, message_share) = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        waited += Duration::from_secs(1);
        let (comment_calls, comment_share) = split(comment_metrics, "ListComments", before_comments);
        let (message_calls, message_share) = split(message_metrics, "CheckMessage", before_messages);
        let enough = comment_calls[0] + comment_calls[1] >= 200 && message_calls[0] + message_calls[1] >= 200;
        // Eight seconds at least: the split of a few hundred calls is a
        // sample, and a short one strays from even by chance.
        if (enough && waited >= Duration::from_secs(8)) || tokio::time::Instant::now() > deadline {
            break (comment_calls, comment_share, message_calls, message_share);
        }
    };
    let (ok, failed, failures) = tally.take();
    println!(
        "spread over {waited:?}: ListComments on comment-service, -2: {comment_calls:?} ({:.0} %/{:.0} %); \
         CheckMessage on message-service, -2: {message_calls:?} ({:.0} %/{:.0} %); {ok} calls ok, {failed} failed",
        comment_share * 100.0,
        (1.0 - comment_share) * 100.0,
        message_share * 100.0,
        (1.0 - message_share) * 100.0,
    );
    assert_eq!(failed, 0, "{failures:?}");
    assert!(
        comment_calls[0] + comment_calls[1] >= 200,
        "too little load to judge: {comment_calls:?}"
    );
    assert!(
        message_calls[0] + message_calls[1] >= 200,
        "too little load to judge: {message_calls:?}"
    );
    assert!(
        (0.4..=0.6).contains(&comment_share),
        "not within 60/40: {comment_calls:?}"
    );
    assert!(
        (0.4..=0.6).contains(&message_share),
        "not within 60/40: {message_calls:?}"
    );

    // Kill the second replica of each, as a crash or the OOM killer would.
    for name in ["comment-service-2", "message-service-2"] {
        kill9(up.pid(name));
    }
    // Judge once the survivors have taken 200 calls and the supervisor has
    // started both again, polled for (bounded) rather than a fixed wait.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (mut ok, mut failed, mut failures) = (0, 0, Vec::new());
    let restarted = || {
        ["comment-service-2", "message-service-2"]
            .into_iter()
            .all(|name| up.part(name)["restarts"] == 1)
    };
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (more_ok, more_failed, more_failures) = tally.take();
        (ok, failed) = (ok + more_ok, failed + more_failed);
        failures.extend(more_failures);
        if (ok >= 200 && restarted()) || tokio::time::Instant::now() > deadline {
            break;
        }
    }
    println!("after SIGKILL of comment-service-2 and message-service-2: {ok} calls ok, {failed} failed: {failures:?}");
    assert!(
        failed <= WORKERS,
        "more failures than calls in flight at the kill ({WORKERS}): {failures:?}"
    );
    assert!(ok >= 200, "the surviving replicas took the load: {ok}");

    for name in ["comment-service-2", "message-service-2"] {
        let part = up.part(name);
        assert_eq!(part["restarts"], 1, "the supervisor started it again: {part}");
    }

    // A graceful restart of each (SIGTERM, then started again), as a
    // rolling update does: no call fails, and the new process takes calls.
    let before_comments = comment_metrics.map(|p| handled(p, "ListComments"));
    for name in ["comment-service-2", "message-service-2"] {
        let (code, out) = up.run(&["chaos", "stop", name]);
        assert_eq!(code, 0, "{out}");
        let (code, out) = up.run(&["chaos", "start", name]);
        assert_eq!(code, 0, "{out}");
    }
    // Until both new processes take calls (bounded). A restarted replica
    // counts from zero.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (comment_calls, message_calls) = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (comment_calls, _) = split(comment_metrics, "ListComments", [before_comments[0], 0]);
        let message_calls = handled(message_metrics[1], "CheckMessage");
        if (comment_calls[1] > 0 && message_calls > 0) || tokio::time::Instant::now() > deadline {
            break (comment_calls, message_calls);
        }
    };
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let (ok, failed, failures) = tally.take();
    println!(
        "after a graceful restart of both: ListComments on comment-service, -2: {comment_calls:?}; \
         CheckMessage on message-service-2: {message_calls}; {ok} calls ok, {failed} failed"
    );
    assert_eq!(failed, 0, "{failures:?}");
    assert!(
        comment_calls[1] > 0,
        "comment-service-2 takes calls again: {comment_calls:?}"
    );
    assert!(message_calls > 0, "message-service-2 takes calls again");
    up.stop();
}
