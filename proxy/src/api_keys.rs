//! `/api/keys`: API keys for robots (CI jobs), used as the password of Basic
//! credentials with their owner's name. Each carries its owner's identity and groups,
//! is stored only as a hash, and expires.
//!
//! - `POST /api/keys` `{"name": "ci", "expires_in": "720h", "owner": "ci-robot"}` makes
//!   one (`owner` other than oneself: administrators only); the answer holds the key,
//!   shown this once.
//! - `GET /api/keys` lists one's keys (an administrator's: all), without secrets.
//! - `DELETE /api/keys/<id>` revokes one.

use std::time::Duration;

use bytes::Bytes;
use pingora::protocols::http::ServerSession;

use crate::auth::Identity;
use crate::errors::{ApiError, Code};
use crate::server::{send_bytes, send_head, App, Request, Served};

/// Keys without `expires_in` live this long.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

impl App {
    pub(crate) async fn api_keys(
        &self,
        session: &mut ServerSession,
        req: &Request,
        who: &Identity,
        id: Option<&str>,
    ) -> Result<Served, ApiError> {
        let Identity::User { name, .. } = who else {
            return Err(self.deny(req, who, "managing API keys", None));
        };
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
                let lifetime = match v["expires_in"].as_str() {
                    None => DEFAULT_LIFETIME,
                    Some(s) => berth_config::parse_duration(s)
                        .map_err(|e| ApiError::new(Code::BadRequest, format!("expires_in: {e}")))?,
                };
                let (id, key, record) = self
                    .auth
                    .create_api_key(&owner, &key_name, lifetime)
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
                if self.auth.revoke_api_key(who, id).map_err(internal)? {
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
