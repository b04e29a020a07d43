//! Subcommands beside `serve`: `doctor`, and the certificate helpers of `certs`.

pub mod certs;
pub mod doctor;
