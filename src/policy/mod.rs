//! Policies: which tables are managed, and per environment which roles may do what to which rows
//! and fields. Files in `policies/` (`tables.toml`, `development.toml`, `production.toml`) are
//! read as raw TOML (`raw.rs`), compiled with `file:line` errors (`compile.rs`) into the model
//! (`model.rs`) that the rewriter consults.

pub mod bundle;
pub mod compile;
pub mod describe;
pub mod model;
pub mod raw;
pub mod rls;
pub mod store;

use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};

pub use bundle::Bundle;
pub use compile::{PolicyError, PolicyErrors};
pub use model::*;

use crate::auth::identity::Environment;

/// Both environments' policy sets, compiled from one directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Policies {
    pub development: Arc<PolicySet>,
    pub production: Arc<PolicySet>,
}

impl Policies {
    pub fn for_env(&self, env: Environment) -> &Arc<PolicySet> {
        match env {
            Environment::Development => &self.development,
            Environment::Production => &self.production,
        }
    }

    /// Every table either environment manages (what `doctor` and the role audit check).
    pub fn all_tables(&self) -> Tables {
        let mut all = Tables::default();
        for set in [&self.development, &self.production] {
            for (name, spec) in &set.tables.by_name {
                all.by_name.entry(name.clone()).or_insert_with(|| spec.clone());
            }
        }
        all
    }
}

/// Load and compile a policy directory. Every problem in every file is reported.
pub fn load_dir(dir: &Path) -> Result<Policies, PolicyErrors> {
    Bundle::from_dir(dir)?.compile(dir)
}

/// The example policy set shipped with the proxy (the demo domain), compiled from the copies
/// embedded at build time.
pub fn shipped() -> Result<Policies, PolicyErrors> {
    Bundle::shipped().compile(Path::new("policies"))
}

/// Compile the three files; every problem in every file is reported.
pub fn compile_all(tables: (&Path, &str), dev: (&Path, &str), prod: (&Path, &str)) -> Result<Policies, PolicyErrors> {
    let compiled_tables = Arc::new(compile::compile_tables(tables.0, tables.1)?);
    let mut errors = Vec::new();
    let mut sets = Vec::new();
    for (env, (path, text)) in [(Environment::Development, dev), (Environment::Production, prod)] {
        match compile::compile_policy_file(path, text, env, &compiled_tables) {
            Ok(roles) => {
                let mut h = Sha256::new();
                h.update(tables.1.as_bytes());
                h.update([0]);
                h.update(text.as_bytes());
                let hash = hex::encode(&h.finalize()[..8]);
                sets.push(Arc::new(PolicySet {
                    environment: env,
                    tables: Arc::clone(&compiled_tables),
                    roles,
                    version: format!("local:{hash}"),
                    hash,
                    origin: PolicyOrigin::Files,
                    managed_elsewhere: Arc::default(),
                }));
            }
            Err(e) => errors.extend(e.0),
        }
    }
    match (errors.is_empty(), sets.pop(), sets.pop()) {
        (true, Some(production), Some(development)) => Ok(Policies { development, production }),
        _ => Err(PolicyErrors(errors)),
    }
}

#[cfg(test)]
mod tests;
