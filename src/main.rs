//! The `arservice` binary: start-up checks of the command line (`cli::Args`), signals, and
//! wiring.
//!
//! Every configuration error is one line on stderr and exit code 2, found before the port is
//! bound: the state dir is checked and locked first (but for `--port 0` without `--state-dir`,
//! whose default state dir is named after the port the kernel picks). SIGINT/SIGTERM refuse new
//! work (503), close every instance and exit 0; a second signal exits 1 at once.

use argh::FromArgs;
use arservice::api::{parse_presets, PoolSizes, Presets};
use arservice::cli::{self, Args};
use arservice::env::Kind;
use arservice::gateway::{Gateway, GatewaySettings, Limits, Prices, Retry, Upstream};
use arservice::http::{self, HttpSettings};
use arservice::journal::Journal;
use arservice::ledger::{parse_resources, Ledger, Resources};
use arservice::runner::Runner;
use arservice::runner_local::LocalRunner;
use arservice::runner_slurm::{SlurmRunner, SlurmSettings};
use arservice::service::{Service, Settings};
use arservice::state_dir::{self, StateDir};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Exit code for a configuration the server refuses to start with.
const EXIT_CONFIG: u8 = 2;

/// The limits when `--max-resources` is not given.
const DEFAULT_MAX_RESOURCES: &str = r#"{"instances": 10}"#;

/// Work threads when `--workers` is not given: each runs one request (one command) at a time.
const DEFAULT_WORKERS: usize = 64;

/// The most `--max-connections` may be: a thread each.
const MAX_MAX_CONNECTIONS: usize = 65_536;

/// The longest request line, and the longest header line (414 and 431 beyond).
const MAX_LINE_BYTES: usize = 8 * 1024;

/// The longest request head, request line and headers together (431 beyond).
const MAX_HEAD_BYTES: usize = 32 * 1024;

/// The most header lines of one request (431 beyond).
const MAX_HEADERS: usize = 100;

/// Open files each connection takes (its socket, the read and write halves, the handle the
/// connection cap closes it by).
const FILES_PER_CONNECTION: u64 = 3;

/// Open files kept for everything but connections: the journal, the state dir, the agents'
/// sockets, the refused connections held a moment (`tiny_http::REFUSED_HELD`), and each
/// running request's pipes and process handles (per worker thread).
const FILES_RESERVED: u64 = 128 + tiny_http::REFUSED_HELD as u64;
const FILES_PER_WORKER: u64 = 4;

/// After the last answer on a connection, how long what the client still sends (the body of
/// a refused request) is read and dropped, so that it reads the answer, not a reset.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// A connection that has made no progress for this long (no request on a kept-alive
/// connection, a head not finished, an answer not taken) may be closed for a new one at
/// `--max-connections`; a younger one is left alone, its request may be on its way.
const STALLED: std::time::Duration = std::time::Duration::from_millis(250);

/// The variable the server's token may come from; like the model keys, it never reaches a
/// sandbox.
const TOKEN_VAR: &str = "ARS_TOKEN";

/// Everything checked before the port is bound.
struct Config {
    runner: Box<dyn Runner>,
    max_resources: Resources,
    presets: Presets,
    /// Warm pools of presets (`"pool": {"size": N}`).
    pools: PoolSizes,
    container_types: Option<Vec<Kind>>,
    workers: usize,
    level: log::LevelFilter,
    default_ttl: Option<std::time::Duration>,
    default_idle_timeout: Option<std::time::Duration>,
    token: http::Token,
    gateway: Gateway,
    limits: tiny_http::Limits,
    /// The server's secrets by variable name: its token's and the gateway's upstream keys'.
    secret_env: Vec<String>,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let program = Path::new(&args[0])
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or("arservice")
        .to_string();
    let rest: Vec<&str> = args[1..].iter().map(String::as_str).collect();
    match rest.first() {
        Some(&"agent") => return cli::agent_main(&program, &rest[1..]),
        Some(&"guard") => return cli::guard_main(&program, &rest[1..]),
        Some(&"sweep") => return cli::sweep_main(&program, &rest[1..], server_id),
        _ => {}
    }
    // Before the parse, which would refuse a lone --version for the missing --runner.
    if rest.contains(&"--version") && !rest.iter().any(|arg| *arg == "--help" || *arg == "help") {
        println!("arservice {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let args = match Args::from_args(&[&program], &rest) {
        Ok(args) => args,
        Err(early) => {
            return match early.status {
                Ok(()) => {
                    // Not println!, which panics when the reader has gone (`--help | head`).
                    use std::io::Write;
                    let _ = writeln!(std::io::stdout(), "{}", early.output);
                    ExitCode::SUCCESS
                }
                Err(()) => {
                    eprintln!("arservice: {}", one_line_usage_error(&early.output));
                    ExitCode::from(EXIT_CONFIG)
                }
            };
        }
    };
    let config = match check(&args) {
        Ok(config) => config,
        Err(why) => {
            eprintln!("arservice: {why}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The token and the model keys are read: from here on no program this server starts (a
    // container CLI, sbatch, a sandbox) inherits them. No thread runs yet.
    for var in &config.secret_env {
        std::env::remove_var(var);
    }
    match run(args, config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("arservice: {why}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// argh's refusal of a command line as one line: `Required options not provided:` and the
/// options on the lines after it become `--runner is required ...`.
fn one_line_usage_error(output: &str) -> String {
    let mut lines = output
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty());
    let first = lines.next().unwrap_or("bad command line");
    let rest: Vec<&str> = lines.collect();
    if first.starts_with("Required options not provided") {
        if rest == ["--runner"] {
            return "--runner is required: local or slurm (see --help)".into();
        }
        return format!("required: {} (see --help)", rest.join(", "));
    }
    let mut line = first.to_string();
    for more in rest {
        line.push(' ');
        line.push_str(more);
    }
    line.push_str(" (see --help)");
    line
}

/// Every start-up check, in the order their errors are reported.
fn check(args: &Args) -> Result<Config, String> {
    let runner = runner_of(args)?;
    let max_resources = max_resources_of(args)?;
    let (presets, pools) = presets_of(args)?;
    let container_types = container_types_of(args)?;
    let workers = args.workers.unwrap_or(DEFAULT_WORKERS);
    if workers == 0 {
        return Err("--workers must be at least 1".into());
    }
    if args.max_body_bytes == 0 {
        return Err("--max-body-bytes must be at least 1".into());
    }
    let limits = http_limits(args)?;
    if let Some(agent) = &args.agent {
        if !arservice::env::agent::elf::is_static_executable(agent) {
            return Err(format!(
                "--agent {} is not a static executable (the default build is static: cargo build --release, see .cargo/config.toml)",
                agent.display()
            ));
        }
    }
    if !(args.health_interval > 0.0 && args.health_interval <= 86_400.0) {
        return Err("--health-interval must be a number of seconds above 0".into());
    }
    if !(args.fork_timeout > 0.0 && args.fork_timeout <= 7.0 * 86_400.0) {
        return Err("--fork-timeout must be a number of seconds above 0".into());
    }
    let default_ttl = lifetime(args.default_ttl, "--default-ttl")?;
    let default_idle_timeout = lifetime(args.default_idle_timeout, "--default-idle-timeout")?;
    let level = args.log_level.parse::<log::LevelFilter>().map_err(|_| {
        format!(
            "--log-level must be error, warn, info, debug or trace, got '{}'",
            args.log_level
        )
    })?;
    let token = token_of(args)?;
    let (gateway, key_vars) = model_gateway(args)?;
    let secret_env = secret_env_of(key_vars, &presets)?;
    Ok(Config {
        limits,
        gateway,
        secret_env,
        default_ttl,
        default_idle_timeout,
        token: token.map(Arc::from),
        runner,
        max_resources,
        presets,
        pools,
        container_types,
        workers,
        level,
    })
}

/// `--runner`, and for `slurm` its settings.
fn runner_of(args: &Args) -> Result<Box<dyn Runner>, String> {
    Ok(match args.runner.as_str() {
        "local" => Box::new(LocalRunner::default()),
        "slurm" => {
            if !(args.queue_timeout > 0.0 && args.queue_timeout <= 7.0 * 86_400.0) {
                return Err("--queue-timeout must be a number of seconds above 0".into());
            }
            let node_binary = match &args.slurm_node_binary {
                Some(path) => path.clone(),
                None => std::env::current_exe()
                    .map_err(|err| format!("cannot find this binary: {err}"))?,
            };
            Box::new(SlurmRunner::new(SlurmSettings {
                partition: args.slurm_partition.clone(),
                account: args.slurm_account.clone(),
                qos: args.slurm_qos.clone(),
                time: args.slurm_time.clone(),
                constraint: args.slurm_constraint.clone(),
                sbatch_args: args.slurm_sbatch_arg.clone(),
                queue_timeout: std::time::Duration::from_secs_f64(args.queue_timeout),
                node_binary,
                max_output_bytes: args.max_output_bytes,
                pids_limit: args.pids_limit,
            })?)
        }
        other => return Err(format!("--runner must be local or slurm, got '{other}'")),
    })
}

/// `--max-resources`, or its default.
fn max_resources_of(args: &Args) -> Result<Resources, String> {
    let max_text = args
        .max_resources
        .as_deref()
        .unwrap_or(DEFAULT_MAX_RESOURCES);
    let max_json: serde_json::Value = serde_json::from_str(max_text)
        .map_err(|err| format!("--max-resources is not valid JSON ({err}): {max_text}"))?;
    parse_resources(&max_json).map_err(|why| format!("--max-resources: {why}"))
}

/// The presets of `--environments`, and their warm pools.
fn presets_of(args: &Args) -> Result<(Presets, PoolSizes), String> {
    Ok(match &args.environments {
        None => (Presets::new(), PoolSizes::new()),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|err| format!("--environments {}: {err}", path.display()))?;
            let value = serde_json::from_str(&text).map_err(|err| {
                format!("--environments {}: not valid JSON: {err}", path.display())
            })?;
            parse_presets(value)
                .map_err(|why| format!("--environments {}: {why}", path.display()))?
        }
    })
}

/// `--container-types`: None allows every type.
fn container_types_of(args: &Args) -> Result<Option<Vec<Kind>>, String> {
    let Some(list) = &args.container_types else {
        return Ok(None);
    };
    list.split(',')
        .map(str::trim)
        .map(|name| {
            Kind::parse(name).ok_or_else(|| {
                format!(
                    "--container-types: unknown '{name}': expected some of {}",
                    Kind::NAMES
                )
            })
        })
        .collect::<Result<Vec<Kind>, String>>()
        .map(Some)
}

/// `--default-ttl` or `--default-idle-timeout` (named `flag`): seconds above 0, at most a year.
fn lifetime(value: Option<f64>, flag: &str) -> Result<Option<std::time::Duration>, String> {
    match value {
        None => Ok(None),
        Some(seconds) if seconds > 0.0 && seconds <= 365.0 * 86_400.0 => {
            Ok(Some(std::time::Duration::from_secs_f64(seconds)))
        }
        Some(_) => Err(format!("{flag} must be a number of seconds above 0")),
    }
}

/// The server's token (`--token`, else `$ARS_TOKEN`; empty is none); none is refused on an
/// address other machines reach, unless `--insecure`.
fn token_of(args: &Args) -> Result<Option<String>, String> {
    let token = args
        .token
        .clone()
        .or_else(|| std::env::var(TOKEN_VAR).ok())
        .filter(|token| !token.is_empty());
    if token.is_none() && !args.insecure && !is_loopback(&args.host) {
        return Err(format!(
            "--host {} is reachable from other machines and anyone there could run commands: set --token (or ARS_TOKEN), or pass --insecure",
            args.host
        ));
    }
    Ok(token)
}

/// The server's secret variables (its token's and the model keys'); a preset that forwards
/// one is refused.
fn secret_env_of(key_vars: Vec<String>, presets: &Presets) -> Result<Vec<String>, String> {
    let mut secret_env = vec![TOKEN_VAR.to_string()];
    secret_env.extend(key_vars);
    for (name, preset) in presets {
        let forwarded = preset["forward_env"].as_array().into_iter().flatten();
        if let Some(secret) = forwarded
            .filter_map(serde_json::Value::as_str)
            .find(|var| secret_env.iter().any(|secret| secret == var))
        {
            return Err(format!(
                "--environments: preset '{name}' forwards {secret}, a secret of this server (its token or a model key of the gateway), which never reaches a sandbox: take it out of forward_env"
            ));
        }
    }
    Ok(secret_env)
}

/// What one client may take of the HTTP front.
fn http_limits(args: &Args) -> Result<tiny_http::Limits, String> {
    if !(1..=MAX_MAX_CONNECTIONS).contains(&args.max_connections) {
        return Err(format!(
            "--max-connections must be from 1 to {MAX_MAX_CONNECTIONS}"
        ));
    }
    let seconds = |value: f64, flag: &str| {
        if (0.001..=86_400.0).contains(&value) {
            Ok(std::time::Duration::from_secs_f64(value))
        } else {
            Err(format!(
                "{flag} must be a number of seconds above 0, at most a day"
            ))
        }
    };
    let client_timeout = seconds(args.client_timeout, "--client-timeout")?;
    Ok(tiny_http::Limits {
        max_connections: args.max_connections,
        max_line_bytes: MAX_LINE_BYTES,
        max_head_bytes: MAX_HEAD_BYTES,
        max_headers: MAX_HEADERS,
        head_timeout: client_timeout,
        io_timeout: client_timeout,
        keep_alive: seconds(args.keep_alive_timeout, "--keep-alive-timeout")?,
        linger: LINGER,
        stall: STALLED,
    })
}

/// Most retries of one model call: more would hold a worker for minutes on a dead upstream.
const MAX_MODEL_RETRIES: u32 = 10;

/// The model gateway's configuration: upstreams (their keys read from the environment now),
/// prices, limits, retries and timeout; and the variables the keys came from.
fn model_gateway(args: &Args) -> Result<(Gateway, Vec<String>), String> {
    let upstreams = args
        .model_upstream
        .iter()
        .map(|spec| Upstream::parse(spec, |var| std::env::var(var).ok()))
        .collect::<Result<Vec<_>, _>>()?;
    let key_vars = upstreams
        .iter()
        .filter_map(|upstream| upstream.key_env.clone())
        .collect();
    let prices = match &args.model_prices {
        None => Prices::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|err| format!("--model-prices {}: {err}", path.display()))?;
            Prices::parse(&text)
                .map_err(|why| format!("--model-prices {}: {why}", path.display()))?
        }
    };
    if args
        .cost_limit
        .is_some_and(|usd| !(usd > 0.0 && usd.is_finite()))
    {
        return Err("--cost-limit must be a number of USD above 0".into());
    }
    if args.call_limit == Some(0) {
        return Err("--call-limit must be at least 1".into());
    }
    if args.model_retries > MAX_MODEL_RETRIES {
        return Err(format!(
            "--model-retries must be at most {MAX_MODEL_RETRIES}"
        ));
    }
    if !(args.model_backoff >= 0.0 && args.model_backoff <= 600.0) {
        return Err("--model-backoff must be a number of seconds from 0 to 600".into());
    }
    if !(args.model_timeout > 0.0 && args.model_timeout <= 86_400.0) {
        return Err("--model-timeout must be a number of seconds above 0".into());
    }
    let gateway = Gateway::new(GatewaySettings {
        upstreams,
        prices,
        limits: Limits {
            cost_usd: args.cost_limit,
            calls: args.call_limit,
        },
        retry: Retry {
            retries: args.model_retries,
            backoff: std::time::Duration::from_secs_f64(args.model_backoff),
        },
        timeout: std::time::Duration::from_secs_f64(args.model_timeout),
    })?;
    Ok((gateway, key_vars))
}

/// True for addresses only this machine can reach.
fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The log, on stderr, that never takes the server down with it: `simple_logger` decides what
/// is logged (levels by module), each line is written here in one `write`. Its own writing
/// (`eprintln!`) panicked when stderr was gone (the reader of its pipe exited: a terminal
/// closed, `arservice ... 2>&1 | head`, a supervisor that died): a panic in the signal thread
/// left a server that ignored SIGTERM. The first failed write ends the log; the server goes on.
struct QuietWhenStderrIsGone {
    inner: simple_logger::SimpleLogger,
    gone: AtomicBool,
}

impl log::Log for QuietWhenStderrIsGone {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        !self.gone.load(Ordering::Relaxed) && self.inner.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // simple_logger's format (`LEVEL [target] message`), written in one `write` (its
        // `eprintln!` made two per line: the line, then its end).
        let target = match record.target() {
            "" => record.module_path().unwrap_or_default(),
            target => target,
        };
        let line = format!("{:<5} [{target}] {}\n", record.level(), record.args());
        if std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes()).is_err() {
            self.gone.store(true, Ordering::Relaxed);
        }
    }

    fn flush(&self) {}
}

/// What `run` fails with: one line on stderr, exit 2.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Binds the port, claims the state dir, starts the service and serves until a signal stops it.
fn run(args: Args, config: Config) -> Result<(), BoxError> {
    start_logging(config.level)?;
    // Orphans of commands (a `setsid` daemon, a double fork) come back to this process, where
    // a timeout or a close finds them (src/env/process.rs).
    if let Err(err) = arservice::env::process::become_subreaper() {
        log::warn!("cannot become the subreaper of commands: {err}; what a command detaches from its group may outlive its timeout");
    }
    let (server, port, claimed) = bind(&args, &config)?;
    let (level, access) = access_summary(&args, &config, port);
    let claimed = match claimed {
        Some(claimed) => claimed,
        None => StateDir::claim(&state_dir::default_dir(port)?)?,
    };
    let state_dir = claimed.path().to_path_buf();

    let server_id = server_id(&state_dir);
    let journal = Journal::open(&state_dir).map_err(|err| {
        format!(
            "cannot create the journal under state dir {}: {err}",
            state_dir.display()
        )
    })?;
    let ledger = Ledger::new(config.max_resources);
    let mut service = Service::new(
        config.runner,
        ledger,
        Settings {
            agent: agent_binary(&args),
            default_ttl: config.default_ttl,
            default_idle_timeout: config.default_idle_timeout,
            server_id,
            state_dir: state_dir.clone(),
            max_output_bytes: args.max_output_bytes,
            presets: config.presets,
            container_types: config.container_types.clone(),
            journal,
            allow_client_host_access: args.allow_client_host_access,
            secret_env: config.secret_env.clone(),
            pids_limit: (args.pids_limit > 0).then_some(args.pids_limit),
            fork_seed: args.fork_seed.clone(),
            fork_timeout: std::time::Duration::from_secs_f64(args.fork_timeout),
        },
    );
    service
        .configure_pools(&config.pools)
        .map_err(|why| format!("--environments: {why}"))?;
    let service = Arc::new(service);
    start_background(&args, &server, &service, port)?;
    announce(&args, &config.gateway, port, &state_dir, level, &access);
    http::serve(
        server,
        service,
        Arc::new(config.gateway),
        HttpSettings {
            workers: config.workers,
            max_body_bytes: args.max_body_bytes,
            client_timeout: config.limits.io_timeout,
        },
        config.token,
    );
    log::info!("stopped");
    Ok(())
}

/// The log on stderr, at `--log-level` (the HTTP crates' own at warn).
fn start_logging(level: log::LevelFilter) -> Result<(), log::SetLoggerError> {
    let logger = simple_logger::SimpleLogger::new()
        .with_level(level)
        .with_module_level("tiny_http", log::LevelFilter::Warn)
        .with_module_level("ureq", log::LevelFilter::Warn)
        .with_module_level("ureq_proto", log::LevelFilter::Warn);
    log::set_max_level(logger.max_level());
    log::set_boxed_logger(Box::new(QuietWhenStderrIsGone {
        inner: logger,
        gone: AtomicBool::new(false),
    }))
}

/// The listening server and its port, and the state dir when it could be claimed before the
/// bind (`None` for `--port 0` without `--state-dir`).
fn bind(
    args: &Args,
    config: &Config,
) -> Result<(Arc<tiny_http::Server>, u16, Option<StateDir>), BoxError> {
    // The state dir is checked, marked as ours and locked before the port is bound (and
    // before anything in it is read or removed): a second server on the same state dir, or a
    // directory that is not arservice's, stops here, exit 2, without touching the port. With
    // `--port 0` and no `--state-dir`, the default state dir is named after the port the
    // kernel picks, so it is claimed right after the bind.
    let early_dir = match (&args.state_dir, args.port) {
        (Some(dir), _) => Some(dir.clone()),
        (None, 0) => None,
        (None, port) => Some(state_dir::default_dir(port)?),
    };
    let claimed = early_dir.as_deref().map(StateDir::claim).transpose()?;
    let mut limits = config.limits.clone();
    limits.max_connections = connections_that_fit(limits.max_connections, config.workers);
    let server = Arc::new(
        tiny_http::Server::http_with_limits((args.host.as_str(), args.port), limits)
            .map_err(|err| format!("cannot listen on {}:{}: {err}", args.host, args.port))?,
    );
    // Never dropped: dropping a tiny_http server answers every request still queued in it
    // with a bare 500 while the process exits; unanswered, they see the connection close.
    std::mem::forget(Arc::clone(&server));
    let port = server
        .server_addr()
        .to_ip()
        .map(|addr| addr.port())
        .unwrap_or(args.port);
    Ok((server, port, claimed))
}

/// Adopts what an earlier life left, starts the pools, the signal watch and the health watch,
/// and writes `--ready-file`.
fn start_background(
    args: &Args,
    server: &Arc<tiny_http::Server>,
    service: &Arc<Service>,
    port: u16,
) -> Result<(), BoxError> {
    // What an earlier life on this state dir recorded and still runs is taken over; all
    // else it left is removed, so nothing is left untracked.
    let adopted = service.adopt_journal();
    service.sweep_leftovers(&adopted);
    service.start_pools()?;
    watch_signals(Arc::clone(server), Arc::clone(service))?;
    let watched = Arc::clone(service);
    let interval = std::time::Duration::from_secs_f64(args.health_interval);
    std::thread::Builder::new()
        .name("health".into())
        .spawn(move || watched.watch(interval))?;
    if let Some(path) = &args.ready_file {
        write_ready_file(path, port)?;
    }
    Ok(())
}

/// The lines of a server that listens: where, who may reach it, and the gateway.
fn announce(
    args: &Args,
    gateway: &Gateway,
    port: u16,
    state_dir: &Path,
    level: log::Level,
    access: &str,
) {
    // The first line a script waits for; it names the real port when --port 0 was given.
    log::info!(
        "arservice {} listening on http://{}:{} (runner {}, state dir {})",
        env!("CARGO_PKG_VERSION"),
        args.host,
        port,
        args.runner,
        state_dir.display()
    );
    log::log!(level, "{access}");
    if args.token.is_some() {
        log::warn!(
            "--token is on this server's command line, where every user of the machine can read it (ps): prefer the variable {TOKEN_VAR}"
        );
    }
    if gateway.is_on() {
        log::info!("{}", gateway.describe());
    }
}

/// Raises the open-files limit to its hard maximum, and lowers `--max-connections` to what
/// it then allows (with a warning): past it, the kernel would refuse connections before the
/// cap could make room for them.
fn connections_that_fit(max_connections: usize, workers: usize) -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the one struct we pass.
    let files = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return max_connections;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
        limit.rlim_cur
    };
    let reserved = FILES_RESERVED + FILES_PER_WORKER * 2 * workers as u64;
    let fit = (files.saturating_sub(reserved) / FILES_PER_CONNECTION).max(1);
    if (max_connections as u64) > fit {
        log::warn!(
            "--max-connections {max_connections} lowered to {fit}: the open-file limit is {files} (ulimit -n)"
        );
        fit as usize
    } else {
        max_connections
    }
}

/// Who may run what as whom, in one line for the start-up log: who can call the API (token
/// holders, any user of this machine, anyone who reaches the address), which user their
/// commands run as, and where (on this machine itself with `local` or host fields, or in
/// sandboxes). A warning when more than token holders can reach this machine itself.
fn access_summary(args: &Args, config: &Config, port: u16) -> (log::Level, String) {
    let uid = state_dir::euid();
    let user = if uid == 0 {
        "root".to_string()
    } else {
        format!("uid {uid}")
    };
    let who = match (&config.token, is_loopback(&args.host)) {
        (Some(_), _) => "clients with the token".to_string(),
        (None, true) => format!(
            "any user of this machine (no --token, listening on {}:{port})",
            args.host
        ),
        (None, false) => format!(
            "anyone who can reach {}:{port} (no --token, --insecure)",
            args.host
        ),
    };
    let kinds: Vec<Kind> = config.container_types.clone().unwrap_or_else(|| {
        [
            Kind::Docker,
            Kind::Podman,
            Kind::Apptainer,
            Kind::Enroot,
            Kind::Bubblewrap,
            Kind::Local,
        ]
        .to_vec()
    });
    let sandboxes: Vec<&str> = kinds
        .iter()
        .filter(|kind| **kind != Kind::Local)
        .map(|kind| kind.name())
        .collect();
    let mut places = Vec::new();
    let local = kinds.contains(&Kind::Local);
    if local {
        places.push("on this machine itself with no sandbox (container type local)".to_string());
    }
    if !sandboxes.is_empty() {
        places.push(format!("in sandboxes ({})", sandboxes.join(", ")));
    }
    let mut line = format!(
        "access: {who} can run commands as {user} {}",
        places.join(", and ")
    );
    if args.allow_client_host_access {
        line.push_str(
            "; --allow-client-host-access lets them set run_args, bwrap_args, executable and host paths, which reach this machine itself",
        );
    }
    if args.runner == "slurm" {
        line.push_str(&format!(", as Slurm jobs of {user}"));
    }
    let host_reachable = local || args.allow_client_host_access;
    let level = if config.token.is_none() && host_reachable {
        log::Level::Warn
    } else {
        log::Level::Info
    };
    (level, line)
}

/// This server's identity: a hash of the host name and the state dir, so that a restart on
/// the same state dir finds what its earlier life left, and two servers never collide.
fn server_id(state_dir: &Path) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let dir = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let mut identity = host.trim().as_bytes().to_vec();
    identity.push(0);
    identity.extend_from_slice(dir.as_os_str().as_encoded_bytes());
    let hash = arservice::env::fnv1a(&identity);
    format!("{:08x}", hash as u32 ^ (hash >> 32) as u32)
}

/// The static binary sandboxes run as their agent: `--agent`, else this binary when it is
/// static; `None` keeps every environment on its CLI path. Made absolute: it becomes a bind
/// mount source (`docker run -v ./arservice:...` is read as a volume name and fails).
fn agent_binary(args: &Args) -> Option<PathBuf> {
    if let Some(path) = &args.agent {
        return Some(std::path::absolute(path).unwrap_or_else(|_| path.clone()));
    }
    let this = std::env::current_exe().ok()?;
    arservice::env::agent::elf::is_static_executable(&this).then_some(this)
}

/// Announces where this server listens, atomically (write, then rename): a Slurm job's
/// server tells the login node's server its host and port this way.
fn write_ready_file(path: &Path, port: u16) -> Result<(), String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let body = serde_json::json!({"host": host.trim(), "port": port, "pid": std::process::id()});
    let partial = path.with_extension("partial");
    std::fs::write(&partial, body.to_string())
        .and_then(|()| std::fs::rename(&partial, path))
        .map_err(|err| format!("cannot write --ready-file {}: {err}", path.display()))
}

/// First SIGINT/SIGTERM: graceful shutdown; a second one: exit at once.
fn watch_signals(server: Arc<tiny_http::Server>, service: Arc<Service>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut forever = signals.forever();
            if let Some(signal) = forever.next() {
                log::info!("signal {signal}: refusing new work, closing every instance");
                let closer = std::thread::spawn(move || {
                    service.shutdown();
                    // Whatever the closes did not find is still in our tree: it goes too.
                    let left = arservice::env::process::kill_descendants();
                    if left > 0 {
                        log::warn!("shutdown: killed {left} process(es) that hid their markers");
                    }
                    server.unblock();
                });
                if forever.next().is_some() {
                    log::warn!("second signal: exiting without finishing the shutdown");
                    std::process::exit(1);
                }
                let _ = closer.join();
            }
        })?;
    Ok(())
}
