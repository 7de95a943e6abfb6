//! Per-request matching against compiled routes: pure functions of a request and a route.
