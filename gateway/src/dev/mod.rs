//! The development PKI and the local demo: for trying the gateway and for its tests, never for
//! production.

pub mod demo;
pub mod devpki;
