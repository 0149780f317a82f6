//! One QEMU process and its serial console.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use ksave_format::verdict::Refusal;

/// How to start a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Name for the log file and messages.
    pub name: String,
    /// Arguments after the common ones (kernel, disks, ...).
    pub args: Vec<String>,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Guest CPUs.
    pub cpus: u32,
    /// Copy the console to our stdout as it arrives (the demo).
    pub echo: bool,
    /// Let a guest reset restart the machine (default: a reset ends QEMU,
    /// so a triple fault cannot loop).
    pub reboot: bool,
}

impl VmConfig {
    /// The harness's standard machine: 512 MiB, 2 CPUs, TCG, no display, no
    /// reboot (a triple fault or reboot ends QEMU), isa-debug-exit on 0xf4.
    pub fn new(name: &str) -> Self {
        Self { name: name.into(), args: Vec::new(), memory_mib: 512, cpus: 2, echo: false, reboot: false }
    }

    /// Appends arguments.
    pub fn arg<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }
}

/// One console line and when it arrived, counted from QEMU's start.
#[derive(Clone, Debug)]
pub struct Line {
    /// Time since the VM was started.
    pub at: Duration,
    /// The text, without the line ending.
    pub text: String,
    /// An unfinished line that ends as a prompt does (": "), waiting for
    /// input: [`Vm::expect_prompt`] reads these, [`Vm::expect`] the lines.
    pub prompt: bool,
}

/// The figures of one `ksave-metric key=value ...` line, which ksave and
/// the CLI print for the harness.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// When the line arrived.
    pub at: Duration,
    values: BTreeMap<String, f64>,
    text: String,
}

/// What starts a metrics line.
pub const METRIC_PREFIX: &str = "ksave-metric ";

impl Metrics {
    /// The figures of `line`, if it is a metrics line.
    pub fn parse(line: &Line) -> Option<Self> {
        let (_, rest) = line.text.split_once(METRIC_PREFIX)?;
        let values = rest.split_whitespace().filter_map(|kv| kv.split_once('=')).filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?))).collect();
        Some(Self { at: line.at, values, text: line.text.clone() })
    }

    /// The figure `key`.
    pub fn get(&self, key: &str) -> Result<f64> {
        self.values.get(key).copied().ok_or_else(|| anyhow!("no {key}= in {:?}", self.text))
    }

    /// Whether the line carries `key`.
    pub fn has(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }
}

/// A running QEMU. Killed when dropped.
pub struct Vm {
    name: String,
    child: Child,
    /// The serial console's input.
    input: Option<ChildStdin>,
    lines: Receiver<Line>,
    seen: Vec<Line>,
    log: PathBuf,
    started: Instant,
}

/// Lines of console shown when a step fails.
const TAIL: usize = 40;

impl Vm {
    /// Starts QEMU; its console goes to `build/logs/NAME.log` too.
    pub fn start(config: VmConfig) -> Result<Self> {
        let log = crate::build_dir().join("logs").join(format!("{}.log", config.name));
        std::fs::create_dir_all(log.parent().unwrap())?;
        let mut log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-display", "none", "-serial", "stdio"])
            .args(if config.reboot { &[][..] } else { &["-no-reboot"][..] })
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
            .args(["-m", &config.memory_mib.to_string(), "-smp", &config.cpus.to_string()])
            .args(&config.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().context("starting qemu-system-x86_64 (is QEMU installed? run qemu/deps.sh)")?;
        let (tx, lines) = mpsc::channel();
        let input = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let echo = config.echo;
        let err_tx = tx.clone();
        std::thread::spawn(move || {
            let mut stdout = stdout;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n = stdout.read(&mut chunk).unwrap_or(0);
                buf.extend_from_slice(&chunk[..n]);
                // Whole lines, and the last piece at the end of the output.
                while let Some(end) = buf.iter().position(|&b| b == b'\n').map(|i| i + 1).or((n == 0 && !buf.is_empty()).then_some(buf.len())) {
                    let line: Vec<u8> = buf.drain(..end).collect();
                    let text = String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_string();
                    let at = started.elapsed();
                    let _ = writeln!(log_file, "[{:8.3}] {text}", at.as_secs_f64());
                    if echo {
                        println!("{text}");
                    }
                    if tx.send(Line { at, text, prompt: false }).is_err() {
                        return;
                    }
                }
                if n == 0 {
                    return;
                }
                // A prompt waits for input without ending its line.
                if buf.ends_with(b": ") {
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if tx.send(Line { at: started.elapsed(), text, prompt: true }).is_err() {
                        return;
                    }
                }
            }
        });
        // QEMU's own complaints (bad arguments, missing files) matter too.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let at = started.elapsed();
                let _ = err_tx.send(Line { at, text: format!("qemu: {line}"), prompt: false });
            }
        });
        Ok(Self { name: config.name, child, input, lines, seen: Vec::new(), log, started })
    }

    /// Types `text` on the serial console.
    pub fn send(&mut self, text: &str) -> Result<()> {
        let input = self.input.as_mut().context("the console's input is closed")?;
        input.write_all(text.as_bytes()).and_then(|()| input.flush()).with_context(|| format!("VM {}: typing {text:?}", self.name))
    }

    /// Waits up to `timeout` for a line containing `needle`, after the lines
    /// already matched.
    pub fn expect(&mut self, needle: &str, timeout: Duration) -> Result<Line> {
        self.expect_line(needle, false, timeout)
    }

    /// Waits up to `timeout` for a prompt containing `needle` (an
    /// unfinished line ending in ": "), after the lines already matched.
    pub fn expect_prompt(&mut self, needle: &str, timeout: Duration) -> Result<Line> {
        self.expect_line(needle, true, timeout)
    }

    fn expect_line(&mut self, needle: &str, prompt: bool, timeout: Duration) -> Result<Line> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if !line.prompt {
                        self.seen.push(line.clone());
                    }
                    if line.prompt == prompt && line.text.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.failure(&format!("no line with {needle:?} within {timeout:?}")));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                    return Err(self.failure(&format!("console closed ({status}) before a line with {needle:?}")));
                }
            }
        }
    }

    /// Waits up to `timeout` for a metrics line carrying `key`, after the
    /// lines already matched.
    pub fn expect_metrics(&mut self, key: &str, timeout: Duration) -> Result<Metrics> {
        let deadline = Instant::now() + timeout;
        loop {
            let line =
                self.expect(METRIC_PREFIX, deadline.saturating_duration_since(Instant::now())).with_context(|| format!("waiting for the metric {key}"))?;
            if let Some(m) = Metrics::parse(&line).filter(|m| m.has(key)) {
                return Ok(m);
            }
        }
    }

    /// Waits up to `timeout` for a resume's refusal (ksave's, or the
    /// tool's in a fresh kernel: `ksave-metric refusal=N`) and checks it is
    /// `expected`, one of [`ksave_format::verdict::code`].
    pub fn expect_refusal(&mut self, expected: u32, timeout: Duration) -> Result<Metrics> {
        let m = self.expect_metrics("refusal", timeout)?;
        let got = m.get("refusal")? as u32;
        let name = |code| Refusal::name_of(code).unwrap_or("an unknown code");
        if got != expected {
            return Err(self.failure(&format!("expected the refusal {expected} ({}), got {got} ({})", name(expected), name(got))));
        }
        Ok(m)
    }

    /// Fails if any line seen so far contains `needle`.
    pub fn refute_seen(&self, needle: &str) -> Result<()> {
        match self.seen.iter().find(|l| l.text.contains(needle)) {
            Some(l) => Err(self.failure(&format!("unexpected line: {:?}", l.text))),
            None => Ok(()),
        }
    }

    /// Waits up to `timeout` for QEMU to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Ok(line) = self.lines.try_recv() {
                self.seen.extend((!line.prompt).then_some(line));
            }
            if let Some(status) = self.child.try_wait()? {
                // Collect the last lines the reader threads still hold.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.extend((!line.prompt).then_some(line));
                }
                return status.code().ok_or_else(|| self.failure(&format!("QEMU killed by a signal ({status})")));
            }
            if Instant::now() >= deadline {
                return Err(self.failure(&format!("QEMU still running after {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for QEMU to exit with `code`.
    pub fn expect_exit(&mut self, code: i32, timeout: Duration) -> Result<()> {
        let got = self.wait_exit(timeout)?;
        if got != code {
            bail!(self.failure(&format!("QEMU exited {got}, expected {code}")));
        }
        Ok(())
    }

    /// Where its console is logged.
    pub fn log(&self) -> &std::path::Path {
        &self.log
    }

    /// Time since the VM started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// An error saying `what`, with the console's last lines.
    pub fn failure(&self, what: &str) -> anyhow::Error {
        let tail: Vec<_> = self.seen.iter().rev().take(TAIL).rev().map(|l| format!("  [{:8.3}] {}", l.at.as_secs_f64(), l.text)).collect();
        anyhow!("VM {}: {what}\nlast {} console lines (full log: {}):\n{}", self.name, tail.len(), self.log.display(), tail.join("\n"))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
