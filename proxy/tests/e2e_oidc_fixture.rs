//! The OIDC fixture itself, without berth: the real OpenID provider (`tests/oidc`) starts,
//! issues workload tokens with the audience asked for and the client's groups, mints
//! expired tokens, takes group changes at run time, and stops when dropped; the browser
//! driver runs Chromium and fails with a message when berth is not there.
//!
//! Run: `cargo test --release --workspace --test e2e_oidc_fixture`.

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use support::oidc::*;
use support::ClosedPort;

fn now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

fn strings(v: &serde_json::Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn provider_issues_workload_tokens_mints_and_changes_groups() {
    let provider = OidcProvider::start(&OidcConfig::default()).await;
    let issuer = provider.issuer().to_owned();
    assert_eq!(issuer, format!("http://127.0.0.1:{}", provider.port()));
    let discovery: serde_json::Value =
        reqwest::get(format!("{issuer}/.well-known/openid-configuration"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(discovery["issuer"], issuer.as_str());
    assert_eq!(discovery["jwks_uri"], format!("{issuer}/jwks").as_str());

    // The right audience, and a wrong one: both are valid tokens of the provider.
    let token = provider.client_credentials_token(WORKLOAD_AUDIENCE).await;
    let c = jwt_claims(&token);
    assert_eq!(c["iss"], issuer.as_str());
    assert_eq!(c["aud"], WORKLOAD_AUDIENCE);
    assert_eq!(c["sub"], WORKLOAD_CLIENT_ID);
    assert_eq!(c["client_id"], WORKLOAD_CLIENT_ID);
    assert_eq!(strings(&c["groups"]), WORKLOAD_GROUPS);
    let exp = c["exp"].as_i64().unwrap();
    assert!(exp > now() && exp <= now() + 301, "{c}");
    let wrong = jwt_claims(&provider.client_credentials_token("urn:not-berth").await);
    assert_eq!(wrong["aud"], "urn:not-berth");

    // Minted: expired, with the provider's key id.
    let minted = provider
        .mint(&Mint {
            sub: Some("job-7"),
            groups: Some(&["ci", "deploy"]),
            exp_in: Some(-120),
            username: Some("job7"),
            ..Mint::default()
        })
        .await;
    let m = jwt_claims(&minted);
    assert_eq!(m["sub"], "job-7");
    assert_eq!(m["iss"], issuer.as_str());
    assert_eq!(m["aud"], WORKLOAD_AUDIENCE);
    assert_eq!(m["preferred_username"], "job7");
    assert_eq!(strings(&m["groups"]), ["ci", "deploy"]);
    assert!(m["exp"].as_i64().unwrap() <= now() - 119, "{m}");
    let jwks: serde_json::Value = reqwest::get(format!("{issuer}/jwks"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let header = jwt_header(&minted);
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["kid"], jwks["keys"][0]["kid"]);
    // No groups unless asked for.
    let bare = jwt_claims(&provider.mint(&Mint::default()).await);
    assert!(bare.get("groups").is_none(), "{bare}");

    // A group removed in the provider: new tokens lack it, the old one keeps it.
    provider.set_groups(WORKLOAD_CLIENT_ID, &[]).await;
    let after = jwt_claims(&provider.client_credentials_token(WORKLOAD_AUDIENCE).await);
    assert_eq!(strings(&after["groups"]), Vec::<&str>::new());
    assert_eq!(strings(&jwt_claims(&token)["groups"]), WORKLOAD_GROUPS);
    provider.set_groups("alice", &["ci"]).await;
    assert!(provider.log().contains("groups of alice are now [ci]"));
    assert_eq!(provider.user("alice").sub, "u-1001");

    drop(provider);
    // Stopped: its port no longer answers.
    let gone = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{issuer}/jwks"))
        .send()
        .await;
    assert!(gone.is_err(), "the provider still answers after drop");
}

#[tokio::test]
async fn provider_signs_with_es256_when_asked() {
    let provider = OidcProvider::start(&OidcConfig {
        alg: "ES256",
        ..OidcConfig::default()
    })
    .await;
    let token = provider.client_credentials_token(WORKLOAD_AUDIENCE).await;
    let header = jwt_header(&token);
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["typ"], "at+jwt");
}

#[tokio::test]
async fn browser_driver_fails_with_a_message_without_berth() {
    let closed = ClosedPort::new();
    let browser = Browser::new(&format!("http://127.0.0.1:{}", closed.port()));
    let err = browser.try_run("status", &[]).await.unwrap_err();
    assert!(err.contains("ERR_CONNECTION_REFUSED"), "{err}");
    let err = browser.try_run("no-such-command", &[]).await.unwrap_err();
    assert!(err.contains("unknown command no-such-command"), "{err}");
}
