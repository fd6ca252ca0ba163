//! Policies: which tables are managed, and per environment which roles may do what to which rows
//! and fields. Files in `policies/` (`tables.toml`, `development.toml`, `production.toml`) are
//! read as raw TOML (`raw.rs`), compiled with `file:line` errors (`compile.rs`) into the model
//! (`model.rs`) that the rewriter consults.

pub mod compile;
pub mod model;
pub mod raw;
pub mod rls;

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
    let mut texts = Vec::new();
    let mut errors = Vec::new();
    for env in [Environment::Development, Environment::Production] {
        let path = dir.join(format!("{}.toml", env.as_str()));
        match read(&path) {
            Ok(t) => texts.push((path, t)),
            Err(e) => errors.extend(e.0),
        }
    }
    match (errors.is_empty(), texts.pop(), texts.pop()) {
        (true, Some((prod_path, prod)), Some((dev_path, dev))) => {
            compile_all((&tables_path, &tables_text), (&dev_path, &dev), (&prod_path, &prod))
        }
        _ => Err(PolicyErrors(errors)),
    }
}

/// The configured policy directory, or the shipped example set when none is configured.
pub fn load_configured(dir: Option<&Path>) -> Result<Policies, PolicyErrors> {
    match dir {
        Some(dir) => load_dir(dir),
        None => shipped(),
    }
}

/// The example policy set shipped with the proxy (the demo domain), compiled from the copies
/// embedded at build time.
pub fn shipped() -> Result<Policies, PolicyErrors> {
    compile_all(
        (Path::new("policies/tables.toml"), include_str!("../../policies/tables.toml")),
        (Path::new("policies/development.toml"), include_str!("../../policies/development.toml")),
        (Path::new("policies/production.toml"), include_str!("../../policies/production.toml")),
    )
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
                let version = hex::encode(&h.finalize()[..8]);
                sets.push(Arc::new(PolicySet {
                    environment: env,
                    tables: Arc::clone(&compiled_tables),
                    roles,
                    version,
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
