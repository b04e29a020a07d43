//! Rate limits with governor (GCRA): per client address and for the whole gateway. Per replica:
//! several replicas each apply their own.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::mem;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};

use crate::config::RateLimitConfig;

/// The most client addresses remembered at once. Past it the least recently seen are forgotten,
/// rather than the whole store being started afresh: an address-spraying flood must not reset
/// other clients, or every client that had used its burst would get a fresh one exactly while the
/// gateway is under attack. Forgetting the quiet ones costs only a fresh burst to a client that
/// has not been seen for a while.
const MAX_TRACKED_CLIENTS: usize = 100_000;
/// Independent locks, so that concurrent checks rarely wait on each other.
const SHARDS: usize = 16;

type Keyed<C> = RateLimiter<IpAddr, ClientStore, C, NoOpMiddleware<<C as Clock>::Instant>>;
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
    per_client: Option<Keyed<C>>,
    global: Option<Direct<C>>,
    clock: C,
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
        RateLimits {
            per_client: quota(c.per_client_rps, c.per_client_burst)
                .map(|q| RateLimiter::new(q, ClientStore::new(MAX_TRACKED_CLIENTS), clock.clone())),
            global: quota(c.global_rps, c.global_burst)
                .map(|q| RateLimiter::direct_with_clock(q, clock.clone())),
            clock,
        }
    }

    pub fn is_off(&self) -> bool {
        self.per_client.is_none() && self.global.is_none()
    }

    /// Takes one request from the client's and the global allowance, or says which limit refused
    /// it and when the next request would pass.
    pub fn check(&self, client: IpAddr) -> Result<(), (Scope, Duration)> {
        if let Some(keyed) = &self.per_client {
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

    /// Forgets the addresses whose allowance is full again: they would pass anyway.
    pub fn prune(&self) {
        if let Some(keyed) = &self.per_client {
            keyed.retain_recent();
            keyed.shrink_to_fit();
        }
    }

    pub fn tracked_clients(&self) -> usize {
        self.per_client.as_ref().map_or(0, |k| k.len())
    }
}

/// The per-client state store: bounded, forgetting the least recently seen addresses first.
///
/// Each shard keeps two generations instead of an exact recency order: no per-entry timestamps or
/// linked lists, and eviction is dropping a whole generation, O(1) amortised. An address is kept
/// for at least `generation` (at most twice that) newly seen addresses in its shard after it was
/// last seen, which with the default cap is about 50,000 fresh addresses overall.
struct ClientStore {
    shards: [Mutex<Generations>; SHARDS],
    /// Randomly keyed so that a sprayer cannot aim its addresses at one victim's shard, which
    /// would evict the victim `SHARDS` times sooner.
    shard_of: RandomState,
    generation: usize,
}

impl ClientStore {
    /// Holds at most `max_clients` addresses (two generations in every shard).
    fn new(max_clients: usize) -> ClientStore {
        ClientStore {
            shards: std::array::from_fn(|_| Mutex::default()),
            shard_of: RandomState::new(),
            generation: (max_clients / (2 * SHARDS)).max(1),
        }
    }

    fn shard(&self, key: &IpAddr) -> &Mutex<Generations> {
        &self.shards[self.shard_of.hash_one(key) as usize % SHARDS]
    }

    fn each_shard(&self, mut visit: impl FnMut(&mut Generations)) {
        for shard in &self.shards {
            // A poisoned lock only means another thread panicked mid-check; the maps are intact.
            visit(&mut shard.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }
}

impl StateStore for ClientStore {
    type Key = IpAddr;

    fn measure_and_replace<T, F, E>(&self, key: &IpAddr, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut shard = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        shard.measure_and_replace(*key, self.generation, f)
    }
}

impl ShrinkableKeyedStateStore<IpAddr> for ClientStore {
    fn retain_recent(&self, drop_below: Nanos) {
        self.each_shard(|g| {
            g.current.retain(|_, tat| *tat > drop_below);
            g.previous.retain(|_, tat| *tat > drop_below);
        });
    }

    fn shrink_to_fit(&self) {
        self.each_shard(|g| {
            g.current.shrink_to_fit();
            g.previous.shrink_to_fit();
        });
    }

    fn len(&self) -> usize {
        let mut len = 0;
        self.each_shard(|g| len += g.current.len() + g.previous.len());
        len
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One shard's addresses and their GCRA state (theoretical arrival time): those seen since the
/// last rotation, and those seen only in the generation before. An address is in at most one.
#[derive(Default)]
struct Generations {
    current: HashMap<IpAddr, Nanos>,
    previous: HashMap<IpAddr, Nanos>,
}

impl Generations {
    fn measure_and_replace<T, E>(
        &mut self,
        key: IpAddr,
        generation: usize,
        f: impl Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    ) -> Result<T, E> {
        if let Some(tat) = self.current.get_mut(&key) {
            let (outcome, next) = f(Some(*tat))?;
            *tat = next;
            return Ok(outcome);
        }
        let seen = self.previous.remove(&key);
        let decision = f(seen);
        // A refused request still counts as being seen: a client that keeps sending while refused
        // is the one that must stay remembered.
        let kept = match &decision {
            Ok((_, next)) => Some(*next),
            Err(_) => seen,
        };
        if let Some(tat) = kept {
            if self.current.len() >= generation {
                self.rotate();
            }
            self.current.insert(key, tat);
        }
        decision.map(|(outcome, _)| outcome)
    }

    /// Forgets the addresses not seen since the last rotation: the least recently seen.
    fn rotate(&mut self) {
        mem::swap(&mut self.current, &mut self.previous);
        // Keeps the allocation: under a flood the next generation fills it again at once.
        self.current.clear();
    }
}

/// The key a client is limited by: its IPv4 address, or its IPv6 /64, since one subscriber gets a
/// whole /64 and could otherwise take a fresh address for every request. The listener keys its
/// per-client connection cap with it too, so both limits see the same clients.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
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

    /// The `i`th address of a spray, in 10.0.0.0/8, clear of the other tests' addresses.
    fn sprayed(i: u32) -> IpAddr {
        IpAddr::from((0x0a00_0000 + i).to_be_bytes())
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
    fn pruning_keeps_clients_still_short_of_their_allowance() {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(&config(1.0, 1, 0.0, 0), clock.clone());
        let a: IpAddr = "203.0.113.1".parse().unwrap();
        assert!(limits.check(a).is_ok());
        clock.advance(Duration::from_millis(500));
        limits.prune();
        assert_eq!(limits.tracked_clients(), 1);
        assert_eq!(limits.check(a).unwrap_err().0, Scope::PerClient);
    }

    #[test]
    fn an_ipv6_64_is_one_client_and_a_v4_mapped_address_is_its_v4() {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(&config(0.001, 1, 0.0, 0), clock);
        assert!(limits.check("2001:db8:1:2::1".parse().unwrap()).is_ok());
        assert!(limits
            .check("2001:db8:1:2:ffff::9".parse().unwrap())
            .is_err());
        assert!(limits.check("2001:db8:1:3::1".parse().unwrap()).is_ok());
        assert!(limits.check("192.0.2.9".parse().unwrap()).is_ok());
        assert!(limits.check("::ffff:192.0.2.9".parse().unwrap()).is_err());
        assert_eq!(
            client_key("2001:db8:1:2:ffff::9".parse().unwrap()),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_key("::ffff:192.0.2.9".parse().unwrap()),
            "192.0.2.9".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn a_client_that_keeps_sending_stays_limited_through_an_address_spray() {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(&config(0.001, 1, 0.0, 0), clock);
        let victim: IpAddr = "198.51.100.7".parse().unwrap();
        assert!(limits.check(victim).is_ok());
        assert!(limits.check(victim).is_err());
        for i in 0..(MAX_TRACKED_CLIENTS as u32 * 2) {
            let _ = limits.check(sprayed(i));
            if i % 1000 == 999 {
                assert_eq!(
                    limits.check(victim).map_err(|(scope, _)| scope),
                    Err(Scope::PerClient),
                    "after {} sprayed addresses",
                    i + 1
                );
            }
        }
    }

    #[test]
    fn an_address_spray_keeps_the_store_bounded_and_forgets_the_quiet() {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(&config(0.001, 1, 0.0, 0), clock);
        let quiet: IpAddr = "198.51.100.8".parse().unwrap();
        assert!(limits.check(quiet).is_ok());
        assert!(limits.check(quiet).is_err());
        for i in 0..(MAX_TRACKED_CLIENTS as u32 * 2) {
            let _ = limits.check(sprayed(i));
            if i % 1000 == 999 {
                assert!(limits.tracked_clients() <= MAX_TRACKED_CLIENTS);
            }
        }
        // Still remembering most of the spray: eviction is by generation, not a reset.
        assert!(limits.tracked_clients() >= MAX_TRACKED_CLIENTS / 2);
        // The cost of staying bounded: a client silent through the whole spray is forgotten.
        assert!(limits.check(quiet).is_ok());
    }

    #[test]
    fn eviction_drops_the_least_recently_seen_address() {
        let mut shard = Generations::default();
        let seen = |shard: &mut Generations, key: &str| {
            let key: IpAddr = key.parse().unwrap();
            shard
                .measure_and_replace(key, 2, |tat| {
                    Ok::<_, ()>((tat, tat.map_or(Nanos::from(1), |t| t + Nanos::from(1))))
                })
                .unwrap()
        };
        assert_eq!(seen(&mut shard, "192.0.2.1"), None);
        assert_eq!(seen(&mut shard, "192.0.2.2"), None);
        // Starts a new generation: .1 and .2 are now the previous one.
        assert_eq!(seen(&mut shard, "192.0.2.3"), None);
        // Seen again, .1 is brought into the current generation with its state.
        assert_eq!(seen(&mut shard, "192.0.2.1"), Some(Nanos::from(1)));
        // Starts another: .2, the least recently seen, is the one forgotten.
        assert_eq!(seen(&mut shard, "192.0.2.4"), None);
        assert_eq!(seen(&mut shard, "192.0.2.1"), Some(Nanos::from(2)));
        assert_eq!(seen(&mut shard, "192.0.2.3"), Some(Nanos::from(1)));
        assert_eq!(seen(&mut shard, "192.0.2.2"), None);
    }

    #[test]
    fn a_refused_request_keeps_the_client_recent() {
        let mut shard = Generations::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let allow =
            |tat: Option<Nanos>| Ok::<_, ()>(((), tat.unwrap_or_default() + Nanos::from(5)));
        let refuse = |_: Option<Nanos>| Err::<((), Nanos), ()>(());
        assert!(shard.measure_and_replace(a, 1, allow).is_ok());
        // A newcomer rotates `a` into the previous generation.
        assert!(shard
            .measure_and_replace("192.0.2.2".parse().unwrap(), 1, allow)
            .is_ok());
        assert!(shard.measure_and_replace(a, 1, refuse).is_err());
        assert_eq!(shard.current.get(&a), Some(&Nanos::from(5)));
        assert!(!shard.previous.contains_key(&a));
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
