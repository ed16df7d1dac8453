//! The log's way to stderr. A request's worker only copies its formatted line into a bounded
//! buffer; a writer thread sends the buffer to stderr in one `write(2)` per batch — at least
//! every 200 ms, at once when a batch is large, and at every stop ([`flush`]). A log reader
//! that stops reading (a full pipe) stalls only that thread: once the buffer is full, lines
//! are dropped and counted (`identity_binding_proxy_log_lines_dropped_total`), and requests
//! never wait for the log.
//!
//! The buffer is the process's, like the stderr it stands for: the one global besides the
//! metrics registry.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Longest a line waits in the buffer (SPEC §9's log is read live by operators).
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// A batch this large is written at once: about 100 request lines, so at tens of thousands
/// of requests a second the writer keeps up with batches, not one syscall per line.
const BATCH: usize = 64 * 1024;
/// What the buffer holds while stderr does not take it: 200 ms of request lines at 20 000
/// requests a second, or a reader paused that long. Beyond it, lines are dropped.
const CAPACITY: usize = 2 * 1024 * 1024;

/// Lines waiting for the writer, and the writer's progress.
struct Pending {
    buf: Vec<u8>,
    /// Flushes asked for, and the last one done (by number).
    asked: u64,
    done: u64,
}

struct Pipe {
    pending: Mutex<Pending>,
    /// Wakes the writer: a full batch, or a flush asked for.
    wake: Condvar,
    /// Wakes those waiting for a flush.
    flushed: Condvar,
    capacity: usize,
    /// The destination itself when the writer thread could not start: each line is then
    /// written at once, in the caller's thread, rather than kept for a writer that never comes.
    direct: OnceLock<Mutex<Destination>>,
}

type Destination = Box<dyn Write + Send>;

static PIPE: OnceLock<Pipe> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Lines dropped since start because the buffer was full.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

impl Pipe {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one line: copied into the buffer, or dropped and counted when it is full.
    fn push(&self, line: &[u8]) {
        let mut pending = self.lock();
        // Read under the lock: no line joins the buffer after the fallback took it.
        if let Some(out) = self.direct.get() {
            drop(pending);
            let _ = out
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_all(line);
            return;
        }
        if pending.buf.len() + line.len() > self.capacity {
            drop(pending);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_below = pending.buf.len() < BATCH;
        pending.buf.extend_from_slice(line);
        let full = was_below && pending.buf.len() >= BATCH;
        // Woken after the unlock: the writer does not wake only to wait for this lock.
        drop(pending);
        if full {
            self.wake.notify_one();
        }
    }

    /// The writer thread: swaps the buffer for an empty one and writes it, batch by batch.
    fn write_forever(&self, out: &mut dyn Write) {
        let mut batch = Vec::with_capacity(self.capacity);
        loop {
            let asked = {
                let mut pending = self.lock();
                let deadline = Instant::now() + FLUSH_EVERY;
                while pending.buf.len() < BATCH && pending.asked == pending.done {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    pending = self
                        .wake
                        .wait_timeout(pending, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                std::mem::swap(&mut pending.buf, &mut batch);
                pending.asked
            };
            if !batch.is_empty() {
                // A reader gone for good: the lines are lost either way; keep serving.
                let _ = out.write_all(&batch).and_then(|()| out.flush());
                batch.clear();
            }
            // Those waiting for a flush are woken only when one was asked for, and after the
            // unlock: a syscall under the lock would hold up every request's line.
            let mut pending = self.lock();
            let answered = asked > pending.done;
            pending.done = pending.done.max(asked);
            drop(pending);
            if answered {
                self.flushed.notify_all();
            }
        }
    }

    /// Waits until every line taken before the call is written, or `limit` passes.
    fn flush(&self, limit: Duration) {
        if self.direct.get().is_some() {
            return;
        }
        let deadline = Instant::now() + limit;
        let mut pending = self.lock();
        pending.asked += 1;
        let ticket = pending.asked;
        self.wake.notify_one();
        while pending.done < ticket {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            pending = self
                .flushed
                .wait_timeout(pending, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Starts the writer thread (once) with `out` as the log's destination, and returns the
/// writer the log's formatter writes to.
pub fn install(out: impl Write + Send + 'static) -> LogWriter {
    install_with(out, CAPACITY)
}

fn install_with(out: impl Write + Send + 'static, capacity: usize) -> LogWriter {
    let mut started = false;
    let pipe = PIPE.get_or_init(|| {
        started = true;
        Pipe::new(capacity)
    });
    if started {
        let spawn = |f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name("log-writer".into())
                .spawn(f)
                .map(drop)
        };
        start_writer(pipe, Box::new(out), spawn);
    }
    LogWriter(pipe)
}

impl Pipe {
    fn new(capacity: usize) -> Self {
        Pipe {
            pending: Mutex::new(Pending {
                buf: Vec::with_capacity(capacity),
                asked: 0,
                done: 0,
            }),
            wake: Condvar::new(),
            flushed: Condvar::new(),
            capacity,
            direct: OnceLock::new(),
        }
    }
}

/// Starts `pipe`'s writer thread with `spawn`; when it cannot start, every line goes to
/// `out` at once instead (never silently nowhere).
fn start_writer(
    pipe: &'static Pipe,
    out: Destination,
    spawn: impl FnOnce(Box<dyn FnOnce() + Send>) -> std::io::Result<()>,
) {
    // The thread takes `out` from here when it runs; a thread never started leaves it.
    let slot = std::sync::Arc::new(Mutex::new(Some(out)));
    let taken = slot.clone();
    let run = move || {
        let out = taken.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut out) = out {
            pipe.write_forever(&mut out);
        }
    };
    if let Err(e) = spawn(Box::new(run)) {
        eprintln!("cannot start the log writer thread ({e}): writing the log unbatched");
        let out = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(out) = out {
            let kept = {
                let mut pending = pipe.lock();
                let _ = pipe.direct.set(Mutex::new(out));
                std::mem::take(&mut pending.buf)
            };
            if let Some(out) = pipe.direct.get() {
                let _ = out
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write_all(&kept);
            }
        }
    }
}

/// Writes every line taken so far (within `limit`: a reader that stopped reading cannot hold
/// the exit). Called at every stop, after the drain.
pub fn flush(limit: Duration) {
    if let Some(pipe) = PIPE.get() {
        pipe.flush(limit);
    }
}

/// The formatter's writer: one `write` per formatted event, copied into the buffer.
#[derive(Clone, Copy)]
pub struct LogWriter(&'static Pipe);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A destination that takes nothing until it is opened, like a pipe nobody reads.
    #[derive(Clone)]
    struct Gate {
        open: Arc<(Mutex<bool>, Condvar)>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (open, cv) = &*self.open;
            let mut is_open = open.lock().unwrap();
            while !*is_open {
                is_open = cv.wait(is_open).unwrap();
            }
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_go_straight_to_the_destination_when_the_writer_thread_cannot_start() {
        let got = crate::testlog::Capture::default();
        let pipe: &'static Pipe = Box::leak(Box::new(Pipe::new(4096)));
        pipe.push(b"before\n");
        let no_thread = |_| Err(std::io::Error::other("no threads left"));
        start_writer(pipe, Box::new(got.clone()), no_thread);
        LogWriter(pipe).write_all(b"after\n").unwrap();
        pipe.flush(Duration::from_secs(5));
        assert_eq!(got.bytes(), b"before\nafter\n");
    }

    // One test: the pipe is the process's, installed once.
    #[test]
    fn lines_are_batched_flushed_in_time_and_dropped_never_waited_for_when_stuck() {
        let gate = Gate {
            open: Arc::new((Mutex::new(true), Condvar::new())),
            got: Arc::default(),
        };
        let mut writer = install_with(gate.clone(), 4096);
        let line = [b'x'; 99];
        let mut line = line.to_vec();
        line.push(b'\n');

        // Written within the flush interval without being asked, and at once on a flush.
        writer.write_all(&line).unwrap();
        std::thread::sleep(FLUSH_EVERY * 2);
        assert_eq!(gate.got.lock().unwrap().len(), 100);
        writer.write_all(&line).unwrap();
        flush(Duration::from_secs(5));
        assert_eq!(gate.got.lock().unwrap().len(), 200);

        // A reader that stops: the writer waits, the buffer fills, then lines are dropped
        // and counted, and no write waits.
        *gate.open.0.lock().unwrap() = false;
        writer.write_all(&line).unwrap();
        std::thread::sleep(FLUSH_EVERY * 2);
        let before = dropped();
        let started = Instant::now();
        for _ in 0..1000 {
            writer.write_all(&line).unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "no write waited"
        );
        // 4096 bytes hold 40 lines.
        assert_eq!(dropped() - before, 1000 - 40);
        // A flush gives up within its limit while the reader is stuck.
        let started = Instant::now();
        flush(Duration::from_millis(300));
        assert!(started.elapsed() < Duration::from_secs(2));

        // The reader comes back: what was kept arrives, whole lines only.
        *gate.open.0.lock().unwrap() = true;
        gate.open.1.notify_all();
        flush(Duration::from_secs(5));
        let got = gate.got.lock().unwrap();
        assert_eq!(got.len(), 200 + 100 + 4000);
        assert!(got.ends_with(b"x\n"));
    }
}
