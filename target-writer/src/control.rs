//! The local control protocol of `serve`: a Unix socket `control.sock` in the
//! store root through which the command line asks the running service for
//! what needs the stores it holds locked: exporting a recovery point, and
//! making a test failover of one, failing one over and committing that.
//!
//! Newline-delimited JSON, one request per connection:
//!
//! ```text
//! → {"export":{"disk":"…","point":3,"format":"vmdk-sparse","out":"/abs/p3.vmdk","parent":null}}
//! ← {"progress":{"done":4194304,"total":1073741824}}      (rate-limited)
//! ← {"done":{"files":["/abs/p3.vmdk"]}}  or  {"error":"…"}
//!
//! → {"test_failover":{"disk":"…","point":"latest","out":"/abs/dir","attach":true}}
//! ← {"test_failover":{…the record, see crate::failover::TestFailover…}}  or  {"error":"…"}
//!
//! → {"failover":{"disk":"…","point":"latest","out":"/abs/dir","attach":false,
//!                "force":false,"planned":false,"discard_writes":false}}
//! ← {"failover":{…the record, see crate::failover::Failover…}}  or  {"error":"…"}
//!
//! → {"commit":{"disk":"…"}}
//! ← {"failover":{…the committed record…}}  or  {"error":"…"}
//! ```
//!
//! `force` (export, test failover and failover, default false) allows a
//! point cut while the replica was incomplete.
//!
//! Paths are absolute: the service runs in another directory than the
//! client. This module holds the message types, the decoders (which never
//! panic: a bad line is a typed error, answered with `{"error":…}`), the
//! progress rate limit, and the small blocking client the command line uses.
//! The server side lives in [`crate::serve`].

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::export::ExportFormat;
use crate::failover::{
    CommitRequest, Failover, FailoverRequest, TestFailover, TestFailoverRequest,
};

/// File name of the control socket in the store root.
pub const SOCKET: &str = "control.sock";

/// Longest request line accepted; a request is a few hundred bytes.
pub const MAX_REQUEST: usize = 64 << 10;

/// Progress is sent at most this often, unless a whole percent went by.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// The path of the control socket of the store at `root`.
pub fn socket_path(root: &Path) -> PathBuf {
    root.join(SOCKET)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Request {
    Export(ExportRequest),
    TestFailover(TestFailoverRequest),
    Promote(PromoteRequest),
    Failover(FailoverRequest),
    Commit(CommitRequest),
}

/// Promote the replica of `disk` (the promote step of a failover).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    pub disk: String,
}

/// Export point `point` of `disk` as `format` to `out` (absolute), as a
/// delta on the earlier export `parent` (absolute) if given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    pub disk: String,
    pub point: u64,
    pub format: ExportFormat,
    pub out: PathBuf,
    #[serde(default)]
    pub parent: Option<PathBuf>,
    /// Export a point cut while the replica was incomplete.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Reply {
    Progress { done: u64, total: u64 },
    Done { files: Vec<PathBuf> },
    TestFailover(TestFailover),
    Promoted(crate::promote::Promoted),
    Failover(Failover),
    Error(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("request longer than {max} bytes")]
    TooLong { max: usize },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("{what} {path:?} is not absolute: the service runs in another directory")]
    NotAbsolute { what: &'static str, path: PathBuf },
    #[error("bad reply from the service: {0}")]
    BadReply(String),
    #[error(
        "no control socket answers at {path}: start `blockferry-target serve` for this store, or stop whatever else holds it"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the service at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the service at {path} closed the connection without an answer; see its log")]
    Closed { path: PathBuf },
    #[error("the service failed: {0}")]
    Service(String),
}

/// One message as a line.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail; an empty object would be
    // answered as a bad message rather than lost silently.
    let mut v = serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec());
    v.push(b'\n');
    v
}

/// Decodes and validates one request line (with or without its newline).
pub fn decode_request(line: &[u8]) -> Result<Request, ControlError> {
    if line.len() > MAX_REQUEST {
        return Err(ControlError::TooLong { max: MAX_REQUEST });
    }
    let req: Request =
        serde_json::from_slice(line).map_err(|e| ControlError::BadRequest(e.to_string()))?;
    let (out, parent) = match &req {
        Request::Export(r) => (&r.out, r.parent.as_ref()),
        Request::TestFailover(r) => (&r.out, None),
        Request::Failover(r) => (&r.out, None),
        Request::Promote(_) | Request::Commit(_) => return Ok(req),
    };
    if !out.is_absolute() {
        return Err(ControlError::NotAbsolute {
            what: "out",
            path: out.clone(),
        });
    }
    if let Some(p) = parent
        && !p.is_absolute()
    {
        return Err(ControlError::NotAbsolute {
            what: "parent",
            path: p.clone(),
        });
    }
    Ok(req)
}

pub fn decode_reply(line: &[u8]) -> Result<Reply, ControlError> {
    serde_json::from_slice(line).map_err(|e| ControlError::BadReply(e.to_string()))
}

/// Decides which progress updates go out: the last one, one per whole
/// percent, and otherwise at most one per [`PROGRESS_INTERVAL`].
#[derive(Debug, Clone)]
pub struct ProgressThrottle {
    last_at: Option<Instant>,
    last_pct: u64,
}

impl Default for ProgressThrottle {
    fn default() -> Self {
        Self::new()
    }
}

impl ProgressThrottle {
    pub fn new() -> Self {
        ProgressThrottle {
            last_at: None,
            last_pct: 0,
        }
    }

    pub fn due(&mut self, done: u64, total: u64, now: Instant) -> bool {
        let pct = (u128::from(done) * 100 / u128::from(total.max(1))) as u64;
        let due = done >= total
            || pct > self.last_pct
            || self
                .last_at
                .is_none_or(|t| now.duration_since(t) >= PROGRESS_INTERVAL);
        if due {
            self.last_at = Some(now);
            self.last_pct = pct;
        }
        due
    }
}

/// Asks the service listening at `socket` to export; calls `progress` for
/// each progress reply and returns the files written.
pub fn request_export(
    socket: &Path,
    req: &ExportRequest,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<PathBuf>, ControlError> {
    match request(socket, &Request::Export(req.clone()), progress)? {
        Reply::Done { files } => Ok(files),
        other => Err(ControlError::BadReply(format!(
            "{other:?} as the answer to an export"
        ))),
    }
}

/// Asks the service listening at `socket` for a test failover; returns its record.
pub fn request_test_failover(
    socket: &Path,
    req: &TestFailoverRequest,
) -> Result<TestFailover, ControlError> {
    match request(socket, &Request::TestFailover(req.clone()), &mut |_, _| {})? {
        Reply::TestFailover(rec) => Ok(rec),
        other => Err(ControlError::BadReply(format!(
            "{other:?} as the answer to a test failover"
        ))),
    }
}

/// Asks the service listening at `socket` to promote a disk it holds.
pub fn request_promote(
    socket: &Path,
    req: &PromoteRequest,
) -> Result<crate::promote::Promoted, ControlError> {
    match request(socket, &Request::Promote(req.clone()), &mut |_, _| {})? {
        Reply::Promoted(p) => Ok(p),
        other => Err(ControlError::BadReply(format!(
            "{other:?} as the answer to a promotion"
        ))),
    }
}

/// Asks the service listening at `socket` to fail a disk it holds over
/// (or to finish or move that failover); returns its record.
pub fn request_failover(socket: &Path, req: &FailoverRequest) -> Result<Failover, ControlError> {
    match request(socket, &Request::Failover(req.clone()), &mut |_, _| {})? {
        Reply::Failover(rec) => Ok(rec),
        other => Err(ControlError::BadReply(format!(
            "{other:?} as the answer to a failover"
        ))),
    }
}

/// Asks the service listening at `socket` to commit a disk's failover.
pub fn request_commit(socket: &Path, req: &CommitRequest) -> Result<Failover, ControlError> {
    match request(socket, &Request::Commit(req.clone()), &mut |_, _| {})? {
        Reply::Failover(rec) => Ok(rec),
        other => Err(ControlError::BadReply(format!(
            "{other:?} as the answer to a commit"
        ))),
    }
}

/// Sends one request and returns the final answer (not an error), calling
/// `progress` for each progress reply.
fn request(
    socket: &Path,
    req: &Request,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Reply, ControlError> {
    let io = |source| ControlError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    stream.write_all(&encode(req)).map_err(io)?;
    let mut r = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).map_err(io)? == 0 {
            return Err(ControlError::Closed {
                path: socket.to_path_buf(),
            });
        }
        match decode_reply(&line)? {
            Reply::Progress { done, total } => progress(done, total),
            Reply::Error(msg) => return Err(ControlError::Service(msg)),
            last => return Ok(last),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_round_trips_and_matches_the_documented_form() {
        let line = br#"{"export":{"disk":"d","point":3,"format":"vmdk-sparse","out":"/x/p3.vmdk","parent":null}}"#;
        let req = decode_request(line).unwrap();
        assert_eq!(
            req,
            Request::Export(ExportRequest {
                disk: "d".into(),
                point: 3,
                format: ExportFormat::VmdkSparse,
                out: "/x/p3.vmdk".into(),
                parent: None,
                force: false,
            })
        );
        let again = encode(&req);
        assert_eq!(decode_request(&again).unwrap(), req);
        assert_eq!(
            encode(&Reply::Progress { done: 1, total: 2 }),
            b"{\"progress\":{\"done\":1,\"total\":2}}\n"
        );
        assert_eq!(encode(&Reply::Error("no".into())), b"{\"error\":\"no\"}\n");
        assert_eq!(
            encode(&Reply::Done {
                files: vec!["/a".into()]
            }),
            b"{\"done\":{\"files\":[\"/a\"]}}\n"
        );
    }

    #[test]
    fn a_test_failover_request_round_trips_and_matches_the_documented_form() {
        use crate::failover::PointChoice;
        let line =
            br#"{"test_failover":{"disk":"d","point":"latest","out":"/abs/dir","attach":true}}"#;
        let req = decode_request(line).unwrap();
        assert_eq!(
            req,
            Request::TestFailover(TestFailoverRequest {
                disk: "d".into(),
                point: PointChoice::Latest,
                out: "/abs/dir".into(),
                attach: true,
                force: false,
            })
        );
        assert_eq!(decode_request(&encode(&req)).unwrap(), req);
        let by_id = br#"{"test_failover":{"disk":"d","point":"7","out":"/o","force":true}}"#;
        let Request::TestFailover(r) = decode_request(by_id).unwrap() else {
            panic!("not a test failover");
        };
        assert_eq!((r.point, r.force), (PointChoice::Id(7), true));
    }

    #[test]
    fn failover_and_commit_requests_round_trip_and_match_the_documented_form() {
        use crate::failover::PointChoice;
        let line = br#"{"failover":{"disk":"d","point":"3","out":"/abs/dir","attach":false,"force":false,"planned":true,"discard_writes":true}}"#;
        let req = decode_request(line).unwrap();
        assert_eq!(
            req,
            Request::Failover(FailoverRequest {
                disk: "d".into(),
                point: PointChoice::Id(3),
                out: "/abs/dir".into(),
                attach: false,
                force: false,
                planned: true,
                discard_writes: true,
            })
        );
        assert_eq!(decode_request(&encode(&req)).unwrap(), req);
        let short = br#"{"failover":{"disk":"d","point":"latest","out":"/o"}}"#;
        let Request::Failover(r) = decode_request(short).unwrap() else {
            panic!("not a failover");
        };
        assert!(!r.planned && !r.discard_writes && !r.attach && !r.force);
        let commit = br#"{"commit":{"disk":"d"}}"#;
        assert_eq!(
            decode_request(commit).unwrap(),
            Request::Commit(CommitRequest { disk: "d".into() })
        );
        for bad in [
            &br#"{"failover":{"disk":"d","point":"latest","out":"rel"}}"#[..],
            br#"{"failover":{"disk":"d","point":"latest"}}"#,
            br#"{"commit":{"disk":"d","point":1}}"#,
        ] {
            assert!(decode_request(bad).is_err());
        }
    }

    #[test]
    fn bad_requests_are_typed_errors() {
        let bad: &[&[u8]] = &[
            b"",
            b"\xff\xfe",
            b"{",
            b"null",
            b"[]",
            b"{}",
            br#"{"export":{}}"#,
            br#"{"import":{"disk":"d","point":1,"format":"raw","out":"/o"}}"#,
            br#"{"export":{"disk":"d","point":1,"format":"raw","out":"/o","extra":1}}"#,
            br#"{"export":{"disk":"d","point":1,"format":"raw","out":"/o"},"x":1}"#,
            br#"{"export":{"disk":"d","point":-1,"format":"raw","out":"/o"}}"#,
            br#"{"export":{"disk":"d","point":1,"format":"qcow2","out":"/o"}}"#,
            br#"{"export":{"disk":"d","point":1,"format":"raw","out":"rel/o"}}"#,
            br#"{"export":{"disk":"d","point":1,"format":"raw","out":"/o","parent":"p.vmdk"}}"#,
            br#"{"test_failover":{"disk":"d","point":"newest","out":"/o"}}"#,
            br#"{"test_failover":{"disk":"d","point":"latest","out":"o"}}"#,
            br#"{"test_failover":{"disk":"d","point":"latest"}}"#,
            br#"{"test_failover":{"disk":"d","point":"1","out":"/o","force":1}}"#,
        ];
        for line in bad {
            assert!(
                decode_request(line).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(line)
            );
        }
        let long = vec![b' '; MAX_REQUEST + 1];
        assert!(matches!(
            decode_request(&long),
            Err(ControlError::TooLong { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn the_decoders_never_panic(line in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = decode_request(&line);
            let _ = decode_reply(&line);
        }
    }

    #[test]
    fn progress_goes_out_per_percent_per_interval_and_at_the_end() {
        let mut t = ProgressThrottle::new();
        let t0 = Instant::now();
        assert!(t.due(0, 1000, t0), "the first update goes out");
        assert!(!t.due(5, 1000, t0), "less than a percent, no time passed");
        assert!(t.due(10, 1000, t0), "a whole percent");
        assert!(!t.due(11, 1000, t0));
        assert!(
            t.due(12, 1000, t0 + PROGRESS_INTERVAL),
            "the interval passed"
        );
        assert!(t.due(1000, 1000, t0 + PROGRESS_INTERVAL), "the end");
    }
}
