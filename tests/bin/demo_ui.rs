//! Terminal output for `ambit-demo`: step headings, indented notes, the
//! checklist of what was verified, and a few formatting helpers. Colours only
//! when stdout is a terminal and `NO_COLOR` is unset.

use std::io::{IsTerminal as _, Write as _};

/// How to print: with or without ANSI colours.
#[derive(Debug, Clone, Copy)]
pub struct Ui {
    color: bool,
}

impl Ui {
    /// Colours when stdout is a terminal and `NO_COLOR` is unset.
    pub fn detect() -> Ui {
        Ui {
            color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }

    pub fn bold(&self, s: &str) -> String {
        self.paint("1", s)
    }

    pub fn dim(&self, s: &str) -> String {
        self.paint("2", s)
    }

    pub fn green(&self, s: &str) -> String {
        self.paint("32", s)
    }

    pub fn red(&self, s: &str) -> String {
        self.paint("31", s)
    }

    pub fn yellow(&self, s: &str) -> String {
        self.paint("33", s)
    }

    pub fn cyan(&self, s: &str) -> String {
        self.paint("36", s)
    }

    /// Prints a line and flushes, so progress shows up at once even when
    /// stdout is a pipe.
    pub fn line(&self, s: impl AsRef<str>) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", s.as_ref());
        let _ = out.flush();
    }

    /// A blank line.
    pub fn gap(&self) {
        self.line("");
    }

    /// `━━ title ━━━…` across the usual terminal width.
    pub fn heading(&self, title: &str) {
        let used = title.chars().count() + 4;
        let rule = "━".repeat(WIDTH.saturating_sub(used).max(3));
        self.gap();
        self.line(self.bold(&format!("━━ {title} {rule}")));
    }

    /// A command being run, as a user would type it.
    pub fn command(&self, cmd: &str, context: &str) {
        let ctx = if context.is_empty() {
            String::new()
        } else {
            format!("   {}", self.dim(&format!("# {context}")))
        };
        self.line(format!("  {} {cmd}{ctx}", self.cyan("$")));
    }

    /// Indented output, e.g. what a command answered.
    pub fn out(&self, s: impl AsRef<str>) {
        self.line(format!("    {}", s.as_ref()))
    }

    /// A short explanation of what was just shown, wrapped to the usual
    /// terminal width.
    pub fn explain(&self, s: &str) {
        for (i, l) in wrap(s, WIDTH - 6).into_iter().enumerate() {
            let l = if i == 0 {
                format!("→ {l}")
            } else {
                format!("  {l}")
            };
            self.line(format!("  {}", self.dim(&l)));
        }
    }

    /// A sub-heading inside a step.
    pub fn sub(&self, s: &str) {
        self.line(format!("  {}", self.bold(s)))
    }
}

/// The width text is wrapped to (access-log records are not wrapped).
const WIDTH: usize = 96;

/// Splits `s` into lines of at most `width` characters at spaces (a longer
/// word gets a line of its own).
fn wrap(s: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in s.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// One verified (or failed) property, for the final table.
pub struct Check {
    pub label: String,
    pub result: Result<(), String>,
}

/// The checks so far; each is also printed where it happens.
pub struct Report {
    ui: Ui,
    checks: Vec<Check>,
}

impl Report {
    pub fn new(ui: Ui) -> Report {
        Report {
            ui,
            checks: Vec::new(),
        }
    }

    /// Records a check and prints it inline.
    pub fn check(&mut self, label: impl Into<String>, result: Result<(), String>) -> bool {
        let label = label.into();
        let ok = result.is_ok();
        match &result {
            Ok(()) => self.ui.line(format!("  {} {label}", self.ui.green("✓"))),
            Err(why) => self.ui.line(format!(
                "  {} {label}\n      {}",
                self.ui.red("✗"),
                self.ui.red(&indent_rest(why, 6))
            )),
        }
        self.checks.push(Check { label, result });
        ok
    }

    /// Records `ok` as a check: `Err(why)` unless `ok`.
    pub fn expect(&mut self, label: impl Into<String>, ok: bool, why: impl FnOnce() -> String) {
        self.check(label, if ok { Ok(()) } else { Err(why()) });
    }

    /// True if every check passed.
    pub fn all_passed(&self) -> bool {
        self.checks.iter().all(|c| c.result.is_ok())
    }

    /// The summary table.
    pub fn print_summary(&self) {
        let ui = self.ui;
        ui.heading("Summary");
        for c in &self.checks {
            match &c.result {
                Ok(()) => ui.line(format!("  {} {}", ui.green("✓"), c.label)),
                Err(why) => ui.line(format!(
                    "  {} {}\n      {}",
                    ui.red("✗"),
                    c.label,
                    ui.red(&first_line(why))
                )),
            }
        }
        let failed = self.checks.iter().filter(|c| c.result.is_err()).count();
        ui.gap();
        if failed == 0 {
            ui.line(ui.green(&ui.bold(&format!("  All {} checks passed.", self.checks.len()))));
        } else {
            ui.line(ui.red(&ui.bold(&format!(
                "  {failed} of {} checks failed.",
                self.checks.len()
            ))));
        }
    }
}

/// Indents every line but the first by `n` spaces.
fn indent_rest(s: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    s.trim_end().replace('\n', &format!("\n{pad}"))
}

/// The first line of a (possibly multi-line) error.
fn first_line(s: &str) -> String {
    let mut lines = s.lines();
    let first = lines.next().unwrap_or_default().to_string();
    if lines.next().is_some() {
        format!("{first} …")
    } else {
        first
    }
}

/// `79 B`, `4.0 KiB`, `8.0 MiB`.
pub fn bytes(n: u64) -> String {
    const KIB: f64 = 1024.0;
    let f = n as f64;
    if n < 1024 {
        format!("{n} B")
    } else if f < KIB * KIB {
        format!("{:.1} KiB", f / KIB)
    } else if f < KIB * KIB * KIB {
        format!("{:.1} MiB", f / (KIB * KIB))
    } else {
        format!("{:.2} GiB", f / (KIB * KIB * KIB))
    }
}

/// A duration in seconds with one decimal, or milliseconds below 1 s.
pub fn elapsed(d: std::time::Duration) -> String {
    if d.as_millis() < 1000 {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}
