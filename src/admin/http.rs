//! A deliberately small HTTP/1.x server side: one request per connection, bounded head and
//! body, strict parsing (request line, headers, `application/x-www-form-urlencoded` bodies and
//! query strings), and responses that always carry the same security headers.
//!
//! Invariant: nothing is read past `MAX_HEAD` + `MAX_BODY` bytes, and a request that is not
//! exactly understood is refused (400/405/411/413/415/431/501) rather than guessed at.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body (the dashboard's forms are a few hundred bytes).
pub const MAX_BODY: usize = 16 * 1024;
/// Most header lines accepted.
const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
}

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    pub path: String,
    /// The raw query string (after `?`), empty when there is none.
    pub query: String,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The value of a header that must appear at most once.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Whether the body is declared as a form.
    pub fn is_form(&self) -> bool {
        self.header("content-type").is_some_and(|v| {
            let media = v.split(';').next().unwrap_or_default().trim();
            media.eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
    }

    /// The value of cookie `name`, if the request carries exactly one.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        let mut found = self
            .headers
            .iter()
            .filter(|(n, _)| n == "cookie")
            .flat_map(|(_, v)| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v);
        let first = found.next()?;
        found.next().is_none().then_some(first)
    }
}

/// A request that could not be read; each maps to a status and a short message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub message: &'static str,
}

const fn refused(status: u16, message: &'static str) -> Refused {
    Refused { status, message }
}

/// Parse a complete request head (up to and including the blank line); the body is left empty.
pub fn parse_head(head: &[u8]) -> Result<Request, Refused> {
    let text = std::str::from_utf8(head).map_err(|_| refused(400, "the request head is not UTF-8"))?;
    let text = text.strip_suffix("\r\n\r\n").ok_or(refused(400, "malformed request head"))?;
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refused(400, "malformed request line"));
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(refused(400, "only HTTP/1.0 and HTTP/1.1"));
    }
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => {
            return Err(refused(405, "method not allowed (GET, HEAD, POST)"));
        }
        _ => return Err(refused(400, "malformed request line")),
    };
    if !target.starts_with('/') || target.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(refused(400, "malformed request target"));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), q.to_owned()),
        None => (target.to_owned(), String::new()),
    };
    let mut headers = Vec::new();
    for line in lines {
        if headers.len() >= MAX_HEADERS {
            return Err(refused(431, "too many header lines"));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(refused(400, "malformed header line"));
        };
        // No obsolete line folding, no whitespace before the colon, tokens only.
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)) {
            return Err(refused(400, "malformed header name"));
        }
        let value = value.trim_matches([' ', '\t']);
        if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err(refused(400, "control characters in a header value"));
        }
        headers.push((name.to_ascii_lowercase(), value.to_owned()));
    }
    for unique in ["content-length", "content-type", "authorization", "host"] {
        if headers.iter().filter(|(n, _)| n == unique).count() > 1 {
            return Err(refused(400, "a header that may appear once appears twice"));
        }
    }
    if headers.iter().any(|(n, _)| n == "transfer-encoding") {
        return Err(refused(501, "transfer encodings are not supported; send content-length"));
    }
    Ok(Request { method, path, query, headers, body: Vec::new() })
}

/// Read one request from `tcp`, each read bounded by `timeout`.
pub async fn read_request(tcp: &mut TcpStream, timeout: Duration) -> Result<Option<Request>, Refused> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(refused(431, "request head too large"));
        }
        match tokio::time::timeout(timeout, tcp.read(&mut chunk)).await {
            Ok(Ok(0)) if buf.is_empty() => return Ok(None),
            Ok(Ok(0)) => return Err(refused(400, "truncated request")),
            Ok(Ok(n)) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Ok(Err(_)) => return Ok(None),
            Err(_) => return Err(refused(408, "request timeout")),
        }
    };
    if head_end > MAX_HEAD {
        return Err(refused(431, "request head too large"));
    }
    let mut req = parse_head(buf.get(..head_end).unwrap_or_default())?;
    let length = match req.header("content-length") {
        Some(v) if !v.is_empty() && v.len() <= 9 && v.bytes().all(|b| b.is_ascii_digit()) => {
            v.parse::<usize>().map_err(|_| refused(400, "invalid content-length"))?
        }
        Some(_) => return Err(refused(400, "invalid content-length")),
        // No transfer encoding and one request per connection: no length, no body.
        None => 0,
    };
    if length > MAX_BODY {
        return Err(refused(413, "request body too large"));
    }
    let mut body = buf.get(head_end..).unwrap_or_default().to_vec();
    while body.len() < length {
        match tokio::time::timeout(timeout, tcp.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Err(refused(400, "truncated request body")),
            Ok(Ok(n)) => body.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(_) => return Err(refused(408, "request timeout")),
        }
    }
    if body.len() != length {
        return Err(refused(400, "more bytes than content-length (one request per connection)"));
    }
    req.body = body;
    Ok(Some(req))
}

/// Decode one `application/x-www-form-urlencoded` component: `+` is a space, `%XX` a byte, the
/// result UTF-8. Anything else malformed (a lone `%`, bad hex, invalid UTF-8) is `None`.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                if !hex.bytes().all(|h| h.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b if b.is_ascii_graphic() => out.push(b),
            _ => return None,
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Strictly parse `k=v&k=v` (a form body or a query string): every pair has `=`, every name is
/// one of `allowed` and appears once, every component decodes. An empty input is no pairs.
pub fn parse_pairs(input: &str, allowed: &[&str]) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    if input.is_empty() {
        return Ok(out);
    }
    for pair in input.split('&') {
        let (k, v) = pair.split_once('=').ok_or_else(|| "a field without '='".to_owned())?;
        let k = percent_decode(k).ok_or("a malformed field name")?;
        let v = percent_decode(v).ok_or_else(|| format!("a malformed value for {k}"))?;
        if !allowed.contains(&k.as_str()) {
            return Err(format!("unknown field {:?}", k.chars().take(40).collect::<String>()));
        }
        if out.insert(k.clone(), v).is_some() {
            return Err(format!("field {k} given twice"));
        }
    }
    Ok(out)
}

/// A response to write.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    /// Extra headers (`location`, `set-cookie`, `allow`, `www-authenticate`).
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response { status, content_type: "text/plain; charset=utf-8", body: body.into(), headers: Vec::new() }
    }

    pub fn html(status: u16, body: String) -> Response {
        Response { status, content_type: "text/html; charset=utf-8", body, headers: Vec::new() }
    }

    /// 303 See Other to `location` (after a POST).
    pub fn redirect(location: String) -> Response {
        Response::text(303, "see other\n").with("location", location)
    }

    pub fn with(mut self, name: &'static str, value: String) -> Response {
        self.headers.push((name, value));
        self
    }

    pub fn refused(r: &Refused) -> Response {
        let resp = Response::text(r.status, format!("{}\n", r.message));
        if r.status == 405 { resp.with("allow", "GET, HEAD, POST".to_owned()) } else { resp }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        303 => "See Other",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        _ => "Service Unavailable",
    }
}

/// Write `resp` (its body only when `with_body`: not for HEAD) and close.
pub async fn write_response(tcp: &mut TcpStream, resp: &Response, with_body: bool) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\
         x-content-type-options: nosniff\r\nx-frame-options: DENY\r\nreferrer-policy: no-referrer\r\n\
         content-security-policy: default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; \
         form-action 'self'; frame-ancestors 'none'; base-uri 'none'\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len()
    );
    for (name, value) in &resp.headers {
        // Values are the server's own (paths, cookies); never let one end the head early.
        let value: String = value.chars().filter(|c| !c.is_control()).collect();
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    tcp.write_all(head.as_bytes()).await?;
    if with_body {
        tcp.write_all(resp.body.as_bytes()).await?;
    }
    tcp.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    type Head = (Method, String, String, Vec<(String, String)>);

    fn head(s: &str) -> Result<Head, Refused> {
        parse_head(s.as_bytes()).map(|r| (r.method, r.path, r.query, r.headers))
    }

    #[test]
    fn request_heads() {
        let (m, p, q, h) = head("GET /dashboard?env=production HTTP/1.1\r\nHost: a\r\nX-A:  b \r\n\r\n").unwrap();
        assert_eq!((m, p.as_str(), q.as_str()), (Method::Get, "/dashboard", "env=production"));
        assert_eq!(h, [("host".to_owned(), "a".to_owned()), ("x-a".to_owned(), "b".to_owned())]);
        assert_eq!(head("DELETE /x HTTP/1.1\r\n\r\n").unwrap_err().status, 405);
        assert_eq!(head("PUT /x HTTP/1.1\r\n\r\n").unwrap_err().status, 405);
        for bad in [
            "GET /x HTTP/2\r\n\r\n",
            "GET /x y HTTP/1.1\r\n\r\n",
            "GET x HTTP/1.1\r\n\r\n",
            "get /x HTTP/1.1\r\n\r\n",
            "GET /x HTTP/1.1\r\nno colon\r\n\r\n",
            "GET /x HTTP/1.1\r\n folded: x\r\n\r\n",
            "GET /x HTTP/1.1\r\nbad name: x\r\n\r\n",
            "GET /x HTTP/1.1\r\nContent-Length: 1\r\ncontent-length: 2\r\n\r\n",
            "GET /x HTTP/1.1\r\nx: a\u{1}b\r\n\r\n",
            "\u{ff}\r\n\r\n",
        ] {
            assert_eq!(head(bad).map(|_| ()).unwrap_err().status, 400, "{bad:?}");
        }
        assert_eq!(head("POST /x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n").unwrap_err().status, 501);
    }

    #[test]
    fn forms_are_parsed_strictly() {
        let f = parse_pairs("token=a%2Bb+c&csrf=x", &["token", "csrf"]).unwrap();
        assert_eq!(f["token"], "a+b c");
        assert_eq!(f["csrf"], "x");
        assert!(parse_pairs("", &[]).unwrap().is_empty());
        assert_eq!(parse_pairs("env=%C3%A9", &["env"]).unwrap()["env"], "é");
        for bad in ["token", "token=1&token=2", "other=1", "token=%", "token=%zz", "token=%ff", "token=a b", "&"] {
            assert!(parse_pairs(bad, &["token"]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cookies_and_form_types() {
        let req = |headers: &[(&str, &str)]| Request {
            method: Method::Post,
            path: "/".into(),
            query: String::new(),
            headers: headers.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect(),
            body: Vec::new(),
        };
        let r = req(&[("cookie", "a=1; struere_admin=abc"), ("content-type", "application/x-www-form-urlencoded")]);
        assert_eq!(r.cookie("struere_admin"), Some("abc"));
        assert!(r.is_form());
        let twice = req(&[("cookie", "struere_admin=a"), ("cookie", "struere_admin=b")]);
        assert_eq!(twice.cookie("struere_admin"), None, "ambiguous cookies are ignored");
        assert!(!req(&[("content-type", "application/json")]).is_form());
    }
}
