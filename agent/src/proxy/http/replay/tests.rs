use std::convert::Infallible;

use bytes::Bytes;
use futures::stream;
use http::HeaderMap;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;

use super::*;

type Chunks = StreamBody<stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

fn body(chunks: &[&'static str], trailers: Option<(&'static str, &'static str)>) -> Chunks {
    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = chunks
        .iter()
        .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
        .collect();
    if let Some((k, v)) = trailers {
        let mut t = HeaderMap::new();
        t.insert(k, v.parse().unwrap());
        frames.push(Ok(Frame::trailers(t)));
    }
    StreamBody::new(stream::iter(frames))
}

/// Every frame of a body: data as strings, trailers as `k=v`.
async fn frames<B: Body<Data = Bytes> + Unpin>(mut b: B) -> Result<Vec<String>, B::Error> {
    let mut out = Vec::new();
    while let Some(f) = b.frame().await {
        let f = f?;
        match f.into_data() {
            Ok(d) => out.push(String::from_utf8(d.to_vec()).unwrap()),
            Err(f) => {
                for (k, v) in f.into_trailers().unwrap().iter() {
                    out.push(format!("{k}={}", v.to_str().unwrap()));
                }
            }
        }
    }
    Ok(out)
}

#[tokio::test]
async fn a_retry_sends_the_same_body_and_trailers_again() {
    let mut replay = Replay::new(body(&["ab", "cd", "ef"], Some(("grpc-status", "0"))));
    let first = frames(replay.attempt().unwrap()).await.unwrap();
    assert_eq!(first, ["ab", "cd", "ef", "grpc-status=0"]);
    assert!(replay.replayable());
    let second = frames(replay.attempt().unwrap()).await.unwrap();
    assert_eq!(second, first);
    let third = frames(replay.attempt().unwrap()).await.unwrap();
    assert_eq!(third, first);
}

#[tokio::test]
async fn a_retry_after_a_partly_sent_body_replays_what_was_read_then_reads_on() {
    let mut replay = Replay::new(body(&["ab", "cd", "ef"], None));
    let mut first = replay.attempt().unwrap();
    let chunk = first.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(chunk, "ab");
    drop(first); // the attempt failed after sending one chunk
    let second = frames(replay.attempt().unwrap()).await.unwrap();
    assert_eq!(second, ["ab", "cd", "ef"]);
}

#[tokio::test]
async fn a_body_over_the_limit_streams_whole_to_its_attempt_and_is_not_replayed() {
    // Envoy: a body that outgrows the buffer abandons the retry, not the request.
    let mut replay = Replay::with_limit(body(&["0123456789", "0123456789", "xy"], None), 15);
    let first = frames(replay.attempt().unwrap()).await.unwrap();
    assert_eq!(first, ["0123456789", "0123456789", "xy"]);
    assert!(!replay.replayable());
    assert!(
        replay.attempt().is_none(),
        "no attempt gets a body with a hole"
    );
}

#[tokio::test]
async fn a_body_exactly_at_the_limit_is_replayed() {
    let mut replay = Replay::with_limit(body(&["01234", "56789"], None), 10);
    assert_eq!(frames(replay.attempt().unwrap()).await.unwrap().len(), 2);
    assert_eq!(
        frames(replay.attempt().unwrap()).await.unwrap(),
        ["01234", "56789"]
    );
}

#[tokio::test]
async fn an_abandoned_attempt_fails_instead_of_ending_its_body_early() {
    // Ending it would make the upstream see a truncated body as complete.
    let mut replay = Replay::new(body(&["ab", "cd"], None));
    let mut old = replay.attempt().unwrap();
    assert!(old.frame().await.unwrap().is_ok());
    let new = replay.attempt().unwrap();
    let err = old.frame().await.unwrap().unwrap_err();
    assert!(err.to_string().contains("newer attempt"), "{err}");
    assert_eq!(frames(new).await.unwrap(), ["ab", "cd"]);
}

#[tokio::test]
async fn sizes_are_exact_when_the_app_said_so() {
    let mut replay = Replay::new(Full::new(Bytes::from_static(b"hello")));
    let first = replay.attempt().unwrap();
    assert_eq!(first.size_hint().exact(), Some(5));
    assert_eq!(frames(first).await.unwrap(), ["hello"]);
    let second = replay.attempt().unwrap();
    assert_eq!(second.size_hint().exact(), Some(5));
    assert!(!second.is_end_stream());
    assert_eq!(frames(second).await.unwrap(), ["hello"]);
}

#[tokio::test]
async fn an_empty_body_ends_at_once_on_every_attempt() {
    let mut replay = Replay::new(http_body_util::Empty::<Bytes>::new());
    assert!(frames(replay.attempt().unwrap()).await.unwrap().is_empty());
    let again = replay.attempt().unwrap();
    assert!(again.is_end_stream());
    assert!(frames(again).await.unwrap().is_empty());
}
