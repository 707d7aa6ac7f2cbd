//! Decisions made in user-service's store (a ban, a deletion, a demotion, a
//! password change) take effect in every other service's store: each one
//! refuses the user's earlier tokens within seconds, and an erasure removes
//! the user's data from MongoDB, Redis and SQLite, read here directly, store
//! by store.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use chirp_mesh_tests::{Mesh, Service, ADMIN, PASSWORD};
use chirp_proto::{analytics::v1 as apb, comment::v1 as cpb, message::v1 as mpb, user::v1 as upb};
use futures::StreamExt as _;
use test_support::grpc::authed;
use tonic::{Code, Status};

/// How long a decision may take to reach every service while the mesh is up.
const WHILE_UP: Duration = Duration::from_secs(2);
/// How long a service that was down during a decision may take, once back.
const AFTER_RESTART: Duration = Duration::from_secs(5);

async fn post(mesh: &Mesh, token: &str, body: &str) -> Result<String, Status> {
    let reply = mesh
        .messages_v1()
        .post_message(authed(mpb::PostMessageRequest { body: body.into() }, token))
        .await?;
    Ok(reply.into_inner().message.unwrap_or_default().id)
}

async fn comment(mesh: &Mesh, token: &str, message_id: &str) -> Result<(), Status> {
    mesh.comments()
        .add_comment(authed(
            cpb::AddCommentRequest {
                message_id: message_id.into(),
                body: "hello".into(),
            },
            token,
        ))
        .await
        .map(|_| ())
}

async fn stats(mesh: &Mesh, token: &str, user_id: &str) -> Result<apb::GetUserStatsResponse, Status> {
    Ok(mesh
        .analytics()
        .get_user_stats(authed(
            apb::GetUserStatsRequest {
                user_id: user_id.into(),
            },
            token,
        ))
        .await?
        .into_inner())
}

async fn follow(mesh: &Mesh, token: &str, whom: &str) -> Result<(), Status> {
    mesh.users()
        .follow(authed(upb::FollowRequest { user_id: whom.into() }, token))
        .await
        .map(|_| ())
}

async fn listed_comments(mesh: &Mesh, message_id: &str) -> usize {
    let reply = mesh
        .comments()
        .list_comments(cpb::ListCommentsRequest {
            message_id: message_id.into(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .expect("ListComments")
        .into_inner();
    // Hidden or not, the total agrees with what is listed (all fit a page).
    assert_eq!(reply.total_count, Some(reply.comments.len() as i64));
    reply.comments.len()
}

/// Calls `probe` until it is refused with `code`, and says how long after
/// `since` that was. Another refusal, or still being accepted after `limit`,
/// fails the test.
async fn refused_after<T, F, Fut>(what: &str, code: Code, since: Instant, limit: Duration, mut probe: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    loop {
        match probe().await {
            Err(status) if status.code() == code => return since.elapsed(),
            Err(status) => panic!("{what}: refused with {status:?}, expected {code:?}"),
            Ok(_) => assert!(
                since.elapsed() < limit,
                "{what}: still accepted {limit:?} after the decision"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `check` holds, at most `limit`; how long it took.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_voids_the_users_earlier_tokens_in_every_service_within_two_seconds() {
    let mesh = Mesh::start().await;
    let (bob, token) = mesh.user("banned_bob").await;
    let (olga, olga_token) = mesh.user("olga").await;
    let bobs = post(&mesh, &token, "before the ban").await.expect("bob posts");
    let olgas = post(&mesh, &olga_token, "olga's").await.expect("olga posts");
    comment(&mesh, &token, &olgas).await.expect("bob comments");
    comment(&mesh, &olga_token, &bobs)
        .await
        .expect("olga comments on bob's");
    stats(&mesh, &token, &bob).await.expect("bob reads stats");

    let admin = mesh.login(ADMIN).await;
    mesh.users()
        .ban_user(authed(
            upb::BanUserRequest {
                user_id: bob.clone(),
                reason: "spam".into(),
            },
            &admin,
        ))
        .await
        .expect("the admin bans bob");
    let banned = Instant::now();

    let denied = Code::PermissionDenied;
    let user = refused_after("Follow", denied, banned, WHILE_UP, || follow(&mesh, &token, &olga)).await;
    let message = refused_after("PostMessage", denied, banned, WHILE_UP, || post(&mesh, &token, "after")).await;
    let comment_ = refused_after("AddComment", denied, banned, WHILE_UP, || {
        comment(&mesh, &token, &olgas)
    })
    .await;
    let analytics = refused_after("GetUserStats", denied, banned, WHILE_UP, || stats(&mesh, &token, &bob)).await;
    println!(
        "ban: the earlier token refused by user-service after {} ms, message-service {} ms, \
         comment-service {} ms, analytics-service {} ms",
        ms(user),
        ms(message),
        ms(comment_),
        ms(analytics)
    );
    let login = mesh
        .users()
        .login(upb::LoginRequest {
            username: "banned_bob".into(),
            password: PASSWORD.into(),
        })
        .await;
    assert_eq!(login.unwrap_err().code(), denied, "a banned user cannot log in");

    // Bob's messages are hidden, so their comments are no longer listed;
    // bob's own comments are purged.
    let hidden = eventually("bob's message's comments unlisted", WHILE_UP, || async {
        listed_comments(&mesh, &bobs).await == 0
    })
    .await;
    let purged = eventually("bob's comments purged", WHILE_UP, || async {
        listed_comments(&mesh, &olgas).await == 0
    })
    .await;
    println!(
        "ban: comments under bob's message unlisted after {} ms, bob's comments purged after {} ms",
        ms(hidden),
        ms(purged)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_was_down_during_a_ban_refuses_the_token_within_five_seconds_of_coming_back() {
    let mut mesh = Mesh::start().await;
    let (ann, token) = mesh.user("absent_ann").await;
    post(&mesh, &token, "before").await.expect("ann posts");

    mesh.stop(Service::Message).await;
    let admin = mesh.login(ADMIN).await;
    mesh.users()
        .ban_user(authed(
            upb::BanUserRequest {
                user_id: ann.clone(),
                reason: String::new(),
            },
            &admin,
        ))
        .await
        .expect("the ban while message-service is down");
    let banned = Instant::now();
    let elsewhere = refused_after("GetUserStats", Code::PermissionDenied, banned, WHILE_UP, || {
        stats(&mesh, &token, &ann)
    })
    .await;

    let back = Instant::now();
    mesh.restart(Service::Message).await;
    let serving = back.elapsed();
    // It caught up with user-service before turning SERVING: the very first
    // post after that is refused, not one after the relay's next retry.
    let first = post(&mesh, &token, "after").await;
    assert_eq!(
        first.map(|_| ()).unwrap_err().code(),
        Code::PermissionDenied,
        "the first post once SERVING"
    );
    let refused = refused_after("PostMessage", Code::PermissionDenied, back, AFTER_RESTART, || {
        post(&mesh, &token, "after")
    })
    .await;
    println!(
        "ban while message-service was down: analytics-service refused after {} ms; \
         message-service SERVING {} ms after its start, refusing {} ms after its start",
        ms(elsewhere),
        ms(serving),
        ms(refused)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_admin_loses_admin_powers_everywhere() {
    let mesh = Mesh::start().await;
    let root = mesh.login(ADMIN).await;
    let (carol, _) = mesh.user("carol").await;
    let (dave, dave_token) = mesh.user("dave").await;
    let set_role = |token: String, user_id: String, role: upb::Role| {
        let mut users = mesh.users();
        async move {
            users
                .set_role(authed(
                    upb::SetRoleRequest {
                        user_id,
                        role: role.into(),
                    },
                    &token,
                ))
                .await
                .map(|_| ())
        }
    };
    set_role(root.clone(), carol.clone(), upb::Role::Admin)
        .await
        .expect("carol made admin");
    let carol_admin = mesh.login("carol").await;
    set_role(carol_admin.clone(), dave.clone(), upb::Role::User)
        .await
        .expect("an admin may set roles");
    let daves = post(&mesh, &dave_token, "dave's").await.expect("dave posts");

    set_role(root, carol.clone(), upb::Role::User)
        .await
        .expect("carol demoted");
    let demoted = Instant::now();
    let revoked = Code::Unauthenticated;
    let user = refused_after("SetRole", revoked, demoted, WHILE_UP, || {
        set_role(carol_admin.clone(), dave.clone(), upb::Role::Moderator)
    })
    .await;
    // A message that does not exist: while the token is still taken, the
    // answer is NOT_FOUND, and nothing of dave's is at risk in the meantime.
    let nowhere = "0190b3a6-8f0e-7c3a-9c1d-5f2e8a7b6c4d".to_owned();
    let message = refused_after("DeleteMessage", revoked, demoted, WHILE_UP, || {
        let mut messages = mesh.messages_v1();
        let request = authed(
            mpb::DeleteMessageRequest {
                message_id: nowhere.clone(),
            },
            &carol_admin,
        );
        async move {
            match messages.delete_message(request).await {
                Err(status) if status.code() == Code::NotFound => Ok(()),
                other => other.map(|_| ()),
            }
        }
    })
    .await;
    let comment_ = refused_after("PurgeUserComments", revoked, demoted, WHILE_UP, || {
        let mut comments = mesh.comments();
        let request = authed(cpb::PurgeUserCommentsRequest { user_id: dave.clone() }, &carol_admin);
        async move { comments.purge_user_comments(request).await }
    })
    .await;
    println!(
        "demotion: the old admin token refused by user-service after {} ms, message-service {} ms, \
         comment-service {} ms",
        ms(user),
        ms(message),
        ms(comment_)
    );

    // Logged in again, carol is a user: admin calls are denied, not revoked.
    let carol_user = mesh.login("carol").await;
    let status = set_role(carol_user, dave.clone(), upb::Role::Moderator)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        mesh.messages_v1()
            .get_message(mpb::GetMessageRequest { message_id: daves })
            .await
            .is_ok(),
        "dave's message was never deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_change_voids_earlier_tokens_everywhere_and_the_new_one_works() {
    let mesh = Mesh::start().await;
    let (erin, old) = mesh.user("erin").await;
    let reply = mesh
        .users()
        .change_password(authed(
            upb::ChangePasswordRequest {
                current_password: PASSWORD.into(),
                new_password: "a much better passphrase".into(),
            },
            &old,
        ))
        .await
        .expect("the password changes")
        .into_inner();
    let changed = Instant::now();
    let revoked = Code::Unauthenticated;
    let message = refused_after("PostMessage", revoked, changed, WHILE_UP, || post(&mesh, &old, "old")).await;
    let analytics = refused_after("GetUserStats", revoked, changed, WHILE_UP, || stats(&mesh, &old, &erin)).await;
    println!(
        "password change: the old token refused by message-service after {} ms, analytics-service {} ms",
        ms(message),
        ms(analytics)
    );
    let fresh = reply.access_token;
    let id = post(&mesh, &fresh, "new").await.expect("the new token posts");
    comment(&mesh, &fresh, &id).await.expect("and comments");
}

/// What the stores hold of one user, read directly, not through the services.
#[derive(Debug, PartialEq, Eq)]
struct Held {
    /// MongoDB: messages they wrote.
    messages: u64,
    /// Redis: comments they wrote.
    comments_written: u64,
    /// Redis: comments anyone wrote under their messages.
    comments_received: u64,
    /// SQLite: their row of aggregates.
    stats_rows: u64,
}

async fn held(mesh: &Mesh, user_id: &str) -> Held {
    use mongodb::bson::{doc, Document};
    use redis::AsyncCommands as _;
    use sqlx::Connection as _;

    let (uri, database) = mesh.message_store();
    let mongo = mongodb::Client::with_uri_str(uri).await.expect("MongoDB");
    let messages = mongo
        .database(database)
        .collection::<Document>("messages")
        .count_documents(doc! { "author_id": user_id })
        .await
        .expect("a count of messages");

    let (url, prefix) = mesh.comment_store();
    let mut redis = redis::Client::open(url)
        .expect("a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis");
    let mut keys: Vec<String> = Vec::new();
    {
        let mut scan = redis.scan_match::<_, String>(format!("{prefix}*")).await.expect("SCAN");
        while let Some(key) = scan.next().await {
            let key = key.expect("a key");
            // The comments, whichever group they are in.
            if key.contains("}c:") {
                keys.push(key);
            }
        }
    }
    let (mut comments_written, mut comments_received) = (0, 0);
    for chunk in keys.chunks(500) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("GET").arg(key);
        }
        let stored: Vec<Option<String>> = pipe.query_async(&mut redis).await.expect("GET");
        for (key, stored) in chunk.iter().zip(stored) {
            let Some(stored) = stored else { continue };
            let id = key
                .rsplit_once("}c:")
                .and_then(|(_, id)| uuid::Uuid::parse_str(id).ok())
                .expect("a comment id");
            let comment = comment_service::store::value::decode(id.into(), &stored).expect("a stored comment");
            comments_written += u64::from(comment.author_id.to_string() == user_id);
            comments_received += u64::from(comment.message_author_id.to_string() == user_id);
        }
    }

    let mut sqlite = sqlx::SqliteConnection::connect(&mesh.analytics_url())
        .await
        .expect("SQLite");
    let stats_rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM user_stats WHERE user_id = ?")
        .bind(user_id)
        .fetch_one(&mut sqlite)
        .await
        .expect("a count of stats rows");
    Held {
        messages,
        comments_written,
        comments_received,
        stats_rows: u64::try_from(stats_rows).unwrap_or_default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_user_with_a_thousand_messages_and_comments_erases_them_from_every_store() {
    const N: usize = 1_000;
    const RECEIVED: usize = 100;
    let mesh = Mesh::start().await;
    let (dan, token) = mesh.user("doomed_dan").await;
    let (olga, olga_token) = mesh.user("olga").await;
    let olgas = post(&mesh, &olga_token, "olga's").await.expect("olga posts");

    let started = Instant::now();
    let dans: Vec<String> = futures::stream::iter(0..N)
        .map(|i| {
            let (mesh, token) = (&mesh, &token);
            async move { post(mesh, token, &format!("message {i}")).await.expect("dan posts") }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    futures::stream::iter(0..N)
        .for_each_concurrent(16, |_| async {
            comment(&mesh, &token, &olgas).await.expect("dan comments");
        })
        .await;
    futures::stream::iter(dans.iter().take(RECEIVED))
        .for_each_concurrent(16, |id| {
            let (mesh, olga_token) = (&mesh, &olga_token);
            async move { comment(mesh, olga_token, id).await.expect("olga comments on dan's") }
        })
        .await;
    eventually("analytics counts dan's activity", Duration::from_secs(30), || async {
        stats(&mesh, &olga_token, &dan)
            .await
            .is_ok_and(|s| s.message_count == N as i64 && s.comment_count == N as i64)
    })
    .await;
    let before = held(&mesh, &dan).await;
    assert_eq!(
        before,
        Held {
            messages: N as u64,
            comments_written: N as u64,
            comments_received: RECEIVED as u64,
            stats_rows: 1
        }
    );
    println!("erasure: before {before:?} (written in {} ms)", ms(started.elapsed()));

    mesh.users()
        .delete_user(authed(upb::DeleteUserRequest { user_id: dan.clone() }, &token))
        .await
        .expect("dan deletes his account");
    let deleted = Instant::now();
    let refused = refused_after("PostMessage", Code::Unauthenticated, deleted, WHILE_UP, || {
        post(&mesh, &token, "after")
    })
    .await;
    let gone = Held {
        messages: 0,
        comments_written: 0,
        comments_received: 0,
        stats_rows: 0,
    };
    let mut after = held(&mesh, &dan).await;
    while after != gone {
        assert!(
            deleted.elapsed() < Duration::from_secs(60),
            "erasure unfinished after 60 s: {after:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = held(&mesh, &dan).await;
    }
    println!(
        "erasure: token refused after {} ms; after {} ms the stores hold {after:?}",
        ms(refused),
        ms(deleted.elapsed())
    );

    // Olga's message is hers: it stays, without dan's comments.
    assert_eq!(held(&mesh, &olga).await.messages, 1);
    assert_eq!(listed_comments(&mesh, &olgas).await, 0);
    // The username is free again (documented), for a new account.
    let (again, _) = mesh.user("doomed_dan").await;
    assert_ne!(again, dan);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_message_takes_its_comments_with_it() {
    let mesh = Mesh::start().await;
    let (_, author) = mesh.user("poster").await;
    let (_, reader) = mesh.user("reader").await;
    let message = post(&mesh, &author, "short-lived").await.expect("posts");
    for _ in 0..3 {
        comment(&mesh, &reader, &message).await.expect("comments");
    }
    assert_eq!(listed_comments(&mesh, &message).await, 3);
    mesh.messages_v1()
        .delete_message(authed(
            mpb::DeleteMessageRequest {
                message_id: message.clone(),
            },
            &author,
        ))
        .await
        .expect("the author deletes it");
    let gone = eventually("the comments of the deleted message", WHILE_UP, || async {
        listed_comments(&mesh, &message).await == 0
    })
    .await;
    println!("message deletion: its comments gone after {} ms", ms(gone));
    let status = comment(&mesh, &reader, &message).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}
