//! Who may call the server: browsers' cross-origin calls (`--cors-origin`) and the API key
//! (`--api-key`).

use super::api::ApiError;
use super::App;
use axum::http::{HeaderMap, StatusCode};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

/// Browsers' cross-origin calls from `origins` (`--cors-origin`; `*`: any), answered
/// preflights included; None when no origin is given. An origin that is not one is refused,
/// named.
pub fn cors(origins: &[String]) -> Result<Option<CorsLayer>, String> {
    use axum::http::{HeaderValue, Method};
    let allow = match origins {
        [] => return Ok(None),
        [any] if any == "*" => AllowOrigin::any(),
        _ if origins.iter().any(|o| o == "*") => {
            return Err(
                "--cors-origin *: any origin already includes the others; give * alone, or \
                 only the origins to allow"
                    .into(),
            )
        }
        _ => {
            let mut values = vec![];
            for o in origins {
                let (scheme, rest) = o.split_once("://").unwrap_or_default();
                let value = HeaderValue::from_str(o).ok().filter(|_| {
                    matches!(scheme, "http" | "https") && !rest.is_empty() && !rest.contains('/')
                });
                values.push(value.ok_or_else(|| {
                    format!(
                        "--cors-origin {o}: not an origin; give scheme://host[:port], as a \
                         browser sends it (http://localhost:3000), or * for any"
                    )
                })?);
            }
            AllowOrigin::list(values)
        }
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            // Whatever headers the page's client sends (OpenAI's JS SDK adds `x-stainless-*`
            // ones): the origin is what is checked, and every request still needs the key.
            .allow_headers(AllowHeaders::mirror_request())
            .max_age(std::time::Duration::from_secs(3600)),
    ))
}

/// Whether `headers` carry the server's API key, where it has one.
pub fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &app.api_key else {
        return Ok(());
    };
    // The scheme's name is case-insensitive (RFC 9110, 11.1).
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError::with(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "missing or wrong API key: send `Authorization: Bearer <key>` with the --api-key the server was started with",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cors_origins_are_checked() {
        let given = |o: &[&str]| cors(&o.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(given(&[]).unwrap().is_none());
        assert!(given(&["*"]).unwrap().is_some());
        assert!(given(&["http://localhost:3000", "https://a.example"])
            .unwrap()
            .is_some());
        let e = given(&["*", "http://a.example"]).err().unwrap();
        assert!(e.contains("give * alone"), "{e}");
        for bad in ["localhost:3000", "http://a.example/", "ftp://a.example"] {
            let e = given(&[bad]).err().unwrap();
            assert!(
                e.contains(&format!("--cors-origin {bad}: not an origin")),
                "{e}"
            );
        }
    }
}
