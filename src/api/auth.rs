//! Optional API keys (RFC 6750 bearer tokens) and job ownership.
//!
//! When keys are configured, every protected route needs
//! `Authorization: Bearer <key>`. Keys are hashed once at start-up and a
//! presented key's SHA-256 is compared with every configured digest in constant
//! time (no early exit), so timing reveals neither which key nor how much of it
//! matched. A job records the key's fingerprint — a SHA-256 hex prefix, never
//! the key — and is visible only to that key; others get the same 404 as for an
//! unknown job.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::errors::{ApiError, OpenAiError};
use super::state::AppState;
use crate::jobs::JobRecord;

/// Hex characters of the SHA-256 kept as a key's fingerprint (64 bits: enough to
/// tell keys apart, useless for recovering one).
const FINGERPRINT_HEX: usize = 16;

/// The configured keys, as digests.
#[derive(Debug, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The fingerprint stored as a job's owner.
pub fn fingerprint(key: &str) -> String {
    digest(key).iter().map(|b| format!("{b:02x}")).collect::<String>()[..FINGERPRINT_HEX].to_owned()
}

impl ApiKeys {
    pub fn new(keys: &[String]) -> Self {
        Self { digests: keys.iter().map(|k| digest(k)).collect() }
    }

    pub fn enabled(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Whether `presented` is one of the keys, in time independent of which.
    pub fn accepts(&self, presented: &str) -> bool {
        let d = digest(presented);
        self.digests.iter().fold(false, |found, k| found | (k.iter().zip(&d).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0))
    }
}

/// Who is calling: the owner fingerprint new jobs get, `None` without keys.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub owner: Option<String>,
}

impl Caller {
    /// A job is visible to the key that created it; without keys, to everyone.
    pub fn can_see(&self, job: &JobRecord) -> bool {
        self.owner.is_none() || self.owner == job.owner
    }

    /// `job` when this caller may see it; the same 404 as an unknown job otherwise.
    pub fn visible(&self, job: JobRecord) -> Result<JobRecord, ApiError> {
        if self.can_see(&job) {
            Ok(job)
        } else {
            Err(ApiError::NotFound("job"))
        }
    }
}

fn bearer(request: &Request) -> Option<&str> {
    let value = request.headers().get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Middleware on every protected route: checks the key and hands handlers a [`Caller`].
pub async fn require_key(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let caller = if state.keys.enabled() {
        match bearer(&request).filter(|key| state.keys.accepts(key)) {
            Some(key) => Caller { owner: Some(fingerprint(key)) },
            None if request.uri().path().starts_with("/v1/") => return OpenAiError(ApiError::Unauthorized).into_response(),
            None => return ApiError::Unauthorized.into_response(),
        }
    } else {
        Caller::default()
    };
    request.extensions_mut().insert(caller);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_exactly_and_fingerprints_do_not_reveal_them() {
        let keys = ApiKeys::new(&["alpha".into(), "beta".into()]);
        assert!(keys.enabled());
        assert!(keys.accepts("alpha") && keys.accepts("beta"));
        assert!(!keys.accepts("alph") && !keys.accepts("") && !keys.accepts("alpha "));
        assert!(!ApiKeys::new(&[]).enabled());
        let f = fingerprint("alpha");
        assert_eq!(f.len(), FINGERPRINT_HEX);
        assert_ne!(f, fingerprint("beta"));
        assert!(!f.contains("alpha"));
    }
}
