//! comment-service's authorization matrix: every RPC, called by every kind
//! of caller, on content of every rank.

mod common;

use chirp_proto::comment::v1 as pb;
use common::{Backing, TestApp};
use service_kit::auth::Role;
use test_support::authz::{assert_matrix, cell, CALLERS};
use test_support::grpc::as_caller;
use tonic::Status;

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
    let mut cells = Vec::new();
    for token in &tokens {
        let reply = app
            .client()
            .list_comments(as_caller(
                pb::ListCommentsRequest {
                    message_id: message.clone(),
                    page_size: 0,
                    page_token: String::new(),
                },
                token.as_deref(),
            ))
            .await;
        cells.push(cell(&reply));
    }
    actual.push(("ListComments".to_owned(), cells));

    let mut cells = Vec::new();
    for token in &tokens {
        let reply = app
            .client()
            .add_comment(as_caller(
                pb::AddCommentRequest {
                    message_id: message.clone(),
                    body: "hello".into(),
                },
                token.as_deref(),
            ))
            .await;
        cells.push(cell(&reply));
    }
    actual.push(("AddComment".to_owned(), cells));

    for (whose, _, owner_token) in &owners {
        let mut cells = Vec::new();
        for token in &tokens {
            let comment = app
                .client()
                .add_comment(as_caller(
                    pb::AddCommentRequest {
                        message_id: message.clone(),
                        body: "to delete".into(),
                    },
                    Some(owner_token),
                ))
                .await
                .expect("the owner comments")
                .into_inner()
                .comment
                .unwrap();
            let reply = app
                .client()
                .delete_comment(as_caller(
                    pb::DeleteCommentRequest { comment_id: comment.id },
                    token.as_deref(),
                ))
                .await;
            cells.push(cell(&reply));
        }
        actual.push((format!("DeleteComment of {whose}"), cells));
    }

    for (whose, owner, _) in &owners {
        let mut cells = Vec::new();
        for token in &tokens {
            let reply = app
                .client()
                .purge_user_comments(as_caller(
                    pb::PurgeUserCommentsRequest { user_id: owner.clone() },
                    token.as_deref(),
                ))
                .await;
            cells.push(cell(&reply));
        }
        actual.push((format!("PurgeUserComments of {whose}"), cells));
    }

    let mut cells = Vec::new();
    for token in &tokens {
        let reply: Result<_, Status> = app
            .client()
            .apply_events(as_caller(
                pb::ApplyEventsRequest {
                    events: vec![service_kit::testing::revocation_event().to_pb()],
                },
                token.as_deref(),
            ))
            .await;
        cells.push(cell(&reply));
    }
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
