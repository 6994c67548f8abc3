//! Progress lines of a long operation on stderr: a bar (indicatif) for a copy in progress when
//! stderr is a terminal, plain lines otherwise (logs and pipes get one line per report).

use crate::api::ProgressLine;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

pub struct Shown {
    tty: bool,
    bar: Option<ProgressBar>,
}

impl Shown {
    pub fn new() -> Shown {
        Shown {
            tty: std::io::stderr().is_terminal(),
            bar: None,
        }
    }

    pub fn show(&mut self, p: &ProgressLine) {
        match (self.tty, p.done_kb, p.total_kb) {
            (true, Some(done), Some(total)) => {
                let bar = self.bar.get_or_insert_with(|| {
                    let b = ProgressBar::new(total);
                    if let Ok(style) = ProgressStyle::with_template(
                        "{prefix} [{bar:40}] {pos}/{len} kB ({percent}%) {eta}",
                    ) {
                        b.set_style(style.progress_chars("=> "));
                    }
                    b.set_prefix("pg_basebackup");
                    b
                });
                bar.set_length(total.max(done));
                bar.set_position(done);
            }
            _ => {
                self.done();
                eprintln!("{}", p.progress);
            }
        }
    }

    /// Ends a bar in progress (it stays on screen as it was last drawn).
    pub fn done(&mut self) {
        if let Some(b) = self.bar.take() {
            b.abandon();
        }
    }
}
