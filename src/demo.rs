//! The demo whiteboard page, served at `/`.
//!
//! A small page a newcomer can open in a browser: freehand strokes and sticky notes in a
//! Yjs document synced through the whiteboard endpoint, other users' cursors from
//! awareness, a chat panel on the tutor endpoint, and a connection indicator. It reads
//! `?session=ID&token=JWT` from its address (the links `easel serve` prints when it runs
//! with the development secret it keeps in the data directory, or one minted with
//! `easel token`).
//!
//! The page's source is in `web/` (pinned `yjs` and `y-websocket`); `scripts/build-demo.sh`
//! bundles its script into `assets/demo/app.js`, which is committed and embedded here with
//! `web/index.html` and `web/style.css` by `include_bytes!`, so building and running the
//! server needs no Node. Routes:
//! `/` (index.html), `/demo/app.js`, `/demo/style.css`. Each answer carries an `ETag`
//! computed at compile time and is revalidated on every load (`no-cache`), so a new
//! binary never serves a stale page; the page's `Referrer-Policy` keeps the token in its
//! address from leaking.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// One embedded file.
struct Asset {
    body: &'static [u8],
    content_type: &'static str,
    etag: &'static str,
}

/// FNV-1a, evaluated at compile time for the ETags.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

/// `"` + 16 hex digits + `"`, at compile time.
const fn etag(bytes: &[u8]) -> [u8; 18] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let h = fnv1a(bytes);
    let mut out = [b'"'; 18];
    let mut i = 0;
    while i < 16 {
        out[1 + i] = HEX[((h >> (60 - 4 * i)) & 0xf) as usize];
        i += 1;
    }
    out
}

macro_rules! asset {
    ($path:literal, $content_type:literal) => {{
        const BODY: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/", $path));
        const TAG: [u8; 18] = etag(BODY);
        Asset {
            body: BODY,
            content_type: $content_type,
            etag: match std::str::from_utf8(&TAG) {
                Ok(s) => s,
                Err(_) => panic!("etag is ASCII"),
            },
        }
    }};
}

static INDEX: Asset = asset!("web/index.html", "text/html; charset=utf-8");
static APP_JS: Asset = asset!("assets/demo/app.js", "text/javascript; charset=utf-8");
static STYLE: Asset = asset!("web/style.css", "text/css; charset=utf-8");

/// The page may talk only to this server (its own WebSockets and HTTP API).
const CSP: &str = "default-src 'self'; img-src 'self' data:; connect-src 'self' ws: wss:; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The routes of the demo page, to be merged into the server's router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|h: HeaderMap| async move { serve(&INDEX, &h) }))
        .route(
            "/demo/app.js",
            get(|h: HeaderMap| async move { serve(&APP_JS, &h) }),
        )
        .route(
            "/demo/style.css",
            get(|h: HeaderMap| async move { serve(&STYLE, &h) }),
        )
}

fn serve(asset: &'static Asset, request: &HeaderMap) -> Response {
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim() == asset.etag || t.trim() == "*")
        });
    let mut headers = HeaderMap::new();
    headers.insert(header::ETAG, HeaderValue::from_static(asset.etag));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if fresh {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    if asset.content_type.starts_with("text/html") {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    (StatusCode::OK, headers, asset.body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_quoted_hex_and_differ() {
        for a in [&INDEX, &APP_JS, &STYLE] {
            assert_eq!(a.etag.len(), 18);
            assert!(a.etag.starts_with('"') && a.etag.ends_with('"'));
            assert!(a.etag[1..17].bytes().all(|b| b.is_ascii_hexdigit()));
        }
        assert_ne!(INDEX.etag, APP_JS.etag);
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
    }

    #[test]
    fn the_page_loads_its_bundle_and_stylesheet() {
        let html = std::str::from_utf8(INDEX.body).unwrap();
        assert!(html.contains(r#"src="/demo/app.js""#));
        assert!(html.contains(r#"href="/demo/style.css""#));
        assert!(!APP_JS.body.is_empty() && !STYLE.body.is_empty());
    }

    #[test]
    fn revalidation_answers_304() {
        let mut h = HeaderMap::new();
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static(APP_JS.etag));
        assert_eq!(serve(&APP_JS, &h).status(), StatusCode::NOT_MODIFIED);
        let r = serve(&APP_JS, &HeaderMap::new());
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
    }
}
