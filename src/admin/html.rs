//! HTML output: the one escape function every printed value goes through, times, and the
//! page frame.
//!
//! Invariant: every value that does not come from this module's own literals is printed
//! through [`escape`] (text and attribute values alike: it escapes both quote kinds).

use std::time::{SystemTime, UNIX_EPOCH};

/// Escape `s` for HTML text and for (quoted) attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters (a tenant's quoted identifier may hold them) are shown, not sent.
            c if c.is_control() && c != '\n' && c != '\t' => out.push_str(&format!("&#x{:x};", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encode a query-string value (for the links the pages print).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `2026-11-27 06:11:45Z` (UTC, seconds).
pub fn utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}\
header{background:#1d2330;color:#fff;padding:.6em 1.2em;display:flex;gap:1.5em;align-items:center}\
header a{color:#cfd8ea}header a.on{color:#fff;font-weight:700;text-decoration:none;border-bottom:2px solid #7fb0ff}\
header form{margin-left:auto}main{padding:1em 1.2em;display:grid;gap:1em}\
section{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:.6em 1em}\
h1{font-size:1.1em;margin:0}h2{font-size:1em;margin:.2em 0 .6em}h3{font-size:.9em;margin:.8em 0 .3em}\
table{border-collapse:collapse;width:100%;font-size:.85em}th,td{text-align:left;padding:.25em .5em;\
border-bottom:1px solid #eef0f4;vertical-align:top}th{color:#5a6477;font-weight:600}\
.env-production header,.env-production{--accent:#b3261e}.env-production header{background:#5c1a16}\
.refused{color:#b3261e}.muted{color:#6b7385}.ok{color:#1b7f3b}.err{color:#b3261e;font-weight:600}\
pre{white-space:pre-wrap;font-size:.85em;margin:0}button{cursor:pointer}";

/// A complete page: `title`, then `body` (already HTML).
pub fn page(title: &str, body_class: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\
         <meta name=\"viewport\" content=\"width=device-width\"><style>{STYLE}</style></head>\
         <body class=\"{}\">{body}</body></html>",
        escape(title),
        escape(body_class)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_text_and_attributes() {
        assert_eq!(escape("<script>alert('x')</script>"), "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;");
        assert_eq!(escape("a\" onmouseover=\"x"), "a&quot; onmouseover=&quot;x");
        assert_eq!(escape("&amp;"), "&amp;amp;");
        assert_eq!(escape("plain-name_1 é"), "plain-name_1 é");
        assert_eq!(escape("a\u{1b}[31m\r"), "a&#x1b;[31m&#xd;");
        // Nothing that could open a tag or end an attribute survives.
        let hostile = "<img src=x onerror=alert(1)>\"'`";
        let out = escape(hostile);
        assert!(!out.contains('<') && !out.contains('>') && !out.contains('"') && !out.contains('\''), "{out}");
    }

    #[test]
    fn url_encoding_and_times() {
        assert_eq!(url_encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
        assert_eq!(utc(UNIX_EPOCH), "1970-01-01 00:00:00Z");
        assert_eq!(utc(UNIX_EPOCH + std::time::Duration::from_secs(1_795_760_505)), "2026-11-27 06:21:45Z");
        assert_eq!(utc(UNIX_EPOCH + std::time::Duration::from_secs(951_782_400)), "2000-02-29 00:00:00Z");
    }
}
