//! tokenfs: serve AI-CLI config files from an in-memory credential snapshot.
//!
//! Data flow (see `DESIGN.md`): [`source`]s publish into the [`store`];
//! [`render`] turns a snapshot into file bytes; [`fs`] serves them over FUSE
//! and passes every other file through; [`control`] answers `tokenfs status`,
//! `set`, `rotate` and `token`; [`proxy`] forwards HTTP requests with the
//! current secret; [`daemon`] wires them together.

pub mod backup;
pub mod config;
pub mod control;
pub mod daemon;
pub mod doctor;
pub mod files;
pub mod fs;
pub mod init;
pub mod lock;
pub mod managed;
pub mod mounts;
pub mod preset;
pub mod proxy;
pub mod render;
pub mod secret;
pub mod source;
pub mod store;
pub mod tls;
