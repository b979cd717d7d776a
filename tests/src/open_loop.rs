//! An open-loop HTTP/1.1 load: requests sent on a fixed schedule whatever
//! the server's speed, over keep-alive connections, each request's latency
//! counted from the time it was due (not from when it could be sent: a slow
//! response delays the next request of its connection, and that delay is
//! latency too — what wrk2 calls correcting coordinated omission).
//!
//! At a fixed rate below saturation the latency added by a tracer is the
//! time it adds to a request's path, not a share of saturated CPUs, and the
//! whole machine's CPU time per request (every process's, from `/proc`) is
//! the cost of everything that ran for it: server, client, BPF programs,
//! agent, receiver — and anything else the machine ran meanwhile, so it
//! means something on a quiet machine only.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

/// What one open-loop run measured.
#[derive(Clone, Debug, Default)]
pub struct OpenLoopRun {
    /// Per completed request, from when it was due to its response's last
    /// byte, in ns, sorted.
    pub latencies_ns: Vec<u64>,
    /// Requests that failed (connection closed or refused, bad response).
    pub errors: u64,
    /// The CPU time every process spent over the run (see
    /// [`cpu_seconds_by_pid`]), in seconds.
    pub busy_cpu_s: f64,
    /// The run's length.
    pub elapsed: Duration,
    /// The share of CPU time stolen by the hypervisor during the run.
    pub steal: f64,
}

impl OpenLoopRun {
    /// The `q` quantile (0..=1) of the latencies, in µs (0 without any).
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.latencies_ns.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies_ns.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        self.latencies_ns[i] as f64 / 1000.0
    }

    /// Completed requests per second.
    pub fn rate(&self) -> f64 {
        self.latencies_ns.len() as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// The machine's busy CPU time per completed request, in µs.
    pub fn busy_us_per_request(&self) -> f64 {
        self.busy_cpu_s * 1e6 / (self.latencies_ns.len().max(1) as f64)
    }
}

/// CPU seconds of every process so far, by pid. `/proc/stat`'s per-CPU
/// busy time is sampled at the timer tick, which misses most of a lightly
/// loaded machine's short bursts; a process's total is its exact run time
/// ([`crate::try_cpu_seconds`]). Softirq work done in a process's context
/// is part of its time (no `IRQ_TIME_ACCOUNTING` here); the rest runs in
/// `ksoftirqd`, also a process.
fn cpu_seconds_by_pid() -> HashMap<u32, f64> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        // A process gone already has nothing to add.
        .filter_map(|pid| Some((pid, crate::try_cpu_seconds(pid)?)))
        .collect()
}

/// CPU seconds every process spent between two [`cpu_seconds_by_pid`]
/// readings (a process that started in between counts from zero).
fn busy_seconds(before: &HashMap<u32, f64>, after: &HashMap<u32, f64>) -> f64 {
    after
        .iter()
        .map(|(pid, t)| (t - before.get(pid).copied().unwrap_or(0.0)).max(0.0))
        .sum()
}

/// `rate` GET requests per second for `duration` to `http://{addr}{path}`,
/// spread over `connections` keep-alive connections (each its own thread,
/// due times interleaved across connections).
pub fn run(
    addr: SocketAddr,
    path: &str,
    rate: f64,
    connections: usize,
    duration: Duration,
) -> OpenLoopRun {
    let connections = connections.max(1);
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: fathom-open-loop\r\n\r\n");
    let interval = Duration::from_secs_f64(connections as f64 / rate.max(1.0));
    let stagger = interval / connections as u32;
    // A little ahead, so that every thread is waiting when the first
    // request is due.
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + duration;
    let busy0 = cpu_seconds_by_pid();
    let steal = crate::StealMeter::start();
    let mut out = OpenLoopRun::default();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..connections)
            .map(|i| {
                let request = request.as_bytes();
                s.spawn(move || {
                    connection(addr, request, start + stagger * i as u32, interval, end)
                })
            })
            .collect();
        for w in workers {
            if let Ok((lat, errors)) = w.join() {
                out.latencies_ns.extend(lat);
                out.errors += errors;
            } else {
                out.errors += 1;
            }
        }
    });
    out.elapsed = duration;
    out.busy_cpu_s = busy_seconds(&busy0, &cpu_seconds_by_pid());
    out.steal = steal.share();
    out.latencies_ns.sort_unstable();
    out
}

/// One connection's requests, due at `first + k * interval` before `end`:
/// their latencies and the count of failed ones.
fn connection(
    addr: SocketAddr,
    request: &[u8],
    first: Instant,
    interval: Duration,
    end: Instant,
) -> (Vec<u64>, u64) {
    // Sleeps end within a µs of their deadline instead of the default 50
    // µs of timer slack, which would bunch requests together.
    let _ = std::fs::write("/proc/thread-self/timerslack_ns", "1");
    let mut latencies = Vec::new();
    let mut errors = 0u64;
    let mut stream: Option<TcpStream> = None;
    let mut buf = vec![0u8; 64 * 1024];
    let mut due = first;
    while due < end {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let ok = (|| -> std::io::Result<()> {
            if stream.is_none() {
                let s = TcpStream::connect(addr)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                stream = Some(s);
            }
            let s = stream.as_mut().ok_or(std::io::ErrorKind::NotConnected)?;
            s.write_all(request)?;
            read_response(s, &mut buf)
        })();
        match ok {
            Ok(()) => latencies.push(due.elapsed().as_nanos() as u64),
            Err(_) => {
                errors += 1;
                stream = None;
            }
        }
        due += interval;
    }
    (latencies, errors)
}

/// Reads one response with a `Content-Length` body.
fn read_response(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    let mut have = 0;
    loop {
        if have == buf.len() {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        let n = s.read(&mut buf[have..])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        have += n;
        // Nothing more is pipelined on this connection.
        if let Some(total) = response_len(&buf[..have])?
            && have >= total
        {
            return Ok(());
        }
    }
}

/// The whole length of the response starting `bytes` once its head is
/// complete (head + `Content-Length`); `None` before that.
fn response_len(bytes: &[u8]) -> std::io::Result<Option<usize>> {
    let Some(head_end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&bytes[..head_end])
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .ok_or(std::io::ErrorKind::InvalidData)?;
    Ok(Some(head_end + 4 + length))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_length_from_head() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(response_len(r).ok().flatten(), Some(r.len()));
        assert_eq!(response_len(&r[..20]).ok().flatten(), None);
        assert!(response_len(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").is_err());
        assert!(response_len(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
    }

    #[test]
    fn quantiles_of_sorted_latencies() {
        let run = OpenLoopRun {
            latencies_ns: (1..=100).map(|v| v * 1000).collect(),
            elapsed: Duration::from_secs(1),
            ..OpenLoopRun::default()
        };
        assert_eq!(run.quantile_us(0.5), 51.0);
        assert_eq!(run.quantile_us(0.99), 99.0);
        assert_eq!(run.rate(), 100.0);
    }

    /// A real server on loopback: the schedule is kept (the count of
    /// requests is the rate times the duration) and every response is read.
    #[test]
    fn keeps_the_schedule_against_a_real_server() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let mut pending = Vec::new();
                    loop {
                        let Ok(n) = conn.read(&mut buf) else { return };
                        if n == 0 {
                            return;
                        }
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(p) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            pending.drain(..p + 4);
                            let _ =
                                conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                        }
                    }
                });
            }
        });
        let run = super::run(addr, "/x", 2000.0, 4, Duration::from_millis(500));
        assert_eq!(run.errors, 0);
        assert_eq!(run.latencies_ns.len(), 1000, "2000/s for 0.5 s");
        assert!(run.quantile_us(0.5) > 0.0);
    }
}
