//! user-service's spans continue a caller's trace: the server span is the
//! child of the caller's, and each PostgreSQL operation a child of it.

mod common;

use std::time::Duration;

use chirp_proto::user::v1::{self as pb, user_service_client::UserServiceClient};
use common::TestApp;
use test_support::otlp::{tree, Collector};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_continues_the_callers_trace_with_its_store_spans_under_it() {
    let collector = Collector::start().await;
    // This test binary holds only this test, so its process-wide telemetry
    // is this test's own.
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint());
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    let telemetry = service_kit::telemetry::Telemetry::init("user-service", service_kit::config::LogFormat::Pretty);
    assert!(service_kit::telemetry::exporting());
    let app = TestApp::spawn().await;
    let mut client = UserServiceClient::new(app.channel.clone());
    let registered = client
        .register(pb::RegisterRequest {
            username: "traced".into(),
            password: "correct horse battery".into(),
            display_name: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();

    let calls: Vec<(&str, &str)> = vec![
        ("4bf92f3577b34da6a3ce929d0e0e4736", "GetUser"),
        ("4bf92f3577b34da6a3ce929d0e0e4737", "BatchGetUsers"),
        ("4bf92f3577b34da6a3ce929d0e0e4738", "GetPublicKeys"),
    ];
    for (trace, method) in &calls {
        let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
        let with_parent = |r: &mut tonic::metadata::MetadataMap| {
            r.insert("traceparent", traceparent.parse().unwrap());
        };
        match *method {
            "GetUser" => {
                let mut request = tonic::Request::new(pb::GetUserRequest {
                    user_id: registered.id.clone(),
                });
                with_parent(request.metadata_mut());
                client.get_user(request).await.unwrap();
            }
            "BatchGetUsers" => {
                let mut request = tonic::Request::new(pb::BatchGetUsersRequest {
                    user_ids: vec![registered.id.clone()],
                });
                with_parent(request.metadata_mut());
                client.batch_get_users(request).await.unwrap();
            }
            _ => {
                let mut request = tonic::Request::new(pb::GetPublicKeysRequest {});
                with_parent(request.metadata_mut());
                client.get_public_keys(request).await.unwrap();
            }
        }
    }
    let spans = collector
        .wait_for(Duration::from_secs(10), |spans| {
            calls.iter().all(|(trace, method)| {
                spans
                    .iter()
                    .any(|s| &s.trace_id == trace && s.name == format!("chirp.user.v1.UserService/{method}"))
            })
        })
        .await;
    for (trace, method) in &calls {
        println!("{method}:\n{}", tree(&spans, trace));
        let server = spans
            .iter()
            .find(|s| &s.trace_id == trace && s.name == format!("chirp.user.v1.UserService/{method}"))
            .unwrap_or_else(|| panic!("no server span for {method}"));
        assert_eq!(server.parent_span_id, "00f067aa0ba902b7");
        assert_eq!(server.service, "user-service");
        if *method != "GetPublicKeys" {
            assert!(
                spans
                    .iter()
                    .any(|s| s.parent_span_id == server.span_id && s.name.starts_with("postgresql ")),
                "{method}'s store span is its child"
            );
        }
    }
    drop(app);
    telemetry.shutdown_async().await;
}
