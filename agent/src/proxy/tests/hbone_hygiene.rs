//! HTTP/2 hygiene on 15008: a client that floods control frames over a real TLS HBONE
//! connection is cut off with GOAWAY ENHANCE_YOUR_CALM (or the connection closes) after a
//! bounded number of answers, as h2 servers do.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::fixture::*;
use crate::identity::Identity;
use crate::proxy::hbone::flood::BURST;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FLOOD: usize = 200_000;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small").to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// What the client read back before the connection ended.
#[derive(Debug, Default)]
struct Answers {
    /// Acknowledgements of the flooded kind (SETTINGS ACK or PING ACK).
    acks: usize,
    /// The GOAWAY's error code, if one came.
    goaway: Option<u32>,
}

/// Reads frames until GOAWAY, end of stream or an error (a reset after the server closed), or
/// until every frame sent was answered (the server did not cut the flood off).
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
        match header[3] {
            k if k == kind && header[4] & 0x1 != 0 => {
                answers.acks += 1;
                // The client's own SETTINGS is acknowledged too.
                if answers.acks >= FLOOD + usize::from(kind == SETTINGS) {
                    return answers;
                }
            }
            GOAWAY => {
                let code = payload
                    .get(4..8)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                answers.goaway = code;
                return answers;
            }
            _ => {}
        }
    }
}

/// Opens a real HBONE connection to a mesh pod and sends the preface, its SETTINGS, then
/// `FLOOD` frames of `kind`; checks the server cut it off, and returns how many streams it saw.
async fn flood_with(what: &str, kind: u8, payload: &[u8]) -> u64 {
    let mut world = World::new();
    let server = world.pod("server").node("n2").sa("beta").add();
    let outside = world.outside_ip();
    let mesh = world.start().await;
    let sleep = Identity::new("cluster.local", "mesh", "sleep");
    let (tls, _lease) = mesh
        .hbone_tls(&sleep, outside, &server, &server.identity())
        .await
        .unwrap_or_else(|e| panic!("a client of the mesh's CA connects: {e}"));
    let (r, mut w) = tokio::io::split(tls);
    let reader = tokio::spawn(read_answers(r, kind));
    let one = frame(kind, 0, 0, payload);
    let writer = tokio::spawn(async move {
        let mut start = PREFACE.to_vec();
        start.extend_from_slice(&frame(SETTINGS, 0, 0, &[]));
        if w.write_all(&start).await.is_err() {
            return 0;
        }
        // In writes of 1,000 frames; the server may close the connection at any point.
        let chunk: Vec<u8> = one.repeat(1000);
        let mut sent = 0;
        while sent < FLOOD {
            if w.write_all(&chunk).await.is_err() {
                break;
            }
            sent += 1000;
        }
        sent
    });
    let answers = within("the server ends the flood", reader)
        .await
        .expect("the reader");
    assert_cut_off(what, &answers);
    // The server closed: the writer's next write fails (it may have finished first).
    let _sent = within("the writer stops", writer).await;
    let n2 = mesh.node("n2");
    eventually("the flood is counted", || {
        n2.count(|c| &c.hbone_control_flood) == 1
    })
    .await;
    n2.count(|c| &c.hbone_inbound_streams)
}

fn assert_cut_off(what: &str, answers: &Answers) {
    // The client's own SETTINGS is acknowledged too (one more than the budget admits of a burst).
    assert!(
        answers.acks <= 2 * BURST as usize + 1,
        "{what}: {} acknowledgements of {FLOOD} frames: {answers:?}",
        answers.acks
    );
    assert!(
        answers.acks < FLOOD,
        "{what}: the flood was answered to the end: {answers:?}"
    );
    if let Some(code) = answers.goaway {
        assert_eq!(code, ENHANCE_YOUR_CALM, "{what}: {answers:?}");
    }
}

#[tokio::test]
async fn a_settings_flood_closes_the_connection() {
    let streams = flood_with("SETTINGS", SETTINGS, &[]).await;
    assert_eq!(streams, 0);
}

#[tokio::test]
async fn a_ping_flood_closes_the_connection() {
    flood_with("PING", PING, &[7; 8]).await;
}
