//! Optional bearer-token authentication of ingest requests.
use std::sync::Arc;

/// `None` = open.
#[derive(Clone, Debug, Default)]
pub struct BearerAuth {
    token: Option<Arc<[u8]>>,
}

impl BearerAuth {
    pub fn new(token: Option<&str>) -> Self {
        Self {
            token: token.map(|t| Arc::from(t.as_bytes())),
        }
    }

    /// Checks an `Authorization` header value (`Bearer <token>`), in constant
    /// time with respect to the token's content.
    pub fn allows(&self, authorization: Option<&[u8]>) -> bool {
        let Some(expected) = &self.token else {
            return true;
        };
        let Some(given) = authorization.and_then(|h| {
            let (scheme, rest) = h.split_at_checked(7)?;
            scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
        }) else {
            return false;
        };
        let given = given.trim_ascii();
        if given.len() != expected.len() {
            return false;
        }
        given
            .iter()
            .zip(expected.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// A tonic interceptor enforcing the token.
    #[allow(
        clippy::result_large_err,
        reason = "tonic's interceptor signature returns Status"
    )]
    pub fn intercept(&self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let header = req.metadata().get("authorization").map(|v| v.as_bytes());
        if self.allows(header) {
            Ok(req)
        } else {
            Err(tonic::Status::unauthenticated(
                "missing or wrong bearer token (Authorization: Bearer <token>)",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer() {
        assert!(BearerAuth::new(None).allows(None));
        let a = BearerAuth::new(Some("s3cret"));
        assert!(a.allows(Some(b"Bearer s3cret")));
        assert!(a.allows(Some(b"bearer s3cret ")));
        assert!(!a.allows(Some(b"Bearer s3cre")));
        assert!(!a.allows(Some(b"Basic s3cret")));
        assert!(!a.allows(Some(b"Bear")));
        assert!(!a.allows(None));
    }
}
