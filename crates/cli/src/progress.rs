//! A progress bar with throughput for long imports and exports, drawn by indicatif onto any
//! writer (the local stderr, or a client's stderr received by the daemon).
//!
//! indicatif wants an owned, thread-safe terminal; commands only borrow their stderr. So the
//! bar draws into a shared buffer, and every [`Progress::update`] moves what it drew to the
//! borrowed writer. Drawing is synchronous (no ticker thread), rate-limited by indicatif.

use std::cell::Cell;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

/// A terminal that appends what indicatif draws to a buffer.
#[derive(Debug)]
struct BufferTerm {
    buf: Arc<Mutex<Vec<u8>>>,
    width: u16,
}

fn lock(buf: &Mutex<Vec<u8>>) -> MutexGuard<'_, Vec<u8>> {
    buf.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl BufferTerm {
    fn put(&self, s: &str) -> io::Result<()> {
        lock(&self.buf).extend_from_slice(s.as_bytes());
        Ok(())
    }
}

impl TermLike for BufferTerm {
    fn width(&self) -> u16 {
        self.width
    }
    fn move_cursor_up(&self, n: usize) -> io::Result<()> {
        if n > 0 { self.put(&format!("\x1b[{n}A")) } else { Ok(()) }
    }
    fn move_cursor_down(&self, n: usize) -> io::Result<()> {
        if n > 0 { self.put(&format!("\x1b[{n}B")) } else { Ok(()) }
    }
    fn move_cursor_right(&self, n: usize) -> io::Result<()> {
        if n > 0 { self.put(&format!("\x1b[{n}C")) } else { Ok(()) }
    }
    fn move_cursor_left(&self, n: usize) -> io::Result<()> {
        if n > 0 { self.put(&format!("\x1b[{n}D")) } else { Ok(()) }
    }
    fn write_line(&self, s: &str) -> io::Result<()> {
        self.put(s)?;
        self.put("\n")
    }
    fn write_str(&self, s: &str) -> io::Result<()> {
        self.put(s)
    }
    fn clear_line(&self) -> io::Result<()> {
        self.put("\r\x1b[2K")
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A progress bar, or nothing when stderr is not a terminal.
pub struct Progress {
    bar: Option<ProgressBar>,
    buf: Arc<Mutex<Vec<u8>>>,
    last_draw: Cell<Option<Instant>>,
}

/// Time between redraws.
const REDRAW: Duration = Duration::from_millis(100);

impl Progress {
    /// A bar labelled `label` for `total` bytes, drawn `width` columns wide; inert unless
    /// `enabled` (stderr is a terminal).
    pub fn new(enabled: bool, width: u16, label: &str, total: u64) -> Progress {
        let buf = Arc::new(Mutex::new(Vec::new()));
        if !enabled {
            return Progress { bar: None, buf, last_draw: Cell::new(None) };
        }
        let term = BufferTerm { buf: buf.clone(), width: width.max(40) };
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
        let style = ProgressStyle::with_template(
            "{msg} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(label.to_string());
        // Attach the terminal only now, so nothing is drawn before the first real update.
        bar.set_draw_target(ProgressDrawTarget::term_like(Box::new(term)));
        Progress { bar: Some(bar), buf, last_draw: Cell::new(None) }
    }

    /// A bar labelled `label` counting `total` items called `unit` (trees, say) rather than
    /// bytes; inert unless `enabled`.
    pub fn counting(enabled: bool, width: u16, label: &str, total: u64, unit: &str) -> Progress {
        let p = Progress::new(enabled, width, label, total);
        if let Some(bar) = &p.bar {
            let template = format!("{{msg}} [{{wide_bar}}] {{pos}}/{{len}} {unit} ETA {{eta}}");
            if let Ok(style) = ProgressStyle::with_template(&template) {
                bar.set_style(style.progress_chars("=> "));
            }
        }
        p
    }

    /// Records `done` of `total` bytes and redraws onto `out` if it is time.
    pub fn update(&self, done: u64, total: u64, out: &mut dyn Write) {
        let Some(bar) = &self.bar else { return };
        let now = Instant::now();
        if self.last_draw.get().is_some_and(|t| now.duration_since(t) < REDRAW) && done < total {
            return;
        }
        self.last_draw.set(Some(now));
        if bar.length() != Some(total) {
            bar.set_length(total);
        }
        bar.set_position(done);
        self.drain(out);
    }

    /// Removes the bar from the screen.
    pub fn finish(&self, out: &mut dyn Write) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
            self.drain(out);
        }
    }

    fn drain(&self, out: &mut dyn Write) {
        let bytes = std::mem::take(&mut *lock(&self.buf));
        if !bytes.is_empty() {
            // Progress is best effort: a closed stderr must not fail the command.
            let _ = out.write_all(&bytes);
            let _ = out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_items() {
        let mut out = Vec::new();
        let p = Progress::counting(true, 80, "checking", 10, "trees");
        p.update(10, 10, &mut out);
        let s = String::from_utf8_lossy(&out);
        assert!(s.contains("10/10 trees"), "{s:?}");
    }

    #[test]
    fn draws_only_when_enabled() {
        let mut out = Vec::new();
        let p = Progress::new(true, 80, "import", 1000);
        p.update(500, 1000, &mut out);
        p.finish(&mut out);
        let s = String::from_utf8_lossy(&out);
        assert!(s.contains("import"), "{s:?}");

        let mut quiet = Vec::new();
        let p = Progress::new(false, 80, "import", 1000);
        p.update(500, 1000, &mut quiet);
        p.finish(&mut quiet);
        assert!(quiet.is_empty());
    }
}
