//! The live page of `chirp up`, in a real browser: Debian's headless
//! Chromium driven through ChromeDriver (WebDriver). The page is loaded
//! against a running mesh, parts are stopped and slowed from its buttons,
//! and what it shows is read back from its DOM. Screenshots of each step are
//! kept under `target/tmp/page/`.

mod common;

use std::{
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{free_port_base, Up};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const PARTS: [&str; 7] = [
    "postgres",
    "mongodb",
    "redis",
    "user-service",
    "message-service",
    "comment-service",
    "analytics-service",
];

/// ChromeDriver on a free port; killed when dropped, with the profile and
/// scratch directories it and the browser made (all under `scratch`).
struct Driver {
    child: Child,
    port: u16,
    scratch: tempfile::TempDir,
}

impl Driver {
    fn start() -> Self {
        let binary = which::which("chromedriver")
            .expect("chromedriver is installed (scripts/install-deps installs chromium and chromium-driver)");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let scratch = tempfile::tempdir().unwrap();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .env("TMPDIR", scratch.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver does not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, port, scratch }
    }

    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        let chromium = which::which("chromium").unwrap_or_else(|_| "/usr/bin/chromium".into());
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                // No sandbox: CI runs as root, where Chromium's sandbox
                // refuses to start.
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                         "--disable-gpu", "--window-size=1500,980",
                         format!("--user-data-dir={}", self.scratch.path().join("profile").display())],
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a browser session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("page");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(browser: &Client, name: &str) {
    let png = browser.screenshot().await.expect("a screenshot");
    let path = artifacts().join(format!("{name}.png"));
    std::fs::write(&path, png).unwrap();
    println!("screenshot: {}", path.display());
}

/// What the page shows now, read from its DOM.
async fn shown(browser: &Client) -> Value {
    browser
        .execute(
            r##"
            const nodes = {};
            for (const g of document.querySelectorAll("g.node")) {
              nodes[g.id.slice(5)] = { healthy: g.dataset.healthy, api: g.dataset.api ?? null, store: g.dataset.store ?? null,
                                       text: g.textContent };
            }
            const edges = {};
            for (const e of document.querySelectorAll("[id^=edge-]")) {
              if (!e.id.endsWith("-label")) edges[e.id.slice(5)] = e.dataset.state;
            }
            const recent = [...document.querySelectorAll("#recent tbody tr")].map((r) => ({
              at: Number(r.dataset.at), rpc: r.dataset.rpc, degraded: r.dataset.degraded, comments: r.dataset.comments ?? null,
              failed: r.dataset.failed }));
            return { at: Number(document.body.dataset.at || 0), nodes, edges, recent,
                     message: document.getElementById("message").textContent,
                     load: document.getElementById("load-state").textContent };
            "##,
            vec![],
        )
        .await
        .expect("the page answers a script")
}

/// Polls the page until `check` holds; what it showed then, and how long it
/// took. Panics with the last view after `bound`.
async fn until(browser: &Client, bound: Duration, what: &str, check: impl Fn(&Value) -> bool) -> (Value, Duration) {
    let start = Instant::now();
    loop {
        let view = shown(browser).await;
        if check(&view) {
            return (view, start.elapsed());
        }
        assert!(
            start.elapsed() < bound,
            "{what}: not shown within {bound:?}; the page shows {view:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clicks a button of the page; the browser's clock then, in Unix
/// milliseconds (the machine's clock, as the requests' times are).
async fn click(browser: &Client, id: &str) -> i64 {
    let now = browser
        .execute("return Date.now();", vec![])
        .await
        .ok()
        .and_then(|v| v.as_i64())
        .expect("the browser tells the time");
    browser
        .find(Locator::Id(id))
        .await
        .unwrap_or_else(|err| panic!("no #{id} on the page: {err}"))
        .click()
        .await
        .unwrap_or_else(|err| panic!("#{id} cannot be clicked: {err}"));
    now
}

/// The requests the page lists that were sent after `since`.
fn sent_after(view: &Value, since: i64) -> Vec<&Value> {
    view["recent"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter(|r| r["at"].as_i64().is_some_and(|at| at > since))
                .collect()
        })
        .unwrap_or_default()
}

fn node<'v>(view: &'v Value, part: &str) -> &'v Value {
    &view["nodes"][part]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_a_store_stopped_and_slowed_from_its_buttons_and_the_mesh_recovering() {
    let data = tempfile::tempdir().unwrap();
    // PostgreSQL may run as another user, who must reach the data directory.
    std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let base = free_port_base();
    let up = Up::start(data.path(), base);
    let page = format!("http://127.0.0.1:{base}/");
    assert!(up.output().contains(&format!("watch it live: {page}")), "{}", up.tail());

    let driver = Driver::start();
    let browser = driver.browser().await;
    browser.goto(&page).await.expect("the page loads");

    // All seven parts healthy, every service SERVING with its store up.
    let (view, took) = until(&browser, Duration::from_secs(30), "all seven parts healthy", |v| {
        PARTS.iter().all(|p| node(v, p)["healthy"] == "true")
    })
    .await;
    println!("all seven parts healthy after {took:?}");
    for service in &PARTS[3..] {
        assert_eq!(node(&view, service)["api"], "SERVING", "{view:#}");
        assert_eq!(node(&view, service)["store"], "up", "{view:#}");
    }
    assert_eq!(
        view["edges"]["message-service--comment-service"], "idle",
        "no traffic yet: {view:#}"
    );

    // Traffic from the page's button moves the edges.
    click(&browser, "btn-load").await;
    let (view, took) = until(&browser, Duration::from_secs(20), "traffic on the edges", |v| {
        v["edges"]["message-service--comment-service"] == "ok"
            && v["edges"]["message-service--mongodb"] == "ok"
            && v["recent"].as_array().is_some_and(|r| r.len() >= 12)
    })
    .await;
    println!("traffic shown after {took:?}: {}", view["load"]);
    assert!(
        view["recent"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["failed"] == "false"),
        "a healthy mesh fails no request: {view:#}"
    );
    screenshot(&browser, "healthy").await;

    // Stop redis: comment-service turns NOT_SERVING, the edge from
    // message-service to it shows errors, message-service keeps serving.
    click(&browser, "btn-stop-redis").await;
    let (view, took) = until(&browser, Duration::from_secs(3), "redis stopped", |v| {
        node(v, "comment-service")["api"] == "NOT_SERVING"
            && v["edges"]["message-service--comment-service"] == "error"
            && node(v, "redis")["healthy"] == "false"
    })
    .await;
    println!("redis stop shown after {took:?}");
    assert_eq!(node(&view, "message-service")["api"], "SERVING", "{view:#}");
    assert_eq!(node(&view, "message-service")["healthy"], "true", "{view:#}");
    screenshot(&browser, "redis-stopped").await;

    // Start it again: everything recovers.
    click(&browser, "btn-start-redis").await;
    let (_, took) = until(&browser, Duration::from_secs(30), "redis started again", |v| {
        PARTS.iter().all(|p| node(v, p)["healthy"] == "true") && node(v, "comment-service")["api"] == "SERVING"
    })
    .await;
    println!("recovery shown after {took:?}");

    // 300 ms on the way to redis: comment-service answers too late for
    // message-service's deadline, whose replies come back with the comments
    // part UNAVAILABLE (the degraded marker), while message-service serves.
    let slowed = click(&browser, "btn-slow-redis").await;
    let (view, took) = until(&browser, Duration::from_secs(15), "the comments part degraded", |v| {
        node(v, "redis")["text"]
            .as_str()
            .is_some_and(|t| t.contains("slow 300ms"))
            && sent_after(v, slowed + 500)
                .iter()
                .any(|row| row["comments"] == "UNAVAILABLE" && row["degraded"] == "true" && row["failed"] == "false")
    })
    .await;
    println!("degraded replies shown after {took:?}");
    assert_eq!(node(&view, "message-service")["api"], "SERVING", "{view:#}");
    screenshot(&browser, "latency-injected").await;

    // Heal: replies are whole again.
    let healed = click(&browser, "btn-heal").await;
    let (_, took) = until(&browser, Duration::from_secs(20), "whole replies after heal", |v| {
        !node(v, "redis")["text"].as_str().unwrap_or_default().contains("slow")
            && sent_after(v, healed + 1000).iter().any(|row| row["comments"] == "OK")
    })
    .await;
    println!("whole replies again after {took:?}");

    click(&browser, "btn-load").await;
    until(&browser, Duration::from_secs(5), "traffic off", |v| {
        v["load"] == "traffic off"
    })
    .await;
    browser.close().await.expect("the session closes");
    drop(driver);
    up.stop();
}

#[tokio::test]
async fn the_page_refuses_commands_from_another_origin_and_the_cli_drives_the_same_faults() {
    let data = tempfile::tempdir().unwrap();
    std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let base = free_port_base();
    let up = Up::start_with(data.path(), base, &["--no-seed"]);

    let post = |origin: &str| {
        let body = r#"{"command":"stop redis"}"#;
        let request = format!(
            "POST /api/command HTTP/1.1\r\nHost: 127.0.0.1:{base}\r\nOrigin: {origin}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", base)).unwrap();
        std::io::Write::write_all(&mut stream, request.as_bytes()).unwrap();
        let mut reply = String::new();
        std::io::Read::read_to_string(&mut stream, &mut reply).unwrap();
        reply
    };
    let refused = post("http://evil.example");
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert_eq!(
        up.part("redis")["state"],
        "running",
        "a refused command changes nothing"
    );

    // The CLI sets and clears the same faults the page shows.
    let (code, out) = up.run(&["chaos", "slow", "redis", "250ms"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("slow 250ms"), "{out}");
    let (code, out) = up.run(&["chaos", "flaky", "user-service", "150%"]);
    assert_ne!(code, 0, "an error rate above 100% is refused: {out}");
    // The page shows it at its next scrape.
    let redis_fault = |state: &Value| {
        state["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["id"] == "redis"))
            .map(|n| n["fault"].clone())
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = up.page_state();
        if redis_fault(&state) == "slow 250ms" {
            break;
        }
        assert!(Instant::now() < deadline, "the fault is not shown: {state:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, out) = up.run(&["chaos", "heal"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = up.run(&["load", "start", "--rate", "5"]);
    assert_eq!(code, 0, "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = up.page_state();
        if state["load"] == json!(5.0)
            && redis_fault(&state).is_null()
            && state["recent"].as_array().is_some_and(|r| !r.is_empty())
        {
            break;
        }
        assert!(Instant::now() < deadline, "no traffic or a fault left: {state:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, out) = up.run(&["load", "stop"]);
    assert_eq!(code, 0, "{out}");
    up.stop();
}
