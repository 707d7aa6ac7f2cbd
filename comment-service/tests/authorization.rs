//! comment-service's authorization matrix: every RPC, called by every kind
//! of caller, on content of every rank.

mod common;

use chirp_proto::comment::v1 as pb;
use common::{add, Backing, TestApp};
use service_kit::auth::Role;
use test_support::authz::{assert_matrix, row, CALLERS};
use test_support::grpc::as_caller;

#[tokio::test]
async fn every_rpc_admits_exactly_the_callers_it_documents() {
    let backing = Backing::shared().await;
    let app = TestApp::spawn(&backing).await;
    let (user, user_token) = backing.user(Role::User);
    let (moderator, _) = backing.user(Role::Moderator);
    let (admin, _) = backing.user(Role::Admin);
    let id = |s: &str| uuid::Uuid::parse_str(s).unwrap();
    let tokens = service_kit::testing::matrix_tokens(&backing.signer, id(&user), id(&moderator), id(&admin));
    // Content of the user column, and of others of every rank.
    let (other, other_token) = backing.user(Role::User);
    let (other_moderator, other_moderator_token) = backing.user(Role::Moderator);
    let (other_admin, other_admin_token) = backing.user(Role::Admin);
    let owners = [
        ("own", user.clone(), user_token),
        ("another user's", other.clone(), other_token),
        ("another moderator's", other_moderator, other_moderator_token),
        ("another admin's", other_admin, other_admin_token),
    ];
    let message = backing.message(&other);

    let mut actual = Vec::new();
    // Public reads: a token, even a bad one, is not looked at.
    let cells = row(&tokens, |token| {
        let mut client = app.client();
        let request = as_caller(
            pb::ListCommentsRequest {
                message_id: message.clone(),
                page_size: 0,
                page_token: String::new(),
            },
            token.as_deref(),
        );
        async move { client.list_comments(request).await }
    })
    .await;
    actual.push(("ListComments".to_owned(), cells));

    let cells = row(&tokens, |token| {
        let mut client = app.client();
        let request = as_caller(add(&message, "hello"), token.as_deref());
        async move { client.add_comment(request).await }
    })
    .await;
    actual.push(("AddComment".to_owned(), cells));

    for (whose, _, owner_token) in &owners {
        // A fresh comment of the owner's for each caller to delete.
        let cells = row(&tokens, |token| {
            let mut client = app.client();
            let add = as_caller(add(&message, "to delete"), Some(owner_token));
            async move {
                let comment = client.add_comment(add).await.expect("the owner comments");
                let comment_id = comment.into_inner().comment.unwrap().id;
                let request = as_caller(pb::DeleteCommentRequest { comment_id }, token.as_deref());
                client.delete_comment(request).await
            }
        })
        .await;
        actual.push((format!("DeleteComment of {whose}"), cells));
    }

    for (whose, owner, _) in &owners {
        let cells = row(&tokens, |token| {
            let mut client = app.client();
            let request = as_caller(
                pb::PurgeUserCommentsRequest { user_id: owner.clone() },
                token.as_deref(),
            );
            async move { client.purge_user_comments(request).await }
        })
        .await;
        actual.push((format!("PurgeUserComments of {whose}"), cells));
    }

    let cells = row(&tokens, |token| {
        let mut client = app.client();
        let request = as_caller(
            pb::ApplyEventsRequest {
                events: vec![service_kit::testing::revocation_event().to_pb()],
            },
            token.as_deref(),
        );
        async move { client.apply_events(request).await }
    })
    .await;
    actual.push(("ApplyEvents (user-service's)".to_owned(), cells));

    assert_eq!(CALLERS.len(), tokens.len());
    const U: &str = "UNAUTH";
    const D: &str = "DENIED";
    assert_matrix(
        &actual,
        &[
            // no token, expired, forged, system, user, moderator, admin
            ("ListComments", ["ok", "ok", "ok", "ok", "ok", "ok", "ok"]),
            ("AddComment", [U, U, U, D, "ok", "ok", "ok"]),
            ("DeleteComment of own", [U, U, U, D, "ok", "ok", "ok"]),
            ("DeleteComment of another user's", [U, U, U, D, D, "ok", "ok"]),
            ("DeleteComment of another moderator's", [U, U, U, D, D, D, "ok"]),
            ("DeleteComment of another admin's", [U, U, U, D, D, D, D]),
            ("PurgeUserComments of own", [U, U, U, D, D, "ok", "ok"]),
            ("PurgeUserComments of another user's", [U, U, U, D, D, "ok", "ok"]),
            ("PurgeUserComments of another moderator's", [U, U, U, D, D, D, "ok"]),
            ("PurgeUserComments of another admin's", [U, U, U, D, D, D, D]),
            ("ApplyEvents (user-service's)", [U, U, U, "ok", D, D, D]),
        ],
    );
}
