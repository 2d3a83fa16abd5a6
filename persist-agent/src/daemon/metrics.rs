//! Prometheus metrics of the daemon, served as text on `--metrics ADDR`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry as MetricRegistry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::warn;

use super::Registry;
use crate::control::{ServiceStatus, SkeletonSummary};
use crate::restore::PagerStats;

/// What forked a restored process.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ForkedByLabel {
    by: String,
}

/// The label every persist metric carries.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

type Latency = Family<ServiceLabel, Histogram, fn() -> Histogram>;

/// Every metric the daemon exports.
pub struct Metrics {
    registry: MetricRegistry,
    wakes: Family<ServiceLabel, Counter>,
    wake_latency: Latency,
    checkpoint_duration: Latency,
    faults: Family<ServiceLabel, Counter>,
    fault_pages: Family<ServiceLabel, Counter>,
    filled_pages: Family<ServiceLabel, Counter>,
    syns: Family<ServiceLabel, Gauge>,
    parked_bytes: Family<ServiceLabel, Gauge>,
    running: Family<ServiceLabel, Gauge<f64, AtomicU64>>,
    rollbacks: Family<ServiceLabel, Counter>,
    generation: Family<ServiceLabel, Gauge>,
    skeletons_held: Gauge,
    skeleton_bytes: Gauge,
    skeleton_budget_bytes: Gauge,
    forked: Family<ForkedByLabel, Gauge>,
}

fn latency_histogram() -> Histogram {
    // 10 µs to about 5 s.
    Histogram::new(exponential_buckets(10e-6, 2.0, 20))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = MetricRegistry::with_prefix("persist");
        let wakes = Family::default();
        let wake_latency: Latency = Family::new_with_constructor(latency_histogram);
        let checkpoint_duration: Latency = Family::new_with_constructor(latency_histogram);
        let faults = Family::default();
        let fault_pages = Family::default();
        let filled_pages = Family::default();
        let syns = Family::default();
        let parked_bytes = Family::default();
        let running = Family::default();
        let rollbacks = Family::default();
        let generation = Family::default();
        let skeletons_held = Gauge::default();
        let skeleton_bytes = Gauge::default();
        let skeleton_budget_bytes = Gauge::default();
        let forked = Family::default();
        registry.register(
            "skeletons_held",
            "Prepared skeletons of parked services",
            skeletons_held.clone(),
        );
        registry.register(
            "skeleton_bytes",
            "What the prepared skeletons cost together: memory, page tables and kernel objects",
            skeleton_bytes.clone(),
        );
        registry.register(
            "skeleton_budget_bytes",
            "The daemon's --skeleton-budget (0: no limit)",
            skeleton_budget_bytes.clone(),
        );
        registry.register("wakes", "Times a parked service was woken", wakes.clone());
        registry.register(
            "wake_latency_seconds",
            "From the waking SYN to the service's process running",
            wake_latency.clone(),
        );
        registry.register(
            "checkpoint_duration_seconds",
            "Time to build or keep a service's image",
            checkpoint_duration.clone(),
        );
        registry.register(
            "page_faults",
            "Page faults served by the lazy pager",
            faults.clone(),
        );
        registry.register(
            "fault_pages",
            "Pages copied in to serve page faults",
            fault_pages.clone(),
        );
        registry.register(
            "filled_pages",
            "Pages copied in ahead of any fault, in the background",
            filled_pages.clone(),
        );
        registry.register(
            "syns",
            "New connections counted by the BPF program",
            syns.clone(),
        );
        registry.register(
            "parked_bytes",
            "What a parked service costs the host: memory, page tables and kernel objects of its skeleton and port keeper, and a share of the agent",
            parked_bytes.clone(),
        );
        registry.register(
            "running",
            "1 while the service's process runs",
            running.clone(),
        );
        registry.register(
            "rollbacks",
            "Kept generations marked bad because their process crashed after a wake",
            rollbacks.clone(),
        );
        registry.register(
            "generation",
            "Generation of the kept state running or to be restored (0: the pristine image)",
            generation.clone(),
        );
        registry.register(
            "processes_forked",
            "Processes restored since the daemon started, by what forked them: its spawner, or the agent itself",
            forked.clone(),
        );
        Self {
            registry,
            wakes,
            wake_latency,
            checkpoint_duration,
            faults,
            fault_pages,
            filled_pages,
            syns,
            parked_bytes,
            running,
            rollbacks,
            generation,
            skeletons_held,
            skeleton_bytes,
            skeleton_budget_bytes,
            forked,
        }
    }
}

impl Metrics {
    /// Records a wake and its SYN-to-running latency, when known.
    pub fn observe_wake(&self, service: &str, latency: Option<Duration>) {
        let label = label(service);
        self.wakes.get_or_create(&label).inc();
        if let Some(latency) = latency {
            self.wake_latency
                .get_or_create(&label)
                .observe(latency.as_secs_f64());
        }
    }

    /// Records the time an image took to write.
    pub fn observe_checkpoint(&self, service: &str, duration: Duration) {
        self.checkpoint_duration
            .get_or_create(&label(service))
            .observe(duration.as_secs_f64());
    }

    /// Records a rollback past a generation that crashed.
    pub fn observe_rollback(&self, service: &str) {
        self.rollbacks.get_or_create(&label(service)).inc();
    }

    /// Records what the pager did for one wake.
    pub fn observe_pager(&self, service: &str, stats: &PagerStats) {
        let label = label(service);
        self.faults.get_or_create(&label).inc_by(stats.faults);
        self.fault_pages
            .get_or_create(&label)
            .inc_by(stats.fault_pages);
        self.filled_pages
            .get_or_create(&label)
            .inc_by(stats.filled_pages);
    }

    /// Renders every metric in the Prometheus text format, with the gauges
    /// taken from `statuses` and `skeletons`.
    pub fn render(&self, statuses: &[ServiceStatus], skeletons: &SkeletonSummary) -> String {
        self.skeletons_held.set(skeletons.held as i64);
        self.skeleton_bytes.set(skeletons.held_bytes as i64);
        self.skeleton_budget_bytes
            .set(skeletons.budget_bytes.unwrap_or(0) as i64);
        let (by_spawner, by_agent) = crate::restore::spawner_forks();
        for (by, count) in [("spawner", by_spawner), ("agent", by_agent)] {
            let label = ForkedByLabel { by: by.to_owned() };
            self.forked.get_or_create(&label).set(count as i64);
        }
        for status in statuses {
            let label = label(&status.name);
            self.syns.get_or_create(&label).set(status.syns as i64);
            let running = status.state == "running";
            self.running
                .get_or_create(&label)
                .set(if running { 1.0 } else { 0.0 });
            self.parked_bytes
                .get_or_create(&label)
                .set(status.parked_bytes as i64);
            if let Some(generation) = &status.generation {
                let number = generation.parse::<i64>().unwrap_or(0);
                self.generation.get_or_create(&label).set(number);
            }
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

fn label(service: &str) -> ServiceLabel {
    ServiceLabel {
        service: service.to_owned(),
    }
}

/// Serves `GET /metrics` on `addr` until the daemon exits.
pub async fn serve(addr: SocketAddr, registry: Arc<Registry>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let Ok(len) = stream.read(&mut request).await else {
                return;
            };
            let head = String::from_utf8_lossy(&request[..len]);
            let response = if head.starts_with("GET /metrics ") || head.starts_with("GET / ") {
                let body = registry
                    .metrics()
                    .render(&registry.status(None), &registry.skeleton_summary());
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_owned()
            };
            if let Err(err) = stream.write_all(response.as_bytes()).await {
                warn!("metrics: {err}");
            }
        });
    }
}
