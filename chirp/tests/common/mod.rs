//! What the tests that run `chirp up` share: the mesh as a child process,
//! a free block of ports, the chirp CLI against it.

#![allow(dead_code)] // each test binary uses its own part of it

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tonic::transport::Channel;

pub mod world;

/// A `chirp up` run by the test; stopped (SIGINT) when dropped.
pub struct Up {
    child: Child,
    pub data_dir: PathBuf,
    pub base: u16,
    log: PathBuf,
}

pub fn chirp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_chirp"))
}

/// A block of ports that are free now: 30 for the mesh, and the 30 that
/// `--replicas` puts a second replica on.
pub fn free_port_base() -> u16 {
    // Below the kernel's ephemeral range: a port there can be taken at any
    // moment as the local end of an outgoing connection (another test's,
    // or this mesh's own), between this check and the service's bind.
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    // The block reaches 330 above its base with four replicas.
    let span = ephemeral.saturating_sub(10_000 + 400).max(1);
    for _ in 0..200 {
        let base = 10_000 + (rand_u16() % span);
        let free = (0..30)
            .chain(100..130)
            .all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if free {
            return base;
        }
    }
    panic!("no free block of ports");
}

pub fn rand_u16() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(7);
    (nanos ^ std::process::id().rotate_left(7)) as u16
}

impl Up {
    pub fn start(data_dir: &Path, base: u16) -> Self {
        Self::start_with(data_dir, base, &[])
    }

    /// `chirp up` with more arguments, once it says the mesh is up.
    pub fn start_with(data_dir: &Path, base: u16, args: &[&str]) -> Self {
        Self::start_env(data_dir, base, args, &[])
    }

    /// `chirp up` with more arguments and environment variables (which its
    /// services inherit), once it says the mesh is up.
    pub fn start_env(data_dir: &Path, base: u16, args: &[&str], env: &[(&str, &str)]) -> Self {
        let log = data_dir.join(format!("up-{}.log", rand_u16()));
        let out = std::fs::File::create(&log).unwrap();
        let child = chirp()
            .arg("up")
            .args(args)
            .envs(env.iter().copied())
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env("CHIRP_DATA_DIR", data_dir)
            .env("CHIRP_PORT_BASE", base.to_string())
            .env_remove("DATABASE_URL")
            .env_remove("REDIS_URL")
            .env_remove("MONGODB_URI")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("chirp up starts");
        let up = Self {
            child,
            data_dir: data_dir.to_owned(),
            base,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while !std::fs::read_to_string(&up.log)
            .unwrap_or_default()
            .contains("the mesh is up")
        {
            assert!(
                Instant::now() < deadline,
                "chirp up did not come up; its errors:\n{}\n…\nits last lines:\n{}",
                up.errors(),
                up.tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        up
    }

    /// Everything `chirp up` has printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The lines of what `chirp up` printed that say something failed
    /// (the first 40): a backtrace can push them out of [`Self::tail`].
    pub fn errors(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let failed = [
            "ERROR",
            "Error:",
            "error:",
            "panicked",
            "exited",
            "stopped",
            "Caused by",
        ];
        text.lines()
            .filter(|line| failed.iter().any(|word| line.contains(word)))
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Runs a chirp command against this mesh: (exit code, stdout).
    pub fn run(&self, args: &[&str]) -> (i32, String) {
        let output = chirp()
            .args(args)
            .env("CHIRP_DATA_DIR", &self.data_dir)
            .env("CHIRP_PORT_BASE", self.base.to_string())
            .env("CHIRP_CONFIG_DIR", self.data_dir.join("config"))
            .output()
            .expect("chirp runs");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr),
        )
    }

    pub fn status(&self) -> serde_json::Value {
        let (code, out) = self.run(&["status", "--json"]);
        assert_eq!(code, 0, "{out}");
        serde_json::from_str(out.trim()).expect("status JSON")
    }

    /// One process's entry in `chirp status --json` (`postgres`,
    /// `comment-service-2`, …), with what the services said of themselves
    /// under `service` when it is a service.
    pub fn part(&self, name: &str) -> serde_json::Value {
        let status = self.status();
        let find = |list: &str, key: &str| {
            status[list]
                .as_array()
                .and_then(|all| all.iter().find(|p| p[key] == name))
                .cloned()
                .unwrap_or_default()
        };
        let mut part = find("parts", "name");
        assert!(!part.is_null(), "no part {name} in {status}");
        part["service"] = find("services", "service");
        part
    }

    pub fn pid(&self, name: &str) -> i32 {
        let part = self.part(name);
        part["pid"]
            .as_i64()
            .unwrap_or_else(|| panic!("{name} has no pid: {part}")) as i32
    }

    /// What the live page shows now (`GET /api/state`).
    pub fn page_state(&self) -> serde_json::Value {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.base)).expect("the page listens");
        let request = format!(
            "GET /api/state HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
            self.base
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        let (_, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
        serde_json::from_str(body).unwrap_or_else(|err| panic!("{err}: {body}"))
    }

    pub fn channel(&self, offset: u16) -> Channel {
        Channel::from_shared(format!("http://127.0.0.1:{}", self.base + offset))
            .unwrap()
            .connect_lazy()
    }

    /// Stops with SIGINT, as Ctrl-C would; the pids it ran.
    pub fn stop(mut self) -> Vec<i32> {
        let pids: Vec<i32> = self.status()["parts"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["pid"].as_i64())
            .map(|p| p as i32)
            .collect();
        sigint(&self.child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "chirp up did not stop:\n{}", self.tail());
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(status.success(), "chirp up exited with {status}:\n{}", self.tail());
        pids
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            sigint(&self.child);
            let _ = self.child.wait();
        }
    }
}

/// Every service SERVING, every outbox empty and no erasure in progress,
/// as `chirp status --json` tells it: the mesh has settled.
pub fn settled(status: &serde_json::Value) -> bool {
    let Some(services) = status["services"].as_array() else {
        return false;
    };
    services.iter().all(|s| {
        s["serving"] == serde_json::json!(true)
            && s["outbox"]
                .as_array()
                .is_some_and(|o| o.iter().all(|entry| entry[1] == serde_json::json!(0)))
            && (s["erasures_pending"].is_null() || s["erasures_pending"] == serde_json::json!(0))
    })
}

/// SIGKILL, as a crash or the OOM killer would.
pub fn kill9(pid: i32) {
    let killed = Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    assert!(killed.success(), "kill -KILL {pid}");
}

pub fn alive(pid: i32) -> bool {
    // No signal: only asks whether the process exists.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// The processes of `pids` still running 5 s from now, or none as soon as
/// all are gone: a stopped process may take a moment to be reaped.
pub fn left_running(pids: Vec<i32>) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGINT to our own child, as Ctrl-C would send.
fn sigint(child: &Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
}
