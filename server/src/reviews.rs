//! Which recent inferences can be reviewed, and which were.
//!
//! Why an index in memory: a review names a response id (`chatcmpl-<request
//! id>`), and must be linked to that inference's `inference.completed` record
//! (its sequence number and event id) and refused when the inference is
//! another principal's or older than `reviews.lookup_window_secs`. The trail
//! is the source of truth but is encrypted and sequential; so each completed
//! inference is entered here when its record is written, and at start-up the
//! index is rebuilt from the trail (the window's completions and reviews) in
//! the background. Until the rebuild is done a lookup that misses waits for
//! it (bounded), so a review of a pre-restart inference is not refused early.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use time::OffsetDateTime;

/// One completed inference that can be reviewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewable {
    pub principal: String,
    /// Sequence number and event id of its `inference.completed` record.
    pub seq: u64,
    pub event_id: String,
    pub completed: OffsetDateTime,
    /// `chat.completions` or `completions`.
    pub operation: String,
    /// Reviews recorded per choice (one entry per choice: prompts × `n`).
    pub reviews: Vec<u32>,
}

impl Reviewable {
    /// A completion with `choices` choices, none reviewed yet.
    pub fn new(
        principal: String,
        seq: u64,
        event_id: String,
        completed: OffsetDateTime,
        operation: String,
        choices: u32,
    ) -> Self {
        Reviewable { principal, seq, event_id, completed, operation, reviews: vec![0; choices as usize] }
    }

    /// The number of choices.
    pub fn choices(&self) -> u32 {
        self.reviews.len() as u32
    }

    pub fn unreviewed(&self) -> Vec<u32> {
        (0..self.choices()).filter(|c| self.reviews[*c as usize] == 0).collect()
    }
}

/// Why a review cannot be linked (all answered alike: 404).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupMiss {
    NotFound,
    /// The index is still being rebuilt and the id was not found yet.
    Loading,
}

#[derive(Default)]
struct Table {
    by_request: HashMap<String, Reviewable>,
    /// (completion time, request id), for expiry.
    by_time: BTreeSet<(OffsetDateTime, String)>,
    /// Most entries held (oldest dropped first).
    capacity: usize,
}

/// The review index of this server.
pub struct ReviewIndex {
    table: Mutex<Table>,
    window: Duration,
    loaded: tokio::sync::watch::Sender<bool>,
    /// The `reason_code`s a review may give (`reviews.reason_codes`).
    reason_codes: Vec<String>,
}

impl ReviewIndex {
    /// An index keeping completions for `window`, at most `capacity` of them.
    /// `loaded`: false while a rebuild from the trail is pending.
    pub fn new(window: Duration, capacity: usize, loaded: bool) -> Self {
        let (tx, _) = tokio::sync::watch::channel(loaded);
        ReviewIndex {
            table: Mutex::new(Table { capacity, ..Table::default() }),
            window,
            loaded: tx,
            reason_codes: Vec::new(),
        }
    }

    /// The same index accepting these reason codes.
    pub fn with_reason_codes(mut self, codes: Vec<String>) -> Self {
        self.reason_codes = codes;
        self
    }

    pub fn reason_codes(&self) -> &[String] {
        &self.reason_codes
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    fn cutoff(&self, now: OffsetDateTime) -> OffsetDateTime {
        now - self.window
    }

    /// A completed inference (its `inference.completed` just became durable).
    pub fn completed(&self, request_id: &str, entry: Reviewable) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let key = (entry.completed, request_id.to_string());
        if let Some(old) = t.by_request.insert(request_id.to_string(), entry) {
            t.by_time.remove(&(old.completed, request_id.to_string()));
        }
        t.by_time.insert(key);
        let cutoff = self.cutoff(OffsetDateTime::now_utc());
        while let Some((when, id)) = t.by_time.first().cloned() {
            if when >= cutoff && t.by_time.len() <= t.capacity {
                break;
            }
            t.by_time.remove(&(when, id.clone()));
            t.by_request.remove(&id);
        }
    }

    /// A review was recorded for `choice` of `request_id`.
    pub fn reviewed(&self, request_id: &str, choice: u32) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = t.by_request.get_mut(request_id) {
            if let Some(n) = e.reviews.get_mut(choice as usize) {
                *n += 1;
            }
        }
    }

    /// The inference `request_id` if `principal` may review it now.
    pub fn lookup(&self, request_id: &str, principal: &str) -> Result<Reviewable, LookupMiss> {
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match t.by_request.get(request_id) {
            Some(e) if e.principal == principal && e.completed >= self.cutoff(OffsetDateTime::now_utc()) => {
                Ok(e.clone())
            }
            Some(_) => Err(LookupMiss::NotFound),
            None if !*self.loaded.borrow() => Err(LookupMiss::Loading),
            None => Err(LookupMiss::NotFound),
        }
    }

    /// [`Self::lookup`], waiting up to `wait` for a pending rebuild.
    pub async fn lookup_waiting(
        &self,
        request_id: &str,
        principal: &str,
        wait: Duration,
    ) -> Result<Reviewable, LookupMiss> {
        match self.lookup(request_id, principal) {
            Err(LookupMiss::Loading) => {
                let mut rx = self.loaded.subscribe();
                let _ = tokio::time::timeout(wait, rx.wait_for(|l| *l)).await;
                self.lookup(request_id, principal)
            }
            other => other,
        }
    }

    /// `principal`'s completions since `since` with a choice not yet reviewed,
    /// oldest first, at most `limit`.
    pub fn pending(&self, principal: &str, since: Option<OffsetDateTime>, limit: usize) -> Vec<(String, Reviewable)> {
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let from = since.unwrap_or(OffsetDateTime::UNIX_EPOCH).max(self.cutoff(OffsetDateTime::now_utc()));
        t.by_time
            .iter()
            .filter(|(when, _)| *when >= from)
            .filter_map(|(_, id)| t.by_request.get(id).map(|e| (id, e)))
            .filter(|(_, e)| e.principal == principal && !e.unreviewed().is_empty())
            .take(limit)
            .map(|(id, e)| (id.clone(), e.clone()))
            .collect()
    }

    pub fn is_loaded(&self) -> bool {
        *self.loaded.borrow()
    }

    /// Rebuilds from trail records (in order): the window's completions, then
    /// the reviews recorded for them. Marks the index loaded.
    pub fn load_from<'a>(&self, records: impl IntoIterator<Item = &'a salus_audit::AuditRecord>) {
        let cutoff = self.cutoff(OffsetDateTime::now_utc());
        let mut reviews = Vec::new();
        for r in records {
            match r.kind.as_str() {
                "inference.completed" => {
                    let Some(entry) = reviewable_of(r) else { continue };
                    if entry.completed >= cutoff {
                        let id = r.request_id.clone().unwrap_or_default();
                        self.completed(&id, entry);
                    }
                }
                "review.recorded" => {
                    let d = r.detail.as_ref();
                    let id = d.and_then(|d| d.get("reviewed_request_id")).and_then(|v| v.as_str());
                    let choice = d.and_then(|d| d.get("choice")).and_then(|v| v.as_u64());
                    if let (Some(id), Some(choice)) = (id, choice) {
                        reviews.push((id.to_string(), choice as u32));
                    }
                }
                _ => {}
            }
        }
        for (id, choice) in reviews {
            self.reviewed(&id, choice);
        }
        self.loaded.send_replace(true);
    }

    /// Marks the index loaded without records (the rebuild failed: only new
    /// completions can be reviewed; logged by the caller).
    pub fn give_up_loading(&self) {
        self.loaded.send_replace(true);
    }
}

/// The reviewable facts of an `inference.completed` record.
fn reviewable_of(r: &salus_audit::AuditRecord) -> Option<Reviewable> {
    let principal = r.principal.as_ref()?.id.clone();
    let completed = salus_audit::RecordFilter::parse_time(&r.time).ok()?;
    let choices = r
        .detail
        .as_ref()
        .and_then(|d| d.get("choices"))
        .and_then(|v| v.as_u64())
        .or_else(|| r.params.as_ref().and_then(|p| p.n).map(u64::from))
        .unwrap_or(1)
        .min(u32::MAX as u64) as u32;
    Some(Reviewable::new(
        principal,
        r.seq,
        r.event_id.clone(),
        completed,
        r.operation.clone().unwrap_or_default(),
        choices,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(principal: &str, seq: u64, age: Duration, choices: u32) -> Reviewable {
        let completed = OffsetDateTime::now_utc() - age;
        Reviewable::new(principal.into(), seq, format!("ev-{seq}"), completed, "chat.completions".into(), choices)
    }

    #[test]
    fn lookups_are_per_principal_and_within_the_window() {
        let idx = ReviewIndex::new(Duration::from_secs(3600), 100, true);
        idx.completed("req_a", entry("alice", 10, Duration::ZERO, 2));
        idx.completed("req_old", entry("alice", 11, Duration::from_secs(7200), 1));
        assert_eq!(idx.lookup("req_a", "alice").unwrap().seq, 10);
        assert_eq!(idx.lookup("req_a", "mallory"), Err(LookupMiss::NotFound));
        assert_eq!(idx.lookup("req_old", "alice"), Err(LookupMiss::NotFound), "expired entries are dropped");
        assert_eq!(idx.lookup("req_none", "alice"), Err(LookupMiss::NotFound));
        assert_eq!(idx.pending("alice", None, 10).len(), 1);
        idx.reviewed("req_a", 0);
        assert_eq!(idx.pending("alice", None, 10)[0].1.unreviewed(), vec![1]);
        idx.reviewed("req_a", 1);
        assert!(idx.pending("alice", None, 10).is_empty());
        assert!(idx.pending("mallory", None, 10).is_empty());
    }

    #[test]
    fn capacity_drops_the_oldest_and_loading_defers_misses() {
        let idx = ReviewIndex::new(Duration::from_secs(3600), 3, false);
        for i in 0..5u64 {
            idx.completed(&format!("req_{i}"), entry("p", i, Duration::from_secs(100 - i), 1));
        }
        assert_eq!(idx.lookup("req_0", "p"), Err(LookupMiss::Loading), "not found yet: the rebuild may have it");
        assert!(idx.lookup("req_4", "p").is_ok());
        idx.load_from(std::iter::empty());
        assert_eq!(idx.lookup("req_0", "p"), Err(LookupMiss::NotFound));
        assert_eq!(idx.pending("p", None, 10).len(), 3);
    }
}
