//! One request's straight line: the client address, rate limits, IIS-equivalent filtering, the
//! header allowlist toward NDES, and NDES's answer back.

pub mod client_addr;
pub mod filter;
pub mod proxy;
pub mod ratelimit;
