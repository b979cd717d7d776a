//! A stand-in for the Kubernetes API server and the kubelet on loopback,
//! replaying the responses in `tests/fixtures/k8s/` (no API server can run
//! here): the pod list (`GET /api/v1/pods?fieldSelector=...`), then on
//! `watch=true` from the list's resource version the recorded events, one
//! chunk each, released by the test ([`K8sReplay::release`]), then the
//! stream stays open as a real watch does; the kubelet's `GET /pods`.
//! Every request must carry the bearer token; each is recorded.
//!
//! A small HTTP/1.1 server (keep-alive, chunked streams) on std threads:
//! the client under test is kube-rs over hyper.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

/// Node of the recorded pods.
pub const NODE: &str = "fathom-node-1";
/// Bearer token the replay expects.
pub const TOKEN: &str = "replay-service-account-token";

/// Container ids of the recorded pods (64 hex digits, no runtime prefix).
pub mod ids {
    /// `shop/checkout-6b8f9c7d5-x2x7q` container `app` before its restart.
    pub const CHECKOUT_APP: &str =
        "fb5fa51e128310e70a0cef6404c2bc649b9760f89fbfc6e5ce4697837724c9f3";
    /// ... and after it (the MODIFIED event).
    pub const CHECKOUT_APP_RESTARTED: &str =
        "4d27f5d2cd1fcd3dd86f18bc6aba994ed880c4fab7a16f8d267ef9f56368994f";
    /// Its `proxy` sidecar.
    pub const CHECKOUT_PROXY: &str =
        "88f7027dad41a49a3a1a9e6fb1db86bd806468e4d91db2434633e62c3d9729a9";
    /// Its init container `wait-db`.
    pub const CHECKOUT_INIT: &str =
        "152cf509bb0614be3934204db652cb16fe727ef031e9d9f1f7b75adbd026eaf9";
    /// `monitoring/metrics-agent-7xk2p` (DaemonSet) container `agent`.
    pub const AGENT: &str = "d4f0bc5a29de06b510f9aa428f1eedba926012b591fef7a518e776a7c9bd1824";
    /// `db/postgres-0` (StatefulSet), deleted by the DELETED event.
    pub const POSTGRES: &str = "a942b37ccfaf5a813b1432caa209a43b9d144e47ad0de1549c289c253e556cd5";
    /// `jobs/migrate-28811520-q9z7w` (Job), from the ADDED event.
    pub const MIGRATE: &str = "3bc801a33ea83df414e1aeb962a52412835be99db28668ec25de73fdd4733804";
    /// `kube-system/etcd-fathom-node-1` (a static pod), only in the kubelet's list.
    pub const ETCD: &str = "c38cbd92fce41312f3fbdce60510013b7f0d4004a03b45c8e762f98f1ed4006c";
}

/// One request the replay received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub path: String,
    /// Query parameters, percent-decoded.
    pub query: Vec<(String, String)>,
    pub authorized: bool,
}

impl Recorded {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How the API server side answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiMode {
    /// List and watch from the fixtures.
    Serve,
    /// `403 Forbidden` for every pod request (RBAC missing): only the
    /// kubelet answers.
    Forbidden,
}

struct State {
    mode: ApiMode,
    list: String,
    list_version: String,
    events: Vec<String>,
    kubelet: String,
    released: Mutex<usize>,
    cv: Condvar,
    requests: Mutex<Vec<Recorded>>,
    stop: AtomicBool,
}

/// The running replay; stops (and ends open streams) when dropped.
pub struct K8sReplay {
    pub url: String,
    state: Arc<State>,
    accept: Option<JoinHandle<()>>,
    port: u16,
}

fn fixture(name: &str) -> String {
    let path: PathBuf = crate::workspace_root()
        .join("tests/fixtures/k8s")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

impl K8sReplay {
    pub fn start(mode: ApiMode) -> Self {
        let list = fixture("pods-list.json");
        let parsed: serde_json::Value = serde_json::from_str(&list).expect("pods-list.json");
        let list_version = parsed["metadata"]["resourceVersion"]
            .as_str()
            .expect("list resourceVersion")
            .to_string();
        let events = fixture("watch-events.jsonl")
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect();
        let state = Arc::new(State {
            mode,
            list,
            list_version,
            events,
            kubelet: fixture("kubelet-pods.json"),
            released: Mutex::new(0),
            cv: Condvar::new(),
            requests: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the replay");
        let port = listener.local_addr().expect("replay address").port();
        let accept_state = Arc::clone(&state);
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if accept_state.stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let state = Arc::clone(&accept_state);
                std::thread::spawn(move || serve(conn, &state));
            }
        });
        Self {
            url: format!("http://127.0.0.1:{port}"),
            state,
            accept: Some(accept),
            port,
        }
    }

    /// Lets `n` more watch events go out.
    pub fn release(&self, n: usize) {
        *self.state.released.lock().unwrap() += n;
        self.state.cv.notify_all();
    }

    /// Lets every watch event go out.
    pub fn release_all(&self) {
        self.release(self.state.events.len());
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }
}

impl Drop for K8sReplay {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        self.state.cv.notify_all();
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let byte = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match byte {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_json(code: u16, reason: &str, message: &str) -> String {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
    .to_string()
}

fn respond(conn: &mut TcpStream, code: u16, body: &str) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        401 => "Unauthorized",
        403 => "Forbidden",
        _ => "Not Found",
    };
    write!(
        conn,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn chunk(conn: &mut TcpStream, data: &str) -> std::io::Result<()> {
    write!(conn, "{:x}\r\n{data}\r\n", data.len())?;
    conn.flush()
}

/// Serves requests of one connection until it closes or a watch ends.
fn serve(conn: TcpStream, state: &State) {
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut conn = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut authorized = false;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("authorization")
            {
                authorized = value.trim() == format!("Bearer {TOKEN}");
            }
        }
        let target = request_line.split_whitespace().nth(1).unwrap_or("/");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let query: Vec<(String, String)> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect();
        let rec = Recorded {
            path: path.to_string(),
            query,
            authorized,
        };
        state.requests.lock().unwrap().push(rec.clone());
        let result = if !authorized {
            respond(
                &mut conn,
                401,
                &status_json(401, "Unauthorized", "Unauthorized"),
            )
        } else if rec.path == "/pods" {
            respond(&mut conn, 200, &state.kubelet)
        } else if rec.path == "/api/v1/pods" && state.mode == ApiMode::Forbidden {
            respond(
                &mut conn,
                403,
                &status_json(
                    403,
                    "Forbidden",
                    "pods is forbidden: User \"system:serviceaccount:fathom:fathom-agent\" \
                     cannot list resource \"pods\" in API group \"\" at the cluster scope",
                ),
            )
        } else if rec.path == "/api/v1/pods" && matches!(rec.param("watch"), Some("true" | "1")) {
            // A watch ends the connection (as the stream's end).
            let _ = watch(&mut conn, state, rec.param("resourceVersion"));
            return;
        } else if rec.path == "/api/v1/pods" {
            respond(&mut conn, 200, &state.list)
        } else {
            respond(&mut conn, 404, &status_json(404, "NotFound", "not found"))
        };
        if result.is_err() {
            return;
        }
    }
}

/// The recorded events after the list's version (released by the test),
/// then an open stream until the replay stops. From any other version:
/// an open stream with nothing.
fn watch(conn: &mut TcpStream, state: &State, version: Option<&str>) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    conn.flush()?;
    let events: &[String] = if version == Some(state.list_version.as_str()) {
        &state.events
    } else {
        &[]
    };
    let mut sent = 0;
    let mut released = state.released.lock().unwrap();
    loop {
        if state.stop.load(Ordering::Relaxed) {
            break;
        }
        while sent < events.len() && sent < *released {
            chunk(conn, &format!("{}\n", events[sent]))?;
            sent += 1;
        }
        released = state
            .cv
            .wait_timeout(released, Duration::from_millis(200))
            .unwrap()
            .0;
    }
    drop(released);
    write!(conn, "0\r\n\r\n")?;
    conn.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding() {
        assert_eq!(
            percent_decode("spec.nodeName%3Dfathom-node-1"),
            "spec.nodeName=fathom-node-1"
        );
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("a+b"), "a b");
    }
}
