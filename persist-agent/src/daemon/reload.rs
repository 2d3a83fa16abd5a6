//! Applying the services directory: what `persist-agent reload`, SIGHUP
//! and the daemon's start do.
//!
//! The directory's files are compared with the services the registry
//! holds. Only services declared in a file are touched: those registered by
//! `add` stay as they are, and a file naming one of them is refused. A new
//! file adds its service, a removed file stops and unregisters its service,
//! a changed file rebuilds it (unregistered, then added from the new
//! definition). A broken file fails its service alone: a new one shows
//! `failed` with the file's error; one already registered runs on as it was
//! loaded, the error shown beside it, so a typo never takes down a service
//! that worked.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use persist_common::trust::TrustError;
use tracing::{info, warn};

use super::Registry;
use super::registry::Current;
use crate::error_text::error_line;
use crate::service::ServiceSpec;
use crate::service_file::{self, DeclaredService};

/// What a reload did, service by service.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Services added from new files.
    pub added: Vec<String>,
    /// Services rebuilt from changed files.
    pub rebuilt: Vec<String>,
    /// Services stopped and unregistered as their file is gone.
    pub removed: Vec<String>,
    /// Services whose file did not change.
    pub unchanged: Vec<String>,
    /// Services whose file (or whose start) failed, with why.
    pub failed: Vec<(String, String)>,
}

impl ReloadReport {
    /// Whether every file was applied.
    pub fn is_clean(&self) -> bool {
        self.failed.is_empty()
    }
}

impl fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut lines = Vec::new();
        for (verb, names) in [
            ("added", &self.added),
            ("rebuilt", &self.rebuilt),
            ("removed", &self.removed),
            ("unchanged", &self.unchanged),
        ] {
            lines.extend(names.iter().map(|name| format!("{verb} {name}")));
        }
        lines.extend(
            self.failed
                .iter()
                .map(|(name, why)| format!("failed {name}: {why}")),
        );
        if lines.is_empty() {
            return f.write_str("no service files");
        }
        f.write_str(&lines.join("\n"))
    }
}

/// What a reload is to do, decided from the directory and the registry
/// before anything changes.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Plan {
    /// Declared services whose file is gone.
    pub remove: Vec<String>,
    /// Declared services whose file changed: their new definition.
    pub rebuild: Vec<ServiceSpec>,
    /// Services of new files, and of files whose service failed before.
    pub add: Vec<ServiceSpec>,
    /// Services whose file did not change.
    pub unchanged: Vec<String>,
    /// Broken files of services not registered: shown failed.
    pub fail: Vec<(String, PathBuf, String)>,
    /// Broken files of registered services, which run on as loaded.
    pub keep_running: Vec<(String, String)>,
    /// Files naming a service that `add` registered: not applied.
    pub refuse: Vec<(String, String)>,
}

/// Compares the services directory with the registry's services.
pub(super) fn plan(declared: Vec<DeclaredService>, current: &BTreeMap<String, Current>) -> Plan {
    let mut plan = Plan::default();
    let is_declared = |entry: &Current| match entry {
        Current::Registered(spec) => spec.declared_in.is_some(),
        Current::Failed { declared_in } => declared_in.is_some(),
    };
    let names: std::collections::BTreeSet<_> = declared.iter().map(|d| d.name.clone()).collect();
    plan.remove = current
        .iter()
        .filter(|(name, entry)| is_declared(entry) && !names.contains(*name))
        .map(|(name, _)| name.clone())
        .collect();
    for file in declared {
        let entry = current.get(&file.name);
        if entry.is_some_and(|entry| !is_declared(entry)) {
            plan.refuse.push((
                file.name.clone(),
                format!(
                    "{}: a service named {} was registered by `add`; `persist-agent remove {}` first to declare it in a file",
                    file.path.display(),
                    file.name,
                    file.name
                ),
            ));
            continue;
        }
        match (file.spec, entry) {
            (Ok(spec), Some(Current::Registered(old))) if **old == spec => {
                plan.unchanged.push(file.name)
            }
            (Ok(spec), Some(Current::Registered(_))) => plan.rebuild.push(spec),
            (Ok(spec), _) => plan.add.push(spec),
            (Err(err), Some(Current::Registered(_))) => plan.keep_running.push((
                file.name,
                format!("{}; it runs on as loaded before", error_line(&err)),
            )),
            (Err(err), _) => plan.fail.push((file.name, file.path, error_line(&err))),
        }
    }
    plan
}

impl Registry {
    /// Applies the services directory (see the module's doc). Fails, with
    /// nothing changed, only when the directory cannot be read or is not
    /// trusted; each file's own failure is in the report.
    pub async fn reload(&self) -> Result<ReloadReport, TrustError> {
        let _one_at_a_time = self.reload_guard().await;
        let dir = self.services_dir().to_owned();
        // Reading the files checks that their commands exist: off the workers.
        let declared = tokio::task::block_in_place(|| service_file::load_dir(&dir))?;
        let plan = plan(declared, &self.current());
        let mut report = ReloadReport {
            unchanged: plan.unchanged,
            ..ReloadReport::default()
        };
        for name in plan.remove {
            match self.unregister(&name).await {
                Ok(()) => report.removed.push(name),
                Err(err) => report.failed.push((name, error_line(&err))),
            }
        }
        for spec in plan.rebuild {
            let name = spec.name.clone();
            if let Err(err) = self.unregister(&name).await {
                report.failed.push((name, error_line(&err)));
                continue;
            }
            match self.add_declared(spec).await {
                Ok(()) => report.rebuilt.push(name),
                Err(why) => report.failed.push((name, why)),
            }
        }
        for spec in plan.add {
            let name = spec.name.clone();
            match self.add_declared(spec).await {
                Ok(()) => report.added.push(name),
                Err(why) => report.failed.push((name, why)),
            }
        }
        for (name, file, why) in plan.fail {
            warn!(service = %name, "{why}");
            self.mark_broken(&name, why.clone(), Some(file));
            report.failed.push((name, why));
        }
        for (name, why) in &plan.keep_running {
            warn!(service = %name, "{why}");
        }
        report.failed.extend(plan.keep_running.iter().cloned());
        self.set_file_errors(plan.keep_running.into_iter().collect());
        for (name, why) in plan.refuse {
            warn!(service = %name, "{why}");
            report.failed.push((name, why));
        }
        info!("services directory {} applied", dir.display());
        Ok(report)
    }

    /// Adds a service declared in a file; one that fails shows `failed`
    /// with why.
    async fn add_declared(&self, spec: ServiceSpec) -> Result<(), String> {
        let (name, file) = (spec.name.clone(), spec.declared_in.clone());
        match self.add(spec).await {
            Ok(()) => {
                info!(service = %name, "declared in {}: added", file.as_deref().unwrap_or_else(|| std::path::Path::new("?")).display());
                Ok(())
            }
            Err(err) => {
                let why = error_line(&err);
                warn!(service = %name, "{why}");
                self.mark_broken(&name, why.clone(), file);
                Err(why)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::path::Path;

    use super::*;
    use crate::service::ServiceMode;
    use crate::service_file::ServiceFileError;

    fn spec(name: &str, port: u16, declared: bool) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            addr: Ipv4Addr::LOCALHOST.into(),
            port,
            mode: ServiceMode::Exec,
            idle_timeout: None,
            command: vec!["true".into()],
            snapshot: None,
            declared_in: declared.then(|| format!("/etc/persist/services.d/{name}.toml").into()),
        }
    }

    fn file(name: &str, port: u16) -> DeclaredService {
        let spec = spec(name, port, true);
        DeclaredService {
            name: name.into(),
            path: spec.declared_in.clone().unwrap(),
            spec: Ok(spec),
        }
    }

    fn broken_file(name: &str) -> DeclaredService {
        let path = Path::new("/etc/persist/services.d").join(format!("{name}.toml"));
        DeclaredService {
            name: name.into(),
            spec: Err(ServiceFileError::Invalid {
                path: path.clone(),
                line: Some(2),
                field: Some("prot".into()),
                message: "unknown field `prot`".into(),
            }),
            path,
        }
    }

    #[test]
    fn files_add_change_and_remove_only_the_services_they_declare() {
        let current = BTreeMap::from([
            (
                "same".to_owned(),
                Current::Registered(Box::new(spec("same", 1, true))),
            ),
            (
                "moved".to_owned(),
                Current::Registered(Box::new(spec("moved", 2, true))),
            ),
            (
                "gone".to_owned(),
                Current::Registered(Box::new(spec("gone", 3, true))),
            ),
            (
                "cli".to_owned(),
                Current::Registered(Box::new(spec("cli", 4, false))),
            ),
            (
                "retried".to_owned(),
                Current::Failed {
                    declared_in: Some("/etc/persist/services.d/retried.toml".into()),
                },
            ),
            (
                "cli-broken".to_owned(),
                Current::Failed { declared_in: None },
            ),
        ]);
        let plan = plan(
            vec![
                file("same", 1),
                file("moved", 20),
                file("new", 5),
                file("retried", 6),
            ],
            &current,
        );
        assert_eq!(
            plan.remove,
            ["gone"],
            "only declared services go with their file"
        );
        assert_eq!(plan.unchanged, ["same"]);
        assert_eq!(plan.rebuild, [spec("moved", 20, true)]);
        assert_eq!(plan.add, [spec("new", 5, true), spec("retried", 6, true)]);
        assert!(plan.fail.is_empty() && plan.keep_running.is_empty() && plan.refuse.is_empty());
    }

    #[test]
    fn a_broken_file_fails_a_new_service_and_leaves_a_running_one_running() {
        let current = BTreeMap::from([
            (
                "web".to_owned(),
                Current::Registered(Box::new(spec("web", 1, true))),
            ),
            (
                "cli".to_owned(),
                Current::Registered(Box::new(spec("cli", 2, false))),
            ),
        ]);
        let plan = plan(
            vec![broken_file("web"), broken_file("new"), file("cli", 3)],
            &current,
        );
        assert!(plan.remove.is_empty() && plan.rebuild.is_empty() && plan.add.is_empty());
        assert_eq!(plan.fail.len(), 1);
        assert_eq!(plan.fail[0].0, "new");
        assert!(
            plan.fail[0].2.contains("new.toml:2: prot: unknown field"),
            "{:?}",
            plan.fail
        );
        assert_eq!(plan.keep_running.len(), 1);
        assert!(
            plan.keep_running[0]
                .1
                .ends_with("it runs on as loaded before"),
            "{:?}",
            plan.keep_running
        );
        assert_eq!(
            plan.refuse.len(),
            1,
            "a file never takes over a service `add` registered"
        );
        assert!(
            plan.refuse[0].1.contains("registered by `add`"),
            "{:?}",
            plan.refuse
        );
    }
}
