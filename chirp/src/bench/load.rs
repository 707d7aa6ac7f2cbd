//! Load generation: closed loop (N callers, each sending its next request
//! when the last one answers) and open loop (requests sent on a fixed
//! schedule whatever the answers, latency measured from when each request
//! was due, as wrk2 does, so a stall is not hidden by the requests it kept
//! from being sent).

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use hdrhistogram::Histogram;
use tokio::time::Instant;

/// How requests are issued.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// `concurrency` callers, back to back.
    Closed { concurrency: usize },
    /// `rate` requests a second on schedule; at most `max_in_flight` wait at
    /// once (a request over that waits for a slot, and the wait counts).
    Open { rate: f64, max_in_flight: usize },
}

/// What one run measured (warm-up excluded).
pub struct Measured {
    /// Latencies in microseconds.
    pub latency: Histogram<u64>,
    pub ok: u64,
    /// Failed calls by gRPC code (or error kind).
    pub errors: BTreeMap<String, u64>,
    pub elapsed: Duration,
}

impl Measured {
    fn new() -> Self {
        Self {
            latency: new_histogram(),
            ok: 0,
            errors: BTreeMap::new(),
            elapsed: Duration::ZERO,
        }
    }

    fn record(&mut self, latency: Duration, result: Result<(), String>) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
        // Saturates at the histogram's top (a minute), which no healthy run
        // reaches.
        self.latency.saturating_record(micros);
        match result {
            Ok(()) => self.ok += 1,
            Err(code) => *self.errors.entry(code).or_default() += 1,
        }
    }

    fn merge(&mut self, other: &Self) {
        // Same bounds on both sides: adding cannot fail.
        let _ = self.latency.add(&other.latency);
        self.ok += other.ok;
        for (code, n) in &other.errors {
            *self.errors.entry(code.clone()).or_default() += n;
        }
    }

    /// Completed calls a second, failures included.
    #[must_use]
    pub fn throughput(&self) -> f64 {
        self.latency.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant digits; these bounds are valid.
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| unreachable!("valid histogram bounds"))
}

/// Runs `call(worker, sequence)` under `mode` for `warmup` + `duration` and
/// measures the `duration` part. `tick` is called about every 100 ms with
/// the fraction done, for a progress bar.
pub async fn run<F, Fut>(
    mode: Mode,
    warmup: Duration,
    duration: Duration,
    call: F,
    tick: impl Fn(f64) + Send + Sync + 'static,
) -> Measured
where
    F: Fn(u64, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let call = Arc::new(call);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let ticker = tokio::spawn(async move {
        let total = (end - start).as_secs_f64().max(1e-9);
        loop {
            let done = start.elapsed().as_secs_f64() / total;
            tick(done.min(1.0));
            if done >= 1.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut measured = match mode {
        Mode::Closed { concurrency } => closed(concurrency, measure_from, end, call).await,
        Mode::Open { rate, max_in_flight } => open(rate, max_in_flight, measure_from, end, call).await,
    };
    measured.elapsed = duration;
    ticker.abort();
    measured
}

async fn closed<F, Fut>(concurrency: usize, measure_from: Instant, end: Instant, call: Arc<F>) -> Measured
where
    F: Fn(u64, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let workers: Vec<_> = (0..concurrency as u64)
        .map(|worker| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut measured = Measured::new();
                let mut sequence = 0;
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let result = call(worker, sequence).await;
                    sequence += 1;
                    if sent >= measure_from {
                        measured.record(sent.elapsed(), result);
                    }
                }
                measured
            })
        })
        .collect();
    let mut all = Measured::new();
    for worker in workers {
        if let Ok(measured) = worker.await {
            all.merge(&measured);
        }
    }
    all
}

async fn open<F, Fut>(rate: f64, max_in_flight: usize, measure_from: Instant, end: Instant, call: Arc<F>) -> Measured
where
    F: Fn(u64, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let measured = Arc::new(Mutex::new(Measured::new()));
    let slots = Arc::new(tokio::sync::Semaphore::new(max_in_flight.max(1)));
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut sequence: u64 = 0;
    loop {
        // When the request is due, not when it could be sent.
        let due = start + interval.mul_f64(sequence as f64);
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due).await;
        let (call, slots, measured) = (call.clone(), slots.clone(), measured.clone());
        let worker = sequence % max_in_flight.max(1) as u64;
        tasks.spawn(async move {
            let Ok(_slot) = slots.acquire_owned().await else {
                return;
            };
            let result = call(worker, sequence).await;
            if due >= measure_from {
                if let Ok(mut measured) = measured.lock() {
                    measured.record(due.elapsed(), result);
                }
            }
        });
        sequence += 1;
        // Reap finished tasks as we go, so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mut all = Measured::new();
    if let Ok(measured) = measured.lock() {
        all.merge(&measured);
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_loop_counts_every_answer_and_error_after_the_warm_up() {
        let measured = run(
            Mode::Closed { concurrency: 4 },
            Duration::from_millis(100),
            Duration::from_millis(300),
            |_, sequence| async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                if sequence % 10 == 0 {
                    Err("Unavailable".to_owned())
                } else {
                    Ok(())
                }
            },
            |_| {},
        )
        .await;
        let total = measured.latency.len();
        assert!(total > 100, "{total}");
        assert_eq!(measured.ok + measured.errors["Unavailable"], total);
        assert!(measured.latency.value_at_quantile(0.5) >= 2_000);
    }

    #[tokio::test]
    async fn an_open_loop_charges_a_stall_to_every_request_it_delayed() {
        // 200 requests a second, one slot: a call that takes 50 ms makes the
        // ones due behind it wait, and their latency says so.
        let measured = run(
            Mode::Open {
                rate: 200.0,
                max_in_flight: 1,
            },
            Duration::ZERO,
            Duration::from_millis(500),
            |_, _| async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(())
            },
            |_| {},
        )
        .await;
        assert!(
            measured.latency.max() > 1_000_000 / 4,
            "the queue behind a slow call is visible: max {} µs",
            measured.latency.max()
        );
    }
}
