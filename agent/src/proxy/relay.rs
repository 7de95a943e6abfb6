//! Byte relay between two TCP streams: half-close is forwarded as a FIN, a reset or error on one
//! side resets the other, as a direct connection would behave.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Starts small so idle connections cost little; grows for bulk transfers (as ztunnel does).
const INITIAL_BUF: usize = 16 * 1024;
const LARGE_BUF: usize = 256 * 1024;
/// Consecutive full reads before growing the buffer.
const FULL_READS_TO_GROW: u32 = 4;

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayOutcome {
    pub a_to_b: u64,
    pub b_to_a: u64,
    /// One side errored (typically reset); the other side was reset too.
    pub reset: bool,
}

/// Relays until both directions are done.
pub async fn relay(a: TcpStream, b: TcpStream) -> RelayOutcome {
    let (mut ar, mut aw) = a.into_split();
    let (mut br, mut bw) = b.into_split();
    let (a_to_b, b_to_a, reset) = {
        let ab = copy_half(&mut ar, &mut bw);
        let ba = copy_half(&mut br, &mut aw);
        tokio::pin!(ab, ba);
        let (mut a_to_b, mut b_to_a) = (None, None);
        let mut reset = false;
        while a_to_b.is_none() || b_to_a.is_none() {
            tokio::select! {
                r = &mut ab, if a_to_b.is_none() => match r {
                    Ok(n) => a_to_b = Some(n),
                    Err(n) => { a_to_b = Some(n); reset = true; break; }
                },
                r = &mut ba, if b_to_a.is_none() => match r {
                    Ok(n) => b_to_a = Some(n),
                    Err(n) => { b_to_a = Some(n); reset = true; break; }
                },
            }
        }
        (a_to_b, b_to_a, reset)
    };
    if reset {
        // Reunite before dropping: a dropped OwnedWriteHalf sends FIN first, and the peer would
        // see a clean close instead of the reset.
        for (r, w) in [(ar, aw), (br, bw)] {
            if let Ok(stream) = r.reunite(w) {
                let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
            }
        }
    }
    RelayOutcome {
        a_to_b: a_to_b.unwrap_or(0),
        b_to_a: b_to_a.unwrap_or(0),
        reset,
    }
}

/// Copies until EOF (then sends FIN) or error. Ok/Err both carry the bytes copied.
async fn copy_half(from: &mut OwnedReadHalf, to: &mut OwnedWriteHalf) -> Result<u64, u64> {
    let mut buf = vec![0u8; INITIAL_BUF];
    let mut total = 0u64;
    let mut full_reads = 0u32;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(_) => return Err(total),
        };
        if n == buf.len() && buf.len() < LARGE_BUF {
            full_reads += 1;
            if full_reads >= FULL_READS_TO_GROW {
                buf.resize(LARGE_BUF, 0);
            }
        } else {
            full_reads = 0;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return Err(total);
        }
        total += n as u64;
    }
    match to.shutdown().await {
        Ok(()) => Ok(total),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(total),
        Err(_) => Err(total),
    }
}
