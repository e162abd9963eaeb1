//! Recent worker output, kept per worker for `layer logs FUNCTION`.
//!
//! Each worker's stdout and stderr lines (a process's pipes, a container's
//! log stream) go to the runner's log and into a bounded ring here: the
//! last [`LINES_PER_WORKER`] lines of each of the last [`WORKERS_KEPT`]
//! workers, stopped ones included, so the output of a worker that crashed
//! can still be read.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use layer_protocol::runner::{LogLine, WorkerLogs};

/// Lines kept per worker.
pub const LINES_PER_WORKER: usize = 500;
/// Workers whose output is kept; the oldest stopped ones go first.
pub const WORKERS_KEPT: usize = 128;
/// Longer lines are cut to this many characters.
pub const MAX_LINE_CHARS: usize = 4096;

struct Entry {
    udf_id: String,
    revision: i32,
    worker: String,
    started_at_unix_ms: u64,
    running: bool,
    lines: VecDeque<LogLine>,
}

/// The output of one worker; what its log forwarder writes to.
#[derive(Clone)]
pub struct WorkerLog(Arc<Mutex<Entry>>);

impl std::fmt::Debug for WorkerLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerLog")
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl WorkerLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entry> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A log that keeps nothing (a worker started outside a runner).
    pub fn detached(worker: &str) -> WorkerLog {
        WorkerLog(Arc::new(Mutex::new(Entry {
            udf_id: String::new(),
            revision: 0,
            worker: worker.into(),
            started_at_unix_ms: now_ms(),
            running: true,
            lines: VecDeque::new(),
        })))
    }

    pub fn push(&self, line: &str) {
        let line: String =
            if line.len() > MAX_LINE_CHARS { line.chars().take(MAX_LINE_CHARS).collect() } else { line.into() };
        let mut e = self.lock();
        if e.lines.len() == LINES_PER_WORKER {
            e.lines.pop_front();
        }
        e.lines.push_back(LogLine { at_unix_ms: now_ms(), line });
    }

    /// The last `n` lines, oldest first.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let e = self.lock();
        e.lines.iter().skip(e.lines.len().saturating_sub(n)).map(|l| l.line.clone()).collect()
    }

    /// The worker's output has ended: it stopped.
    pub fn end(&self) {
        self.lock().running = false;
    }
}

/// Every worker's recent output on this runner.
#[derive(Clone, Default)]
pub struct LogBook {
    workers: Arc<Mutex<VecDeque<WorkerLog>>>,
}

impl std::fmt::Debug for LogBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogBook")
    }
}

impl LogBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<WorkerLog>> {
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the log of a new worker.
    pub fn open(&self, udf_id: &str, revision: i32, worker: &str) -> WorkerLog {
        let log = WorkerLog(Arc::new(Mutex::new(Entry {
            udf_id: udf_id.into(),
            revision,
            worker: worker.into(),
            started_at_unix_ms: now_ms(),
            running: true,
            lines: VecDeque::new(),
        })));
        let mut workers = self.lock();
        while workers.len() >= WORKERS_KEPT {
            // The oldest stopped worker, else the oldest.
            let at = workers.iter().position(|w| !w.lock().running).unwrap_or(0);
            workers.remove(at);
        }
        workers.push_back(log.clone());
        log
    }

    /// The last `lines` lines of each worker of `udf_id`, oldest worker
    /// first.
    pub fn recent(&self, udf_id: &str, lines: usize) -> Vec<WorkerLogs> {
        self.lock()
            .iter()
            .filter_map(|w| {
                let e = w.lock();
                (e.udf_id == udf_id).then(|| WorkerLogs {
                    worker: e.worker.clone(),
                    udf_id: e.udf_id.clone(),
                    revision: e.revision,
                    started_at_unix_ms: e.started_at_unix_ms,
                    running: e.running,
                    lines: e.lines.iter().skip(e.lines.len().saturating_sub(lines)).cloned().collect(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_book_keeps_the_last_lines_of_the_last_workers() {
        let book = LogBook::default();
        let a = book.open("f", 1, "f-r1-w1");
        for i in 0..(LINES_PER_WORKER + 10) {
            a.push(&format!("line {i}"));
        }
        a.push(&"x".repeat(MAX_LINE_CHARS + 100));
        a.end();
        book.open("g", 1, "g-r1-w2").push("other function");
        let f = book.recent("f", 3);
        assert_eq!(f.len(), 1);
        assert!(!f[0].running);
        let lines: Vec<_> = f[0].lines.iter().map(|l| l.line.len()).collect();
        assert_eq!(lines, vec![8, 8, MAX_LINE_CHARS]);
        assert_eq!(f[0].lines[0].line, format!("line {}", LINES_PER_WORKER + 8));
        assert_eq!(book.recent("f", 10_000)[0].lines.len(), LINES_PER_WORKER);
        // Past the limit, stopped workers go first.
        for i in 0..WORKERS_KEPT {
            book.open("h", 1, &format!("h-{i}"));
        }
        assert!(book.recent("f", 1).is_empty(), "the stopped worker went first");
        assert!(book.recent("g", 1).is_empty(), "then the oldest");
        assert_eq!(book.recent("h", 1).len(), WORKERS_KEPT);
    }
}
