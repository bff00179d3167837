//! berth's configuration, parsed completely before anything runs.
//!
//! - [`config`]: the file's schema (`[server]`, `[[upstream]]`) and [`Config::parse`],
//!   which reports every problem at once, each with its path;
//! - [`cache`]: `[cache]`, the disk budget of pulled-through content;
//! - [`access`]: `[auth]` and `[access]`: users, groups, and the per-repository policies
//!   that decide who may read, create, update and delete;
//! - [`glob`]: the repository patterns both use.
//!
//! The crate does no I/O beyond reading secret files on request
//! ([`config::Credentials::resolve`]); the cache, registry and server take what they need
//! from a parsed [`Config`].

pub mod access;
pub mod cache;
pub mod config;
pub mod glob;

pub use cache::{CacheConfig, MinFree};
pub use config::*;
