//! Around the request path: the admin listener and readiness, the certificate expiry watch,
//! reload on SIGHUP and changed files, the public certificate by ACME, logging.

pub mod acme;
pub mod admin;
pub mod certwatch;
pub mod logging;
pub mod reload;
