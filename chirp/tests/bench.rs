//! A seconds-long smoke run of `chirp bench` on a mesh of its own: it works
//! and reports every column for every target. Never a judgement on speed:
//! that is for the full benchmark (BENCHMARKS.md), on a quiet machine.

use std::process::Command;

fn bench(args: &[&str]) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_chirp"))
        .args([
            "bench",
            "--fresh",
            "--json",
            "--warmup",
            "0s",
            "--users",
            "3",
            "--follows",
            "1",
        ])
        .args(["--messages", "1", "--comments", "1", "--connections", "1"])
        .args(args)
        // The demo stores would be used instead of private ones otherwise.
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env_remove("MONGODB_URI")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn chirp_bench_reports_every_column_for_every_baseline_and_rpc() {
    let report = bench(&["--duration", "400ms", "--concurrency", "4"]);
    let rows = report["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["target"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "echo",
            "pg-select",
            "redis-get",
            "redis-hset",
            "mongo-insert",
            "mongo-tx",
            "mongo-find",
            "sqlite-insert",
            "get-user",
            "add-comment",
            "list-comments",
            "count-comments",
            "check-message",
            "get-message",
            "post-message",
            "home-timeline",
            "user-timeline",
            "mixed"
        ]
    );
    for row in rows {
        let name = row["target"].as_str().unwrap();
        assert!(row["ok"].as_u64().unwrap() > 0, "{name}: {row}");
        assert_eq!(row["errors"], serde_json::json!({}), "{name}: {row}");
        for column in ["requests_per_second", "p50_ms", "p90_ms", "p99_ms", "max_ms"] {
            assert!(row[column].as_f64().unwrap() > 0.0, "{name}.{column}: {row}");
        }
        assert!(row["p50_ms"].as_f64() <= row["p99_ms"].as_f64(), "{name}: {row}");
        assert!(
            !row["cpu_us_per_request"].as_object().unwrap().is_empty(),
            "{name}: {row}"
        );
        assert_eq!(row["peak_rss_mib"].as_object().unwrap().len(), 4, "{name}: {row}");
    }
    let held: Vec<&str> = rows
        .iter()
        .filter(|r| r["ratio"].as_f64().is_some())
        .map(|r| r["target"].as_str().unwrap())
        .collect();
    assert_eq!(
        held,
        [
            "get-user",
            "add-comment",
            "list-comments",
            "count-comments",
            "get-message",
            "post-message",
            "home-timeline"
        ],
        "every RPC with a target gets its ratio"
    );
    let get_message = rows.iter().find(|r| r["target"] == "get-message").unwrap();
    for edge in ["message-service→comment-service", "message-service→user-service"] {
        let hop = &get_message["hops"][edge];
        assert!(hop["calls"].as_u64().unwrap() >= 20, "{edge}: {get_message}");
        for column in ["caller_p50_ms", "callee_p50_ms", "added_p50_ms", "added_p99_ms"] {
            assert!(hop[column].is_f64(), "{edge}.{column}: {hop}");
        }
    }
    let idle = report["idle_rss_mib"].as_object().unwrap();
    assert_eq!(idle.len(), 4, "{idle:?}");
}

#[test]
fn chirp_bench_runs_an_open_loop_at_the_rate_asked() {
    let report = bench(&["--duration", "1s", "--rate", "100", "--only", "echo,get-user"]);
    assert_eq!(report["mode"], "open loop, 100 req/s");
    for row in report["rows"].as_array().unwrap() {
        let rate = row["requests_per_second"].as_f64().unwrap();
        assert!((80.0..=120.0).contains(&rate), "{row}");
    }
}

#[test]
fn chirp_bench_floods_logins_and_reports_the_reads_beside_it_and_the_memory_after() {
    let report = bench(&[
        "--duration",
        "1s",
        "--concurrency",
        "16",
        "--only",
        "login-flood",
        "--settle",
        "0s",
    ]);
    let row = &report["rows"][0];
    assert_eq!(row["target"], "login-flood");
    let errors = row["errors"].as_object().unwrap();
    assert!(!errors.is_empty(), "wrong passwords are refused: {row}");
    for code in errors.keys() {
        assert!(
            ["Unauthenticated", "ResourceExhausted"].contains(&code.as_str()),
            "only refusals, never a failure: {row}"
        );
    }
    // Every eighth caller read users instead, and was answered.
    assert!(row["ok"].as_u64().unwrap() > 0, "{row}");
    let beside = &row["beside"];
    assert!(beside["get_user_calls"].as_u64().unwrap() > 0, "{row}");
    assert!(beside["get_user_p99_ms"].as_f64().unwrap() > 0.0, "{row}");
    assert!(beside["user_service_rss_after_mib"].as_f64().unwrap() > 1.0, "{row}");
    assert!(row["peak_rss_mib"]["user-service"].as_f64().unwrap() > 1.0, "{row}");
}
