//! HTTP/2 hygiene on 15008: a client that floods control frames (SETTINGS, PING, RST_STREAM,
//! empty DATA) over a real TLS HBONE connection is cut off with GOAWAY ENHANCE_YOUR_CALM (or the
//! connection closes) after a bounded number of answers, as h2 servers do. Each flood ends with a
//! probe (a PING of its own): a server that let the flood through answers it, and the test fails
//! there instead of waiting.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::fixture::*;
use crate::identity::Identity;
use crate::proxy::hbone::flood::BURST;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FLOOD: usize = 200_000;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ENHANCE_YOUR_CALM: u32 = 0xb;
const CANCEL: [u8; 4] = [0, 0, 0, 0x8];
const PROBE: [u8; 8] = *b"probe!!!";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small").to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HEADERS opening stream `id` with a CONNECT to `authority`: HPACK literals without indexing,
/// with the static table's names (`:method` is index 2, `:authority` index 1).
fn connect(id: u32, authority: &str) -> Vec<u8> {
    let mut block = vec![0x02, 7];
    block.extend_from_slice(b"CONNECT");
    block.push(0x01);
    block.push(u8::try_from(authority.len()).expect("short authority"));
    block.extend_from_slice(authority.as_bytes());
    frame(HEADERS, END_HEADERS, id, &block)
}

/// What the client read back before the connection ended.
#[derive(Debug, Default)]
struct Answers {
    /// Acknowledgements of flooded SETTINGS or PING frames.
    acks: usize,
    /// The GOAWAY's error code, if one came.
    goaway: Option<u32>,
    /// The probe after the flood was answered: the server processed the whole flood.
    probe_answered: bool,
}

/// Reads frames until GOAWAY, the probe's answer, end of stream or an error (a reset after the
/// server closed).
async fn read_answers(mut r: impl tokio::io::AsyncRead + Unpin, kind: u8) -> Answers {
    let mut answers = Answers::default();
    let mut header = [0u8; 9];
    loop {
        if r.read_exact(&mut header).await.is_err() {
            return answers;
        }
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; len];
        if r.read_exact(&mut payload).await.is_err() {
            return answers;
        }
        let acked = header[4] & ACK != 0;
        match header[3] {
            PING if acked && payload == PROBE => {
                answers.probe_answered = true;
                return answers;
            }
            k if k == kind && acked => answers.acks += 1,
            GOAWAY => {
                answers.goaway = payload
                    .get(4..8)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                return answers;
            }
            _ => {}
        }
    }
}

/// Opens a real HBONE connection to a mesh pod (whose app listens on 8080) and sends the
/// preface, its SETTINGS, `prelude(pod)`, `FLOOD` copies of `flood`, then the probe; returns what
/// came back and the mesh.
async fn flood_with(
    what: &str,
    kind: u8,
    prelude: impl FnOnce(&Pod) -> Vec<u8>,
    flood: Vec<u8>,
) -> (Answers, Mesh) {
    let mut world = World::new();
    let server = world.pod("server").node("n2").sa("beta").add();
    let outside = world.outside_ip();
    let mesh = world.start().await;
    let _app = mesh.whoami(server.addr(8080)).await;
    let sleep = Identity::new("cluster.local", "mesh", "sleep");
    let (tls, _lease) = mesh
        .hbone_tls(&sleep, outside, &server, &server.identity())
        .await
        .unwrap_or_else(|e| panic!("a client of the mesh's CA connects: {e}"));
    let (r, mut w) = tokio::io::split(tls);
    let reader = tokio::spawn(read_answers(r, kind));
    let mut start = PREFACE.to_vec();
    start.extend_from_slice(&frame(SETTINGS, 0, 0, &[]));
    start.extend_from_slice(&prelude(&server));
    let writer = tokio::spawn(async move {
        if w.write_all(&start).await.is_err() {
            return;
        }
        // In writes of 1,000 frames; the server may close the connection at any point.
        let chunk: Vec<u8> = flood.repeat(1000);
        for _ in 0..FLOOD / 1000 {
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = w.write_all(&frame(PING, 0, 0, &PROBE)).await;
        // Keep the write side open: the reader decides when it is over.
        std::future::pending::<()>().await;
    });
    let answers = within("the server ends the flood", reader)
        .await
        .expect("the reader");
    writer.abort();
    assert!(
        !answers.probe_answered,
        "{what}: the flood was processed to the end: {answers:?}"
    );
    assert!(
        answers.acks <= 2 * BURST as usize + 1,
        "{what}: {} acknowledgements of {FLOOD} frames: {answers:?}",
        answers.acks
    );
    if let Some(code) = answers.goaway {
        assert_eq!(code, ENHANCE_YOUR_CALM, "{what}: {answers:?}");
    }
    (answers, mesh)
}

/// Waits for the server to count the connection it closed for flooding; its streams.
async fn counted_flood(mesh: &Mesh) -> u64 {
    let n2 = mesh.node("n2");
    eventually("the flood is counted", || {
        n2.count(|c| &c.hbone_control_flood) == 1
    })
    .await;
    n2.count(|c| &c.hbone_inbound_streams)
}

#[tokio::test]
async fn a_settings_flood_closes_the_connection() {
    let (answers, mesh) = flood_with(
        "SETTINGS",
        SETTINGS,
        |_| Vec::new(),
        frame(SETTINGS, 0, 0, &[]),
    )
    .await;
    // The budget's burst, with the client's own SETTINGS among them.
    assert_eq!(answers.acks, BURST as usize, "{answers:?}");
    assert_eq!(counted_flood(&mesh).await, 0, "no stream was opened");
}

#[tokio::test]
async fn a_ping_flood_closes_the_connection() {
    let (answers, mesh) =
        flood_with("PING", PING, |_| Vec::new(), frame(PING, 0, 0, &[7; 8])).await;
    assert!(answers.acks < FLOOD, "{answers:?}");
    counted_flood(&mesh).await;
}

/// RST_STREAM again and again on a stream already reset: h2 ignores each; the budget does not.
#[tokio::test]
async fn a_reset_flood_closes_the_connection() {
    let prelude = |pod: &Pod| {
        let mut p = connect(1, &pod.addr(8080).to_string());
        p.extend_from_slice(&frame(RST_STREAM, 0, 1, &CANCEL));
        p
    };
    let (_, mesh) = flood_with(
        "RST_STREAM",
        RST_STREAM,
        prelude,
        frame(RST_STREAM, 0, 1, &CANCEL),
    )
    .await;
    // The stream may be reset before the server accepts it.
    assert!(counted_flood(&mesh).await <= 1);
}

/// Empty DATA frames on an open tunnel: h2 bounds them itself (GOAWAY ENHANCE_YOUR_CALM after
/// 100), before the budget is involved.
#[tokio::test]
async fn an_empty_data_flood_closes_the_connection() {
    let prelude = |pod: &Pod| connect(1, &pod.addr(8080).to_string());
    let (answers, _mesh) = flood_with("empty DATA", DATA, prelude, frame(DATA, 0, 1, &[])).await;
    assert_eq!(answers.goaway, Some(ENHANCE_YOUR_CALM), "{answers:?}");
}
