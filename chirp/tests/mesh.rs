//! The whole mesh as separate processes, started by `chirp up` on private
//! stores: a user's scenario, the fault-isolation matrix (each store server
//! and each service stopped in turn, every public RPC checked cell by cell
//! against the table below), convergence after each restart, and a clean
//! stop that leaves no process behind.

mod common;

use std::{
    fmt,
    fmt::Write as _,
    os::unix::fs::PermissionsExt as _,
    time::{Duration, Instant},
};

use chirp_proto::{
    analytics::v1::{analytics_service_client::AnalyticsServiceClient, GetUserStatsRequest},
    comment::v1::{self as cpb, comment_service_client::CommentServiceClient},
    message::{v1 as m1, v2 as m2},
    user::v1::{self as upb, user_service_client::UserServiceClient},
};
use common::{free_port_base, left_running, settled, Up};
use test_support::grpc::{authed, with_deadline};
use tonic::Code;

const DEMO_PASSWORD: &str = "chirp-demo-password";
/// Every call's deadline; an answer must come within it plus a margin.
const DEADLINE: Duration = Duration::from_secs(2);
const MARGIN: Duration = Duration::from_millis(500);

/// What one call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// Answered, with a part marked unavailable or the timeline degraded.
    Degraded,
    Unavailable,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ok => "ok",
            Self::Degraded => "degraded",
            Self::Unavailable => "UNAVAILABLE",
        })
    }
}

const RPCS: [&str; 10] = [
    "GetUser",
    "Login",
    "Follow",
    "PostMessage",
    "GetMessage",
    "HomeTimeline",
    "AddComment",
    "ListComments",
    "CountComments",
    "GetUserStats",
];

/// The expectation table: for each stopped part, each RPC's outcome.
fn expected(stopped: &str) -> [Outcome; 10] {
    use Outcome::{Degraded as D, Ok as O, Unavailable as U};
    match stopped {
        //                   GetUser Login Follow Post Get Timeline Add List Count Stats
        "none" => [O, O, O, O, O, O, O, O, O, O],
        "postgres" => [U, U, U, O, D, D, O, O, O, O],
        "user-service" => [U, U, U, O, D, D, O, O, O, O],
        "mongodb" => [O, O, O, U, U, U, U, O, O, O],
        "message-service" => [O, O, O, U, U, U, U, O, O, O],
        "redis" => [O, O, O, O, D, D, U, U, U, O],
        "comment-service" => [O, O, O, O, D, D, U, U, U, O],
        "analytics-service" => [O, O, O, O, O, O, O, O, O, U],
        other => panic!("no expectations for {other}"),
    }
}

struct World {
    alice: String,
    alice_token: String,
    carol: String,
    message: String,
    posted: Vec<String>,
    comments: u32,
}

fn outcome<T>(result: &Result<T, tonic::Status>, degraded: impl FnOnce(&T) -> bool) -> Result<Outcome, String> {
    match result {
        Ok(reply) if degraded(reply) => Ok(Outcome::Degraded),
        Ok(_) => Ok(Outcome::Ok),
        Err(status) if status.code() == Code::Unavailable => Ok(Outcome::Unavailable),
        Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
    }
}

/// Calls every public RPC once; each outcome and how long it took.
async fn row(up: &Up, world: &mut World) -> Vec<(Result<Outcome, String>, Duration)> {
    let users = UserServiceClient::new(up.channel(1));
    let messages = m1::message_service_client::MessageServiceClient::new(up.channel(2));
    let messages_v2 = m2::message_service_client::MessageServiceClient::new(up.channel(2));
    let comments = CommentServiceClient::new(up.channel(3));
    let analytics = AnalyticsServiceClient::new(up.channel(4));
    let token = world.alice_token.clone();
    let mut cells = Vec::new();
    macro_rules! cell {
        ($call:expr, $degraded:expr) => {{
            let started = Instant::now();
            let result = $call.await;
            cells.push((outcome(&result, $degraded), started.elapsed()));
            result
        }};
    }
    let mut c = users.clone();
    let _ = cell!(
        c.get_user(with_deadline(
            upb::GetUserRequest {
                user_id: world.alice.clone()
            },
            DEADLINE
        )),
        |_| false
    );
    let mut login = with_deadline(
        upb::LoginRequest {
            username: "alice".into(),
            password: DEMO_PASSWORD.into(),
        },
        DEADLINE,
    );
    login.set_timeout(DEADLINE);
    let mut c = users.clone();
    let _ = cell!(c.login(login), |_| false);
    let mut c = users.clone();
    let mut follow = authed(
        upb::FollowRequest {
            user_id: world.carol.clone(),
        },
        &token,
    );
    follow.set_timeout(DEADLINE);
    let _ = cell!(c.follow(follow), |_| false);
    let mut c = messages.clone();
    let mut post = authed(
        m1::PostMessageRequest {
            body: "written during the matrix".into(),
        },
        &token,
    );
    post.set_timeout(DEADLINE);
    if let Ok(reply) = cell!(c.post_message(post), |_| false) {
        world.posted.push(reply.into_inner().message.unwrap_or_default().id);
    }
    let part_down = |s: i32| s != m1::PartStatus::Ok as i32;
    let mut c = messages.clone();
    let _ = cell!(
        c.get_message(with_deadline(
            m1::GetMessageRequest {
                message_id: world.message.clone()
            },
            DEADLINE
        )),
        |r: &tonic::Response<m1::GetMessageResponse>| {
            let m = r.get_ref().message.clone().unwrap_or_default();
            part_down(m.author.unwrap_or_default().status) || part_down(m.comments.unwrap_or_default().status)
        }
    );
    let mut c = messages_v2.clone();
    let mut timeline = authed(
        m2::HomeTimelineRequest {
            page_size: 20,
            page_token: String::new(),
        },
        &token,
    );
    timeline.set_timeout(DEADLINE);
    let _ = cell!(c.home_timeline(timeline), |r: &tonic::Response<
        m2::HomeTimelineResponse,
    >| {
        let r = r.get_ref();
        r.degraded
            || r.messages.iter().any(|m| {
                m.author.clone().unwrap_or_default().status != m2::PartStatus::Ok as i32
                    || m.comments.clone().unwrap_or_default().status != m2::PartStatus::Ok as i32
            })
    });
    let mut c = comments.clone();
    let mut add = authed(
        cpb::AddCommentRequest {
            message_id: world.message.clone(),
            body: "a comment during the matrix".into(),
        },
        &token,
    );
    add.set_timeout(DEADLINE);
    if cell!(c.add_comment(add), |_| false).is_ok() {
        world.comments += 1;
    }
    let mut c = comments.clone();
    let _ = cell!(
        c.list_comments(with_deadline(
            cpb::ListCommentsRequest {
                message_id: world.message.clone(),
                ..Default::default()
            },
            DEADLINE
        )),
        |_| false
    );
    let mut c = comments.clone();
    let _ = cell!(
        c.count_comments(with_deadline(
            cpb::CountCommentsRequest {
                message_ids: vec![world.message.clone()],
            },
            DEADLINE
        )),
        |_| false
    );
    let mut c = analytics.clone();
    let mut stats = authed(
        GetUserStatsRequest {
            user_id: world.alice.clone(),
        },
        &token,
    );
    stats.set_timeout(DEADLINE);
    let _ = cell!(c.get_user_stats(stats), |_| false);
    cells
}

/// Waits until every service is SERVING, every outbox is empty and a whole
/// row of calls succeeds: the mesh has converged.
async fn converge(up: &Up, world: &mut World) {
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let status = up.status();
        if settled(&status) {
            let cells = row(up, world).await;
            if cells.iter().all(|(o, _)| *o == Ok(Outcome::Ok)) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the mesh did not converge within 45 s: {status}\n{}",
            up.tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chirp_up_serves_the_scenario_holds_the_fault_isolation_matrix_and_stops_everything() {
    let data = tempfile::tempdir().unwrap();
    // PostgreSQL may run as another user, who must reach the data directory.
    std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let base = free_port_base();
    let up = Up::start(data.path(), base);
    // A first start is quiet: nothing queries a store before it is
    // prepared (relays and background jobs wait for it), so no part logs an
    // error, or a failed job step, while the mesh comes up.
    let errors: Vec<String> = up
        .output()
        .lines()
        .filter(|line| line.contains("ERROR") || line.contains("background job step failed"))
        .map(str::to_owned)
        .collect();
    assert!(
        errors.is_empty(),
        "a first `chirp up` logged errors:\n{}",
        errors.join("\n")
    );

    // The seeded timeline, through the CLI, v1 and v2.
    let (code, out) = up.run(&["login", "alice"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = up.run(&["timeline", "--api", "v2", "--json"]);
    assert_eq!(code, 0, "{out}");
    let timeline: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let authors: std::collections::BTreeSet<&str> = timeline["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["author"]["username"].as_str())
        .collect();
    assert_eq!(authors, ["alice", "bob", "carol"].into_iter().collect(), "{out}");
    assert_eq!(timeline["degraded"], false);
    let (code, out) = up.run(&["timeline", "--api", "v1"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Curiouser"), "{out}");

    // The scenario: register, follow, post, comment, stats, ban.
    let (code, out) = up.run(&["register", "dave", "--password", "dave-password-1"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = up.run(&["login", "dave", "--password", "dave-password-1"]);
    assert_eq!(code, 0, "{out}");
    let dave_id = out.split_whitespace().last().unwrap().to_owned();
    let (code, out) = up.run(&["post", "dave says hello", "--json"]);
    assert_eq!(code, 0, "{out}");
    let dave_message = serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    up.run(&["login", "alice"]);
    let (code, out) = up.run(&["follow", &dave_id]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = up.run(&["comment", &dave_message, "welcome, dave"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = up.run(&["get", &dave_message, "--api", "v1", "--json"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\"count\":1"), "{out}");
    let (code, out) = up.run(&["get", "01a2123e-0000-7000-8000-000000000000"]);
    assert_eq!(code, 4, "not found has its exit code: {out}");
    let (code, out) = up.run(&["ban", &dave_id]);
    assert_eq!(code, 3, "alice is no moderator: {out}");
    up.run(&["login", "carol"]);
    let (code, out) = up.run(&["ban", &dave_id, "--reason", "test"]);
    assert_eq!(code, 0, "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, _) = up.run(&["get", &dave_message]);
        if code == 4 {
            break; // hidden by the ban
        }
        assert!(Instant::now() < deadline, "dave's message is still visible");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The fault-isolation matrix.
    let (alice, alice_token) = {
        let reply = UserServiceClient::new(up.channel(1))
            .login(upb::LoginRequest {
                username: "alice".into(),
                password: DEMO_PASSWORD.into(),
            })
            .await
            .unwrap()
            .into_inner();
        (reply.user.unwrap().id, reply.access_token)
    };
    let carol = UserServiceClient::new(up.channel(1))
        .login(upb::LoginRequest {
            username: "carol".into(),
            password: DEMO_PASSWORD.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
        .id;
    let message = m1::message_service_client::MessageServiceClient::new(up.channel(2))
        .list_user_messages(m1::ListUserMessagesRequest {
            user_id: alice.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .messages[0]
        .message
        .clone()
        .unwrap()
        .id;
    let mut world = World {
        alice,
        alice_token,
        carol,
        message,
        posted: Vec::new(),
        comments: 0,
    };
    converge(&up, &mut world).await;

    let mut table = String::new();
    let _ = writeln!(
        table,
        "{:<18} {}",
        "stopped \\ rpc",
        RPCS.map(|r| format!("{r:<17}")).join("")
    );
    let mut failures = Vec::new();
    for part in [
        "postgres",
        "mongodb",
        "redis",
        "user-service",
        "message-service",
        "comment-service",
        "analytics-service",
    ] {
        let (code, out) = up.run(&["chaos", "stop", part]);
        assert_eq!(code, 0, "{out}");
        // Every cell is the steady state of the outage: the owners have
        // noticed (store probes) and existence caches (5 s) expired. Ask
        // until the row is what the table says, up to a bound; what is
        // still different then is a failure.
        let want = expected(part);
        let steady_by = Instant::now() + Duration::from_secs(20);
        let cells = loop {
            let cells = row(&up, &mut world).await;
            let steady = cells.iter().zip(&want).all(|((got, _), want)| got.as_ref() == Ok(want));
            if steady || Instant::now() >= steady_by {
                break cells;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let mut line = format!("{part:<18} ");
        for ((rpc, (got, took)), want) in RPCS.iter().zip(&cells).zip(want) {
            let shown = match got {
                Ok(o) => format!("{o} {}ms", took.as_millis()),
                Err(e) => format!("ERR {e}"),
            };
            let _ = write!(line, "{shown:<17}");
            if got.as_ref() != Ok(&want) {
                failures.push(format!("{part} stopped, {rpc}: expected {want}, got {got:?}"));
            }
            if *took > DEADLINE + MARGIN {
                failures.push(format!("{part} stopped, {rpc}: took {took:?}"));
            }
        }
        let _ = writeln!(table, "{line}");
        let (code, out) = up.run(&["chaos", "start", part]);
        assert_eq!(code, 0, "{out}");
        converge(&up, &mut world).await;
    }
    println!("fault-isolation matrix (outcome, time of the call):\n{table}");
    assert!(failures.is_empty(), "{}\n{table}", failures.join("\n"));

    // Nothing acknowledged was lost: every post readable, every comment
    // counted, analytics agrees after the outboxes drained.
    let mut messages = m1::message_service_client::MessageServiceClient::new(up.channel(2));
    for id in &world.posted {
        messages
            .get_message(m1::GetMessageRequest { message_id: id.clone() })
            .await
            .unwrap_or_else(|s| panic!("acknowledged post {id} is gone: {s:?}"));
    }
    // The last row's events may still be on their way: analytics is
    // eventually consistent, so wait (boundedly) for it to agree.
    let expected_messages = 2 + world.posted.len() as i64;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let stats = AnalyticsServiceClient::new(up.channel(4))
            .get_user_stats(authed(
                GetUserStatsRequest {
                    user_id: world.alice.clone(),
                },
                &world.alice_token,
            ))
            .await
            .unwrap()
            .into_inner();
        if stats.message_count == expected_messages {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "analytics counts {} messages of alice's, expected the two seeded and every acknowledged post: {}",
            stats.message_count,
            expected_messages
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A poison event: an outbox entry comment-service cannot read (as if a
    // newer version wrote it) goes to its dead letters, the comment behind
    // it still reaches analytics, and `chirp outbox` shows and re-sends it.
    let redis_address = up.status()["parts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["part"] == "redis")
        .and_then(|p| p["address"].as_str())
        .unwrap()
        .to_owned();
    let mut redis = redis::Client::open(format!("redis://{redis_address}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: String = redis::AsyncCommands::xadd(
        &mut redis,
        // An outbox of comment-service's data model: one per hash-tag
        // group (comment-service/src/store/keys.rs), here the first.
        "chirp:comments:{g0.315}outbox",
        "*",
        &[("event", r#"{"written_by":"a newer version"}"#)],
    )
    .await
    .unwrap();
    up.run(&["login", "alice"]);
    let (code, out) = up.run(&["comment", &world.posted[0], "behind the poison"]);
    assert_eq!(code, 0, "{out}");
    let dead_letters = |up: &Up| {
        let status = up.status();
        let comments = status["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["service"] == "comment-service")
            .unwrap()
            .clone();
        (comments["dead_letters"].clone(), comments["outbox"].clone())
    };
    let settled = || serde_json::json!([["analytics", 1]]);
    let drained = || serde_json::json!([["analytics", 0]]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while dead_letters(&up) != (settled(), drained()) {
        assert!(Instant::now() < deadline, "not set aside: {:?}", dead_letters(&up));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, table) = up.run(&["status"]);
    println!("chirp status with a dead letter:\n{table}");
    assert!(table.contains("analytics=1"), "{table}");
    let (code, out) = up.run(&["outbox", "list", "comment-service"]);
    println!("chirp outbox list comment-service:\n{out}");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("analytics: 1 dead letter(s)") && out.contains("unreadable in the outbox"),
        "{out}"
    );
    let (code, out) = up.run(&["outbox", "retry", "comment-service"]);
    println!("chirp outbox retry comment-service:\n{out}");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("analytics: 1 sent back"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while dead_letters(&up) != (settled(), drained()) {
        assert!(
            Instant::now() < deadline,
            "not set aside again: {:?}",
            dead_letters(&up)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, out) = up.run(&["outbox", "retry", "analytics-service"]);
    assert_eq!(code, 2, "analytics-service has no outbox: {out}");

    // `chirp status` names every part and shows the erasures in progress of
    // the services that erase in the background; stopping stops every
    // process.
    let status = up.status();
    assert_eq!(status["parts"].as_array().unwrap().len(), 7);
    for service in status["services"].as_array().unwrap() {
        let background = ["message-service", "comment-service"].contains(&service["service"].as_str().unwrap());
        assert_eq!(service["erasures_pending"].is_i64(), background, "{service}");
    }
    let pids = up.stop();
    assert_eq!(pids.len(), 7, "seven processes ran");
    let left = left_running(pids);
    assert!(left.is_empty(), "processes left running: {left:?}");

    // A second `chirp up` reuses the data: no new seed, alice still there.
    let up = Up::start(data.path(), base);
    let (code, out) = up.run(&["login", "alice"]);
    assert_eq!(code, 0, "{out}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, out) = up.run(&["stats", "--json"]);
        assert_eq!(code, 0, "{out}");
        let stats: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        if stats["messages"].as_i64() == Some(expected_messages) {
            break;
        }
        assert!(Instant::now() < deadline, "after the restart: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    up.stop();
}
