//! A policy bundle: the three policy files as one unit, the thing that is synced to development,
//! promoted to production and rolled back. Each environment runs its own file of its own bundle
//! (`tables.toml` + `<environment>.toml`); promoting a bundle carries production's file along,
//! so production runs exactly what was validated (and, in development, exercised) before.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::compile::{PolicyError, PolicyErrors};
use super::model::{PolicyOrigin, PolicySet, Tables};
use super::{Policies, compile_all};
use crate::auth::identity::Environment;

/// The files a bundle holds, in this order.
pub const FILES: [&str; 3] = ["tables.toml", "development.toml", "production.toml"];

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bundle {
    /// File name (one of `FILES`) → text.
    pub files: BTreeMap<String, String>,
}

impl Bundle {
    /// Read the three files of a policy directory (every unreadable one is reported).
    pub fn from_dir(dir: &Path) -> Result<Bundle, PolicyErrors> {
        let mut files = BTreeMap::new();
        let mut errors = Vec::new();
        for name in FILES {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    files.insert(name.to_owned(), text);
                }
                Err(e) => errors.push(PolicyError { file: path, line: 0, message: format!("cannot read: {e}") }),
            }
        }
        if errors.is_empty() { Ok(Bundle { files }) } else { Err(PolicyErrors(errors)) }
    }

    /// The example policy set shipped with the proxy (the demo domain), embedded at build time.
    pub fn shipped() -> Bundle {
        let texts = [
            include_str!("../../policies/tables.toml"),
            include_str!("../../policies/development.toml"),
            include_str!("../../policies/production.toml"),
        ];
        Bundle { files: FILES.iter().zip(texts).map(|(n, t)| ((*n).to_owned(), t.to_owned())).collect() }
    }

    fn text(&self, name: &str, label: &Path) -> Result<&str, PolicyErrors> {
        self.files.get(name).map(String::as_str).ok_or_else(|| {
            PolicyErrors(vec![PolicyError {
                file: label.join(name),
                line: 0,
                message: "missing from the bundle".into(),
            }])
        })
    }

    /// Compile both environments' sets; errors name `label/<file>:line`.
    pub fn compile(&self, label: &Path) -> Result<Policies, PolicyErrors> {
        let [t, d, p] = FILES.map(|n| (label.join(n), self.text(n, label)));
        compile_all((&t.0, t.1?), (&d.0, d.1?), (&p.0, p.1?))
    }

    /// Identifies the bundle's content (all three files): hex of the first 8 bytes of SHA-256.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        for (name, text) in &self.files {
            h.update(name.as_bytes());
            h.update([0]);
            h.update(text.as_bytes());
            h.update([0]);
        }
        hex::encode(&h.finalize()[..8])
    }

    /// The bundle as JSON (how it is stored): `{"tables.toml": "...", ...}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.files.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect(),
        )
    }

    pub fn from_json(value: &serde_json::Value) -> Option<Bundle> {
        let obj = value.as_object()?;
        let mut files = BTreeMap::new();
        for (k, v) in obj {
            files.insert(k.clone(), v.as_str()?.to_owned());
        }
        Some(Bundle { files })
    }
}

/// A bundle deployed to one environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployedBundle {
    pub environment: Environment,
    pub version: i32,
    pub bundle: Bundle,
}

impl DeployedBundle {
    /// This environment's set from its bundle.
    pub fn compile(&self) -> Result<PolicySet, PolicyErrors> {
        let label = format!("{} v{}", self.environment.as_str(), self.version);
        let policies = self.bundle.compile(Path::new(&label))?;
        let mut set = PolicySet::clone(policies.for_env(self.environment));
        set.version = format!("v{}", self.version);
        set.origin = PolicyOrigin::Deployed { version: self.version };
        Ok(set)
    }
}

/// The sets in force from what is deployed: an environment with nothing deployed gets the
/// empty, fail-closed set. Each set learns which tables only the other one manages.
pub fn assemble(
    development: Option<&DeployedBundle>,
    production: Option<&DeployedBundle>,
) -> Result<Policies, PolicyErrors> {
    let set_of = |d: Option<&DeployedBundle>, env| match d {
        Some(d) => d.compile(),
        None => Ok(PolicySet::not_deployed(env)),
    };
    let (dev, prod) = (set_of(development, Environment::Development), set_of(production, Environment::Production));
    let (mut dev, mut prod) = match (dev, prod) {
        (Ok(d), Ok(p)) => (d, p),
        (d, p) => {
            let mut errors = Vec::new();
            errors.extend(d.err().into_iter().flat_map(|e| e.0));
            errors.extend(p.err().into_iter().flat_map(|e| e.0));
            return Err(PolicyErrors(errors));
        }
    };
    dev.managed_elsewhere = Arc::new(only_in(&prod.tables, &dev.tables));
    prod.managed_elsewhere = Arc::new(only_in(&dev.tables, &prod.tables));
    Ok(Policies { development: Arc::new(dev), production: Arc::new(prod) })
}

/// Tables of `a` that `b` does not manage.
fn only_in(a: &Tables, b: &Tables) -> Tables {
    Tables {
        by_name: a
            .by_name
            .iter()
            .filter(|(_, spec)| b.table(&spec.schema, &spec.name).is_none())
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployed(env: Environment, version: i32, bundle: Bundle) -> DeployedBundle {
        DeployedBundle { environment: env, version, bundle }
    }

    #[test]
    fn shipped_bundle_compiles_and_hashes_stably() {
        let b = Bundle::shipped();
        assert_eq!(b.files.len(), 3);
        assert!(b.compile(Path::new("policies")).is_ok());
        assert_eq!(b.hash(), Bundle::shipped().hash());
        assert_eq!(Bundle::from_json(&b.to_json()), Some(b.clone()));
        let mut changed = b.clone();
        changed.files.insert("production.toml".into(), format!("{}\n# changed\n", b.files["production.toml"]));
        assert_ne!(changed.hash(), b.hash());
        assert_eq!(Bundle::from_json(&serde_json::json!({"tables.toml": 1})), None);
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let mut b = Bundle::shipped();
        b.files.remove("development.toml");
        let e = b.compile(Path::new("development v3")).unwrap_err().to_string();
        assert!(e.contains("development v3/development.toml:0: missing from the bundle"), "{e}");
    }

    #[test]
    fn assembled_sets_carry_their_version_and_fail_closed_without_one() {
        let dev = deployed(Environment::Development, 4, Bundle::shipped());
        let p = assemble(Some(&dev), None).unwrap();
        assert_eq!(p.development.version, "v4");
        assert_eq!(p.development.origin, PolicyOrigin::Deployed { version: 4 });
        assert!(p.development.is_deployed());
        assert!(!p.production.is_deployed());
        assert!(p.production.roles.is_empty() && p.production.tables.by_name.is_empty());
        // Production's empty set knows which tables development manages: never unmanaged there.
        assert!(p.production.managed("public", "entities").is_err());
        assert!(p.development.managed("public", "entities").unwrap().is_some());
        assert_eq!(p.development.managed("public", "scratch").unwrap(), None);
    }

    #[test]
    fn a_table_only_one_environment_manages_is_refused_in_the_other() {
        let mut smaller = Bundle::shipped();
        let tables = smaller.files["tables.toml"].replace("[tables.trigger_runs]", "[tables.trigger_runs_gone]");
        smaller.files.insert("tables.toml".into(), tables);
        // The renamed table does not exist in the catalog, but compilation does not look there.
        let dev = deployed(Environment::Development, 2, smaller);
        let prod = deployed(Environment::Production, 1, Bundle::shipped());
        let p = assemble(Some(&dev), Some(&prod)).unwrap();
        let e = p.development.managed("public", "trigger_runs").unwrap_err();
        assert!(e.contains("managed by the other environment's deployed policy"), "{e}");
        assert!(p.production.managed("public", "trigger_runs").unwrap().is_some());
        assert!(p.production.managed("public", "trigger_runs_gone").is_err());
    }
}
