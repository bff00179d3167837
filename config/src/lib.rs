//! berth's configuration, parsed completely before anything runs.
//!
//! - [`config`]: the file's schema (`[server]`, `[[upstream]]`) and [`Config::parse`],
//!   which reports every problem at once, each with its path;
//! - [`cache`]: `[cache]`, the disk budget of pulled-through content;
//! - [`access`]: `[auth]` and `[access]`: users, groups, and the per-repository policies
//!   that decide who may read, create, update and delete;
//! - [`oidc`]: `[[auth.oidc]]`, OpenID Connect providers for browser logins and workload
//!   tokens;
//! - [`retention`]: `[[retention]]`, the policies that delete old tags and manifests of
//!   private repositories;
//! - [`glob`]: the repository patterns they use.
//!
//! The crate does no I/O beyond reading secret files on request
//! ([`config::Credentials::resolve`]); the cache, registry and server take what they need
//! from a parsed [`Config`].

pub mod access;
pub mod cache;
pub mod config;
pub mod glob;
pub mod oidc;
pub mod retention;

pub use cache::{CacheConfig, MinFree};
pub use config::*;
pub use retention::{RetentionPolicy, DEFAULT_RETENTION_INTERVAL};
