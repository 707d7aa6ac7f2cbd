//! Failover on a Redis Cluster under load: each master in turn is killed
//! (SIGKILL) while comments are added and listed; its replica is promoted,
//! comment-service follows without a restart, the errors stay with the
//! calls that reached the lost master until the promotion, and every
//! comment acknowledged to a client is read back. A replica killed costs
//! no error.

mod common;

use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use chirp_proto::comment::v1 as pb;
use comment_service::{domain::MessageId, store::keys::Group};
use common::{add, all_comments, authed, with_deadline, Backing, TestApp};
use service_kit::auth::Role;

/// What the clients saw.
#[derive(Default)]
struct Seen {
    acknowledged: Mutex<Vec<(String, String)>>,
    /// Failed adds, by message.
    failed: Mutex<std::collections::HashMap<String, u64>>,
    adds: AtomicU64,
    add_errors: AtomicU64,
    lists: AtomicU64,
    list_errors: AtomicU64,
    /// When the last add succeeded (ms since the start).
    last_ok_ms: AtomicU64,
}

/// One message in each group, so every master holds some.
fn one_message_per_group(backing: &Backing, author: &str) -> Vec<String> {
    let mut messages: Vec<Option<String>> = vec![None; Group::all().count()];
    while messages.iter().any(Option::is_none) {
        let id = MessageId::new();
        messages[Group::of_message(id).index()].get_or_insert_with(|| {
            backing
                .messages
                .messages
                .lock()
                .unwrap()
                .insert(id.to_string(), author.to_owned());
            id.to_string()
        });
    }
    messages.into_iter().flatten().collect()
}

/// Clients adding (four at once) and listing comments until `stop`.
fn load(app: &TestApp, messages: &[String], token: &str, seen: &Arc<Seen>, stop: &Arc<AtomicBool>, start: Instant) {
    for writer in 0..4 {
        let (client, messages, token, seen, stop) = (
            app.client(),
            messages.to_vec(),
            token.to_owned(),
            seen.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut client = client;
            let mut i = writer;
            while !stop.load(Ordering::Relaxed) {
                let message = &messages[i % messages.len()];
                i += 4;
                seen.adds.fetch_add(1, Ordering::Relaxed);
                let mut request = authed(add(message, "under failover"), &token);
                request.set_timeout(Duration::from_secs(2));
                match client.add_comment(request).await {
                    Ok(reply) => {
                        let id = reply.into_inner().comment.expect("a comment").id;
                        seen.acknowledged.lock().unwrap().push((message.clone(), id));
                        let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
                        seen.last_ok_ms.fetch_max(ms, Ordering::Relaxed);
                    }
                    Err(status) => {
                        seen.add_errors.fetch_add(1, Ordering::Relaxed);
                        // The store's answers (not a transport hiccup of
                        // the test's own client), by message.
                        if status.message().contains("comment store") {
                            *seen.failed.lock().unwrap().entry(message.clone()).or_default() += 1;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
    }
    let (client, messages, seen, stop) = (app.client(), messages.to_vec(), seen.clone(), stop.clone());
    tokio::spawn(async move {
        let mut client = client;
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            seen.lists.fetch_add(1, Ordering::Relaxed);
            let request = with_deadline(
                pb::ListCommentsRequest {
                    message_id: messages[i % messages.len()].clone(),
                    ..Default::default()
                },
                Duration::from_secs(2),
            );
            if client.list_comments(request).await.is_err() {
                seen.list_errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_each_master_in_turn_loses_no_acknowledged_comment() {
    let mut backing = Backing::private_cluster().await;
    let app = TestApp::spawn(&backing).await;
    let (author, token) = backing.user(Role::User);
    let messages = one_message_per_group(&backing, &author);
    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    load(&app, &messages, &token, &seen, &stop, start);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let masters = backing.cluster().masters().expect("the masters");
    assert_eq!(masters.len(), 3, "{masters:?}");
    for master in masters {
        let errors_before = seen.add_errors.load(Ordering::Relaxed);
        let acked_before = seen.acknowledged.lock().unwrap().len();
        // The messages whose group is on the master about to go.
        let lost_slots = backing.cluster().slots_of(master).expect("its slots");
        let keys = comment_service::store::keys::Keys::new(backing.prefix.prefix());
        let on_lost_master: BTreeSet<String> = messages
            .iter()
            .filter(|m| {
                let list = keys.message(MessageId::parse("message", m).unwrap());
                let slot = backing.cluster().slot_of(&list).expect("a slot");
                lost_slots.iter().any(|(from, to)| (*from..=*to).contains(&slot))
            })
            .cloned()
            .collect();
        seen.failed.lock().unwrap().clear();
        let killed_at = start.elapsed();
        backing.cluster().node(master).kill();
        // The replica takes over; the clients keep going meanwhile.
        let started = Instant::now();
        tokio::task::block_in_place(|| backing.cluster().wait_until_promoted(3, Duration::from_secs(30)))
            .expect("a replica promoted");
        let promoted_after = started.elapsed();
        // Writes succeed again, on every group.
        let recovered = Instant::now();
        loop {
            let last_ok = Duration::from_millis(seen.last_ok_ms.load(Ordering::Relaxed));
            if last_ok > killed_at + promoted_after {
                break;
            }
            assert!(
                recovered.elapsed() < Duration::from_secs(10),
                "no add succeeded after the promotion"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let errors = seen.add_errors.load(Ordering::Relaxed) - errors_before;
        let acked = seen.acknowledged.lock().unwrap().len() - acked_before;
        let elsewhere: u64 = seen
            .failed
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, _)| !on_lost_master.contains(*m))
            .map(|(_, n)| n)
            .sum();
        println!(
            "killed master {master} ({} of {} messages' groups on it): promoted after {:.2} s; \
             {errors} adds failed ({elsewhere} elsewhere), {acked} acknowledged meanwhile",
            on_lost_master.len(),
            messages.len(),
            promoted_after.as_secs_f64()
        );
        assert_eq!(elsewhere, 0, "the store failed an add to a group on another master");
        // A failed add is one that reached the lost master before its
        // replica took over: no more than the four writers could send
        // while it was gone (one attempt per 20 ms each, at most).
        let bound = 4 * (promoted_after.as_millis() as u64 / 20 + 2) + 8;
        assert!(
            errors <= bound,
            "{errors} failed adds in a {promoted_after:?} failover (bound {bound})"
        );

        backing
            .cluster()
            .node(master)
            .start()
            .expect("the killed node starts again");
        tokio::task::block_in_place(|| settle(&mut backing));
    }

    // A replica killed costs nothing.
    let replica = (0..6)
        .find(|i| !backing.cluster().masters().unwrap().contains(i))
        .expect("a replica");
    let errors_before = seen.add_errors.load(Ordering::Relaxed);
    backing.cluster().node(replica).kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        seen.add_errors.load(Ordering::Relaxed),
        errors_before,
        "a replica down fails no add"
    );
    backing
        .cluster()
        .node(replica)
        .start()
        .expect("the replica starts again");

    stop.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| settle(&mut backing));
    let acknowledged = seen.acknowledged.lock().unwrap().clone();
    let mut listed = BTreeSet::new();
    for message in &messages {
        listed.extend(all_comments(&app, message, 100).await.into_iter().map(|c| c.id));
    }
    let lost: Vec<_> = acknowledged.iter().filter(|(_, id)| !listed.contains(id)).collect();
    println!(
        "{} adds ({} failed), {} lists ({} failed); {} acknowledged, {} read back, {} lost",
        seen.adds.load(Ordering::Relaxed),
        seen.add_errors.load(Ordering::Relaxed),
        seen.lists.load(Ordering::Relaxed),
        seen.list_errors.load(Ordering::Relaxed),
        acknowledged.len(),
        acknowledged.len() - lost.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
    assert!(acknowledged.len() > 100, "the load ran");
}

fn settle(backing: &mut Backing) {
    let cluster = backing.cluster();
    cluster
        .wait_until_ok(Duration::from_secs(30))
        .expect("the cluster serves every slot");
    cluster
        .wait_until_replicated(Duration::from_secs(30))
        .expect("every master has its replica");
}
