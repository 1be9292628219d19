//! Applying a route's filters to a request and its response.
//!
//! The filters themselves (header modifiers, redirects, URL rewrites, with Gateway API
//! semantics) live in [`ambit_shared::route`] as pure functions; this module applies them
//! in the order the waypoint needs:
//!
//! 1. the rule's request filters, in order; a `RequestRedirect` ends processing with a
//!    redirect response;
//! 2. once a backend is chosen, that backend's request filters;
//! 3. on the way back, the rule's then the backend's `ResponseHeaderModifier`s.

use ambit_shared::route::{self, RequestOutcome};
use http::header::LOCATION;
use http::{HeaderMap, Response};

pub use ambit_shared::route::{
    Filter, FilterError, HeaderModifier, PathModifier, Redirect, Redirection, Rewrite,
};

/// What to do with a request after its filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward the (possibly changed) request.
    Forward,
    /// Answer with this redirect.
    Redirect(Redirection),
}

/// Applies `filters` to the request head. `port` is the port the client dialled (the
/// service port), which a redirect keeps when it does not set one.
pub fn apply_request(
    filters: &[Filter],
    parts: &mut http::request::Parts,
    port: u16,
) -> Result<Decision, FilterError> {
    Ok(match route::apply_request_filters(filters, parts, port)? {
        RequestOutcome::Forward => Decision::Forward,
        RequestOutcome::Redirect(r) => Decision::Redirect(r),
    })
}

/// Applies the `ResponseHeaderModifier`s among each of `filter_sets`, in order.
pub fn apply_response<'a>(
    filter_sets: impl IntoIterator<Item = &'a [Filter]>,
    headers: &mut HeaderMap,
) {
    for filters in filter_sets {
        route::apply_response_filters(filters, headers);
    }
}

/// The response for a redirect.
pub fn redirect_response<B: Default>(r: &Redirection) -> Response<B> {
    let mut resp = Response::new(B::default());
    *resp.status_mut() = r.status;
    resp.headers_mut().insert(LOCATION, r.location.clone());
    resp
}

#[cfg(test)]
mod tests;
