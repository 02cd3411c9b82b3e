//! Automatic session timeout for interactive principals.
//!
//! Why server-side: a JWT's `exp` is set by the identity provider (often an
//! hour or more) and an API key has none, but HIPAA asks that an interactive
//! session end after a period of inactivity. So Salus keeps a session per
//! interactive credential — per OIDC user (and IdP `sid`), per human API key —
//! and ends it after `idle_timeout_secs` without a request or
//! `max_session_secs` after it began.
//!
//! Once a session expired, the credential that held it stays refused
//! (`session_expired`) until the user signs in again: a token issued after the
//! expiry (`iat` at or past it) or of a new IdP session (a new `sid`). A human
//! API key cannot be reissued, so its expired session ends the key's use:
//! create a new key. Sessions live in memory only: a restart ends every one,
//! and a token issued before the restart cannot open a new session (fail
//! closed); a human API key opens a new session after a restart.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

/// The timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionSettings {
    pub idle: Duration,
    pub max: Duration,
    /// Service API keys get sessions too.
    pub service_keys: bool,
}

/// The credential a request presents, as sessions see it.
#[derive(Debug, Clone, Copy)]
pub struct SessionCredential<'a> {
    /// What a session belongs to: `oidc:<principal>` or `key:<key id>`.
    pub key: &'a str,
    /// The principal id (for the records).
    pub principal: &'a str,
    /// When the credential was issued (JWT `iat`), Unix seconds.
    pub issued_at: Option<i64>,
    /// The IdP's session id (JWT `sid`).
    pub sid: Option<&'a str>,
    /// A token from an identity provider (refused when issued before the
    /// server started); an API key is not.
    pub signed_in: bool,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// No request for `idle_timeout_secs`.
    Idle,
    /// `max_session_secs` after it began.
    Absolute,
    /// The user signed in again (a new IdP session).
    Replaced,
    /// The server stopped.
    ServerStopped,
}

impl SessionEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionEnd::Idle => "idle_timeout",
            SessionEnd::Absolute => "max_session_duration",
            SessionEnd::Replaced => "replaced",
            SessionEnd::ServerStopped => "server_stopped",
        }
    }
    /// Expiries are `session.expired`; the others `session.ended`.
    pub fn is_expiry(self) -> bool {
        matches!(self, SessionEnd::Idle | SessionEnd::Absolute)
    }
}

/// A change to record: a session began or ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    Started {
        session: String,
        key: String,
        principal: String,
    },
    Ended {
        session: String,
        key: String,
        principal: String,
        why: SessionEnd,
        started: OffsetDateTime,
        duration: Duration,
    },
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionRejection {
    /// The session timed out (or the server restarted since the token was
    /// issued); sign in again.
    Expired,
}

#[derive(Debug, Clone)]
struct Active {
    id: String,
    principal: String,
    sid: Option<String>,
    started: Instant,
    started_wall: OffsetDateTime,
    last: Instant,
}

#[derive(Debug, Clone)]
enum State {
    Active(Active),
    /// Ended by timeout: credentials issued before `floor` (Unix seconds) stay
    /// refused, and so does the ended IdP session `sid`.
    Expired {
        floor: i64,
        sid: Option<String>,
        at: Instant,
    },
}

/// Every session of this server process.
pub struct Sessions {
    settings: SessionSettings,
    table: Mutex<HashMap<String, State>>,
    /// Unix seconds of server start: tokens issued earlier open no session.
    started_unix: i64,
}

impl Sessions {
    pub fn new(settings: SessionSettings) -> Self {
        Sessions {
            settings,
            table: Mutex::new(HashMap::new()),
            started_unix: OffsetDateTime::now_utc().unix_timestamp(),
        }
    }

    pub fn settings(&self) -> SessionSettings {
        self.settings
    }

    /// A request with `cred` at `now`: continues its session, or opens one
    /// (after ending an expired or replaced one), or is refused. Returns the
    /// events to record, in order.
    pub fn touch(
        &self,
        cred: &SessionCredential<'_>,
        now: Instant,
        wall: OffsetDateTime,
    ) -> Result<Vec<SessionEvent>, (SessionRejection, Vec<SessionEvent>)> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut events = Vec::new();
        if let Some(State::Active(a)) = table.get(cred.key) {
            if let Some(why) = self.expiry(a, now) {
                let (floor, ev) = self.expire(cred.key, a, why, now, wall);
                events.push(ev);
                let sid = a.sid.clone();
                table.insert(cred.key.to_string(), State::Expired { floor, sid, at: now });
            }
        }
        match table.get_mut(cred.key) {
            Some(State::Active(a)) => {
                let new_sid = cred.sid.is_some() && cred.sid != a.sid.as_deref();
                if !new_sid {
                    a.last = now;
                    return Ok(events);
                }
                events.push(ended(cred.key, a, SessionEnd::Replaced, now));
            }
            Some(State::Expired { floor, sid, .. }) => {
                let reissued = cred.issued_at.is_some_and(|iat| iat >= *floor);
                let new_sid = cred.sid.is_some() && cred.sid != sid.as_deref();
                if !(reissued || new_sid) {
                    return Err((SessionRejection::Expired, events));
                }
            }
            None => {
                if cred.signed_in && cred.issued_at.is_some_and(|iat| iat < self.started_unix) {
                    return Err((SessionRejection::Expired, events));
                }
            }
        }
        let id = format!("sess_{}", uuid::Uuid::new_v4().simple());
        events.push(SessionEvent::Started {
            session: id.clone(),
            key: cred.key.to_string(),
            principal: cred.principal.to_string(),
        });
        let active = Active {
            id,
            principal: cred.principal.to_string(),
            sid: cred.sid.map(str::to_string),
            started: now,
            started_wall: wall,
            last: now,
        };
        table.insert(cred.key.to_string(), State::Active(active));
        Ok(events)
    }

    fn expiry(&self, a: &Active, now: Instant) -> Option<SessionEnd> {
        if now.saturating_duration_since(a.started) >= self.settings.max {
            Some(SessionEnd::Absolute)
        } else if now.saturating_duration_since(a.last) >= self.settings.idle {
            Some(SessionEnd::Idle)
        } else {
            None
        }
    }

    /// The floor (the second in which the session expired, Unix seconds: a
    /// token issued in that second or later may open a new session) and the event.
    fn expire(
        &self,
        key: &str,
        a: &Active,
        why: SessionEnd,
        now: Instant,
        wall: OffsetDateTime,
    ) -> (i64, SessionEvent) {
        let deadline = match why {
            SessionEnd::Absolute => a.started + self.settings.max,
            _ => a.last + self.settings.idle,
        };
        let ago = now.saturating_duration_since(deadline);
        let moment = wall - ago;
        let floor = moment.unix_timestamp();
        (floor, ended(key, a, why, deadline.min(now)))
    }

    /// Ends every session past its timeout (a periodic sweep, so an expiry is
    /// recorded even if the user never comes back), and forgets expiries
    /// older than `max_session_secs` (tokens outliving that are not expected).
    pub fn sweep(&self, now: Instant, wall: OffsetDateTime) -> Vec<SessionEvent> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut events = Vec::new();
        let keep_expired = self.settings.max + self.settings.idle;
        for (key, state) in table.iter_mut() {
            if let State::Active(a) = state {
                if let Some(why) = self.expiry(a, now) {
                    let (floor, ev) = self.expire(key, a, why, now, wall);
                    events.push(ev);
                    *state = State::Expired { floor, sid: a.sid.clone(), at: now };
                }
            }
        }
        table.retain(|_, s| match s {
            State::Expired { at, .. } => now.saturating_duration_since(*at) < keep_expired,
            State::Active(_) => true,
        });
        events
    }

    /// Ends every active session (shutdown).
    pub fn end_all(&self, now: Instant) -> Vec<SessionEvent> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let events = table
            .iter()
            .filter_map(|(key, s)| match s {
                State::Active(a) => Some(ended(key, a, SessionEnd::ServerStopped, now)),
                State::Expired { .. } => None,
            })
            .collect();
        table.clear();
        events
    }

    /// Sessions open now.
    pub fn active(&self) -> usize {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.values().filter(|s| matches!(s, State::Active(_))).count()
    }
}

fn ended(key: &str, a: &Active, why: SessionEnd, at: Instant) -> SessionEvent {
    SessionEvent::Ended {
        session: a.id.clone(),
        key: key.to_string(),
        principal: a.principal.clone(),
        why,
        started: a.started_wall,
        duration: at.saturating_duration_since(a.started),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions(idle: u64, max: u64) -> Sessions {
        Sessions::new(SessionSettings {
            idle: Duration::from_secs(idle),
            max: Duration::from_secs(max),
            service_keys: false,
        })
    }

    fn jwt<'a>(key: &'a str, iat: i64, sid: Option<&'a str>) -> SessionCredential<'a> {
        SessionCredential { key, principal: key, issued_at: Some(iat), sid, signed_in: true }
    }

    fn started(evs: &[SessionEvent]) -> usize {
        evs.iter().filter(|e| matches!(e, SessionEvent::Started { .. })).count()
    }

    #[test]
    fn idle_gap_expires_the_session_until_a_token_issued_after_it() {
        let s = sessions(10, 1000);
        let (t0, w0) = (Instant::now(), OffsetDateTime::now_utc());
        let iat = w0.unix_timestamp();
        assert_eq!(started(&s.touch(&jwt("oidc:a", iat, None), t0, w0).unwrap()), 1);
        // Busy: each request within the idle timeout continues the session.
        for i in 1..=5 {
            let t = t0 + Duration::from_secs(8 * i);
            assert!(s.touch(&jwt("oidc:a", iat, None), t, w0 + Duration::from_secs(8 * i)).unwrap().is_empty());
        }
        // 11 s of silence after the last request (t0+40): expired.
        let (t, w) = (t0 + Duration::from_secs(51), w0 + Duration::from_secs(51));
        let (why, evs) = s.touch(&jwt("oidc:a", iat, None), t, w).unwrap_err();
        assert_eq!(why, SessionRejection::Expired);
        assert!(
            matches!(&evs[..], [SessionEvent::Ended { why: SessionEnd::Idle, duration, .. }] if duration.as_secs() == 50)
        );
        // The same token again: still refused, nothing new to record.
        assert_eq!(s.touch(&jwt("oidc:a", iat, None), t, w).unwrap_err().1, vec![]);
        // A token issued before the expiry moment (t0+50): refused; at or after: a new session.
        assert!(s.touch(&jwt("oidc:a", iat + 49, None), t, w).is_err());
        assert_eq!(started(&s.touch(&jwt("oidc:a", iat + 50, None), t, w).unwrap()), 1);
        assert_eq!(s.active(), 1);
    }

    #[test]
    fn absolute_timeout_ends_a_busy_session_and_a_new_sid_reopens() {
        let s = sessions(10, 30);
        let (t0, w0) = (Instant::now(), OffsetDateTime::now_utc());
        let iat = w0.unix_timestamp();
        s.touch(&jwt("oidc:b", iat, Some("s1")), t0, w0).unwrap();
        for i in 1..=5u64 {
            let r = s.touch(&jwt("oidc:b", iat, Some("s1")), t0 + Duration::from_secs(5 * i), w0);
            assert!(r.is_ok(), "request {i}");
        }
        let t = t0 + Duration::from_secs(31);
        let (_, evs) = s.touch(&jwt("oidc:b", iat, Some("s1")), t, w0 + Duration::from_secs(31)).unwrap_err();
        assert!(matches!(&evs[..], [SessionEvent::Ended { why: SessionEnd::Absolute, .. }]));
        // A new IdP session (sid), even with an old iat, opens a new one.
        assert_eq!(started(&s.touch(&jwt("oidc:b", iat, Some("s2")), t, w0).unwrap()), 1);
        // And a different sid on an active session replaces it.
        let evs = s.touch(&jwt("oidc:b", iat, Some("s3")), t, w0).unwrap();
        assert!(matches!(&evs[0], SessionEvent::Ended { why: SessionEnd::Replaced, .. }));
        assert_eq!(started(&evs), 1);
    }

    #[test]
    fn tokens_from_before_the_start_and_expired_keys_are_refused() {
        let s = sessions(10, 100);
        let (t0, w0) = (Instant::now(), OffsetDateTime::now_utc());
        assert!(s.touch(&jwt("oidc:c", s.started_unix - 5, None), t0, w0).is_err(), "issued before the restart");
        let key = SessionCredential { key: "key:k1", principal: "k", issued_at: None, sid: None, signed_in: false };
        assert_eq!(started(&s.touch(&key, t0, w0).unwrap()), 1);
        let later = t0 + Duration::from_secs(11);
        assert!(s.touch(&key, later, w0).is_err(), "an API key is not reissued");
        assert!(s.touch(&key, later + Duration::from_secs(100), w0).is_err());
    }

    #[test]
    fn sweep_records_expiries_and_shutdown_ends_the_rest() {
        let s = sessions(10, 100);
        let (t0, w0) = (Instant::now(), OffsetDateTime::now_utc());
        let iat = w0.unix_timestamp();
        s.touch(&jwt("oidc:d", iat, None), t0, w0).unwrap();
        s.touch(&jwt("oidc:e", iat, None), t0 + Duration::from_secs(5), w0).unwrap();
        let evs = s.sweep(t0 + Duration::from_secs(12), w0 + Duration::from_secs(12));
        assert_eq!(evs.len(), 1);
        assert!(matches!(&evs[0], SessionEvent::Ended { key, why: SessionEnd::Idle, .. } if key == "oidc:d"));
        let evs = s.end_all(t0 + Duration::from_secs(13));
        assert!(matches!(&evs[..], [SessionEvent::Ended { why: SessionEnd::ServerStopped, .. }]));
        assert_eq!(s.active(), 0);
    }
}
