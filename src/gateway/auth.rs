//! Optional bearer tokens: `Authorization: Bearer T` or InfluxDB's `Authorization: Token T`.
//!
//! Tokens are kept as SHA-256 digests and a presented token's digest is compared with every
//! one of them in constant time (`subtle`), so neither the contents nor the length of a
//! configured token leak through timing. A token may be limited to serverIds with a prefix.

use std::path::Path;

use anyhow::Context;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// One accepted token.
pub struct Token {
    digest: [u8; 32],
    /// When set, the token may only write serverIds starting with this.
    prefix: Option<String>,
}

fn digest(token: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(&Sha256::digest(token));
    out
}

/// `TOKEN` or `TOKEN PREFIX`.
fn parse_entry(entry: &str) -> anyhow::Result<Option<Token>> {
    let mut parts = entry.split_whitespace();
    let Some(token) = parts.next() else { return Ok(None) };
    let prefix = parts.next().map(str::to_owned);
    anyhow::ensure!(parts.next().is_none(), "a token entry is `TOKEN` or `TOKEN PREFIX`, found more words");
    Ok(Some(Token { digest: digest(token.as_bytes()), prefix }))
}

/// The tokens of `--tokens` and `--tokens-file` (none: no authentication).
pub fn load(list: &[String], file: Option<&Path>) -> anyhow::Result<Vec<Token>> {
    let mut tokens = Vec::new();
    for entry in list {
        tokens.extend(parse_entry(entry).context("--tokens")?);
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let before = tokens.len();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            tokens.extend(parse_entry(line).with_context(|| format!("{} line {}", path.display(), n + 1))?);
        }
        anyhow::ensure!(tokens.len() > before, "{} holds no token", path.display());
    }
    Ok(tokens)
}

fn unauthorized(message: &str) -> Response {
    let mut response = (StatusCode::UNAUTHORIZED, axum::Json(json!({"accepted": 0, "error": message}))).into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Ok(the token's serverId prefix, if any) when the request may write; else a 401 reply.
pub fn check(tokens: &[Token], headers: &HeaderMap) -> Result<Option<String>, Response> {
    if tokens.is_empty() {
        return Ok(None);
    }
    let presented = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
        let (scheme, token) = v.trim().split_once(' ')?;
        let known = scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token");
        known.then(|| token.trim())
    });
    let Some(presented) = presented else {
        return Err(unauthorized("missing `Authorization: Bearer <token>` (or `Token <token>`)"));
    };
    let presented = digest(presented.as_bytes());
    let mut found = None;
    for token in tokens {
        if bool::from(token.digest.ct_eq(&presented)) && found.is_none() {
            found = Some(token);
        }
    }
    match found {
        Some(token) => Ok(token.prefix.clone()),
        None => Err(unauthorized("token not accepted")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn bearer_and_token_schemes_with_prefixes() {
        let tokens = load(&["alpha".into(), "beta acme-".into()], None).unwrap();
        assert_eq!(check(&tokens, &headers("Bearer alpha")).unwrap(), None);
        assert_eq!(check(&tokens, &headers("Token beta")).unwrap().as_deref(), Some("acme-"));
        assert_eq!(check(&tokens, &headers("bearer  beta ")).unwrap().as_deref(), Some("acme-"));
        assert_eq!(check(&tokens, &headers("Bearer gamma")).unwrap_err().status(), StatusCode::UNAUTHORIZED);
        assert_eq!(check(&tokens, &headers("Basic alpha")).unwrap_err().status(), StatusCode::UNAUTHORIZED);
        assert_eq!(check(&tokens, &HeaderMap::new()).unwrap_err().status(), StatusCode::UNAUTHORIZED);
        assert_eq!(check(&[], &HeaderMap::new()).unwrap(), None);
        assert!(load(&["a b c".into()], None).is_err());
    }
}
