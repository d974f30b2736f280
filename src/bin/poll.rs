//! `poll`: a live view of a running arservice, built on `GET /stats` alone.
//!
//! Owns the terminal while it runs live: redraws in place (cursor home, clear each line's end,
//! clear below; never a full clear, so nothing flickers), hides the cursor and shows it again
//! on every way out, Ctrl-C included. It never writes to the server and never decides anything
//! about instances: it only reads `/stats` and draws it.
//!
//! Invariants a reader must keep:
//! - every key of `/stats` is optional here: older servers and the original Python service lack
//!   the extensions, so a missing or mistyped key renders as absent, never as a crash;
//! - every line drawn is cut to the terminal's width and a frame never exceeds its height, so
//!   the terminal never wraps or scrolls a frame;
//! - a closed stdout (`poll | head`) ends the program quietly with exit code 0.

use argh::FromArgs;
use serde_json::Value;
use std::fmt;
use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where the server listens when `--url` is not given (the server's own default port).
const DEFAULT_URL: &str = "http://127.0.0.1:8008";

/// Environment variable holding the bearer token, as the server reads it too.
const TOKEN_ENV: &str = "ARS_TOKEN";

/// How long one `/stats` request may take before the server counts as unreachable.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest `/stats` answer read; far above what thousands of instances produce.
const MAX_STATS_BYTES: u64 = 64 * 1024 * 1024;

/// The shortest `--interval` accepted (a faster poll only loads the server) and the longest.
const MIN_INTERVAL_S: f64 = 0.1;
const MAX_INTERVAL_S: f64 = 86_400.0;

/// Exit code when the server cannot be read (unreachable, refused, not arservice).
const EXIT_FAILURE: u8 = 1;

/// Exit code for a command line poll refuses.
const EXIT_USAGE: u8 = 2;

/// Terminal size when neither the terminal nor `$COLUMNS` / `$LINES` tell it.
const DEFAULT_WIDTH: usize = 100;
const DEFAULT_HEIGHT: usize = 40;

/// The resource every instance costs one of; listed first.
const INSTANCES: &str = "instances";

/// Cells in a resource bar, and the fewest it is cut to on a narrow terminal.
const BAR_WIDTH: usize = 20;
const MIN_BAR_WIDTH: usize = 5;

/// Characters of a percentage: `100%`.
const PERCENT_WIDTH: usize = 4;

/// Images listed by name in the summary, the rest counted on one line; fewer with `--list`,
/// whose table names each instance's image anyway.
const IMAGE_ROWS: usize = 10;
const IMAGE_ROWS_WITH_LIST: usize = 3;

/// The shortest a run id or image cell is cut to before whole columns are dropped.
const MIN_NAME_WIDTH: usize = 12;

/// Spaces between two table columns.
const COLUMN_GAP: usize = 2;

/// What a cut cell or line ends with in its middle.
const ELLIPSIS: char = '…';

/// ANSI sequences of the live view.
const CURSOR_HOME: &str = "\x1b[H";
const CLEAR_LINE_END: &str = "\x1b[K";
const CLEAR_BELOW: &str = "\x1b[J";
const HIDE_CURSOR: &str = "\x1b[?25l";
const SHOW_CURSOR: &str = "\x1b[?25h";

const SECONDS_PER_MINUTE: u64 = 60;
const SECONDS_PER_HOUR: u64 = 3_600;
const SECONDS_PER_DAY: u64 = 86_400;

#[derive(FromArgs)]
/// poll: a live view of a running arservice (its GET /stats), redrawn every --interval seconds.
/// Prints once and exits when stdout is not a terminal.
struct Args {
    /// base URL of the server (default http://127.0.0.1:8008)
    #[argh(option, default = "String::from(DEFAULT_URL)")]
    url: String,
    /// also list the instances, the longest idle first, as many as fit
    #[argh(switch)]
    list: bool,
    /// seconds between two refreshes (default 1.0)
    #[argh(option, default = "1.0")]
    interval: f64,
    /// print the /stats JSON, pretty, instead of the summary
    #[argh(switch)]
    raw: bool,
    /// print once and exit (also what happens when stdout is not a terminal)
    #[argh(switch)]
    once: bool,
    /// only instances whose run_id contains this text
    #[argh(option)]
    run_id: Option<String>,
    /// only instances whose container image contains this text
    #[argh(option)]
    container: Option<String>,
    /// bearer token of a server started with --token (default: $ARS_TOKEN)
    #[argh(option)]
    token: Option<String>,
}

/// Why poll stops with a failure.
#[derive(Debug)]
enum PollError {
    /// The command line is wrong (exit 2).
    Usage(String),
    /// `/stats` could not be read (exit 1).
    Fetch(FetchError),
    /// Writing the output failed; a closed pipe among these ends quietly with 0.
    Output(io::Error),
}

impl fmt::Display for PollError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PollError::Usage(why) => f.write_str(why),
            PollError::Fetch(err) => err.fmt(f),
            PollError::Output(err) => write!(f, "cannot write the output: {err}"),
        }
    }
}

impl std::error::Error for PollError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PollError::Usage(_) => None,
            PollError::Fetch(err) => Some(err),
            PollError::Output(err) => Some(err),
        }
    }
}

impl From<io::Error> for PollError {
    fn from(err: io::Error) -> PollError {
        PollError::Output(err)
    }
}

/// Why one read of `/stats` failed; each message names the URL.
#[derive(Debug)]
enum FetchError {
    /// No HTTP answer at all: refused, timed out, unknown host, connection cut.
    Unreachable { url: String, cause: String },
    /// An answer that is not a success; `detail` is the server's own words.
    Status {
        url: String,
        status: u16,
        detail: String,
        hint: &'static str,
    },
    /// A success whose body is not a `/stats` document.
    NotStats { url: String, cause: String },
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Unreachable { url, cause } => {
                write!(f, "cannot reach arservice at {url}: {cause}")
            }
            FetchError::Status {
                url,
                status,
                detail,
                hint,
            } => write!(f, "{url}/stats answered {status}: {detail}{hint}"),
            FetchError::NotStats { url, cause } => {
                write!(f, "{url}/stats is not an arservice /stats answer: {cause}")
            }
        }
    }
}

impl std::error::Error for FetchError {}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let program = argv
        .first()
        .and_then(|path| std::path::Path::new(path).file_name())
        .and_then(|name| name.to_str())
        .unwrap_or("poll")
        .to_string();
    let rest: Vec<&str> = argv.iter().skip(1).map(String::as_str).collect();
    let args = match Args::from_args(&[&program], &rest) {
        Ok(args) => args,
        Err(early) => {
            return match early.status {
                Ok(()) => {
                    // --help: a closed pipe here is as fine as anywhere else.
                    let _ = writeln!(io::stdout(), "{}", early.output);
                    ExitCode::SUCCESS
                }
                Err(()) => {
                    let _ = writeln!(io::stderr(), "{}", early.output.trim_end());
                    ExitCode::from(EXIT_USAGE)
                }
            };
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(PollError::Output(err)) if err.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(io::stderr(), "poll: {err}");
            ExitCode::from(match err {
                PollError::Usage(_) => EXIT_USAGE,
                PollError::Fetch(_) | PollError::Output(_) => EXIT_FAILURE,
            })
        }
    }
}

fn run(args: Args) -> Result<(), PollError> {
    if !(MIN_INTERVAL_S..=MAX_INTERVAL_S).contains(&args.interval) {
        return Err(PollError::Usage(format!(
            "--interval must be between {MIN_INTERVAL_S} and {MAX_INTERVAL_S} seconds, got {}",
            args.interval
        )));
    }
    let interval = Duration::from_secs_f64(args.interval);
    let token = args
        .token
        .clone()
        .or_else(|| std::env::var(TOKEN_ENV).ok())
        .filter(|token| !token.is_empty());
    let client = Client::new(
        &args.url,
        &Filters {
            run_id: args.run_id.clone(),
            container: args.container.clone(),
        },
        token,
    );
    let view = View {
        url: client.base_url.clone(),
        list: args.list,
        raw: args.raw,
        filters: Filters {
            run_id: args.run_id,
            container: args.container,
        },
    };
    if args.once || !io::stdout().is_terminal() {
        once(&client, &view)
    } else {
        live(&client, &view, interval)
    }
}

/// One read, one print: for scripts, pipes and `--once`.
fn once(client: &Client, view: &View) -> Result<(), PollError> {
    let stats = client.fetch().map_err(PollError::Fetch)?;
    let mut text = if view.raw {
        pretty(&stats)
    } else {
        let screen = Screen::measure();
        render(&stats, view, screen).join("\n")
    };
    text.push('\n');
    let mut stdout = io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// Redraws every `interval` until Ctrl-C (or SIGTERM, SIGHUP); a resize redraws at once.
fn live(client: &Client, view: &View, interval: Duration) -> Result<(), PollError> {
    let (wake_tx, wake_rx) = mpsc::channel();
    watch_signals(wake_tx)?;
    let _cursor = HiddenCursor::hide()?;
    let mut failing_since: Option<Instant> = None;
    loop {
        // One column less than the terminal: a line that fills the last column leaves the
        // cursor in its pending-wrap state, where clear-to-end-of-line erases the last cell.
        let screen = Screen::measure().narrower_by(1);
        let lines = match client.fetch() {
            Ok(stats) => {
                failing_since = None;
                if view.raw {
                    pretty(&stats).lines().map(str::to_string).collect()
                } else {
                    render(&stats, view, screen)
                }
            }
            Err(err) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                vec![format!(
                    "{err} · for {}, retrying every {}s",
                    duration_text(since.elapsed().as_secs_f64()),
                    amount_text(interval.as_secs_f64())
                )]
            }
        };
        draw(&screen.fit(lines))?;
        match wake_rx.recv_timeout(interval) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

/// Writes one frame over the last one: home, each line then clear-to-end-of-line, then clear
/// below. The frame goes out under one stdout lock, so a signal never cuts it in half.
fn draw(lines: &[String]) -> io::Result<()> {
    let mut frame = String::from(CURSOR_HOME);
    for (index, line) in lines.iter().enumerate() {
        if index > 0 {
            frame.push('\n');
        }
        frame.push_str(line);
        frame.push_str(CLEAR_LINE_END);
    }
    frame.push_str(CLEAR_BELOW);
    let mut stdout = io::stdout().lock();
    stdout.write_all(frame.as_bytes())?;
    stdout.flush()
}

/// Hides the cursor for the live view and shows it again when dropped.
struct HiddenCursor;

impl HiddenCursor {
    fn hide() -> io::Result<HiddenCursor> {
        let mut stdout = io::stdout().lock();
        stdout.write_all(HIDE_CURSOR.as_bytes())?;
        stdout.flush()?;
        Ok(HiddenCursor)
    }
}

impl Drop for HiddenCursor {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Shows the cursor and ends the last frame's line, so the shell prompt starts on its own line.
fn restore_terminal() {
    let mut stdout = io::stdout().lock();
    let _ = writeln!(stdout, "{SHOW_CURSOR}");
    let _ = stdout.flush();
}

/// SIGINT, SIGTERM, SIGHUP: restore the terminal and exit 0 at once (even while a fetch
/// hangs). SIGWINCH: wake the live loop to redraw at the new size.
fn watch_signals(wake: mpsc::Sender<()>) -> io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGWINCH};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGWINCH])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == SIGWINCH {
                    let _ = wake.send(());
                    continue;
                }
                // Takes the stdout lock: waits for a frame being written to finish.
                restore_terminal();
                std::process::exit(0);
            }
        })?;
    Ok(())
}

/// The `/stats` filters, sent as the query parameters `run_id` and `container_name`.
struct Filters {
    run_id: Option<String>,
    container: Option<String>,
}

impl Filters {
    fn query(&self) -> String {
        let pairs: Vec<String> = [
            ("run_id", &self.run_id),
            ("container_name", &self.container),
        ]
        .into_iter()
        .filter_map(|(key, value)| {
            value
                .as_deref()
                .filter(|value| !value.is_empty())
                .map(|value| format!("{key}={}", percent_encode(value)))
        })
        .collect();
        if pairs.is_empty() {
            String::new()
        } else {
            format!("?{}", pairs.join("&"))
        }
    }

    /// `run_id ~ "eval", image ~ "sweb"`, or `None` without filters.
    fn describe(&self) -> Option<String> {
        let parts: Vec<String> = [("run_id", &self.run_id), ("image", &self.container)]
            .into_iter()
            .filter_map(|(name, value)| {
                value
                    .as_deref()
                    .filter(|value| !value.is_empty())
                    .map(|value| format!("{name} ~ {value:?}"))
            })
            .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    }
}

/// Encodes everything but RFC 3986's unreserved characters as `%XX` of its UTF-8 bytes.
fn percent_encode(text: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// Reads `/stats`, with the filters and the token.
struct Client {
    agent: ureq::Agent,
    /// Without a trailing slash, as shown to the user.
    base_url: String,
    stats_url: String,
    token: Option<String>,
}

impl Client {
    fn new(url: &str, filters: &Filters, token: Option<String>) -> Client {
        let trimmed = url.trim().trim_end_matches('/');
        let base_url = if trimmed.contains("://") {
            trimmed.to_string()
        } else {
            format!("http://{trimmed}")
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(FETCH_TIMEOUT))
            .build()
            .new_agent();
        Client {
            agent,
            stats_url: format!("{base_url}/stats{}", filters.query()),
            base_url,
            token,
        }
    }

    fn fetch(&self) -> Result<Value, FetchError> {
        let mut request = self.agent.get(&self.stats_url);
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let unreachable = |err: ureq::Error| FetchError::Unreachable {
            url: self.base_url.clone(),
            cause: match err {
                ureq::Error::Io(err) => io_cause(&err),
                ureq::Error::Timeout(_) => format!(
                    "no answer within {}",
                    duration_text(FETCH_TIMEOUT.as_secs_f64())
                ),
                ureq::Error::HostNotFound => "host not found".to_string(),
                other => other.to_string(),
            },
        };
        let mut response = request.call().map_err(unreachable)?;
        let status = response.status();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_STATS_BYTES)
            .lossy_utf8(true)
            .read_to_string()
            .map_err(unreachable)?;
        if !status.is_success() {
            let detail = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|error| {
                    error
                        .get("detail")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .unwrap_or_else(|| {
                    let text = body.lines().next().unwrap_or("").trim();
                    if text.is_empty() {
                        status.canonical_reason().unwrap_or("no detail").to_string()
                    } else {
                        cut_middle(text, DEFAULT_WIDTH)
                    }
                });
            let hint = match (status.as_u16(), &self.token) {
                (401, None) => "; pass --token or set ARS_TOKEN",
                (401, Some(_)) => "; the token given with --token or ARS_TOKEN was refused",
                _ => "",
            };
            return Err(FetchError::Status {
                url: self.base_url.clone(),
                status: status.as_u16(),
                detail,
                hint,
            });
        }
        match serde_json::from_str::<Value>(&body) {
            Ok(stats @ Value::Object(_)) => Ok(stats),
            Ok(_) => Err(FetchError::NotStats {
                url: self.base_url.clone(),
                cause: "the answer is JSON but not an object".into(),
            }),
            Err(err) => Err(FetchError::NotStats {
                url: self.base_url.clone(),
                cause: format!("the answer is not JSON ({err})"),
            }),
        }
    }
}

/// `connection refused`: an I/O error in words, without the `(os error 111)` tail.
fn io_cause(err: &io::Error) -> String {
    let text = err.to_string();
    let words = match text.rfind(" (os error ") {
        Some(end) if err.raw_os_error().is_some() => &text[..end],
        _ => text.as_str(),
    };
    let mut chars = words.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => "connection failed".to_string(),
    }
}

/// The terminal's size in character cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Screen {
    width: usize,
    height: usize,
}

impl Screen {
    /// The size of the terminal on stdout; else `$COLUMNS` × `$LINES`; else 100 × 40.
    fn measure() -> Screen {
        let mut size = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ only writes one `winsize` into `size`, which we own and which
        // outlives the call; on a descriptor that is not a terminal it fails with ENOTTY.
        let known = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
        let from_env = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|value| value.trim().parse::<usize>().ok())
                .filter(|&cells| cells > 0)
        };
        let pick = |cells: u16, name: &str, default: usize| {
            if known && cells > 0 {
                usize::from(cells)
            } else {
                from_env(name).unwrap_or(default)
            }
        };
        Screen {
            width: pick(size.ws_col, "COLUMNS", DEFAULT_WIDTH),
            height: pick(size.ws_row, "LINES", DEFAULT_HEIGHT),
        }
    }

    fn narrower_by(self, cells: usize) -> Screen {
        Screen {
            width: self.width.saturating_sub(cells).max(1),
            height: self.height,
        }
    }

    /// Cuts every line to the width and the frame to the height, the last kept line then
    /// saying how many were left out.
    fn fit(&self, mut lines: Vec<String>) -> Vec<String> {
        let height = self.height.max(1);
        if lines.len() > height {
            let hidden = lines.len() - (height - 1);
            lines.truncate(height - 1);
            lines.push(format!("{ELLIPSIS} {hidden} more lines"));
        }
        lines.iter().map(|line| cut_end(line, self.width)).collect()
    }
}

/// What to draw and for whom.
struct View {
    url: String,
    list: bool,
    raw: bool,
    filters: Filters,
}

fn pretty(stats: &Value) -> String {
    serde_json::to_string_pretty(stats).unwrap_or_else(|_| stats.to_string())
}

/// The whole frame: summary, and with `--list` the instance table, fitted to `screen`.
fn render(stats: &Value, view: &View, screen: Screen) -> Vec<String> {
    let mut lines = summary(stats, view, screen.width);
    if view.list {
        lines.push(String::new());
        let budget = screen.height.saturating_sub(lines.len());
        lines.extend(instance_table(stats, view, screen.width, budget));
    }
    screen.fit(lines)
}

/// The label column of the summary.
const LABEL_WIDTH: usize = 10;

fn labelled(label: &str, text: &str) -> String {
    format!("{label:<LABEL_WIDTH$} {text}")
}

/// Server, instance counts, every enforced resource as a bar, instances per image.
fn summary(stats: &Value, view: &View, width: usize) -> Vec<String> {
    let mut lines = Vec::new();

    let mut head = vec![view.url.clone()];
    if let Some(runner) = stats.get("runner").and_then(Value::as_str) {
        head.push(format!("{runner} runner"));
    }
    if let Some(uptime) = number(stats, "uptime_s") {
        head.push(format!("up {}", duration_text(uptime)));
    }
    if let Some(server_time) = number(stats, "server_time") {
        head.push(utc_text(server_time));
    }
    lines.push(labelled("arservice", &head.join(" · ")));

    let active = count(stats, "active_instances");
    let total = count(stats, "total_instances");
    let mut counts = match (view.filters.describe(), active, total) {
        (Some(filters), Some(active), Some(total)) => {
            vec![format!("{active} of {total} running match {filters}")]
        }
        (Some(filters), Some(active), None) => vec![format!("{active} match {filters}")],
        (None, Some(active), _) | (None, None, Some(active)) => vec![format!("{active} running")],
        _ => vec!["running: unknown".to_string()],
    };
    if let Some(starting) = count(stats, "starting_instances").filter(|&starting| starting > 0) {
        counts.push(format!("{starting} starting"));
    }
    let dead = stats
        .get("instances")
        .and_then(Value::as_array)
        .map_or(0, |rows| {
            rows.iter()
                .filter(|row| row.get("state").and_then(Value::as_str) == Some("dead"))
                .count()
        });
    if dead > 0 {
        counts.push(format!("{dead} dead"));
    }
    if let Some(started) = count(stats, "instances_started") {
        counts.push(format!("{started} started since launch"));
    }
    if let Some(adopted) = count(stats, "instances_adopted").filter(|&adopted| adopted > 0) {
        counts.push(format!("{adopted} adopted after a restart"));
    }
    lines.push(labelled("instances", &counts.join(" · ")));
    lines.extend(model_line(stats));
    lines.extend(runs_line(stats));

    lines.extend(resource_lines(stats, width));
    let image_rows = if view.list {
        IMAGE_ROWS_WITH_LIST
    } else {
        IMAGE_ROWS
    };
    lines.extend(image_lines(stats, width, image_rows));
    lines
}

/// The model gateway's totals, when it is on: calls, tokens, cost, and the limits.
fn model_line(stats: &Value) -> Option<String> {
    let model = stats.get("model").filter(|model| model.is_object())?;
    let whole = |key: &str| model.get(key).and_then(Value::as_u64).unwrap_or(0);
    let mut parts = vec![
        format!("{} calls", whole("calls")),
        format!(
            "{} in / {} out tokens",
            whole("input_tokens"),
            whole("output_tokens")
        ),
        format!(
            "${:.4}",
            model.get("cost_usd").and_then(Value::as_f64).unwrap_or(0.0)
        ),
    ];
    let limits = model.get("limits");
    if let Some(cost) = limits
        .and_then(|l| l.get("cost_usd"))
        .and_then(Value::as_f64)
    {
        parts.push(format!("cost limit ${cost}"));
    }
    if let Some(calls) = limits.and_then(|l| l.get("calls")).and_then(Value::as_u64) {
        parts.push(format!("call limit {calls}"));
    }
    if whole("failed_calls") > 0 {
        parts.push(format!("{} failed", whole("failed_calls")));
    }
    Some(labelled("model", &parts.join(" · ")))
}

/// The rollout ledger, from a server that keeps one, once it has something to say: runs closed,
/// and over open and closed runs the timeouts, infra failures (since launch) and CPU time.
fn runs_line(stats: &Value) -> Option<String> {
    let closed = stats
        .get("closed_runs")
        .filter(|closed| closed.is_object())?;
    let rows = stats.get("instances").and_then(Value::as_array);
    let open = |key: &str| -> f64 {
        rows.into_iter()
            .flatten()
            .filter_map(|row| number(row, key))
            .sum()
    };
    let timeouts = count(closed, "timeouts").unwrap_or(0) + open("commands_timed_out") as u64;
    let cpu = number(closed, "cpu_s").unwrap_or(0.0) + open("cpu_s");
    let infra = count(stats, "infra_failures").unwrap_or(0);
    let runs = count(closed, "runs").unwrap_or(0);
    if runs == 0 && timeouts == 0 && infra == 0 && cpu == 0.0 {
        return None;
    }
    let mut parts = vec![
        format!("{runs} closed"),
        format!("{timeouts} timeouts"),
        format!("{infra} infra failures"),
    ];
    if cpu > 0.0 {
        parts.push(format!("{} CPU", duration_text(cpu)));
    }
    Some(labelled("runs", &parts.join(" · ")))
}

/// One line per enforced resource (each key of `max_resources`): bar, allocated / max, percent;
/// the bar gets shorter on a narrow terminal.
fn resource_lines(stats: &Value, width: usize) -> Vec<String> {
    let Some(max) = stats.get("max_resources").and_then(Value::as_object) else {
        return Vec::new();
    };
    let allocated = stats.get("allocated_resources").and_then(Value::as_object);
    let available = stats.get("available_resources").and_then(Value::as_object);
    let mut keys: Vec<&String> = max.keys().collect();
    keys.sort_by_key(|key| (key.as_str() != INSTANCES, key.as_str()));
    let rows: Vec<(String, Option<f64>, f64)> = keys
        .into_iter()
        .map(|key| (key, &max[key]))
        .filter_map(|(key, limit)| {
            let limit = limit.as_f64()?;
            let used = allocated
                .and_then(|allocated| allocated.get(key))
                .and_then(Value::as_f64)
                .or_else(|| {
                    let left = available?.get(key)?.as_f64()?;
                    Some(limit - left)
                });
            Some((key.clone(), used, limit))
        })
        .collect();
    let key_width = rows
        .iter()
        .map(|(key, _, _)| key.chars().count())
        .max()
        .unwrap_or(0);
    let amount_width = rows
        .iter()
        .map(|(_, used, limit)| {
            let used = used.map_or(1, |used| amount_text(used).len());
            used.max(amount_text(*limit).len())
        })
        .max()
        .unwrap_or(0);
    // Label, key, bar, "used / max", percent, and the gaps between them.
    let fixed = LABEL_WIDTH + 1 + key_width + 2 + 2 + (2 * amount_width + 3) + 2 + PERCENT_WIDTH;
    let bar_cells = width.saturating_sub(fixed).clamp(MIN_BAR_WIDTH, BAR_WIDTH);
    rows.iter()
        .enumerate()
        .map(|(index, (key, used, limit))| {
            let label = if index == 0 { "resources" } else { "" };
            let (bar, used_text, percent) = match used {
                Some(used) => {
                    let share = if *limit > 0.0 { (used / limit).clamp(0.0, 1.0) } else { 1.0 };
                    let percent = if *limit > 0.0 {
                        format!("{:>3.0}%", used / limit * 100.0)
                    } else {
                        "   -".to_string()
                    };
                    (bar_text(share, bar_cells), amount_text(*used), percent)
                }
                None => (bar_text(0.0, bar_cells), "?".to_string(), "   ?".to_string()),
            };
            labelled(
                label,
                &format!(
                    "{key:<key_width$}  {bar}  {used_text:>amount_width$} / {:<amount_width$}  {percent}",
                    amount_text(*limit)
                ),
            )
        })
        .collect()
}

/// A bar of `cells` cells, `share` of them filled.
fn bar_text(share: f64, cells: usize) -> String {
    let filled = ((share * cells as f64).round() as usize).min(cells);
    format!("{}{}", "█".repeat(filled), "░".repeat(cells - filled))
}

/// The largest images by instance count, long names cut in the middle; the rest on one line.
fn image_lines(stats: &Value, width: usize, rows: usize) -> Vec<String> {
    let Some(counts) = stats.get("container_counts").and_then(Value::as_object) else {
        return Vec::new();
    };
    let mut images: Vec<(&str, u64)> = counts
        .iter()
        .map(|(image, count)| (image.as_str(), count.as_u64().unwrap_or(0)))
        .collect();
    images.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let count_width = images
        .first()
        .map_or(1, |(_, count)| count.to_string().len());
    let name_width = width
        .saturating_sub(LABEL_WIDTH + 1 + count_width + 2)
        .max(MIN_NAME_WIDTH);
    let mut lines: Vec<String> = images
        .iter()
        .take(rows)
        .enumerate()
        .map(|(index, (image, count))| {
            let label = if index == 0 { "images" } else { "" };
            let image = cut_middle(image, name_width);
            labelled(label, &format!("{count:>count_width$}  {image}"))
        })
        .collect();
    if images.len() > rows {
        let rest = &images[rows..];
        let instances: u64 = rest.iter().map(|(_, count)| count).sum();
        lines.push(labelled(
            "",
            &format!("{instances:>count_width$}  in {} more images", rest.len()),
        ));
    }
    lines
}

/// One instance as the table shows it.
#[derive(Debug)]
struct Row {
    run_id: String,
    image: String,
    kind: String,
    age_s: Option<f64>,
    /// Since the last command; `None` when none ran yet (or the server does not say).
    idle_s: Option<f64>,
    /// The sort key: since the last command, or since the start when none ran yet.
    quiet_s: f64,
    num_cmd: Option<u64>,
    state: String,
}

impl Row {
    fn of(item: &Value, now: f64) -> Row {
        let config = item.get("environment_config");
        let run_id = text(item.get("run_id")).unwrap_or_else(|| "?".to_string());
        let image = text(item.get("container_image"))
            .or_else(|| text(item.get("container_name")))
            .or_else(|| text(config.and_then(|config| config.get("image"))))
            .unwrap_or_else(|| "?".to_string());
        let kind = text(item.get("container_type"))
            .or_else(|| text(config.and_then(|config| config.get("container_type"))))
            .unwrap_or_else(|| "-".to_string());
        let created_at = number(item, "created_at");
        let updated_at = number(item, "updated_at");
        let num_cmd = item.get("num_cmd").and_then(Value::as_u64);
        let running = item
            .get("running_cmds")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let knows_activity = item.get("updated_at").is_some() || num_cmd.is_some();
        let state = match item.get("state").and_then(Value::as_str) {
            Some(state) if state != "running" => state.to_string(),
            _ if running > 1 => format!("busy {running}"),
            _ if running == 1 => "busy".to_string(),
            _ if !knows_activity => "-".to_string(),
            _ if updated_at.is_none() && num_cmd.unwrap_or(0) == 0 => "unused".to_string(),
            _ => "idle".to_string(),
        };
        let since = |time: f64| (now - time).max(0.0);
        Row {
            run_id,
            image,
            kind,
            age_s: created_at.map(since),
            idle_s: updated_at.map(since),
            quiet_s: updated_at.or(created_at).map_or(f64::NEG_INFINITY, since),
            num_cmd,
            state,
        }
    }

    fn cells(&self) -> [String; COLUMNS.len()] {
        [
            self.run_id.clone(),
            self.image.clone(),
            self.kind.clone(),
            self.age_s.map_or_else(|| "-".to_string(), duration_text),
            match (self.idle_s, self.num_cmd) {
                (Some(idle), _) => duration_text(idle),
                (None, Some(_)) => "never".to_string(),
                (None, None) => "-".to_string(),
            },
            self.num_cmd
                .map_or_else(|| "-".to_string(), |count| count.to_string()),
            self.state.clone(),
        ]
    }
}

/// Longest quiet first (a stuck or forgotten instance is at the top), then oldest first.
fn sort_rows(rows: &mut [Row]) {
    rows.sort_by(|a, b| {
        b.quiet_s
            .total_cmp(&a.quiet_s)
            .then_with(|| b.age_s.unwrap_or(0.0).total_cmp(&a.age_s.unwrap_or(0.0)))
            .then_with(|| a.run_id.cmp(&b.run_id))
    });
}

/// A column of the instance table.
struct Column {
    title: &'static str,
    /// Right-aligned (numbers and durations).
    right: bool,
}

impl Column {
    const fn left(title: &'static str) -> Column {
        Column {
            title,
            right: false,
        }
    }

    const fn right(title: &'static str) -> Column {
        Column { title, right: true }
    }
}

const COLUMNS: [Column; 7] = [
    Column::left("RUN ID"),
    Column::left("IMAGE"),
    Column::left("TYPE"),
    Column::right("AGE"),
    Column::right("IDLE"),
    Column::right("CMDS"),
    Column::left("STATE"),
];

/// Indices into [`COLUMNS`].
const RUN_ID: usize = 0;
const IMAGE: usize = 1;
const TYPE: usize = 2;
const AGE: usize = 3;
const IDLE: usize = 4;
const CMDS: usize = 5;
const STATE: usize = 6;

/// Columns cut in the middle (down to [`MIN_NAME_WIDTH`]) when the table is too wide, first first.
const SHRINK_ORDER: [usize; 2] = [IMAGE, RUN_ID];

/// Columns dropped, first first, when cutting names is not enough; the run id always stays.
const DROP_ORDER: [usize; 6] = [TYPE, CMDS, IMAGE, AGE, STATE, IDLE];

/// The table of instances in at most `budget` lines: header, rows, and how many did not fit.
fn instance_table(stats: &Value, view: &View, width: usize, budget: usize) -> Vec<String> {
    let items = stats
        .get("instances")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    if items.is_empty() {
        let text = if view.filters.describe().is_some() {
            "no instance matches the filters"
        } else {
            "no instances"
        };
        return vec![text.to_string()];
    }
    let now = number(stats, "server_time").unwrap_or_else(epoch_now);
    let mut rows: Vec<Row> = items.iter().map(|item| Row::of(item, now)).collect();
    sort_rows(&mut rows);

    // The header, then rows; when not all fit, the last line says how many more there are.
    let shown = if rows.len() < budget {
        rows.len()
    } else {
        budget.saturating_sub(2)
    };
    let cells: Vec<[String; COLUMNS.len()]> = rows.iter().take(shown).map(Row::cells).collect();
    let widths = column_widths(&cells, width);

    let line = |row: [&str; COLUMNS.len()]| {
        let cells: Vec<String> = COLUMNS
            .iter()
            .zip(widths)
            .zip(row)
            .filter_map(|((column, width), cell)| {
                let width = width?;
                let cell = cut_middle(cell, width);
                Some(if column.right {
                    format!("{cell:>width$}")
                } else {
                    format!("{cell:<width$}")
                })
            })
            .collect();
        cells.join(&" ".repeat(COLUMN_GAP)).trim_end().to_string()
    };
    let mut lines = vec![line(COLUMNS.map(|column| column.title))];
    lines.extend(
        cells
            .iter()
            .map(|row| line(row.each_ref().map(String::as_str))),
    );
    let hidden = rows.len() - shown;
    if hidden > 0 {
        lines.push(format!(
            "{ELLIPSIS} {hidden} more instances (narrow with --run-id / --container)"
        ));
    }
    lines
}

/// Each column's width, or `None` for a column dropped to fit `width`: natural widths when
/// they fit; else names cut in the middle; else columns dropped in [`DROP_ORDER`].
fn column_widths(rows: &[[String; COLUMNS.len()]], width: usize) -> [Option<usize>; COLUMNS.len()] {
    let natural: [usize; COLUMNS.len()] = std::array::from_fn(|index| {
        let longest = rows
            .iter()
            .map(|row| row[index].chars().count())
            .max()
            .unwrap_or(0);
        longest.max(COLUMNS[index].title.len())
    });
    let total = |widths: &[Option<usize>]| {
        let shown: Vec<usize> = widths.iter().flatten().copied().collect();
        shown.iter().sum::<usize>() + COLUMN_GAP * shown.len().saturating_sub(1)
    };
    let mut shown = [true; COLUMNS.len()];
    let mut drops = DROP_ORDER.iter();
    loop {
        let mut widths: [Option<usize>; COLUMNS.len()] =
            std::array::from_fn(|index| shown[index].then_some(natural[index]));
        for index in SHRINK_ORDER {
            let excess = total(&widths).saturating_sub(width);
            if let Some(current) = widths[index] {
                let floor = MIN_NAME_WIDTH.min(current);
                widths[index] = Some(current - excess.min(current - floor));
            }
        }
        if total(&widths) <= width {
            return widths;
        }
        match drops.next() {
            Some(&index) => shown[index] = false,
            None => return widths,
        }
    }
}

/// A string or a number as text; anything else is absent.
fn text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

fn number(object: &Value, key: &str) -> Option<f64> {
    object
        .get(key)
        .and_then(Value::as_f64)
        .filter(|value| value.is_finite())
}

fn count(object: &Value, key: &str) -> Option<u64> {
    object.get(key).and_then(Value::as_u64)
}

fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |elapsed| elapsed.as_secs_f64())
}

/// `42s`, `12m05s`, `3h07m`, `2d04h`: at most six characters up to 99 days.
fn duration_text(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "-".to_string();
    }
    let whole = seconds.floor() as u64;
    let (days, hours) = (
        whole / SECONDS_PER_DAY,
        whole % SECONDS_PER_DAY / SECONDS_PER_HOUR,
    );
    let (minutes, secs) = (
        whole % SECONDS_PER_HOUR / SECONDS_PER_MINUTE,
        whole % SECONDS_PER_MINUTE,
    );
    if days > 0 {
        format!("{days}d{hours:02}h")
    } else if hours > 0 {
        format!("{hours}h{minutes:02}m")
    } else if minutes > 0 {
        format!("{minutes}m{secs:02}s")
    } else {
        format!("{secs}s")
    }
}

/// `1717243200` → `2024-06-01 12:00:00 UTC`.
fn utc_text(epoch_s: f64) -> String {
    let whole = epoch_s.floor() as i64;
    let days = whole.div_euclid(SECONDS_PER_DAY as i64);
    let of_day = whole.rem_euclid(SECONDS_PER_DAY as i64) as u64;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        of_day / SECONDS_PER_HOUR,
        of_day % SECONDS_PER_HOUR / SECONDS_PER_MINUTE,
        of_day % SECONDS_PER_MINUTE
    )
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    const DAYS_PER_ERA: i64 = 146_097;
    const UNIX_EPOCH_SHIFT: i64 = 719_468;
    let z = days + UNIX_EPOCH_SHIFT;
    let era = z.div_euclid(DAYS_PER_ERA);
    let day_of_era = z.rem_euclid(DAYS_PER_ERA);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `4`, `0.5`, `2.25`: whole numbers without a point, fractions with at most three digits.
fn amount_text(amount: f64) -> String {
    const FRACTION_DIGITS: usize = 3;
    let text = format!("{amount:.FRACTION_DIGITS$}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".to_string()
    } else {
        text.to_string()
    }
}

/// Cuts `text` to `width` characters, keeping its start.
fn cut_end(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    text.chars().take(width).collect()
}

/// Cuts `text` to `width` characters by replacing its middle with an ellipsis: both the
/// prefix (`eval-run-`) and the suffix (`:latest`, `-0042`) of names stay readable.
fn cut_middle(text: &str, width: usize) -> String {
    let length = text.chars().count();
    if length <= width {
        return text.to_string();
    }
    if width == 0 {
        return String::new();
    }
    let tail = (width - 1) / 2;
    let head = width - 1 - tail;
    let mut out: String = text.chars().take(head).collect();
    out.push(ELLIPSIS);
    out.extend(text.chars().skip(length - tail));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn view(list: bool) -> View {
        View {
            url: "http://127.0.0.1:8008".into(),
            list,
            raw: false,
            filters: Filters {
                run_id: None,
                container: None,
            },
        }
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(duration_text(0.0), "0s");
        assert_eq!(duration_text(0.25), "0s");
        assert_eq!(duration_text(42.9), "42s");
        assert_eq!(duration_text(725.0), "12m05s");
        assert_eq!(duration_text(3.0 * 3600.0 + 7.0 * 60.0), "3h07m");
        assert_eq!(duration_text(2.0 * 86400.0 + 4.0 * 3600.0 + 5.0), "2d04h");
        assert_eq!(duration_text(-1.0), "-");
        assert_eq!(duration_text(f64::NAN), "-");
    }

    #[test]
    fn utc_dates_are_right() {
        assert_eq!(utc_text(0.0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_text(1_717_243_200.5), "2024-06-01 12:00:00 UTC");
        assert_eq!(utc_text(951_782_400.0), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_text(-1.0), "1969-12-31 23:59:59 UTC");
    }

    #[test]
    fn amounts_drop_needless_digits() {
        assert_eq!(amount_text(4.0), "4");
        assert_eq!(amount_text(0.5), "0.5");
        assert_eq!(amount_text(0.1 + 0.2), "0.3");
        assert_eq!(amount_text(2.25), "2.25");
        assert_eq!(amount_text(-0.0), "0");
    }

    #[test]
    fn filters_are_percent_encoded() {
        let filters = Filters {
            run_id: Some("a b&c/d".into()),
            container: Some("img:1+é".into()),
        };
        assert_eq!(
            filters.query(),
            "?run_id=a%20b%26c%2Fd&container_name=img%3A1%2B%C3%A9"
        );
        let none = Filters {
            run_id: Some(String::new()),
            container: None,
        };
        assert_eq!(none.query(), "");
    }

    #[test]
    fn names_are_cut_in_the_middle() {
        assert_eq!(cut_middle("eval-run-000123", 9), "eval…0123");
        assert_eq!(cut_middle("short", 9), "short");
        assert_eq!(cut_middle("abc", 1), "…");
        assert_eq!(cut_middle("abc", 0), "");
        assert_eq!(cut_end("héllo", 2), "hé");
    }

    #[test]
    fn io_errors_read_as_words() {
        let refused = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(io_cause(&refused), "connection refused");
        let custom = io::Error::other("Peer went away (os error 3)");
        assert_eq!(io_cause(&custom), "peer went away (os error 3)");
    }

    #[test]
    fn dead_and_adopted_instances_are_counted() {
        let stats = json!({"active_instances": 3, "total_instances": 3, "instances_started": 1,
            "instances_adopted": 2, "instances": [{"state": "dead"}, {"state": "running"}, {}]});
        let lines = summary(&stats, &view(false), DEFAULT_WIDTH);
        assert_eq!(
            lines[1],
            "instances  3 running · 1 dead · 1 started since launch · 2 adopted after a restart"
        );
    }

    #[test]
    fn the_model_line_shows_the_gateway_totals_and_limits() {
        assert_eq!(model_line(&json!({"instances": []})), None);
        let stats = json!({"model": {"calls": 12, "input_tokens": 3400, "output_tokens": 1200,
            "cost_usd": 0.4213, "failed_calls": 1, "limits": {"cost_usd": 10.0, "calls": null}}});
        assert_eq!(
            model_line(&stats).unwrap(),
            "model      12 calls · 3400 in / 1200 out tokens · $0.4213 · cost limit $10 · 1 failed"
        );
    }

    #[test]
    fn the_runs_line_sums_open_and_closed_runs() {
        assert_eq!(
            runs_line(&json!({"instances": []})),
            None,
            "an older server"
        );
        let quiet = json!({"infra_failures": 0, "closed_runs": {"runs": 0}, "instances": []});
        assert_eq!(runs_line(&quiet), None, "nothing to say yet");
        let stats = json!({"infra_failures": 2,
            "closed_runs": {"runs": 3, "timeouts": 1, "cpu_s": 60.0},
            "instances": [{"commands_timed_out": 2, "cpu_s": 5.0}, {"cpu_s": null}]});
        assert_eq!(
            runs_line(&stats).unwrap(),
            "runs       3 closed · 3 timeouts · 2 infra failures · 1m05s CPU"
        );
    }

    #[test]
    fn instances_lead_the_resources() {
        let stats = json!({"max_resources": {"cpus": 8, "instances": 4, "gpus": 0.5},
                           "allocated_resources": {"cpus": 2, "instances": 1},
                           "available_resources": {"gpus": 0.25}});
        let lines = resource_lines(&stats, DEFAULT_WIDTH);
        assert!(lines
            .iter()
            .all(|line| line.contains(&"░".repeat(BAR_WIDTH / 2))));
        let narrow = resource_lines(&stats, 50);
        assert!(
            narrow.iter().all(|line| line.chars().count() <= 50),
            "{narrow:#?}"
        );
        assert!(lines[0].starts_with("resources  instances"), "{lines:#?}");
        assert!(
            lines[1].contains("cpus") && lines[1].contains("2 / 8") && lines[1].contains("25%")
        );
        assert!(
            lines[2].contains("gpus") && lines[2].contains("0.25 / 0.5"),
            "{lines:#?}"
        );
    }

    #[test]
    fn many_images_end_in_a_count() {
        let counts: serde_json::Map<String, Value> = (0..12)
            .map(|n| {
                (
                    format!("image-{n:02}"),
                    Value::from(if n == 7 { 5 } else { 1 }),
                )
            })
            .collect();
        let stats = json!({"container_counts": counts});
        let lines = image_lines(&stats, DEFAULT_WIDTH, IMAGE_ROWS_WITH_LIST);
        assert_eq!(lines.len(), IMAGE_ROWS_WITH_LIST + 1, "{lines:#?}");
        assert!(
            lines[0].starts_with("images") && lines[0].ends_with("5  image-07"),
            "{lines:#?}"
        );
        assert!(lines[3].ends_with("9  in 9 more images"), "{lines:#?}");
    }

    #[test]
    fn bars_fill_by_share() {
        assert_eq!(bar_text(0.0, BAR_WIDTH), "░".repeat(BAR_WIDTH));
        assert_eq!(bar_text(1.0, BAR_WIDTH), "█".repeat(BAR_WIDTH));
        assert_eq!(
            bar_text(0.5, BAR_WIDTH)
                .chars()
                .filter(|&cell| cell == '█')
                .count(),
            BAR_WIDTH / 2
        );
    }

    #[test]
    fn the_longest_quiet_comes_first() {
        let now = 1000.0;
        let mut rows: Vec<Row> = [
            json!({"run_id": "busy", "created_at": 100.0, "updated_at": 990.0, "num_cmd": 5}),
            json!({"run_id": "unused", "created_at": 500.0, "updated_at": null, "num_cmd": 0}),
            json!({"run_id": "idle", "created_at": 200.0, "updated_at": 300.0, "num_cmd": 1}),
        ]
        .iter()
        .map(|item| Row::of(item, now))
        .collect();
        sort_rows(&mut rows);
        let order: Vec<&str> = rows.iter().map(|row| row.run_id.as_str()).collect();
        assert_eq!(order, ["idle", "unused", "busy"]);
        assert_eq!(rows[1].state, "unused");
        assert_eq!(rows[0].state, "idle");
    }

    #[test]
    fn missing_keys_render_as_absent() {
        for stats in [
            json!({}),
            json!({"instances": [{}], "max_resources": {"instances": "ten"}}),
            json!({"instances": null, "container_counts": [], "uptime_s": "x"}),
            json!({"instances": [{"run_id": 7, "created_at": "yesterday", "environment_config": 3}]}),
        ] {
            let lines = render(
                &stats,
                &view(true),
                Screen {
                    width: 80,
                    height: 20,
                },
            );
            assert!(lines.len() >= 2, "{stats}: {lines:?}");
            assert!(lines.iter().all(|line| line.chars().count() <= 80));
        }
    }

    #[test]
    fn frames_fit_the_screen() {
        let instances: Vec<Value> = (0..50)
            .map(|n| {
                json!({"run_id": format!("run-{n:03}"), "container_image": "x".repeat(80),
                            "created_at": 0.0, "updated_at": null, "num_cmd": 0})
            })
            .collect();
        let stats = json!({"server_time": 100.0, "active_instances": 50, "instances": instances});
        for (width, height) in [(100, 40), (40, 12), (20, 5), (1, 1)] {
            let lines = render(&stats, &view(true), Screen { width, height });
            assert!(lines.len() <= height, "{width}x{height}: {lines:#?}");
            assert!(
                lines.iter().all(|line| line.chars().count() <= width),
                "{lines:#?}"
            );
        }
        let lines = render(
            &stats,
            &view(true),
            Screen {
                width: 100,
                height: 40,
            },
        );
        let last = lines.last().unwrap();
        assert!(last.contains("more instances"), "{lines:#?}");
    }

    #[test]
    fn narrow_terminals_drop_the_least_useful_columns() {
        let rows = vec![[
            "eval-run-0001".to_string(),
            "xingyaoww/sweb.eval.x86_64.python_s_mypy-5617:latest".to_string(),
            "docker".to_string(),
            "3h07m".to_string(),
            "12m05s".to_string(),
            "42".to_string(),
            "idle".to_string(),
        ]];
        let wide = column_widths(&rows, 200);
        assert!(wide.iter().all(Option::is_some));
        let narrow = column_widths(&rows, 50);
        assert_eq!(narrow[TYPE], None, "TYPE goes first: {narrow:?}");
        assert!(narrow[RUN_ID].is_some() && narrow[IDLE].is_some() && narrow[STATE].is_some());
        assert_eq!(
            narrow[RUN_ID],
            Some("eval-run-0001".len()),
            "the run id stays whole"
        );
        let tiny = column_widths(&rows, 10);
        assert_eq!(tiny.iter().flatten().count(), 1, "{tiny:?}");
    }
}
