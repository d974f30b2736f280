//! `PUT` and `GET /files/{run_id}/{path}` through every exec path: the paths with file access
//! (`local`, every agent path, the Slurm job's server) move files and directories both ways,
//! byte for byte, and every refusal answers its status and leaves nothing; the CLI paths
//! answer 400 and write nothing.
//!
//! The paths run in parallel, each with its own server and instance; the test prints one row
//! per path and case, then fails if any failed.

mod support;

use serde_json::{json, Value};
use std::io::Read;
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
fn one_path(flavor: &Flavor, has_files: bool) -> (Vec<String>, Vec<String>) {
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
        file_cases(&server, &files, sandboxed, !host_view)
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
    let paths: Vec<(Flavor, bool)> = PATHS
        .iter()
        .filter(|(name, _, _)| {
            only.as_deref()
                .is_none_or(|only| only.split(',').any(|wanted| wanted.trim() == *name))
        })
        .map(|(_, flavor, has_files)| (flavor(), *has_files))
        .filter(|(flavor, _)| flavor.available())
        .collect();
    let results: Vec<(Vec<String>, Vec<String>)> = std::thread::scope(|scope| {
        let threads: Vec<_> = paths
            .iter()
            .map(|(flavor, has_files)| {
                scope.spawn(move || {
                    catch_unwind(AssertUnwindSafe(|| one_path(flavor, *has_files))).unwrap_or_else(
                        |_| {
                            let row = format!("{:<22} did not start", flavor.name);
                            (vec![row.clone()], vec![row])
                        },
                    )
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
