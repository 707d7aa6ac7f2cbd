//! What message-service does when user- and comment-service misbehave: every
//! reply still comes back within its deadline, with the missing part marked.

mod common;

use std::time::{Duration, Instant};

use chirp_proto::{comment::v1 as cpb, message::v1};
use common::{authed, with_deadline, Mode, Options, TestApp, PEER_TIMEOUT};
use service_kit::auth::Role;

const OK: i32 = v1::PartStatus::Ok as i32;
const UNAVAILABLE: i32 = v1::PartStatus::Unavailable as i32;

/// The caller's deadline: well above the peer timeout, so a reply that
/// arrives at all proves the service bounded its calls.
const CALLER_DEADLINE: Duration = Duration::from_secs(2);

async fn get(app: &TestApp, id: &str) -> (v1::EnrichedMessage, Duration) {
    let started = Instant::now();
    let reply = app
        .v1()
        .get_message(with_deadline(
            v1::GetMessageRequest { message_id: id.into() },
            CALLER_DEADLINE,
        ))
        .await
        .expect("the message comes back whatever the neighbours do")
        .into_inner()
        .message
        .unwrap();
    (reply, started.elapsed())
}

#[tokio::test]
async fn get_message_shows_the_author_and_the_comment_count_and_preview() {
    let app = TestApp::spawn().await;
    let (author, token) = app.user("alice", Role::User);
    let posted = app.post(&token, "hello").await;
    let comments: Vec<cpb::Comment> = (0..5)
        .map(|i| cpb::Comment {
            id: format!("c{i}"),
            message_id: posted.id.clone(),
            author_id: author.clone(),
            body: format!("comment {i}"),
            create_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000 + i,
                nanos: 0,
            }),
        })
        .collect();
    app.comments
        .comments
        .lock()
        .unwrap()
        .insert(posted.id.clone(), comments);

    let (reply, _) = get(&app, &posted.id).await;
    let author_part = reply.author.unwrap();
    assert_eq!((author_part.status, author_part.username.as_str()), (OK, "alice"));
    let comments = reply.comments.unwrap();
    assert_eq!((comments.status, comments.count), (OK, 5));
    assert_eq!(
        comments.preview.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        ["c0", "c1", "c2"]
    );
    assert_eq!(comments.preview[0].create_time, 1_700_000_000);
    assert_eq!(
        (
            app.comments.behaviour.calls("ListComments"),
            app.comments.behaviour.calls("CountComments")
        ),
        (1, 0),
        "the count comes with the preview, in one call"
    );

    // A comment-service that predates the total: the count is asked for.
    app.comments.behaviour.reset_calls();
    app.comments
        .without_total
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (reply, _) = get(&app, &posted.id).await;
    assert_eq!(reply.comments.unwrap().count, 5);
    assert_eq!(
        (
            app.comments.behaviour.calls("ListComments"),
            app.comments.behaviour.calls("CountComments")
        ),
        (1, 1)
    );
}

#[tokio::test]
async fn a_failing_comment_peer_marks_only_the_comments_unavailable() {
    let app = TestApp::spawn().await;
    let (_, token) = app.user("alice", Role::User);
    let posted = app.post(&token, "hello").await;
    app.comments.behaviour.set(Mode::Fail);
    let (reply, _) = get(&app, &posted.id).await;
    assert_eq!(reply.message.unwrap().body, "hello");
    assert_eq!(reply.author.unwrap().status, OK);
    let comments = reply.comments.unwrap();
    assert_eq!(
        (comments.status, comments.count, comments.preview.len()),
        (UNAVAILABLE, 0, 0)
    );
}

#[tokio::test]
async fn a_hanging_comment_peer_costs_one_peer_deadline_and_marks_comments_unavailable() {
    let app = TestApp::spawn().await;
    let (_, token) = app.user("alice", Role::User);
    let posted = app.post(&token, "hello").await;
    app.comments.behaviour.set(Mode::Hang);
    let (reply, elapsed) = get(&app, &posted.id).await;
    assert_eq!(reply.comments.unwrap().status, UNAVAILABLE);
    assert_eq!(reply.author.unwrap().status, OK);
    // Both comment calls and the author call run at once: one peer deadline,
    // plus a margin for a loaded machine.
    assert!(elapsed < PEER_TIMEOUT + Duration::from_millis(700), "took {elapsed:?}");
}

#[tokio::test]
async fn a_failing_or_hanging_user_peer_marks_only_the_author_unavailable() {
    let app = TestApp::spawn().await;
    let (_, token) = app.user("alice", Role::User);
    let posted = app.post(&token, "hello").await;
    for mode in [Mode::Fail, Mode::Hang] {
        app.users.behaviour.set(mode);
        let (reply, elapsed) = get(&app, &posted.id).await;
        let author = reply.author.unwrap();
        assert_eq!((author.status, author.username.as_str()), (UNAVAILABLE, ""), "{mode:?}");
        assert_eq!(reply.comments.unwrap().status, OK, "{mode:?}");
        assert_eq!(reply.message.unwrap().id, posted.id);
        assert!(
            elapsed < PEER_TIMEOUT + Duration::from_millis(700),
            "{mode:?} took {elapsed:?}"
        );
    }
}

#[tokio::test]
async fn a_page_of_twenty_messages_makes_one_call_per_peer() {
    let app = TestApp::spawn().await;
    let (me, token) = app.user("alice", Role::User);
    let (friend, friend_token) = app.user("bob", Role::User);
    app.users.following.lock().unwrap().insert(me.clone(), vec![friend]);
    for i in 0..10 {
        app.post(&token, &format!("mine {i}")).await;
        app.post(&friend_token, &format!("theirs {i}")).await;
    }

    app.users.behaviour.reset_calls();
    app.comments.behaviour.reset_calls();
    let page = app
        .v1()
        .list_user_messages(v1::ListUserMessagesRequest {
            user_id: me.clone(),
            page_size: 20,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.messages.len(), 10);
    assert!(page.messages.iter().all(|m| m.author.as_ref().unwrap().status == OK));
    assert_eq!(app.users.behaviour.calls("BatchGetUsers"), 1);
    assert_eq!(app.comments.behaviour.calls("CountComments"), 1);
    assert_eq!(
        app.comments.behaviour.calls("ListComments"),
        0,
        "pages carry counts, not previews"
    );

    app.users.behaviour.reset_calls();
    app.comments.behaviour.reset_calls();
    let timeline = app
        .v1()
        .home_timeline(authed(
            v1::HomeTimelineRequest {
                page_size: 20,
                page_token: String::new(),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(timeline.messages.len(), 20);
    assert!(!timeline.degraded);
    assert_eq!(app.users.behaviour.calls("ListFollowing"), 1);
    assert_eq!(app.users.behaviour.calls("BatchGetUsers"), 1, "two authors, one call");
    assert_eq!(app.comments.behaviour.calls("CountComments"), 1);
}

#[tokio::test]
async fn a_page_with_both_peers_down_still_lists_every_message_marked_unavailable() {
    let app = TestApp::spawn().await;
    let (me, token) = app.user("alice", Role::User);
    for i in 0..3 {
        app.post(&token, &format!("m{i}")).await;
    }
    app.users.behaviour.set(Mode::Hang);
    app.comments.behaviour.set(Mode::Fail);
    let page = app
        .v1()
        .list_user_messages(with_deadline(
            v1::ListUserMessagesRequest {
                user_id: me,
                page_size: 20,
                page_token: String::new(),
            },
            CALLER_DEADLINE,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.messages.len(), 3);
    for message in page.messages {
        assert_eq!(message.author.unwrap().status, UNAVAILABLE);
        assert_eq!(message.comments.unwrap().status, UNAVAILABLE);
    }
}

#[tokio::test]
async fn the_timeline_falls_back_to_the_last_known_following_list_and_says_so() {
    let app = TestApp::spawn_with(Options {
        following_cache_ttl: "0s",
        ..Options::default()
    })
    .await;
    let (me, token) = app.user("alice", Role::User);
    let (friend, friend_token) = app.user("bob", Role::User);
    app.users.following.lock().unwrap().insert(me.clone(), vec![friend]);
    app.post(&token, "mine").await;
    app.post(&friend_token, "theirs").await;
    let timeline = |app: &TestApp| {
        let mut client = app.v1();
        let request = authed(
            v1::HomeTimelineRequest {
                page_size: 20,
                page_token: String::new(),
            },
            &token,
        );
        async move { client.home_timeline(request).await.unwrap().into_inner() }
    };
    let fresh = timeline(&app).await;
    assert_eq!((fresh.messages.len(), fresh.degraded), (2, false));

    app.users.behaviour.set(Mode::Fail);
    let stale = timeline(&app).await;
    assert_eq!(stale.messages.len(), 2, "the cached list still brings bob's message");
    assert!(stale.degraded);
}

#[tokio::test]
async fn the_following_cache_is_bounded_by_the_ids_it_holds_not_by_its_lists() {
    let app = TestApp::spawn_with(Options {
        following_cache_ttl: "0s",
        following_cache_max_ids: 10,
        ..Options::default()
    })
    .await;
    let (bob, bob_token) = app.user("bob", Role::User);
    app.post(&bob_token, "bob's").await;
    // Alice follows bob and 19 others: her list alone outweighs the cache.
    let (alice, alice_token) = app.user("alice", Role::User);
    let mut hers = vec![bob.clone()];
    hers.extend((0..19).map(|_| uuid::Uuid::new_v4().to_string()));
    let (carol, carol_token) = app.user("carol", Role::User);
    {
        let mut following = app.users.following.lock().unwrap();
        following.insert(alice, hers);
        following.insert(carol, vec![bob]);
    }
    let timeline = |token: &str| {
        let mut client = app.v1();
        let request = authed(v1::HomeTimelineRequest::default(), token);
        async move { client.home_timeline(request).await.unwrap().into_inner() }
    };
    for token in [&alice_token, &carol_token] {
        assert_eq!(timeline(token).await.messages.len(), 1, "bob's message, fresh");
    }
    // Let the cache settle its weights.
    tokio::time::sleep(Duration::from_millis(500)).await;
    timeline(&carol_token).await;

    app.users.behaviour.set(Mode::Fail);
    let carols = timeline(&carol_token).await;
    assert_eq!(
        (carols.messages.len(), carols.degraded),
        (1, true),
        "carol's small list was kept"
    );
    let alices = timeline(&alice_token).await;
    assert_eq!(
        (alices.messages.len(), alices.degraded),
        (0, true),
        "alice's list was too big to keep"
    );
}

#[tokio::test]
async fn without_any_following_list_the_timeline_shows_own_messages_and_says_so() {
    let app = TestApp::spawn().await;
    let (me, token) = app.user("alice", Role::User);
    let (friend, friend_token) = app.user("bob", Role::User);
    app.users.following.lock().unwrap().insert(me, vec![friend]);
    app.post(&token, "mine").await;
    app.post(&friend_token, "theirs").await;
    app.users.behaviour.set(Mode::Hang);
    let started = Instant::now();
    let timeline = app
        .v1()
        .home_timeline(authed(
            v1::HomeTimelineRequest {
                page_size: 20,
                page_token: String::new(),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(timeline.degraded);
    let bodies: Vec<String> = timeline.messages.into_iter().map(|m| m.message.unwrap().body).collect();
    assert_eq!(bodies, ["mine"]);
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
}

#[tokio::test]
async fn tokens_verify_with_keys_fetched_from_user_service_and_cached_through_its_outage() {
    let app = TestApp::spawn_with(Options {
        keys_from_user_service: true,
        ..Options::default()
    })
    .await;
    let (_, token) = app.user("alice", Role::User);
    app.post(&token, "verified with fetched keys").await;
    app.users.behaviour.set(Mode::Fail);
    app.post(&token, "and still while user-service is down").await;
    assert_eq!(
        app.users.behaviour.calls("GetPublicKeys"),
        1,
        "fetched once, then cached"
    );
}
