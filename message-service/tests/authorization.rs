//! message-service's authorization matrix: every RPC, called by every kind
//! of caller, on content of every rank, through v1 (v2 shares the handlers).

mod common;

use chirp_proto::message::v1;
use common::TestApp;
use service_kit::auth::Role;
use test_support::authz::{assert_matrix, row};
use test_support::grpc::as_caller;

#[tokio::test]
async fn every_rpc_admits_exactly_the_callers_it_documents() {
    let app = TestApp::spawn().await;
    let (user, user_token) = app.user("uma", Role::User);
    let (moderator, _) = app.user("mo", Role::Moderator);
    let (admin, _) = app.user("ada", Role::Admin);
    let id = |s: &str| uuid::Uuid::parse_str(s).unwrap();
    let tokens = service_kit::testing::matrix_tokens(&app.signer, id(&user), id(&moderator), id(&admin));
    // Content of the user column, and of others of every rank.
    let owners = [
        ("own", (user.clone(), user_token)),
        ("another user's", app.user("otto", Role::User)),
        ("another moderator's", app.user("mona", Role::Moderator)),
        ("another admin's", app.user("adele", Role::Admin)),
    ]
    .map(|(whose, (owner, token))| (whose, owner, token));
    let posted = app.post(&owners[1].2, "a message").await;

    let mut actual = Vec::new();
    let cells = row(&tokens, |token| {
        let mut client = app.v1();
        let request = as_caller(
            v1::GetMessageRequest {
                message_id: posted.id.clone(),
            },
            token.as_deref(),
        );
        async move { client.get_message(request).await }
    })
    .await;
    actual.push(("GetMessage".to_owned(), cells));

    let cells = row(&tokens, |token| {
        let mut client = app.v1();
        let request = as_caller(v1::PostMessageRequest { body: "hello".into() }, token.as_deref());
        async move { client.post_message(request).await }
    })
    .await;
    actual.push(("PostMessage".to_owned(), cells));

    let cells = row(&tokens, |token| {
        let mut client = app.v1();
        let request = as_caller(v1::HomeTimelineRequest::default(), token.as_deref());
        async move { client.home_timeline(request).await }
    })
    .await;
    actual.push(("HomeTimeline".to_owned(), cells));

    for (whose, _, owner_token) in &owners {
        // A fresh message of the owner's for each caller to delete.
        let cells = row(&tokens, |token| {
            let mut client = app.v1();
            let post = as_caller(
                v1::PostMessageRequest {
                    body: "to delete".into(),
                },
                Some(owner_token),
            );
            async move {
                let posted = client.post_message(post).await.expect("the owner posts");
                let message_id = posted.into_inner().message.unwrap().id;
                let request = as_caller(v1::DeleteMessageRequest { message_id }, token.as_deref());
                client.delete_message(request).await
            }
        })
        .await;
        actual.push((format!("DeleteMessage of {whose}"), cells));
    }

    for (whose, owner, _) in &owners {
        let cells = row(&tokens, |token| {
            let mut client = app.v1();
            let request = as_caller(
                v1::SetUserMessagesHiddenRequest {
                    user_id: owner.clone(),
                    hidden: true,
                },
                token.as_deref(),
            );
            async move { client.set_user_messages_hidden(request).await }
        })
        .await;
        actual.push((format!("SetUserMessagesHidden of {whose}"), cells));
    }

    let cells = row(&tokens, |token| {
        let mut client = app.v1();
        let request = as_caller(
            v1::ApplyUserEventsRequest {
                events: vec![service_kit::testing::revocation_event().to_pb()],
            },
            token.as_deref(),
        );
        async move { client.apply_user_events(request).await }
    })
    .await;
    actual.push(("ApplyUserEvents".to_owned(), cells));

    const U: &str = "UNAUTH";
    const D: &str = "DENIED";
    assert_matrix(
        &actual,
        &[
            // no token, expired, forged, system, user, moderator, admin
            ("GetMessage", ["ok", "ok", "ok", "ok", "ok", "ok", "ok"]),
            ("PostMessage", [U, U, U, D, "ok", "ok", "ok"]),
            ("HomeTimeline", [U, U, U, D, "ok", "ok", "ok"]),
            ("DeleteMessage of own", [U, U, U, D, "ok", "ok", "ok"]),
            ("DeleteMessage of another user's", [U, U, U, D, D, "ok", "ok"]),
            ("DeleteMessage of another moderator's", [U, U, U, D, D, D, "ok"]),
            ("DeleteMessage of another admin's", [U, U, U, D, D, D, D]),
            ("SetUserMessagesHidden of own", [U, U, U, D, D, "ok", "ok"]),
            ("SetUserMessagesHidden of another user's", [U, U, U, D, D, "ok", "ok"]),
            ("SetUserMessagesHidden of another moderator's", [U, U, U, D, D, D, "ok"]),
            ("SetUserMessagesHidden of another admin's", [U, U, U, D, D, D, D]),
            ("ApplyUserEvents", [U, U, U, "ok", D, D, D]),
        ],
    );
}
