//! Rate limits with governor (GCRA): per client address and for the whole gateway. Per replica:
//! several replicas each apply their own.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::config::RateLimitConfig;

/// Above this many tracked addresses the store is pruned at once instead of waiting for the next
/// periodic pass; if pruning cannot bring it back under (every address is still within its
/// allowance, as in an address-spraying flood) the store is started afresh. Memory stays bounded
/// at the price of forgetting, during such a flood, who had used their burst.
const MAX_TRACKED_CLIENTS: usize = 100_000;
/// How often, in checks, the store's size is looked at.
const SIZE_CHECK_EVERY: u64 = 1024;

type Keyed<C> =
    RateLimiter<IpAddr, DashMapStateStore<IpAddr>, C, NoOpMiddleware<<C as Clock>::Instant>>;
type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    PerClient,
    Global,
}

impl Scope {
    pub fn key(self) -> &'static str {
        match self {
            Scope::PerClient => "rate_limit.per_client_rps",
            Scope::Global => "rate_limit.global_rps",
        }
    }
}

pub struct RateLimits<C: Clock = DefaultClock> {
    per_client: Option<RwLock<Keyed<C>>>,
    per_client_quota: Option<Quota>,
    global: Option<Direct<C>>,
    clock: C,
    checks: AtomicU64,
}

/// A quota from a rate (possibly below one per second) and a burst; `None` when off.
fn quota(rps: f64, burst: u32) -> Option<Quota> {
    if rps <= 0.0 {
        return None;
    }
    let period = Duration::try_from_secs_f64(1.0 / rps).ok()?;
    let burst = NonZeroU32::new(burst)
        .unwrap_or_else(|| NonZeroU32::new(rps.ceil().max(1.0) as u32).unwrap_or(NonZeroU32::MIN));
    Quota::with_period(period).map(|q| q.allow_burst(burst))
}

impl RateLimits<DefaultClock> {
    pub fn new(c: &RateLimitConfig) -> RateLimits<DefaultClock> {
        Self::with_clock(c, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimits<C> {
    pub fn with_clock(c: &RateLimitConfig, clock: C) -> RateLimits<C> {
        let per_client_quota = quota(c.per_client_rps, c.per_client_burst);
        RateLimits {
            per_client: per_client_quota
                .map(|q| RwLock::new(RateLimiter::dashmap_with_clock(q, clock.clone()))),
            per_client_quota,
            global: quota(c.global_rps, c.global_burst)
                .map(|q| RateLimiter::direct_with_clock(q, clock.clone())),
            clock,
            checks: AtomicU64::new(0),
        }
    }

    pub fn is_off(&self) -> bool {
        self.per_client.is_none() && self.global.is_none()
    }

    /// Takes one request from the client's and the global allowance, or says which limit refused
    /// it and when the next request would pass.
    pub fn check(&self, client: IpAddr) -> Result<(), (Scope, Duration)> {
        if let Some(keyed) = &self.per_client {
            if self.checks.fetch_add(1, Ordering::Relaxed) % SIZE_CHECK_EVERY == 0 {
                self.bound_store();
            }
            // A poisoned lock only means another thread panicked mid-check; the limiter is fine.
            let keyed = keyed.read().unwrap_or_else(|e| e.into_inner());
            keyed.check_key(&client_key(client)).map_err(|not_until| {
                (Scope::PerClient, not_until.wait_time_from(self.clock.now()))
            })?;
        }
        if let Some(global) = &self.global {
            global
                .check()
                .map_err(|not_until| (Scope::Global, not_until.wait_time_from(self.clock.now())))?;
        }
        Ok(())
    }

    fn bound_store(&self) {
        let (Some(lock), Some(quota)) = (&self.per_client, self.per_client_quota) else {
            return;
        };
        if lock.read().unwrap_or_else(|e| e.into_inner()).len() <= MAX_TRACKED_CLIENTS {
            return;
        }
        self.prune();
        let mut keyed = lock.write().unwrap_or_else(|e| e.into_inner());
        if keyed.len() > MAX_TRACKED_CLIENTS {
            tracing::warn!(
                target: "ndes_gateway::filter",
                tracked = keyed.len(),
                "per-client rate limit store full (an address-spraying flood?): starting it afresh"
            );
            *keyed = RateLimiter::dashmap_with_clock(quota, self.clock.clone());
        }
    }

    /// Forgets the addresses whose allowance is full again: they would pass anyway.
    pub fn prune(&self) {
        if let Some(lock) = &self.per_client {
            let keyed = lock.read().unwrap_or_else(|e| e.into_inner());
            keyed.retain_recent();
            keyed.shrink_to_fit();
        }
    }

    pub fn tracked_clients(&self) -> usize {
        self.per_client
            .as_ref()
            .map_or(0, |k| k.read().unwrap_or_else(|e| e.into_inner()).len())
    }
}

/// The key a client is limited by: its IPv4 address, or its IPv6 /64, since one subscriber gets a
/// whole /64 and could otherwise take a fresh address for every request.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
        v4 => v4,
    }
}

/// Retry-After in whole seconds, at least 1 (RFC 9110 §10.2.3 takes no fractions).
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn config(
        per_client_rps: f64,
        per_client_burst: u32,
        global_rps: f64,
        global_burst: u32,
    ) -> RateLimitConfig {
        RateLimitConfig {
            per_client_rps,
            per_client_burst,
            global_rps,
            global_burst,
        }
    }

    #[test]
    fn the_request_past_the_burst_waits_and_other_clients_do_not() {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(&config(2.0, 3, 0.0, 0), clock.clone());
        let a: IpAddr = "203.0.113.1".parse().unwrap();
        let b: IpAddr = "203.0.113.2".parse().unwrap();
        for _ in 0..3 {
            assert!(limits.check(a).is_ok());
        }
        let (scope, wait) = limits.check(a).unwrap_err();
        assert_eq!(scope, Scope::PerClient);
        assert_eq!(wait, Duration::from_millis(500));
        assert_eq!(retry_after_secs(wait), 1);
        assert!(limits.check(b).is_ok());
        clock.advance(Duration::from_millis(500));
        assert!(limits.check(a).is_ok());
    }

    #[test]
    fn the_global_limit_counts_every_client() {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(&config(0.0, 0, 1.0, 2), clock);
        assert!(limits.check("192.0.2.1".parse().unwrap()).is_ok());
        assert!(limits.check("192.0.2.2".parse().unwrap()).is_ok());
        assert_eq!(
            limits.check("192.0.2.3".parse().unwrap()).unwrap_err().0,
            Scope::Global
        );
    }

    #[test]
    fn pruning_forgets_clients_whose_allowance_is_full() {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(&config(10.0, 1, 0.0, 0), clock.clone());
        for i in 0..1000u32 {
            assert!(limits.check(IpAddr::from(i.to_be_bytes())).is_ok());
        }
        assert_eq!(limits.tracked_clients(), 1000);
        clock.advance(Duration::from_secs(1));
        limits.prune();
        assert_eq!(limits.tracked_clients(), 0);
    }

    #[test]
    fn an_ipv6_64_is_one_client_and_the_store_stays_bounded() {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(&config(0.001, 1, 0.0, 0), clock);
        assert!(limits.check("2001:db8:1:2::1".parse().unwrap()).is_ok());
        assert!(limits
            .check("2001:db8:1:2:ffff::9".parse().unwrap())
            .is_err());
        assert!(limits.check("2001:db8:1:3::1".parse().unwrap()).is_ok());
        // A spray of fresh addresses, each within its allowance, never grows it past the cap by
        // more than one size-check interval.
        for i in 0..(MAX_TRACKED_CLIENTS as u32 + 5_000) {
            let _ = limits.check(IpAddr::from(i.to_be_bytes()));
        }
        assert!(limits.tracked_clients() <= MAX_TRACKED_CLIENTS + SIZE_CHECK_EVERY as usize);
    }

    #[test]
    fn off_by_default_and_retry_after_rounds_up() {
        assert!(RateLimits::new(&RateLimitConfig::default()).is_off());
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(2500)), 3);
        assert_eq!(retry_after_secs(Duration::from_secs(4)), 4);
    }
}
