//! `PUT` and `GET /files/{run_id}/{path}` through every exec path: the paths with file access
//! (`local`, every agent path, the Slurm job's server) move files and directories both ways,
//! byte for byte, and every refusal answers its status and leaves nothing; the CLI paths
//! answer 400 and write nothing. A download cut by a dying agent counts in the run's
//! `infra_failures`.
//!
//! The paths run in parallel, each with its own server and instance; the test prints one row
//! per path and case, then fails if any failed.

mod support;

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;
use support::flavor::Flavor;
use support::CloseAll;

/// The server's `--max-body-bytes` here: an upload one byte larger is refused with 413.
const MAX_BODY: usize = 4 << 20;

/// A flavor's constructor.
type NewFlavor = fn() -> Flavor;

/// One named case of a path.
type Case<'a> = (&'static str, Box<dyn Fn() + 'a>);

/// The paths, by name (as in tests/exec_cases.rs), and whether they have file access.
const PATHS: &[(&str, NewFlavor, bool)] = &[
    ("local", Flavor::local, true),
    ("docker_bash", Flavor::docker_bash, false),
    ("docker_agent_bash", Flavor::docker_agent_bash, true),
    ("docker_agent_busybox", Flavor::docker_agent_busybox, true),
    ("podman_bash", Flavor::podman_bash, false),
    ("podman_agent_bash", Flavor::podman_agent_bash, true),
    ("bwrap_rootfs", Flavor::bwrap_rootfs, false),
    ("bwrap_agent_rootfs", Flavor::bwrap_agent_rootfs, true),
    ("bwrap_agent_host", Flavor::bwrap_agent_host, true),
    ("apptainer_tmpfs", Flavor::apptainer_tmpfs, false),
    ("apptainer_agent", Flavor::apptainer_agent, true),
    ("enroot", Flavor::enroot, false),
    ("enroot_agent", Flavor::enroot_agent, true),
    ("slurm_agent", Flavor::slurm_agent, true),
    ("slurm_cli", Flavor::slurm_cli, false),
];

/// What one request answered: status, headers asked for, and the raw body.
struct Answer {
    status: u16,
    kind: Option<String>,
    content_type: Option<String>,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "{} answered non-JSON {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .new_agent()
}

fn answer(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
    let mut response = response.expect("the request went out");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(String::from)
    };
    let (kind, content_type) = (header("x-arservice-kind"), header("content-type"));
    let mut body = Vec::new();
    response
        .body_mut()
        .with_config()
        .limit(u64::MAX)
        .reader()
        .read_to_end(&mut body)
        .expect("the whole body");
    Answer {
        status: response.status().as_u16(),
        kind,
        content_type,
        body,
    }
}

fn put(url: &str, body: &[u8], tar: bool) -> Answer {
    let content_type = if tar {
        "application/x-tar"
    } else {
        "application/octet-stream"
    };
    answer(
        agent()
            .put(url)
            .header("Content-Type", content_type)
            .send(body),
    )
}

fn get(url: &str) -> Answer {
    answer(agent().get(url).call())
}

/// Bytes of every value, in a length that is no multiple of anything.
fn blob(len: usize) -> Vec<u8> {
    (0..len).map(|at| (at * 7 + at / 251) as u8).collect()
}

/// A tar of `entries` (path, bytes), built as a client would.
fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, bytes) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, path, *bytes).unwrap();
    }
    builder.into_inner().unwrap()
}

/// The entries of a tar: path (without `./`) to bytes, directories with no bytes.
fn untar(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut archive = tar::Archive::new(bytes);
    let mut entries = Vec::new();
    for entry in archive.entries().expect("a tar") {
        let mut entry = entry.expect("a whole entry");
        let path = entry.path().unwrap().display().to_string();
        let path = path
            .trim_start_matches("./")
            .trim_end_matches('/')
            .to_string();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        entries.push((path, data));
    }
    entries
}

/// The result of a command that must succeed.
fn run(server: &support::Server, run_id: &str, cmd: &str) -> String {
    let result = server.exec(run_id, cmd);
    assert_eq!(result["returncode"], 0, "{cmd}: {result}");
    result["output"].as_str().unwrap().to_string()
}

/// One path: its cases, each caught on its own; the rows and the failures.
fn one_path(path: &str, flavor: &Flavor, has_files: bool) -> (Vec<String>, Vec<String>) {
    let max_body = MAX_BODY.to_string();
    let server = flavor.server(&["--max-body-bytes", &max_body], vec![]);
    let _closed = CloseAll(&server);
    flavor.start(&server, "f", json!({}));
    let files = format!("{}/files/f", server.url);
    let cases: Vec<Case> = if has_files {
        // `local` and Slurm's `local` on the node are the host; bubblewrap without a rootfs
        // shows the host read-only (an operator's choice): it may read, never write.
        let sandboxed = flavor.runner == support::flavor::Runner::Local && flavor.name != "local";
        let host_view =
            flavor.config["container_type"] == "bubblewrap" && flavor.config["rootfs"].is_null();
        let mut cases = file_cases(&server, &files, sandboxed, !host_view);
        cases.extend(failure_cases(&server, path, flavor.agent));
        cases
    } else {
        vec![(
            "cli_path_refuses",
            Box::new(|| {
                let answer = put(&format!("{files}/written.txt"), b"x", false);
                assert_eq!(answer.status, 400, "{}", answer.json());
                let detail = answer.json()["detail"].as_str().unwrap().to_string();
                assert!(detail.contains("agent"), "{detail}");
                assert_eq!(get(&format!("{files}/written.txt")).status, 400);
                let left = server.exec("f", "ls written.txt 2>&1; true");
                assert!(
                    left["output"].as_str().unwrap().contains("No such file"),
                    "{left}"
                );
            }),
        )]
    };
    let (mut rows, mut failures) = (Vec::new(), Vec::new());
    for (name, case) in cases {
        let outcome = catch_unwind(AssertUnwindSafe(case));
        let row = match outcome {
            Ok(()) => format!("{:<22} {:<34} ok", flavor.name, name),
            Err(payload) => {
                let why = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let row = format!("{:<22} {:<34} FAILED: {why}", flavor.name, name);
                failures.push(row.clone());
                row
            }
        };
        rows.push(row);
    }
    (rows, failures)
}

/// The cases of a path with file access.
fn file_cases<'a>(
    server: &'a support::Server,
    files: &'a str,
    sandboxed: bool,
    own_root: bool,
) -> Vec<Case<'a>> {
    let mut cases: Vec<Case<'a>> = vec![
        (
            "file_in_and_out_byte_for_byte",
            Box::new(move || {
                for len in [0, 1, 65_535, 65_536, 300_001] {
                    let bytes = blob(len);
                    let path = format!("sub/dir/blob-{len}.bin");
                    let answer = put(&format!("{files}/{path}?mode=0755"), &bytes, false);
                    assert_eq!(answer.status, 200, "{}", answer.json());
                    assert_eq!(answer.json()["bytes"], len, "{len}");
                    // In the instance's working directory, with its mode.
                    let listed = run(server, "f", &format!("ls -l {path}; wc -c < {path}"));
                    assert!(listed.starts_with("-rwxr-xr-x"), "{listed}");
                    assert_eq!(listed.lines().last().unwrap().trim(), len.to_string());
                    let back = get(&format!("{files}/{path}"));
                    assert_eq!(back.status, 200);
                    assert_eq!(back.kind.as_deref(), Some("file"));
                    assert_eq!(back.body.len(), len, "{path}");
                    assert!(back.body == bytes, "{path}: the bytes differ");
                }
            }),
        ),
        (
            "absolute_path_and_replace",
            Box::new(move || {
                // Named after the server: paths on the host (local, Slurm) share /tmp.
                let name = format!("ars-files-abs-{}.txt", server.port);
                let answer = put(&format!("{files}//tmp/{name}"), b"one", false);
                assert_eq!(answer.status, 200, "{}", answer.json());
                let answer = put(&format!("{files}/%2Ftmp%2F{name}"), b"two", false);
                assert_eq!(answer.status, 200, "{}", answer.json());
                assert_eq!(get(&format!("{files}//tmp/{name}")).body, b"two");
                assert_eq!(
                    run(server, "f", &format!("cat /tmp/{name}; rm /tmp/{name}")),
                    "two"
                );
            }),
        ),
        (
            "directory_out_as_tar",
            Box::new(move || {
                run(
                    server,
                    "f",
                    "rm -rf out && mkdir -p out/deep/er && printf hi > out/deep/a.txt && \
                     head -c 200000 /dev/zero > out/z && ln -s deep/a.txt out/link",
                );
                let answer = get(&format!("{files}/out"));
                assert_eq!(answer.status, 200);
                assert_eq!(answer.kind.as_deref(), Some("directory"));
                assert_eq!(answer.content_type.as_deref(), Some("application/x-tar"));
                let entries = untar(&answer.body);
                let find = |name: &str| {
                    entries
                        .iter()
                        .find(|(path, _)| path == name)
                        .unwrap_or_else(|| {
                            panic!(
                                "no {name} in {:?}",
                                entries.iter().map(|e| &e.0).collect::<Vec<_>>()
                            )
                        })
                        .1
                        .clone()
                };
                assert_eq!(find("deep/a.txt"), b"hi");
                assert_eq!(find("z").len(), 200_000);
                assert!(find("deep/er").is_empty());
                assert!(find("link").is_empty(), "a link goes as a link");
            }),
        ),
        (
            "tar_in_merged",
            Box::new(move || {
                run(
                    server,
                    "f",
                    "rm -rf proj && mkdir -p proj/x && echo kept > proj/x/old.txt",
                );
                let tar = tar_of(&[("x/y.txt", b"new file\n"), ("top.bin", &blob(70_000))]);
                let answer = put(&format!("{files}/proj"), &tar, true);
                assert_eq!(answer.status, 200, "{}", answer.json());
                assert_eq!(answer.json()["bytes"], tar.len());
                let seen = run(
                    server,
                    "f",
                    "cat proj/x/y.txt proj/x/old.txt; wc -c < proj/top.bin",
                );
                assert_eq!(seen, "new file\nkept\n70000\n");
                // A fresh directory, and no temporary left beside either.
                let answer = put(&format!("{files}/fresh/dir"), &tar, true);
                assert_eq!(answer.status, 200, "{}", answer.json());
                let left = run(server, "f", "ls -a . fresh proj | grep -c '[.]part$'; true");
                assert_eq!(left.trim(), "0", "temporaries left: {left}");
            }),
        ),
        (
            "refusals_change_nothing",
            Box::new(move || {
                run(server, "f", "rm -rf r && mkdir r && echo keep > r/file");
                let cases: Vec<(String, Vec<u8>, bool, u16, &str)> = vec![
                    (
                        format!("{files}/r/missing"),
                        vec![],
                        false,
                        404,
                        "no such file",
                    ),
                    (
                        format!("{files}/r/file/below"),
                        b"x".to_vec(),
                        false,
                        400,
                        "not a directory",
                    ),
                    (
                        format!("{files}/r"),
                        b"x".to_vec(),
                        false,
                        400,
                        "is a directory",
                    ),
                    (
                        format!("{files}/r/file"),
                        tar_of(&[("a", b"a")]),
                        true,
                        400,
                        "not a directory",
                    ),
                    (
                        format!("{files}/r/new?mode=999"),
                        b"x".to_vec(),
                        false,
                        400,
                        "octal",
                    ),
                    (
                        format!("{files}/r/bad.tar"),
                        b"not a tar at all".repeat(100),
                        true,
                        400,
                        "tar",
                    ),
                    (
                        format!("{files}/r/big"),
                        vec![b'x'; MAX_BODY + 1],
                        false,
                        413,
                        "larger",
                    ),
                ];
                for (url, body, tar, status, words) in cases {
                    let answer = if status == 404 {
                        get(&url)
                    } else {
                        put(&url, &body, tar)
                    };
                    assert_eq!(
                        answer.status,
                        status,
                        "{url}: {:?}",
                        String::from_utf8_lossy(&answer.body)
                    );
                    let detail = answer.json()["detail"].as_str().unwrap().to_lowercase();
                    assert!(detail.contains(words), "{url}: {detail}");
                    assert_refusal(&answer);
                }
                // A tar entry that would leave its directory.
                let mut evil = tar::Header::new_gnu();
                evil.set_size(1);
                evil.set_mode(0o644);
                evil.as_old_mut().name[..13].copy_from_slice(b"../escaped.tx");
                evil.set_cksum();
                let mut body = evil.as_bytes().to_vec();
                body.extend_from_slice(&[b'x'; 512]);
                body.extend_from_slice(&[0; 1024]);
                let answer = put(&format!("{files}/r/in"), &body, true);
                assert_eq!(
                    answer.status,
                    400,
                    "{:?}",
                    String::from_utf8_lossy(&answer.body)
                );
                let seen = run(server, "f", "ls -a r; cat r/file");
                assert_eq!(seen, ".\n..\nfile\nkeep\n", "the refusals changed r");
                let (status, body) = server.get("/files/nobody/x");
                assert_eq!(status, 404, "{body}");
                let (status, body) = server.get("/files/bad%20id!/x");
                assert_eq!(status, 400, "{body}");
                let (status, body) = server.get("/files/f/");
                assert_eq!(status, 400, "{body}");
            }),
        ),
        (
            "download_of_20MB_bounded_memory",
            Box::new(move || {
                run(
                    server,
                    "f",
                    "head -c 20000000 /dev/zero | tr '\\0' 'q' > big.txt",
                );
                let before = server.rss_kib().0;
                let answer = get(&format!("{files}/big.txt"));
                assert_eq!(answer.status, 200);
                assert_eq!(answer.body.len(), 20_000_000);
                assert!(answer.body.iter().all(|byte| *byte == b'q'));
                let (now, peak) = server.rss_kib();
                // The file never sits in the server's memory whole (a few chunks at most).
                assert!(
                    peak.saturating_sub(before) < 12_000,
                    "RSS {before} KiB -> {now} KiB (peak {peak} KiB)"
                );
            }),
        ),
    ];
    if sandboxed {
        cases.push((
            "the_host_is_out_of_reach",
            Box::new(move || {
                // A sandbox's file access is the sandbox's: what it writes to a host path lands
                // in the sandbox (or is refused), never on the host.
                let name = format!("ars-files-escape-{}", server.port);
                for dir in ["/usr", "/etc", "/root"] {
                    let answer = put(&format!("{files}/{dir}/{name}"), b"x", false);
                    assert!(
                        !std::path::Path::new(dir).join(&name).exists(),
                        "{dir}/{name} appeared on the host ({})",
                        answer.status
                    );
                }
                let secret = std::fs::read("/etc/shadow").unwrap_or_default();
                let answer = get(&format!("{files}//etc/shadow"));
                assert!(
                    !own_root || secret.is_empty() || answer.body != secret,
                    "the host's /etc/shadow came out of the sandbox"
                );
            }),
        ));
    }
    cases
}

#[test]
fn files_need_the_token() {
    let server = support::Server::start_with(support::Options {
        args: vec![],
        env: vec![("ARS_TOKEN", "files-t0ken")],
    });
    let agent = agent();
    let started = agent
        .post(&format!("{}/start_instance", server.url))
        .header("Authorization", "Bearer files-t0ken")
        .send(json!({"run_id": "t", "environment_config": {"container_type": "local"}}).to_string())
        .unwrap();
    assert_eq!(started.status().as_u16(), 200);
    let url = format!("{}/files/t/secret.txt", server.url);
    for auth in [None, Some("Bearer wrong"), Some("Basic files-t0ken")] {
        let mut put = agent.put(&url);
        let mut get = agent.get(&url);
        if let Some(auth) = auth {
            put = put.header("Authorization", auth);
            get = get.header("Authorization", auth);
        }
        assert_eq!(answer(put.send(&b"x"[..])).status, 401, "{auth:?}");
        assert_eq!(answer(get.call()).status, 401, "{auth:?}");
    }
    let written = server.state_dir.join("instances/t/work/secret.txt");
    assert!(!written.exists(), "a PUT without the token wrote the file");
    let ok = agent
        .put(&url)
        .header("Authorization", "Bearer files-t0ken")
        .send(&b"x"[..]);
    assert_eq!(answer(ok).status, 200);
    assert!(written.exists());
    let closed = agent
        .post(&format!("{}/close_instance", server.url))
        .header("Authorization", "Bearer files-t0ken")
        .send(json!({"run_id": "t"}).to_string())
        .unwrap();
    assert_eq!(closed.status().as_u16(), 200);
}

#[test]
fn files_through_every_path() {
    let only = std::env::var("ARS_FILES_PATHS").ok();
    let paths: Vec<(&str, Flavor, bool)> = PATHS
        .iter()
        .filter(|(name, _, _)| {
            only.as_deref()
                .is_none_or(|only| only.split(',').any(|wanted| wanted.trim() == *name))
        })
        .map(|(name, flavor, has_files)| (*name, flavor(), *has_files))
        .filter(|(_, flavor, _)| flavor.available())
        .collect();
    let results: Vec<(Vec<String>, Vec<String>)> = std::thread::scope(|scope| {
        let threads: Vec<_> = paths
            .iter()
            .map(|(path, flavor, has_files)| {
                scope.spawn(move || {
                    catch_unwind(AssertUnwindSafe(|| one_path(path, flavor, *has_files)))
                        .unwrap_or_else(|_| {
                            let row = format!("{:<22} did not start", flavor.name);
                            (vec![row.clone()], vec![row])
                        })
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| thread.join().unwrap())
            .collect()
    });
    let mut failures = Vec::new();
    for (rows, failed) in results {
        for row in rows {
            eprintln!("{row}");
        }
        failures.extend(failed);
    }
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A refusal in the project's error shape: `status: "error"`, a `detail`, and `infra: false`
/// (the request's fault, never the infrastructure's).
fn assert_refusal(answer: &Answer) {
    let body = answer.json();
    assert_eq!(body["status"], "error", "{body}");
    assert!(body["detail"].is_string(), "{body}");
    assert_eq!(body["infra"], false, "{body}");
}

/// A read-only place on a path, as the sandbox sees it: the directory, and the commands that
/// make it read-only and undo that (`None`: it is read-only as the sandbox is made).
struct ReadOnly {
    dir: &'static str,
    setup: Option<&'static str>,
    teardown: &'static str,
}

/// The read-only place each path has for real: a container's `/sys` (mounted read-only by
/// the engine), the host's `/usr` in bubblewrap's host view (bound read-only), else a
/// read-only tmpfs mounted in the working directory (root, in the sandbox's own mount
/// namespace or on the host), or the directory made 0555 where the user is not root.
fn read_only_place(path: &str) -> Option<ReadOnly> {
    let mounted = ReadOnly {
        dir: "ro",
        setup: Some(
            "mkdir -p ro && { mount -t tmpfs -o ro,size=64k arservice-ro ro 2>/dev/null || chmod 0555 ro; }",
        ),
        teardown: "umount ro 2>/dev/null; chmod 0755 ro; rm -rf ro",
    };
    match path {
        "docker_agent_bash" | "docker_agent_busybox" | "podman_agent_bash" => Some(ReadOnly {
            dir: "/sys",
            setup: None,
            teardown: "true",
        }),
        "bwrap_agent_host" => Some(ReadOnly {
            dir: "/usr",
            setup: None,
            teardown: "true",
        }),
        "local" | "bwrap_agent_rootfs" | "slurm_agent" | "apptainer_agent" | "enroot_agent" => {
            Some(mounted)
        }
        _ => None,
    }
}

/// Runs `teardown` in the instance when dropped (a failed case must not leave a mount).
struct Undo<'a>(&'a support::Server, &'static str);

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        let _ = self
            .0
            .post("/execute_command", &json!({"run_id": "f", "cmd": self.1}));
    }
}

/// The threads of the server named `name` (a `/files` request runs on a thread "files",
/// which holds one of the work places while it lives).
fn threads_named(server: &support::Server, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{}/task", server.pid()))
        .map(|tasks| {
            tasks
                .flatten()
                .filter(|task| {
                    std::fs::read_to_string(task.path().join("comm"))
                        .is_ok_and(|comm| comm.trim() == name)
                })
                .count()
        })
        .unwrap_or(0)
}

/// The server's open files.
fn open_files(server: &support::Server) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
        .map(|fds| fds.count())
        .unwrap_or(0)
}

/// What the process that runs the instance's commands (the agent, or the Slurm job's
/// server) holds: its open files and threads, seen from a command it runs.
fn runner_load(server: &support::Server) -> (usize, usize) {
    let seen = run(
        server,
        "f",
        "ls /proc/$PPID/fd | wc -l; grep Threads /proc/$PPID/status",
    );
    let mut numbers = seen
        .split_whitespace()
        .filter_map(|word| word.parse::<usize>().ok());
    (numbers.next().unwrap(), numbers.next().unwrap())
}

/// Waits until no `/files` request is in flight on the server (its threads ended, their
/// work places given back) and its open files are back to `files` or fewer.
fn wait_settled(server: &support::Server, files: usize) {
    support::wait_for(Duration::from_secs(60), "the /files thread to end", || {
        (threads_named(server, "files") == 0 && open_files(server) <= files).then_some(())
    });
}

/// The head of a raw request on a fresh connection.
fn raw_request(server: &support::Server, head: &str) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    stream
}

/// The failure paths of a path with file access (issue 17, item 7): a target that is a
/// directory, a read-only place, a client that hangs up mid-upload and mid-download; and on
/// an agent path, an agent that dies mid-upload (last: it ends the instance).
fn failure_cases<'a>(server: &'a support::Server, path: &'a str, agent: bool) -> Vec<Case<'a>> {
    let files = format!("{}/files/f", server.url);
    let on_directory = files.clone();
    // 100 MB, but where the instance's writes live in a small tmpfs (apptainer's).
    let big: usize = if path.starts_with("apptainer") {
        30_000_000
    } else {
        100_000_000
    };
    let mut cases: Vec<Case<'a>> = vec![
        (
            "download_bounded_in_the_agent_too",
            Box::new(move || {
                // The agent (or the job's server) passes a download on as it reads it: its peak
                // memory grows by a few pieces, not by the file.
                run(
                    server,
                    "f",
                    &format!("head -c {} /dev/zero > peak.bin", big / 2),
                );
                let peak = || {
                    let seen = run(server, "f", "grep VmHWM /proc/$PPID/status");
                    seen.split_whitespace()
                        .nth(1)
                        .unwrap()
                        .parse::<u64>()
                        .unwrap()
                };
                // The peak so far reset, where the kernel lets the sandbox (it may not).
                let _ = server.exec("f", "echo 5 > /proc/$PPID/clear_refs 2>/dev/null; true");
                let before = peak();
                let answer = get(&format!("{}/files/f/peak.bin", server.url));
                assert_eq!(answer.body.len(), big / 2);
                let after = peak();
                run(server, "f", "rm peak.bin");
                assert!(
                after.saturating_sub(before) < 12_000,
                "the peak RSS of the process that runs the commands went {before} KiB -> {after} KiB"
            );
            }),
        ),
        (
            "put_onto_a_directory_3MB",
            Box::new(move || {
                run(
                    server,
                    "f",
                    "rm -rf isdir && mkdir -p isdir/in && echo kept > isdir/in/a",
                );
                // Large enough that the refusal comes before the body is all sent.
                let answer = put(&format!("{on_directory}/isdir"), &blob(3 << 20), false);
                assert_eq!(answer.status, 400, "{}", answer.json());
                let detail = answer.json()["detail"].as_str().unwrap().to_string();
                assert!(
                    detail.contains("is a directory") && detail.contains("application/x-tar"),
                    "{detail}"
                );
                assert_refusal(&answer);
                let seen = run(server, "f", "ls -aR isdir; cat isdir/in/a");
                assert_eq!(seen, "isdir:\n.\n..\nin\n\nisdir/in:\n.\n..\na\nkept\n");
            }),
        ),
    ];
    if let Some(place) = read_only_place(path) {
        let files = files.clone();
        cases.push((
            "put_into_a_read_only_place",
            Box::new(move || {
                let _undo = Undo(server, place.teardown);
                if let Some(setup) = place.setup {
                    run(server, "f", setup);
                }
                let dir = place.dir;
                // Read-only for the sandbox itself, first.
                let probe = server.exec("f", &format!("touch {dir}/arservice-probe 2>&1"));
                assert_ne!(probe["returncode"], 0, "{dir} is writable here: {probe}");
                let name = format!("arservice-ro-{}", server.port);
                for (target, tar) in [
                    (format!("{dir}/{name}.txt"), false),
                    (format!("{dir}/{name}/deeper.txt"), false),
                    (format!("{dir}/{name}-dir"), true),
                ] {
                    let body = if tar {
                        tar_of(&[("a.txt", b"a")])
                    } else {
                        blob(100_000)
                    };
                    let answer = put(&format!("{files}/{target}"), &body, tar);
                    assert_eq!(answer.status, 400, "{target}: {}", answer.json());
                    assert_refusal(&answer);
                    let detail = answer.json()["detail"].as_str().unwrap().to_lowercase();
                    assert!(
                        ["read-only", "permission denied", "not permitted"]
                            .iter()
                            .any(|words| detail.contains(words))
                            && detail.contains("working directory"),
                        "{target}: {detail}"
                    );
                }
                let left = run(
                    server,
                    "f",
                    &format!("ls -a {dir} | grep -c arservice; true"),
                );
                assert_eq!(left.trim(), "0", "something was written in {dir}");
            }),
        ));
    }
    let hang_up = files.clone();
    cases.push((
        "client_hangs_up_mid_upload",
        Box::new(move || {
            run(server, "f", "rm -rf up && mkdir up && echo old > up/kept");
            let before = open_files(server);
            let infra_before = server.get("/runs/f").1["infra_failures"].clone();
            assert!(infra_before.is_u64(), "{infra_before}");
            for target in ["up/kept", "up/new.bin"] {
                let mut stream = raw_request(
                    server,
                    &format!(
                        "PUT /files/f/{target} HTTP/1.1\r\nHost: t\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                        10 << 20
                    ),
                );
                stream.write_all(&blob(1 << 20)).unwrap();
                drop(stream);
                wait_settled(server, before);
                // Nothing half-written, no temporary left (the agent may still be removing
                // it when the server's side has ended).
                support::wait_for(Duration::from_secs(30), "no temporary in up", || {
                    let listed = run(server, "f", "ls -la up");
                    (!listed.contains(".part")).then_some(listed)
                });
                let listed = run(server, "f", "ls -a up; cat up/kept");
                assert_eq!(listed, ".\n..\nkept\nold\n", "after hanging up on {target}");
            }
            // A client that hangs up is no infrastructure failure of the run.
            assert_eq!(server.get("/runs/f").1["infra_failures"], infra_before);
            // The server and the instance go on.
            let answer = put(&format!("{hang_up}/up/after.txt"), b"after", false);
            assert_eq!(answer.status, 200, "{}", answer.json());
            assert_eq!(get(&format!("{hang_up}/up/after.txt")).body, b"after");
        }),
    ));
    cases.push((
        "client_hangs_up_mid_download",
        Box::new(move || {
            run(
                server,
                "f",
                &format!("rm -rf down && mkdir down && head -c {big} /dev/zero > down/big.bin"),
            );
            let (server_files, agent_load) = (open_files(server), runner_load(server));
            for target in ["down/big.bin", "down"] {
                let mut stream = raw_request(
                    server,
                    &format!("GET /files/f/{target} HTTP/1.1\r\nHost: t\r\n\r\n"),
                );
                let mut first = vec![0; 1 << 20];
                stream.read_exact(&mut first).unwrap();
                assert!(first.starts_with(b"HTTP/1.1 200"), "{target}");
                drop(stream);
                wait_settled(server, server_files);
                // The agent (or the job's server) let go of the file, its connection and,
                // for a directory, its tar thread.
                support::wait_for(Duration::from_secs(30), "the agent to settle", || {
                    let (fds, threads) = runner_load(server);
                    (fds <= agent_load.0 && threads <= agent_load.1).then_some(())
                });
            }
            let back = get(&format!("{}/files/f/down/big.bin", server.url));
            assert_eq!(back.status, 200);
            assert_eq!(back.body.len(), big);
            run(server, "f", "rm -rf down");
        }),
    ));
    if agent && path != "slurm_agent" {
        cases.push((
            "agent_dies_mid_transfers",
            Box::new(move || {
                // A download under way, on a kept-alive connection, 1 MB of it read.
                run(server, "f", &format!("head -c {big} /dev/zero > cut.bin"));
                let mut download = raw_request(
                    server,
                    "GET /files/f/cut.bin HTTP/1.1\r\nHost: t\r\n\r\n",
                );
                let mut first = vec![0; 1 << 20];
                download.read_exact(&mut first).unwrap();
                let mut stream = raw_request(
                    server,
                    &format!(
                        "PUT /files/f/dying.bin HTTP/1.1\r\nHost: t\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                        MAX_BODY
                    ),
                );
                stream.write_all(&blob(1 << 20)).unwrap();
                // The serving agent is the parent of the commands it runs.
                let _ = server.post(
                    "/execute_command",
                    &json!({"run_id": "f", "cmd": "kill -9 $PPID"}),
                );
                // The rest of the body: the server sends it on to no agent.
                let _ = stream.write_all(&blob(MAX_BODY - (1 << 20)));
                let mut answer = String::new();
                let _ = stream.read_to_string(&mut answer);
                let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
                let value: Value = serde_json::from_str(body)
                    .unwrap_or_else(|_| panic!("not a JSON answer: {answer:?}"));
                assert!(answer.starts_with("HTTP/1.1 5") || answer.starts_with("HTTP/1.1 410"), "{answer}");
                assert_eq!(value["status"], "error", "{value}");
                assert_eq!(value["infra"], true, "{value}");
                // It says what to do: send again, or close a dead instance and start another.
                let detail = value["detail"].as_str().unwrap();
                assert!(
                    detail.contains("GET /runs/f") || detail.contains("close it"),
                    "{detail}"
                );
                // The download is cut, at once: its connection closes short of its length
                // (not kept open for a next request while the client waits for the rest).
                let cut_at = std::time::Instant::now();
                let mut rest = Vec::new();
                let _ = download.read_to_end(&mut rest);
                assert!(
                    first.len() + rest.len() < big,
                    "the whole download came from a killed agent"
                );
                assert!(
                    cut_at.elapsed() < Duration::from_secs(20),
                    "the cut download's connection stayed open {:?}",
                    cut_at.elapsed()
                );
            }),
        ));
    }
    cases
}

/// A download cut because the agent died under it (killed from a background job of an
/// earlier command, so that no command of the server's fails with it, and with the health
/// round out of the way): the run's ledger counts it as an infrastructure failure, and the
/// run is dead. Over docker's and bubblewrap's agents.
fn a_download_cut_by_a_dying_agent_counts(flavor: Flavor) {
    if !flavor.available() {
        return;
    }
    let server = flavor.server(&["--health-interval", "3600"], vec![]);
    let _close = CloseAll(&server);
    flavor.start(&server, "cut", json!({}));
    let big = 200_000_000;
    run(
        &server,
        "cut",
        &format!("head -c {big} /dev/zero > cut.bin"),
    );
    let infra = || server.get("/runs/cut").1["infra_failures"].clone();
    assert_eq!(infra(), 0);
    let mut download = raw_request(
        &server,
        "GET /files/cut/cut.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    let mut first = vec![0; 1 << 20];
    download.read_exact(&mut first).unwrap();
    assert!(first.starts_with(b"HTTP/1.1 200"), "{}", flavor.name);
    // The serving agent is the parent of the commands it runs; this one ends at once.
    let answer = server.exec(
        "cut",
        "agent=$PPID; (sleep 1; kill -9 $agent) </dev/null >/dev/null 2>&1 & echo armed",
    );
    assert_eq!(answer["output"], "armed\n", "{answer}");
    assert_eq!(infra(), 0, "no command failed");
    // Read slowly (about 6 MB/s: the agent dies a second in, long before the end), until
    // the connection ends.
    let mut got = first.len();
    let mut piece = vec![0; 64 << 10];
    let reading = std::time::Instant::now();
    while let Ok(read @ 1..) = download.read(&mut piece) {
        got += read;
        assert!(
            reading.elapsed() < Duration::from_secs(120),
            "still reading"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        got < big,
        "{}: the whole download came from a killed agent",
        flavor.name
    );
    let run = support::wait_for(Duration::from_secs(30), "the cut counted", || {
        let (_, run) = server.get("/runs/cut");
        (run["infra_failures"].as_u64().unwrap_or(0) >= 1).then_some(run)
    });
    assert_eq!(run["infra_failures"], 1, "{}: {run}", flavor.name);
    let (_, stats) = server.get("/stats");
    assert!(
        stats["infra_failures"].as_u64().unwrap() >= 1,
        "{}: {stats}",
        flavor.name
    );
}

#[test]
fn docker_a_download_cut_by_a_dying_agent_is_an_infra_failure() {
    a_download_cut_by_a_dying_agent_counts(Flavor::docker_agent_bash());
}

#[test]
fn bwrap_a_download_cut_by_a_dying_agent_is_an_infra_failure() {
    a_download_cut_by_a_dying_agent_counts(Flavor::bwrap_agent_rootfs());
}
