//! Step 1: a bounded cache of verified rewrites, keyed by (caller, exact SQL text).
//!
//! The key includes the whole `ActorContext`: the policy engine will make the output depend on
//! it, so two callers must never share an entry. Lookups borrow the caller's `(&ActorContext,
//! &str)` through a `dyn` key, so a hit allocates nothing.
//!
//! Eviction is deliberately simple: when an insert finds the map at capacity, the whole map is
//! cleared first. Steady-state workloads (a driver's few dozen statement shapes) refill it at
//! once; an attacker cycling through unique texts only ever costs misses. Texts longer than
//! `MAX_CACHED_SQL_BYTES` are not cached, so the memory held is at most about
//! `capacity × MAX_CACHED_SQL_BYTES` plus the outputs.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use dashmap::DashMap;

use super::Rewritten;
use crate::auth::identity::ActorContext;

/// SQL texts longer than this are rewritten every time rather than held in memory.
pub(crate) const MAX_CACHED_SQL_BYTES: usize = 64 * 1024;

/// The keys' hasher: every simple-protocol statement the exact cache does not hold hashes its
/// whole text and then its shape's key before a template fill.
type KeyHasher = crate::TextHasher;

/// Keyed by (caller, text); holds verified rewrites (`Rewritten`) or, for literal-normalised
/// texts, templates of them (`shape::Template`).
pub(crate) struct RewriteCache<V = Rewritten> {
    map: DashMap<OwnedKey, Arc<V>, KeyHasher>,
    capacity: usize,
}

impl<V> RewriteCache<V> {
    /// A capacity of 0 disables caching.
    pub(crate) fn new(capacity: usize) -> Self {
        RewriteCache { map: DashMap::with_hasher(KeyHasher::default()), capacity }
    }

    pub(crate) fn get(&self, actor: &ActorContext, sql: &str) -> Option<Arc<V>> {
        if self.capacity == 0 {
            return None;
        }
        let key: &dyn KeyView = &(actor, sql);
        self.map.get(key).map(|entry| Arc::clone(entry.value()))
    }

    pub(crate) fn insert(&self, actor: &ActorContext, sql: &str, value: Arc<V>) {
        if self.capacity == 0 || sql.len() > MAX_CACHED_SQL_BYTES {
            return;
        }
        // Racing inserts may briefly overshoot by a few entries; the bound stays approximate
        // by design, the next insert clears.
        if self.map.len() >= self.capacity {
            self.map.clear();
        }
        self.map.insert(OwnedKey { actor: actor.clone(), sql: sql.into() }, value);
    }

    pub(crate) fn clear(&self) {
        self.map.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

/// The key as stored.
struct OwnedKey {
    actor: ActorContext,
    sql: Box<str>,
}

/// A key, owned or borrowed; the map is looked up through `dyn KeyView`.
trait KeyView {
    fn actor(&self) -> &ActorContext;
    fn sql(&self) -> &str;
}

impl KeyView for OwnedKey {
    fn actor(&self) -> &ActorContext {
        &self.actor
    }
    fn sql(&self) -> &str {
        &self.sql
    }
}

impl KeyView for (&ActorContext, &str) {
    fn actor(&self) -> &ActorContext {
        self.0
    }
    fn sql(&self) -> &str {
        self.1
    }
}

impl<'a> Borrow<dyn KeyView + 'a> for OwnedKey {
    fn borrow(&self) -> &(dyn KeyView + 'a) {
        self
    }
}

// `Borrow` requires the owned and borrowed forms to hash and compare identically, so both
// go through these two impls.
impl Hash for dyn KeyView + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.actor().hash(state);
        self.sql().hash(state);
    }
}

impl PartialEq for dyn KeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.sql() == other.sql() && self.actor() == other.actor()
    }
}

impl Eq for dyn KeyView + '_ {}

impl Hash for OwnedKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self as &dyn KeyView).hash(state);
    }
}

impl PartialEq for OwnedKey {
    fn eq(&self, other: &Self) -> bool {
        (self as &dyn KeyView) == (other as &dyn KeyView)
    }
}

impl Eq for OwnedKey {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::identity::{ActorType, Environment};

    fn actor(org: &str) -> ActorContext {
        ActorContext {
            organization: org.into(),
            environment: Environment::Development,
            roles: vec!["member".into()],
            actor_type: ActorType::User,
            actor_id: "u1".into(),
        }
    }

    fn out(sql: &str) -> Arc<Rewritten> {
        Arc::new(Rewritten {
            sql: sql.into(),
            statement_kinds: Arc::from(vec!["SelectStmt".to_owned()]),
            tables: Arc::default(),
            sql_hash: Arc::from(""),
            bound: None,
            param_rules: Arc::default(),
            gate_needs: None,
            policy_version: None,
        })
    }

    #[test]
    fn hits_only_for_the_same_actor_and_text() {
        let cache = RewriteCache::new(10);
        cache.insert(&actor("a"), "SELECT 1", out("A"));
        assert_eq!(cache.get(&actor("a"), "SELECT 1").unwrap().sql, "A");
        assert!(cache.get(&actor("b"), "SELECT 1").is_none());
        assert!(cache.get(&actor("a"), "SELECT 1 ").is_none());
        let mut other_env = actor("a");
        other_env.environment = Environment::Production;
        assert!(cache.get(&other_env, "SELECT 1").is_none());
        let mut other_roles = actor("a");
        other_roles.roles.push("admin".into());
        assert!(cache.get(&other_roles, "SELECT 1").is_none());
    }

    #[test]
    fn clears_when_full() {
        let cache = RewriteCache::new(3);
        for i in 0..3 {
            cache.insert(&actor("a"), &format!("SELECT {i}"), out("x"));
        }
        assert_eq!(cache.len(), 3);
        cache.insert(&actor("a"), "SELECT 3", out("x"));
        assert_eq!(cache.len(), 1);
        assert!(cache.get(&actor("a"), "SELECT 3").is_some());
        assert!(cache.get(&actor("a"), "SELECT 0").is_none());
    }

    #[test]
    fn zero_capacity_and_huge_texts_are_not_cached() {
        let cache = RewriteCache::new(0);
        cache.insert(&actor("a"), "SELECT 1", out("x"));
        assert!(cache.get(&actor("a"), "SELECT 1").is_none());
        let cache = RewriteCache::new(10);
        let big = format!("SELECT '{}'", "x".repeat(MAX_CACHED_SQL_BYTES));
        cache.insert(&actor("a"), &big, out("x"));
        assert!(cache.get(&actor("a"), &big).is_none());
    }
}
