//! Route matching: host first (an exact host beats `*`, as a server block beats the
//! default server in NGINX), then the longest path prefix among that host's routes.
//! Prefixes are plain string prefixes, as in NGINX `location` and Envoy `prefix`.

use crate::config::HostMatch;

/// Anything that has a host and a prefix can be matched; routes in a snapshot do.
pub trait Matchable {
    fn host(&self) -> &HostMatch;
    fn path_prefix(&self) -> &str;
}

/// Orders routes for [`find`]: exact hosts first, then longest prefix first.
pub fn sort_for_matching<R: Matchable>(routes: &mut [R]) {
    routes.sort_by(|a, b| {
        let exact = |r: &R| matches!(r.host(), HostMatch::Exact(_));
        exact(b)
            .cmp(&exact(a))
            .then_with(|| b.path_prefix().len().cmp(&a.path_prefix().len()))
    });
}

/// Finds the route for a host (without port) and path, in routes sorted by
/// [`sort_for_matching`].
pub fn find<'a, R: Matchable>(routes: &'a [R], host: &str, path: &str) -> Option<&'a R> {
    find_index(routes, host, path).map(|i| &routes[i])
}

/// As [`find`], the route's index.
pub fn find_index<R: Matchable>(routes: &[R], host: &str, path: &str) -> Option<usize> {
    let mut host_has_routes = false;
    for (i, route) in routes.iter().enumerate() {
        match route.host() {
            HostMatch::Exact(name) if name.eq_ignore_ascii_case(host) => {
                host_has_routes = true;
                if path.starts_with(route.path_prefix()) {
                    return Some(i);
                }
            }
            HostMatch::Exact(_) => {}
            HostMatch::Any if host_has_routes => return None,
            HostMatch::Any => {
                if path.starts_with(route.path_prefix()) {
                    return Some(i);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    struct R(HostMatch, &'static str);
    impl Matchable for R {
        fn host(&self) -> &HostMatch {
            &self.0
        }
        fn path_prefix(&self) -> &str {
            self.1
        }
    }

    fn routes() -> Vec<R> {
        let mut routes = vec![
            R(HostMatch::Any, "/"),
            R(HostMatch::Any, "/api"),
            R(HostMatch::Exact("shop.example".into()), "/cart"),
            R(HostMatch::Any, "/api/v2"),
        ];
        sort_for_matching(&mut routes);
        routes
    }

    #[test]
    fn longest_prefix_wins() {
        let routes = routes();
        assert_eq!(find(&routes, "a", "/api/v2/x").unwrap().1, "/api/v2");
        assert_eq!(find(&routes, "a", "/api/v1").unwrap().1, "/api");
        assert_eq!(find(&routes, "a", "/other").unwrap().1, "/");
    }

    #[test]
    fn exact_host_routes_own_their_host() {
        let routes = routes();
        assert!(matches!(
            find(&routes, "SHOP.example", "/cart/1").unwrap().0,
            HostMatch::Exact(_)
        ));
        assert!(find(&routes, "shop.example", "/api").is_none());
    }

    #[test]
    fn no_match_is_none() {
        let routes = vec![R(HostMatch::Any, "/api")];
        assert!(find(&routes, "a", "/").is_none());
    }
}
