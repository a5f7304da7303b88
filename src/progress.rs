//! Progress on the console, one way for every command: a bar with an ETA on terminals; log lines
//! with the same counts and ETA otherwise (CI, pipes, files), one every few seconds.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Seconds between log lines when stderr is not a terminal.
const LINE_EVERY_S: f64 = 5.0;

/// A count of `unit` going from `first` to `total`, shown as a bar or as log lines.
pub struct ConsoleProgress {
    bar: Option<indicatif::ProgressBar>,
    /// What the log lines start with ("sampling", "step").
    label: &'static str,
    unit: &'static str,
    first: u64,
    total: u64,
    started: Instant,
    last_line: Option<Instant>,
    message: String,
}

impl ConsoleProgress {
    /// A bar on terminals, log lines `label done/total unit, ETA …` otherwise.
    pub fn new(label: &'static str, unit: &'static str) -> ConsoleProgress {
        Self::with_bar(label, unit, std::io::stderr().is_terminal())
    }

    /// As [`ConsoleProgress::new`], choosing bar or lines explicitly (tests).
    pub fn with_bar(label: &'static str, unit: &'static str, bar: bool) -> ConsoleProgress {
        let bar = bar.then(|| {
            let bar = indicatif::ProgressBar::hidden();
            bar.set_style(
                indicatif::ProgressStyle::with_template(&format!(
                    "{{bar:30.cyan/blue}} {{pos}}/{{len}}{}{} [{{elapsed_precise}}<{{eta_precise}}] {{msg}}",
                    if unit.is_empty() { "" } else { " " },
                    unit
                ))
                .expect("template")
                .progress_chars("=> "),
            );
            bar
        });
        ConsoleProgress {
            bar,
            label,
            unit,
            first: 0,
            total: 0,
            started: Instant::now(),
            last_line: None,
            message: String::new(),
        }
    }

    /// Starts counting at `first` (a resumed run) towards `total`.
    pub fn start(&mut self, first: u64, total: u64) {
        self.first = first;
        self.total = total;
        self.started = Instant::now();
        self.last_line = None;
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(first);
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.reset_eta();
        }
    }

    /// Text shown after the counts (the loss and learning rate of a training run).
    pub fn set_message(&mut self, message: String) {
        if let Some(bar) = &self.bar {
            bar.set_message(message.clone());
        }
        self.message = message;
    }

    /// `done` of the total are done. Without a bar, a line is printed after the first unit, then
    /// every few seconds and at the end — when `line_due` (log lines may wait for news, e.g. a
    /// read-back loss).
    pub fn set(&mut self, done: u64, line_due: bool) {
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None => {
                let first_news = self.last_line.is_none() && done > self.first;
                let late = self
                    .last_line
                    .is_some_and(|t| t.elapsed().as_secs_f64() >= LINE_EVERY_S);
                if line_due && (first_news || late || done == self.total) {
                    self.last_line = Some(Instant::now());
                    eprintln!("{}", self.line(done, self.started.elapsed()));
                }
            }
        }
    }

    /// The log line for `done` after `elapsed`: counts, the message, and the ETA from the rate
    /// so far (the total time at the end).
    pub fn line(&self, done: u64, elapsed: Duration) -> String {
        let mut s = format!("{} {done}/{}", self.label, self.total);
        if !self.unit.is_empty() {
            s += &format!(" {}", self.unit);
        }
        if !self.message.is_empty() {
            s += &format!(" {}", self.message);
        }
        let counted = done.saturating_sub(self.first);
        if done >= self.total {
            s += &format!(", done in {}", human_duration(elapsed));
        } else if counted > 0 {
            let left = elapsed.as_secs_f64() / counted as f64 * (self.total - done) as f64;
            s += &format!(", ETA {}", human_duration(Duration::from_secs_f64(left)));
        }
        s
    }

    /// Prints a line without breaking the bar.
    pub fn println(&self, text: &str) {
        match &self.bar {
            Some(bar) if !bar.is_hidden() => bar.println(text),
            _ => eprintln!("{text}"),
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}

/// "0.4 s", "12 s", "3 min 05 s", "2 h 07 min".
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 10.0 {
        format!("{s:.1} s")
    } else if s < 60.0 {
        format!("{s:.0} s")
    } else if s < 3600.0 {
        let s = s.round() as u64;
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        let m = (s / 60.0).round() as u64;
        format!("{} h {:02} min", m / 60, m % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_counts_and_an_eta() {
        let mut p = ConsoleProgress::with_bar("sampling", "U-Net evaluations", false);
        p.start(0, 100);
        let line = p.line(25, Duration::from_secs(10));
        assert_eq!(line, "sampling 25/100 U-Net evaluations, ETA 30 s");
        assert_eq!(
            p.line(100, Duration::from_secs(40)),
            "sampling 100/100 U-Net evaluations, done in 40 s"
        );
        // A resumed run: the rate counts the steps of this process only.
        let mut t = ConsoleProgress::with_bar("step", "", false);
        t.start(50, 150);
        t.set_message("loss 0.1000".into());
        assert_eq!(
            t.line(60, Duration::from_secs(20)),
            "step 60/150 loss 0.1000, ETA 3 min 00 s"
        );
        assert_eq!(t.line(50, Duration::ZERO), "step 50/150 loss 0.1000");
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(Duration::from_millis(400)), "0.4 s");
        assert_eq!(human_duration(Duration::from_secs(185)), "3 min 05 s");
        assert_eq!(human_duration(Duration::from_secs(7620)), "2 h 07 min");
    }
}
