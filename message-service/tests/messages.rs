//! message-service's own behaviour: v1 and v2 over one collection, references
//! not copies, validation, permissions, paging.

mod common;

use chirp_proto::message::{v1, v2};
use common::{authed, violated_fields, TestApp};
use mongodb::bson::{doc, DateTime as BsonDateTime};
use service_kit::auth::Role;
use tonic::Code;

#[tokio::test]
async fn a_message_posted_through_v1_reads_back_through_v2_at_the_same_instant() {
    let app = TestApp::spawn().await;
    let (author, token) = app.user("alice", Role::User);
    let posted = app.post(&token, "  hello, world  ").await;
    assert_eq!(posted.body, "hello, world", "bodies are trimmed");
    assert_eq!(posted.author_id, author, "the author comes from the token");

    let v1_read = app
        .v1()
        .get_message(v1::GetMessageRequest {
            message_id: posted.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .message
        .unwrap();
    let v2_read = app
        .v2()
        .get_message(v2::GetMessageRequest {
            message_id: posted.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .message
        .unwrap();
    let (m1, m2) = (v1_read.message.unwrap(), v2_read.message.unwrap());
    assert_eq!((&m1.id, &m1.body, &m1.author_id), (&m2.id, &m2.body, &m2.author_id));
    assert_eq!(m1.create_time, posted.create_time);

    assert!(m2.create_time.ends_with('Z'), "UTC: {}", m2.create_time);
    let parsed = chrono::DateTime::parse_from_rfc3339(&m2.create_time).expect("RFC 3339");
    assert_eq!(parsed.offset().local_minus_utc(), 0);
    assert_eq!(
        parsed.timestamp(),
        m1.create_time,
        "v1 seconds and v2 string are one instant"
    );

    let now = chrono::Utc::now().timestamp();
    assert!((now - m1.create_time).abs() < 60);
}

#[tokio::test]
async fn the_stored_document_holds_the_author_id_and_nothing_about_the_author() {
    let app = TestApp::spawn().await;
    let (author, token) = app.user("alice", Role::Admin);
    let posted = app.post(&token, "references, not copies").await;
    let stored = app
        .collection()
        .await
        .find_one(doc! { "_id": &posted.id })
        .await
        .unwrap()
        .expect("the document");
    let mut keys: Vec<&str> = stored.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["_id", "author_id", "body", "created_at", "hidden"]);
    assert_eq!(stored.get_str("author_id").unwrap(), author);
    assert!(stored.get_datetime("created_at").is_ok(), "stored as a BSON date");
    let text = format!("{stored:?}");
    assert!(!text.contains("alice") && !text.contains("ALICE") && !text.to_lowercase().contains("admin"));

    let copied = app
        .collection()
        .await
        .insert_one(doc! {
            "_id": "x", "author_id": &author, "body": "b", "created_at": BsonDateTime::now(), "hidden": false,
            "author_name": "alice",
        })
        .await;
    assert!(
        copied.is_err(),
        "the collection validator refuses a copy of the author's name"
    );
}

#[tokio::test]
async fn every_invalid_request_is_refused_with_its_fields_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let (user, token) = app.user("alice", Role::User);
    app.post(&token, "one valid message").await;
    let before = app.stored_count().await;

    for (body, why) in [
        ("", "empty"),
        ("   ", "blank"),
        (&"x".repeat(281) as &str, "281 characters"),
        ("bell\u{7}", "a control character"),
        ("\u{1b}[31mred", "an escape sequence"),
    ] {
        let status = app
            .v1()
            .post_message(authed(v1::PostMessageRequest { body: body.into() }, &token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{why}");
        assert_eq!(violated_fields(&status), ["body"], "{why}");
    }
    let ok = "é".repeat(280);
    app.post(&token, &ok).await;

    for id in ["", "nope", "12345678-1234-1234-1234-12345678901"] {
        let status = app
            .v1()
            .get_message(v1::GetMessageRequest { message_id: id.into() })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["message_id"], "{id:?}");
        let status = app
            .v2()
            .delete_message(authed(v2::DeleteMessageRequest { message_id: id.into() }, &token))
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["message_id"], "{id:?}");
    }
    for (user_id, size, page_token, fields) in [
        ("bad", 0, "", vec!["user_id"]),
        (user.as_str(), 101, "", vec!["page_size"]),
        (user.as_str(), -5, "", vec!["page_size"]),
        (user.as_str(), 10, "not-a-token", vec!["page_token"]),
        (user.as_str(), 10, "YzE6MTI6YWJj", vec!["page_token"]),
        ("bad", 1000, "%%", vec!["user_id", "page_size", "page_token"]),
    ] {
        let status = app
            .v1()
            .list_user_messages(v1::ListUserMessagesRequest {
                user_id: user_id.into(),
                page_size: size,
                page_token: page_token.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&status), fields);
    }
    let status = app
        .v2()
        .home_timeline(authed(
            v2::HomeTimelineRequest {
                page_size: 500,
                page_token: String::new(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["page_size"]);
    assert_eq!(
        app.stored_count().await,
        before + 1,
        "only the valid 280-character message was added"
    );
}

#[tokio::test]
async fn posting_needs_a_valid_token() {
    let app = TestApp::spawn().await;
    let status = app
        .v1()
        .post_message(v1::PostMessageRequest {
            body: "anonymous".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let stranger = service_kit::auth::TokenSigner::generate(std::time::Duration::from_secs(60)).unwrap();
    let (token, _) = stranger
        .issue(
            service_kit::auth::Caller {
                user_id: uuid::Uuid::new_v4(),
                role: Role::Admin,
            },
            chrono::Utc::now().timestamp(),
        )
        .unwrap();
    let status = app
        .v1()
        .post_message(authed(v1::PostMessageRequest { body: "forged".into() }, &token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(app.stored_count().await, 0);
}

#[tokio::test]
async fn authors_and_moderators_delete_messages_and_nobody_else_does() {
    let app = TestApp::spawn().await;
    let (_, alice) = app.user("alice", Role::User);
    let (_, bob) = app.user("bob", Role::User);
    let (_, moderator) = app.user("moe", Role::Moderator);
    let first = app.post(&alice, "first").await;
    let second = app.post(&alice, "second").await;

    let status = app
        .v1()
        .delete_message(authed(
            v1::DeleteMessageRequest {
                message_id: first.id.clone(),
            },
            &bob,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    app.v1()
        .delete_message(authed(
            v1::DeleteMessageRequest {
                message_id: first.id.clone(),
            },
            &alice,
        ))
        .await
        .unwrap();
    app.v2()
        .delete_message(authed(
            v2::DeleteMessageRequest {
                message_id: second.id.clone(),
            },
            &moderator,
        ))
        .await
        .unwrap();
    for id in [first.id, second.id] {
        let status = app
            .v1()
            .get_message(v1::GetMessageRequest { message_id: id })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }
}

#[tokio::test]
async fn hiding_a_users_messages_is_for_moderators_and_idempotent() {
    let app = TestApp::spawn().await;
    let (troll, troll_token) = app.user("troll", Role::User);
    let (_, moderator) = app.user("moe", Role::Moderator);
    let message = app.post(&troll_token, "spam").await;
    app.post(&troll_token, "more spam").await;

    let hide = |token: &str, hidden: bool| {
        authed(
            v1::SetUserMessagesHiddenRequest {
                user_id: troll.clone(),
                hidden,
            },
            token,
        )
    };
    let status = app
        .v1()
        .set_user_messages_hidden(hide(&troll_token, true))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let changed = app
        .v1()
        .set_user_messages_hidden(hide(&moderator, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(changed.changed_count, 2);
    let again = app
        .v1()
        .set_user_messages_hidden(hide(&moderator, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.changed_count, 0, "hiding twice is hiding once");

    let status = app
        .v1()
        .get_message(v1::GetMessageRequest {
            message_id: message.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let listed = app
        .v1()
        .list_user_messages(v1::ListUserMessagesRequest {
            user_id: troll.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.messages.is_empty());

    app.v1()
        .set_user_messages_hidden(hide(&moderator, false))
        .await
        .unwrap();
    app.v1()
        .get_message(v1::GetMessageRequest { message_id: message.id })
        .await
        .expect("shown again");
}

#[tokio::test]
async fn paging_over_equal_timestamps_returns_every_message_exactly_once() {
    let app = TestApp::spawn().await;
    let (me, token) = app.user("alice", Role::User);
    let (friend, _) = app.user("bob", Role::User);
    app.users
        .following
        .lock()
        .unwrap()
        .insert(me.clone(), vec![friend.clone()]);

    // 25 messages in the same millisecond, from both authors, written with
    // the driver as a burst would leave them.
    let at = BsonDateTime::from_millis(chrono::Utc::now().timestamp_millis());
    let mut expected = Vec::new();
    let collection = app.collection().await;
    for i in 0..25 {
        let id = uuid::Uuid::now_v7().to_string();
        let author = if i % 2 == 0 { &me } else { &friend };
        collection
            .insert_one(
                doc! { "_id": &id, "author_id": author, "body": format!("tie {i}"), "created_at": at, "hidden": false },
            )
            .await
            .unwrap();
        expected.push(id);
    }
    expected.sort();
    expected.reverse();

    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = app
            .v2()
            .home_timeline(authed(
                v2::HomeTimelineRequest {
                    page_size: 10,
                    page_token: page_token.clone(),
                },
                &token,
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(!page.degraded);
        seen.extend(page.messages.into_iter().map(|m| m.message.unwrap().id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen, expected, "each message once, newest id first among equal times");
}

#[tokio::test]
async fn a_users_messages_come_newest_first_in_pages() {
    let app = TestApp::spawn().await;
    let (me, token) = app.user("alice", Role::User);
    let mut posted = Vec::new();
    for i in 0..5 {
        posted.push(app.post(&token, &format!("message {i}")).await.id);
    }
    posted.reverse();
    let first = app
        .v1()
        .list_user_messages(v1::ListUserMessagesRequest {
            user_id: me.clone(),
            page_size: 3,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let second = app
        .v1()
        .list_user_messages(v1::ListUserMessagesRequest {
            user_id: me,
            page_size: 3,
            page_token: first.next_page_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<String> = first
        .messages
        .into_iter()
        .chain(second.messages)
        .map(|m| m.message.unwrap().id)
        .collect();
    assert_eq!(ids, posted);
    assert!(second.next_page_token.is_empty());
}

#[tokio::test]
async fn check_message_tells_other_services_whether_a_visible_message_exists() {
    let app = TestApp::spawn().await;
    let (author, token) = app.user("alice", Role::User);
    let posted = app.post(&token, "check me").await;
    let check = |id: String| {
        let mut client = app.v1();
        async move {
            client
                .check_message(v1::CheckMessageRequest { message_id: id })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let found = check(posted.id.clone()).await;
    assert!(found.exists);
    assert_eq!(found.author_id, author);
    let missing = check(uuid::Uuid::now_v7().to_string()).await;
    assert!(!missing.exists && missing.author_id.is_empty());
    app.v1()
        .delete_message(authed(
            v1::DeleteMessageRequest {
                message_id: posted.id.clone(),
            },
            &token,
        ))
        .await
        .unwrap();
    assert!(!check(posted.id).await.exists);
}

#[tokio::test]
async fn posts_deletes_and_hides_write_their_events_in_the_same_transaction() {
    let app = TestApp::spawn().await;
    let (troll, token) = app.user("troll", Role::User);
    let (_, moderator) = app.user("moe", Role::Moderator);
    let first = app.post(&token, "one").await;
    app.post(&token, "two").await;
    app.v1()
        .delete_message(authed(v1::DeleteMessageRequest { message_id: first.id }, &token))
        .await
        .unwrap();
    for _ in 0..2 {
        app.v1()
            .set_user_messages_hidden(authed(
                v1::SetUserMessagesHiddenRequest {
                    user_id: troll.clone(),
                    hidden: true,
                },
                &moderator,
            ))
            .await
            .unwrap();
    }
    // One row per destination: every event for analytics, deletions and
    // hidings for comment-service too (ordered by destination, then time).
    assert_eq!(
        app.outbox().await,
        [
            "message_posted",
            "message_posted",
            "message_deleted",
            "message_hidden",
            "message_deleted",
            "message_hidden"
        ],
        "hiding twice wrote one event for the one message left"
    );
    let status = app
        .v1()
        .post_message(authed(v1::PostMessageRequest { body: String::new() }, &token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(app.outbox().await.len(), 6, "a refused post writes no event");
}
