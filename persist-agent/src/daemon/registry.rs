//! The daemon's registered services: adding, removing, waking and reporting them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use persist_common::bpf::WakeEvent;
use persist_common::image::{Image, ImageError};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::SharedWatcher;
use super::families::{Families, family_of};
use super::generations::{Generation, Generations};
use super::keeper::PortKeeper;
use super::listener;
use super::memory::rss_of_sessions;
use super::metrics::Metrics;
use super::pagers::Pagers;
use super::parked_cost::{AgentBaseline, agent_share, parked_cost as parked_cost_of};
use super::restore_pool::RestorePool;
use super::restore_worker::{RestoreWorker, Running, WakeOptions, WorkerReport, WorkerShared};
use super::run_state::{self, RunStateDir};
use super::skeleton_budget::{Candidate, Order, SkeletonCosts};
use super::supervisor::{
    Command, GenerationsCommand, Handle, Published, Shared, Starter, State, Supervisor, Waker,
};
use super::takeover::{recover_checkpoint, take_over};
use crate::control::{HistoryEntry, ServiceStatus, SkeletonSummary};
use crate::process_tree;
use crate::service::{KeepSkeleton, ServiceMode, ServiceSpec, ServiceStore, SnapshotSpec};
use crate::snapshot::{self, BuildRequest, listener_fd_in_image};

/// Listeners taken from a service: the one SYNs are steered to, and the
/// other members of its `SO_REUSEPORT` group (usually none).
type Taken = (OwnedFd, Vec<OwnedFd>);

/// Why a request about services was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No service of that name.
    #[error("unknown service: {0}")]
    Unknown(String),
    /// The name is taken.
    #[error("a service named {0} already exists")]
    Exists(String),
    /// Another service owns the port.
    #[error("port {port} is already taken by service {owner}")]
    PortTaken {
        /// The port.
        port: u16,
        /// The service that has it.
        owner: String,
    },
    /// The service refused the transition.
    #[error("{0}")]
    Refused(String),
    /// Every BPF slot is used.
    #[error("no free service slot (at most {0} services)")]
    Full(u32),
    /// The definition is invalid.
    #[error(transparent)]
    Service(#[from] crate::service::ServiceError),
    /// The port cannot be held.
    #[error(transparent)]
    Listener(#[from] super::listener::ListenerError),
    /// The BPF maps refused the update.
    #[error(transparent)]
    Bpf(#[from] super::SynWatcherError),
    /// Building the service's image failed.
    #[error("building the image of {name}: {source}")]
    Build {
        /// The service.
        name: String,
        /// Why.
        #[source]
        source: snapshot::BuildError,
    },
    /// A registered image is unusable.
    #[error(transparent)]
    Image(#[from] persist_common::image::ImageError),
    /// The service's first skeleton could not be prepared from its image.
    #[error("{name} cannot be restored: {reason}")]
    Unrestorable {
        /// The service.
        name: String,
        /// Why (the prepare's error, naming the file or page).
        reason: String,
    },
    /// The kept generations of a service cannot be read or written.
    #[error(transparent)]
    Generations(#[from] super::generations::GenerationsError),
    /// The run-state directory failed.
    #[error("state directory: {0}")]
    Io(#[from] std::io::Error),
    /// A directory of the state directory is not trusted.
    #[error("state directory: {0}")]
    Untrusted(#[from] persist_common::trust::TrustError),
    /// The service is declared in a file of the services directory, which
    /// a reload would bring back: the file is what to change.
    #[error("{name} is declared in {}: delete or change the file, then run `persist-agent reload`", file.display())]
    Declared {
        /// The service.
        name: String,
        /// Its file.
        file: PathBuf,
    },
}

/// A service as a reload finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Current {
    /// Registered, with this definition.
    Registered(Box<ServiceSpec>),
    /// Failed to come back or to be declared.
    Failed {
        /// The file that declares it, if one does.
        declared_in: Option<PathBuf>,
    },
}

/// A service that could not be brought back or declared, shown `failed`.
#[derive(Debug, Clone)]
pub(super) struct Broken {
    /// Why.
    pub error: String,
    /// The services-directory file that declares it, if one does.
    pub declared_in: Option<PathBuf>,
}

/// Every registered service, and services whose definition file is broken.
pub struct Registry {
    state_dir: PathBuf,
    store: ServiceStore,
    run_state: Arc<RunStateDir>,
    watcher: SharedWatcher,
    metrics: Arc<Metrics>,
    pagers: Arc<Pagers>,
    /// The threads that prepare, resume and page every snapshot service.
    pool: Arc<RestorePool>,
    /// The process that holds every service's listener while no daemon does.
    keeper: PortKeeper,
    services: Mutex<BTreeMap<String, Handle>>,
    /// What a SYN's wake needs of each service, by its slot in the SYN
    /// watcher's maps, which a wake event names. The wake thread takes
    /// this lock alone, never `services`: `status` holds that one while it
    /// reads every service's counters from the BPF maps (10,000 lookups),
    /// and a pass over every service on the SYN's path took hundreds of µs.
    /// Changed with `services` held.
    by_slot: Mutex<HashMap<u32, Wakeable>>,
    /// Names and ports of services being added, by name: reserved before
    /// anything is built, so that adds running at once never build one
    /// image twice nor start two commands on one port. Taken after
    /// `services` when both are held.
    adding: Mutex<BTreeMap<String, u16>>,
    broken: Mutex<BTreeMap<String, Broken>>,
    /// The services directory, applied at start and by each reload.
    services_dir: PathBuf,
    /// Services that run on their earlier definition because their file
    /// is now broken: the file's error, for `status`.
    file_errors: Mutex<BTreeMap<String, String>>,
    /// Held by a reload while it applies the directory: one at a time.
    reloading: tokio::sync::Mutex<()>,
    /// What the daemon did to a service on its own (rebuilt it), for `status`.
    notes: Mutex<BTreeMap<String, String>>,
    /// Untagged generations kept per `--on-idle keep` service.
    keep_generations: usize,
    /// What the agent cost before it held any service.
    agent_baseline: AgentBaseline,
    /// Bytes the prepared skeletons may cost together (`None`: no limit).
    skeleton_budget: Option<u64>,
    /// What each skeleton costs, measured once.
    skeleton_costs: SkeletonCosts,
    /// The services whose images others of their program share pages with.
    families: Families,
}

impl Registry {
    /// Opens the state directory's service store; `services_dir` is the
    /// directory of service files that [`Registry::reload`] applies.
    pub fn new(
        state_dir: &Path,
        services_dir: &Path,
        watcher: SharedWatcher,
    ) -> Result<Self, RegistryError> {
        let run_state = Arc::new(RunStateDir::open(state_dir)?);
        Ok(Self {
            state_dir: state_dir.to_owned(),
            store: ServiceStore::open(state_dir)?,
            run_state: run_state.clone(),
            keeper: PortKeeper::new(&run_state),
            watcher,
            metrics: Arc::new(Metrics::default()),
            pagers: Arc::new(Pagers::default()),
            pool: RestorePool::new(super::restore_pool::default_size()),
            services: Mutex::new(BTreeMap::new()),
            by_slot: Mutex::new(HashMap::new()),
            adding: Mutex::new(BTreeMap::new()),
            broken: Mutex::new(BTreeMap::new()),
            services_dir: services_dir.to_owned(),
            file_errors: Mutex::new(BTreeMap::new()),
            reloading: tokio::sync::Mutex::new(()),
            notes: Mutex::new(BTreeMap::new()),
            keep_generations: super::generations::DEFAULT_KEEP,
            agent_baseline: AgentBaseline::now(),
            skeleton_budget: None,
            skeleton_costs: SkeletonCosts::default(),
            families: Families::default(),
        })
    }

    /// Holds the prepared skeletons within `budget` bytes together
    /// (`None`: no limit), as [`super::skeleton_budget::enforce`] applies it.
    pub fn with_skeleton_budget(mut self, budget: Option<u64>) -> Self {
        self.skeleton_budget = budget;
        self
    }

    /// The skeleton budget, in bytes (`None`: no limit).
    pub fn skeleton_budget(&self) -> Option<u64> {
        self.skeleton_budget
    }

    /// Runs `visit` on every registered service's handle, with the
    /// services' lock held: it must not call the registry.
    pub(super) fn visit_services(&self, mut visit: impl FnMut(&Handle)) {
        self.services
            .lock()
            .expect("lock")
            .values()
            .for_each(&mut visit);
    }

    /// Every parked snapshot service, as the skeleton budget sees it.
    ///
    /// Called every [`super::skeleton_budget::ENFORCE_PERIOD`] or so over
    /// every service: it copies only what the budget reads, and a name only
    /// for a candidate.
    pub(super) fn skeleton_candidates(&self) -> Vec<Candidate> {
        struct View {
            spec: Arc<ServiceSpec>,
            keep: KeepSkeleton,
            published: Arc<Mutex<Published>>,
            report: Arc<Mutex<WorkerReport>>,
        }
        let views: Vec<View> = {
            let services = self.services.lock().expect("lock");
            services
                .values()
                .filter_map(|handle| {
                    Some(View {
                        keep: handle.spec.snapshot.as_ref()?.keep_skeleton,
                        report: handle.worker_report.clone()?,
                        spec: Arc::clone(&handle.spec),
                        published: Arc::clone(&handle.published),
                    })
                })
                .collect()
        };
        let mut live = HashSet::new();
        let mut candidates = Vec::new();
        for view in views {
            let (parked, last_woken) = {
                let published = view.published.lock().expect("lock");
                (
                    published.state == State::Parked && published.pid.is_none(),
                    published.last_woken,
                )
            };
            let (skeleton, can_prepare, last_bytes) = {
                let report = view.report.lock().expect("lock");
                (
                    report
                        .skeleton_pid
                        .map(|pid| (pid, report.skeleton_init_pid)),
                    report.prepares_queued == 0
                        && report.error.is_none()
                        && report.syn_resumes_unreported == 0,
                    report.last_skeleton_bytes,
                )
            };
            live.extend(skeleton.map(|(pid, _)| pid));
            if !parked {
                continue;
            }
            let held_bytes = skeleton.map(|(pid, init_pid)| self.skeleton_costs.of(pid, init_pid));
            if held_bytes.is_some() && held_bytes != last_bytes {
                view.report.lock().expect("lock").last_skeleton_bytes = held_bytes;
            }
            candidates.push(Candidate {
                held_bytes,
                last_bytes: held_bytes.or(last_bytes),
                name: view.spec.name.clone(),
                keep: view.keep,
                last_woken,
                can_prepare,
            });
        }
        self.skeleton_costs.keep_only(&live);
        candidates
    }

    /// Passes the skeleton budget's `order` to the supervisor of `name`.
    pub(super) fn order_skeleton(&self, name: &str, order: Order) {
        if let Some(handle) = self.services.lock().expect("lock").get(name) {
            let _ = handle.commands.send(Command::Skeleton(order));
        }
    }

    /// The skeletons held now, their cost and the budget, for `status`.
    pub fn skeleton_summary(&self) -> SkeletonSummary {
        let held: Vec<_> = {
            let services = self.services.lock().expect("lock");
            services
                .values()
                .filter_map(|handle| {
                    let report = handle.worker_report.as_ref()?.lock().expect("lock");
                    Some((report.skeleton_pid?, report.skeleton_init_pid))
                })
                .collect()
        };
        let live: HashSet<i32> = held.iter().map(|(pid, _)| *pid).collect();
        self.skeleton_costs.keep_only(&live);
        SkeletonSummary {
            held: held.len() as u64,
            held_bytes: held
                .iter()
                .map(|(pid, init)| self.skeleton_costs.of(*pid, *init))
                .sum(),
            budget_bytes: self.skeleton_budget,
        }
    }

    /// Keeps `count` untagged generations of each `--on-idle keep` service.
    pub fn keeping_generations(mut self, count: usize) -> Self {
        self.keep_generations = count.max(1);
        self
    }

    /// Runs every snapshot service's restore work on at most `threads`
    /// pool threads (besides those paging a wake, or holding a skeleton
    /// that stays traced).
    pub fn restore_threads(mut self, threads: usize) -> Self {
        self.pool = RestorePool::new(threads);
        self
    }

    /// Lets the pagers of restored processes finish before the daemon
    /// exits, waiting up to `timeout`. Returns how many did not.
    pub fn finish_pagers(&self, timeout: std::time::Duration) -> usize {
        self.pagers.finish_all(timeout)
    }

    /// Brings back every stored service after a daemon start. A service that
    /// cannot be brought back is reported in `status`, never fatal. A
    /// snapshot-mode service whose image was taken on another kernel build
    /// or CPU (a kernel upgrade) is rebuilt from its command first.
    pub async fn restore_registered(&self) {
        let loaded = match self.store.load_all() {
            Ok(loaded) => loaded,
            Err(err) => {
                warn!("cannot read stored services: {err}");
                return;
            }
        };
        for (name, result) in loaded {
            let declared_in = result.as_ref().ok().and_then(|s| s.declared_in.clone());
            let brought_back = match result {
                Ok(spec) => match self.rebuild_if_stale(&spec).await {
                    // Taking over a previous daemon's processes waits for
                    // some to die: off the runtime's workers.
                    Ok(rebuilt) => {
                        tokio::task::block_in_place(|| self.activate(spec, rebuilt)).map(drop)
                    }
                    Err(err) => Err(err),
                },
                Err(err) => Err(err.into()),
            };
            if brought_back.is_ok() {
                self.offer_root_if_full(&name);
            }
            match brought_back {
                Ok(()) => info!(service = %name, "registered again"),
                Err(err) => {
                    warn!(service = %name, "cannot bring back: {err}");
                    self.mark_broken(&name, err.to_string(), declared_in);
                }
            }
        }
    }

    /// Registers a new service and stores it. A snapshot-mode service is
    /// started, snapshotted and stopped first (its image is built), and is
    /// added only once its first skeleton is prepared from its image, every
    /// page checked: an image that would not restore is refused, and leaves
    /// nothing registered.
    ///
    /// Adds run at once (each control connection is a task of its own):
    /// the name and port are reserved first, so that a second add of either
    /// is refused while the first builds, and a failing add undoes only
    /// what it did itself.
    pub async fn add(&self, spec: ServiceSpec) -> Result<(), RegistryError> {
        spec.validate()?;
        let _reserved = self.reserve(&spec)?;
        let built_listener = match &spec.snapshot {
            Some(snapshot) if spec.mode == ServiceMode::Snapshot && snapshot.image.is_none() => {
                Some(self.build(&spec, snapshot).await?)
            }
            Some(snapshot) => {
                // A prebuilt image: refuse it now if it is unusable. Opened
                // off the async workers: its checks read files.
                let dir = snapshot.image.clone().unwrap_or_default();
                let opened = dir.clone();
                let image = tokio::task::spawn_blocking(move || {
                    persist_common::image::Image::open(&opened)
                })
                .await
                .map_err(|err| RegistryError::Refused(format!("image check task: {err}")))??;
                if listener_fd_in_image(image.manifest(), spec.port).is_none() {
                    return Err(RegistryError::Refused(format!(
                        "image {} has no TCP listener on port {}",
                        dir.display(),
                        spec.port
                    )));
                }
                None
            }
            None => None,
        };
        let built = built_listener.is_some();
        let prepared =
            match tokio::task::block_in_place(|| self.activate(spec.clone(), built_listener)) {
                Ok(prepared) => prepared,
                Err(err) => {
                    if built {
                        self.discard_built_image(&spec);
                    }
                    return Err(err);
                }
            };
        if let Some(prepared) = prepared {
            let outcome = prepared
                .await
                .unwrap_or_else(|_| Err("the restore thread has stopped".into()));
            if let Err(reason) = outcome {
                if let Ok(done) = self.remove_active(&spec.name) {
                    let _ = done.await;
                }
                self.run_state.clear(&spec.name);
                self.discard_built_image(&spec);
                return Err(RegistryError::Unrestorable {
                    name: spec.name,
                    reason,
                });
            }
        }
        if let Err(err) = self.store.save(&spec) {
            if let Ok(done) = self.remove_active(&spec.name) {
                let _ = done.await;
            }
            self.discard_built_image(&spec);
            return Err(err.into());
        }
        self.broken.lock().expect("lock").remove(&spec.name);
        Ok(())
    }

    /// Reserves the name and port of `spec` for an add, refusing them if a
    /// registered service or another add has either. The reservation ends
    /// when the returned guard is dropped, the add done or failed.
    fn reserve(&self, spec: &ServiceSpec) -> Result<Reservation<'_>, RegistryError> {
        let services = self.services.lock().expect("lock");
        check_free_in(&services, spec)?;
        let mut adding = self.adding.lock().expect("lock");
        if adding.contains_key(&spec.name) {
            return Err(RegistryError::Exists(spec.name.clone()));
        }
        if let Some((owner, _)) = adding.iter().find(|(_, port)| **port == spec.port) {
            return Err(RegistryError::PortTaken {
                port: spec.port,
                owner: owner.clone(),
            });
        }
        adding.insert(spec.name.clone(), spec.port);
        Ok(Reservation {
            adding: &self.adding,
            name: spec.name.clone(),
        })
    }

    /// Starts the command of a snapshot-mode service, snapshots it into
    /// `STATE_DIR/images/NAME` and returns the listeners taken from it.
    async fn build(
        &self,
        spec: &ServiceSpec,
        snapshot: &SnapshotSpec,
    ) -> Result<Taken, RegistryError> {
        let snapshot = snapshot.clone();
        let family = family_of(spec);
        let sibling = family
            .as_ref()
            .and_then(|family| self.families.root_for(family, &spec.name))
            .map(|root| self.pristine_image(&root));
        let request = BuildRequest {
            command: spec.command.clone(),
            addr: spec.addr,
            port: spec.port,
            user: snapshot.user,
            ready: snapshot.ready,
            ready_timeout: snapshot.ready_timeout,
            warmup_requests: snapshot.warmup_requests,
            warmup_command: snapshot.warmup_command.clone(),
            image: self.pristine_image(&spec.name),
            log: self.log_path(&spec.name),
            runtime_dir: self.state_dir.join("run"),
            no_aslr: snapshot.share_pages,
            sibling,
        };
        let name = spec.name.clone();
        let started = std::time::Instant::now();
        let built = tokio::task::spawn_blocking(move || snapshot::build(&request))
            .await
            .map_err(|err| RegistryError::Refused(format!("build task: {err}")))?
            .map_err(|source| RegistryError::Build { name, source })?;
        self.metrics
            .observe_checkpoint(&spec.name, started.elapsed());
        crate::sys::alloc::give_back_free_memory();
        info!(service = %spec.name, pages = built.summary.pages, shared = built.summary.pages_reused, ready_ms = built.ready_after.as_millis() as u64, "image built");
        if let Some(family) = family
            && built.summary.base_stores == 0
        {
            self.families.offer_root(family, &spec.name);
        }
        // States kept from an older pristine image would not descend from this one.
        self.drop_generations(spec);
        Ok((built.listener, built.group))
    }

    /// Rebuilds a snapshot-mode service from its command when its image was
    /// taken on another kernel build or CPU, and returns the listener taken
    /// (and the rest of its group) from the new process. The state a
    /// `--on-idle keep` service kept is dropped with the old image: it would
    /// not restore either. A service
    /// with a prebuilt image, or whose recorded process still lives, is left
    /// as it is (it shows `stale` if its image cannot restore).
    async fn rebuild_if_stale(&self, spec: &ServiceSpec) -> Result<Option<Taken>, RegistryError> {
        let Some(snapshot) = spec.snapshot.as_ref().filter(|s| s.image.is_none()) else {
            return Ok(None);
        };
        if spec.mode != ServiceMode::Snapshot
            || self
                .run_state
                .load(&spec.name)
                .is_some_and(|record| run_state::is_alive(&record))
        {
            return Ok(None);
        }
        let Some(why) = host_mismatch(&self.current_image(spec)) else {
            return Ok(None);
        };
        let note = match &why {
            ImageError::KernelMismatch { image, running } => {
                format!("rebuilt: image was taken on kernel {image}, this is {running}")
            }
            other => format!("rebuilt: {other}"),
        };
        info!(service = %spec.name, "rebuilding from its command: {why}");
        // The command binds the port itself: the keeper must let it go (the
        // connections it queued are refused; a kernel upgrade rebooted anyway).
        self.keeper.stop(&self.run_state, &spec.name);
        let listener = self.build(spec, snapshot).await?;
        info!(service = %spec.name, "{note}");
        self.notes
            .lock()
            .expect("lock")
            .insert(spec.name.clone(), note);
        Ok(Some(listener))
    }

    /// The log the daemon opens as a built service's stdout and stderr.
    fn log_path(&self, name: &str) -> PathBuf {
        crate::service_log::path(&self.state_dir.join("logs"), name)
    }

    fn pristine_image(&self, name: &str) -> PathBuf {
        self.state_dir.join("images").join(name)
    }

    /// The definition of the registered service `name`, if there is one.
    fn registered_spec(&self, name: &str) -> Option<ServiceSpec> {
        self.services
            .lock()
            .expect("lock")
            .get(name)
            .map(|handle| ServiceSpec::clone(&handle.spec))
    }

    /// Makes the registered service `name` the root of its family when it
    /// shares pages and its image is full (a daemon restart forgot roots).
    fn offer_root_if_full(&self, name: &str) {
        let spec = self.registered_spec(name);
        let Some(family) = spec.as_ref().and_then(family_of) else {
            return;
        };
        let image = self.pristine_image(name);
        let full = !image
            .join(persist_common::image::base_store_file(0))
            .exists();
        if full && image.join(persist_common::image::MANIFEST_FILE).is_file() {
            self.families.offer_root(family, name);
        }
    }

    /// Deletes the image the daemon built for `spec` (not a prebuilt one it
    /// was given): the service is removed, or its add failed. Images of its
    /// program that share its pages keep them: they hold their own links to
    /// its page store.
    fn discard_built_image(&self, spec: &ServiceSpec) {
        self.families.forget(&spec.name);
        let built = spec.mode == ServiceMode::Snapshot
            && spec.snapshot.as_ref().is_some_and(|s| s.image.is_none());
        if !built {
            return;
        }
        let image = self.pristine_image(&spec.name);
        match std::fs::remove_dir_all(&image) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                warn!(service = %spec.name, "removing its image {}: {err}", image.display())
            }
        }
    }

    /// The generations of `spec`'s state: its prebuilt image, or the one
    /// built when it was added, and the states `--on-idle keep` kept.
    fn generations(&self, spec: &ServiceSpec) -> Result<Generations, RegistryError> {
        let images = self.state_dir.join("images");
        let pristine = spec
            .snapshot
            .as_ref()
            .and_then(|s| s.image.clone())
            .unwrap_or_else(|| self.pristine_image(&spec.name));
        Ok(Generations::load(
            images.join(format!("{}.gens", spec.name)),
            pristine,
            // Where an agent that kept one state only wrote it.
            &images.join(format!("{}.kept", spec.name)),
            self.keep_generations,
        )?)
    }

    /// Drops every kept generation of `spec`: its pristine image was just
    /// built again, or it is removed.
    fn drop_generations(&self, spec: &ServiceSpec) {
        match self.generations(spec) {
            Ok(mut generations) if !generations.records().is_empty() => {
                warn!(service = %spec.name, "the states kept at its parks are dropped");
                if let Err(err) = generations.remove_all() {
                    warn!(service = %spec.name, "removing its kept states: {err}");
                }
            }
            Ok(_) => {}
            Err(err) => warn!(service = %spec.name, "its kept states: {err}"),
        }
    }

    /// The image the next wake of `spec` restores: its newest good kept
    /// generation, else its pristine image.
    fn current_image(&self, spec: &ServiceSpec) -> PathBuf {
        match self.generations(spec) {
            Ok(generations) => generations.path(generations.current()),
            Err(_) => self.pristine_image(&spec.name),
        }
    }

    /// Takes the port of `spec` (or uses `provided`, a listener taken from
    /// the service with the rest of its group) and starts its supervisor,
    /// adopting a process that a previous daemon left running. For a snapshot-mode service not found
    /// running, returns the outcome of its first skeleton's prepare (the
    /// whole image checked), to come.
    fn activate(
        &self,
        spec: ServiceSpec,
        provided: Option<Taken>,
    ) -> Result<Option<oneshot::Receiver<Result<(), String>>>, RegistryError> {
        let mut services = self.services.lock().expect("lock");
        check_free_in(&services, &spec)?;
        let capacity = self.watcher.lock().expect("lock").capacity();
        let slot = {
            let used = self.by_slot.lock().expect("lock");
            (0..capacity)
                .find(|slot| !used.contains_key(slot))
                .ok_or(RegistryError::Full(capacity))?
        };

        recover_checkpoint(&self.run_state, &spec.name);
        let (mut adopted, left_listener) = match self.run_state.load(&spec.name) {
            Some(record) => take_over(&spec, &record, &self.run_state.events_path(&spec.name)),
            None => (None, None),
        };
        // The keeper held the port if nothing else did (the daemon died
        // between a park and the next skeleton): its queued clients wait.
        let kept = self.keeper.find(&self.run_state, &spec.name);
        let provided = provided.or(left_listener);
        let (listener, group) = match (&adopted, provided, &kept) {
            (Some(adopted), _, _) => (
                crate::restore::copy_apart(adopted.listener.as_fd())?,
                listener::clone_all(&adopted.group)?,
            ),
            (None, Some(provided), _) => provided,
            (None, None, Some(kept)) => {
                info!(service = %spec.name, pid = kept.record.pid, "took the listener back from the port keeper");
                (
                    crate::restore::copy_apart(kept.listener.as_fd())?,
                    listener::clone_all(&kept.group)?,
                )
            }
            (None, None, None) => {
                self.run_state.clear(&spec.name);
                match self.image_group(&spec) {
                    // Each restore then finds a member at each of its
                    // listeners' descriptors: one fresh socket of the
                    // service's could not join a group of the agent's.
                    Some((members, owner)) => {
                        listener::open_group(spec.addr, spec.port, members, owner)?
                    }
                    None => (listener::open(spec.addr, spec.port)?, Vec::new()),
                }
            }
        };
        // Held for as long as the service is registered: numbered where no
        // restored process copies it (the copies above are already).
        let listener = Arc::new(crate::restore::set_apart(listener));
        let group: Vec<OwnedFd> = group.into_iter().map(crate::restore::set_apart).collect();
        let mut prepared = None;
        self.keeper
            .ensure(&self.run_state, &spec.name, &listener, &group, kept);
        let adopted_pager = adopted.as_mut().and_then(|adopted| adopted.pager.take());
        let starter = match spec.mode {
            ServiceMode::Snapshot => {
                let generations = self.generations(&spec)?;
                let next = generations.current();
                let image = generations.path(next);
                let worker = RestoreWorker::spawn(
                    &spec.name,
                    spec.port,
                    listener.clone(),
                    listener::clone_all(&group)?,
                    match adopted_pager {
                        Some(pager) => Running::Filling(Box::new(pager)),
                        None if adopted.is_some() => Running::Filled,
                        None => Running::No,
                    },
                    WorkerShared {
                        metrics: self.metrics.clone(),
                        run_state: self.run_state.clone(),
                        pagers: self.pagers.clone(),
                        pool: self.pool.clone(),
                    },
                    spec.snapshot
                        .as_ref()
                        .map(|s| WakeOptions {
                            prefetch: s.prefetch,
                            accept_changed_files: s.accept_changed_files,
                            log: Some(self.log_path(&spec.name)),
                        })
                        .unwrap_or_default(),
                )?;
                if adopted.is_none() {
                    prepared = Some(worker.prepare_checked(image.clone()));
                    // Checked whole all the same; then only the image stays.
                    if spec.snapshot.as_ref().map(|s| s.keep_skeleton) == Some(KeepSkeleton::Never)
                    {
                        worker.park_cold(image.clone());
                    }
                }
                Starter::Restore {
                    worker,
                    generations,
                    next,
                }
            }
            ServiceMode::Exec | ServiceMode::Inetd => Starter::Command {
                log: self.log_path(&spec.name),
            },
        };
        self.watcher
            .lock()
            .expect("lock")
            .register(slot, spec.port, &listener)?;
        let name = spec.name.clone();
        let handle = Supervisor::spawn(
            Arc::new(spec),
            slot,
            listener,
            group,
            Shared {
                watcher: self.watcher.clone(),
                run_state: self.run_state.clone(),
                metrics: self.metrics.clone(),
            },
            adopted,
            starter,
        );
        let wakeable = Wakeable {
            published: handle.published.clone(),
            waker: handle.waker(),
        };
        self.by_slot
            .lock()
            .expect("lock")
            .insert(handle.slot, wakeable);
        services.insert(name, handle);
        Ok(prepared)
    }

    /// The `SO_REUSEPORT` group the current image of a snapshot-mode
    /// service listened through, if any: its size and owner.
    fn image_group(&self, spec: &ServiceSpec) -> Option<(usize, Option<u32>)> {
        if spec.mode != ServiceMode::Snapshot {
            return None;
        }
        let image = Image::open(&self.current_image(spec)).ok()?;
        snapshot::reuseport_group_in_image(image.manifest(), spec.port)
    }

    /// Shows `name` as failed with `error` in `status`.
    pub(super) fn mark_broken(&self, name: &str, error: String, declared_in: Option<PathBuf>) {
        self.broken
            .lock()
            .expect("lock")
            .insert(name.to_owned(), Broken { error, declared_in });
    }

    /// Stops and unregisters a service registered by `add`. One declared
    /// in a file is refused: the next reload would bring it back.
    pub async fn remove(&self, name: &str) -> Result<(), RegistryError> {
        if let Some(file) = self.declared_in(name) {
            return Err(RegistryError::Declared {
                name: name.to_owned(),
                file,
            });
        }
        self.unregister(name).await
    }

    /// The file that declares `name`, registered or failed, if one does.
    fn declared_in(&self, name: &str) -> Option<PathBuf> {
        let registered = self
            .services
            .lock()
            .expect("lock")
            .get(name)
            .map(|handle| handle.spec.declared_in.clone());
        registered.unwrap_or_else(|| {
            let broken = self.broken.lock().expect("lock");
            broken.get(name).and_then(|b| b.declared_in.clone())
        })
    }

    /// Every service by name, registered (with its definition) or failed
    /// (with the file that declares it, if one does): what a reload
    /// compares the services directory with.
    pub(super) fn current(&self) -> BTreeMap<String, Current> {
        let mut current: BTreeMap<_, _> = self
            .services
            .lock()
            .expect("lock")
            .iter()
            .map(|(name, handle)| {
                (
                    name.clone(),
                    Current::Registered(Box::new(ServiceSpec::clone(&handle.spec))),
                )
            })
            .collect();
        for (name, broken) in self.broken.lock().expect("lock").iter() {
            current
                .entry(name.clone())
                .or_insert_with(|| Current::Failed {
                    declared_in: broken.declared_in.clone(),
                });
        }
        current
    }

    /// The services directory.
    pub(super) fn services_dir(&self) -> &Path {
        &self.services_dir
    }

    /// Waits for any other reload to finish; the directory is applied by
    /// one reload at a time while the guard lives.
    pub(super) async fn reload_guard(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.reloading.lock().await
    }

    /// Replaces the errors of files whose services run on their earlier
    /// definition.
    pub(super) fn set_file_errors(&self, errors: BTreeMap<String, String>) {
        *self.file_errors.lock().expect("lock") = errors;
    }

    /// Stops and unregisters a service, whatever declared it.
    pub(super) async fn unregister(&self, name: &str) -> Result<(), RegistryError> {
        self.file_errors.lock().expect("lock").remove(name);
        if self.broken.lock().expect("lock").remove(name).is_some() {
            self.store.delete(name)?;
            return Ok(());
        }
        let spec = self.registered_spec(name);
        let done = self.remove_active(name)?;
        let _ = done.await;
        self.store.delete(name)?;
        if let Some(spec) = spec {
            self.drop_generations(&spec);
            self.discard_built_image(&spec);
        }
        self.run_state.clear(name);
        self.notes.lock().expect("lock").remove(name);
        self.keeper.stop(&self.run_state, name);
        Ok(())
    }

    fn remove_active(&self, name: &str) -> Result<oneshot::Receiver<()>, RegistryError> {
        let handle = {
            let mut services = self.services.lock().expect("lock");
            let handle = services
                .remove(name)
                .ok_or_else(|| RegistryError::Unknown(name.to_owned()))?;
            self.by_slot.lock().expect("lock").remove(&handle.slot);
            handle
        };
        self.watcher
            .lock()
            .expect("lock")
            .unregister(handle.slot, handle.spec.port);
        let (done, finished) = oneshot::channel();
        let _ = handle.commands.send(Command::Shutdown { done });
        Ok(finished)
    }

    /// Parks (`park == true`) or wakes a service now.
    pub async fn force(&self, name: &str, park: bool) -> Result<(), RegistryError> {
        let (done, answer) = oneshot::channel();
        {
            let services = self.services.lock().expect("lock");
            let handle = services
                .get(name)
                .ok_or_else(|| RegistryError::Unknown(name.to_owned()))?;
            let command = if park {
                Command::Park { done }
            } else {
                Command::WakeNow { done }
            };
            let _ = handle.commands.send(command);
        }
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(RegistryError::Refused(format!("{name}: {reason}"))),
            Err(_) => Err(RegistryError::Refused(format!(
                "{name}: its supervisor has stopped"
            ))),
        }
    }

    /// The generations of a snapshot service's kept state, oldest first.
    pub async fn history(&self, name: &str) -> Result<Vec<HistoryEntry>, RegistryError> {
        self.ask_generations(name, |done| GenerationsCommand::History { done })
            .await
    }

    /// Makes the next wake of a service restore generation `to` (a number
    /// or `pristine`), or the good one before its current one.
    pub async fn rollback(&self, name: &str, to: Option<&str>) -> Result<String, RegistryError> {
        let to = to
            .map(str::parse::<Generation>)
            .transpose()
            .map_err(RegistryError::Refused)?;
        self.ask_generations(name, |done| GenerationsCommand::Rollback { to, done })
            .await
    }

    /// Keeps a running service's state as a new generation without parking
    /// it, or tags the current generation of a parked one.
    pub async fn snapshot(&self, name: &str, tag: Option<String>) -> Result<String, RegistryError> {
        self.ask_generations(name, |done| GenerationsCommand::Snapshot { tag, done })
            .await
    }

    async fn ask_generations<T>(
        &self,
        name: &str,
        request: impl FnOnce(oneshot::Sender<Result<T, String>>) -> GenerationsCommand,
    ) -> Result<T, RegistryError> {
        let (done, answer) = oneshot::channel();
        {
            let services = self.services.lock().expect("lock");
            let handle = services
                .get(name)
                .ok_or_else(|| RegistryError::Unknown(name.to_owned()))?;
            let _ = handle
                .commands
                .send(Command::Generations(Box::new(request(done))));
        }
        match answer.await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(reason)) => Err(RegistryError::Refused(format!("{name}: {reason}"))),
            Err(_) => Err(RegistryError::Refused(format!(
                "{name}: its supervisor has stopped"
            ))),
        }
    }

    /// The exported metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Routes a BPF wake event to its service.
    pub fn wake(&self, event: &WakeEvent) {
        let event_us = super::since_monotonic_us(event.syn_ns);
        // Woken outside the lock: the wake may copy pages for a while.
        let waker = self
            .by_slot
            .lock()
            .expect("lock")
            .get(&event.service_id)
            .map(|wakeable| {
                wakeable.published.lock().expect("lock").last_event_us = Some(event_us);
                wakeable.waker.clone()
            });
        match waker {
            Some(waker) => waker.wake(event.syn_ns),
            None => warn!(slot = event.service_id, "wake event for an unused slot"),
        }
    }

    /// The first of `names` that `status` does not know (neither
    /// registered nor declared by a services file that failed), if any.
    pub fn unknown<'a>(&self, names: &'a [String]) -> Option<&'a str> {
        let unregistered: Vec<&String> = {
            let services = self.services.lock().expect("lock");
            names
                .iter()
                .filter(|name| !services.contains_key(*name))
                .collect()
        };
        let broken = self.broken.lock().expect("lock");
        unregistered
            .into_iter()
            .find(|name| !broken.contains_key(*name))
            .map(String::as_str)
    }

    /// The status of every service, or of those in `names`: one service's
    /// costs what it reads of that service alone, where every service's
    /// reads a record of each (370–510 ms at 10,000 services).
    ///
    /// Lock order: `services` is only ever taken before `watcher` (as in
    /// `activate`), and here neither is held while /proc is read.
    pub fn status(&self, names: Option<&[String]>) -> Vec<ServiceStatus> {
        let registered;
        let views: Vec<_> = {
            let services = self.services.lock().expect("lock");
            registered = services.len();
            let watcher = self.watcher.lock().expect("lock");
            services
                .values()
                .filter(|handle| names.is_none_or(|names| names.contains(&handle.spec.name)))
                .map(|handle| {
                    let parts = (
                        handle.spec.clone(),
                        handle.published.clone(),
                        handle.worker_report.clone(),
                    );
                    (parts, watcher.stats(handle.slot))
                })
                .collect()
        };
        let notes = self.notes.lock().expect("lock").clone();
        let file_errors = self.file_errors.lock().expect("lock").clone();
        let keeper = self.keeper.pid();
        let agent_share = agent_share(self.agent_baseline, registered, keeper);
        // One walk of /proc for every running service, none when all are parked.
        let processes = std::cell::OnceCell::new();
        let mut statuses: Vec<ServiceStatus> = views
            .into_iter()
            .map(|((spec, published, worker_report), stats)| {
                let mut view = published.lock().expect("lock").clone();
                let pager = worker_report
                    .as_ref()
                    .and_then(|report| report.lock().expect("lock").last_pager);
                // A parked service costs its prepared skeleton and a share
                // of the agent, its port keeper and its spawner
                // (docs/parked-cost.md); a
                // keeper of its own, left by an earlier agent, is its alone.
                let mut parked_cost = None;
                let mut skeleton_pid = None;
                let mut skeleton = None;
                let mut skeleton_bytes = None;
                if view.pid.is_none() {
                    let mut waiting: Vec<i32> = self
                        .run_state
                        .load_keeper(&spec.name)
                        .filter(run_state::is_alive)
                        .map(|record| record.pid)
                        .filter(|pid| Some(*pid) != keeper)
                        .into_iter()
                        .collect();
                    if let Some(report) = &worker_report {
                        let report = report.lock().expect("lock");
                        skeleton_pid = report.skeleton_pid;
                        skeleton = Some(
                            if report.skeleton_pid.is_some() {
                                "prepared"
                            } else {
                                "on disk"
                            }
                            .to_owned(),
                        );
                        skeleton_bytes = report
                            .skeleton_pid
                            .map(|pid| self.skeleton_costs.of(pid, report.skeleton_init_pid));
                        waiting.extend(report.skeleton_pid);
                        waiting.extend(report.skeleton_init_pid);
                    }
                    parked_cost = Some(parked_cost_of(&waiting, agent_share));
                }
                if view.pid.is_none()
                    && let Some(report) = &worker_report
                {
                    let report = report.lock().expect("lock");
                    if view.error.is_none() {
                        view.error = report.error.clone();
                    }
                    // Parked, but no skeleton could be prepared: the next
                    // wake would fail.
                    if view.state == State::Parked
                        && report.error.is_some()
                        && report.skeleton_pid.is_none()
                    {
                        view.state = if report.stale {
                            State::Stale
                        } else {
                            State::Failed
                        };
                    }
                }
                // A tree's processes as they are now: a worker respawned
                // since the wake included.
                let pids = view.pid.map(process_tree::tree_of).unwrap_or_default();
                ServiceStatus {
                    name: spec.name.clone(),
                    addr: spec.addr.to_string(),
                    port: spec.port,
                    mode: spec.mode.as_str().to_owned(),
                    state: view.state.as_str().to_owned(),
                    pid: view.pid,
                    syns: stats.syns,
                    wakes: view.wakes,
                    last_wake_us: view.last_wake_us,
                    last_event_us: view.last_event_us,
                    last_resume_us: view.last_resume_us,
                    last_faults: pager.as_ref().map(|p| p.faults),
                    last_fault_pages: pager.as_ref().map(|p| p.fault_pages),
                    last_filled_pages: pager.as_ref().map(|p| p.filled_pages),
                    last_prefetch_pages: pager.as_ref().map(|p| p.prefetched_pages),
                    rss_bytes: rss_of_sessions(&processes, &view.sessions),
                    pss_bytes: process_tree::pss_bytes(&pids),
                    pids,
                    parked_bytes: parked_cost.map_or(0, |cost| cost.total()),
                    skeleton_pid,
                    skeleton,
                    skeleton_bytes,
                    keep_skeleton: spec
                        .snapshot
                        .as_ref()
                        .map(|s| s.keep_skeleton.as_str().to_owned()),
                    parked_cost,
                    error: view.error.or_else(|| file_errors.get(&spec.name).cloned()),
                    generation: view.generation.map(|g| g.to_string()),
                    note: view.note.or_else(|| notes.get(&spec.name).cloned()),
                }
            })
            .collect();
        for (name, broken) in self.broken.lock().expect("lock").iter() {
            if names.is_some_and(|names| !names.contains(name)) {
                continue;
            }
            statuses.push(ServiceStatus {
                name: name.clone(),
                addr: String::new(),
                port: 0,
                mode: String::new(),
                state: "failed".into(),
                pid: None,
                syns: 0,
                wakes: 0,
                last_wake_us: None,
                last_event_us: None,
                last_resume_us: None,
                last_faults: None,
                last_fault_pages: None,
                last_filled_pages: None,
                last_prefetch_pages: None,
                rss_bytes: 0,
                pids: Vec::new(),
                pss_bytes: 0,
                parked_bytes: 0,
                skeleton_pid: None,
                skeleton: None,
                skeleton_bytes: None,
                keep_skeleton: None,
                parked_cost: None,
                error: Some(broken.error.clone()),
                generation: None,
                note: None,
            });
        }
        statuses
    }
}

/// Refuses a name or port a registered service has.
fn check_free_in(
    services: &BTreeMap<String, Handle>,
    spec: &ServiceSpec,
) -> Result<(), RegistryError> {
    if services.contains_key(&spec.name) {
        return Err(RegistryError::Exists(spec.name.clone()));
    }
    if let Some(owner) = services.values().find(|h| h.spec.port == spec.port) {
        return Err(RegistryError::PortTaken {
            port: spec.port,
            owner: owner.spec.name.clone(),
        });
    }
    Ok(())
}

/// What a SYN's wake needs of one service ([`Registry::wake`]).
struct Wakeable {
    published: Arc<Mutex<Published>>,
    waker: Waker,
}

/// The name and port of a service being added, held until the add ends.
struct Reservation<'a> {
    adding: &'a Mutex<BTreeMap<String, u16>>,
    name: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.adding.lock().expect("lock").remove(&self.name);
    }
}

/// Why the image in `dir` does not restore on this host, when it was taken
/// on another kernel build or CPU. Other faults are left to the prepare,
/// which reports them.
fn host_mismatch(dir: &Path) -> Option<ImageError> {
    let image = Image::open(dir).ok()?;
    match image.check_host(&crate::host::kernel_info(), &crate::host::cpu_info()) {
        Err(err @ (ImageError::KernelMismatch { .. } | ImageError::CpuMismatch { .. })) => {
            Some(err)
        }
        _ => None,
    }
}
