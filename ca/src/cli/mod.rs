//! The command line: [`config`] puts `signet-ca serve`'s flag groups together into
//! one validated configuration, which [`check`] looks at for `--check-config`;
//! [`pki`] is `signet-ca pki`, roots and per-cluster intermediates for operators.

pub mod check;
pub mod config;
pub mod pki;
