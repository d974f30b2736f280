//! The terminal: its size ([`Screen`]), drawing a frame over the last one, the hidden cursor
//! shown again on every way out, and the signals that end a live view.

use super::*;

/// Writes one frame over the last one: home, each line then clear-to-end-of-line, then clear
/// below. The frame goes out under one stdout lock, so a signal never cuts it in half.
pub(crate) fn draw(lines: &[String]) -> io::Result<()> {
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
pub(crate) struct HiddenCursor;

impl HiddenCursor {
    pub(crate) fn hide() -> io::Result<HiddenCursor> {
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
pub(crate) fn restore_terminal() {
    let mut stdout = io::stdout().lock();
    let _ = writeln!(stdout, "{SHOW_CURSOR}");
    let _ = stdout.flush();
}

/// SIGINT, SIGTERM, SIGHUP: restore the terminal and exit 0 at once (even while a fetch
/// hangs). SIGWINCH: wake the live loop to redraw at the new size.
pub(crate) fn watch_signals(wake: mpsc::Sender<()>) -> io::Result<()> {
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

/// The terminal's size in character cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Screen {
    pub(crate) width: usize,
    pub(crate) height: usize,
}

impl Screen {
    /// The size of the terminal on stdout; else `$COLUMNS` × `$LINES`; else 100 × 40.
    pub(crate) fn measure() -> Screen {
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

    pub(crate) fn narrower_by(self, cells: usize) -> Screen {
        Screen {
            width: self.width.saturating_sub(cells).max(1),
            height: self.height,
        }
    }

    /// Cuts every line to the width and the frame to the height, the last kept line then
    /// saying how many were left out.
    pub(crate) fn fit(&self, mut lines: Vec<String>) -> Vec<String> {
        let height = self.height.max(1);
        if lines.len() > height {
            let hidden = lines.len() - (height - 1);
            lines.truncate(height - 1);
            lines.push(format!("{ELLIPSIS} {hidden} more lines"));
        }
        lines.iter().map(|line| cut_end(line, self.width)).collect()
    }
}
