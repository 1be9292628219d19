//! Process logging: to stderr, filtered by `RUST_LOG` (default `info`), as text or JSON,
//! with a handle that changes the filter at run time.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Replaces the log filter of the running process.
pub type FilterHandle = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// Installs the global subscriber: JSON lines if `json`, else text. Returns the handle
/// that changes the filter.
pub fn init(json: bool) -> FilterHandle {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry
            .with(fmt.json().flatten_event(false).with_current_span(false))
            .init();
    } else {
        registry.with(fmt).init();
    }
    handle
}
