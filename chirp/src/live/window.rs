//! The numbers behind the page's edges: what each service's `/metrics`
//! says about its calls (to peers and to its store), turned into rates,
//! error rates and percentiles over the last few seconds by differencing
//! cumulative counters, as Prometheus' `rate()` and `histogram_quantile()`
//! would.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

/// One edge of the graph: a service and what it calls (a peer service, or
/// its store as the page names it: postgres, mongodb, redis, sqlite).
pub type Edge = (String, String);

/// Cumulative counts of one edge at one scrape, summed over methods and
/// operations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    pub calls: f64,
    pub errors: f64,
    /// Cumulative histogram buckets by upper bound (seconds), `+Inf` last.
    pub buckets: Vec<(f64, f64)>,
}

impl Counters {
    fn add_bucket(&mut self, le: f64, count: f64) {
        match self.buckets.iter_mut().find(|(bound, _)| *bound == le) {
            Some((_, total)) => *total += count,
            None => {
                self.buckets.push((le, count));
                self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
        }
    }

    /// `self − earlier`; when a counter went backwards (the process
    /// restarted) everything since the restart, that is `self`.
    fn since(&self, earlier: &Self) -> Self {
        let reset = self.calls < earlier.calls
            || self.errors < earlier.errors
            || self
                .buckets
                .iter()
                .any(|(le, n)| earlier.buckets.iter().any(|(l, m)| l == le && n < m));
        if reset {
            return self.clone();
        }
        let before = |le: f64| earlier.buckets.iter().find(|(l, _)| *l == le).map_or(0.0, |(_, n)| *n);
        Self {
            calls: self.calls - earlier.calls,
            errors: self.errors - earlier.errors,
            buckets: self.buckets.iter().map(|(le, n)| (*le, n - before(*le))).collect(),
        }
    }
}

/// Every edge's counters at one scrape.
pub type Scrape = BTreeMap<Edge, Counters>;

/// A store label of `store_operation_seconds` as the page names the store.
fn store_node(label: &str) -> &str {
    match label {
        "postgresql" => "postgres",
        other => other,
    }
}

/// Adds what one service's `/metrics` text says about its calls to
/// `scrape`: calls to peers (each attempt, and the calls its client stack
/// refused, which count as errors) and operations on its store.
pub fn read_metrics(service: &str, text: &str, scrape: &mut Scrape) {
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, labels, value)) = parse_line(line) else {
            continue;
        };
        let label = |key: &str| labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        let edge = |to: &str| (service.to_owned(), to.to_owned());
        match name {
            "grpc_client_handled_total" => {
                if let Some(peer) = label("peer") {
                    let c = scrape.entry(edge(peer)).or_default();
                    c.calls += value;
                    // tonic's `Code` as Debug writes it: `Ok`, `Unavailable`, …
                    if !matches!(label("grpc_code"), Some("Ok" | "OK")) {
                        c.errors += value;
                    }
                }
            }
            "peer_calls_refused_total" => {
                if let Some(peer) = label("peer") {
                    let c = scrape.entry(edge(peer)).or_default();
                    c.calls += value;
                    c.errors += value;
                }
            }
            "grpc_client_handling_seconds_bucket" => {
                if let (Some(peer), Some(le)) = (label("peer"), label("le").and_then(parse_bound)) {
                    scrape.entry(edge(peer)).or_default().add_bucket(le, value);
                }
            }
            "store_operation_seconds_count" => {
                if let Some(store) = label("store") {
                    let c = scrape.entry(edge(store_node(store))).or_default();
                    c.calls += value;
                    if label("outcome") == Some("error") {
                        c.errors += value;
                    }
                }
            }
            "store_operation_seconds_bucket" => {
                if let (Some(store), Some(le)) = (label("store"), label("le").and_then(parse_bound)) {
                    scrape.entry(edge(store_node(store))).or_default().add_bucket(le, value);
                }
            }
            _ => {}
        }
    }
}

fn parse_bound(text: &str) -> Option<f64> {
    if text == "+Inf" {
        Some(f64::INFINITY)
    } else {
        text.parse().ok()
    }
}

/// A sample's labels, in the order written.
type Labels = Vec<(String, String)>;

/// `name{k="v",…} value` (the text format's sample line; no timestamps,
/// which the services do not write).
fn parse_line(line: &str) -> Option<(&str, Labels, f64)> {
    let (key, value) = line.trim().rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let Some((name, rest)) = key.split_once('{') else {
        return Some((key, Vec::new(), value));
    };
    let mut labels = Vec::new();
    let mut rest = rest.strip_suffix('}')?;
    while let Some((k, after)) = rest.split_once("=\"") {
        // A value ends at the first quote not escaped by a backslash.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        let end = end?;
        labels.push((k.trim_start_matches(',').to_owned(), after[..end].replace("\\\"", "\"")));
        rest = &after[end + 1..];
    }
    Some((name, labels, value))
}

/// What the page shows on one edge.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Rates {
    /// Calls a second over the window.
    pub rate: f64,
    /// Failed calls over all calls in the window, 0 to 1.
    pub error_rate: f64,
    /// 99th percentile latency over the window, in milliseconds; `None`
    /// without calls.
    pub p99_ms: Option<f64>,
    /// Whether calls failed in the last [`RECENT`]: what colours the edge
    /// red at once, while the window's error rate still remembers the
    /// healthy seconds before.
    pub failing_now: bool,
}

/// How far back "now" reaches for [`Rates::failing_now`].
pub const RECENT: Duration = Duration::from_secs(2);

/// The last `span` of scrapes.
pub struct Window {
    span: Duration,
    scrapes: VecDeque<(Instant, Scrape)>,
}

impl Window {
    #[must_use]
    pub fn new(span: Duration) -> Self {
        Self {
            span,
            scrapes: VecDeque::new(),
        }
    }

    /// Adds a scrape and forgets those no longer needed: the oldest one
    /// kept is the last taken at or before `at − span`, the base the
    /// window's differences start from.
    pub fn push(&mut self, at: Instant, scrape: Scrape) {
        self.scrapes.push_back((at, scrape));
        while self.scrapes.len() > 2 && self.scrapes[1].0 + self.span <= at {
            self.scrapes.pop_front();
        }
    }

    /// The edges seen in the latest scrape.
    pub fn edges(&self) -> impl Iterator<Item = &Edge> {
        self.scrapes.back().into_iter().flat_map(|(_, s)| s.keys())
    }

    /// Rates of `edge` over the window; zeros until two scrapes exist.
    #[must_use]
    pub fn rates(&self, edge: &Edge) -> Rates {
        let (Some((first_at, first)), Some((last_at, last))) = (self.scrapes.front(), self.scrapes.back()) else {
            return Rates::default();
        };
        let zero = Counters::default();
        let now = last.get(edge).unwrap_or(&zero);
        let delta = now.since(first.get(edge).unwrap_or(&zero));
        let seconds = last_at.duration_since(*first_at).as_secs_f64();
        let recent_base = self
            .scrapes
            .iter()
            .rev()
            .find(|(at, _)| *at + RECENT <= *last_at)
            .map_or(first, |(_, scrape)| scrape);
        let recent = now.since(recent_base.get(edge).unwrap_or(&zero));
        Rates {
            rate: if seconds > 0.0 { delta.calls / seconds } else { 0.0 },
            error_rate: if delta.calls > 0.0 {
                delta.errors / delta.calls
            } else {
                0.0
            },
            p99_ms: quantile(0.99, &delta.buckets).map(|s| s * 1000.0),
            failing_now: recent.errors > 0.0,
        }
    }
}

/// The `q` quantile of cumulative `buckets` (upper bound, count), linear
/// within a bucket as Prometheus' `histogram_quantile` is; the highest
/// finite bound when it falls in `+Inf`; `None` without observations.
#[must_use]
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let in_bucket = count - lower.1;
            let fraction = if in_bucket > 0.0 {
                (rank - lower.1) / in_bucket
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * fraction);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What message-service's `/metrics` said at two scrapes ten seconds
    /// apart while comment-service answered 200 calls and then its store
    /// went away (recorded from a run, trimmed to the lines read here).
    const BEFORE: &str = r#"# HELP grpc_client_handled_total Calls sent to peers
# TYPE grpc_client_handled_total counter
grpc_client_handled_total{grpc_code="Ok",grpc_method="GetComments",peer="comment-service"} 1000
grpc_client_handled_total{grpc_code="Ok",grpc_method="GetUsers",peer="user-service"} 500
grpc_client_handling_seconds_bucket{grpc_method="GetComments",peer="comment-service",le="0.001"} 400
grpc_client_handling_seconds_bucket{grpc_method="GetComments",peer="comment-service",le="0.005"} 990
grpc_client_handling_seconds_bucket{grpc_method="GetComments",peer="comment-service",le="0.01"} 1000
grpc_client_handling_seconds_bucket{grpc_method="GetComments",peer="comment-service",le="0.25"} 1000
grpc_client_handling_seconds_bucket{grpc_method="GetComments",peer="comment-service",le="+Inf"} 1000
store_operation_seconds_bucket{operation="get",outcome="ok",store="mongodb",le="0.001"} 300
store_operation_seconds_bucket{operation="get",outcome="ok",store="mongodb",le="+Inf"} 300
store_operation_seconds_count{operation="get",outcome="ok",store="mongodb"} 300
"#;
    const AFTER: &str = r#"grpc_client_handled_total{grpc_code="Ok",grpc_method="GetComments",peer="comment-service"} 1180
grpc_client_handled_total{grpc_code="Unavailable",grpc_method="GetComments",peer="comment-service"} 15
peer_calls_refused_total{peer="comment-service",reason="circuit_open"} 5
grpc_client_handled_total{grpc_code="Ok",grpc_method="GetUsers",peer="user-service"} 500
grpc_client_handling_seconds_bucket{grpc_method="GetComments",peer="comment-service",le="0.001"} 410
grpc_client_handling_seconds_bucket{grpc_method="GetComments",peer="comment-service",le="0.005"} 1010
grpc_client_handling_seconds_bucket{grpc_method="GetComments",peer="comment-service",le="0.01"} 1025
grpc_client_handling_seconds_bucket{grpc_method="GetComments",peer="comment-service",le="0.25"} 1195
grpc_client_handling_seconds_bucket{grpc_method="GetComments",peer="comment-service",le="+Inf"} 1195
store_operation_seconds_bucket{operation="get",outcome="ok",store="mongodb",le="0.001"} 350
store_operation_seconds_bucket{operation="get",outcome="ok",store="mongodb",le="+Inf"} 350
store_operation_seconds_count{operation="get",outcome="ok",store="mongodb"} 350
store_operation_seconds_count{operation="get",outcome="error",store="mongodb"} 2
"#;

    fn scrape(text: &str) -> Scrape {
        let mut s = Scrape::new();
        read_metrics("message-service", text, &mut s);
        s
    }

    fn edge(to: &str) -> Edge {
        ("message-service".to_owned(), to.to_owned())
    }

    #[test]
    fn edge_rates_error_rates_and_p99_come_from_the_differences_over_the_window() {
        let t0 = Instant::now();
        let mut window = Window::new(Duration::from_secs(10));
        window.push(t0, scrape(BEFORE));
        window.push(t0 + Duration::from_secs(10), scrape(AFTER));

        let comments = window.rates(&edge("comment-service"));
        // 180 ok + 15 failed + 5 refused in 10 s.
        assert!((comments.rate - 20.0).abs() < 1e-9, "{comments:?}");
        assert!((comments.error_rate - 0.1).abs() < 1e-9, "{comments:?}");
        // 195 timed calls: 10 up to 1 ms, 10 more up to 5 ms, 5 more up to 10 ms,
        // 170 more up to 250 ms; rank 193.05 falls in (10 ms, 250 ms].
        let p99 = comments.p99_ms.unwrap();
        let expected = 10.0 + 240.0 * (193.05 - 25.0) / 170.0;
        assert!((p99 - expected).abs() < 1e-6, "{p99} vs {expected}");
        assert!(comments.failing_now);

        let users = window.rates(&edge("user-service"));
        assert_eq!(users.rate, 0.0);
        assert_eq!(users.p99_ms, None);
        assert!(!users.failing_now);

        let store = window.rates(&edge("mongodb"));
        assert!((store.rate - 5.2).abs() < 1e-9, "{store:?}");
        assert!((store.error_rate - 2.0 / 52.0).abs() < 1e-9);
    }

    #[test]
    fn a_restarted_service_counts_from_zero_instead_of_going_negative() {
        let t0 = Instant::now();
        let mut window = Window::new(Duration::from_secs(10));
        window.push(t0, scrape(AFTER));
        window.push(t0 + Duration::from_secs(5), scrape(BEFORE));
        let comments = window.rates(&edge("comment-service"));
        assert!((comments.rate - 200.0).abs() < 1e-9, "{comments:?}");
        assert_eq!(comments.error_rate, 0.0);
    }

    #[test]
    fn the_window_forgets_scrapes_older_than_its_span_but_keeps_a_base() {
        let t0 = Instant::now();
        let mut window = Window::new(Duration::from_secs(10));
        for s in 0..30 {
            window.push(t0 + Duration::from_secs(s), scrape(BEFORE));
        }
        assert_eq!(window.scrapes.len(), 11);
        assert_eq!(window.scrapes.front().unwrap().0, t0 + Duration::from_secs(19));
    }

    #[test]
    fn failures_older_than_the_recent_span_colour_the_window_but_not_now() {
        let t0 = Instant::now();
        let mut window = Window::new(Duration::from_secs(10));
        window.push(t0, scrape(BEFORE));
        window.push(t0 + Duration::from_secs(1), scrape(AFTER));
        for s in 2..6 {
            window.push(t0 + Duration::from_secs(s), scrape(AFTER));
        }
        let comments = window.rates(&edge("comment-service"));
        assert!(comments.error_rate > 0.0);
        assert!(!comments.failing_now);
    }

    #[test]
    fn quantiles_interpolate_within_a_bucket_and_stop_at_the_last_finite_bound() {
        let buckets = [(0.1, 50.0), (0.2, 100.0), (f64::INFINITY, 100.0)];
        assert!((quantile(0.5, &buckets).unwrap() - 0.1).abs() < 1e-12);
        assert!((quantile(0.75, &buckets).unwrap() - 0.15).abs() < 1e-12);
        let overflow = [(0.1, 1.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(0.99, &overflow), Some(0.1));
        assert_eq!(quantile(0.99, &[(0.1, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(quantile(0.99, &[]), None);
    }

    #[test]
    fn sample_lines_with_several_labels_and_escapes_parse() {
        let (name, labels, value) = parse_line(r#"m{a="x",b="say \"hi\"",le="+Inf"} 3.5"#).unwrap();
        assert_eq!(name, "m");
        assert_eq!(labels[1], ("b".to_owned(), "say \"hi\"".to_owned()));
        assert_eq!(labels[2].1, "+Inf");
        assert_eq!(value, 3.5);
        assert_eq!(parse_line("store_up 1").unwrap().0, "store_up");
        assert!(parse_line("garbage").is_none());
    }
}
