//! Waiting and reading with a ceiling: nothing a test waits for is timed, but nothing waits
//! forever either.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// How long any one thing a test waits for may take before the test fails (a ceiling, not an
/// expectation: everything here takes milliseconds).
pub const CEILING: Duration = Duration::from_secs(20);

/// Waits for `fut`, failing the test with `what` after [`CEILING`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(CEILING, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
}

/// Polls `cond` until it holds, failing the test with `what` after [`CEILING`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + CEILING;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads one line (the whoami greeting).
pub async fn read_line(stream: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    within("a line", async {
        loop {
            let n = stream.read(&mut byte).await.expect("read a line");
            assert!(n == 1, "EOF before the end of the line: {line:?}");
            line.push(byte[0]);
            if byte[0] == b'\n' {
                break;
            }
        }
    })
    .await;
    String::from_utf8(line).expect("utf-8 line")
}

/// Reads until EOF; fails the test on an error (a reset).
pub async fn read_to_end(stream: &mut (impl AsyncReadExt + Unpin)) -> Vec<u8> {
    let mut out = Vec::new();
    within("EOF", stream.read_to_end(&mut out))
        .await
        .unwrap_or_else(|e| panic!("read to EOF: {e} (after {} bytes)", out.len()));
    out
}

/// Reads exactly `n` bytes.
pub async fn read_exact(stream: &mut (impl AsyncReadExt + Unpin), n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    within("bytes", stream.read_exact(&mut out))
        .await
        .unwrap_or_else(|e| panic!("read {n} bytes: {e}"));
    out
}

/// What the next read gives: data, EOF (`Ok(0)`), or the error (a reset).
pub async fn next_read(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 64 * 1024];
    let n = within("a read to return", stream.read(&mut buf)).await?;
    buf.truncate(n);
    Ok(buf)
}

/// Closes with RST (linger 0) instead of FIN.
pub fn reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("set linger 0");
    drop(stream);
}

/// `n` bytes of a pattern that differs at every offset of a 251-byte cycle (a lost, duplicated
/// or reordered chunk shows).
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// Fails with the length and the first differing offset rather than two long byte strings.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let at = got.iter().zip(want).position(|(a, b)| a != b);
    panic!(
        "{what}: got {} bytes, want {}; first difference at {at:?}",
        got.len(),
        want.len()
    );
}
