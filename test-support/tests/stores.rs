//! test-support's own promises: namespaces are isolated and cleaned up, and
//! private servers stop and start again with their data.

use std::net::TcpStream;

use test_support::{process::StoreProcess, sqlite::SqliteFile};

fn accepts_connections(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn a_sqlite_file_lives_in_a_directory_removed_on_drop() {
    let file = SqliteFile::new();
    let dir = file.path().parent().unwrap().to_owned();
    assert!(dir.exists());
    assert!(file.url().starts_with("sqlite://") && file.url().ends_with("?mode=rwc"));
    drop(file);
    assert!(!dir.exists());
}

#[cfg(feature = "postgres")]
mod postgres {
    use sqlx::Connection as _;
    use test_support::postgres::TestDatabase;

    use super::*;

    async fn database_exists(admin: &str, name: &str) -> bool {
        let mut conn = sqlx::PgConnection::connect(admin).await.unwrap();
        sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut conn)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn each_test_database_is_fresh_and_dropped_afterwards() {
        let a = TestDatabase::create().await.unwrap();
        let shared = test_support::process::StoreProcess::shared_url(test_support::process::SharedKind::Postgres);
        let admin = shared.as_str();
        let b = TestDatabase::create().await.unwrap();
        assert_ne!(a.url(), b.url());
        let name = a.url().rsplit('/').next().unwrap().to_owned();
        assert!(database_exists(admin, &name).await);
        drop(a);
        assert!(!database_exists(admin, &name).await);
    }

    #[tokio::test]
    async fn a_private_postgres_keeps_its_data_across_a_stop_and_start() {
        let mut server = StoreProcess::postgres().unwrap();
        let url = server.url();
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query("CREATE TABLE kept (n int)")
            .execute(&mut conn)
            .await
            .unwrap();
        drop(conn);

        server.stop();
        assert!(!accepts_connections(server.port()));
        assert!(sqlx::PgConnection::connect(&url).await.is_err());

        server.start().unwrap();
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query("SELECT count(*) FROM kept")
            .execute(&mut conn)
            .await
            .unwrap();
        let port = server.port();
        drop(conn);
        drop(server);
        assert!(!accepts_connections(port), "dropping the server stops it");
    }
}

#[cfg(feature = "redis")]
mod redis_store {
    use redis::AsyncCommands as _;
    use test_support::redis::KeyPrefix;

    use super::*;

    #[tokio::test]
    async fn a_key_prefix_is_unique_and_its_keys_are_deleted_on_drop() {
        let prefix = KeyPrefix::new();
        assert_ne!(prefix.prefix(), KeyPrefix::new().prefix());
        let client = redis::Client::open(prefix.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let key = format!("{}k", prefix.prefix());
        let _: () = conn.set(&key, 1).await.unwrap();
        drop(prefix);
        let exists: bool = conn.exists(&key).await.unwrap();
        assert!(!exists);
    }

    #[tokio::test]
    async fn a_private_append_only_redis_keeps_writes_across_a_restart() {
        let mut server = StoreProcess::redis(true).unwrap();
        let client = redis::Client::open(server.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = conn.set("durable", "yes").await.unwrap();
        server.stop();
        assert!(!accepts_connections(server.port()));
        server.start().unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let value: Option<String> = conn.get("durable").await.unwrap();
        assert_eq!(value.as_deref(), Some("yes"));
    }
}

#[cfg(feature = "mongodb")]
mod mongo {
    use mongodb::bson::doc;
    use test_support::mongo::TestMongo;

    use super::*;

    #[tokio::test]
    async fn a_mongo_namespace_gets_a_fresh_database_and_its_server_restarts_with_its_data() {
        let mut mongo = TestMongo::private().unwrap();
        let client = mongodb::Client::with_uri_str(mongo.uri()).await.unwrap();
        let collection = client
            .database(mongo.database())
            .collection::<mongodb::bson::Document>("c");
        collection.insert_one(doc! { "n": 1 }).await.unwrap();
        let server = mongo.server().expect("a private server");
        server.stop();
        assert!(!accepts_connections(server.port()));
        server.start().unwrap();
        let client = mongodb::Client::with_uri_str(mongo.uri()).await.unwrap();
        let collection = client
            .database(mongo.database())
            .collection::<mongodb::bson::Document>("c");
        assert_eq!(collection.count_documents(doc! {}).await.unwrap(), 1);
    }
}
