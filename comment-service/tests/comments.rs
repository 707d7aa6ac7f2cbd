//! comment-service's own behaviour on a real Redis.

mod common;

use std::time::{Duration, Instant};

use chirp_proto::comment::v1 as pb;
use comment_service::{
    domain::{CommentId, MessageId, UserId},
    store::keys::{Group, Keys},
};
use common::{add, authed, keys, violated_fields, Backing, Mode, TestApp, PEER_TIMEOUT};
use service_kit::auth::Role;
use tonic::Code;

#[tokio::test]
async fn comments_are_added_listed_counted_and_deleted() {
    let backing = Backing::shared().await;
    let app = TestApp::spawn(&backing).await;
    let (author, token) = backing.user(Role::User);
    let message = backing.message(&author);
    let other = backing.message(&author);

    let first = app
        .client()
        .add_comment(authed(add(&message, "  first!  "), &token))
        .await
        .unwrap()
        .into_inner()
        .comment
        .unwrap();
    assert_eq!(
        (first.body.as_str(), first.author_id.as_str()),
        ("first!", author.as_str())
    );
    assert_eq!(first.message_id, message);
    let created = first.create_time.unwrap().seconds;
    assert!((chrono::Utc::now().timestamp() - created).abs() < 60);
    app.client()
        .add_comment(authed(add(&message, "second"), &token))
        .await
        .unwrap();

    let listed = app
        .client()
        .list_comments(pb::ListCommentsRequest {
            message_id: message.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let bodies: Vec<&str> = listed.comments.iter().map(|c| c.body.as_str()).collect();
    assert_eq!(bodies, ["first!", "second"], "oldest first");

    let counts = app
        .client()
        .count_comments(pb::CountCommentsRequest {
            message_ids: vec![message.clone(), other.clone(), message.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .counts;
    assert_eq!(counts.len(), 2);
    assert_eq!((counts[&message], counts[&other]), (2, 0));

    app.client()
        .delete_comment(authed(
            pb::DeleteCommentRequest {
                comment_id: first.id.clone(),
            },
            &token,
        ))
        .await
        .unwrap();
    let status = app
        .client()
        .delete_comment(authed(pb::DeleteCommentRequest { comment_id: first.id }, &token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let counts = app
        .client()
        .count_comments(pb::CountCommentsRequest {
            message_ids: vec![message.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .counts;
    assert_eq!(counts[&message], 1);
}

#[tokio::test]
async fn the_schema_version_is_written_at_start_up_and_every_key_is_under_the_prefix() {
    let backing = Backing::shared().await;
    let app = TestApp::spawn(&backing).await;
    let (author, token) = backing.user(Role::User);
    let message = backing.message(&author);
    let comment = app
        .client()
        .add_comment(authed(add(&message, "keys"), &token))
        .await
        .unwrap()
        .into_inner()
        .comment
        .unwrap();
    let layout = Keys::new(backing.prefix.prefix());
    let message = MessageId::parse("message", &message).unwrap();
    let group = Group::of_message(message);
    let mut expected = vec![
        layout.comment(CommentId::parse("id", &comment.id).unwrap()),
        layout.message(message),
        layout.outbox(group),
        layout.schema_version(),
        layout.user(group, UserId::parse("author", &author).unwrap()),
    ];
    expected.sort();
    assert_eq!(keys(&backing).await, expected);
}

#[tokio::test]
async fn a_comment_on_a_message_that_does_not_exist_is_not_found_and_not_stored() {
    let backing = Backing::shared().await;
    let app = TestApp::spawn(&backing).await;
    let (_, token) = backing.user(Role::User);
    let status = app
        .client()
        .add_comment(authed(add(&uuid::Uuid::now_v7().to_string(), "into the void"), &token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(keys(&backing).await.len(), 1, "only the schema version");
}

#[tokio::test]
async fn when_message_service_cannot_answer_add_comment_is_unavailable_fast_and_stores_nothing() {
    let backing = Backing::shared().await;
    // No existence cache: every comment asks.
    let app = TestApp::spawn_with(&backing, &["--message-exists-cache-ttl=0s"]).await;
    let (author, token) = backing.user(Role::User);
    let message = backing.message(&author);
    for mode in [Mode::Fail, Mode::Hang] {
        backing.messages.behaviour.set(mode);
        let started = Instant::now();
        let status = app
            .client()
            .add_comment({
                let mut request = authed(add(&message, "maybe"), &token);
                request.set_timeout(Duration::from_secs(2));
                request
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{mode:?}: {status:?}");
        assert!(
            started.elapsed() < PEER_TIMEOUT + Duration::from_millis(700),
            "{mode:?}: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(keys(&backing).await.len(), 1, "only the schema version");
}

/// A request carrying `token`, or none.
fn request_as<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    match token {
        Some(token) => authed(message, token),
        None => tonic::Request::new(message),
    }
}

#[tokio::test]
async fn a_burst_of_comments_on_one_message_checks_it_once() {
    let backing = Backing::shared().await;
    let app = TestApp::spawn(&backing).await;
    let (author, token) = backing.user(Role::User);
    let message = backing.message(&author);
    for i in 0..5 {
        app.client()
            .add_comment(authed(add(&message, &format!("c{i}")), &token))
            .await
            .unwrap();
    }
    assert_eq!(backing.messages.behaviour.calls("CheckMessage"), 1);
}

#[tokio::test]
async fn paging_returns_every_comment_exactly_once_in_time_order() {
    let backing = Backing::shared().await;
    let app = TestApp::spawn(&backing).await;
    let (author, token) = backing.user(Role::User);
    let message = backing.message(&author);
    let mut expected = Vec::new();
    for i in 0..25 {
        let c = app
            .client()
            .add_comment(authed(add(&message, &format!("c{i}")), &token))
            .await
            .unwrap()
            .into_inner()
            .comment
            .unwrap();
        expected.push(c.id);
    }
    let seen: Vec<String> = common::all_comments(&app, &message, 7)
        .await
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(seen, expected);
    let first_page = app
        .client()
        .list_comments(pb::ListCommentsRequest {
            message_id: message.clone(),
            page_size: 3,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (first_page.comments.len(), first_page.total_count),
        (3, Some(25)),
        "a page says how many there are in all"
    );
}

#[tokio::test]
async fn every_invalid_request_is_refused_with_its_fields_and_writes_nothing() {
    let backing = Backing::shared().await;
    let app = TestApp::spawn(&backing).await;
    let (author, token) = backing.user(Role::User);
    let message = backing.message(&author);
    for (message_id, body, fields) in [
        (message.as_str(), "", vec!["body"]),
        (message.as_str(), &"x".repeat(501) as &str, vec!["body"]),
        (message.as_str(), "nul\u{0}", vec!["body"]),
        ("nope", "fine", vec!["message_id"]),
        ("", "", vec!["message_id", "body"]),
    ] {
        let status = app
            .client()
            .add_comment(authed(add(message_id, body), &token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&status), fields);
    }
    app.client()
        .add_comment(authed(add(&message, &"ü".repeat(500)), &token))
        .await
        .expect("500 characters is the limit, whatever their bytes");

    for (size, token_text, fields) in [
        (101, "", vec!["page_size"]),
        (-1, "", vec!["page_size"]),
        (5, "bogus", vec!["page_token"]),
    ] {
        let status = app
            .client()
            .list_comments(pb::ListCommentsRequest {
                message_id: message.clone(),
                page_size: size,
                page_token: token_text.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), fields);
    }
    for ids in [vec![], vec![message.clone(); 101], vec![message.clone(), "bad".into()]] {
        let status = app
            .client()
            .count_comments(pb::CountCommentsRequest { message_ids: ids })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    let status = app
        .client()
        .delete_comment(authed(pb::DeleteCommentRequest { comment_id: "x".into() }, &token))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["comment_id"]);
    let status = app
        .client()
        .purge_user_comments(authed(pb::PurgeUserCommentsRequest { user_id: "x".into() }, &token))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["user_id"]);
    assert_eq!(
        keys(&backing).await.len(),
        5,
        "schema version, the one valid comment's three keys and the outbox"
    );
}

#[tokio::test]
async fn the_auth_matrix_holds_for_every_rpc_that_acts_for_someone() {
    let backing = Backing::shared().await;
    let app = TestApp::spawn(&backing).await;
    let (author, token) = backing.user(Role::User);
    let (_, other) = backing.user(Role::User);
    let (_, moderator) = backing.user(Role::Moderator);
    let message = backing.message(&author);
    let comment = app
        .client()
        .add_comment(authed(add(&message, "mine"), &token))
        .await
        .unwrap()
        .into_inner()
        .comment
        .unwrap();

    let forger = service_kit::auth::TokenSigner::generate(Duration::from_secs(60)).unwrap();
    let (forged, _) = forger
        .issue(
            service_kit::auth::Caller {
                user_id: uuid::Uuid::new_v4(),
                role: Role::Admin,
            },
            chrono::Utc::now().timestamp(),
        )
        .unwrap();
    let now = chrono::Utc::now().timestamp();
    let expired = backing
        .signer
        .sign(&service_kit::auth::Claims {
            sub: author.clone(),
            role: Role::Admin,
            iss: service_kit::auth::ISSUER.into(),
            iat: now - 7200,
            exp: now - 3600,
            scope: None,
        })
        .unwrap();
    for bad in [None, Some(forged.as_str()), Some(expired.as_str()), Some("x.y.z")] {
        let codes = [
            app.client()
                .add_comment(request_as(add(&message, "hi"), bad))
                .await
                .unwrap_err()
                .code(),
            app.client()
                .delete_comment(request_as(
                    pb::DeleteCommentRequest {
                        comment_id: comment.id.clone(),
                    },
                    bad,
                ))
                .await
                .unwrap_err()
                .code(),
            app.client()
                .purge_user_comments(request_as(
                    pb::PurgeUserCommentsRequest {
                        user_id: author.clone(),
                    },
                    bad,
                ))
                .await
                .unwrap_err()
                .code(),
        ];
        assert_eq!(codes, [Code::Unauthenticated; 3], "{bad:?}");
    }

    let status = app
        .client()
        .delete_comment(authed(
            pb::DeleteCommentRequest {
                comment_id: comment.id.clone(),
            },
            &other,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = app
        .client()
        .purge_user_comments(authed(
            pb::PurgeUserCommentsRequest {
                user_id: author.clone(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    app.client()
        .delete_comment(authed(pb::DeleteCommentRequest { comment_id: comment.id }, &moderator))
        .await
        .expect("moderators delete anyone's comment");
}

#[tokio::test]
async fn purging_a_users_comments_twice_is_the_same_as_once() {
    let backing = Backing::shared().await;
    let app = TestApp::spawn(&backing).await;
    let (troll, troll_token) = backing.user(Role::User);
    let (friend, friend_token) = backing.user(Role::User);
    let (_, moderator) = backing.user(Role::Moderator);
    let message = backing.message(&friend);
    for i in 0..3 {
        app.client()
            .add_comment(authed(add(&message, &format!("spam {i}")), &troll_token))
            .await
            .unwrap();
    }
    app.client()
        .add_comment(authed(add(&message, "a real comment"), &friend_token))
        .await
        .unwrap();

    let purge = || {
        let mut client = app.client();
        let request = authed(pb::PurgeUserCommentsRequest { user_id: troll.clone() }, &moderator);
        async move {
            client
                .purge_user_comments(request)
                .await
                .unwrap()
                .into_inner()
                .deleted_count
        }
    };
    assert_eq!(purge().await, 3);
    let after_once = keys(&backing).await;
    assert_eq!(purge().await, 0);
    assert_eq!(keys(&backing).await, after_once, "a second purge changes nothing");

    let left = app
        .client()
        .list_comments(pb::ListCommentsRequest {
            message_id: message.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .comments;
    assert_eq!(
        left.iter().map(|c| c.body.as_str()).collect::<Vec<_>>(),
        ["a real comment"]
    );
    assert!(!after_once.iter().any(|k| k.contains(&troll)), "{after_once:?}");
}

#[tokio::test]
async fn adds_deletes_and_purges_write_their_events_atomically() {
    let backing = Backing::shared().await;
    let app = TestApp::spawn(&backing).await;
    let (author, token) = backing.user(Role::User);
    let (_, moderator) = backing.user(Role::Moderator);
    let message = backing.message(&author);
    let mut ids = Vec::new();
    for i in 0..3 {
        let c = app
            .client()
            .add_comment(authed(add(&message, &format!("c{i}")), &token))
            .await
            .unwrap()
            .into_inner()
            .comment
            .unwrap();
        ids.push(c.id);
    }
    app.client()
        .delete_comment(authed(
            pb::DeleteCommentRequest {
                comment_id: ids[0].clone(),
            },
            &token,
        ))
        .await
        .unwrap();
    for _ in 0..2 {
        app.client()
            .purge_user_comments(authed(
                pb::PurgeUserCommentsRequest {
                    user_id: author.clone(),
                },
                &moderator,
            ))
            .await
            .unwrap();
    }
    let _ = app
        .client()
        .delete_comment(authed(
            pb::DeleteCommentRequest {
                comment_id: ids[0].clone(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        common::outbox(&backing).await,
        [
            "comment_added",
            "comment_added",
            "comment_added",
            "comment_deleted",
            "comment_deleted",
            "comment_deleted"
        ],
        "a second purge and a second delete wrote nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_and_its_total_agree_while_a_purge_deletes_the_comments() {
    let backing = Backing::shared().await;
    let app = TestApp::spawn(&backing).await;
    let (_, moderator) = backing.user(Role::Moderator);
    let (reader, _) = backing.user(Role::User);
    let message = backing.message(&reader);
    // Each round races one atomic purge against back-to-back listings; a
    // listing that read the ids before the purge and the comments after it
    // would count comments it cannot show.
    for round in 0..50 {
        let (troll, token) = backing.user(Role::User);
        for i in 0..10 {
            app.client()
                .add_comment(authed(add(&message, &format!("spam {round}.{i}")), &token))
                .await
                .unwrap();
        }
        let purged = {
            let mut client = app.client();
            let request = authed(pb::PurgeUserCommentsRequest { user_id: troll }, &moderator);
            tokio::spawn(async move { client.purge_user_comments(request).await })
        };
        let mut listings = 0;
        loop {
            let done = purged.is_finished();
            let page = app
                .client()
                .list_comments(pb::ListCommentsRequest {
                    message_id: message.clone(),
                    page_size: 100,
                    page_token: String::new(),
                })
                .await
                .unwrap()
                .into_inner();
            listings += 1;
            assert_eq!(
                page.total_count,
                Some(page.comments.len() as i64),
                "round {round}, listing {listings}: the total counts comments the page does not hold"
            );
            if done {
                break;
            }
        }
        assert_eq!(purged.await.unwrap().unwrap().into_inner().deleted_count, 10);
    }
}

#[tokio::test]
async fn a_redis_holding_the_data_model_before_hash_tags_is_refused_rather_than_hidden() {
    let backing = Backing::shared().await;
    let mut redis = backing.connect();
    let () = redis::AsyncCommands::set(&mut redis, format!("{}schema_version", backing.prefix.prefix()), 1)
        .await
        .unwrap();
    let store = comment_service::store::Store::connect_lazy(
        &backing.address(),
        backing.prefix.prefix(),
        service_kit::store::StoreStatus::always_up(),
    )
    .unwrap();
    let refused = store.prepare().await.unwrap_err();
    assert!(format!("{refused:?}").contains("data model 1"), "{refused:?}");
}
