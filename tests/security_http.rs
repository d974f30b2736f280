//! Attacks on the HTTP front (issue 13): each test reproduces one finding against the real
//! binary, and checks that `/healthz` keeps answering within 100 ms while the attack runs. The
//! last one is a bounded raw-bytes fuzz run (fixed seed) over plain TCP sockets.
//!
//! Everything talks to 127.0.0.1 only; every loop is bounded in count and in time.

mod support;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};
use support::{wait_for, CloseAll, Server};

/// What `/healthz` must answer within while an attack runs (the median of a few probes, so one
/// scheduling hiccup on a loaded machine does not fail a test).
const HEALTHZ_BOUND: Duration = Duration::from_millis(100);

/// No probe may take longer than this: a server that stalls fails here whatever the load.
const STALL: Duration = Duration::from_secs(2);

/// Probes per check of [`assert_responsive`].
const PROBES: usize = 5;

/// How long a test waits for an answer that must come.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

fn address(server: &Server) -> String {
    format!("127.0.0.1:{}", server.port)
}

fn connect(server: &Server) -> TcpStream {
    let stream = TcpStream::connect(address(server)).unwrap();
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(ANSWER_TIMEOUT)).unwrap();
    stream
}

/// One HTTP answer as read off a socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(field, _)| field.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The body as JSON, or a panic that shows it.
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "{} answered a body that is not JSON ({err}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts the error shape every refusal has: `{"status": "error", "detail": "..."}`.
    fn assert_error(&self, status: u16, needle: &str) {
        assert_eq!(self.status, status, "{self:?}");
        let body = self.json();
        assert_eq!(body["status"], "error", "{body}");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(
            detail.to_lowercase().contains(&needle.to_lowercase()),
            "{status}: detail {detail:?} does not mention {needle:?}"
        );
    }
}

/// Reads one answer (status line, headers, a Content-Length or chunked body, or one that ends
/// with the connection).
fn read_answer(reader: &mut impl BufRead) -> std::io::Result<Answer> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not a status line: {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    let mut answer = Answer {
        status,
        headers,
        body: Vec::new(),
    };
    if let Some(length) = answer.header("Content-Length") {
        let length: usize = length.parse().map_err(std::io::Error::other)?;
        answer.body.resize(length, 0);
        reader.read_exact(&mut answer.body)?;
    } else if answer
        .header("Transfer-Encoding")
        .is_some_and(|value| value.eq_ignore_ascii_case("chunked"))
    {
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim(), 16).map_err(std::io::Error::other)?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            answer.body.extend_from_slice(&chunk[..size]);
        }
    } else if status >= 200 && status != 204 && status != 304 {
        reader.read_to_end(&mut answer.body)?;
    }
    Ok(answer)
}

/// Sends `bytes` on a fresh connection and reads one answer.
fn exchange(server: &Server, bytes: &[u8]) -> Answer {
    let mut stream = connect(server);
    stream.write_all(bytes).unwrap();
    read_answer(&mut BufReader::new(stream)).unwrap_or_else(|err| {
        panic!(
            "no answer to {:?}: {err}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        )
    })
}

/// One `GET path` on a fresh connection: its status (none when it failed or stalled) and how
/// long it took, connecting included.
fn probe(server: &Server, path: &str) -> (Option<u16>, Duration) {
    let started = Instant::now();
    let status = (|| {
        let mut stream = TcpStream::connect(address(server)).ok()?;
        stream.set_read_timeout(Some(STALL)).ok()?;
        stream.set_write_timeout(Some(STALL)).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        read_answer(&mut BufReader::new(stream))
            .ok()
            .map(|answer| answer.status)
    })();
    (status, started.elapsed())
}

/// `path` answers 200 on fresh connections: the median of [`PROBES`] probes within
/// [`HEALTHZ_BOUND`], and none stalled.
fn assert_responsive(server: &Server, path: &str, during: &str) {
    assert_responsive_within(server, path, during, HEALTHZ_BOUND);
}

/// [`assert_responsive`] with another bound on the median, for attacks that load the machine
/// itself (the test's clients and the server share two cores).
fn assert_responsive_within(server: &Server, path: &str, during: &str, bound: Duration) {
    let mut took: Vec<Duration> = (0..PROBES)
        .map(|_| {
            let (status, elapsed) = probe(server, path);
            assert_eq!(
                status,
                Some(200),
                "{path} did not answer 200 within {STALL:?} while {during}"
            );
            elapsed
        })
        .collect();
    took.sort();
    assert!(
        took[PROBES / 2] <= bound,
        "{path} took {took:?} while {during}"
    );
}

/// Threads of the server process.
fn threads(server: &Server) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|count| count.trim().parse().ok())
        .unwrap()
}

fn local(run_id: &str) -> Value {
    json!({"run_id": run_id, "container_name": "local",
           "environment_config": {"container_type": "local"}})
}

fn detail(body: &Value) -> &str {
    body["detail"].as_str().unwrap_or_default()
}

/// A POST with a JSON body, as raw bytes.
fn post_bytes(path: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra_headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn an_upgrade_request_is_answered_and_closed_and_stalls_nobody() {
    let server = Server::start(&[]);
    // What `curl --http2` sends to an http:// URL; the client then keeps its socket open.
    let mut h2c = connect(&server);
    h2c.write_all(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\
          Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
    )
    .unwrap();
    assert_responsive(&server, "/healthz", "an h2c upgrade request is open");
    assert_responsive(&server, "/stats", "an h2c upgrade request is open");
    // It got a plain HTTP/1.1 answer, and the server closed the connection after it.
    let mut reader = BufReader::new(h2c);
    let answer = read_answer(&mut reader).expect("the upgrade request was not answered");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.json()["status"], "ok");
    assert_eq!(answer.header("Connection"), Some("close"), "{answer:?}");
    let mut rest = Vec::new();
    let closed = reader.read_to_end(&mut rest);
    assert!(
        matches!(closed, Ok(0)),
        "the server kept the upgraded connection open: {closed:?}"
    );

    // An upgrade with a body: the body is read as a body, not as a raw stream.
    let answer = exchange(
        &server,
        &post_bytes(
            "/close_instance",
            "Connection: Upgrade\r\nUpgrade: websocket\r\n",
            r#"{"run_id": "nope"}"#,
        ),
    );
    answer.assert_error(404, "no instance with run_id 'nope'");
    assert_responsive(&server, "/healthz", "after the upgrade requests");
}

#[test]
fn a_head_without_end_is_refused_and_memory_stays_flat() {
    let server = Server::start(&[]);
    let (_, peak_before) = server.rss_kib();
    for (start, status, needle) in [
        ("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ", 431, "header"),
        ("GET /", 414, "request line"),
    ] {
        let mut stream = connect(&server);
        let mut writer = stream.try_clone().unwrap();
        // 64 MiB of one line with no end, until the server refuses to take more.
        let sender = thread::spawn(move || {
            let chunk = vec![b'a'; 1 << 20];
            if writer.write_all(start.as_bytes()).is_err() {
                return;
            }
            for _ in 0..64 {
                if writer.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        assert_responsive(&server, "/healthz", "a head without end is being sent");
        stream.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
        let answer = read_answer(&mut BufReader::new(&mut stream))
            .unwrap_or_else(|err| panic!("{status}: no answer to a head without end: {err}"));
        answer.assert_error(status, needle);
        assert_eq!(answer.header("Connection"), Some("close"));
        drop(stream);
        sender.join().unwrap();
    }
    // Too many headers, each of them small.
    let mut head = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for index in 0..200 {
        head.push_str(&format!("X-Header-{index}: v\r\n"));
    }
    head.push_str("\r\n");
    exchange(&server, head.as_bytes()).assert_error(431, "headers");
    // Few headers, each under the line limit, together over the head's.
    let mut head = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for index in 0..50 {
        head.push_str(&format!("X-Header-{index}: {}\r\n", "v".repeat(1000)));
    }
    head.push_str("\r\n");
    exchange(&server, head.as_bytes()).assert_error(431, "head is longer");
    let (_, peak_after) = server.rss_kib();
    assert!(
        peak_after.saturating_sub(peak_before) < 16 * 1024,
        "peak RSS grew from {peak_before} KiB to {peak_after} KiB"
    );
    assert_responsive(&server, "/healthz", "after the long heads");
}

#[test]
fn slow_heads_slow_bodies_and_idle_connections_time_out() {
    let server = Server::start(&["--client-timeout", "1", "--keep-alive-timeout", "1"]);
    server.start_local("slow");
    let _close = CloseAll(&server);

    // A head sent one byte at a time, a little faster than the timeout: the whole head has
    // the timeout, not each byte.
    let mut slow_head = connect(&server);
    slow_head
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut trickle = slow_head.try_clone().unwrap();
    let trickler = thread::spawn(move || {
        for _ in 0..20 {
            if trickle.write_all(b"X").is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(300));
        }
    });
    // A body promised and only begun.
    let mut slow_body = connect(&server);
    let promised = post_bytes(
        "/execute_command",
        "",
        &format!(r#"{{"run_id": "slow", "cmd": "echo {}"}}"#, "a".repeat(100)),
    );
    slow_body
        .write_all(&promised[..promised.len() - 50])
        .unwrap();
    // A kept-alive connection that goes idle after one request.
    let mut idle = connect(&server);
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut idle = BufReader::new(idle);
    assert_eq!(read_answer(&mut idle).unwrap().status, 200);
    let started = Instant::now();

    assert_responsive(&server, "/healthz", "slow clients are connected");
    let answer = read_answer(&mut BufReader::new(&mut slow_head)).unwrap();
    answer.assert_error(408, "head");
    let answer = read_answer(&mut BufReader::new(&mut slow_body)).unwrap();
    answer.assert_error(408, "body");
    let mut rest = Vec::new();
    assert!(
        matches!(idle.read_to_end(&mut rest), Ok(0)),
        "the idle connection was not closed"
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    trickler.join().unwrap();
    // The instance is untouched by all that.
    assert_eq!(server.exec("slow", "echo fine")["output"], "fine\n");
}

#[test]
fn a_flood_of_idle_and_half_sent_connections_locks_nobody_out() {
    let server = Server::start(&["--max-connections", "16", "--workers", "2"]);
    assert_responsive(&server, "/healthz", "nothing happens");
    let before = threads(&server);
    let mut held = Vec::new();
    for index in 0..200 {
        let mut stream = connect(&server);
        if index % 2 == 1 {
            let _ = stream.write_all(b"POST /execute_command HTTP/1.1\r\nHost: x\r\nContent-Le");
        }
        held.push(stream);
    }
    // Connections younger than a moment are left alone (their request may be on its way):
    // until the flood's are older, a newcomer may find no room.
    wait_for(Duration::from_secs(5), "room for a newcomer", || {
        (probe(&server, "/healthz").0 == Some(200)).then_some(())
    });
    assert_responsive(
        &server,
        "/healthz",
        "200 idle and half-sent connections are open",
    );
    assert_responsive(
        &server,
        "/get_available_resources",
        "200 idle and half-sent connections are open",
    );
    let during = threads(&server);
    assert!(
        during <= before + 16 + 4,
        "{during} threads with 200 connections open ({before} before)"
    );
    drop(held);
}

#[test]
fn connections_never_use_up_the_open_files() {
    // 300 open files, 3 per connection: the cap comes down to what fits, and the flood is
    // met by evictions, not by a kernel that refuses connections (tiny_http's accept thread
    // stopped for good at its first error, and the server with it).
    let server = Server::start_with_open_files(&["--workers", "2"], 300);
    assert!(
        server.log().contains("--max-connections 1024 lowered to"),
        "{}",
        server.log()
    );
    let open_files = || {
        std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
            .unwrap()
            .count()
    };
    let mut held = Vec::new();
    let mut most_files = 0;
    for _ in 0..600 {
        match TcpStream::connect(address(&server)) {
            Ok(stream) => held.push(stream),
            Err(err) => panic!("connection {} refused: {err}", held.len()),
        }
        most_files = most_files.max(open_files());
    }
    assert!(most_files < 250, "{most_files} open files");
    wait_for(Duration::from_secs(5), "room for a newcomer", || {
        (probe(&server, "/healthz").0 == Some(200)).then_some(())
    });
    assert_responsive(&server, "/healthz", "600 connections were opened");
    drop(held);
    assert!(!server.log().contains("cannot accept"), "{}", server.log());
}

#[test]
fn beyond_the_cap_busy_connections_answer_503() {
    let server = Server::start(&["--max-connections", "3"]);
    server.start_local("busy");
    let _close = CloseAll(&server);
    let markers = support::TempDir::new("cap");
    thread::scope(|scope| {
        let sleepers: Vec<_> = (0..3)
            .map(|index| {
                let (server, marker) = (&server, markers.path().join(index.to_string()));
                scope.spawn(move || {
                    server.exec("busy", &format!("touch {}; sleep 3", marker.display()))
                })
            })
            .collect();
        // Seen from the side, without a connection: all three run.
        wait_for(Duration::from_secs(10), "three commands to run", || {
            (std::fs::read_dir(markers.path()).unwrap().count() == 3).then_some(())
        });
        // A fourth connection finds no room: nothing is idle to close.
        let refused = || {
            let mut stream = TcpStream::connect(address(&server)).ok()?;
            stream.set_read_timeout(Some(STALL)).ok()?;
            write!(stream, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
            let answer = read_answer(&mut BufReader::new(stream)).ok()?;
            (answer.status == 503).then_some(answer)
        };
        let answer = wait_for(Duration::from_secs(10), "a 503 at the cap", refused);
        answer.assert_error(503, "connections");
        assert!(answer.header("Retry-After").is_some(), "{answer:?}");
        // The refusal itself is immediate.
        let mut took: Vec<Duration> = (0..3)
            .map(|_| {
                let started = Instant::now();
                assert!(refused().is_some(), "no 503 while the cap is reached");
                started.elapsed()
            })
            .collect();
        took.sort();
        assert!(took[1] <= HEALTHZ_BOUND, "503s took {took:?}");
        for sleeper in sleepers {
            assert_eq!(sleeper.join().unwrap()["returncode"], 0);
        }
    });
    assert_responsive(&server, "/healthz", "the busy connections are done");
}

/// A TCP connection whose receive buffer is as small as the kernel allows.
fn connect_with_small_receive_buffer(server: &Server) -> TcpStream {
    use std::os::fd::FromRawFd;
    let size: libc::c_int = 4096;
    let address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: server.port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a new socket we own; setsockopt reads `size` and connect reads `address`, both
    // live for the calls; the descriptor goes to a TcpStream that closes it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let set = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        assert_eq!(set, 0);
        let connected = libc::connect(
            fd,
            (&address as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(connected, 0);
        TcpStream::from_raw_fd(fd)
    }
}

#[test]
fn clients_that_pipeline_and_never_read_hold_no_worker() {
    let server = Server::start(&[]);
    let pipelined = "GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n".repeat(200);
    let mut writers = Vec::new();
    let mut sockets = Vec::new();
    for _ in 0..4 {
        let stream = connect_with_small_receive_buffer(&server);
        stream
            .set_write_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let requests = pipelined.clone();
        // The requests may not all fit in the buffers: whatever the server does not take
        // stays unsent.
        writers.push(thread::spawn(move || {
            let _ = writer.write_all(requests.as_bytes());
        }));
        sockets.push(stream);
    }
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert_responsive(&server, "/healthz", "4 clients pipeline and never read");
        assert_responsive(
            &server,
            "/get_available_resources",
            "4 clients pipeline and never read",
        );
    }
    for socket in &sockets {
        let _ = socket.shutdown(Shutdown::Both);
    }
    for writer in writers {
        writer.join().unwrap();
    }
    assert_responsive(&server, "/healthz", "the pipelining clients left");

    // As many of them as the server takes connections: an answer not taken is a stall, and
    // its connection makes room for a newcomer.
    let server = Server::start(&["--max-connections", "4"]);
    let sockets: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut stream = connect_with_small_receive_buffer(&server);
            stream
                .set_write_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let _ = stream.write_all(&pipelined.as_bytes()[..pipelined.len() / 8]);
            stream
        })
        .collect();
    wait_for(Duration::from_secs(5), "room for a newcomer", || {
        (probe(&server, "/healthz").0 == Some(200)).then_some(())
    });
    assert_responsive(
        &server,
        "/healthz",
        "4 clients that never read fill --max-connections 4",
    );
    drop(sockets);
}

#[test]
fn the_token_is_checked_before_any_body_is_read() {
    let server = Server::start(&["--token", "s3cret"]);
    // A body promised and never sent: the 401 comes at once all the same.
    let mut stream = connect(&server);
    stream.set_read_timeout(Some(STALL)).unwrap();
    let started = Instant::now();
    stream
        .write_all(
            b"POST /start_instance HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 8388608\r\n\r\n",
        )
        .unwrap();
    let answer =
        read_answer(&mut BufReader::new(&mut stream)).expect("no 401 before the body was sent");
    answer.assert_error(401, "Authorization: Bearer");
    assert_eq!(answer.header("Connection"), Some("close"));
    assert!(started.elapsed() < STALL);

    // A client that asks before sending its body hears 401, never 100 Continue.
    let answer = exchange(
        &server,
        b"POST /execute_command HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n",
    );
    answer.assert_error(401, "token");

    // Forty clients send 8 MiB bodies without the token: nothing is kept of them.
    let (_, peak_before) = server.rss_kib();
    let big = vec![b' '; 8 << 20];
    thread::scope(|scope| {
        let senders: Vec<_> = (0..40)
            .map(|_| {
                scope.spawn(|| {
                    let mut stream = connect(&server);
                    let mut writer = stream.try_clone().unwrap();
                    let _ = writer.write_all(
                        b"POST /execute_command HTTP/1.1\r\nHost: x\r\nContent-Length: 8388608\r\n\r\n",
                    );
                    let _ = writer.write_all(&big);
                    read_answer(&mut BufReader::new(&mut stream)).map(|answer| answer.status)
                })
            })
            .collect();
        // 320 MiB go through loopback meanwhile, which loads the machine itself: the bound
        // is looser, but no probe may stall.
        assert_responsive_within(
            &server,
            "/healthz",
            "40 clients send 8 MiB bodies",
            HEALTHZ_BOUND * 5,
        );
        for sender in senders {
            assert_eq!(sender.join().unwrap().ok(), Some(401));
        }
    });
    let (_, peak_after) = server.rss_kib();
    assert!(
        peak_after.saturating_sub(peak_before) < 32 * 1024,
        "peak RSS grew from {peak_before} KiB to {peak_after} KiB"
    );

    // The scheme is case-insensitive; the token itself is not.
    for (authorization, status) in [
        ("Bearer s3cret", 200),
        ("bearer s3cret", 200),
        ("BEARER  s3cret", 200),
        ("bearer S3CRET", 401),
        ("Basic s3cret", 401),
        ("s3cret", 401),
    ] {
        let answer = exchange(
            &server,
            format!(
                "GET /get_available_resources HTTP/1.1\r\nHost: x\r\nAuthorization: {authorization}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        );
        assert_eq!(answer.status, status, "{authorization:?}: {answer:?}");
    }
}

#[test]
fn bodies_held_at_once_are_bounded_over_all_connections() {
    // 32 bodies of the largest size: 2 MiB here. Forty clients each send 60,000 bytes of a
    // 65,536-byte body and stop; those past the budget are answered 503 at once.
    let server = Server::start(&["--max-body-bytes", "65536", "--client-timeout", "2"]);
    server.start_local("budget");
    let _close = CloseAll(&server);
    let head = "POST /execute_command HTTP/1.1\r\nHost: x\r\nContent-Length: 65536\r\n\r\n";
    let part = vec![b' '; 60_000];
    let mut streams: Vec<TcpStream> = (0..40)
        .map(|_| {
            let mut stream = connect(&server);
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(&part).unwrap();
            stream
        })
        .collect();
    assert_responsive(&server, "/healthz", "40 bodies are held");
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for stream in &mut streams {
        let answer = read_answer(&mut BufReader::new(stream)).unwrap();
        if answer.status == 503 {
            answer.assert_error(503, "request bodies");
        }
        *statuses.entry(answer.status).or_default() += 1;
    }
    // The others waited for the rest of their body until the client timeout.
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        [408, 503],
        "{statuses:?}"
    );
    assert!(statuses[&408] >= 24, "{statuses:?}");
    drop(streams);
    // All of it was given back: a body fits again.
    assert_eq!(server.exec("budget", "echo back")["output"], "back\n");
}

#[test]
fn every_instance_counts_at_least_one_instance() {
    let server = Server::start(&["--max-resources", r#"{"instances": 2}"#]);
    let _close = CloseAll(&server);
    for (index, instances) in [json!(0), json!(0.25), json!(0)].iter().enumerate() {
        let mut body = local(&format!("free-{index}"));
        body["environment_config"]["resources"] = json!({"instances": instances});
        let (status, body) = server.post("/start_instance", &body);
        if index < 2 {
            assert_eq!(status, 200, "{body}");
        } else {
            assert_eq!(status, 429, "{body}");
            assert!(detail(&body).contains("instances"), "{body}");
        }
    }
    let (_, available) = server.get("/get_available_resources");
    assert_eq!(available, json!({"instances": 0}));
    let (_, stats) = server.get("/stats");
    assert_eq!(stats["allocated_resources"], json!({"instances": 2}));
}

#[test]
fn starts_that_wait_for_room_do_not_starve_commands() {
    let server = Server::start(&["--workers", "2", "--max-resources", r#"{"instances": 1}"#]);
    server.start_local("holder");
    let _close = CloseAll(&server);
    thread::scope(|scope| {
        let waiters: Vec<_> = (0..4)
            .map(|index| {
                let server = &server;
                scope.spawn(move || {
                    let mut body = local(&format!("waiter-{index}"));
                    body["wait"] = json!(4);
                    server.post("/start_instance", &body).0
                })
            })
            .collect();
        wait_for(Duration::from_secs(10), "starts to wait", || {
            let (_, stats) = server.get("/stats");
            (stats["waiting_starts"].as_u64() >= Some(2)).then_some(())
        });
        let started = Instant::now();
        assert_eq!(server.exec("holder", "echo through")["output"], "through\n");
        let took = started.elapsed();
        assert!(
            took < STALL,
            "the command waited {took:?} behind waiting starts"
        );
        assert_responsive(&server, "/healthz", "starts wait for room");
        let (status, _) = server.post("/close_instance", &json!({"run_id": "holder"}));
        assert_eq!(status, 200);
        let statuses: Vec<u16> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
        assert_eq!(
            statuses.iter().filter(|&&status| status == 200).count(),
            1,
            "{statuses:?}"
        );
        assert!(statuses
            .iter()
            .all(|&status| status == 200 || status == 429));
    });
}

#[test]
fn oversized_fields_and_bodies_are_refused_with_errors_that_say_what_to_do() {
    let server = Server::start(&[]);
    let _close = CloseAll(&server);
    let many: serde_json::Map<String, Value> = (0..300)
        .map(|index| (format!("V{index}"), json!("x")))
        .collect();
    let huge = json!({"BIG": "x".repeat(70 * 1024)});
    for (config, needle) in [
        (json!({"env": many.clone()}), "256"),
        (json!({"env": huge.clone()}), "65536"),
        (
            json!({"notes": "x".repeat(200 * 1024)}),
            "environment_config",
        ),
    ] {
        let mut body = local("big");
        for (key, value) in config.as_object().unwrap() {
            body["environment_config"][key] = value.clone();
        }
        let (status, body) = server.post("/start_instance", &body);
        assert_eq!(status, 400, "{body}");
        assert!(detail(&body).contains(needle), "{needle}: {body}");
    }
    let (_, stats) = server.get("/stats");
    assert_eq!(stats["total_instances"], 0, "{stats}");

    server.start_local("small");
    for (command, status, needle) in [
        (
            json!({"run_id": "small", "cmd": "true", "env": many}),
            400,
            "256",
        ),
        (
            json!({"run_id": "small", "cmd": "true", "env": huge}),
            400,
            "65536",
        ),
        (
            json!({"run_id": "small", "cmd": format!(": {}", "a".repeat(200 * 1024))}),
            400,
            "131071",
        ),
        (
            json!({"run_id": "small", "cmd": format!(": {}", "a".repeat(2 << 20))}),
            413,
            "1048576",
        ),
    ] {
        let (got, body) = server.post("/execute_command", &command);
        assert_eq!(got, status, "{body}");
        assert!(detail(&body).contains(needle), "{needle}: {body}");
    }
    let (_, stats) = server.get("/stats");
    assert_eq!(stats["instances"][0]["num_cmd"], 0, "{stats}");
}

#[test]
fn malformed_framing_is_refused_with_400() {
    let server = Server::start(&[]);
    for (request, needle) in [
        (
            "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            "Content-Length",
        ),
        (
            "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            "Content-Length",
        ),
        (
            "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "Content-Length",
        ),
        (
            "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            "Content-Length",
        ),
        (
            "POST /close_instance HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 20\r\n\r\n{}",
            "Content-Length",
        ),
        (
            "POST /close_instance HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "Transfer-Encoding",
        ),
        (
            "POST /close_instance HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            "Transfer-Encoding",
        ),
        ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "HTTP/1.1"),
        ("GET /healthz HTTP/1.1\r\nHost: x\r\n Folded: y\r\n\r\n", "header"),
        ("GET /healthz HTTP/1.1\r\nHost: x\r\n: empty\r\n\r\n", "header"),
        ("GET /healthz HTTP/1.1\r\nHost: x\r\nX Y: z\r\n\r\n", "header"),
        ("GET /healthz HTTP/1.1\r\nHost: x\r\nNo colon\r\n\r\n", "header"),
        ("GET /healthz HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n", "header"),
        ("GET /healthz HTTP/1.1\r\nHost: x\rY: z\r\n\r\n", "bare CR"),
        ("GET /healthz\r\n\r\n", "request line"),
        ("GET  /healthz HTTP/1.1\r\n\r\n", "request line"),
        (
            "POST /close_instance HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "HTTP/1.0",
        ),
        (
            "POST /close_instance HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "Transfer-Encoding",
        ),
        (
            "POST /close_instance HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "chunk size",
        ),
        (
            "POST /close_instance HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}}\r\n0\r\n\r\n",
            "longer than its size",
        ),
    ] {
        let answer = exchange(&server, request.as_bytes());
        answer.assert_error(400, needle);
        assert_eq!(answer.header("Connection"), Some("close"), "{request:?}");
    }
    // A chunked body read to its end keeps the connection; the next request is served.
    let mut stream = connect(&server);
    stream
        .write_all(
            b"POST /close_instance HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
              9;ext=1\r\n{\"run_id\"\r\n9\r\n: \"nope\"}\r\n0\r\nTrailer: t\r\n\r\n\
              GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .unwrap();
    let mut reader = BufReader::new(stream);
    read_answer(&mut reader)
        .unwrap()
        .assert_error(404, "no instance with run_id 'nope'");
    assert_eq!(read_answer(&mut reader).unwrap().status, 200);
    // An expectation other than 100-continue.
    exchange(
        &server,
        b"POST /close_instance HTTP/1.1\r\nHost: x\r\nExpect: something\r\nContent-Length: 2\r\n\r\n{}",
    )
    .assert_error(417, "100-continue");
    // A chunk size line without end is as bounded as a header line.
    let mut stream = connect(&server);
    let mut writer = stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let _ = writer.write_all(
            b"POST /close_instance HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        let chunk = vec![b'0'; 1 << 20];
        for _ in 0..32 {
            if writer.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let answer = read_answer(&mut BufReader::new(&mut stream)).unwrap();
    answer.assert_error(400, "chunk");
    drop(stream);
    sender.join().unwrap();
    assert_responsive(&server, "/healthz", "after malformed requests");
}

/// A small deterministic generator (xorshift64, as `src/property.rs`).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Property: whatever bytes arrive on a socket, the server stays up, answers nothing in the
/// 5xx range, and `/healthz` keeps answering. `ARS_PROPERTY_SCALE` multiplies the cases and
/// `ARS_PROPERTY_SEED` varies them, as for the unit property tests.
#[test]
fn property_raw_bytes_never_crash_the_front_nor_get_a_5xx() {
    // No instance can ever fit, so that a mutated start never starts anything.
    let mut server = Server::start(&["--max-resources", r#"{"instances": 0}"#]);
    let number = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let scale = number("ARS_PROPERTY_SCALE").unwrap_or(1).max(1) as usize;
    let seed = number("ARS_PROPERTY_SEED").unwrap_or(0);
    let cases = 5_000 * scale;
    let time_limit = Duration::from_secs(60 * scale as u64);
    let seeds: Vec<Vec<u8>> = vec![
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /stats?run_id=a%2Fb&container_name=x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\r\n".to_vec(),
        b"HEAD /get_available_resources HTTP/1.0\r\n\r\n".to_vec(),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        post_bytes("/execute_command", "", r#"{"run_id": "r", "cmd": "echo hi", "timeout": 1, "env": {"A": "b"}}"#),
        post_bytes("/close_instance", "Connection: close\r\n", r#"{"run_id": "r"}"#),
        post_bytes(
            "/start_instance",
            "Expect: 100-continue\r\n",
            r#"{"run_id": "r", "container_name": "local", "environment_config": {"container_type": "local", "resources": {"instances": 0}}, "wait": 0.1}"#,
        ),
        post_bytes("/v1/chat/completions", "X-Run-Id: r\r\n", r#"{"model": "m", "messages": []}"#),
        b"POST /execute_command HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n3;ext=1\r\n 1}\r\n0\r\n\r\n".to_vec(),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\r\n".to_vec(),
    ];
    let tokens: Vec<Vec<u8>> = [
        &b"\r\n"[..],
        b"\r\n\r\n",
        b"\n",
        b"\r",
        b":",
        b" ",
        b"\t",
        b"\0",
        b"\xff\xfe",
        b"%",
        b"HTTP/1.1",
        b"HTTP/2.0",
        b"Content-Length: 3\r\n",
        b"Content-Length: 18446744073709551616\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Connection: close\r\n",
        b"Expect: 100-continue\r\n",
        b"ffffffffffffffffff\r\n",
        b"0\r\n\r\n",
        b"{\"run_id\": \"../x\"}",
    ]
    .iter()
    .map(|token| token.to_vec())
    .chain([vec![b'a'; 10_000], vec![b'\r'; 300]])
    .collect();
    let mut rng = XorShift(0x5eed_f00d_dead_beef ^ seed);
    let started = Instant::now();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut ran = 0;
    for case in 0..cases {
        if started.elapsed() > time_limit {
            break;
        }
        let bytes: Vec<u8> = if rng.below(8) == 0 {
            (0..rng.below(600)).map(|_| rng.next() as u8).collect()
        } else {
            let mut bytes = seeds[rng.below(seeds.len())].clone();
            for _ in 0..=rng.below(4) {
                let at = rng.below(bytes.len() + 1);
                match rng.below(5) {
                    0 if !bytes.is_empty() => {
                        let end = (at + rng.below(12)).min(bytes.len());
                        bytes.drain(at.min(end)..end);
                    }
                    1 => {
                        let token = &tokens[rng.below(tokens.len())];
                        bytes.splice(at..at, token.iter().copied());
                    }
                    2 if at < bytes.len() => bytes[at] = rng.next() as u8,
                    3 => bytes.truncate(at),
                    _ => {
                        let end = (at + rng.below(40)).min(bytes.len());
                        let copy = bytes[at..end].to_vec();
                        bytes.splice(at..at, copy);
                    }
                }
            }
            bytes
        };
        let mut stream = connect(&server);
        stream.set_read_timeout(Some(STALL * 2)).unwrap();
        let _ = stream.write_all(&bytes);
        let _ = stream.shutdown(Shutdown::Write);
        let mut raw = Vec::new();
        if let Err(err) = stream.read_to_end(&mut raw) {
            assert!(
                !matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "case {case}: the server neither answered nor closed within {:?}: {:?}",
                STALL * 2,
                String::from_utf8_lossy(&bytes)
            );
        }
        let shown = || {
            format!(
                "case {case}: sent {:?}, got {:?}",
                String::from_utf8_lossy(&bytes),
                String::from_utf8_lossy(&raw)
            )
        };
        // Every status line, whatever the framing of the answers around it...
        for line in raw.split(|&byte| byte == b'\n') {
            if let Some(rest) = line.strip_prefix(b"HTTP/1.") {
                let status: u16 = String::from_utf8_lossy(rest.get(2..5).unwrap_or_default())
                    .parse()
                    .unwrap_or_else(|_| panic!("a malformed status line: {}", shown()));
                *statuses.entry(status).or_default() += 1;
                assert!(status < 500, "{status}: {}", shown());
            }
        }
        // ...and every whole answer that is a refusal has the error shape.
        let mut reader = BufReader::new(&raw[..]);
        while let Ok(answer) = read_answer(&mut reader) {
            if answer.status >= 400 && !answer.body.is_empty() {
                assert_eq!(answer.json()["status"], "error", "{}", shown());
            }
        }
        ran += 1;
        if case % 250 == 0 {
            assert!(
                server.child.try_wait().unwrap().is_none(),
                "the server died at case {case}"
            );
            assert_responsive(&server, "/healthz", "garbage arrives");
        }
    }
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server died"
    );
    assert_responsive(&server, "/healthz", "after the garbage");
    eprintln!("{ran} cases in {:?}: {statuses:?}", started.elapsed());
    assert!(ran >= cases.min(500), "only {ran} cases ran");
    let _ = &mut server;
}
