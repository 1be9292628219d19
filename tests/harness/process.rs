//! Child processes: long-running ones ([`Proc`], killed and reaped on
//! drop) and bounded runs ([`run`]).
//!
//! Output is read line by line on background threads into a shared
//! [`OutputLog`], teed to a log file under the cluster directory, so a test
//! can wait for a line ("listening on …", a JSON log record) instead of
//! sleeping, and a failing test can print the tail.

use std::fs::File;
use std::io::{BufRead as _, BufReader, Read, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use parking_lot::{Condvar, Mutex};

/// How long tear-down waits for a SIGKILLed child to be reaped. SIGKILL is
/// only delayed by uninterruptible sleep, so this is generous.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);

/// Which pipe a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The child's stdout.
    Stdout,
    /// The child's stderr.
    Stderr,
}

/// One line of a child's output.
#[derive(Debug, Clone)]
pub struct OutputLine {
    /// Which pipe it came from.
    pub stream: Stream,
    /// The line without its trailing newline (lossily decoded as UTF-8).
    pub text: String,
    /// The line parsed as JSON, when it is a JSON object (ztunnel's
    /// `--log-format json`).
    pub json: Option<serde_json::Value>,
    /// Which run of the process wrote it (bumped by restarts).
    pub generation: u32,
}

/// The lines captured from one or more runs of a process, shared between
/// reader threads and the test.
#[derive(Clone)]
pub struct OutputLog {
    shared: Arc<(Mutex<LogState>, Condvar)>,
}

struct LogState {
    lines: Vec<OutputLine>,
    /// Pipes of the current generation still open; 0 means the process has
    /// exited (or closed both pipes), so waiting for more output is futile.
    open_pipes: usize,
    generation: u32,
    file: Option<File>,
    path: Option<PathBuf>,
}

/// A running child process; SIGKILLed and reaped on drop.
pub struct Proc {
    child: Child,
    name: String,
    log: OutputLog,
    exited: Option<ExitStatus>,
}

// === impl OutputLog ===

impl OutputLog {
    /// A log teeing to `path` (appending), if given.
    pub fn new(path: Option<&Path>) -> Result<OutputLog> {
        let file = match path {
            Some(p) => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
                let f = File::options().create(true).append(true).open(p);
                Some(f.with_context(|| format!("opening log file {}", p.display()))?)
            }
            None => None,
        };
        let state = LogState {
            lines: Vec::new(),
            open_pipes: 0,
            generation: 0,
            file,
            path: path.map(Path::to_path_buf),
        };
        Ok(OutputLog {
            shared: Arc::new((Mutex::new(state), Condvar::new())),
        })
    }

    /// Starts reader threads on the child's piped stdout and stderr, as a
    /// new generation.
    pub fn attach(&self, child: &mut Child, label: &str) {
        let generation = {
            let mut st = self.shared.0.lock();
            st.generation += 1;
            st.open_pipes = 0;
            let g = st.generation;
            if let Some(f) = &mut st.file {
                let _ = writeln!(f, "=== {label} (pid {}, run {g}) ===", child.id());
            }
            g
        };
        if let Some(out) = child.stdout.take() {
            self.spawn_reader(out, Stream::Stdout, generation, label);
        }
        if let Some(err) = child.stderr.take() {
            self.spawn_reader(err, Stream::Stderr, generation, label);
        }
    }

    fn spawn_reader(
        &self,
        pipe: impl Read + Send + 'static,
        stream: Stream,
        generation: u32,
        label: &str,
    ) {
        self.shared.0.lock().open_pipes += 1;
        let log = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("out-{label}"))
            .spawn(move || {
                let mut reader = BufReader::new(pipe);
                let mut buf = Vec::new();
                // Bounded by the pipe: read_until returns 0 at EOF, which comes
                // when the child (and any grandchild holding the pipe) exits.
                while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                    let text = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_string();
                    buf.clear();
                    log.push(stream, generation, text);
                }
                let (lock, cvar) = &*log.shared;
                let mut st = lock.lock();
                if st.generation == generation {
                    st.open_pipes = st.open_pipes.saturating_sub(1);
                }
                cvar.notify_all();
            });
        if spawned.is_err() {
            // Without a reader the pipe fills and the child blocks; count it
            // closed so waits fail fast rather than hang.
            self.shared.0.lock().open_pipes -= 1;
        }
    }

    fn push(&self, stream: Stream, generation: u32, text: String) {
        let json = text
            .trim_start()
            .starts_with('{')
            .then(|| serde_json::from_str::<serde_json::Value>(&text).ok())
            .flatten();
        let (lock, cvar) = &*self.shared;
        let mut st = lock.lock();
        if let Some(f) = &mut st.file {
            let _ = writeln!(f, "{text}");
        }
        st.lines.push(OutputLine {
            stream,
            text,
            json,
            generation,
        });
        cvar.notify_all();
    }

    /// All lines captured so far, from every generation.
    pub fn lines(&self) -> Vec<OutputLine> {
        self.shared.0.lock().lines.clone()
    }

    /// Number of lines captured so far; a cursor for [`OutputLog::wait_for`].
    pub fn len(&self) -> usize {
        self.shared.0.lock().lines.len()
    }

    /// True when nothing has been captured yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The current generation (1 after the first start).
    pub fn generation(&self) -> u32 {
        self.shared.0.lock().generation
    }

    /// The log file, if teeing.
    pub fn path(&self) -> Option<PathBuf> {
        self.shared.0.lock().path.clone()
    }

    /// Waits until a line at index `from` or later matches `pred`.
    ///
    /// Fails on timeout, or as soon as the current generation's pipes have
    /// closed (the process exited) without a match; either error carries the
    /// last lines.
    pub fn wait_for(
        &self,
        from: usize,
        timeout: Duration,
        mut pred: impl FnMut(&OutputLine) -> bool,
    ) -> Result<OutputLine> {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.shared;
        let mut st = lock.lock();
        let mut next = from;
        loop {
            if let Some(line) = st.lines.iter().skip(next).find(|l| pred(l)) {
                return Ok(line.clone());
            }
            next = st.lines.len().max(from);
            let why = if st.generation > 0 && st.open_pipes == 0 {
                "the process exited (its output closed) without a matching line".to_string()
            } else if Instant::now() >= deadline {
                format!("no matching line within {timeout:?}")
            } else {
                cvar.wait_until(&mut st, deadline);
                continue;
            };
            let tail = tail_of(&st.lines, 20);
            let file = st
                .path
                .as_ref()
                .map(|p| format!(" (full log: {})", p.display()))
                .unwrap_or_default();
            bail!("{why}{file}; last lines:\n{tail}");
        }
    }

    /// The last `n` lines, one per line, for error messages.
    pub fn tail(&self, n: usize) -> String {
        tail_of(&self.shared.0.lock().lines, n)
    }
}

fn tail_of(lines: &[OutputLine], n: usize) -> String {
    let start = lines.len().saturating_sub(n);
    let mut out = String::new();
    for l in &lines[start..] {
        let tag = match l.stream {
            Stream::Stdout => "out",
            Stream::Stderr => "err",
        };
        out.push_str(&format!("  [{tag}] {}\n", l.text));
    }
    if out.is_empty() {
        out.push_str("  (no output)\n");
    }
    out
}

// === impl Proc ===

impl Proc {
    /// Spawns `cmd` with stdin from /dev/null and stdout/stderr captured into
    /// a new [`OutputLog`] teed to `log_file`.
    pub fn spawn(cmd: &mut Command, name: &str, log_file: Option<&Path>) -> Result<Proc> {
        let log = OutputLog::new(log_file)?;
        Self::spawn_with_log(cmd, name, log)
    }

    /// Like [`Proc::spawn`], appending to an existing log as a new
    /// generation (used by restarts).
    pub fn spawn_with_log(cmd: &mut Command, name: &str, log: OutputLog) -> Result<Proc> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {name} ({:?})", cmd.get_program()))?;
        log.attach(&mut child, name);
        Ok(Proc {
            child,
            name: name.to_string(),
            log,
            exited: None,
        })
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name given at spawn time.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The captured output.
    pub fn log(&self) -> &OutputLog {
        &self.log
    }

    /// All captured output as text, one line per line (both streams).
    pub fn output_text(&self) -> String {
        self.log
            .lines()
            .iter()
            .map(|l| format!("{}\n", l.text))
            .collect()
    }

    /// Waits until an output line satisfies `pred`, and returns it.
    pub fn wait_for_line(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<String> {
        self.log
            .wait_for(0, timeout, |l| pred(&l.text))
            .map(|l| l.text)
            .with_context(|| format!("waiting for output from {} (pid {})", self.name, self.pid()))
    }

    /// The exit status if the child has exited (reaping it).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().context("try_wait")?;
        }
        Ok(self.exited)
    }

    /// Waits (bounded) for the child to exit by itself.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let mut status = None;
        crate::wait_until(timeout, || {
            status = self.try_wait().ok().flatten();
            status.is_some()
        })
        .with_context(|| format!("{} (pid {}) did not exit", self.name, self.pid()))?;
        status.ok_or_else(|| anyhow!("unreachable: wait_until returned without a status"))
    }

    /// Sends `signal` to the child (by PID), unless it was already reaped.
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        kill(Pid::from_raw(self.child.id() as i32), signal)
            .with_context(|| format!("kill -{signal} {}", self.pid()))
    }

    /// SIGKILLs the child and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.signal(Signal::SIGKILL)?;
        self.wait(REAP_TIMEOUT)
    }

    /// SIGTERMs the child, waits up to `grace`, then SIGKILLs it.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        match self.wait(grace) {
            Ok(s) => Ok(s),
            Err(_) => self.kill(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!(
                "harness: failed to kill {} (pid {}): {e:#}",
                self.name,
                self.pid()
            );
        }
    }
}

/// Runs `cmd` to completion with stdin from /dev/null, capturing stdout and
/// stderr. On timeout the child is SIGKILLed and the error carries what it
/// printed so far. A non-zero exit is not an error: check `status`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let program = format!("{:?}", cmd.get_program());
    let mut child = cmd.spawn().with_context(|| format!("spawning {program}"))?;
    let stdout = collect(child.stdout.take());
    let stderr = collect(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let mut status = None;
    let waited = crate::wait_until(timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    let status = match (waited, status) {
        (Ok(()), Some(s)) => s,
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            let grace = Duration::from_secs(1);
            let out = stdout.recv_timeout(grace).unwrap_or_default();
            let err = stderr.recv_timeout(grace).unwrap_or_default();
            bail!(
                "{program} did not finish within {timeout:?} (killed)\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            );
        }
    };
    // Output is complete once the pipes close; a grandchild that keeps them
    // open must not hang the test, so the wait stays bounded.
    let rest = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1));
    let stdout = stdout
        .recv_timeout(rest)
        .context("stdout still open after exit (a leaked grandchild?)")?;
    let stderr = stderr
        .recv_timeout(rest)
        .context("stderr still open after exit (a leaked grandchild?)")?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Like [`run`], but fails unless the exit status is 0, and returns stdout
/// as a string.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let desc = describe(cmd);
    let out = run(cmd, timeout).with_context(|| desc.clone())?;
    if !out.status.success() {
        bail!(
            "{desc} failed ({})\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{desc} printed non-UTF-8"))
}

/// `program arg arg…` for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn collect(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    match pipe {
        Some(mut p) => {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = p.read_to_end(&mut buf);
                let _ = tx.send(buf);
            });
        }
        None => {
            let _ = tx.send(Vec::new());
        }
    }
    rx
}
