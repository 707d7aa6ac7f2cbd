//! The live page of `chirp up`: every second it asks each service for its
//! health and `/metrics`, each store whether it answers, and `/proc` for
//! each process's memory, and turns that into the graph the page draws
//! (nodes, edges with rates over the last ten seconds, outboxes, circuits),
//! pushed to every open page as a server-sent event.

mod page;
pub mod traffic;
pub mod window;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::sync::watch;

use crate::{
    bench::procfs,
    control::PartState,
    layout::{Instance, Part, Ports},
    status::{self, ServiceReport},
};
pub use page::{serve, Commands};
use traffic::Traffic;
use window::{Edge, Scrape, Window};

/// How often the page's graph is refreshed: twice a second, so a stopped
/// part shows within a second or two (its service's own store probe runs
/// every second); a scrape is a dozen local requests.
pub const EVERY: Duration = Duration::from_millis(500);
/// The span the edges' rates are taken over.
pub const SPAN: Duration = Duration::from_secs(10);

/// The calls the mesh makes, drawn even before any was made: each service
/// to its store and to the peers it is configured with.
const TOPOLOGY: [(&str, &str); 14] = [
    ("user-service", "postgres"),
    ("user-service", "message-service"),
    ("user-service", "analytics-service"),
    ("user-service", "comment-service"),
    ("message-service", "mongodb"),
    ("message-service", "user-service"),
    ("message-service", "comment-service"),
    ("message-service", "analytics-service"),
    ("comment-service", "redis"),
    ("comment-service", "user-service"),
    ("comment-service", "message-service"),
    ("comment-service", "analytics-service"),
    ("analytics-service", "sqlite"),
    ("analytics-service", "user-service"),
];

/// What `chirp up` knows of its processes at one moment.
pub struct Parts {
    pub parts: Vec<PartState>,
    /// The fault on the way to each part, where there is one.
    pub faults: BTreeMap<String, String>,
}

/// One part of the mesh as drawn.
#[derive(Clone, Debug, Serialize)]
pub struct Node {
    pub id: &'static str,
    pub kind: &'static str,
    /// Whether every process of the part is up and, for a service, its API
    /// SERVING; what the node's colour says.
    pub healthy: bool,
    /// The supervisor's word: running, stopped, restarting, …
    pub process: String,
    /// SERVING, NOT_SERVING or unreachable (services only).
    pub api: Option<&'static str>,
    /// up or down, as the service's own `store_up` says (services only).
    pub store: Option<&'static str>,
    /// Resident memory of its processes, in MiB.
    pub rss_mib: Option<f64>,
    pub replicas: usize,
    /// `slow 300ms`, `flaky 20%`: the fault on the way to it.
    pub fault: Option<String>,
    pub outbox: Vec<(String, i64)>,
    pub dead_letters: Vec<(String, i64)>,
}

/// One edge as drawn.
#[derive(Clone, Debug, Serialize)]
pub struct EdgeView {
    pub from: String,
    pub to: String,
    #[serde(flatten)]
    pub rates: window::Rates,
    /// The caller's circuit breaker toward a peer: closed, half-open, open.
    pub circuit: Option<&'static str>,
    /// idle (no calls), ok, warn (failures in the window) or error
    /// (failing now, or the circuit open).
    pub state: &'static str,
}

/// Everything the page shows, as sent to it.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    /// Unix time in milliseconds.
    pub at: i64,
    pub nodes: Vec<Node>,
    pub edges: Vec<EdgeView>,
    /// Requests a second of the page's traffic, when it runs.
    pub load: Option<f64>,
    pub recent: Vec<traffic::Recent>,
}

/// The page's state, shared by the scraper and the page's handlers.
pub struct Live {
    ports: Ports,
    pub traffic: Arc<Traffic>,
    window: Mutex<Window>,
    latest: watch::Sender<Arc<String>>,
    /// Asks for a scrape now (after a command) instead of at the next tick.
    kick: tokio::sync::Notify,
}

impl Live {
    #[must_use]
    pub fn new(ports: Ports, traffic: Arc<Traffic>) -> Arc<Self> {
        Arc::new(Self {
            ports,
            traffic,
            window: Mutex::new(Window::new(SPAN)),
            latest: watch::Sender::new(Arc::new("{}".to_owned())),
            kick: tokio::sync::Notify::new(),
        })
    }

    /// Has the next scrape happen now: a command's effect shows at once.
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// Waits for the next tick of `tick`, or a kick.
    pub async fn next(&self, tick: &mut tokio::time::Interval) {
        tokio::select! {
            _ = tick.tick() => {}
            () = self.kick.notified() => {}
        }
    }

    /// The latest snapshot, as JSON, and its changes.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<Arc<String>> {
        self.latest.subscribe()
    }

    /// Takes one look at the mesh and publishes what it saw.
    pub async fn scrape(&self, parts: &Parts) {
        let services: Vec<Instance> = parts
            .parts
            .iter()
            .filter(|p| p.part.is_service())
            .map(|p| Instance {
                part: p.part,
                replica: p.replica,
            })
            .collect();
        let ports = self.ports;
        let asked = futures::future::join_all(services.iter().map(|&at| async move {
            let (serving, text) = tokio::join!(status::health(ports, at), status::metrics(ports, at));
            let text = text.unwrap_or_default();
            (ServiceReport::read(at, serving, &text), text)
        }));
        let stores = futures::future::join_all(
            Part::ALL
                .into_iter()
                .filter(|p| !p.is_service())
                .map(|part| async move { (part, answers(ports.of(part)).await) }),
        );
        let (asked, stores) = tokio::join!(asked, stores);

        let mut scrape = Scrape::new();
        for (report, text) in &asked {
            if let Some(at) = Instance::parse(&report.service) {
                // Replicas draw as one node: their calls add up.
                window::read_metrics(at.part.name(), text, &mut scrape);
            }
        }
        let snapshot = {
            let mut window = self.window.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            window.push(Instant::now(), scrape);
            let reports: Vec<&ServiceReport> = asked.iter().map(|(r, _)| r).collect();
            Snapshot {
                at: chrono::Utc::now().timestamp_millis(),
                nodes: nodes(parts, &reports, &stores),
                edges: edges(&window, &reports),
                load: self.traffic.rate(),
                recent: self.traffic.recent(),
            }
        };
        if let Ok(json) = serde_json::to_string(&snapshot) {
            self.latest.send_replace(Arc::new(json));
        }
    }
}

/// Whether something accepts connections on `port` within a moment.
async fn answers(port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(("127.0.0.1", port))
        )
        .await,
        Ok(Ok(_))
    )
}

fn nodes(parts: &Parts, reports: &[&ServiceReport], stores: &[(Part, bool)]) -> Vec<Node> {
    Part::ALL
        .into_iter()
        .map(|part| {
            let own: Vec<&PartState> = parts.parts.iter().filter(|p| p.part == part).collect();
            let process = own.first().map_or_else(|| "stopped".to_owned(), |p| p.state.clone());
            let running = !own.is_empty() && own.iter().all(|p| p.running);
            #[allow(clippy::cast_precision_loss)]
            let rss_mib = {
                let kib: Vec<u64> = own.iter().filter_map(|p| procfs::rss_kib(p.pid?)).collect();
                (!kib.is_empty()).then(|| kib.iter().sum::<u64>() as f64 / 1024.0)
            };
            let fault = parts.faults.get(part.name()).cloned();
            if !part.is_service() {
                let reachable = stores.iter().any(|(p, up)| *p == part && *up);
                return Node {
                    id: part.name(),
                    kind: "store",
                    healthy: running && reachable,
                    process,
                    api: None,
                    store: None,
                    rss_mib,
                    replicas: own.len(),
                    fault,
                    outbox: Vec::new(),
                    dead_letters: Vec::new(),
                };
            }
            let mine: Vec<&&ServiceReport> = reports
                .iter()
                .filter(|r| Instance::parse(&r.service).is_some_and(|i| i.part == part))
                .collect();
            let api = if mine.is_empty() || mine.iter().all(|r| r.serving.is_none()) {
                "unreachable"
            } else if mine.iter().all(|r| r.serving == Some(true)) {
                "SERVING"
            } else {
                "NOT_SERVING"
            };
            let store = mine.iter().find_map(|r| r.store_up).map(|up| {
                if up && mine.iter().all(|r| r.store_up != Some(false)) {
                    "up"
                } else {
                    "down"
                }
            });
            let sum = |pick: fn(&ServiceReport) -> &Vec<(String, i64)>| {
                let mut total: BTreeMap<String, i64> = BTreeMap::new();
                for r in &mine {
                    for (destination, n) in pick(r) {
                        *total.entry(destination.clone()).or_default() += n;
                    }
                }
                total.into_iter().collect()
            };
            Node {
                id: part.name(),
                kind: "service",
                healthy: running && api == "SERVING" && store == Some("up"),
                process,
                api: Some(api),
                store,
                rss_mib,
                replicas: own.len(),
                fault,
                outbox: sum(|r| &r.outbox),
                dead_letters: sum(|r| &r.dead_letters),
            }
        })
        .collect()
}

fn edges(window: &Window, reports: &[&ServiceReport]) -> Vec<EdgeView> {
    let mut all: Vec<Edge> = TOPOLOGY
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect();
    for edge in window.edges() {
        if !all.contains(edge) {
            all.push(edge.clone());
        }
    }
    all.into_iter()
        .map(|(from, to)| {
            let rates = window.rates(&(from.clone(), to.clone()));
            // The worst of the caller's replicas' breakers toward `to`.
            let circuit = reports
                .iter()
                .filter(|r| Instance::parse(&r.service).is_some_and(|i| i.part.name() == from))
                .flat_map(|r| r.circuits.iter().filter(|(peer, _)| *peer == to).map(|(_, s)| *s))
                .max_by_key(|s| match *s {
                    "closed" => 0,
                    "half-open" => 1,
                    _ => 2,
                });
            let state = if rates.failing_now || circuit == Some("open") {
                "error"
            } else if rates.error_rate > 0.0 || circuit == Some("half-open") {
                "warn"
            } else if rates.rate > 0.0 {
                "ok"
            } else {
                "idle"
            };
            EdgeView {
                from,
                to,
                rates,
                circuit,
                state,
            }
        })
        .collect()
}
