//! Where the upstream server is and how to log in to it, parsed from a libpq-style URL.

use std::fmt;
use std::str::FromStr;

use tokio_postgres::config::{ChannelBinding, Host, SslMode, SslNegotiation};

use super::UpstreamError;

/// Whether the upstream connection uses TLS (libpq's `sslmode`, without certificate checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamTls {
    /// Never ask for TLS.
    Disable,
    /// Ask for TLS; continue in plain text if the server declines.
    Prefer,
    /// Ask for TLS; fail if the server declines.
    Require,
}

/// The upstream server and the credentials the proxy logs in with.
#[derive(Clone)]
pub struct UpstreamConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    /// The default database; `connect` takes the one to use.
    pub database: String,
    pub tls: UpstreamTls,
}

// By hand, so the password never reaches a log.
impl fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("database", &self.database)
            .field("tls", &self.tls)
            .finish()
    }
}

impl UpstreamConfig {
    /// Parses `postgres://user:pw@host:port/db?sslmode=disable|prefer|require` or the
    /// `host=… port=… user=…` form. Defaults as libpq: port 5432, database = user,
    /// sslmode = prefer. One TCP host only (`hostaddr` wins over `host`); unix sockets, other
    /// sslmodes, direct TLS negotiation and required channel binding are refused. Other options
    /// (application_name, options, …) are ignored: pass them to `connect` as startup parameters.
    pub fn from_url(url: &str) -> Result<Self, UpstreamError> {
        let bad = |msg: String| UpstreamError::Config(msg);
        // tokio-postgres' parse errors name the option, never its value.
        let cfg = tokio_postgres::Config::from_str(url).map_err(|e| bad(format!("cannot parse upstream URL: {e}")))?;

        let host = match (cfg.get_hostaddrs(), cfg.get_hosts()) {
            ([addr], _) => addr.to_string(),
            ([], [Host::Tcp(name)]) => name.clone(),
            ([], [Host::Unix(path)]) => {
                return Err(bad(format!("unix socket hosts are not supported ({})", path.display())));
            }
            ([], []) => return Err(bad("the URL names no host".into())),
            _ => return Err(bad("only one upstream host is supported".into())),
        };
        let port = match cfg.get_ports() {
            [] => 5432,
            [port] => *port,
            _ => return Err(bad("only one upstream port is supported".into())),
        };
        let user = cfg.get_user().ok_or_else(|| bad("the URL names no user".into()))?.to_owned();
        let password = cfg
            .get_password()
            .map(|pw| String::from_utf8(pw.to_vec()))
            .transpose()
            .map_err(|_| bad("the password is not valid UTF-8".into()))?;
        let database = cfg.get_dbname().unwrap_or(&user).to_owned();
        let tls = match cfg.get_ssl_mode() {
            SslMode::Disable => UpstreamTls::Disable,
            SslMode::Prefer => UpstreamTls::Prefer,
            SslMode::Require => UpstreamTls::Require,
            other => return Err(bad(format!("unsupported sslmode {other:?}"))),
        };
        if cfg.get_ssl_negotiation() != SslNegotiation::Postgres {
            return Err(bad("only sslnegotiation=postgres is supported".into()));
        }
        if cfg.get_channel_binding() == ChannelBinding::Require {
            return Err(bad("channel_binding=require is not supported".into()));
        }
        if host.is_empty() || user.is_empty() {
            return Err(bad("host and user must not be empty".into()));
        }
        Ok(UpstreamConfig { host, port, user, password, database, tls })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_url_form() {
        let cfg = UpstreamConfig::from_url("postgres://app:s%40cret@db.internal:6543/main?sslmode=require").unwrap();
        assert_eq!(cfg.host, "db.internal");
        assert_eq!(cfg.port, 6543);
        assert_eq!(cfg.user, "app");
        assert_eq!(cfg.password.as_deref(), Some("s@cret"));
        assert_eq!(cfg.database, "main");
        assert_eq!(cfg.tls, UpstreamTls::Require);
    }

    #[test]
    fn defaults_follow_libpq() {
        let cfg = UpstreamConfig::from_url("postgresql://app@127.0.0.1").unwrap();
        assert_eq!(cfg.port, 5432);
        assert_eq!(cfg.database, "app");
        assert_eq!(cfg.password, None);
        assert_eq!(cfg.tls, UpstreamTls::Prefer);
    }

    #[test]
    fn parses_key_value_form_and_ipv6() {
        let cfg =
            UpstreamConfig::from_url("host=::1 port=5433 user=app password='a b' dbname=x sslmode=disable").unwrap();
        assert_eq!(cfg.host, "::1");
        assert_eq!(cfg.port, 5433);
        assert_eq!(cfg.password.as_deref(), Some("a b"));
        assert_eq!(cfg.tls, UpstreamTls::Disable);
        let cfg = UpstreamConfig::from_url("postgres://app@[::1]:7/db").unwrap();
        assert_eq!((cfg.host.as_str(), cfg.port), ("::1", 7));
    }

    #[test]
    fn hostaddr_wins_over_host() {
        let cfg = UpstreamConfig::from_url("host=db.example hostaddr=10.0.0.5 user=app").unwrap();
        assert_eq!(cfg.host, "10.0.0.5");
    }

    #[test]
    fn refuses_unusable_urls() {
        for url in [
            "postgres://app@h1,h2/db",
            "postgres://@127.0.0.1/db",
            "postgres://127.0.0.1/db",
            "host=/tmp user=app",
            "postgres://app@127.0.0.1/db?sslmode=verify-full",
            "postgres://app@127.0.0.1/db?channel_binding=require",
            "postgres://app@127.0.0.1/db?sslnegotiation=direct&sslmode=require",
            "not a url at all =",
        ] {
            assert!(matches!(UpstreamConfig::from_url(url), Err(UpstreamError::Config(_))), "{url}");
        }
    }

    #[test]
    fn debug_hides_password() {
        let cfg = UpstreamConfig::from_url("postgres://app:hunter2@127.0.0.1/db").unwrap();
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }
}
