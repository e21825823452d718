//! Progress bars for long work (indicatif draws them only on a terminal).

use indicatif::{ProgressBar, ProgressStyle};

/// Files smaller than this finish too fast for a bar to help.
const MIN_BYTES: u64 = 64 << 20;

/// A byte-count progress bar for work on `total` bytes, hidden for small totals.
pub fn bytes_bar(message: &str, total: u64) -> ProgressBar {
    if total < MIN_BYTES {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(message.to_owned());
    bar
}

/// A spinner for work on `total` bytes whose progress is not reported step by step,
/// hidden for small totals (and, as every bar, off a terminal).
pub fn spinner(message: &str, total: u64) -> ProgressBar {
    if total < MIN_BYTES {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_message(message.to_owned());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// A callback for byte-tier's `(done, total)` progress reports that drives `bar`.
pub fn reporter(bar: &ProgressBar) -> impl FnMut(u64, u64) + '_ {
    move |done, total| {
        if bar.length() != Some(total) {
            bar.set_length(total);
        }
        bar.set_position(done);
    }
}
