//! `/api/keys`: API keys for robots (CI jobs), used as the password of Basic
//! credentials with their owner's name. Each carries its owner's identity and groups,
//! is stored only as a hash, expires, and stops working when its owner leaves the
//! htpasswd file.
//!
//! - `POST /api/keys` `{"name": "ci", "expires_in": "720h", "owner": "ci-robot"}` makes
//!   one (`owner` other than oneself: administrators only); the answer holds the key,
//!   shown this once. Only a password login may make one: a key made with a token or
//!   another key would outlive and outgrow what made it. `expires_in` may not exceed
//!   `[auth] api_key_max_lifetime` (default 90 days, also the default lifetime).
//! - `GET /api/keys` lists one's keys (an administrator's: all), without secrets.
//! - `DELETE /api/keys/<id>` revokes one.
//!
//! Listing and revoking take a password or an API key; a registry token never reaches
//! here (its scope names repositories, not keys).

use std::time::Duration;

use bytes::Bytes;
use pingora::protocols::http::ServerSession;

use crate::auth::{Identity, Login, BASIC_CHALLENGE};
use crate::errors::{ApiError, Code};
use crate::server::{send_bytes, send_head, App, Request, Served};

/// Keys without `expires_in` live this long, or the longest a key may live if shorter.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

/// The lifetime `expires_in` asks for, at most `max`: a longer one is refused rather than
/// cut short, so that a robot's owner is not surprised by a key expiring early.
fn lifetime(expires_in: &serde_json::Value, max: Duration) -> Result<Duration, ApiError> {
    let asked = match expires_in {
        serde_json::Value::Null => return Ok(DEFAULT_LIFETIME.min(max)),
        serde_json::Value::String(s) => berth_config::parse_duration(s)
            .map_err(|e| ApiError::new(Code::BadRequest, format!("expires_in: {e}")))?,
        other => {
            return Err(ApiError::new(
                Code::BadRequest,
                format!("expires_in: {other} is not a duration such as \"720h\""),
            ))
        }
    };
    if asked.is_zero() {
        return Err(ApiError::new(
            Code::BadRequest,
            "expires_in: a key must live longer than 0s",
        ));
    }
    if asked > max {
        return Err(ApiError::new(
            Code::BadRequest,
            format!(
                "expires_in: {} is longer than API keys may live here, {} ([auth] api_key_max_lifetime); ask for {} or less",
                hours(asked),
                hours(max),
                hours(max)
            ),
        ));
    }
    Ok(asked)
}

/// A duration as `[auth]` writes it: whole hours when it is, else seconds.
fn hours(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(3600) && d.subsec_nanos() == 0 {
        format!("{}h", s / 3600)
    } else {
        format!("{}s", s)
    }
}

impl App {
    pub(crate) async fn api_keys(
        &self,
        session: &mut ServerSession,
        req: &Request,
        who: &Identity,
        id: Option<&str>,
    ) -> Result<Served, ApiError> {
        if !self.auth.enabled() {
            return Err(ApiError::new(
                Code::NotFound,
                "this berth has no users ([auth] and [access] are not configured), so no API keys",
            ));
        }
        let Identity::User { name, login, .. } = who else {
            return Err(ApiError::new(
                Code::Unauthorized,
                "API keys are managed with a user name and password: send Basic credentials",
            )
            .with_headers(vec![("WWW-Authenticate", BASIC_CHALLENGE.to_owned())]));
        };
        let creating = req.method == "POST";
        match login {
            Login::Password | Login::Session => {}
            Login::ApiKey if !creating => {}
            Login::ApiKey => return Err(ApiError::new(
                Code::Denied,
                "an API key cannot make API keys: log in with your user name and htpasswd password (Basic credentials)",
            )),
            Login::Token => return Err(ApiError::new(
                Code::Denied,
                "a registry token does not cover API keys: log in with your user name and htpasswd password (Basic credentials)",
            )),
            Login::Workload => return Err(ApiError::new(
                Code::Denied,
                "a workload token cannot make or list API keys (a key would outlive it): log in on berth's API-key page (/ui/keys)",
            )),
        }
        let internal = |e: String| ApiError::new(Code::Internal, e);
        match (req.method.as_str(), id) {
            ("POST", None) => {
                let body = crate::private::read_body(session, 64 << 10).await?;
                let v: serde_json::Value = if body.is_empty() {
                    serde_json::json!({})
                } else {
                    serde_json::from_slice(&body).map_err(|e| {
                        ApiError::new(Code::BadRequest, format!("the body is not JSON: {e}"))
                    })?
                };
                let key_name = v["name"].as_str().unwrap_or("").to_owned();
                let owner = v["owner"].as_str().unwrap_or(name).to_owned();
                if owner != *name && !self.auth.is_admin(who) {
                    return Err(ApiError::new(
                        Code::Denied,
                        format!("only an administrator may make keys for another user ({owner})"),
                    ));
                }
                let lifetime = lifetime(&v["expires_in"], self.auth.api_key_max_lifetime())?;
                let (id, key, record) = self
                    .auth
                    .create_api_key(&owner, who, &key_name, lifetime)
                    .await
                    .map_err(internal)?;
                tracing::info!(id = %id, owner = %owner, by = %name, "API key created");
                let body = serde_json::json!({
                    "id": id, "key": key, "owner": owner, "name": key_name,
                    "expires_at_ms": record.expires_ms,
                });
                let body = Bytes::from(serde_json::to_vec(&body).expect("serializable"));
                let headers = vec![
                    ("Content-Type", "application/json".to_owned()),
                    ("Cache-Control", "no-store".to_owned()),
                ];
                Ok(send_bytes(session, 201, headers, body, false, None).await)
            }
            ("GET", None) => {
                let keys: Vec<serde_json::Value> = self
                    .auth
                    .api_keys(who)
                    .await
                    .map_err(internal)?
                    .into_iter()
                    .map(|(id, r)| {
                        serde_json::json!({"id": id, "owner": r.owner, "name": r.name,
                            "created_at_ms": r.created_ms, "expires_at_ms": r.expires_ms})
                    })
                    .collect();
                let body =
                    serde_json::to_vec(&serde_json::json!({ "keys": keys })).expect("serializable");
                let headers = vec![("Content-Type", "application/json".to_owned())];
                Ok(send_bytes(session, 200, headers, Bytes::from(body), false, None).await)
            }
            ("DELETE", Some(id)) => {
                if self.auth.revoke_api_key(who, id).await.map_err(internal)? {
                    tracing::info!(id = %id, by = %name, "API key revoked");
                    Ok(send_head(session, 204, Vec::new(), 0, None).await)
                } else {
                    Err(ApiError::new(
                        Code::NotFound,
                        format!("no API key {id} of yours"),
                    ))
                }
            }
            (method, _) => Err(ApiError::new(
                Code::Unsupported,
                format!("{method} is not an operation of {}", req.path),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_are_bounded() {
        let max = Duration::from_secs(30 * 24 * 3600);
        let null = serde_json::Value::Null;
        assert_eq!(
            lifetime(&null, max).unwrap(),
            max,
            "the default, cut to the max"
        );
        let day = serde_json::json!("24h");
        assert_eq!(lifetime(&day, max).unwrap(), Duration::from_secs(86_400));
        let long = serde_json::json!("721h");
        let e = lifetime(&long, max).unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(String::from_utf8_lossy(&e.body()).contains("720h"), "{e:?}");
        assert!(lifetime(&serde_json::json!("0s"), max).is_err());
        assert!(lifetime(&serde_json::json!(5), max).is_err());
        assert_eq!(
            lifetime(&null, Duration::from_secs(365 * 24 * 3600)).unwrap(),
            DEFAULT_LIFETIME
        );
    }
}
