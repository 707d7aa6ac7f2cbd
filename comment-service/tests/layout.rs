//! The CROSSSLOT guard: every pipeline, transaction and script of the
//! store, and every step of its maintenance, run against a Redis Cluster
//! (whatever `CHIRP_TEST_REDIS` says), so a key that leaves its group's
//! slot fails here rather than in production.

use comment_service::{
    domain::{Body, Comment, MessageId, PageRequest, UserId},
    store::{
        keys::{Group, Keys, GROUPS},
        new_comment_id, Address, Maintenance, PurgeOf, Store,
    },
};
use service_kit::{
    events::{Event, Payload, RevocationReason},
    maintenance::{Manifest, StoreMaintenance},
    relay::{Outbox, Rejected},
    revocation::{Revocation, RevocationStore},
    store::StoreStatus,
};
use test_support::{redis::KeyPrefix, redis_cluster::RedisCluster};

const PRODUCER: &str = "comment-service";

fn cluster() -> (KeyPrefix, Address) {
    let urls = RedisCluster::shared_urls();
    (KeyPrefix::on_cluster(urls.clone()), Address::Cluster(urls))
}

fn comment(message: MessageId, author: UserId, body: &str) -> (Comment, Event) {
    let comment = Comment {
        id: new_comment_id(message),
        message_id: message,
        author_id: author,
        message_author_id: author,
        body: Body::parse(body).unwrap(),
    };
    let event = Event::new(
        PRODUCER,
        Payload::CommentAdded {
            comment_id: comment.id.as_uuid(),
            message_id: message.as_uuid(),
            author_id: author.as_uuid(),
            message_author_id: author.as_uuid(),
        },
    );
    (comment, event)
}

/// A message in each group, so every slot the layout uses is reached.
fn one_message_per_group() -> Vec<MessageId> {
    let mut messages: Vec<Option<MessageId>> = vec![None; GROUPS];
    while messages.iter().any(Option::is_none) {
        let id = MessageId::new();
        messages[Group::of_message(id).index()].get_or_insert(id);
    }
    messages.into_iter().flatten().collect()
}

#[tokio::test]
async fn the_group_tags_fall_one_in_each_sixteenth_of_the_slots() {
    let (prefix, address) = cluster();
    let mut redis = comment_service::store::Redis::connect_lazy(&address).unwrap();
    let keys = Keys::new(prefix.prefix());
    for group in Group::all() {
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(keys.hidden(group))
            .query_async(&mut redis)
            .await
            .unwrap();
        let sixteenth = 16_384 / GROUPS as u16;
        assert_eq!(
            usize::from(slot / sixteenth),
            group.index(),
            "{{{}}} is in slot {slot}",
            group.tag()
        );
    }
}

#[tokio::test]
async fn every_store_operation_runs_on_a_cluster() {
    let (prefix, address) = cluster();
    let store = Store::connect_lazy(&address, prefix.prefix(), StoreStatus::always_up()).unwrap();
    store.prepare().await.unwrap();
    store.ping().await.unwrap();
    let author = UserId::from(uuid::Uuid::new_v4());
    let messages = one_message_per_group();

    let mut added = Vec::new();
    for message in &messages {
        for body in ["one", "two"] {
            let (comment, event) = comment(*message, author, body);
            store.insert(&comment, &event).await.unwrap();
            added.push(comment);
        }
    }
    let first = &added[0];
    assert!(store.get(first.id).await.unwrap().is_some());
    let page = store.list(messages[0], PageRequest::first(10)).await.unwrap();
    assert_eq!(page.total, 2);
    let counts = store.counts(&messages).await.unwrap();
    assert!(counts.iter().all(|(_, n)| *n == 2), "{counts:?}");
    store.set_message_hidden(messages[1], true).await.unwrap();
    assert_eq!(store.list(messages[1], PageRequest::first(10)).await.unwrap().total, 0);
    store.set_message_hidden(messages[1], false).await.unwrap();

    let deleted = Event::new(
        PRODUCER,
        Payload::CommentDeleted {
            comment_id: first.id.as_uuid(),
            message_id: first.message_id.as_uuid(),
            author_id: author.as_uuid(),
            message_author_id: author.as_uuid(),
        },
    );
    assert!(store.delete(first, &deleted).await.unwrap());
    assert!(!store.delete(first, &deleted).await.unwrap());

    // A deleted message's comments and a user's, through the job queue.
    store
        .request_purge(PurgeOf::Message(messages[2]), Some("00-trace-span-01"))
        .await
        .unwrap();
    while store.purge_step(PRODUCER).await.unwrap() {}
    assert_eq!(store.list(messages[2], PageRequest::first(10)).await.unwrap().total, 0);
    assert_eq!(store.purges_pending().await.unwrap(), 0);
    let left = added.len() as u64 - 1 - 2;
    assert_eq!(
        store.purge(author, PRODUCER).await.unwrap(),
        left,
        "every group's comments"
    );
    assert_eq!(store.purge(author, PRODUCER).await.unwrap(), 0);

    let revocation = Revocation {
        user_id: author.as_uuid(),
        issued_before: chrono::Utc::now(),
        reason: RevocationReason::Banned,
    };
    store.revoke(&revocation).await.unwrap();
    let revocations = store.revocation_store();
    assert_eq!(revocations.active(chrono::DateTime::UNIX_EPOCH).await.unwrap().len(), 1);
    revocations
        .prune(chrono::Utc::now() + chrono::Duration::hours(1))
        .await
        .unwrap();

    let outbox = store.outbox();
    let pending = outbox.pending(1_000).await.unwrap();
    assert_eq!(
        pending.len() as u64,
        added.len() as u64 * 2,
        "an event per add and per delete"
    );
    assert_eq!(outbox.backlog().await.unwrap().depth, pending.len() as u64);
    outbox
        .dead_letter(&[Rejected {
            position: pending[0].position.clone(),
            reason: "rejected".into(),
        }])
        .await
        .unwrap();
    assert_eq!(outbox.dead_letters(10).await.unwrap().len(), 1);
    assert_eq!(outbox.retry_dead_letters(10).await.unwrap(), 1);
    let pending = outbox.pending(1_000).await.unwrap();
    outbox.mark_delivered(&pending).await.unwrap();
    assert_eq!(outbox.backlog().await.unwrap().depth, 0);
}

#[tokio::test]
async fn every_maintenance_step_runs_on_a_cluster() {
    let (prefix, address) = cluster();
    let store = Store::connect_lazy(&address, prefix.prefix(), StoreStatus::always_up()).unwrap();
    store.prepare().await.unwrap();
    let author = UserId::from(uuid::Uuid::new_v4());
    for message in one_message_per_group() {
        let (comment, event) = comment(message, author, "kept");
        store.insert(&comment, &event).await.unwrap();
    }
    let maintenance = Maintenance::new(&address, prefix.prefix()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let taken = maintenance.backup(dir.path()).await.unwrap();
    assert_eq!(taken.counts["comments"], GROUPS as u64, "{:?}", taken.counts);
    let before = maintenance.inspect().await.unwrap();

    let manifest = Manifest {
        service: "comment-service".into(),
        store: "redis".into(),
        format: 2,
        created_at: String::new(),
        schema_version: taken.schema_version,
        counts: taken.counts.clone(),
        files: std::collections::BTreeMap::new(),
    };
    let loaded = maintenance.load(dir.path(), &manifest).await.unwrap();
    assert_eq!(loaded.counts, taken.counts);
    maintenance.discard().await.unwrap();
    maintenance.load(dir.path(), &manifest).await.unwrap();
    maintenance.switch().await.unwrap();
    maintenance.switch().await.unwrap(); // a second run touches nothing
    assert!(maintenance.kept().await.unwrap());
    assert_eq!(maintenance.inspect().await.unwrap().counts, before.counts);
    maintenance.undo().await.unwrap();
    assert_eq!(maintenance.inspect().await.unwrap(), before);
    maintenance.load(dir.path(), &manifest).await.unwrap();
    maintenance.switch().await.unwrap();
    maintenance.confirm().await.unwrap();
    assert!(!maintenance.kept().await.unwrap());
}
