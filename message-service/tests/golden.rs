//! Golden replies: GetMessage through v1 and v2, as grpcurl prints them
//! (proto3 JSON), for a fixed message. v1 must never change shape; a
//! difference here is a contract change. Regenerate on purpose with
//! `UPDATE_GOLDEN=1 cargo test -p message-service --test golden`.

mod common;

use chirp_proto::{comment::v1 as cpb, message::v1, message::v2, user::v1 as upb};
use common::TestApp;
use mongodb::bson::{doc, DateTime as BsonDateTime};
use prost_reflect::{DescriptorPool, DynamicMessage};

const MESSAGE: &str = "01a2123e-e1d7-7489-9b42-03c56234c621";
const AUTHOR: &str = "216ed537-8696-4215-9b40-f8563c65bba7";
const COMMENTER: &str = "bea6e0fb-79e0-43c7-b295-d505af877d33";
/// 2026-11-29T09:30:00.123Z
const AT_MILLIS: i64 = 1_795_944_600_123;

/// The reply as grpcurl would print it.
fn as_json<M: prost::Message>(message: &M, full_name: &str) -> String {
    let pool = DescriptorPool::decode(chirp_proto::FILE_DESCRIPTOR_SET).unwrap();
    let descriptor = pool.get_message_by_name(full_name).unwrap();
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice()).unwrap();
    serde_json::to_string_pretty(&dynamic).unwrap() + "\n"
}

fn check(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let golden = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("no golden file {}", path.display()));
    assert_eq!(actual, golden, "{name} differs from its golden reply");
}

#[tokio::test]
async fn get_message_replies_match_their_golden_files_in_v1_and_v2() {
    let app = TestApp::spawn().await;
    app.users.users.lock().unwrap().insert(
        AUTHOR.into(),
        upb::User {
            id: AUTHOR.into(),
            username: "alice".into(),
            display_name: "Alice Liddell".into(),
            ..Default::default()
        },
    );
    app.comments.comments.lock().unwrap().insert(
        MESSAGE.into(),
        vec![cpb::Comment {
            id: "01a2123e-e1ee-718d-b12f-3a22b56a2c48".into(),
            message_id: MESSAGE.into(),
            author_id: COMMENTER.into(),
            body: "Welcome to Chirp!".into(),
            create_time: Some(prost_types::Timestamp {
                seconds: 1_795_944_660,
                nanos: 0,
            }),
        }],
    );
    app.collection()
        .await
        .insert_one(doc! {
            "_id": MESSAGE, "author_id": AUTHOR, "body": "Curiouser and curiouser!",
            "created_at": BsonDateTime::from_millis(AT_MILLIS), "hidden": false,
        })
        .await
        .unwrap();

    let one = app
        .v1()
        .get_message(v1::GetMessageRequest {
            message_id: MESSAGE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let two = app
        .v2()
        .get_message(v2::GetMessageRequest {
            message_id: MESSAGE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    check(
        "get_message.v1.json",
        &as_json(&one, "chirp.message.v1.GetMessageResponse"),
    );
    check(
        "get_message.v2.json",
        &as_json(&two, "chirp.message.v2.GetMessageResponse"),
    );
}
