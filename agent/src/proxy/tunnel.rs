//! Splices a TCP connection with one HBONE stream (an HTTP/2 CONNECT stream), both ways, with the
//! same end-of-connection behaviour as the plain relay: a FIN on one side ends that direction with
//! END_STREAM (and END_STREAM becomes a FIN); a reset on either side resets the other
//! (RST_STREAM CONNECT_ERROR, as RFC 9113 §8.5 asks of a CONNECT proxy, or a TCP RST).

use std::future::poll_fn;
use std::io;

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::relay::RelayOutcome;

const INITIAL_BUF: usize = 16 * 1024;
const LARGE_BUF: usize = 256 * 1024;
const FULL_READS_TO_GROW: u32 = 4;

/// Relays between `tcp` and the stream until both directions are done. `a_to_b` counts TCP → tunnel.
pub async fn splice(tcp: TcpStream, mut send: SendStream<Bytes>, recv: RecvStream) -> RelayOutcome {
    let (mut r, mut w) = tcp.into_split();
    let mut recv = recv;
    let (mut up, mut down, mut reset) = (None, None, false);
    {
        let a = tcp_to_stream(&mut r, &mut send);
        let b = stream_to_tcp(&mut recv, &mut w);
        tokio::pin!(a, b);
        while up.is_none() || down.is_none() {
            tokio::select! {
                res = &mut a, if up.is_none() => match res {
                    Ok(n) => up = Some(n),
                    Err(n) => { up = Some(n); reset = true; break; }
                },
                res = &mut b, if down.is_none() => match res {
                    Ok(n) => down = Some(n),
                    Err(n) => { down = Some(n); reset = true; break; }
                },
            }
        }
    }
    if reset {
        send.send_reset(Reason::CONNECT_ERROR);
        if let Ok(stream) = r.reunite(w) {
            let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
        }
    }
    RelayOutcome {
        a_to_b: up.unwrap_or(0),
        b_to_a: down.unwrap_or(0),
        reset,
    }
}

/// TCP → DATA frames, honouring the peer's flow-control window. EOF → END_STREAM.
async fn tcp_to_stream(from: &mut OwnedReadHalf, to: &mut SendStream<Bytes>) -> Result<u64, u64> {
    let mut buf_size = INITIAL_BUF;
    let mut full_reads = 0u32;
    let mut buf = BytesMut::with_capacity(buf_size);
    let mut total = 0u64;
    loop {
        buf.reserve(buf_size);
        let n = match from.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(_) => return Err(total),
        };
        if n >= buf_size && buf_size < LARGE_BUF {
            full_reads += 1;
            if full_reads >= FULL_READS_TO_GROW {
                buf_size = LARGE_BUF;
            }
        } else {
            full_reads = 0;
        }
        let mut data = buf.split().freeze();
        while !data.is_empty() {
            to.reserve_capacity(data.len());
            let granted = match poll_fn(|cx| to.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                // The stream was reset or the connection failed.
                _ => return Err(total),
            };
            if granted == 0 {
                continue;
            }
            let chunk = data.split_to(granted.min(data.len()));
            if to.send_data(chunk, false).is_err() {
                return Err(total);
            }
        }
        total += n as u64;
    }
    to.send_data(Bytes::new(), true).map_err(|_| total)?;
    Ok(total)
}

/// DATA frames → TCP; window released only once the bytes are written, so a slow reader slows the
/// sender. END_STREAM → FIN.
async fn stream_to_tcp(from: &mut RecvStream, to: &mut OwnedWriteHalf) -> Result<u64, u64> {
    let mut total = 0u64;
    while let Some(chunk) = from.data().await {
        let Ok(chunk) = chunk else {
            return Err(total);
        };
        let n = chunk.len();
        if to.write_all(&chunk).await.is_err() {
            return Err(total);
        }
        let _ = from.flow_control().release_capacity(n);
        total += n as u64;
    }
    match to.shutdown().await {
        Ok(()) => Ok(total),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(total),
        Err(_) => Err(total),
    }
}
