//! What one hop between services costs: for each caller → callee edge that
//! carried calls during a run, the caller's view of each call
//! (`peer_call_seconds{peer}`) against the callee's own handling time
//! (`grpc_server_handling_seconds`), both read from the services' `/metrics`
//! before and after the run. The difference of their quantiles is the
//! network, the two gRPC stacks and the queueing between them.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::layout::{Part, Ports};

/// Each service's `/metrics` text at one moment.
pub struct Snapshot(BTreeMap<&'static str, String>);

pub async fn snapshot(ports: Ports) -> Snapshot {
    let mut texts = BTreeMap::new();
    for part in Part::SERVICES {
        texts.insert(
            part.name(),
            crate::status::metrics(ports, part).await.unwrap_or_default(),
        );
    }
    Snapshot(texts)
}

/// The cost of one edge during a run.
#[derive(Debug, Serialize)]
pub struct Hop {
    pub calls: u64,
    /// Median and 99th percentile the caller saw, in milliseconds.
    pub caller_p50_ms: f64,
    pub caller_p99_ms: f64,
    /// The callee's own handling time, in milliseconds.
    pub callee_p50_ms: f64,
    pub callee_p99_ms: f64,
    /// What the hop added at the median and at the 99th percentile.
    pub added_p50_ms: f64,
    pub added_p99_ms: f64,
}

/// Edges with at least this many calls in the run are reported.
const MIN_CALLS: u64 = 20;

/// The hops of the run between `before` and `after`, keyed `caller→callee`.
#[must_use]
pub fn between(before: &Snapshot, after: &Snapshot) -> BTreeMap<String, Hop> {
    let mut hops = BTreeMap::new();
    for (caller, text) in &after.0 {
        for callee in Part::SERVICES.map(Part::name) {
            let label = Some(("peer", callee));
            let seen = delta(
                &buckets(text, "peer_call_seconds", label),
                &buckets(
                    before.0.get(caller).map_or("", String::as_str),
                    "peer_call_seconds",
                    label,
                ),
            );
            let calls = seen.last().map_or(0, |(_, n)| *n);
            if calls < MIN_CALLS {
                continue;
            }
            let handled = delta(
                &buckets(
                    after.0.get(callee).map_or("", String::as_str),
                    "grpc_server_handling_seconds",
                    None,
                ),
                &buckets(
                    before.0.get(callee).map_or("", String::as_str),
                    "grpc_server_handling_seconds",
                    None,
                ),
            );
            // Quantiles in milliseconds, to the microsecond.
            let ms = |b: &[(f64, u64)], q: f64| (quantile(b, q) * 1e6).round() / 1e3;
            let (caller_p50_ms, caller_p99_ms) = (ms(&seen, 0.5), ms(&seen, 0.99));
            let (callee_p50_ms, callee_p99_ms) = (ms(&handled, 0.5), ms(&handled, 0.99));
            let hop = Hop {
                calls,
                caller_p50_ms,
                caller_p99_ms,
                callee_p50_ms,
                callee_p99_ms,
                added_p50_ms: ((caller_p50_ms - callee_p50_ms) * 1e3).round() / 1e3,
                added_p99_ms: ((caller_p99_ms - callee_p99_ms) * 1e3).round() / 1e3,
            };
            hops.insert(format!("{caller}→{callee}"), hop);
        }
    }
    hops
}

/// Cumulative bucket counts of `metric` by upper bound, summed over the
/// series whose label matches `label` (all series when `None`).
fn buckets(text: &str, metric: &str, label: Option<(&str, &str)>) -> Vec<(f64, u64)> {
    let prefix = format!("{metric}_bucket{{");
    let mut by_bound: BTreeMap<u64, (f64, u64)> = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with(&prefix)) {
        let Some((labels, value)) = line[prefix.len()..].split_once("} ") else {
            continue;
        };
        if let Some((name, wanted)) = label {
            if !labels.split(',').any(|l| l == format!("{name}=\"{wanted}\"")) {
                continue;
            }
        }
        let Some(bound) = labels
            .split(',')
            .find_map(|l| l.strip_prefix("le=\""))
            .and_then(|b| b.strip_suffix('"'))
        else {
            continue;
        };
        let bound = if bound == "+Inf" {
            f64::INFINITY
        } else {
            bound.parse().unwrap_or(f64::NAN)
        };
        let Ok(count) = value.trim().parse::<f64>() else {
            continue;
        };
        let entry = by_bound.entry(bound.to_bits()).or_insert((bound, 0));
        entry.1 += count as u64;
    }
    let mut all: Vec<(f64, u64)> = by_bound.into_values().filter(|(b, _)| !b.is_nan()).collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    all
}

/// `after - before`, bound by bound.
fn delta(after: &[(f64, u64)], before: &[(f64, u64)]) -> Vec<(f64, u64)> {
    after
        .iter()
        .map(|(bound, n)| {
            let earlier = before.iter().find(|(b, _)| b == bound).map_or(0, |(_, n)| *n);
            (*bound, n.saturating_sub(earlier))
        })
        .collect()
}

/// The `q` quantile in seconds, interpolated within its bucket.
fn quantile(cumulative: &[(f64, u64)], q: f64) -> f64 {
    let Some(&(_, total)) = cumulative.last() else {
        return 0.0;
    };
    if total == 0 {
        return 0.0;
    }
    let rank = q * total as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for &(bound, count) in cumulative {
        if count as f64 >= rank {
            if bound.is_infinite() {
                return lower;
            }
            let within = (count - below) as f64;
            let fraction = if within > 0.0 {
                (rank - below as f64) / within
            } else {
                1.0
            };
            return lower + (bound - lower) * fraction;
        }
        lower = bound;
        below = count;
    }
    lower
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_read_from_the_buckets_of_one_peer() {
        let text = "peer_call_seconds_bucket{peer=\"comment-service\",le=\"0.0001\"} 10\n\
                    peer_call_seconds_bucket{peer=\"comment-service\",le=\"0.0002\"} 90\n\
                    peer_call_seconds_bucket{peer=\"comment-service\",le=\"+Inf\"} 100\n\
                    peer_call_seconds_bucket{peer=\"user-service\",le=\"0.0001\"} 1000\n";
        let b = buckets(text, "peer_call_seconds", Some(("peer", "comment-service")));
        assert_eq!(b, [(0.0001, 10), (0.0002, 90), (f64::INFINITY, 100)]);
        // The 50th of 100 lies half way through the second bucket.
        assert!((quantile(&b, 0.5) - 0.00015).abs() < 1e-9);
        let d = delta(&b, &[(0.0001, 10), (0.0002, 10), (f64::INFINITY, 10)]);
        assert_eq!(d, [(0.0001, 0), (0.0002, 80), (f64::INFINITY, 90)]);
    }
}
