//! Bad input gets INVALID_ARGUMENT naming every bad field, and writes nothing.

mod common;

use chirp_proto::user::v1 as pb;
use common::{authed, violated_fields, TestApp, PASSWORD};
use tonic::Code;

fn register(username: &str, password: &str, display_name: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        username: username.into(),
        password: password.into(),
        display_name: display_name.into(),
    }
}

#[tokio::test]
async fn every_invalid_registration_is_refused_with_its_fields_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let before = app.user_count().await;
    let cases: Vec<(pb::RegisterRequest, Vec<&str>)> = vec![
        (register("", PASSWORD, ""), vec!["username"]),
        (register("ab", PASSWORD, ""), vec!["username"]),
        (register(&"a".repeat(33), PASSWORD, ""), vec!["username"]),
        (register("bad name", PASSWORD, ""), vec!["username"]),
        (register("émile", PASSWORD, ""), vec!["username"]),
        (register("okname", "", ""), vec!["password"]),
        (register("okname", "short", ""), vec!["password"]),
        (register("okname", "ééééééé", ""), vec!["password"]),
        (register("okname", &"p".repeat(129), ""), vec!["password"]),
        (register("okname", PASSWORD, &"d".repeat(51)), vec!["display_name"]),
        (register("okname", PASSWORD, "bell\u{7}"), vec!["display_name"]),
        (register("", "", "\u{0}"), vec!["username", "password", "display_name"]),
    ];
    for (request, fields) in cases {
        let status = app.client().register(request.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{request:?}");
        assert_eq!(violated_fields(&status), fields, "{request:?}");
    }
    assert_eq!(app.user_count().await, before, "no invalid registration was stored");
}

#[tokio::test]
async fn display_names_are_counted_in_characters_not_bytes() {
    let app = TestApp::spawn().await;
    let fifty_hearts = "♥".repeat(50);
    let user = app
        .client()
        .register(register("hearts", PASSWORD, &fifty_hearts))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.display_name, fifty_hearts);
}

#[tokio::test]
async fn ids_page_sizes_and_page_tokens_are_validated_on_every_rpc() {
    let app = TestApp::spawn().await;
    let (user, token) = app.user("alice").await;
    let admin = app.admin_token().await;
    let mut client = app.client();

    let status = client
        .get_user(pb::GetUserRequest { user_id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["user_id"]);

    let status = client
        .batch_get_users(pb::BatchGetUsersRequest { user_ids: vec![] })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["user_ids"]);
    let status = client
        .batch_get_users(pb::BatchGetUsersRequest {
            user_ids: vec![user.id.clone(); 101],
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["user_ids"]);
    let status = client
        .batch_get_users(pb::BatchGetUsersRequest {
            user_ids: vec![user.id.clone(), "x".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["user_ids[1]"]);

    for (size, token_text, fields) in [
        (101, "", vec!["page_size"]),
        (-1, "", vec!["page_size"]),
        (10, "garbage!", vec!["page_token"]),
        (10, "Zm9v", vec!["page_token"]),
        (500, "garbage!", vec!["page_size", "page_token"]),
    ] {
        let status = client
            .list_following(pb::ListFollowingRequest {
                user_id: user.id.clone(),
                page_size: size,
                page_token: token_text.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&status), fields, "size {size}, token {token_text:?}");
        let status = client
            .list_followers(pb::ListFollowersRequest {
                user_id: "bad".into(),
                page_size: size,
                page_token: token_text.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status)[0], "user_id");
    }

    let status = client
        .follow(authed(pb::FollowRequest { user_id: "bad".into() }, &token))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["user_id"]);
    let status = client
        .set_role(authed(
            pb::SetRoleRequest {
                user_id: user.id.clone(),
                role: pb::Role::Unspecified.into(),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["role"]);
    let status = client
        .set_role(authed(
            pb::SetRoleRequest {
                user_id: user.id.clone(),
                role: 42,
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["role"]);
    let status = client
        .ban_user(authed(
            pb::BanUserRequest {
                user_id: user.id.clone(),
                reason: "r".repeat(501),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["reason"]);

    let fetched = client
        .get_user(pb::GetUserRequest {
            user_id: user.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(fetched, user, "no invalid request changed the user");
}
