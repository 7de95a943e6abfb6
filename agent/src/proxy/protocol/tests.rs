//! Protocol selection's tests: `declared` (Istio's naming rules, as tables), `detect` (what first
//! bytes prove, from bytes alone), `sniff` (over loopback: waiting for bytes without consuming
//! them, timeouts, closed connections). Here: ClientHellos from a real rustls client.

mod declared;
