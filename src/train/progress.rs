//! The live progress line on stderr:
//! `[00:10:00] =>------ 45/5000 ETA:8h loss: 1.9294 | lr: 5.00e-05 | 2.1 steps/s | 812 tok/s | mem 3.1 GB`
//! redrawn in place on a terminal, one plain line per report otherwise (CI logs).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const BAR_WIDTH: usize = 20;

pub struct Progress {
    total: usize,
    start: Instant,
    tty: bool,
    /// Without a terminal, print every this many steps.
    plain_every: usize,
    drawn: bool,
}

/// What one step reports.
pub struct StepReport {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub steps_per_s: f64,
    pub tokens_per_s: f64,
    pub mem_gb: Option<f64>,
    /// MLX's peak and cache (GB) beside its active memory in `mem_gb` (the MLX engine).
    pub mlx_gb: Option<(f64, f64)>,
    /// With distrust weighting: the weighted loss and the batch's mean D.
    pub distrust: Option<(f64, f64)>,
    /// Preference tuning: the batch's reward accuracy and mean reward margin.
    pub preference: Option<(f64, f64)>,
}

impl Progress {
    pub fn new(total: usize) -> Self {
        Self {
            total,
            start: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            plain_every: if total <= 200 { 1 } else { 10 },
            drawn: false,
        }
    }

    pub fn line(&self, r: &StepReport) -> String {
        let done = (r.step * BAR_WIDTH)
            .checked_div(self.total)
            .unwrap_or(BAR_WIDTH);
        let bar: String = (0..BAR_WIDTH)
            .map(|i| match i.cmp(&done) {
                std::cmp::Ordering::Less => '=',
                std::cmp::Ordering::Equal => '>',
                std::cmp::Ordering::Greater => '-',
            })
            .collect();
        let remaining = self.total.saturating_sub(r.step) as f64;
        let eta = if r.steps_per_s > 0.0 {
            short_duration(remaining / r.steps_per_s)
        } else {
            "?".into()
        };
        // NaN: a skipped step, which has no loss (its note says why).
        let loss = match r.loss {
            l if l.is_nan() => "-".to_string(),
            l => format!("{l:.4}"),
        };
        let mut s = format!(
            "[{}] {bar} {}/{} ETA:{eta} loss: {loss} | lr: {} | {} | {:.0} tok/s",
            clock(self.start.elapsed()),
            r.step,
            self.total,
            sci(r.lr),
            step_rate(r.steps_per_s),
            r.tokens_per_s
        );
        if let Some((weighted, d)) = r.distrust {
            s.push_str(&format!(" | weighted: {weighted:.4} | D: {d:.2}"));
        }
        if let Some((accuracy, margin)) = r.preference {
            s.push_str(&format!(
                " | acc: {:.0}% | margin: {margin:.3}",
                100.0 * accuracy
            ));
        }
        if let Some(m) = r.mem_gb {
            s.push_str(&format!(" | mem {m:.1} GB"));
        }
        if let Some((peak, cache)) = r.mlx_gb {
            s.push_str(&format!(" (peak {peak:.1}, cache {cache:.1})"));
        }
        s
    }

    pub fn update(&mut self, r: &StepReport) {
        let line = self.line(r);
        let mut err = std::io::stderr().lock();
        if self.tty {
            // Cut to the terminal's width: a line that wraps is redrawn only in its last row,
            // leaving one cut copy per step above it.
            let line = fit_width(&line, terminal_columns());
            let _ = write!(err, "\r\x1b[2K{line}");
            self.drawn = true;
        } else if r.step.is_multiple_of(self.plain_every) || r.step == self.total || r.step == 1 {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    /// Prints a message on its own line without garbling the progress line.
    pub fn message(&mut self, msg: &str) {
        let mut err = std::io::stderr().lock();
        if self.tty && self.drawn {
            let _ = write!(err, "\r\x1b[2K");
            self.drawn = false;
        }
        let _ = writeln!(err, "{msg}");
    }

    pub fn finish(&mut self) {
        if self.tty && self.drawn {
            let _ = writeln!(std::io::stderr());
            self.drawn = false;
        }
    }
}

/// The terminal's width in columns (stderr's), where it can be asked.
fn terminal_columns() -> Option<usize> {
    #[cfg(unix)]
    {
        // SAFETY: TIOCGWINSZ fills the winsize struct given, which lives across the call.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) };
        (r == 0 && ws.ws_col > 0).then_some(ws.ws_col as usize)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// `line` cut to fit `columns` (one column left, so the cursor does not wrap).
fn fit_width(line: &str, columns: Option<usize>) -> &str {
    match columns {
        Some(c) if line.chars().count() >= c => {
            let end = line
                .char_indices()
                .nth(c - 1)
                .map_or(line.len(), |(i, _)| i);
            &line[..end]
        }
        _ => line,
    }
}

fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// `5.00e-05`: two decimals and a two-digit exponent.
pub fn sci(x: f64) -> String {
    let s = format!("{x:.2e}");
    match s.split_once('e') {
        Some((m, e)) => {
            let (sign, digits) = e.strip_prefix('-').map(|d| ('-', d)).unwrap_or(('+', e));
            format!("{m}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

/// `8h`, `1h23m`, `12m`, `45s`.
pub fn short_duration(secs: f64) -> String {
    if !secs.is_finite() {
        return "?".into();
    }
    let s = secs.round() as u64;
    // Minutes rounded to the nearest (100 s is 2m, not 1m).
    let m = (s + 30) / 60;
    match s {
        0..=59 => format!("{s}s"),
        _ if m < 60 => format!("{m}m"),
        _ if m.is_multiple_of(60) => format!("{}h", m / 60),
        _ => format!("{}h{:02}m", m / 60, m % 60),
    }
}

/// `2.1 steps/s`, or `20 s/step` below a tenth of a step a second (an 8B step on a CPU),
/// which `0.0 steps/s` would hide.
pub fn step_rate(steps_per_s: f64) -> String {
    if steps_per_s > 0.0 && steps_per_s < 0.095 {
        format!("{:.0} s/step", 1.0 / steps_per_s)
    } else {
        format!("{steps_per_s:.1} steps/s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_cut_to_the_terminal() {
        assert_eq!(fit_width("[00:01] => 4/10", Some(8)), "[00:01]");
        assert_eq!(fit_width("short", Some(80)), "short");
        assert_eq!(fit_width("short", None), "short");
        assert_eq!(fit_width("ééééé", Some(3)), "éé");
    }

    #[test]
    fn rates_and_durations_read_right_when_slow() {
        assert_eq!(step_rate(2.1), "2.1 steps/s");
        assert_eq!(step_rate(0.1), "0.1 steps/s");
        assert_eq!(step_rate(0.05), "20 s/step");
        assert_eq!(step_rate(0.0), "0.0 steps/s");
        assert_eq!(short_duration(100.0), "2m");
        assert_eq!(short_duration(59.0), "59s");
        assert_eq!(short_duration(3590.0), "1h");
        assert_eq!(short_duration(8.0 * 3600.0), "8h");
        assert_eq!(short_duration(5000.0), "1h23m");
    }

    #[test]
    fn line_has_the_documented_form() {
        let p = Progress::new(5000);
        let line = p.line(&StepReport {
            step: 45,
            loss: 1.92941,
            lr: 5e-5,
            steps_per_s: 2.1,
            tokens_per_s: 812.4,
            mem_gb: Some(3.12),
            mlx_gb: None,
            distrust: None,
            preference: None,
        });
        assert!(line.starts_with("[00:00:00] >------------------- 45/5000 ETA:39m loss: 1.9294 | lr: 5.00e-05 | 2.1 steps/s | 812 tok/s | mem 3.1 GB"), "{line}");
        let weighted = p.line(&StepReport {
            step: 45,
            loss: 1.92941,
            lr: 5e-5,
            steps_per_s: 2.1,
            tokens_per_s: 812.4,
            mem_gb: None,
            mlx_gb: None,
            distrust: Some((2.5, 17.25)),
            preference: None,
        });
        assert!(weighted.ends_with("loss: 1.9294 | lr: 5.00e-05 | 2.1 steps/s | 812 tok/s | weighted: 2.5000 | D: 17.25"), "{weighted}");
        let mlx = p.line(&StepReport {
            step: 45,
            loss: 1.92941,
            lr: 5e-5,
            steps_per_s: 2.1,
            tokens_per_s: 812.4,
            mem_gb: Some(3.12),
            mlx_gb: Some((3.44, 0.0)),
            distrust: None,
            preference: None,
        });
        assert!(mlx.ends_with("| mem 3.1 GB (peak 3.4, cache 0.0)"), "{mlx}");
        let dpo = p.line(&StepReport {
            step: 45,
            loss: 0.61,
            lr: 5e-5,
            steps_per_s: 2.1,
            tokens_per_s: 812.4,
            mem_gb: Some(3.12),
            mlx_gb: None,
            distrust: None,
            preference: Some((0.75, 0.4213)),
        });
        assert!(
            dpo.ends_with("loss: 0.6100 | lr: 5.00e-05 | 2.1 steps/s | 812 tok/s | acc: 75% | margin: 0.421 | mem 3.1 GB"),
            "{dpo}"
        );
        assert_eq!(short_duration(8.0 * 3600.0), "8h");
        assert_eq!(short_duration(4980.0), "1h23m");
    }
}
