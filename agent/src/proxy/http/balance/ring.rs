//! Envoy's ring hash (`ring_hash_lb.cc`, a ketama ring): each endpoint is hashed onto the ring
//! many times as `"<address>_<i>"` with xxHash64, and a request goes to the first entry at or
//! after its hash, wrapping around.

use std::fmt::Write as _;
use std::net::SocketAddr;

use super::hash::xxhash64;

/// Istio: `minimumRingSize` defaults to 1024 (0 is Istio's "unset"); Envoy's default too.
pub(super) const DEFAULT_MIN_RING_SIZE: u64 = 1024;
/// Envoy's `maximum_ring_size` default (Istio does not set it): the ring never grows past it, and
/// Envoy rejects a larger minimum; here a larger minimum is clamped to it.
pub(super) const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;

/// The minimum ring size in force for what the DestinationRule says.
pub(super) fn effective_min_ring_size(configured: u64) -> u64 {
    match configured {
        0 => DEFAULT_MIN_RING_SIZE,
        n => n.min(MAX_RING_SIZE),
    }
}

#[derive(Debug)]
pub(super) struct Ring {
    /// (hash, index of the endpoint in the cluster's list), sorted by hash.
    entries: Box<[(u64, u32)]>,
}

impl Ring {
    /// Builds the ring over `endpoints` (all of weight 1), as Envoy's `Ring` constructor does.
    pub(super) fn build(endpoints: &[SocketAddr], configured_min_ring_size: u64) -> Ring {
        let min_ring_size = effective_min_ring_size(configured_min_ring_size);
        // Indices are u32; a cluster never has 4 billion endpoints.
        let hosts = &endpoints[..endpoints.len().min(u32::MAX as usize)];
        if hosts.is_empty() {
            return Ring {
                entries: Box::new([]),
            };
        }
        // Envoy normalises weights to sum to 1 (weight 1 / n each) and scales so the least
        // weighted host gets a whole number of entries, capped at the maximum ring size. The f64
        // arithmetic is Envoy's, so entries per host come out the same.
        let weight = 1.0 / hosts.len() as f64;
        let scale = ((weight * min_ring_size as f64).ceil() / weight).min(MAX_RING_SIZE as f64);
        let mut entries = Vec::with_capacity(scale.ceil() as usize);
        // Running sums, so that fractional shares still add up to the ring size.
        let mut current = 0.0_f64;
        let mut target = 0.0_f64;
        let mut key = String::new();
        for (index, addr) in (0u32..).zip(hosts) {
            target += scale * weight;
            let mut i = 0u64;
            while current < target {
                key.clear();
                // Envoy hashes `address()->asString()` ("10.0.0.1:80", "[fd00::1]:80") + "_" + i.
                let _ = write!(key, "{addr}_{i}");
                entries.push((xxhash64(key.as_bytes()), index));
                i += 1;
                current += 1.0;
            }
        }
        entries.sort_unstable_by_key(|&(hash, _)| hash);
        Ring {
            entries: entries.into_boxed_slice(),
        }
    }

    /// Envoy `Ring::chooseHost` (ketama's binary search): the first entry whose hash is at or
    /// above `hash`, the first entry if none is.
    pub(super) fn host(&self, hash: u64) -> Option<usize> {
        let at = self.entries.partition_point(|&(h, _)| h < hash);
        let (_, index) = self.entries.get(at).or_else(|| self.entries.first())?;
        Some(*index as usize)
    }

    /// The host for `hash` among those `skip` does not exclude: the first entry at or after
    /// the hash whose host is not excluded, walking the ring (None if every host is). Envoy
    /// builds the ring over the healthy hosts instead; walking past the excluded hosts' entries
    /// keeps their keys' move the same (each goes to the next host on the ring) without a
    /// rebuild per ejection, and moves no other key.
    pub(super) fn host_skipping(&self, hash: u64, skip: impl Fn(usize) -> bool) -> Option<usize> {
        let at = self.entries.partition_point(|&(h, _)| h < hash);
        let (before, from) = self.entries.split_at(at);
        from.iter()
            .chain(before)
            .map(|&(_, index)| index as usize)
            .find(|&index| !skip(index))
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }
}
