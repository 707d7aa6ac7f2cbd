//! message-service with the real comment-service: comment counts and
//! previews show in GetMessage, and when comment-service's Redis is down
//! messages are still served, with comments marked unavailable, until Redis
//! returns and the comments come back, with no restart.

use std::time::{Duration, Instant};

use chirp_mesh_tests::{Mesh, Service};
use chirp_proto::{comment::v1 as cpb, message::v1 as mpb};
use test_support::grpc::{authed, with_deadline};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

async fn get(mesh: &Mesh, id: &str) -> (mpb::EnrichedMessage, Duration) {
    let started = Instant::now();
    let message = mesh
        .messages_v1()
        .get_message(with_deadline(
            mpb::GetMessageRequest { message_id: id.into() },
            Duration::from_secs(2),
        ))
        .await
        .expect("the message is served")
        .into_inner()
        .message
        .unwrap();
    (message, started.elapsed())
}

#[tokio::test]
async fn get_message_shows_real_comments_degrades_while_redis_is_down_and_recovers() {
    let mut mesh = Mesh::start().await;
    let (alice, alice_token) = mesh.user("alice").await;
    let (_, bob_token) = mesh.user("bob").await;
    let posted = mesh
        .messages_v1()
        .post_message(authed(
            mpb::PostMessageRequest {
                body: "comment on me".into(),
            },
            &alice_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .message
        .unwrap();
    for body in ["first", "second", "third", "fourth"] {
        mesh.comments()
            .add_comment(authed(
                cpb::AddCommentRequest {
                    message_id: posted.id.clone(),
                    body: body.into(),
                },
                &bob_token,
            ))
            .await
            .unwrap();
    }

    let (message, _) = get(&mesh, &posted.id).await;
    let author = message.author.unwrap();
    assert_eq!(
        (author.status, author.username.as_str()),
        (mpb::PartStatus::Ok as i32, "alice")
    );
    let comments = message.comments.unwrap();
    assert_eq!((comments.status, comments.count), (mpb::PartStatus::Ok as i32, 4));
    let preview: Vec<&str> = comments.preview.iter().map(|c| c.body.as_str()).collect();
    assert_eq!(preview, ["first", "second", "third"]);
    assert_eq!(message.message.unwrap().author_id, alice);

    mesh.comment_redis.stop();
    mesh.wait_for(Service::Comment, ServingStatus::NotServing).await;
    for _ in 0..3 {
        let (message, elapsed) = get(&mesh, &posted.id).await;
        assert_eq!(message.message.unwrap().body, "comment on me");
        assert_eq!(message.author.unwrap().status, mpb::PartStatus::Ok as i32);
        assert_eq!(message.comments.unwrap().status, mpb::PartStatus::Unavailable as i32);
        assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    }
    let status = mesh
        .comments()
        .add_comment(authed(
            cpb::AddCommentRequest {
                message_id: posted.id.clone(),
                body: "while down".into(),
            },
            &bob_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);

    mesh.comment_redis.start().expect("Redis starts again");
    mesh.wait_for(Service::Comment, ServingStatus::Serving).await;
    // message-service's circuit breaker to comment-service opened during the
    // outage; it lets a probe through after its cool-down (2 s), so the
    // comments come back within a few seconds, with no restart.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (message, _) = get(&mesh, &posted.id).await;
        let comments = message.comments.unwrap();
        if comments.status == mpb::PartStatus::Ok as i32 {
            assert_eq!(comments.count, 4, "all comments are back");
            break;
        }
        assert!(Instant::now() < deadline, "comments did not come back within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_comment_on_a_message_that_does_not_exist_is_refused_by_the_real_message_service() {
    let mesh = Mesh::start().await;
    let (_, token) = mesh.user("carol").await;
    let status = mesh
        .comments()
        .add_comment(authed(
            cpb::AddCommentRequest {
                message_id: "01890a5d-ac96-774b-bcce-b302099a8057".into(),
                body: "hello?".into(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}
