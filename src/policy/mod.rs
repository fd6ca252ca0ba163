//! Policies: which tables are managed, and per environment which roles may do what to which rows
//! and fields. Files in `policies/` (`tables.toml`, `development.toml`, `production.toml`) are
//! read as raw TOML (`raw.rs`), compiled with `file:line` errors (`compile.rs`) into the model
//! (`model.rs`) that the rewriter consults.

pub mod compile;
pub mod model;
pub mod raw;

use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};

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
}

fn read(path: &Path) -> Result<String, PolicyErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        PolicyErrors(vec![PolicyError { file: path.to_owned(), line: 0, message: format!("cannot read: {e}") }])
    })
}

/// Load and compile a policy directory. Every problem in every file is reported.
pub fn load_dir(dir: &Path) -> Result<Policies, PolicyErrors> {
    let tables_path = dir.join("tables.toml");
    let tables_text = read(&tables_path)?;
    let tables = Arc::new(compile::compile_tables(&tables_path, &tables_text)?);
    let mut errors = Vec::new();
    let mut sets = Vec::new();
    for env in [Environment::Development, Environment::Production] {
        let path = dir.join(format!("{}.toml", env.as_str()));
        let text = match read(&path) {
            Ok(t) => t,
            Err(e) => {
                errors.extend(e.0);
                continue;
            }
        };
        match compile::compile_policy_file(&path, &text, env, &tables) {
            Ok(roles) => {
                let mut h = Sha256::new();
                h.update(tables_text.as_bytes());
                h.update([0]);
                h.update(text.as_bytes());
                let version = hex::encode(&h.finalize()[..8]);
                sets.push(Arc::new(PolicySet { environment: env, tables: Arc::clone(&tables), roles, version }));
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
