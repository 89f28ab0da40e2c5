//! Helpers for tests that check what gets logged, in this crate and in the
//! crates that use it: capture the JSON output of some code and assert
//! that a secret never appears in it.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

use crate::{LogFormat, TelemetryConfig, build};

/// An in-memory log output. Clones share the same buffer.
#[derive(Debug, Clone, Default)]
pub struct CaptureBuffer {
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl CaptureBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.bytes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Everything written so far, as text.
    pub fn contents(&self) -> String {
        String::from_utf8_lossy(&self.lock()).into_owned()
    }

    /// Parses each line as JSON.
    ///
    /// # Panics
    ///
    /// On a line that is not valid JSON, naming the line.
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.contents()
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|error| panic!("log line is not valid JSON ({error}): {line}"))
            })
            .collect()
    }

    /// Asserts that `secret` appears nowhere in the output.
    ///
    /// # Panics
    ///
    /// When it does, naming the first line it is on.
    pub fn assert_not_logged(&self, secret: &str) {
        let contents = self.contents();
        if let Some(line) = contents.lines().find(|line| line.contains(secret)) {
            panic!("a secret was logged: {line}");
        }
    }

    /// Wraps this buffer as a boxed writer, for [`build`].
    pub fn make_writer(&self) -> BoxMakeWriter {
        BoxMakeWriter::new(self.clone())
    }
}

/// Writer handed out for one event.
#[derive(Debug)]
pub struct CaptureWriter {
    buffer: CaptureBuffer,
}

impl io::Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buffer.lock().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for CaptureBuffer {
    type Writer = CaptureWriter;

    fn make_writer(&'a self) -> Self::Writer {
        CaptureWriter {
            buffer: self.clone(),
        }
    }
}

/// Runs `f` under a JSON subscriber at level `trace` that writes into a new
/// buffer, and returns the buffer. Only the current thread's events are
/// captured.
///
/// # Panics
///
/// When building the subscriber fails, which its fixed configuration
/// (JSON, no log directory, level `trace`) does not cause.
pub fn capture_json<T>(f: impl FnOnce() -> T) -> (T, CaptureBuffer) {
    let buffer = CaptureBuffer::new();
    let config = TelemetryConfig {
        format: LogFormat::Json,
        default_level: "trace".to_owned(),
        ..TelemetryConfig::default()
    };
    let (dispatch, _guard) = match build(&config, buffer.make_writer(), None) {
        Ok(built) => built,
        Err(error) => panic!("building the capture subscriber failed: {error}"),
    };
    let value = tracing::dispatcher::with_default(&dispatch, f);
    (value, buffer)
}
