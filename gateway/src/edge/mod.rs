//! The edge: accepting connections, the PROXY header, TLS, and serving HTTP/1.1 and HTTP/2 under
//! the connection limits and the slow-client deadlines.

pub mod h1scan;
pub mod listener;
