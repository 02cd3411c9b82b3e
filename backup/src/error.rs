//! The one error type of the crate. Messages name files, objects and
//! backups, never key material, credentials or record contents.

use std::fmt;
use std::path::PathBuf;

use salus_audit::AuditError;
use salus_sensitive::secret::SecretError;

/// One thing wrong with a backup, the trail or the destination: what
/// (`manifests/0000000003.json`, `seg-0000000000000002.sealed in backup #3`)
/// and the problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub subject: String,
    pub problem: String,
}

impl Problem {
    pub fn new(subject: impl Into<String>, problem: impl Into<String>) -> Self {
        Problem { subject: subject.into(), problem: problem.into() }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.subject, self.problem)
    }
}

/// Errors of `salus backup`. [`BackupError::exit_code`] maps them to the
/// documented exit codes: 3 when something failed verification (evidence
/// modified, missing, foreign or rolled back), 1 for everything else (2 is
/// the command line parser's: a usage error).
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A key (audit key, backup key) could not be loaded.
    #[error("{what}: {source}")]
    Key {
        what: &'static str,
        #[source]
        source: SecretError,
    },
    /// Local file I/O.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The destination (directory or object store) failed a request.
    #[error("{context}: {message}")]
    Target { context: String, message: String },
    /// Reading the audit trail failed (an integrity failure is exit code 3).
    #[error("{0}")]
    Audit(#[from] AuditError),
    /// A wrong argument or setting.
    #[error("{0}")]
    Invalid(String),
    /// `restore` refuses to write into a directory that holds anything.
    #[error("{} is not empty: restore writes only into a new or empty directory", .0.display())]
    NotEmpty(PathBuf),
    /// The destination holds no backup (or none at or before `--at`).
    #[error("{0}")]
    NoBackup(String),
    /// Verification found problems (all of them are listed).
    #[error("{}", describe(.0))]
    Verification(Vec<Problem>),
}

fn describe(problems: &[Problem]) -> String {
    match problems {
        [] => "verification failed".into(),
        [one] => format!("verification failed: {one}"),
        [first, rest @ ..] => format!("verification failed ({} problems): {first}; …", rest.len() + 1),
    }
}

impl From<salus_audit::IntegrityError> for BackupError {
    fn from(e: salus_audit::IntegrityError) -> Self {
        BackupError::Audit(AuditError::Integrity(e))
    }
}

impl BackupError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        BackupError::Io { context: context.into(), source }
    }

    pub(crate) fn verification(subject: impl Into<String>, problem: impl Into<String>) -> Self {
        BackupError::Verification(vec![Problem::new(subject, problem)])
    }

    /// The process exit code for this error: 3 for a verification failure
    /// (of a backup or of the trail being backed up), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            BackupError::Verification(_) | BackupError::Audit(AuditError::Integrity(_)) => 3,
            _ => 1,
        }
    }

    /// The problems found, for a verification failure.
    pub fn problems(&self) -> &[Problem] {
        match self {
            BackupError::Verification(p) => p,
            _ => &[],
        }
    }
}
