//! Progress lines on standard error, so that standard output stays the
//! command's result.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a spinner redraws.
const TICK: Duration = Duration::from_millis(120);

/// Prints `hearth: MESSAGE` for a wait or a step that takes a while.
pub(crate) fn progress(message: &str) {
    eprintln!("hearth: {message}");
}

/// A spinner on standard error for a step whose length is unknown (an
/// upload, a wait for a state). It draws only when both standard output and
/// standard error are terminals: a script reading the output, or a log file,
/// sees nothing of it.
pub(crate) struct Spinner {
    bar: ProgressBar,
}

impl Spinner {
    pub(crate) fn start(message: impl Into<String>) -> Self {
        let bar = if shows_progress() {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(TICK);
            bar
        } else {
            ProgressBar::hidden()
        };
        bar.set_message(message.into());
        Self { bar }
    }

    pub(crate) fn set_message(&self, message: impl Into<String>) {
        self.bar.set_message(message.into());
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// Progress bars and spinners only for a person at a terminal.
fn shows_progress() -> bool {
    std::io::stderr().is_terminal() && std::io::stdout().is_terminal()
}
