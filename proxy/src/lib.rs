//! The berth server: the OCI distribution API over Pingora, routed to upstream registries
//! through `berth-cache`.
//!
//! This is the only crate that knows Pingora and HTTP sessions. A request is parsed once
//! into a [`route::Route`] (validated names, tags and digests; the upstream resolved; the
//! allowlist applied), served by [`server::App`], and every failure becomes an OCI error
//! response in exactly one place, [`errors::ApiError`].
//!
//! ```text
//! berth                                   # embedded default configuration on 127.0.0.1:5000
//! curl -s localhost:5000/v2/docker.io/library/nginx/manifests/latest \
//!      -H 'Accept: application/vnd.oci.image.index.v1+json'
//! curl -s 'localhost:5000/v2/library/nginx/manifests/latest?ns=docker.io' -I
//! ```

pub mod access_log;
pub mod admin;
pub mod api_keys;
pub mod auth;
pub mod cli;
mod drain;
pub mod errors;
mod front;
pub mod login;
mod memo;
pub mod metrics;
pub mod node_config;
pub mod oidc;
pub mod private;
pub mod range;
pub mod route;
mod sendfile;
pub mod server;
pub mod session;
mod token;
mod token_service;
pub mod ui;
