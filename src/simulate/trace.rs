//! The simulator's CSV edges: reading a trace (header `time_s,arriving_jobs[,p95_s]`, validated
//! row by row) and writing a replay's per-tick timeline.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::TickRecord;
use crate::decide::PolicyKind;

/// The header a trace must have (`p95_s` is optional).
const EXPECTED_HEADER: &str = "time_s,arriving_jobs[,p95_s]";
/// Latest accepted `time_s` (about 317 years), so times stay exact in milliseconds.
const MAX_TIME_S: f64 = 1e10;
/// Largest accepted `arriving_jobs` in one row, so every sum stays finite.
const MAX_JOBS: f64 = 1e12;
/// Largest accepted `p95_s` (one year).
const MAX_P95_S: f64 = 31_536_000.0;

/// One interval of a trace, validated.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct TraceRow {
    /// Start of the interval, milliseconds since trace start.
    pub(super) time_ms: u64,
    /// Jobs arriving from `time_ms` until the next row.
    pub(super) arriving_jobs: f64,
    /// Service-time p95 observed in the interval (seconds), when the trace has it.
    pub(super) p95_s: Option<f64>,
}

/// A workload trace: per-interval job arrivals and, optionally, the service-time p95.
///
/// Read it with [`Trace::from_reader`] or [`Trace::from_path`]; replay it with
/// [`super::simulate`]. A trace always has at least one row and strictly increasing times.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub(super) rows: Vec<TraceRow>,
}

/// Why a trace could not be read. Every variant about the content names the line (1-based,
/// the header is line 1) and says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be opened or read.
    #[error("cannot read trace {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// No header, or a header and no data rows.
    #[error(
        "trace is empty: expected the header `{EXPECTED_HEADER}` followed by at least one row"
    )]
    Empty,
    /// The header lacks a required column.
    #[error(
        "line {line}: missing column `{column}`; the header must be `{EXPECTED_HEADER}` \
         (`p95_s` optional)"
    )]
    MissingColumn {
        /// Line of the header.
        line: u64,
        /// The missing column.
        column: &'static str,
    },
    /// A cell is not an acceptable value.
    #[error("line {line}, column `{column}`: {problem}; {fix}")]
    BadValue {
        /// Line of the row.
        line: u64,
        /// The column.
        column: String,
        /// What is wrong with the cell.
        problem: String,
        /// What to write instead.
        fix: &'static str,
    },
    /// `time_s` does not increase.
    #[error(
        "line {line}, column `time_s`: {time_s} is not after the previous row's {previous_s}; \
         times must be strictly increasing (by at least 1 ms)"
    )]
    NotIncreasing {
        /// Line of the row.
        line: u64,
        /// Its time.
        time_s: f64,
        /// The previous row's time.
        previous_s: f64,
    },
    /// The CSV itself is malformed (wrong number of cells, invalid UTF-8, read failure).
    #[error("line {line}: {message}")]
    Malformed {
        /// Line where the problem was found (0 when unknown).
        line: u64,
        /// What is wrong and what to fix.
        message: String,
    },
}

impl TraceError {
    /// The 1-based line the error is about, when it is about a line.
    pub fn line(&self) -> Option<u64> {
        match self {
            TraceError::Io { .. } | TraceError::Empty => None,
            TraceError::MissingColumn { line, .. }
            | TraceError::BadValue { line, .. }
            | TraceError::NotIncreasing { line, .. }
            | TraceError::Malformed { line, .. } => Some(*line),
        }
    }
}

/// One CSV row as written.
#[derive(Debug, Deserialize)]
struct RawRow {
    time_s: f64,
    arriving_jobs: f64,
    #[serde(default)]
    p95_s: Option<f64>,
}

/// What to write in `column`.
fn fix_for(column: &str) -> &'static str {
    match column {
        "time_s" => "write the interval start in seconds since trace start (a number from 0 to 1e10, strictly increasing)",
        "arriving_jobs" => "write the number of jobs arriving until the next row (a number from 0 to 1e12)",
        "p95_s" => "write the service-time p95 in seconds (a number from 0 to 31536000) or leave the cell empty",
        _ => "check the cell",
    }
}

fn bad(line: u64, column: &str, problem: String) -> TraceError {
    TraceError::BadValue {
        line,
        column: column.to_owned(),
        problem,
        fix: fix_for(column),
    }
}

/// Checks that `value` is finite and within `0..=max`.
fn check_range(line: u64, column: &str, value: f64, max: f64) -> Result<(), TraceError> {
    if !value.is_finite() {
        return Err(bad(line, column, format!("{value} is not a finite number")));
    }
    if value < 0.0 {
        return Err(bad(line, column, format!("{value} is negative")));
    }
    if value > max {
        return Err(bad(line, column, format!("{value} is larger than {max}")));
    }
    Ok(())
}

/// Turns a csv error into a [`TraceError`] naming the line and, when known, the column.
fn from_csv(
    e: &csv::Error,
    headers: &csv::StringRecord,
    record: Option<&csv::StringRecord>,
) -> TraceError {
    let line = e.position().map_or(0, |p| p.line());
    match e.kind() {
        csv::ErrorKind::Deserialize { err, .. } => {
            let index = err.field().and_then(|f| usize::try_from(f).ok());
            let column = index.and_then(|i| headers.get(i)).unwrap_or("?");
            let cell = index.and_then(|i| record.and_then(|r| r.get(i)));
            let problem = match (err.kind(), cell) {
                (csv::DeserializeErrorKind::ParseFloat(_), Some("")) => {
                    "the cell is empty".to_owned()
                }
                (csv::DeserializeErrorKind::ParseFloat(_), Some(cell)) => {
                    format!("`{cell}` is not a number")
                }
                (kind, _) => kind.to_string(),
            };
            bad(line, column, problem)
        }
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => TraceError::Malformed {
            line,
            message: format!(
                "the row has {len} cells but the header has {expected_len}; give every row one \
                 cell per header column (leave optional cells empty)"
            ),
        },
        csv::ErrorKind::Utf8 { .. } => TraceError::Malformed {
            line,
            message: "the text is not valid UTF-8; save the trace as UTF-8 (or ASCII)".to_owned(),
        },
        _ => TraceError::Malformed {
            line,
            message: format!("cannot read the CSV: {e}"),
        },
    }
}

impl Trace {
    /// Reads a trace from CSV with header `time_s,arriving_jobs[,p95_s]` (extra columns are
    /// ignored, cells are trimmed, `p95_s` cells may be empty).
    ///
    /// Each row says how many jobs arrive from `time_s` (seconds since trace start) until the
    /// next row's `time_s`; the last row lasts as long as the one before it (60 s when it is the
    /// only row). `p95_s` is the service-time p95 (latency without queueing) in that interval.
    pub fn from_reader<R: Read>(reader: R) -> Result<Trace, TraceError> {
        let mut csv = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .from_reader(reader);
        let headers = csv
            .headers()
            .map_err(|e| from_csv(&e, &csv::StringRecord::new(), None))?
            .clone();
        // (No header at all is every name empty, too.)
        if headers.iter().all(str::is_empty) {
            return Err(TraceError::Empty);
        }
        let header_line = headers.position().map_or(1, |p| p.line());
        for column in ["time_s", "arriving_jobs"] {
            if !headers.iter().any(|h| h == column) {
                return Err(TraceError::MissingColumn {
                    line: header_line,
                    column,
                });
            }
        }

        let mut rows: Vec<TraceRow> = Vec::new();
        let mut previous_s = 0.0;
        for record in csv.records() {
            let record = record.map_err(|e| from_csv(&e, &headers, None))?;
            let line = record.position().map_or(0, |p| p.line());
            let raw: RawRow = record
                .deserialize(Some(&headers))
                .map_err(|e| from_csv(&e, &headers, Some(&record)))?;
            check_range(line, "time_s", raw.time_s, MAX_TIME_S)?;
            check_range(line, "arriving_jobs", raw.arriving_jobs, MAX_JOBS)?;
            if let Some(p95) = raw.p95_s {
                check_range(line, "p95_s", p95, MAX_P95_S)?;
            }
            // In range, so the conversion is exact to the millisecond and cannot saturate.
            let time_ms = (raw.time_s * 1000.0).round() as u64;
            if let Some(last) = rows.last() {
                if time_ms <= last.time_ms {
                    return Err(TraceError::NotIncreasing {
                        line,
                        time_s: raw.time_s,
                        previous_s,
                    });
                }
            }
            previous_s = raw.time_s;
            rows.push(TraceRow {
                time_ms,
                arriving_jobs: raw.arriving_jobs,
                p95_s: raw.p95_s,
            });
        }
        if rows.is_empty() {
            return Err(TraceError::Empty);
        }
        Ok(Trace { rows })
    }

    /// Reads a trace from a CSV file; see [`Trace::from_reader`] for the format.
    pub fn from_path(path: &Path) -> Result<Trace, TraceError> {
        let file = std::fs::File::open(path).map_err(|source| TraceError::Io {
            path: path.to_owned(),
            source,
        })?;
        Trace::from_reader(std::io::BufReader::new(file))
    }

    /// Start of the trace (the first row's time), in milliseconds.
    pub(super) fn start_ms(&self) -> u64 {
        self.rows.first().map_or(0, |r| r.time_ms)
    }

    /// End of the last row's interval, in milliseconds.
    pub(super) fn end_ms(&self) -> u64 {
        let n = self.rows.len();
        let last = self.rows.last().map_or(0, |r| r.time_ms);
        let interval = match (
            n.checked_sub(2).and_then(|i| self.rows.get(i)),
            self.rows.last(),
        ) {
            (Some(before), Some(last)) => last.time_ms.saturating_sub(before.time_ms),
            _ => 60_000,
        };
        last.saturating_add(interval.max(1))
    }

    /// End of row `i`'s interval, in milliseconds.
    pub(super) fn row_end_ms(&self, i: usize) -> u64 {
        match self.rows.get(i.saturating_add(1)) {
            Some(next) => next.time_ms,
            None => self.end_ms(),
        }
    }
}

/// Why a timeline could not be written.
#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    /// The CSV encoder or the output failed.
    #[error("writing the timeline CSV: {0}")]
    Csv(#[from] csv::Error),
    /// Flushing the output failed.
    #[error("writing the timeline CSV: {0}")]
    Io(#[from] std::io::Error),
}

/// One tick of a timeline as written.
#[derive(Serialize)]
struct TimelineRow<'a> {
    trace: &'a str,
    policy: &'a str,
    time_s: f64,
    minute: u64,
    queue_observed: f64,
    p95_s: f64,
    violated: bool,
    launched: usize,
    terminated: usize,
    pods: usize,
    running_gpus: u32,
    usd_per_hour: f64,
    served_baseline: f64,
    served_pods: f64,
    queue_after: f64,
}

/// Writes replays' timelines as one CSV for a spreadsheet or a plot: a header, then one row
/// per tick of each replay in order (`trace,policy,time_s,minute,queue_observed,p95_s,violated,
/// launched,terminated,pods,running_gpus,usd_per_hour,served_baseline,served_pods,queue_after`;
/// `time_s` on the trace's clock).
pub struct TimelineWriter<W: Write> {
    csv: csv::Writer<W>,
}

impl<W: Write> TimelineWriter<W> {
    /// A writer to `out` (the header comes with the first row).
    pub fn new(out: W) -> Self {
        TimelineWriter {
            csv: csv::Writer::from_writer(out),
        }
    }

    /// Appends one replay's ticks.
    pub fn write(
        &mut self,
        trace: &str,
        policy: PolicyKind,
        ticks: &[TickRecord],
    ) -> Result<(), TimelineError> {
        let policy = policy.to_string();
        for t in ticks {
            self.csv.serialize(TimelineRow {
                trace,
                policy: &policy,
                time_s: t.at.as_millis() as f64 / 1000.0,
                minute: t.minute,
                queue_observed: t.queue_observed,
                p95_s: t.p95_seconds,
                violated: t.violated,
                launched: t.launched,
                terminated: t.terminated,
                pods: t.pods,
                running_gpus: t.running_gpus,
                usd_per_hour: t.usd_per_hour,
                served_baseline: t.served_baseline,
                served_pods: t.served_pods,
                queue_after: t.queue_after,
            })?;
        }
        Ok(())
    }

    /// Flushes what was written and returns the output.
    pub fn finish(self) -> Result<W, TimelineError> {
        self.csv
            .into_inner()
            .map_err(|e| TimelineError::Io(e.into_error()))
    }
}
