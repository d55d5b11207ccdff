//! Requests to the running gateway from outside its pipeline: `outpost
//! reload` (through the local endpoint, [`crate::http`]) and SIGHUP ask for
//! the configuration file to be read again and applied.
//!
//! The [`Control`] handle sends a request; whoever runs the gateway
//! (`supervisor`) answers it with an [`Outcome`].

use tokio::sync::{mpsc, oneshot};

/// How a reload ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The new configuration runs (its sha256).
    Applied(String),
    /// The file is the configuration that runs already (its sha256).
    Unchanged(String),
    /// The file has problems; nothing changed. One line each.
    Refused(Vec<String>),
    /// The new configuration could not start; the previous one runs again.
    RolledBack(String),
}

impl Outcome {
    /// HTTP status line and body of this outcome.
    pub fn http(&self) -> (&'static str, String) {
        match self {
            Outcome::Applied(sha) => ("200 OK", format!("applied {sha}\n")),
            Outcome::Unchanged(sha) => ("200 OK", format!("unchanged {sha}\n")),
            Outcome::Refused(problems) => (
                "422 Unprocessable Entity",
                format!("refused\n{}\n", problems.join("\n")),
            ),
            Outcome::RolledBack(error) => ("409 Conflict", format!("rolled back: {error}\n")),
        }
    }

    /// The metric label and audit wording of this outcome.
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Applied(_) => "applied",
            Outcome::Unchanged(_) => "unchanged",
            Outcome::Refused(_) => "refused",
            Outcome::RolledBack(_) => "rolled_back",
        }
    }
}

/// A request to read the configuration again; `reply` is answered when the
/// change has been applied, refused or rolled back.
#[derive(Debug)]
pub struct Reload {
    /// Where the outcome goes (none for SIGHUP).
    pub reply: Option<oneshot::Sender<Outcome>>,
}

/// Sends [`Reload`] requests. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Control {
    tx: mpsc::Sender<Reload>,
}

impl Control {
    /// A handle and the receiving end of its requests (at most `capacity`
    /// waiting; more are answered as refused by [`Control::reload`]).
    pub fn new(capacity: usize) -> (Control, mpsc::Receiver<Reload>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Control { tx }, rx)
    }

    /// Ask for a reload and wait for its outcome.
    pub async fn reload(&self) -> Outcome {
        let (reply, outcome) = oneshot::channel();
        if self.tx.try_send(Reload { reply: Some(reply) }).is_err() {
            return Outcome::Refused(vec!["another reload is in progress".into()]);
        }
        outcome
            .await
            .unwrap_or_else(|_| Outcome::Refused(vec!["the gateway is stopping".into()]))
    }

    /// Ask for a reload without waiting (SIGHUP). False when one is pending.
    pub fn request(&self) -> bool {
        self.tx.try_send(Reload { reply: None }).is_ok()
    }
}
