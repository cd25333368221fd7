//! Who may do what: user API keys for the inference endpoints, a separate admin key for the
//! endpoints that change what the server serves (loading and unloading LoRA adapters), and
//! optionally a key for `/metrics`. `/health` and `/ready` are always open.
//!
//! - No keys configured: every endpoint is open, except the admin endpoints (below).
//! - User keys configured (`api_key`, `api_keys`, `api_key_file`): `/v1/*`, `/tokenize` and
//!   `/detokenize` need `Authorization: Bearer <one of them>` (or the admin key), else 401.
//! - Admin key configured (`admin_api_key`): the admin endpoints need it; a user key gets 403,
//!   no key or a wrong one 401.
//! - No admin key: the admin endpoints answer 403 (they are off), unless `open_admin_endpoints =
//!   true` opens them to every caller the user-key check lets through.
//!
//! Keys are compared in constant time (`subtle`): the time taken does not depend on where a
//! wrong key differs from a right one, nor on which configured key matched (all are compared).
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::{Choice, ConstantTimeEq};

use super::error::ApiError;
use super::state::AppState;

/// What the configured keys are; compared, never printed.
#[derive(Clone, Default)]
pub struct Auth {
    user_keys: Vec<Vec<u8>>,
    admin_key: Option<Vec<u8>>,
    /// Without an admin key, the admin endpoints are open to whoever passes the user-key check.
    pub open_admin_endpoints: bool,
    /// `/metrics` needs a user or admin key (when any key is configured).
    pub metrics_require_key: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("user_keys", &self.user_keys.len())
            .field("admin_key", &self.admin_key.is_some())
            .field("open_admin_endpoints", &self.open_admin_endpoints)
            .field("metrics_require_key", &self.metrics_require_key)
            .finish()
    }
}

/// What the key a request carries is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// No key, or one that matches nothing configured.
    None,
    User,
    Admin,
}

impl Auth {
    /// Empty keys are ignored.
    pub fn new(user_keys: impl IntoIterator<Item = String>, admin_key: Option<String>) -> Self {
        Self {
            user_keys: user_keys.into_iter().filter(|k| !k.is_empty()).map(String::into_bytes).collect(),
            admin_key: admin_key.filter(|k| !k.is_empty()).map(String::into_bytes),
            open_admin_endpoints: false,
            metrics_require_key: false,
        }
    }

    /// One user key, nothing else (tests).
    pub fn user_key(key: &str) -> Self {
        Self::new([key.to_string()], None)
    }

    pub fn has_user_keys(&self) -> bool {
        !self.user_keys.is_empty()
    }

    pub fn has_admin_key(&self) -> bool {
        self.admin_key.is_some()
    }

    /// The role of a presented key. Every configured key is compared, in constant time each.
    pub fn role_of(&self, given: Option<&[u8]>) -> Role {
        let Some(given) = given else { return Role::None };
        let mut user = Choice::from(0);
        for k in &self.user_keys {
            user |= k.as_slice().ct_eq(given);
        }
        let admin = self.admin_key.as_deref().map_or(Choice::from(0), |k| k.ct_eq(given));
        if bool::from(admin) {
            Role::Admin
        } else if bool::from(user) {
            Role::User
        } else {
            Role::None
        }
    }

    /// The role of a request's `Authorization: Bearer <key>` header.
    pub fn role(&self, headers: &HeaderMap) -> Role {
        self.role_of(bearer(headers))
    }

    /// The user endpoints: open when no user key is configured, else a user or the admin key.
    pub fn check_user(&self, headers: &HeaderMap) -> Result<Role, ApiError> {
        let role = self.role(headers);
        if self.has_user_keys() && role == Role::None {
            return Err(ApiError::unauthorized());
        }
        Ok(role)
    }

    /// The admin endpoints (module docs).
    pub fn check_admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.has_admin_key() {
            return match self.role(headers) {
                Role::Admin => Ok(()),
                Role::User => Err(ApiError::forbidden(
                    "This endpoint needs the admin API key; a user API key may not change the served adapters.",
                    "insufficient_permissions",
                )),
                Role::None => Err(ApiError::unauthorized()),
            };
        }
        self.check_user(headers)?;
        if self.open_admin_endpoints {
            return Ok(());
        }
        Err(ApiError::forbidden(
            "Admin endpoints are off: the server has no admin API key. Set [server] admin_api_key \
             (or open_admin_endpoints = true to let every API user load and unload adapters).",
            "admin_endpoints_disabled",
        ))
    }

    /// `/metrics`: open unless `metrics_require_key` is set and some key is configured.
    pub fn check_metrics(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if !self.metrics_require_key || (!self.has_user_keys() && !self.has_admin_key()) {
            return Ok(());
        }
        match self.role(headers) {
            Role::None => Err(ApiError::unauthorized()),
            _ => Ok(()),
        }
    }
}

/// The key of `Authorization: Bearer <key>` (the scheme's case ignored, spaces trimmed).
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let v = headers.get(AUTHORIZATION)?.as_bytes();
    if v.len() < 7 || !v[..7].eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    Some(v[7..].trim_ascii())
}

/// Middleware of the user endpoints.
pub async fn require_user(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match state.limits.auth.check_user(req.headers()) {
        Ok(_) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Middleware of the admin endpoints.
pub async fn require_admin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match state.limits.auth.check_admin(req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Middleware of `/metrics`.
pub async fn require_metrics(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match state.limits.auth.check_metrics(req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn roles_of_keys() {
        let a = Auth::new(["u1".to_string(), "u2-longer".to_string(), String::new()], Some("adm".into()));
        assert_eq!(a.role_of(Some(b"u1")), Role::User);
        assert_eq!(a.role_of(Some(b"u2-longer")), Role::User);
        assert_eq!(a.role_of(Some(b"adm")), Role::Admin);
        for wrong in [&b"u"[..], b"u1 ", b"u2-longe", b"u2-longerX", b"", b"ADM"] {
            assert_eq!(a.role_of(Some(wrong)), Role::None, "{wrong:?}");
        }
        assert_eq!(a.role_of(None), Role::None);
        assert_eq!(a.role(&headers("Bearer u1")), Role::User);
        assert_eq!(a.role(&headers("bearer   adm  ")), Role::Admin);
        assert_eq!(a.role(&headers("Basic u1")), Role::None);
        assert_eq!(a.role(&headers("u1")), Role::None);
        // The empty key was dropped: an empty bearer matches nothing.
        assert_eq!(a.role(&headers("Bearer ")), Role::None);
    }

    #[test]
    fn admin_endpoints_by_configuration() {
        let status = |r: Result<(), ApiError>| r.err().map(|e| (e.status.as_u16(), e.code.unwrap_or_default()));
        let both = Auth::new(["u".to_string()], Some("a".into()));
        assert_eq!(status(both.check_admin(&headers("Bearer a"))), None);
        assert_eq!(status(both.check_admin(&headers("Bearer u"))), Some((403, "insufficient_permissions".into())));
        assert_eq!(status(both.check_admin(&headers("Bearer x"))), Some((401, "invalid_api_key".into())));
        assert_eq!(status(both.check_admin(&HeaderMap::new())), Some((401, "invalid_api_key".into())));
        // The admin key is also a user key.
        assert!(both.check_user(&headers("Bearer a")).is_ok());

        let admin_only = Auth::new([], Some("a".into()));
        assert!(admin_only.check_user(&HeaderMap::new()).is_ok(), "no user keys: user endpoints open");
        assert_eq!(status(admin_only.check_admin(&HeaderMap::new())), Some((401, "invalid_api_key".into())));

        let users_only = Auth::user_key("u");
        assert_eq!(status(users_only.check_admin(&headers("Bearer u"))), Some((403, "admin_endpoints_disabled".into())));
        assert_eq!(status(users_only.check_admin(&HeaderMap::new())), Some((401, "invalid_api_key".into())));
        let none = Auth::default();
        assert_eq!(status(none.check_admin(&HeaderMap::new())), Some((403, "admin_endpoints_disabled".into())));

        let open = Auth { open_admin_endpoints: true, ..Auth::user_key("u") };
        assert_eq!(status(open.check_admin(&headers("Bearer u"))), None);
        assert_eq!(status(open.check_admin(&HeaderMap::new())), Some((401, "invalid_api_key".into())));
        let open_anon = Auth { open_admin_endpoints: true, ..Auth::default() };
        assert_eq!(status(open_anon.check_admin(&HeaderMap::new())), None);
    }

    #[test]
    fn metrics_key() {
        let a = Auth { metrics_require_key: true, ..Auth::new(["u".to_string()], Some("a".into())) };
        assert!(a.check_metrics(&HeaderMap::new()).is_err());
        assert!(a.check_metrics(&headers("Bearer u")).is_ok());
        assert!(a.check_metrics(&headers("Bearer a")).is_ok());
        assert!(Auth::user_key("u").check_metrics(&HeaderMap::new()).is_ok(), "open by default");
        assert!(Auth { metrics_require_key: true, ..Auth::default() }.check_metrics(&HeaderMap::new()).is_ok());
    }
}
