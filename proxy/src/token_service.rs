//! `GET /token`: the Docker token service. A client that was told
//! `WWW-Authenticate: Bearer realm=…,service=…,scope=…` asks here, with Basic credentials
//! or none (anonymous), and gets a token for the intersection of what it asked and what
//! the access policies allow it.

use bytes::Bytes;
use pingora::protocols::http::ServerSession;

use berth_config::access::Action;

use crate::auth::{AuthError, Identity};
use crate::errors::{ApiError, Code};
use crate::route::{query_param, query_values};
use crate::server::{send_bytes, App, Request, Served};
use crate::token::Grant;

impl App {
    pub(crate) async fn token(
        &self,
        session: &mut ServerSession,
        req: &Request,
    ) -> Result<Served, ApiError> {
        let Some(tokens) = self.auth.tokens() else {
            return Err(ApiError::new(
                Code::NotFound,
                "this berth has no token service ([auth.token] is not configured)",
            ));
        };
        let query = req.query.as_deref().unwrap_or("");
        if let Some(service) = query_param(query, "service") {
            if service != tokens.service() {
                return Err(ApiError::new(
                    Code::Denied,
                    format!(
                        "this token service issues tokens for {:?}, not {service:?}",
                        tokens.service()
                    ),
                ));
            }
        }
        let who = match self.auth.login(req.authorization.as_deref()).await {
            Ok(who) => who.unwrap_or(Identity::Anonymous),
            Err(AuthError::Rejected(why)) => {
                return Err(ApiError::new(
                    Code::Unauthorized,
                    format!("the token was not accepted: {why}"),
                ))
            }
            Err(_) => {
                return Err(ApiError::new(
                    Code::Unauthorized,
                    "the credentials were not accepted: check the user name and password",
                )
                .with_headers(vec![(
                    "WWW-Authenticate",
                    crate::auth::BASIC_CHALLENGE.to_owned(),
                )]))
            }
        };
        // Every `scope=` parameter, each possibly several scopes separated by spaces.
        let asked: Vec<Grant> = query_values(query, "scope")
            .flat_map(|v| {
                v.split(' ')
                    .filter_map(Grant::parse_scope)
                    .collect::<Vec<_>>()
            })
            .collect();
        let granted: Vec<Grant> = asked
            .into_iter()
            .filter_map(|g| self.grant(&who, g))
            .collect();
        let subject = match &who {
            Identity::Anonymous => None,
            Identity::User { name, .. } => Some(name.as_str()),
        };
        let oidc = match &who {
            Identity::User {
                provider: Some(p),
                groups,
                ..
            } => Some((p.as_str(), groups.as_slice())),
            _ => None,
        };
        let (token, issued) = tokens.issue(subject, &granted, oidc);
        let body = serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": tokens.lifetime().as_secs(),
            "issued_at": rfc3339(issued),
        });
        let body = Bytes::from(serde_json::to_vec(&body).expect("serializable"));
        let headers = vec![
            ("Content-Type", "application/json".to_owned()),
            ("Cache-Control", "no-store".to_owned()),
        ];
        Ok(send_bytes(session, 200, headers, body, false, None).await)
    }

    /// What of `asked` the policies allow `who`; `None` when nothing.
    fn grant(&self, who: &Identity, mut asked: Grant) -> Option<Grant> {
        if asked.kind == "registry" && asked.name == "catalog" {
            // The catalog lists only what the caller may read.
            return Some(asked);
        }
        if asked.kind != "repository" {
            return None;
        }
        let wanted: Vec<&str> = if asked.actions.iter().any(|a| a == "*") {
            vec!["pull", "push", "delete"]
        } else {
            asked.actions.iter().map(String::as_str).collect()
        };
        let allowed: Vec<String> = wanted
            .into_iter()
            .filter(|a| {
                let action = match *a {
                    "pull" => Action::Read,
                    "push" => Action::Create,
                    "delete" => Action::Delete,
                    _ => return false,
                };
                self.auth.allows(who, &asked.name, action)
            })
            .map(str::to_owned)
            .collect();
        if allowed.is_empty() {
            return None;
        }
        asked.actions = allowed;
        Some(asked)
    }
}

/// Seconds since the epoch as an RFC 3339 UTC time.
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_403_045), "2026-11-23T03:04:05Z");
    }
}
