//! The agent's health endpoint (`--health-listen`): `GET /healthz` answers
//! 200 once the eBPF programs are attached and 503 before that, after a
//! failure and while stopping — what Kubernetes probes ask — with one line
//! per signal saying whether it runs, in which mode, and why not;
//! `GET /metrics` says the same as `fathom_agent_signal_up{signal,mode}`.
//!
//! A thread with a blocking std listener: it works in every daemon mode
//! (there is no async runtime with `--collector-url` or `--output-dir`) and
//! reads at most one small request head per connection.
use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

/// Where the agent is in its life, as the endpoint reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthState {
    /// Checking, loading and attaching programs.
    Starting,
    /// Every requested signal's programs are attached.
    Ready,
    /// Shutting down after a signal.
    Stopping,
    /// Start or run failed; the reason.
    Failed(String),
}

/// One signal as it runs (or does not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignalStatus {
    /// `profiles`, `traces`, `network`.
    pub signal: &'static str,
    /// How it runs (`tables`, `frame-pointers`, `capture+inject`,
    /// `capture`, …), or `off` when it does not.
    pub mode: String,
    pub up: bool,
    /// Why it is down or degraded, in one sentence.
    pub reason: Option<String>,
}

/// Shared handle the daemon updates; cheap to clone.
#[derive(Clone, Debug)]
pub struct Health(
    Arc<Mutex<(HealthState, Vec<SignalStatus>)>>,
    /// Each signal's own `/metrics` lines (Prometheus text), by signal.
    Arc<Mutex<std::collections::BTreeMap<&'static str, String>>>,
);

impl Default for Health {
    fn default() -> Self {
        Self(
            Arc::new(Mutex::new((HealthState::Starting, Vec::new()))),
            Arc::default(),
        )
    }
}

impl Health {
    pub fn set(&self, state: HealthState) {
        if let Ok(mut s) = self.0.lock() {
            if s.0 != state {
                tracing::info!(state = ?state, "health");
            }
            s.0 = state;
        }
    }

    pub fn state(&self) -> HealthState {
        self.0
            .lock()
            .map(|s| s.0.clone())
            .unwrap_or_else(|_| HealthState::Failed("health state poisoned".into()))
    }

    /// Records how a signal runs, replacing what was said of it before.
    pub fn set_signal(&self, status: SignalStatus) {
        if let Ok(mut s) = self.0.lock() {
            s.1.retain(|x| x.signal != status.signal);
            s.1.push(status);
        }
    }

    pub fn signals(&self) -> Vec<SignalStatus> {
        self.0.lock().map(|s| s.1.clone()).unwrap_or_default()
    }

    /// Replaces what `signal` adds to `/metrics` (Prometheus text lines,
    /// each ending in a newline).
    pub fn set_metrics(&self, signal: &'static str, text: String) {
        if let Ok(mut m) = self.1.lock() {
            m.insert(signal, text);
        }
    }

    /// The signals' own `/metrics` lines.
    pub fn metrics(&self) -> String {
        self.1
            .lock()
            .map(|m| m.values().map(String::as_str).collect())
            .unwrap_or_default()
    }
}

/// `/metrics`: one `fathom_agent_signal_up` sample per signal.
pub fn signal_metrics(signals: &[SignalStatus]) -> String {
    let mut out = String::from(
        "# HELP fathom_agent_signal_up Whether a signal runs (1) or not (0), and in which mode.\n\
         # TYPE fathom_agent_signal_up gauge\n",
    );
    for s in signals {
        out.push_str(&format!(
            "fathom_agent_signal_up{{signal=\"{}\",mode=\"{}\"}} {}\n",
            s.signal,
            s.mode,
            u8::from(s.up)
        ));
    }
    out
}

/// `/healthz`'s lines after the first: one per signal.
fn signal_lines(signals: &[SignalStatus]) -> String {
    let mut out = String::new();
    for s in signals {
        let state = if !s.up {
            "down"
        } else if s.reason.is_some() {
            "degraded"
        } else {
            "up"
        };
        out.push_str(&format!("{}: {state} ({})", s.signal, s.mode));
        if let Some(reason) = &s.reason {
            out.push_str(&format!(": {reason}"));
        }
        out.push('\n');
    }
    out
}

/// Largest request head read; probes send a few hundred bytes.
const MAX_HEAD: usize = 4096;

/// The response to one request head (`GET /healthz HTTP/1.1\r\n...`): status
/// code and body. Pure, so it is tested without sockets.
pub fn respond(head: &[u8], state: &HealthState) -> (u16, String) {
    respond_with(head, state, &[])
}

/// [`respond`], with the signals' lines and `/metrics`.
pub fn respond_with(head: &[u8], state: &HealthState, signals: &[SignalStatus]) -> (u16, String) {
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .or_else(|| head.iter().position(|&b| b == b'\n'));
    let Some(line) = line_end.and_then(|end| std::str::from_utf8(&head[..end]).ok()) else {
        return (400, "bad request\n".into());
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return (400, "bad request\n".into());
    };
    if !version.starts_with("HTTP/1.") {
        return (400, "bad request\n".into());
    }
    let path = target.split('?').next().unwrap_or(target);
    if path != "/healthz" && path != "/metrics" {
        return (404, "not found\n".into());
    }
    if method != "GET" && method != "HEAD" {
        return (405, "method not allowed\n".into());
    }
    if path == "/metrics" {
        return (200, signal_metrics(signals));
    }
    let (code, first) = match state {
        HealthState::Ready => (200, "ok\n".into()),
        HealthState::Starting => (503, "starting\n".into()),
        HealthState::Stopping => (503, "stopping\n".into()),
        HealthState::Failed(why) => (503, format!("failed: {why}\n")),
    };
    (code, first + &signal_lines(signals))
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    }
}

/// The running endpoint; dropping it stops the thread.
#[derive(Debug)]
pub struct HealthServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HealthServer {
    /// Binds `addr` (port 0 picks one) and serves `health` on a thread.
    pub fn start(addr: SocketAddr, health: Health) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("fathom-health".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stopped.load(Ordering::Relaxed) {
                        break;
                    }
                    match conn {
                        Ok(stream) => {
                            if let Err(e) = serve_one(stream, &health) {
                                tracing::debug!(error = %e, "health request");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "health endpoint: accept failed");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })?;
        tracing::info!(%addr, "health endpoint at /healthz");
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking accept; an unspecified address is reached on loopback.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        if TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_ok()
            && let Some(t) = self.thread.take()
        {
            let _ = t.join();
        }
    }
}

fn serve_one(mut stream: TcpStream, health: &Health) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while head.len() < MAX_HEAD && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let (code, mut body) = respond_with(&head, &health.state(), &health.signals());
    if code == 200 && body.starts_with("# HELP fathom_agent_signal_up") {
        body.push_str(&health.metrics());
    }
    let head_only = head.starts_with(b"HEAD ");
    let mut out = format!(
        "HTTP/1.1 {code} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        reason(code),
        body.len()
    );
    if !head_only {
        out.push_str(&body);
    }
    stream.write_all(out.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn answers_follow_the_state() {
        let ok = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(
            respond(ok, &HealthState::Starting),
            (503, "starting\n".into())
        );
        assert_eq!(respond(ok, &HealthState::Ready), (200, "ok\n".into()));
        assert_eq!(
            respond(ok, &HealthState::Stopping),
            (503, "stopping\n".into())
        );
        assert_eq!(
            respond(ok, &HealthState::Failed("attach: EPERM".into())),
            (503, "failed: attach: EPERM\n".into())
        );
        assert_eq!(
            respond(b"GET /healthz?verbose=1 HTTP/1.0\n\n", &HealthState::Ready).0,
            200
        );
        assert_eq!(
            respond(b"GET /metricz HTTP/1.1\r\n\r\n", &HealthState::Ready).0,
            404
        );
        assert_eq!(
            respond(b"POST /healthz HTTP/1.1\r\n\r\n", &HealthState::Ready).0,
            405
        );
        for bad in [
            &b""[..],
            b"GET /healthz",
            b"GET /healthz HTTP/1.1 extra\r\n",
            b"GET /healthz SPDY/3\r\n",
            b"\xff\xfe /healthz HTTP/1.1\r\n",
        ] {
            assert_eq!(respond(bad, &HealthState::Ready).0, 400, "{bad:?}");
        }
    }

    #[test]
    fn signals_show_in_healthz_and_metrics() {
        let signals = [
            SignalStatus {
                signal: "profiles",
                mode: "frame-pointers".into(),
                up: true,
                reason: Some("the table unwinder could not load".into()),
            },
            SignalStatus {
                signal: "traces",
                mode: "off".into(),
                up: false,
                reason: Some("no tracefs".into()),
            },
            SignalStatus {
                signal: "network",
                mode: "tc".into(),
                up: true,
                reason: None,
            },
        ];
        let (code, body) = respond_with(
            b"GET /healthz HTTP/1.1\r\n\r\n",
            &HealthState::Ready,
            &signals,
        );
        assert_eq!(code, 200);
        assert_eq!(
            body,
            "ok\nprofiles: degraded (frame-pointers): the table unwinder could not load\n\
             traces: down (off): no tracefs\nnetwork: up (tc)\n"
        );
        let (code, body) = respond_with(
            b"GET /metrics HTTP/1.1\r\n\r\n",
            &HealthState::Ready,
            &signals,
        );
        assert_eq!(code, 200);
        assert!(
            body.contains(
                "fathom_agent_signal_up{signal=\"profiles\",mode=\"frame-pointers\"} 1\n"
            )
        );
        assert!(body.contains("fathom_agent_signal_up{signal=\"traces\",mode=\"off\"} 0\n"));
        assert!(body.contains("fathom_agent_signal_up{signal=\"network\",mode=\"tc\"} 1\n"));
    }

    #[test]
    fn serves_over_tcp_and_stops_on_drop() {
        let health = Health::default();
        let server = HealthServer::start("127.0.0.1:0".parse().unwrap(), health.clone()).unwrap();
        let addr = server.addr();
        let req = "GET /healthz HTTP/1.1\r\nHost: probe\r\nUser-Agent: kube-probe/1.33\r\n\r\n";
        let r = get(addr, req);
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\nstarting\n"), "{r}");
        health.set(HealthState::Ready);
        let r = get(addr, req);
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("content-length: 3\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\nok\n"), "{r}");
        let r = get(addr, "HEAD /healthz HTTP/1.1\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\n"),
            "{r}"
        );
        health.set(HealthState::Failed("tracing: attach failed".into()));
        let r = get(addr, req);
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
        assert!(r.ends_with("failed: tracing: attach failed\n"), "{r}");
        // A client that sends nothing and hangs up does not stop the server.
        drop(TcpStream::connect(addr).unwrap());
        assert!(get(addr, req).starts_with("HTTP/1.1 503 "));
        drop(server);
        assert!(
            TcpStream::connect(addr).is_err(),
            "the listener is closed after drop"
        );
    }
}
