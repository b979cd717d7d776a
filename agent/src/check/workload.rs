//! The workloads of `fathom-agent check --smoke`, run as child processes of
//! the agent's own binary (`fathom-agent check-workload …`), so that the
//! smoke checks need nothing else on the machine (a kernel-matrix guest has
//! a busybox and the agent only).
use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

/// The function the profile smoke check looks for.
#[inline(never)]
pub fn fathom_check_spin(rounds: u64) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..rounds {
        x = x.rotate_left(7) ^ i.wrapping_mul(0x2545_f491_4f6c_dd1d);
    }
    x
}

/// Burns CPU in [`fathom_check_spin`] for `seconds`.
pub fn spin(seconds: u64) {
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut sink = 0u64;
    while Instant::now() < end {
        sink ^= fathom_check_spin(std::hint::black_box(100_000));
    }
    std::hint::black_box(sink);
}

/// A request head read from `stream`: its header lines.
fn read_head(stream: &mut BufReader<TcpStream>) -> io::Result<Vec<String>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end().to_string();
        if line.is_empty() {
            return Ok(lines);
        }
        lines.push(line);
    }
}

fn respond(stream: &mut TcpStream, body: &str) -> io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// `GET path` to `addr` on a new connection; the response body.
pub fn get(addr: SocketAddr, path: &str) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no response head"))
}

/// Serves `requests` requests on `listen`, one per connection. Without
/// `upstream`, the body is the `traceparent` the request carried (or
/// `none`); with it, each request first sends its own request upstream and
/// answers with upstream's body.
pub fn serve(listen: SocketAddr, upstream: Option<SocketAddr>, requests: u32) -> io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    println!("listening {}", listener.local_addr()?);
    io::stdout().flush()?;
    for _ in 0..requests {
        let (stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = BufReader::new(stream);
        let head = read_head(&mut reader)?;
        let mut stream = reader.into_inner();
        let body = match upstream {
            Some(up) => get(up, "/back")?,
            None => head
                .iter()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("traceparent")
                        .then(|| value.trim().to_string())
                })
                .unwrap_or_else(|| "none".into()),
        };
        respond(&mut stream, &body)?;
    }
    Ok(())
}
