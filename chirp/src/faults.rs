//! Faults on the wire: `chirp up` puts a small TCP proxy in front of every
//! part it runs, and gives the services the proxies' addresses for their
//! store and their peers. A healthy proxy only copies bytes; `chirp chaos
//! slow` and `flaky` make it late or unreliable, so that a slow store or a
//! flaky peer can be shown without touching the part itself. Clients
//! outside the mesh (grpcurl, `chirp get`, the page's traffic) reach the
//! services directly, as they would reach a Kubernetes Service: the faults
//! are between the parts, where the pattern's isolation is tested.

use std::{
    fmt,
    sync::{Arc, RwLock},
    time::Duration,
};

use rand::Rng as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::Instant,
};

/// What a proxy does to the bytes it carries.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Fault {
    #[default]
    None,
    /// Every reply is held this long before it is passed on (requests go
    /// through at once), so each round trip takes this much longer.
    Slow(Duration),
    /// Each new connection is refused with this probability, and each chunk
    /// a caller sends cuts its connection with this probability.
    Flaky(f64),
}

impl Fault {
    /// The bound on injected latency: past a minute nothing in the mesh is
    /// still waiting, and a held chunk keeps memory.
    pub const MAX_LATENCY: Duration = Duration::from_secs(60);

    /// `slow 300ms` / `flaky 0.2` / `heal`, as typed after the part.
    ///
    /// # Errors
    /// When the value is missing or out of range.
    pub fn parse(kind: &str, value: &str) -> Result<Self, String> {
        match kind {
            "slow" => {
                let latency = service_kit::config::parse_duration(value)
                    .map_err(|_| format!("`{value}`: a latency such as 300ms or 2s"))?;
                if latency.is_zero() || latency > Self::MAX_LATENCY {
                    return Err(format!("`{value}`: a latency above 0 and at most 60s"));
                }
                Ok(Self::Slow(latency))
            }
            "flaky" => {
                let rate = value
                    .strip_suffix('%')
                    .map_or_else(|| value.parse::<f64>(), |p| p.parse::<f64>().map(|p| p / 100.0))
                    .ok()
                    .filter(|r| *r > 0.0 && *r <= 1.0)
                    .ok_or_else(|| format!("`{value}`: an error rate such as 0.2 or 20%, above 0 and at most 1"))?;
                Ok(Self::Flaky(rate))
            }
            "heal" => Ok(Self::None),
            _ => Err(format!("unknown fault `{kind}`")),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Slow(latency) => write!(f, "slow {}ms", latency.as_millis()),
            Self::Flaky(rate) => write!(f, "flaky {:.0}%", rate * 100.0),
        }
    }
}

/// The fault of one proxy, changed by chaos commands and read by every
/// connection it carries at every chunk, so a change applies at once, to
/// pooled connections too.
#[derive(Clone, Default)]
pub struct Switch(Arc<RwLock<Fault>>);

impl Switch {
    #[must_use]
    pub fn get(&self) -> Fault {
        *self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn set(&self, fault: Fault) {
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = fault;
    }

    /// Whether a connection (or a chunk) is to be cut now.
    fn cut(&self) -> bool {
        match self.get() {
            Fault::Flaky(rate) => rand::thread_rng().gen_bool(rate.clamp(0.0, 1.0)),
            _ => false,
        }
    }

    fn delay(&self) -> Duration {
        match self.get() {
            Fault::Slow(latency) => latency,
            _ => Duration::ZERO,
        }
    }
}

/// Serves `listener` for as long as the task lives, carrying each
/// connection to `upstream` on this machine.
///
/// While the part is down the proxy does not listen either: a caller must
/// see its connection refused, as it would without a proxy (a listening
/// proxy would accept and then close, which clients take for a broken peer
/// rather than a missing one, and keep trying). So the first connection
/// that cannot reach the part closes the listener, and the proxy listens
/// again once the part accepts connections.
pub async fn proxy(listener: TcpListener, upstream: u16, switch: Switch) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    let mut listener = Some(listener);
    loop {
        let Some(serving) = listener.take() else {
            wait_for(upstream).await;
            listener = rebind(port).await;
            continue;
        };
        serve(serving, upstream, &switch).await;
    }
}

/// Carries connections until one finds the part gone.
async fn serve(listener: TcpListener, upstream: u16, switch: &Switch) {
    let gone = Arc::new(tokio::sync::Notify::new());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = gone.notified() => return,
        };
        let Ok((inbound, _)) = accepted else {
            // Out of file descriptors, most likely: wait rather than spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if switch.cut() {
            continue; // dropped: the caller sees the connection closed
        }
        let outbound = match TcpStream::connect(("127.0.0.1", upstream)).await {
            Ok(outbound) => outbound,
            Err(_) => {
                gone.notify_one();
                continue;
            }
        };
        let switch = switch.clone();
        tokio::spawn(async move { carry(inbound, outbound, &switch).await });
    }
}

async fn wait_for(upstream: u16) {
    while TcpStream::connect(("127.0.0.1", upstream)).await.is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The proxy's port again; `None` (and another wait) if something else
/// took it meanwhile.
async fn rebind(port: u16) -> Option<TcpListener> {
    for _ in 0..100 {
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)).await {
            return Some(listener);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("[chirp] the fault proxy on port {port} cannot listen again; retrying");
    None
}

async fn carry(inbound: TcpStream, outbound: TcpStream, switch: &Switch) {
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (from_caller, to_caller) = inbound.into_split();
    let (from_part, to_part) = outbound.into_split();
    // Either direction ending ends the connection: none of the protocols
    // carried here (HTTP/2, PostgreSQL, RESP, MongoDB's) goes on
    // half-closed.
    tokio::select! {
        () = requests(from_caller, to_part, switch) => {}
        () = replies(from_part, to_caller, switch) => {}
    }
}

const CHUNK: usize = 16 * 1024;

/// Caller → part: passed on at once, unless the fault cuts it.
async fn requests(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, switch: &Switch) {
    let mut buf = vec![0; CHUNK];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if switch.cut() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Part → caller: each chunk leaves `delay` after it arrived. Chunks are
/// queued rather than slept on one by one, so a reply in many chunks is
/// late by the delay once, not once per chunk; the queue is bounded, so a
/// slow link pushes back on the part instead of buffering without end.
async fn replies(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, switch: &Switch) {
    let (queue, mut due) = mpsc::channel::<(Instant, Vec<u8>)>(64);
    let read = async move {
        let mut buf = vec![0; CHUNK];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if queue
                .send((Instant::now() + switch.delay(), buf[..n].to_vec()))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let write = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    // The writer drains what was read before the part closed.
    tokio::join!(read, write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_from_what_an_operator_types() {
        assert_eq!(
            Fault::parse("slow", "300ms"),
            Ok(Fault::Slow(Duration::from_millis(300)))
        );
        assert_eq!(Fault::parse("flaky", "0.25"), Ok(Fault::Flaky(0.25)));
        assert_eq!(Fault::parse("flaky", "20%"), Ok(Fault::Flaky(0.2)));
        assert_eq!(Fault::parse("heal", ""), Ok(Fault::None));
        for (kind, value) in [
            ("slow", "0s"),
            ("slow", "2h"),
            ("slow", "fast"),
            ("flaky", "0"),
            ("flaky", "1.5"),
            ("flaky", "NaN"),
            ("melt", "1"),
        ] {
            assert!(Fault::parse(kind, value).is_err(), "{kind} {value}");
        }
    }

    async fn echo_through(switch: Switch) -> (TcpStream, tokio::task::JoinHandle<()>) {
        let part = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = part.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = part.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = conn.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = front.local_addr().unwrap().port();
        let task = tokio::spawn(proxy(front, upstream, switch));
        (TcpStream::connect(("127.0.0.1", port)).await.unwrap(), task)
    }

    async fn round_trip(conn: &mut TcpStream) -> Option<Duration> {
        let start = std::time::Instant::now();
        conn.write_all(b"ping").await.ok()?;
        let mut reply = [0; 4];
        conn.read_exact(&mut reply).await.ok()?;
        (&reply == b"ping").then(|| start.elapsed())
    }

    #[tokio::test]
    async fn a_slow_proxy_delays_each_reply_by_its_latency_and_a_healed_one_does_not() {
        let switch = Switch::default();
        let (mut conn, _task) = echo_through(switch.clone()).await;
        assert!(round_trip(&mut conn).await.unwrap() < Duration::from_millis(100));
        switch.set(Fault::Slow(Duration::from_millis(300)));
        // Applies to a connection already open, as a pooled one would be.
        let slow = round_trip(&mut conn).await.unwrap();
        assert!(slow >= Duration::from_millis(300), "{slow:?}");
        switch.set(Fault::None);
        assert!(round_trip(&mut conn).await.unwrap() < Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_proxy_refuses_connections_while_its_part_is_down_and_listens_again_when_it_is_back() {
        let part = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = part.local_addr().unwrap().port();
        drop(part);
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = front.local_addr().unwrap().port();
        tokio::spawn(proxy(front, upstream, Switch::default()));
        // The first caller finds the part gone; the ones after are refused.
        let _first = TcpStream::connect(("127.0.0.1", port)).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "still listening with its part down"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The part comes back on its port: the proxy listens again.
        let part = TcpListener::bind(("127.0.0.1", upstream)).await.unwrap();
        tokio::spawn(async move { while part.accept().await.is_ok() {} });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(std::time::Instant::now() < deadline, "not listening again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_flaky_proxy_cuts_connections_and_a_certain_one_cuts_every_one() {
        let switch = Switch::default();
        let (mut conn, _task) = echo_through(switch.clone()).await;
        assert!(round_trip(&mut conn).await.is_some());
        switch.set(Fault::Flaky(1.0));
        assert!(round_trip(&mut conn).await.is_none(), "the open connection is cut");
    }
}
