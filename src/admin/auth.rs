//! Who may use the dashboard: the holder of the operator token (`admin_token`), presented as
//! `Authorization: Bearer <token>` or once through the login form, which opens a cookie session
//! (`HttpOnly; SameSite=Strict`). Every action (POST) also carries a CSRF token tied to that
//! cookie session or to the bearer token.
//!
//! Invariants: tokens are compared in constant time (as SHA-256 digests, so their lengths do not
//! leak either); a session opened with one token ends when the configured token changes (a
//! reload); without a configured token nothing here authenticates anyone; no tenant key is
//! ever accepted.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::http::Request;

/// The session cookie's name.
pub const COOKIE: &str = "struere_admin";
/// How long a login lasts.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Open sessions kept at most (the oldest go first).
const MAX_SESSIONS: usize = 256;

fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        // Length-prefixed, so two part lists never hash alike.
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// Constant-time equality of two secrets of any length.
pub fn same_secret(a: &str, b: &str) -> bool {
    digest(&[a.as_bytes()]).ct_eq(&digest(&[b.as_bytes()])).into()
}

fn random_hex() -> Result<String, String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| e.to_string())?;
    Ok(hex::encode(b))
}

struct Session {
    /// Digest of the token it was opened with.
    token: [u8; 32],
    csrf: String,
    expires: Instant,
}

/// The admin endpoint's authentication state (per process).
pub struct AdminAuth {
    /// Keyed by the digest of the cookie value (the value itself is not kept).
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    /// Random per process: bearer CSRF tokens derive from it.
    secret: [u8; 32],
}

/// An authenticated request's credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operator {
    Bearer { csrf: String },
    Cookie { csrf: String, session: [u8; 32] },
}

impl Operator {
    /// The CSRF token actions of this operator must carry.
    pub fn csrf(&self) -> &str {
        match self {
            Operator::Bearer { csrf } | Operator::Cookie { csrf, .. } => csrf,
        }
    }

    /// Whether `presented` is this operator's CSRF token.
    pub fn csrf_matches(&self, presented: Option<&str>) -> bool {
        presented.is_some_and(|p| same_secret(p, self.csrf()))
    }
}

/// Why a request is not an operator's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No token is configured: the dashboard is off.
    Off,
    /// A bearer token that is not the operator token (or a malformed Authorization header).
    WrongToken,
    /// No credential (or an unknown, expired or outdated session).
    Anonymous,
}

impl AdminAuth {
    pub fn new() -> Result<AdminAuth, String> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| e.to_string())?;
        Ok(AdminAuth { sessions: Mutex::new(HashMap::new()), secret })
    }

    fn bearer_csrf(&self, token: &str) -> String {
        hex::encode(digest(&[b"struere-admin-csrf", &self.secret, token.as_bytes()]))
    }

    /// Who sent `req`, given the token configured now.
    pub fn check(&self, req: &Request, configured: Option<&str>) -> Result<Operator, Denied> {
        let configured = configured.ok_or(Denied::Off)?;
        if let Some(auth) = req.header("authorization") {
            let presented = auth.strip_prefix("Bearer ").ok_or(Denied::WrongToken)?;
            return if same_secret(presented.trim(), configured) {
                Ok(Operator::Bearer { csrf: self.bearer_csrf(configured) })
            } else {
                Err(Denied::WrongToken)
            };
        }
        let cookie = req.cookie(COOKIE).ok_or(Denied::Anonymous)?;
        let key = digest(&[cookie.as_bytes()]);
        let token = digest(&[configured.as_bytes()]);
        let mut sessions = self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match sessions.get(&key) {
            Some(s) if s.expires > Instant::now() && bool::from(s.token.ct_eq(&token)) => {
                Ok(Operator::Cookie { csrf: s.csrf.clone(), session: key })
            }
            Some(_) => {
                sessions.remove(&key);
                Err(Denied::Anonymous)
            }
            None => Err(Denied::Anonymous),
        }
    }

    /// The login form: open a session when `presented` is the configured token. Returns the
    /// cookie value.
    pub fn login(&self, presented: &str, configured: Option<&str>) -> Result<String, Denied> {
        let configured = configured.ok_or(Denied::Off)?;
        if !same_secret(presented, configured) {
            return Err(Denied::WrongToken);
        }
        let (value, csrf) = match (random_hex(), random_hex()) {
            (Ok(v), Ok(c)) => (v, c),
            _ => return Err(Denied::Off),
        };
        let now = Instant::now();
        let mut sessions = self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        sessions.retain(|_, s| s.expires > now);
        while sessions.len() >= MAX_SESSIONS {
            let oldest = sessions.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k);
            match oldest {
                Some(k) => sessions.remove(&k),
                None => break,
            };
        }
        let session = Session { token: digest(&[configured.as_bytes()]), csrf, expires: now + SESSION_LIFETIME };
        sessions.insert(digest(&[value.as_bytes()]), session);
        Ok(value)
    }

    /// End a cookie session.
    pub fn logout(&self, op: &Operator) {
        if let Operator::Cookie { session, .. } = op {
            self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(session);
        }
    }
}

/// The `set-cookie` value that opens a session.
pub fn session_cookie(value: &str) -> String {
    format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}", SESSION_LIFETIME.as_secs())
}

/// The `set-cookie` value that ends it.
pub fn cleared_cookie() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::http::Method;

    fn req(headers: &[(&str, &str)]) -> Request {
        Request {
            method: Method::Get,
            path: "/dashboard".into(),
            query: String::new(),
            headers: headers.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect(),
            body: Vec::new(),
        }
    }

    const TOKEN: &str = "operator-token-0123456789";

    #[test]
    fn bearer_and_cookie_sessions() {
        let auth = AdminAuth::new().unwrap();
        assert_eq!(auth.check(&req(&[]), None), Err(Denied::Off));
        assert_eq!(auth.check(&req(&[("authorization", "Bearer x")]), None), Err(Denied::Off));
        assert_eq!(auth.check(&req(&[]), Some(TOKEN)), Err(Denied::Anonymous));
        let bearer = format!("Bearer {TOKEN}");
        let op = auth.check(&req(&[("authorization", &bearer)]), Some(TOKEN)).unwrap();
        assert!(matches!(op, Operator::Bearer { .. }));
        assert!(op.csrf_matches(Some(op.csrf())) && !op.csrf_matches(None) && !op.csrf_matches(Some("x")));
        for wrong in ["Bearer nope", "Basic abc", TOKEN] {
            assert_eq!(auth.check(&req(&[("authorization", wrong)]), Some(TOKEN)), Err(Denied::WrongToken));
        }

        assert_eq!(auth.login("nope", Some(TOKEN)), Err(Denied::WrongToken));
        let cookie = auth.login(TOKEN, Some(TOKEN)).unwrap();
        let with_cookie = format!("{COOKIE}={cookie}");
        let op = auth.check(&req(&[("cookie", &with_cookie)]), Some(TOKEN)).unwrap();
        let Operator::Cookie { csrf, .. } = &op else { panic!("{op:?}") };
        assert_ne!(csrf, &cookie, "the CSRF token is not the cookie");
        // Another session has another CSRF token; a forged cookie is nobody.
        let other = auth.login(TOKEN, Some(TOKEN)).unwrap();
        let other_op = auth.check(&req(&[("cookie", &format!("{COOKIE}={other}"))]), Some(TOKEN)).unwrap();
        assert!(!other_op.csrf_matches(Some(op.csrf())));
        assert_eq!(auth.check(&req(&[("cookie", &format!("{COOKIE}=forged"))]), Some(TOKEN)), Err(Denied::Anonymous));
        // A new token (reload) ends the sessions opened with the old one.
        assert_eq!(
            auth.check(&req(&[("cookie", &with_cookie)]), Some("another-token-0123456789")),
            Err(Denied::Anonymous)
        );
        assert_eq!(auth.check(&req(&[("cookie", &with_cookie)]), Some(TOKEN)), Err(Denied::Anonymous));
        auth.logout(&other_op);
        assert_eq!(auth.check(&req(&[("cookie", &format!("{COOKIE}={other}"))]), Some(TOKEN)), Err(Denied::Anonymous));
        assert!(session_cookie("v").contains("HttpOnly; SameSite=Strict"));
    }

    #[test]
    fn secrets_compare_by_value_only() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd") && !same_secret("abc", "abcd") && !same_secret("", "a"));
    }
}
