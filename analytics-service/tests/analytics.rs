//! analytics-service on its SQLite file: idempotent ingestion, aggregates,
//! windows, validation and auth.

mod common;

use chirp_proto::analytics::v1 as pb;
use common::{authed, event, ingest, violated_fields, Backing, TestApp, INGEST_TOKEN};
use service_kit::{auth::Role, events::Payload};
use tonic::Code;
use uuid::Uuid;

async fn user_stats(app: &TestApp, token: &str, user: Uuid) -> pb::GetUserStatsResponse {
    app.client()
        .get_user_stats(authed(
            pb::GetUserStatsRequest {
                user_id: user.to_string(),
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn events_build_user_and_message_stats_and_redelivery_counts_nothing_twice() {
    let backing = Backing::new();
    let app = TestApp::spawn(&backing).await;
    let token = backing.token(Role::User);
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let message = Uuid::now_v7();
    let comment = |author| Payload::CommentAdded {
        comment_id: Uuid::now_v7(),
        message_id: message,
        author_id: author,
        message_author_id: alice,
    };
    let batch = vec![
        event(Payload::UserRegistered { user_id: alice }),
        event(Payload::UserRegistered { user_id: bob }),
        event(Payload::UserFollowed {
            follower_id: bob,
            followee_id: alice,
        }),
        event(comment(bob)),
        event(Payload::MessagePosted {
            message_id: message,
            author_id: alice,
        }),
        event(comment(bob)),
    ];
    let first = app.client().record_events(ingest(&batch)).await.unwrap().into_inner();
    assert_eq!((first.accepted_count, first.duplicate_count), (6, 0));
    let again = app
        .client()
        .record_events(ingest(&batch[2..]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.accepted_count, again.duplicate_count),
        (0, 4),
        "a redelivered batch"
    );

    let a = user_stats(&app, &token, alice).await;
    assert_eq!(
        (
            a.message_count,
            a.follower_count,
            a.comments_received_count,
            a.comment_count
        ),
        (1, 1, 2, 0),
        "a comment that arrived before its message still counts"
    );
    let b = user_stats(&app, &token, bob).await;
    assert_eq!((b.following_count, b.comment_count), (1, 2));
    let m = app
        .client()
        .get_message_stats(authed(
            pb::GetMessageStatsRequest {
                message_id: message.to_string(),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((m.comment_count, m.author_id, m.deleted), (2, alice.to_string(), false));

    let unknown = user_stats(&app, &token, Uuid::new_v4()).await;
    assert_eq!(unknown.message_count, 0, "an unknown user has zero counts");
}

#[tokio::test]
async fn top_messages_rank_comments_in_the_window_and_leave_deleted_messages_out() {
    let backing = Backing::new();
    let app = TestApp::spawn(&backing).await;
    let token = backing.token(Role::User);
    let author = Uuid::new_v4();
    let (hot, warm, gone) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let mut events = Vec::new();
    for (message, n) in [(hot, 3), (warm, 1), (gone, 5)] {
        for _ in 0..n {
            events.push(event(Payload::CommentAdded {
                comment_id: Uuid::now_v7(),
                message_id: message,
                author_id: Uuid::new_v4(),
                message_author_id: author,
            }));
        }
    }
    events.push(event(Payload::MessageDeleted {
        message_id: gone,
        author_id: author,
    }));
    app.client().record_events(ingest(&events)).await.unwrap();

    let now = chrono::Utc::now().timestamp();
    let window = |start: i64, end: i64| pb::TopMessagesRequest {
        start_time: Some(prost_types::Timestamp {
            seconds: start,
            nanos: 0,
        }),
        end_time: Some(prost_types::Timestamp { seconds: end, nanos: 0 }),
        limit: 0,
    };
    let top = app
        .client()
        .top_messages(authed(window(now - 3600, now + 60), &token))
        .await
        .unwrap()
        .into_inner()
        .messages;
    let ranked: Vec<(String, i64)> = top.into_iter().map(|m| (m.message_id, m.comment_count)).collect();
    assert_eq!(ranked, [(hot.to_string(), 3), (warm.to_string(), 1)]);
    let earlier = app
        .client()
        .top_messages(authed(window(now - 7200, now - 3600), &token))
        .await
        .unwrap()
        .into_inner();
    assert!(earlier.messages.is_empty(), "nothing happened in that window");
}

#[tokio::test]
async fn the_activity_histogram_sums_per_bucket_for_moderators() {
    let backing = Backing::new();
    let app = TestApp::spawn(&backing).await;
    let mut events = Vec::new();
    for _ in 0..4 {
        events.push(event(Payload::UserRegistered {
            user_id: Uuid::new_v4(),
        }));
    }
    events.push(event(Payload::MessagePosted {
        message_id: Uuid::now_v7(),
        author_id: Uuid::new_v4(),
    }));
    app.client().record_events(ingest(&events)).await.unwrap();
    let now = chrono::Utc::now().timestamp();
    let request = pb::GetActivityHistogramRequest {
        start_time: Some(prost_types::Timestamp {
            seconds: now - 86_400,
            nanos: 0,
        }),
        end_time: Some(prost_types::Timestamp {
            seconds: now + 60,
            nanos: 0,
        }),
        granularity: pb::Granularity::Hour.into(),
    };
    let buckets = app
        .client()
        .get_activity_histogram(authed(request, &backing.token(Role::Moderator)))
        .await
        .unwrap()
        .into_inner()
        .buckets;
    assert_eq!(buckets.len(), 1);
    assert_eq!((buckets[0].users_registered, buckets[0].messages_posted), (4, 1));
    assert_eq!(
        buckets[0].start_time.unwrap().seconds % 3600,
        0,
        "hour buckets start on the hour"
    );

    let status = app
        .client()
        .get_activity_histogram(authed(request, &backing.token(Role::User)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn counts_persist_across_a_restart_of_the_service() {
    let backing = Backing::new();
    let user = Uuid::new_v4();
    let app = TestApp::spawn(&backing).await;
    app.client()
        .record_events(ingest(&[event(Payload::MessagePosted {
            message_id: Uuid::now_v7(),
            author_id: user,
        })]))
        .await
        .unwrap();
    app.stop().await.unwrap();

    let app = TestApp::spawn(&backing).await;
    let stats = user_stats(&app, &backing.token(Role::User), user).await;
    assert_eq!(stats.message_count, 1);
}

#[tokio::test]
async fn every_invalid_request_is_refused_with_its_fields_and_records_nothing() {
    let backing = Backing::new();
    let app = TestApp::spawn(&backing).await;
    let token = backing.token(Role::Admin);
    let good = event(Payload::UserRegistered {
        user_id: Uuid::new_v4(),
    });

    let status = app.client().record_events(ingest(&[])).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["events"]);
    let many: Vec<_> = (0..501).map(|_| good.clone()).collect();
    let status = app.client().record_events(ingest(&many)).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["events"]);

    let mut bad_id = good.to_pb();
    bad_id.event_id = "nope".into();
    let mut no_payload = good.to_pb();
    no_payload.payload = None;
    no_payload.event_id = Uuid::new_v4().to_string();
    let mut bad_ref = event(Payload::UserRegistered {
        user_id: Uuid::new_v4(),
    })
    .to_pb();
    if let Some(chirp_proto::events::v1::event::Payload::UserRegistered(p)) = bad_ref.payload.as_mut() {
        p.user_id = "x".into();
    }
    // A batch with bad events is not refused whole: each bad event is
    // rejected on its own, naming its field, and the good one is stored.
    let mut request = ingest(&[]);
    request.get_mut().events = vec![good.to_pb(), bad_id, no_payload, bad_ref];
    let recorded = app.client().record_events(request).await.unwrap().into_inner();
    let answers: Vec<(i32, String)> = recorded
        .outcomes
        .iter()
        .map(|o| (o.disposition, o.reason.split(':').next().unwrap_or_default().to_owned()))
        .collect();
    let rejected = chirp_proto::events::v1::EventDisposition::Rejected as i32;
    assert_eq!(
        answers,
        [
            (chirp_proto::events::v1::EventDisposition::Applied as i32, String::new()),
            (rejected, "events[1].event_id".to_owned()),
            (rejected, "events[2].payload".to_owned()),
            (rejected, "events[3].user_id".to_owned()),
        ]
    );
    assert_eq!((recorded.accepted_count, recorded.duplicate_count), (1, 0));
    let again = app.client().record_events(ingest(&[good])).await.unwrap().into_inner();
    assert_eq!(
        (again.accepted_count, again.duplicate_count),
        (0, 1),
        "the good event was stored once"
    );
    assert_eq!(
        again.outcomes[0].disposition,
        chirp_proto::events::v1::EventDisposition::Skipped as i32
    );

    let status = app
        .client()
        .get_user_stats(authed(pb::GetUserStatsRequest { user_id: "x".into() }, &token))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["user_id"]);
    let status = app
        .client()
        .get_message_stats(authed(
            pb::GetMessageStatsRequest {
                message_id: String::new(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["message_id"]);

    let ts = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
    let now = chrono::Utc::now().timestamp();
    for (start, end, limit, fields) in [
        (None, None, 0, vec!["start_time", "end_time"]),
        (ts(now), ts(now - 10), 0, vec!["end_time"]),
        (ts(now - 400 * 86_400), ts(now), 0, vec!["end_time"]),
        (ts(now - 10), ts(now), 101, vec!["limit"]),
        (None, ts(now), -1, vec!["start_time", "limit"]),
    ] {
        let status = app
            .client()
            .top_messages(authed(
                pb::TopMessagesRequest {
                    start_time: start,
                    end_time: end,
                    limit,
                },
                &token,
            ))
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), fields, "{start:?} {end:?} {limit}");
    }
    for (granularity, start) in [
        (pb::Granularity::Unspecified, now - 60),
        (pb::Granularity::Minute, now - 30 * 86_400),
    ] {
        let status = app
            .client()
            .get_activity_histogram(authed(
                pb::GetActivityHistogramRequest {
                    start_time: ts(start),
                    end_time: ts(now),
                    granularity: granularity.into(),
                },
                &token,
            ))
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["granularity"]);
    }
}

#[tokio::test]
async fn ingestion_needs_the_ingest_token_and_reads_need_a_user_token() {
    let backing = Backing::new();
    let app = TestApp::spawn(&backing).await;
    let batch = [event(Payload::UserRegistered {
        user_id: Uuid::new_v4(),
    })];
    let mut no_token = ingest(&batch);
    no_token.metadata_mut().remove("x-chirp-ingest-token");
    let mut wrong = ingest(&batch);
    wrong
        .metadata_mut()
        .insert("x-chirp-ingest-token", format!("{INGEST_TOKEN}x").parse().unwrap());
    let user_token_instead = {
        let mut r = ingest(&batch);
        r.metadata_mut().remove("x-chirp-ingest-token");
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", backing.token(Role::Admin)).parse().unwrap(),
        );
        r
    };
    for request in [no_token, wrong, user_token_instead] {
        let status = app.client().record_events(request).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }

    let user = Uuid::new_v4().to_string();
    let status = app
        .client()
        .get_user_stats(pb::GetUserStatsRequest { user_id: user.clone() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let forger = service_kit::auth::TokenSigner::generate(std::time::Duration::from_secs(60)).unwrap();
    let (forged, _) = forger
        .issue(
            service_kit::auth::Caller {
                user_id: Uuid::new_v4(),
                role: Role::Admin,
            },
            chrono::Utc::now().timestamp(),
        )
        .unwrap();
    let status = app
        .client()
        .get_user_stats(authed(pb::GetUserStatsRequest { user_id: user }, &forged))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = app
        .client()
        .get_activity_histogram(pb::GetActivityHistogramRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}
