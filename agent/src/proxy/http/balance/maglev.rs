//! Envoy's Maglev table (`maglev_lb.cc`, the Maglev paper's listing 1): each endpoint walks its
//! own permutation of the table's slots (an offset and a skip from two xxHash64s of its address)
//! and, in turn, takes its next free slot until the table is full; a request goes to the slot
//! `hash % table_size`.

use std::net::SocketAddr;

use super::hash::{xxhash64, xxhash64_seeded};

/// Istio: `tableSize` defaults to 65537; Envoy's default too.
pub(super) const DEFAULT_TABLE_SIZE: u64 = 65537;
/// Envoy's largest accepted table size (its proto's `lte`; Istio: "less than 5000011").
pub(super) const MAX_TABLE_SIZE: u64 = 5_000_011;

/// The table size in force: the configured one if Envoy would accept it (a prime, at most
/// 5000011), else the default. Istio's validation rejects the others first; the fallback keeps a
/// non-prime size (whose permutations would not cover the table) from ever being built.
pub(super) fn effective_table_size(configured: u64) -> u64 {
    if (1..=MAX_TABLE_SIZE).contains(&configured) && is_prime(configured) {
        configured
    } else {
        DEFAULT_TABLE_SIZE
    }
}

/// Envoy's `Primes::isPrime` (1, 2 and 3 count as prime; Istio copies it for its validation).
fn is_prime(x: u64) -> bool {
    if x != 0 && x < 4 {
        return true;
    }
    if x & 1 == 0 {
        return false;
    }
    let mut i = 3;
    while i * i <= x {
        if x.is_multiple_of(i) {
            return false;
        }
        i += 2;
    }
    true
}

#[derive(Debug)]
pub(super) struct Maglev {
    /// Slot → index of the endpoint in the cluster's list.
    table: Box<[u32]>,
}

struct Entry {
    index: u32,
    offset: u64,
    skip: u64,
    next: u64,
}

impl Maglev {
    /// Builds the table over `endpoints` (all of weight 1), as Envoy's `OriginalMaglevTable`.
    pub(super) fn build(endpoints: &[SocketAddr], configured_table_size: u64) -> Maglev {
        let size = effective_table_size(configured_table_size);
        let hosts = &endpoints[..endpoints.len().min(u32::MAX as usize)];
        if hosts.is_empty() {
            return Maglev {
                table: Box::new([]),
            };
        }
        // Envoy sorts the hosts by their hash key (the address as text, so "10.0.0.10:80" comes
        // before "10.0.0.2:80"): the fill order, and so the table, must not depend on list order.
        let mut keyed: Vec<(String, u32)> = (0u32..)
            .zip(hosts)
            .map(|(index, addr)| (addr.to_string(), index))
            .collect();
        keyed.sort();
        let mut entries: Vec<Entry> = keyed
            .iter()
            .map(|(key, index)| Entry {
                index: *index,
                offset: xxhash64(key.as_bytes()) % size,
                // A 1-slot table has one permutation (Envoy would divide by zero here).
                skip: match size {
                    1 => 1,
                    _ => xxhash64_seeded(key.as_bytes(), 1) % (size - 1) + 1,
                },
                next: 0,
            })
            .collect();

        const EMPTY: u32 = u32::MAX;
        let slots = size as usize;
        let mut table = vec![EMPTY; slots];
        let mut filled = 0usize;
        // Equal weights: every host takes a slot on every round (Envoy's target_weight check
        // never skips one). A prime size makes each permutation visit every slot, so a free one
        // is always found while the table is not full.
        while filled < slots {
            for entry in &mut entries {
                if filled == slots {
                    break;
                }
                let mut slot = permutation(entry, size);
                while table[slot] != EMPTY {
                    entry.next += 1;
                    slot = permutation(entry, size);
                }
                table[slot] = entry.index;
                entry.next += 1;
                filled += 1;
            }
        }
        Maglev {
            table: table.into_boxed_slice(),
        }
    }

    /// Envoy `chooseHost`: the slot `hash % table_size`.
    pub(super) fn host(&self, hash: u64) -> Option<usize> {
        let len = self.table.len() as u64;
        if len == 0 {
            return None;
        }
        Some(self.table[(hash % len) as usize] as usize)
    }

    /// The host for `hash` among those `skip` does not exclude: the host of the first slot from
    /// `hash % table_size` on (wrapping) whose host is not excluded (None if every host is).
    /// Envoy rebuilds the table over the healthy hosts instead; the walk moves only the excluded
    /// hosts' keys, spread over the others as the table's slots are, without a rebuild.
    pub(super) fn host_skipping(&self, hash: u64, skip: impl Fn(usize) -> bool) -> Option<usize> {
        let len = self.table.len() as u64;
        if len == 0 {
            return None;
        }
        let (before, after) = self.table.split_at((hash % len) as usize);
        after
            .iter()
            .chain(before)
            .map(|&index| index as usize)
            .find(|&index| !skip(index))
    }
}

/// Envoy `MaglevTable::permutation`: `(offset + skip * next) % size`.
fn permutation(entry: &Entry, size: u64) -> usize {
    // skip < size <= 5000011 and next < 2 * size: no overflow.
    ((entry.offset + entry.skip * entry.next) % size) as usize
}
