//! analytics-service's authorization matrix: the reads are for signed-in
//! users (the activity histogram for moderators and admins), never a service
//! token; RecordEvents opens only to the producers' ingest token, whatever
//! bearer token comes with it.

mod common;

use chirp_proto::analytics::v1 as pb;
use common::{event, ingest, Backing, TestApp};
use service_kit::events::Payload;
use test_support::authz::{assert_matrix, row};
use test_support::grpc::as_caller;

fn window() -> (Option<prost_types::Timestamp>, Option<prost_types::Timestamp>) {
    let now = chrono::Utc::now().timestamp();
    let at = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
    (at(now - 3600), at(now + 60))
}

#[tokio::test]
async fn every_rpc_admits_exactly_the_callers_it_documents() {
    let backing = Backing::new();
    let app = TestApp::spawn(&backing).await;
    let ids: Vec<uuid::Uuid> = (0..3).map(|_| uuid::Uuid::new_v4()).collect();
    let tokens = service_kit::testing::matrix_tokens(&backing.signer, ids[0], ids[1], ids[2]);
    let message = uuid::Uuid::now_v7();
    app.client()
        .record_events(ingest(&[event(Payload::MessagePosted {
            message_id: message,
            author_id: ids[0],
        })]))
        .await
        .expect("the producers' ingest token records");

    let mut actual = Vec::new();
    macro_rules! row {
        ($name:expr, $method:ident, $message:expr) => {{
            let cells = row(&tokens, |token| {
                let mut client = app.client();
                let request = as_caller($message, token.as_deref());
                async move { client.$method(request).await }
            })
            .await;
            actual.push(($name.to_owned(), cells));
        }};
    }
    row!(
        "GetUserStats",
        get_user_stats,
        pb::GetUserStatsRequest {
            user_id: ids[0].to_string()
        }
    );
    row!(
        "GetMessageStats",
        get_message_stats,
        pb::GetMessageStatsRequest {
            message_id: message.to_string()
        }
    );
    let (start_time, end_time) = window();
    row!(
        "TopMessages",
        top_messages,
        pb::TopMessagesRequest {
            start_time,
            end_time,
            limit: 10
        }
    );
    row!(
        "GetActivityHistogram",
        get_activity_histogram,
        pb::GetActivityHistogramRequest {
            start_time,
            end_time,
            granularity: pb::Granularity::Hour.into()
        }
    );
    let batch = || pb::RecordEventsRequest {
        events: vec![event(Payload::MessagePosted {
            message_id: uuid::Uuid::now_v7(),
            author_id: ids[0],
        })
        .to_pb()],
    };
    row!("RecordEvents without the ingest token", record_events, batch());

    const U: &str = "UNAUTH";
    const D: &str = "DENIED";
    assert_matrix(
        &actual,
        &[
            // no token, expired, forged, system, user, moderator, admin
            ("GetUserStats", [U, U, U, D, "ok", "ok", "ok"]),
            ("GetMessageStats", [U, U, U, D, "ok", "ok", "ok"]),
            ("TopMessages", [U, U, U, D, "ok", "ok", "ok"]),
            // The whole platform's activity: for moderators and admins.
            ("GetActivityHistogram", [U, U, U, D, D, "ok", "ok"]),
            ("RecordEvents without the ingest token", [U, U, U, U, U, U, U]),
        ],
    );
}
