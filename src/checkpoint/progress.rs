//! Transfer progress: an `indicatif` bar on stderr when it is a terminal, nothing otherwise.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A byte progress bar, or nothing.
pub struct Progress(Option<ProgressBar>);

impl Progress {
    /// A bar for `total` bytes labelled `what`, when `enabled` and stderr is a terminal.
    pub fn new(enabled: bool, total: u64, what: &str) -> Progress {
        if !enabled || total == 0 {
            return Progress(None);
        }
        let target = ProgressDrawTarget::stderr();
        if target.is_hidden() {
            return Progress(None);
        }
        let style = ProgressStyle::with_template(
            "{msg:12} [{bar:32}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        let bar = ProgressBar::with_draw_target(Some(total), target).with_style(style);
        bar.set_message(what.to_owned());
        Progress(Some(bar))
    }

    /// `n` more bytes done.
    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}
