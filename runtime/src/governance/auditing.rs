//! The audit log as the stages share it, and the one way they write to it.

use std::sync::Arc;

use crate::metrics::Metrics;

/// The audit log, shared by the stages that write to it.
pub type SharedAudit = Arc<std::sync::Mutex<crate::audit::AuditLog>>;

/// Append entries to the audit log and commit them; a failure is logged and
/// counted, never fatal (the gateway keeps running without a record rather
/// than stopping the data). Returns whether the entries are on disk (true
/// without an audit log).
pub fn audit(
    audit: &Option<SharedAudit>,
    metrics: &Metrics,
    entries: &[(&str, serde_json::Value)],
) -> bool {
    let Some(a) = audit else { return true };
    let mut log = a.lock().unwrap_or_else(|e| e.into_inner());
    let r = entries
        .iter()
        .try_for_each(|(kind, data)| log.append(kind, data.clone()).map(|_| ()))
        .and_then(|_| log.commit());
    match r {
        Ok(()) => {
            metrics.audit_entries.inc_by(entries.len() as u64);
            metrics.set_audit_head(log.committed());
            true
        }
        Err(e) => {
            metrics.audit_errors.inc();
            tracing::error!(error = %e, "cannot write the audit log");
            false
        }
    }
}
