//! The frame reader finds every header however the stream is cut; the budget admits a burst,
//! earns back with time and new streams, and never counts acknowledgements.

use std::time::{Duration, Instant};

use super::{Budget, Frame, FrameReader, BURST, REFILL_PER_SECOND};

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .expect("small payload")
        .to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 1];
    f.extend_from_slice(payload);
    f
}

fn settings() -> Vec<u8> {
    frame(0x4, 0, &[])
}

/// The client's bytes: the preface, then `frames`.
fn stream(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    for f in frames {
        out.extend_from_slice(f);
    }
    out
}

#[test]
fn every_frame_header_is_found_whatever_the_reads_cut() {
    let frames = vec![
        settings(),
        frame(0x0, 0, &[7; 300]),
        frame(0x6, 0, &[1; 8]),
        frame(0x4, 0x1, &[]),
        frame(0x1, 0x4, &[9; 17]),
        frame(0x3, 0, &[0, 0, 0, 8]),
    ];
    let want: Vec<(u8, u8, u32)> = vec![
        (0x4, 0, 0),
        (0x0, 0, 300),
        (0x6, 0, 8),
        (0x4, 1, 0),
        (0x1, 4, 17),
        (0x3, 0, 4),
    ];
    let bytes = stream(&frames);
    for cut in [1, 2, 5, 9, 10, 24, 25, 64, bytes.len()] {
        let mut reader = FrameReader::default();
        let mut seen = Vec::new();
        for chunk in bytes.chunks(cut) {
            let refused = reader.feed(chunk, |f: Frame| {
                seen.push((f.kind, f.flags, f.len));
                true
            });
            assert_eq!(refused, None);
        }
        assert_eq!(seen, want, "reads of {cut} bytes");
    }
}

#[test]
fn a_refused_frame_and_what_follows_are_withheld() {
    let bytes = stream(&[settings(), frame(0x6, 0, &[1; 8]), settings()]);
    let mut reader = FrameReader::default();
    let mut n = 0;
    let at = reader.feed(&bytes, |_| {
        n += 1;
        n < 2
    });
    // The preface and the first SETTINGS pass; the PING (second frame) does not.
    assert_eq!(at, Some(24 + 9));
}

#[test]
fn the_budget_admits_a_burst_of_control_frames_then_refuses() {
    let t0 = Instant::now();
    let mut budget = Budget::new(t0);
    let settings = Frame {
        kind: 0x4,
        flags: 0,
        len: 0,
    };
    let admitted = (0..BURST * 10)
        .take_while(|_| budget.admit(settings, || t0))
        .count();
    assert_eq!(admitted, BURST as usize, "no time passed: the burst only");
    // Time earns frames back, at the refill rate.
    let later = t0 + Duration::from_secs(2);
    let again = (0..BURST)
        .take_while(|_| budget.admit(settings, || later))
        .count();
    assert_eq!(again, 2 * REFILL_PER_SECOND as usize);
}

#[test]
fn acks_and_data_are_free_and_streams_earn_frames_back() {
    let t0 = Instant::now();
    let mut budget = Budget::new(t0);
    let ping = Frame {
        kind: 0x6,
        flags: 0,
        len: 8,
    };
    let reset = Frame {
        kind: 0x3,
        flags: 0,
        len: 4,
    };
    for _ in 0..BURST {
        assert!(budget.admit(ping, || t0));
    }
    assert!(!budget.admit(reset, || t0), "spent");
    for free in [
        Frame {
            kind: 0x4,
            flags: 0x1,
            len: 0,
        },
        Frame {
            kind: 0x6,
            flags: 0x1,
            len: 8,
        },
        Frame {
            kind: 0x0,
            flags: 0,
            len: 1000,
        },
        Frame {
            kind: 0x8,
            flags: 0,
            len: 4,
        },
    ] {
        assert!(budget.admit(free, || t0), "{free:?} is not counted");
    }
    let headers = Frame {
        kind: 0x1,
        flags: 0x4,
        len: 20,
    };
    assert!(budget.admit(headers, || t0));
    assert!(
        budget.admit(reset, || t0),
        "a new stream may end in a reset"
    );
    assert!(!budget.admit(reset, || t0), "one reset per stream");
}
