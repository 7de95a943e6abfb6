//! Istio's certificate service on the wire (`security/proto/providers/...` in istio/api,
//! package `istio.v1.auth`): the three messages of `CreateCertificate`, written with prost's
//! derive instead of generated (no protoc at build time), and the `google.protobuf.Struct` its
//! metadata uses. Field numbers and names are the proto's; they are an ABI shared with istiod and
//! ztunnel.

use std::collections::BTreeMap;

/// The gRPC path of `IstioCertificateService.CreateCertificate`.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// Istio: the metadata key a node agent (ztunnel) sets to ask for a certificate of a workload on
/// its node rather than of itself (`security.ImpersonatedIdentity`).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// Istio: the gRPC metadata that names the caller's cluster (`clusterid`); the CA validates the
/// token with that cluster's API server.
pub const CLUSTER_ID_HEADER: &str = "clusterid";

/// Istio's default cluster ID (`CLUSTER_ID` unset).
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// `istio.v1.auth.IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded certificate signing request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested lifetime in seconds; 0 or less asks for the CA's default.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Options such as `ImpersonatedIdentity`.
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<Struct>,
}

/// `istio.v1.auth.IstioCertificateResponse`: PEM certificates, leaf first, root last, one per
/// entry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// `google.protobuf.Struct`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Struct {
    #[prost(btree_map = "string, message", tag = "1")]
    pub fields: BTreeMap<String, Value>,
}

/// `google.protobuf.Value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Value {
    #[prost(oneof = "value::Kind", tags = "1, 2, 3, 4, 5, 6")]
    pub kind: Option<value::Kind>,
}

/// `google.protobuf.ListValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListValue {
    #[prost(message, repeated, tag = "1")]
    pub values: Vec<Value>,
}

pub mod value {
    /// The `kind` oneof of `google.protobuf.Value`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        /// `google.protobuf.NullValue` (an enum with the single value 0).
        #[prost(int32, tag = "1")]
        NullValue(i32),
        #[prost(double, tag = "2")]
        NumberValue(f64),
        #[prost(string, tag = "3")]
        StringValue(String),
        #[prost(bool, tag = "4")]
        BoolValue(bool),
        #[prost(message, tag = "5")]
        StructValue(super::Struct),
        #[prost(message, tag = "6")]
        ListValue(super::ListValue),
    }
}

impl Struct {
    /// A struct with one string field.
    pub fn with_string(key: &str, value: &str) -> Struct {
        let mut fields = BTreeMap::new();
        fields.insert(
            key.to_owned(),
            Value {
                kind: Some(value::Kind::StringValue(value.to_owned())),
            },
        );
        Struct { fields }
    }

    /// The string value of `key`, if it is there and a string (as Go's `GetStringValue`, which
    /// istiod uses, an absent or non-string value reads as empty).
    pub fn string(&self, key: &str) -> Option<&str> {
        match self.fields.get(key)?.kind.as_ref()? {
            value::Kind::StringValue(s) if !s.is_empty() => Some(s),
            _ => None,
        }
    }
}

/// PEM-encodes DER under `label` (64-column base64 lines, as RFC 7468 asks).
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
