//! Subcommands beside `serve`: `init`, `doctor`, and the certificate helpers of `certs`.

pub mod certs;
pub mod doctor;
pub mod init;
