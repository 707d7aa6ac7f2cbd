//! What an unauthenticated client can make user-service spend: password
//! hashes are bounded in number at once and refused fast beyond a short
//! wait, logins are limited per username and per client address, and a
//! taken username costs no hash at all.

mod common;

use std::time::{Duration, Instant};

use chirp_proto::user::v1 as pb;
use common::{TestApp, PASSWORD};
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

fn login(username: &str, password: &str) -> pb::LoginRequest {
    pb::LoginRequest {
        username: username.into(),
        password: password.into(),
    }
}

/// A sample of one unlabelled metric.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

/// The retry delay a RESOURCE_EXHAUSTED carries.
fn retry_after(status: &Status) -> Duration {
    status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .unwrap_or_else(|| panic!("no RetryInfo in {status:?}"))
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:")?.trim().strip_suffix(" kB")?.parse().ok())
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_wrong_logins_at_once_hash_two_at_a_time_and_the_rest_are_refused_fast() {
    user_service::memory::return_large_blocks_to_the_system();
    const HASH_MIB: u64 = 16;
    let memory = format!("--password-hash-memory-kib={}", HASH_MIB * 1024);
    let app = TestApp::spawn_on_fresh(&[
        &memory,
        "--password-hash-concurrency=2",
        "--password-hash-queue-wait=50ms",
    ])
    .await;
    let victim = app.register("victim").await;
    let peak_before = peak_rss_kib();

    // Watch the hashes running and a reader's latency while 64 clients
    // send wrong passwords for two seconds.
    let stop = Instant::now() + Duration::from_secs(2);
    let watcher = {
        let (metrics_app, mut client) = (app.metrics_addr, app.client());
        let id = victim.id.clone();
        tokio::spawn(async move {
            let (mut most, mut slowest) = (0.0f64, Duration::ZERO);
            while Instant::now() < stop {
                let text = common::metrics_at(metrics_app).await;
                most = most.max(metric(&text, "password_hashes_running"));
                let asked = Instant::now();
                client
                    .get_user(pb::GetUserRequest { user_id: id.clone() })
                    .await
                    .expect("GetUser during the burst");
                slowest = slowest.max(asked.elapsed());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (most, slowest)
        })
    };
    let flood: Vec<_> = (0..64)
        .map(|_| {
            let mut client = app.client();
            tokio::spawn(async move {
                let mut codes = Vec::new();
                while Instant::now() < stop {
                    let asked = Instant::now();
                    match client.login(login("victim", "not the password")).await {
                        Ok(_) => panic!("a wrong password logged in"),
                        Err(status) => {
                            if status.code() == Code::ResourceExhausted {
                                assert!(retry_after(&status) > Duration::ZERO);
                            }
                            codes.push((status.code(), asked.elapsed()));
                        }
                    }
                }
                codes
            })
        })
        .collect();
    let mut codes = Vec::new();
    for client in flood {
        codes.extend(client.await.unwrap());
    }
    let (most_running, slowest_read) = watcher.await.unwrap();

    let refused: Vec<Duration> = codes
        .iter()
        .filter(|(c, _)| *c == Code::ResourceExhausted)
        .map(|(_, t)| *t)
        .collect();
    let checked = codes.iter().filter(|(c, _)| *c == Code::Unauthenticated).count();
    let other: Vec<_> = codes
        .iter()
        .filter(|(c, _)| !matches!(c, Code::ResourceExhausted | Code::Unauthenticated))
        .collect();
    let slowest_refusal = refused.iter().max().copied().unwrap_or_default();
    let grown_mib = peak_rss_kib().saturating_sub(peak_before) / 1024;
    println!(
        "login flood: {} calls, {checked} checked (UNAUTHENTICATED), {} refused (RESOURCE_EXHAUSTED, slowest {} ms), \
         at most {most_running} hashes at once, GetUser slowest {} ms, peak RSS grew {grown_mib} MiB",
        codes.len(),
        refused.len(),
        slowest_refusal.as_millis(),
        slowest_read.as_millis()
    );
    assert!(other.is_empty(), "unexpected answers: {other:?}");
    assert!(checked > 0 && !refused.is_empty(), "both checks and refusals");
    assert!(most_running <= 2.0, "{most_running} hashes ran at once");
    // Refused after the 50 ms wait, not after queueing behind the others.
    assert!(
        slowest_refusal < Duration::from_millis(500),
        "a refusal took {slowest_refusal:?}"
    );
    // Two hashes' memory at a time (plus slack), not sixty-four's.
    assert!(grown_mib < 8 * HASH_MIB, "peak RSS grew {grown_mib} MiB");
    // And the account still works for its owner.
    app.client()
        .login(login("victim", PASSWORD))
        .await
        .expect("the owner logs in after the flood");
}

#[tokio::test]
async fn guessing_one_accounts_password_slows_that_account_only() {
    let app = TestApp::spawn_on_fresh(&["--login-attempts-per-username-per-minute=5"]).await;
    app.register("alice").await;
    app.register("bob").await;
    let mut client = app.client();
    for _ in 0..5 {
        let status = client.login(login("alice", "wrong guess")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    let status = client.login(login("alice", PASSWORD)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let wait = retry_after(&status);
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(12),
        "one attempt back every 12 s: {wait:?}"
    );
    let hashes = metric(&app.metrics().await, "password_hashes_total");
    client.login(login("alice", "wrong guess")).await.unwrap_err();
    assert_eq!(
        metric(&app.metrics().await, "password_hashes_total"),
        hashes,
        "a limited attempt costs no hash"
    );
    client.login(login("bob", PASSWORD)).await.expect("bob is not slowed");
}

#[tokio::test]
async fn one_address_gets_a_bounded_number_of_logins_and_registrations() {
    let app = TestApp::spawn_on_fresh(&["--auth-requests-per-address-per-minute=4"]).await;
    let mut client = app.client();
    let register = |name: &str| pb::RegisterRequest {
        username: name.into(),
        password: PASSWORD.into(),
        display_name: String::new(),
    };
    let carol = client
        .register(register("carol"))
        .await
        .expect("1st")
        .into_inner()
        .user
        .unwrap()
        .id;
    client.login(login("carol", PASSWORD)).await.expect("2nd");
    client.login(login("nobody", PASSWORD)).await.unwrap_err();
    client.register(register("dave")).await.expect("4th");
    for status in [
        client.login(login("carol", PASSWORD)).await.unwrap_err(),
        client.register(register("erin")).await.unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(retry_after(&status) > Duration::ZERO);
    }
    // Reads are not limited.
    client
        .get_user(pb::GetUserRequest { user_id: carol })
        .await
        .expect("GetUser is not an authentication call");
}

#[tokio::test]
async fn registering_a_taken_username_costs_no_password_hash() {
    let app = TestApp::spawn().await;
    app.register("frank").await;
    let hashes = metric(&app.metrics().await, "password_hashes_total");
    let status = app
        .client()
        .register(pb::RegisterRequest {
            username: "FRANK".into(),
            password: PASSWORD.into(),
            display_name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(metric(&app.metrics().await, "password_hashes_total"), hashes);
}

#[tokio::test]
async fn the_largest_valid_requests_fit_under_the_size_limit() {
    let app = TestApp::spawn().await;
    let mut client = app.client();
    let ids: Vec<String> = (0..100).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    client
        .batch_get_users(pb::BatchGetUsersRequest { user_ids: ids })
        .await
        .expect("a full BatchGetUsers");
    // Four-byte characters at every length limit.
    let wide = |n: usize| "\u{1D11E}".repeat(n);
    client
        .register(pb::RegisterRequest {
            username: "a".repeat(32),
            password: wide(128),
            display_name: wide(50),
        })
        .await
        .expect("the longest registration");
}
