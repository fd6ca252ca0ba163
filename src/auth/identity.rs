//! Who is calling: the identity an API key resolves to, threaded into every later layer.
//!
//! Invariant: the caller's organization, environment, roles and actor come only from the key store, never from anything
//! the client sends after authentication.

use std::fmt;
use std::str::FromStr;

/// The two environments that share one database. A key belongs to exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Environment {
    Development,
    Production,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Development => "development",
            Environment::Production => "production",
        }
    }

    /// The visible prefix of keys of this environment (`sk_dev_…`, `sk_prod_…`).
    pub fn key_prefix(self) -> &'static str {
        match self {
            Environment::Development => "sk_dev_",
            Environment::Production => "sk_prod_",
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Environment {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "development" | "dev" => Ok(Environment::Development),
            "production" | "prod" => Ok(Environment::Production),
            other => Err(format!("unknown environment {other:?} (expected development or production)")),
        }
    }
}

/// What kind of principal holds the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActorType {
    User,
    Agent,
    System,
    Webhook,
}

impl ActorType {
    pub fn as_str(self) -> &'static str {
        match self {
            ActorType::User => "user",
            ActorType::Agent => "agent",
            ActorType::System => "system",
            ActorType::Webhook => "webhook",
        }
    }
}

impl fmt::Display for ActorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ActorType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "user" => Ok(ActorType::User),
            "agent" => Ok(ActorType::Agent),
            "system" => Ok(ActorType::System),
            "webhook" => Ok(ActorType::Webhook),
            other => Err(format!("unknown actor type {other:?} (expected user, agent, system or webhook)")),
        }
    }
}

/// The caller of an environment key: everything the rewriter may base a decision on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ActorContext {
    pub organization: String,
    pub environment: Environment,
    pub roles: Vec<String>,
    pub actor_type: ActorType,
    pub actor_id: String,
}

/// A resolved key: either an environment key (rewritten) or an operator key (forwarded as sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Environment(ActorContext),
    /// Break-glass key bound to no organization or environment. Statements are forwarded verbatim
    /// and audited; only usable when the configuration enables operator keys.
    Operator,
}

impl Caller {
    pub fn is_operator(&self) -> bool {
        matches!(self, Caller::Operator)
    }

    /// Whom an environment key's decisions are made for; `None` for an operator key.
    pub fn actor(&self) -> Option<&ActorContext> {
        match self {
            Caller::Environment(a) => Some(a),
            Caller::Operator => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_round_trips() {
        for env in [Environment::Development, Environment::Production] {
            assert_eq!(env.as_str().parse::<Environment>(), Ok(env));
        }
        assert!("staging".parse::<Environment>().is_err());
    }

    #[test]
    fn actor_type_round_trips() {
        for t in [ActorType::User, ActorType::Agent, ActorType::System, ActorType::Webhook] {
            assert_eq!(t.as_str().parse::<ActorType>(), Ok(t));
        }
        assert!("robot".parse::<ActorType>().is_err());
    }
}
