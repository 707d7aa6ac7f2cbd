//! Every change user-service makes writes its events in the same
//! transaction, one row per destination; no-op changes write nothing.

mod common;

use chirp_proto::user::v1 as pb;
use common::{authed, TestApp};

fn pairs(rows: &[(&str, &str)]) -> Vec<(String, String)> {
    rows.iter().map(|(d, k)| ((*d).to_owned(), (*k).to_owned())).collect()
}

#[tokio::test]
async fn changes_write_their_events_and_repeats_write_none() {
    let app = TestApp::spawn().await;
    let (_, alice_token) = app.user("alice").await;
    let (bob, _) = app.user("bob").await;
    let (_, moderator) = app.moderator("moe").await;
    let before = app.outbox().await.len();
    assert_eq!(
        app.outbox()
            .await
            .iter()
            .filter(|(_, k)| k == "user_registered")
            .count(),
        3,
        "one per registration"
    );

    for _ in 0..2 {
        app.client()
            .follow(authed(
                pb::FollowRequest {
                    user_id: bob.id.clone(),
                },
                &alice_token,
            ))
            .await
            .unwrap();
    }
    for _ in 0..2 {
        app.client()
            .ban_user(authed(
                pb::BanUserRequest {
                    user_id: bob.id.clone(),
                    reason: "spam".into(),
                },
                &moderator,
            ))
            .await
            .unwrap();
    }
    app.client()
        .unban_user(authed(
            pb::UnbanUserRequest {
                user_id: bob.id.clone(),
            },
            &moderator,
        ))
        .await
        .unwrap();
    app.client()
        .unfollow(authed(
            pb::UnfollowRequest {
                user_id: bob.id.clone(),
            },
            &alice_token,
        ))
        .await
        .unwrap();

    let outbox = app.outbox().await;
    assert_eq!(
        outbox[before..].to_vec(),
        pairs(&[
            ("analytics", "user_followed"),
            ("analytics", "user_banned"),
            ("comments", "user_banned"),
            ("messages", "user_banned"),
            ("analytics", "tokens_revoked"),
            ("comments", "tokens_revoked"),
            ("messages", "tokens_revoked"),
            ("analytics", "user_unbanned"),
            ("messages", "user_unbanned"),
            ("analytics", "tokens_revoked"),
            ("comments", "tokens_revoked"),
            ("messages", "tokens_revoked"),
            ("analytics", "user_unfollowed"),
        ]),
        "a second follow and a second ban changed nothing and wrote nothing; a ban and an unban each revoke the user's tokens everywhere"
    );
}

#[tokio::test]
async fn a_refused_change_writes_no_event() {
    let app = TestApp::spawn().await;
    let (_, token) = app.user("alice").await;
    let before = app.outbox().await;
    let _ = app
        .client()
        .follow(authed(
            pb::FollowRequest {
                user_id: uuid::Uuid::new_v4().to_string(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(app.outbox().await, before);
}

#[tokio::test]
async fn outbox_depth_and_age_are_in_the_metrics() {
    let app = TestApp::spawn().await;
    // The configured admin is created without an event; alice's
    // registration is the one event waiting.
    app.register("alice").await;
    // The relay refreshes its gauges about once a second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // No analytics-service runs here, so the relay's attempts fail and are
    // counted; the gauges and the counter are read at different moments,
    // so wait for all of them.
    loop {
        let metrics = app.metrics().await;
        let failures = metrics
            .lines()
            .find_map(|l| l.strip_prefix(r#"outbox_delivery_failures_total{destination="analytics"} "#))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if metrics.contains(r#"outbox_depth{destination="analytics"} 1"#)
            && metrics.contains(r#"outbox_oldest_age_seconds{destination="analytics"}"#)
            && failures >= 1.0
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
