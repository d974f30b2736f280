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
//!
//! Here: the arguments, the errors, and the once and live loops. `client` reads `/stats`,
//! `terminal` owns the screen, `render` and `table` turn `/stats` into lines, `text` reads
//! values leniently and formats them.

use argh::FromArgs;
use serde_json::Value;
use std::fmt;
use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod client;
mod render;
mod table;
mod terminal;
#[cfg(test)]
mod tests;
mod text;

use client::*;
use render::*;
use table::*;
use terminal::*;
use text::*;

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
