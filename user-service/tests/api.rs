//! The happy path of every UserService RPC, and the rules around them.

mod common;

use chirp_proto::user::v1 as pb;
use common::{authed, TestApp, ADMIN, PASSWORD};
use service_kit::auth::{PublicKey, TokenVerifier};
use tonic::Code;

#[tokio::test]
async fn a_registered_user_logs_in_and_is_read_back_by_id() {
    let app = TestApp::spawn().await;
    let user = app.register("Alice").await;
    assert_eq!(user.username, "alice", "usernames are stored lower-case");
    assert_eq!(user.display_name, "alice", "the display name defaults to the username");
    assert_eq!(user.role(), pb::Role::User);
    assert!(!user.banned);

    let login = app
        .client()
        .login(pb::LoginRequest {
            username: "ALICE".into(),
            password: PASSWORD.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!login.access_token.is_empty());
    assert_eq!(login.user.as_ref().map(|u| u.id.as_str()), Some(user.id.as_str()));
    let expires = login.expire_time.unwrap().seconds;
    let now = chrono::Utc::now().timestamp();
    assert!(
        expires > now + 3000 && expires <= now + 3600,
        "about an hour: {}",
        expires - now
    );

    let fetched = app
        .client()
        .get_user(pb::GetUserRequest {
            user_id: user.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(fetched, user);
}

#[tokio::test]
async fn login_tokens_verify_with_the_published_public_keys() {
    let app = TestApp::spawn().await;
    let (user, token) = app.user("bob").await;
    let keys = app
        .client()
        .get_public_keys(pb::GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].algorithm, "EdDSA");
    let key = PublicKey::new(keys[0].public_key.as_slice().try_into().expect("32 bytes"));
    assert_eq!(key.key_id, keys[0].key_id);

    let caller = TokenVerifier::with_keys(&[key])
        .verify(&token)
        .await
        .expect("the token verifies");
    assert_eq!(caller.user_id.to_string(), user.id);
    assert_eq!(caller.role, service_kit::auth::Role::User);
}

#[tokio::test]
async fn a_wrong_password_or_unknown_user_is_unauthenticated_alike() {
    let app = TestApp::spawn().await;
    app.register("carol").await;
    for (username, password) in [("carol", "wrong password"), ("nobody", PASSWORD)] {
        let status = app
            .client()
            .login(pb::LoginRequest {
                username: username.into(),
                password: password.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(status.message(), "invalid username or password");
    }
}

#[tokio::test]
async fn a_taken_username_is_already_exists_whatever_its_case() {
    let app = TestApp::spawn().await;
    app.register("dave").await;
    let status = app
        .client()
        .register(pb::RegisterRequest {
            username: "DAVE".into(),
            password: PASSWORD.into(),
            display_name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(app.user_count().await, 2, "the admin and dave");
}

#[tokio::test]
async fn the_configured_admin_exists_and_its_name_cannot_be_registered() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    assert!(!token.is_empty());
    let status = app
        .client()
        .register(pb::RegisterRequest {
            username: ADMIN.into(),
            password: PASSWORD.into(),
            display_name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
}

#[tokio::test]
async fn batch_get_returns_found_users_and_names_the_missing_ones() {
    let app = TestApp::spawn().await;
    let a = app.register("erin").await;
    let b = app.register("frank").await;
    let missing = uuid::Uuid::new_v4().to_string();
    let reply = app
        .client()
        .batch_get_users(pb::BatchGetUsersRequest {
            user_ids: vec![a.id.clone(), b.id.clone(), a.id.clone(), missing.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    let mut ids: Vec<_> = reply.users.iter().map(|u| u.id.clone()).collect();
    ids.sort();
    let mut expected = vec![a.id, b.id];
    expected.sort();
    assert_eq!(ids, expected, "each user once, duplicates answered once");
    assert_eq!(reply.missing_user_ids, vec![missing]);
}

#[tokio::test]
async fn get_user_of_an_unknown_id_is_not_found() {
    let app = TestApp::spawn().await;
    let status = app
        .client()
        .get_user(pb::GetUserRequest {
            user_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn follow_and_unfollow_are_idempotent_and_show_in_both_lists() {
    let app = TestApp::spawn().await;
    let (alice, alice_token) = app.user("alice").await;
    let bob = app.register("bob").await;
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
    let following = app
        .client()
        .list_following(pb::ListFollowingRequest {
            user_id: alice.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(following.users.iter().map(|u| &u.id).collect::<Vec<_>>(), vec![&bob.id]);
    assert!(following.next_page_token.is_empty());
    let followers = app
        .client()
        .list_followers(pb::ListFollowersRequest {
            user_id: bob.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        followers.users.iter().map(|u| &u.id).collect::<Vec<_>>(),
        vec![&alice.id]
    );

    for _ in 0..2 {
        app.client()
            .unfollow(authed(
                pb::UnfollowRequest {
                    user_id: bob.id.clone(),
                },
                &alice_token,
            ))
            .await
            .unwrap();
    }
    let following = app
        .client()
        .list_following(pb::ListFollowingRequest {
            user_id: alice.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(following.users.is_empty());
}

#[tokio::test]
async fn following_yourself_or_an_unknown_user_is_refused() {
    let app = TestApp::spawn().await;
    let (alice, token) = app.user("alice").await;
    let status = app
        .client()
        .follow(authed(pb::FollowRequest { user_id: alice.id }, &token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = app
        .client()
        .follow(authed(
            pb::FollowRequest {
                user_id: uuid::Uuid::new_v4().to_string(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn lists_page_through_every_user_exactly_once() {
    let app = TestApp::spawn().await;
    let (star, _) = app.user("star").await;
    let mut expected = Vec::new();
    for i in 0..25 {
        let (fan, token) = app.user(&format!("fan_{i:02}")).await;
        app.client()
            .follow(authed(
                pb::FollowRequest {
                    user_id: star.id.clone(),
                },
                &token,
            ))
            .await
            .unwrap();
        expected.push(fan.id);
    }
    expected.sort();

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = app
            .client()
            .list_followers(pb::ListFollowersRequest {
                user_id: star.id.clone(),
                page_size: 10,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.users.len() <= 10);
        seen.extend(page.users.into_iter().map(|u| u.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, expected, "every follower once, in a stable order");
}

#[tokio::test]
async fn listing_an_unknown_user_is_not_found() {
    let app = TestApp::spawn().await;
    let status = app
        .client()
        .list_following(pb::ListFollowingRequest {
            user_id: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn an_admin_sets_roles_and_the_new_role_is_in_the_next_token() {
    let app = TestApp::spawn().await;
    let (mo, _) = app.moderator("moe").await;
    assert_eq!(
        app.client()
            .get_user(pb::GetUserRequest { user_id: mo.id.clone() })
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap()
            .role(),
        pb::Role::Moderator
    );
    let token = app.login_as("moe", PASSWORD).await;
    let claims = app.signer.public_key();
    let caller = TokenVerifier::with_keys(&[claims]).verify(&token).await.unwrap();
    assert_eq!(caller.role, service_kit::auth::Role::Moderator);
}

#[tokio::test]
async fn a_moderator_bans_a_user_who_then_cannot_log_in_until_unbanned() {
    let app = TestApp::spawn().await;
    let (_, mod_token) = app.moderator("moe").await;
    let troll = app.register("troll").await;

    let banned = app
        .client()
        .ban_user(authed(
            pb::BanUserRequest {
                user_id: troll.id.clone(),
                reason: "spam".into(),
            },
            &mod_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(banned.banned);
    let status = app
        .client()
        .login(pb::LoginRequest {
            username: "troll".into(),
            password: PASSWORD.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // Banning twice is the same as once.
    app.client()
        .ban_user(authed(
            pb::BanUserRequest {
                user_id: troll.id.clone(),
                reason: String::new(),
            },
            &mod_token,
        ))
        .await
        .unwrap();

    let unbanned = app
        .client()
        .unban_user(authed(
            pb::UnbanUserRequest {
                user_id: troll.id.clone(),
            },
            &mod_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(!unbanned.banned);
    app.login_as("troll", PASSWORD).await;
}

#[tokio::test]
async fn a_banned_user_with_a_live_token_cannot_follow() {
    let app = TestApp::spawn().await;
    let (_, mod_token) = app.moderator("moe").await;
    let (troll, troll_token) = app.user("troll").await;
    let victim = app.register("victim").await;
    app.client()
        .ban_user(authed(
            pb::BanUserRequest {
                user_id: troll.id,
                reason: String::new(),
            },
            &mod_token,
        ))
        .await
        .unwrap();
    let status = app
        .client()
        .follow(authed(pb::FollowRequest { user_id: victim.id }, &troll_token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn users_delete_themselves_and_admins_delete_anyone() {
    let app = TestApp::spawn().await;
    let (alice, alice_token) = app.user("alice").await;
    let (bob, bob_token) = app.user("bob").await;
    app.client()
        .follow(authed(
            pb::FollowRequest {
                user_id: alice.id.clone(),
            },
            &bob_token,
        ))
        .await
        .unwrap();

    app.client()
        .delete_user(authed(
            pb::DeleteUserRequest {
                user_id: alice.id.clone(),
            },
            &alice_token,
        ))
        .await
        .unwrap();
    let status = app
        .client()
        .get_user(pb::GetUserRequest {
            user_id: alice.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let following = app
        .client()
        .list_following(pb::ListFollowingRequest {
            user_id: bob.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(following.users.is_empty(), "the follow edge went with the account");

    let admin = app.admin_token().await;
    app.client()
        .delete_user(authed(
            pb::DeleteUserRequest {
                user_id: bob.id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap();
    assert_eq!(app.user_count().await, 1, "only the admin is left");
}

#[tokio::test]
async fn rpc_metrics_count_calls_by_method_and_code() {
    let app = TestApp::spawn().await;
    let _ = app
        .client()
        .get_user(pb::GetUserRequest {
            user_id: uuid::Uuid::new_v4().to_string(),
        })
        .await;
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(
            r#"grpc_server_handled_total{grpc_code="NotFound",grpc_method="/chirp.user.v1.UserService/GetUser"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains("store_up 1"), "{metrics}");
}

#[tokio::test]
async fn replies_echo_the_callers_request_id() {
    let app = TestApp::spawn().await;
    let mut request = tonic::Request::new(pb::GetPublicKeysRequest {});
    request
        .metadata_mut()
        .insert("x-request-id", "trace-me-123".parse().unwrap());
    let reply = app.client().get_public_keys(request).await.unwrap();
    assert_eq!(
        reply.metadata().get("x-request-id").and_then(|v| v.to_str().ok()),
        Some("trace-me-123")
    );
}

#[tokio::test]
async fn other_services_verify_tokens_with_keys_fetched_once_even_after_user_service_stops() {
    let app = TestApp::spawn().await;
    let (user, token) = app.user("remote").await;
    let peer = service_kit::client::Peer::connect_lazy(service_kit::client::PeerConfig::new(
        "user-service",
        format!("http://{}", app.addr),
    ))
    .unwrap();
    let verifier = TokenVerifier::from_user_service(std::sync::Arc::new(peer));
    assert_eq!(verifier.verify(&token).await.unwrap().user_id.to_string(), user.id);

    app.stop().await.unwrap();
    assert_eq!(
        verifier.verify(&token).await.unwrap().user_id.to_string(),
        user.id,
        "cached keys keep verifying while user-service is down"
    );
}
