//! Daily log files: one file per UTC date, named `{prefix}.YYYY-MM-DD.log`,
//! with a retention sweep that deletes only files of that exact pattern.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{Days, NaiveDate};
use domain::Clock;
use tracing_subscriber::fmt::MakeWriter;

/// A log file that follows the UTC date of a [`Clock`]: the first write of a
/// new date opens that date's file and deletes files that fell out of
/// retention. Clones share the same open file.
#[derive(Debug, Clone)]
pub struct DailyFile {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    prefix: String,
    retention_days: u32,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    date: Option<NaiveDate>,
    file: Option<File>,
}

impl DailyFile {
    /// Creates `dir` if needed, opens today's file and sweeps old files.
    ///
    /// `retention_days` is the number of dates kept, today's included: with
    /// 2, the files of today and yesterday stay and older ones are deleted.
    /// 0 is treated as 1, because today's file is always kept.
    pub fn open(
        dir: impl Into<PathBuf>,
        prefix: impl Into<String>,
        retention_days: u32,
        clock: Arc<dyn Clock>,
    ) -> io::Result<Self> {
        let prefix = prefix.into();
        if prefix.is_empty() || prefix.contains(['/', '\\']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid log file prefix {prefix:?}: use a plain file name"),
            ));
        }
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        let daily = Self {
            shared: Arc::new(Shared {
                dir,
                prefix,
                retention_days: retention_days.max(1),
                clock,
                state: Mutex::new(State::default()),
            }),
        };
        {
            let mut state = daily.shared.lock();
            daily.shared.roll_if_needed(&mut state)?;
        }
        Ok(daily)
    }

    /// Path of the file for `date`.
    pub fn path_for(&self, date: NaiveDate) -> PathBuf {
        self.shared.dir.join(file_name(&self.shared.prefix, date))
    }

    /// Path of the file that a write would go to now.
    pub fn current_path(&self) -> PathBuf {
        self.path_for(self.shared.clock.now().date_naive())
    }

    /// Deletes this logger's files older than the retention, as of now.
    /// Returns the deleted paths.
    pub fn sweep(&self) -> io::Result<Vec<PathBuf>> {
        let today = self.shared.clock.now().date_naive();
        sweep_dir(
            &self.shared.dir,
            &self.shared.prefix,
            today,
            self.shared.retention_days,
        )
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic during a write leaves at worst a partial line behind; the
        // state itself stays usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Opens the file of the current date if the date changed since the
    /// last write, then sweeps old files.
    fn roll_if_needed(&self, state: &mut State) -> io::Result<()> {
        let today = self.clock.now().date_naive();
        if state.date == Some(today) && state.file.is_some() {
            return Ok(());
        }
        let path = self.dir.join(file_name(&self.prefix, today));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        state.file = Some(file);
        state.date = Some(today);
        if let Err(error) = sweep_dir(&self.dir, &self.prefix, today, self.retention_days) {
            // Logging this through tracing could recurse into this writer.
            eprintln!(
                "batchd: deleting old log files in {} failed: {error}",
                self.dir.display()
            );
        }
        Ok(())
    }

    fn write_line(&self, buf: &[u8]) -> io::Result<()> {
        let mut state = self.lock();
        self.roll_if_needed(&mut state)?;
        match state.file.as_mut() {
            Some(file) => file.write_all(buf),
            None => Err(io::Error::other("log file is not open")),
        }
    }
}

fn file_name(prefix: &str, date: NaiveDate) -> String {
    format!("{prefix}.{}.log", date.format("%Y-%m-%d"))
}

/// Date in a file name of the form `{prefix}.YYYY-MM-DD.log`, or `None` when
/// the name does not match that pattern exactly.
pub fn parse_file_date(prefix: &str, name: &str) -> Option<NaiveDate> {
    let date = name
        .strip_prefix(prefix)?
        .strip_prefix('.')?
        .strip_suffix(".log")?;
    let bytes = date.as_bytes();
    let shape_ok = bytes.len() == 10
        && bytes.iter().enumerate().all(|(i, b)| match i {
            4 | 7 => *b == b'-',
            _ => b.is_ascii_digit(),
        });
    if !shape_ok {
        return None;
    }
    NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()
}

fn sweep_dir(
    dir: &Path,
    prefix: &str,
    today: NaiveDate,
    retention_days: u32,
) -> io::Result<Vec<PathBuf>> {
    let keep_from = today
        .checked_sub_days(Days::new(u64::from(retention_days.max(1) - 1)))
        .unwrap_or(NaiveDate::MIN);
    let mut deleted = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Some(date) = parse_file_date(prefix, &name) else {
            continue;
        };
        if date >= keep_from || !entry.file_type()?.is_file() {
            continue;
        }
        let path = entry.path();
        fs::remove_file(&path)?;
        deleted.push(path);
    }
    deleted.sort();
    Ok(deleted)
}

/// Writer handed to the formatting layer for one event.
#[derive(Debug)]
pub struct DailyFileWriter<'a> {
    shared: &'a Shared,
}

impl Write for DailyFileWriter<'_> {
    /// Writes the whole buffer under one lock, so lines of concurrent
    /// events do not interleave.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.shared.write_line(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.shared.lock().file.as_mut() {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

impl<'a> MakeWriter<'a> for DailyFile {
    type Writer = DailyFileWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        DailyFileWriter {
            shared: &self.shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_date_parses_exact_pattern_only() {
        let date = NaiveDate::from_ymd_opt(2026, 12, 4);
        assert_eq!(parse_file_date("batchd", "batchd.2026-12-04.log"), date);
        for other in [
            "batchd.2026-12-04.log.gz",
            "batchd.2026-12-4.log",
            "batchd.2026-13-04.log",
            "batchd-2026-12-04.log",
            "xbatchd.2026-12-04.log",
            "batchd.+2026-12-04.log",
            "security.2026-12-04.log",
            "batchd.log",
        ] {
            assert_eq!(parse_file_date("batchd", other), None, "{other}");
        }
    }

    #[test]
    fn prefix_with_separator_is_rejected() {
        let dir = tempfile::tempdir().expect("temp dir");
        let clock: Arc<dyn Clock> = Arc::new(domain::SystemClock);
        let result = DailyFile::open(dir.path(), "../x", 2, clock);
        assert!(result.is_err());
    }
}
