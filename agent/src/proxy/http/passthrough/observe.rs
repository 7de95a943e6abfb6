//! What the relay does with a request's head beyond counting it, when the workload's settings ask
//! for it, as the full server does (`inbound::Served::request`): its SERVER span (the context
//! decided from the caller's headers, the span recorded when reported, the context for the next
//! hop written in place of the caller's) and its access-log fields.
//!
//! A span that is not reported (99 % of requests at Istio's default 1 % sampling) needs only the
//! caller's trace headers: [`context`] reads them from the raw head, in place, and [`carried`]
//! copies every other line as it came, with the next hop's context in place of the caller's. No
//! `HeaderMap` is built for them (its hashing and copies were most of what tracing cost per
//! request at the destination). Only a reported
//! span or an access-log line takes the head apart into `http`'s types ([`Head`]).

use http::{HeaderMap, HeaderName, HeaderValue};

use super::{Conn, REQUEST_ID_NAME};
use crate::config::telemetry::TracingSettings;
use crate::proxy::access_log::RequestFields;
use crate::proxy::metrics::inbound_cluster;
use crate::proxy::metrics::requests::RequestResult;
use crate::proxy::spans::{self, Begun};
use crate::trace::{self, Firsts, NextHop, CONTEXT_HEADERS};

/// A request head with its headers as `http`'s types.
pub(super) struct Head<'a> {
    method: &'a str,
    /// The request target (origin-form: path and query).
    target: &'a str,
    headers: HeaderMap,
}

impl<'a> Head<'a> {
    /// `raw`, a whole head the relay follows; None when a header does not fit `http`'s types.
    pub(super) fn parse(raw: &'a [u8]) -> Option<Head<'a>> {
        let mut parsed = [httparse::EMPTY_HEADER; super::framing::MAX_HEADERS];
        let mut req = httparse::Request::new(&mut parsed);
        let (method, target) = match req.parse(raw) {
            Ok(httparse::Status::Complete(_)) => (req.method?, req.path?),
            _ => return None,
        };
        let mut headers = HeaderMap::with_capacity(req.headers.len() + 6);
        for h in req.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
            headers.append(name, HeaderValue::from_bytes(h.value).ok()?);
        }
        Some(Head {
            method,
            target,
            headers,
        })
    }

    #[cfg(test)]
    pub(super) fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The request's `x-request-id`: `added` (then set in the head), else its own.
    pub(super) fn request_id(&mut self, added: Option<HeaderValue>) -> HeaderValue {
        match added {
            Some(id) => {
                self.headers.insert(REQUEST_ID_NAME, id.clone());
                id
            }
            None => self
                .headers
                .get(REQUEST_ID_NAME)
                .cloned()
                .unwrap_or_else(|| HeaderValue::from_static("-")),
        }
    }

    fn authority(&self) -> &str {
        self.headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
    }

    /// The access log's fields of the request (as `outbound::log_fields` makes them).
    pub(super) fn log_fields(&self, request_id: &HeaderValue, port: u16) -> RequestFields {
        RequestFields {
            method: self.method.to_owned(),
            path: self.target.to_owned(),
            authority: self.authority().to_owned(),
            protocol: "HTTP/1.1",
            response_code: 0,
            details: "-",
            grpc_status: None,
            request_id: request_id.to_str().unwrap_or("-").to_owned(),
            user_agent: self
                .headers
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            route_name: None,
            upstream_cluster: Some(inbound_cluster(port)),
        }
    }

    /// Does the SERVER side's tracing and returns the head to send the app: the request line and
    /// the headers as hyper's client would write the same request (names in lower case, a
    /// name's values together and in their order), with the context for the next hop (B3 and/or
    /// W3C, the provider's propagation) in place of the caller's.
    pub(super) fn traced(
        mut self,
        conn: &Conn<'_>,
        tracing: &TracingSettings,
        begun: Begun,
        result: &mut RequestResult,
    ) -> Vec<u8> {
        if begun.reported() {
            let authority = self.authority().to_owned();
            let host = match &conn.labels.service {
                Some(service) => service.0.hostname.clone(),
                None => super::super::target::split_authority(&authority)
                    .0
                    .into_owned(),
            };
            let target = self.target;
            let path = target.split_once('?').map_or(target, |(p, _)| p);
            result.cluster_name = Some(inbound_cluster(conn.dst.port()));
            result.span = begun.record(
                conn.pi,
                conn.pod,
                tracing,
                spans::Start {
                    host: &host,
                    port: conn.dst.port(),
                    method: self.method,
                    authority: &authority,
                    path,
                    version: http::Version::HTTP_11,
                    peer: Some(conn.peer.ip()),
                },
                &mut self.headers,
            );
        } else {
            begun.carry(tracing, &mut self.headers);
        }
        let mut out = Vec::with_capacity(self.target.len() + 512);
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// The header lines of the raw head `raw` (request line and blank line left out), each without
/// its CRLF. The relay follows only heads without bare LFs or folded lines (`framing`).
fn header_lines(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    let body = raw.strip_suffix(b"\r\n\r\n").unwrap_or(raw);
    let mut start = 0;
    let ends = memchr::memchr_iter(b'\n', body).chain(std::iter::once(body.len()));
    ends.map(move |end| {
        let line = &body[start..end];
        start = end + 1;
        line.strip_suffix(b"\r").unwrap_or(line)
    })
    .skip(1)
}

/// The context header a line is, if it is one: its place in [`CONTEXT_HEADERS`] and its value.
fn context_header(line: &[u8]) -> Option<(usize, &[u8])> {
    let colon = memchr::memchr(b':', line)?;
    let i = trace::context_index(&line[..colon])?;
    Some((i, line[colon + 1..].trim_ascii()))
}

/// The caller's trace headers, read in place from the raw head (what `spans::begin_from` decides
/// on, with no `HeaderMap` built); None when one is not a valid header value (the full server
/// answers the request then).
pub(super) fn context(raw: &[u8]) -> Option<Firsts<'_>> {
    let mut firsts = Firsts::default();
    for (i, value) in header_lines(raw).filter_map(context_header) {
        // `HeaderValue::from_bytes`'s rule.
        if !value.iter().all(|&b| b >= 32 && b != 127 || b == b'\t') {
            return None;
        }
        firsts.note(i, value);
    }
    Some(firsts)
}

/// The head to send the app for a request whose span is not reported: the request line and
/// every header line as they came, in their order, except the caller's context headers that the
/// next hop's replace; then the next hop's (`Begun::next_hop`, what the full server writes) and
/// `request_id`, when given.
pub(super) fn carried(raw: &[u8], next_hop: &NextHop, request_id: Option<&HeaderValue>) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + 192);
    let line_end = raw.windows(2).position(|w| w == b"\r\n").unwrap_or(0);
    out.extend_from_slice(&raw[..line_end + 2]);
    for line in header_lines(raw) {
        // `x-b3-flags` is read, never rewritten: it stays where it was, as do the formats the
        // next hop does not write.
        if context_header(line).is_none_or(|(i, _)| !next_hop.replaces(&CONTEXT_HEADERS[i])) {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
    }
    let id = request_id.map(|id| (REQUEST_ID_NAME.as_bytes(), id.as_bytes()));
    let next_hop = next_hop.headers().map(|(n, v)| (n.as_str().as_bytes(), v));
    for (name, value) in next_hop.chain(id) {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}
