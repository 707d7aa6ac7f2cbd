//! `chirp up` as a supervisor: each of the seven parts SIGKILLed under a
//! light load is seen dead within two seconds, brought back (on its own by
//! default, by `chirp chaos start` under `--restart never`), and the mesh
//! converges with every acknowledged write still there; a part that cannot
//! start is reported and left down after a bounded number of attempts,
//! not restarted in a loop.

mod common;

use std::{
    collections::HashSet,
    fmt::Write as _,
    os::unix::fs::PermissionsExt as _,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use chirp_proto::{
    comment::v1::{self as cpb, comment_service_client::CommentServiceClient},
    message::v1::{self as m1, message_service_client::MessageServiceClient},
    user::v1::{self as upb, user_service_client::UserServiceClient},
};
use common::{free_port_base, kill9, left_running, settled, Up};
use serde_json::Value;
use test_support::grpc::authed;

const DEMO_PASSWORD: &str = "chirp-demo-password";
const DEADLINE: Duration = Duration::from_secs(2);
/// Stores first: their owners must ride out the outage and recover.
const PARTS: [&str; 7] = [
    "redis",
    "mongodb",
    "postgres",
    "user-service",
    "message-service",
    "comment-service",
    "analytics-service",
];
/// `restart::MAX_RESTARTS` in the binary: attempts in a row before giving up.
const MAX_RESTARTS: u64 = 5;

/// The service whose SERVING says a part is back: itself, or its store's owner.
fn owner(part: &str) -> &str {
    match part {
        "postgres" => "user-service",
        "mongodb" => "message-service",
        "redis" => "comment-service",
        service => service,
    }
}

/// Writes the mesh acknowledged: each of them must be readable afterwards.
#[derive(Default)]
struct Acked {
    messages: Mutex<Vec<String>>,
    /// (message, comment)
    comments: Mutex<Vec<(String, String)>>,
    users: Mutex<Vec<String>>,
    refused: AtomicUsize,
}

impl Acked {
    fn counts(&self) -> Counts {
        (
            self.messages.lock().unwrap().len(),
            self.comments.lock().unwrap().len(),
            self.users.lock().unwrap().len(),
        )
    }
}

/// The load's switches: paused while the test waits for the outboxes to
/// drain (a steady load never leaves them empty), stopped at the end.
#[derive(Default)]
struct Run {
    pause: AtomicBool,
    stop: AtomicBool,
}

struct Tester {
    id: String,
    token: String,
    /// Messages the load comments on, round robin.
    targets: Vec<String>,
}

async fn tester(up: &Up) -> Tester {
    let mut users = UserServiceClient::new(up.channel(1));
    let id = users
        .register(upb::RegisterRequest {
            username: "crash_tester".into(),
            password: DEMO_PASSWORD.into(),
            display_name: "Crash Tester".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
        .id;
    let token = users
        .login(upb::LoginRequest {
            username: "crash_tester".into(),
            password: DEMO_PASSWORD.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .access_token;
    let mut posts = MessageServiceClient::new(up.channel(2));
    let mut targets = Vec::new();
    for i in 0..3 {
        let body = format!("commented on, {i}");
        let reply = posts
            .post_message(authed(m1::PostMessageRequest { body }, &token))
            .await;
        targets.push(reply.unwrap().into_inner().message.unwrap().id);
    }
    Tester { id, token, targets }
}

/// A light load: a post, a comment, and now and then a registration, about
/// ten rounds a second; what is acknowledged is recorded, what is refused
/// (the part it needs is down) only counted.
fn load(up: &Up, tester: &Tester, acked: Arc<Acked>, run: Arc<Run>) -> tokio::task::JoinHandle<()> {
    let mut posts = MessageServiceClient::new(up.channel(2));
    let mut comments = CommentServiceClient::new(up.channel(3));
    let mut users = UserServiceClient::new(up.channel(1));
    let (token, targets) = (tester.token.clone(), tester.targets.clone());
    tokio::spawn(async move {
        let mut round = 0_usize;
        while !run.stop.load(Ordering::Relaxed) {
            if run.pause.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            round += 1;
            let mut post = authed(
                m1::PostMessageRequest {
                    body: format!("post {round}"),
                },
                &token,
            );
            post.set_timeout(DEADLINE);
            match posts.post_message(post).await {
                Ok(reply) => acked
                    .messages
                    .lock()
                    .unwrap()
                    .push(reply.into_inner().message.unwrap().id),
                Err(_) => _ = acked.refused.fetch_add(1, Ordering::Relaxed),
            }
            let target = &targets[round % targets.len()];
            let mut comment = authed(
                cpb::AddCommentRequest {
                    message_id: target.clone(),
                    body: format!("comment {round}"),
                },
                &token,
            );
            comment.set_timeout(DEADLINE);
            match comments.add_comment(comment).await {
                Ok(reply) => {
                    let id = reply.into_inner().comment.unwrap().id;
                    acked.comments.lock().unwrap().push((target.clone(), id));
                }
                Err(_) => _ = acked.refused.fetch_add(1, Ordering::Relaxed),
            }
            if round.is_multiple_of(10) {
                let mut register = tonic::Request::new(upb::RegisterRequest {
                    username: format!("crash_{round}"),
                    password: DEMO_PASSWORD.into(),
                    display_name: format!("Crash {round}"),
                });
                register.set_timeout(DEADLINE);
                match users.register(register).await {
                    Ok(reply) => acked.users.lock().unwrap().push(reply.into_inner().user.unwrap().id),
                    Err(_) => _ = acked.refused.fetch_add(1, Ordering::Relaxed),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Every acknowledged post, comment and account, read back through the
/// public APIs; how many were checked.
async fn check_acked(up: &Up, tester: &Tester, acked: &Acked) -> Counts {
    let messages: Vec<String> = acked.messages.lock().unwrap().clone();
    let comments: Vec<(String, String)> = acked.comments.lock().unwrap().clone();
    let users: Vec<String> = acked.users.lock().unwrap().clone();

    let mut posts = MessageServiceClient::new(up.channel(2));
    let mut listed = HashSet::new();
    let mut page_token = String::new();
    loop {
        let page = posts
            .list_user_messages(m1::ListUserMessagesRequest {
                user_id: tester.id.clone(),
                page_size: 100,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        listed.extend(page.messages.into_iter().filter_map(|m| m.message).map(|m| m.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let lost: Vec<_> = messages.iter().filter(|id| !listed.contains(*id)).collect();
    assert!(lost.is_empty(), "acknowledged posts missing: {lost:?}");

    let mut client = CommentServiceClient::new(up.channel(3));
    let mut listed = HashSet::new();
    for target in &tester.targets {
        let mut page_token = String::new();
        loop {
            let page = client
                .list_comments(cpb::ListCommentsRequest {
                    message_id: target.clone(),
                    page_size: 100,
                    page_token,
                })
                .await
                .unwrap()
                .into_inner();
            listed.extend(page.comments.into_iter().map(|c| c.id));
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
    }
    let lost: Vec<_> = comments.iter().filter(|(_, id)| !listed.contains(id)).collect();
    assert!(lost.is_empty(), "acknowledged comments missing: {lost:?}");

    let mut accounts = UserServiceClient::new(up.channel(1));
    for id in &users {
        accounts
            .get_user(upb::GetUserRequest { user_id: id.clone() })
            .await
            .unwrap_or_else(|s| panic!("acknowledged account {id} is gone: {s:?}"));
    }
    (messages.len(), comments.len(), users.len())
}

/// The mesh [`settled`], with the load paused.
async fn converge(up: &Up, run: &Run) {
    run.pause.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = up.status();
        if settled(&status) {
            run.pause.store(false, Ordering::Relaxed);
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the mesh did not converge within 60 s: {status}\n{}",
            up.tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Polls the part's status until `done` holds; how long that took.
async fn until(up: &Up, name: &str, bound: Duration, what: &str, done: impl Fn(&Value) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let part = up.part(name);
        if done(&part) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < bound,
            "{name}: not {what} within {bound:?}: {part}\n{}",
            up.tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Running again as a new process, and its service (or its store's owner)
/// SERVING.
async fn until_back(up: &Up, name: &str, old_pid: i32, bound: Duration) -> Duration {
    let start = Instant::now();
    until(up, name, bound, "running again", |p| {
        p["state"] == "running" && p["pid"].as_i64().is_some_and(|pid| pid != i64::from(old_pid))
    })
    .await;
    let left = bound.saturating_sub(start.elapsed());
    until(up, owner(name), left, "SERVING again", |p| {
        p["service"]["serving"] == Value::Bool(true)
    })
    .await;
    start.elapsed()
}

fn killed_by_sigkill(part: &Value, before: &Value) -> bool {
    part["last_death"] != *before
        && part["last_death"]["cause"]
            .as_str()
            .is_some_and(|c| c.contains("SIGKILL"))
}

/// A mesh under the light load, and what the test needs to check it.
struct Loaded {
    up: Up,
    tester: Tester,
    acked: Arc<Acked>,
    run: Arc<Run>,
    worker: tokio::task::JoinHandle<()>,
}

async fn loaded_mesh(data: &tempfile::TempDir, args: &[&str]) -> Loaded {
    std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let up = Up::start_with(data.path(), free_port_base(), args);
    let tester = tester(&up).await;
    let acked = Arc::new(Acked::default());
    let run = Arc::new(Run::default());
    let worker = load(&up, &tester, acked.clone(), run.clone());
    // Under load means writes acknowledged on every hop, however long a
    // loaded machine takes to get there.
    test_support::eventually("the load starting", Duration::from_secs(30), || {
        let (posts, comments, users) = acked.counts();
        posts >= 5 && comments >= 5 && users >= 1
    })
    .await;
    Loaded {
        up,
        tester,
        acked,
        run,
        worker,
    }
}

/// The per-part table the tests print.
fn table_header() -> String {
    format!(
        "{:<18} {:>11} {:>15} {:>22} {:>22}\n",
        "PART KILLED", "DETECTED", "SERVING AGAIN", "ACKED AT KILL (m/c/u)", "PRESENT AFTER (m/c/u)"
    )
}

type Counts = (usize, usize, usize);

fn table_row(table: &mut String, part: &str, detected: Duration, back: Duration, at_kill: Counts, present: Counts) {
    let counts = |(m, c, u): Counts| format!("{m}/{c}/{u}");
    let _ = writeln!(
        table,
        "{part:<18} {:>9}ms {:>13}ms {:>22} {:>22}",
        detected.as_millis(),
        back.as_millis(),
        counts(at_kill),
        counts(present),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_part_killed_under_load_is_seen_within_two_seconds_restarted_and_loses_no_acknowledged_write() {
    let data = tempfile::tempdir().unwrap();
    let Loaded {
        up,
        tester,
        acked,
        run,
        worker,
    } = loaded_mesh(&data, &["--no-seed"]).await;
    let mut table = table_header();
    let mut redis_back_at = Instant::now();
    for part in PARTS {
        let before = up.part(part);
        let pid = up.pid(part);
        let at_kill = acked.counts();
        kill9(pid);
        let detected = until(&up, part, Duration::from_secs(2), "reported dead by SIGKILL", |p| {
            killed_by_sigkill(p, &before["last_death"])
        })
        .await;
        let back = until_back(&up, part, pid, Duration::from_secs(30)).await;
        if part == "redis" {
            redis_back_at = Instant::now();
        }
        // One restart for one death, or a few more if a start failed on
        // the way (a killed PostgreSQL's backends may hold its shared
        // memory for a moment), never a loop.
        let restarts = up.part(part)["restarts"].as_u64().unwrap() - before["restarts"].as_u64().unwrap();
        assert!(
            (1..MAX_RESTARTS).contains(&restarts),
            "{restarts} restarts for one death"
        );
        converge(&up, &run).await;
        let present = check_acked(&up, &tester, &acked).await;
        table_row(&mut table, part, detected, back, at_kill, present);
    }
    println!("--restart on-failure (the default), SIGKILL under load:\n{table}");

    // A part that cannot start: redis given a file where its directory was.
    // Its last run must have been long enough (STABLE_AFTER, 10 s) for the
    // count of failures in a row to start again from this death.
    tokio::time::sleep(Duration::from_secs(11).saturating_sub(redis_back_at.elapsed())).await;
    let redis_dir = data.path().join("redis");
    let kept = data.path().join("redis.kept");
    let before = up.part("redis");
    std::fs::rename(&redis_dir, &kept).unwrap();
    std::fs::write(&redis_dir, "not a directory").unwrap();
    kill9(before["pid"].as_i64().unwrap() as i32);
    let gave_up = until(&up, "redis", Duration::from_secs(40), "given up on", |p| {
        p["state"] == "failed"
    })
    .await;
    let part = up.part("redis");
    let attempts = part["restarts"].as_u64().unwrap() - before["restarts"].as_u64().unwrap();
    println!(
        "redis unable to start: given up after {attempts} attempts, {} ms: {part}",
        gave_up.as_millis()
    );
    assert_eq!(attempts, MAX_RESTARTS, "bounded attempts: {part}");
    assert!(
        part["last_death"]["cause"]
            .as_str()
            .unwrap()
            .contains("could not start"),
        "{part}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = up.part("redis");
    assert_eq!(
        (later["state"].clone(), later["restarts"].clone()),
        (part["state"].clone(), part["restarts"].clone()),
        "not restarted in a loop"
    );
    let (code, table) = up.run(&["status"]);
    assert_eq!(code, 0);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("redis") && l.contains("failed") && l.contains("could not start")),
        "{table}"
    );
    let (code, out) = up.run(&["chaos", "start", "redis"]);
    assert_ne!(code, 0, "a start that cannot succeed is reported as failed: {out}");
    assert!(out.contains("could not start"), "{out}");

    // Repaired, it comes back with its data.
    std::fs::remove_file(&redis_dir).unwrap();
    std::fs::rename(&kept, &redis_dir).unwrap();
    let (code, out) = up.run(&["chaos", "start", "redis"]);
    assert_eq!(code, 0, "{out}");
    until(&up, "comment-service", Duration::from_secs(30), "SERVING again", |p| {
        p["service"]["serving"] == Value::Bool(true)
    })
    .await;

    run.stop.store(true, Ordering::Relaxed);
    worker.await.unwrap();
    converge(&up, &run).await;
    let present = check_acked(&up, &tester, &acked).await;
    println!(
        "in all: {present:?} acknowledged posts/comments/accounts present, {} writes refused during outages",
        acked.refused.load(Ordering::Relaxed)
    );
    let pids = up.stop();
    assert_eq!(pids.len(), 7, "{pids:?}");
    let left = left_running(pids);
    assert!(
        left.is_empty(),
        "processes left behind, restarted ones included: {left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_restart_never_a_killed_part_stays_down_until_chaos_start_brings_it_back() {
    let data = tempfile::tempdir().unwrap();
    let Loaded {
        up,
        tester,
        acked,
        run,
        worker,
    } = loaded_mesh(&data, &["--no-seed", "--restart", "never"]).await;
    let mut table = table_header();
    for part in PARTS {
        let before = up.part(part);
        let pid = up.pid(part);
        let at_kill = acked.counts();
        kill9(pid);
        let detected = until(&up, part, Duration::from_secs(2), "reported dead by SIGKILL", |p| {
            killed_by_sigkill(p, &before["last_death"]) && p["state"] == "dead"
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let down = up.part(part);
        assert_eq!(down["state"], "dead", "left down: {down}");
        assert_eq!(down["restarts"], 0, "{down}");
        if part == "redis" {
            let (code, out) = up.run(&["chaos", "stop", part]);
            assert_eq!(code, 0, "{out}");
            assert!(out.contains("was not running"), "{out}");
        }
        let started = Instant::now();
        let (code, out) = up.run(&["chaos", "start", part]);
        assert_eq!(code, 0, "{out}");
        until_back(&up, part, pid, Duration::from_secs(30)).await;
        let back = started.elapsed();
        converge(&up, &run).await;
        let present = check_acked(&up, &tester, &acked).await;
        table_row(&mut table, part, detected, back, at_kill, present);
    }
    println!("--restart never, SIGKILL under load, then chirp chaos start:\n{table}");
    run.stop.store(true, Ordering::Relaxed);
    worker.await.unwrap();
    converge(&up, &run).await;
    check_acked(&up, &tester, &acked).await;
    let pids = up.stop();
    let left = left_running(pids);
    assert!(left.is_empty(), "processes left behind: {left:?}");
}
