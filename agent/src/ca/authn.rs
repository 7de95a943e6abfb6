//! Who is calling: the bearer token of a request, validated by the API server's TokenReview
//! (as istiod's `KubeJWTAuthenticator`), with the bound pod claims a projected token carries.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};

use super::service::Denial;

/// Kubernetes: the extra fields of a bound (projected) token's user info that name its pod.
const POD_NAME_CLAIM: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_CLAIM: &str = "authentication.kubernetes.io/pod-uid";
const SA_PREFIX: &str = "system:serviceaccount:";

/// An authenticated caller: a ServiceAccount, and the pod its token is bound to (if any).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    pub pod: Option<(String, String)>,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)?;
        if let Some((name, uid)) = &self.pod {
            write!(f, " (pod {}/{name} uid {uid})", self.namespace)?;
        }
        Ok(())
    }
}

pub struct TokenReviewer {
    api: Api<TokenReview>,
    audiences: Vec<String>,
}

impl TokenReviewer {
    pub fn new(client: Client, audiences: Vec<String>) -> TokenReviewer {
        TokenReviewer {
            api: Api::all(client),
            audiences,
        }
    }

    /// Asks the API server whether `token` is a valid ServiceAccount token for our audiences.
    pub async fn review(&self, token: &str) -> Result<Caller, Denial> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..Default::default()
        };
        let answer = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                Denial::unavailable("token_review_failed", format!("TokenReview failed: {e}"))
            })?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "no reason given".into());
            return Err(Denial::unauthenticated(
                "token_rejected",
                format!("token rejected by TokenReview: {why}"),
            ));
        }
        // The API server answers with the audiences of ours the token has; none of them means
        // the token was not minted for this CA (an API server that ignores audiences).
        if !self.audiences.is_empty() {
            let got = status.audiences.unwrap_or_default();
            if !self.audiences.iter().any(|a| got.contains(a)) {
                return Err(Denial::unauthenticated(
                    "token_audience",
                    format!(
                        "token audiences {got:?} include none of {:?}",
                        self.audiences
                    ),
                ));
            }
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let (namespace, service_account) = username
            .strip_prefix(SA_PREFIX)
            .and_then(|rest| rest.split_once(':'))
            .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty())
            .ok_or_else(|| {
                Denial::unauthenticated(
                    "not_service_account",
                    format!("token user {username:?} is not a ServiceAccount"),
                )
            })?;
        let extra = user.extra.unwrap_or_default();
        let claim = |key: &str| {
            extra
                .get(key)
                .and_then(|v| v.first())
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let pod = claim(POD_NAME_CLAIM).zip(claim(POD_UID_CLAIM));
        Ok(Caller {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pod,
        })
    }
}
