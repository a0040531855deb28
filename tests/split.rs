//! Properties of the split over 100 000 synthetic user IDs (a deterministic generator,
//! so every run checks the same IDs), and the pinned known-answer vector.

use std::net::{IpAddr, Ipv4Addr};

use http::{HeaderMap, HeaderValue, Uri};
use splitgate::config;
use splitgate::proxy::split::{bucket, decide, Decision, Reason, RequestView, SaltKey, Variant};

const USERS: usize = 100_000;

fn user_ids() -> impl Iterator<Item = String> {
    // A fixed LCG: deterministic, and not sequential-looking.
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    (0..USERS).map(move |i| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        format!("user-{i}-{:x}", state >> 33)
    })
}

fn route(extra: &str) -> config::RouteSpec {
    let key = if extra.contains("split_key") {
        ""
    } else {
        "split_key = [\"header:x-user-id\"]"
    };
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.s]\ninstances = [\"127.0.0.1:1\"]\n[upstreams.c]\ninstances = [\"127.0.0.1:2\"]\n[[routes]]\nname = \"api\"\nstable = \"s\"\ncanary = \"c\"\n{key}\n{extra}\n"
    );
    config::parse(std::path::Path::new("t.toml"), &text)
        .unwrap()
        .routes
        .remove(0)
}

fn decide_for(route: &config::RouteSpec, weight_bp: u32, headers: &HeaderMap) -> Decision {
    let uri = Uri::from_static("/");
    let view = RequestView {
        headers,
        uri: &uri,
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    decide(route, weight_bp, false, &view)
}

fn with_user(id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("x-user-id", HeaderValue::from_str(id).unwrap());
    headers
}

#[test]
fn known_answer_vector_never_changes() {
    // If this test fails, users moved between sides: never ship that silently.
    let api = SaltKey::derive("api");
    let checkout = SaltKey::derive("checkout");
    let pinned = [
        (&api, "alice", 9051),
        (&api, "bob", 6227),
        (&api, "user-42", 2230),
        (&checkout, "alice", 4358),
        (&checkout, "", 2409),
    ];
    let got: Vec<_> = pinned
        .iter()
        .map(|(salt, key, _)| (*key, bucket(salt, key.as_bytes())))
        .collect();
    let want: Vec<_> = pinned.iter().map(|(_, key, b)| (*key, *b)).collect();
    assert_eq!(got, want);
}

#[test]
fn the_same_key_always_gets_the_same_side() {
    let route = route("");
    for id in user_ids().take(10_000) {
        let headers = with_user(&id);
        let first = decide_for(&route, 2_500, &headers);
        for _ in 0..3 {
            assert_eq!(decide_for(&route, 2_500, &headers), first);
        }
    }
}

#[test]
fn canary_fraction_is_within_half_a_point_of_the_weight() {
    let route = route("");
    let buckets: Vec<u32> = user_ids()
        .map(|id| bucket(&route.salt, id.as_bytes()))
        .collect();
    for percent in [1u32, 5, 50, 99] {
        let weight_bp = percent * 100;
        let canary = buckets.iter().filter(|&&b| b < weight_bp).count();
        let fraction = canary as f64 / USERS as f64 * 100.0;
        assert!(
            (fraction - percent as f64).abs() <= 0.5,
            "weight {percent}%: canary got {fraction:.3}%"
        );
        // The decision agrees with the bucket.
        let id = user_ids().nth(7).unwrap();
        let expected = if bucket(&route.salt, id.as_bytes()) < weight_bp {
            Variant::Canary
        } else {
            Variant::Stable
        };
        assert_eq!(
            decide_for(&route, weight_bp, &with_user(&id)).variant,
            expected
        );
    }
}

#[test]
fn raising_the_weight_never_moves_a_canary_user_back() {
    let route = route("");
    let ids: Vec<String> = user_ids().collect();
    let weights = [0u32, 100, 500, 1_000, 2_500, 5_000, 7_500, 9_900, 10_000];
    for pair in weights.windows(2) {
        for id in &ids {
            let headers = with_user(id);
            let before = decide_for(&route, pair[0], &headers).variant;
            let after = decide_for(&route, pair[1], &headers).variant;
            assert!(
                !(before == Variant::Canary && after == Variant::Stable),
                "{id} moved back to stable going {} -> {} bp",
                pair[0],
                pair[1]
            );
        }
    }
}

#[test]
fn routes_with_different_salts_pick_nearly_independent_users() {
    let a = SaltKey::derive("api");
    let b = SaltKey::derive("checkout");
    let weight = 1_000; // 10 % each: independent sets overlap on about 1 %.
    let (mut in_a, mut in_b, mut both) = (0, 0, 0);
    for id in user_ids() {
        let ca = bucket(&a, id.as_bytes()) < weight;
        let cb = bucket(&b, id.as_bytes()) < weight;
        in_a += ca as usize;
        in_b += cb as usize;
        both += (ca && cb) as usize;
    }
    let expected = in_a as f64 * in_b as f64 / USERS as f64;
    let overlap = both as f64;
    assert!(
        (overlap - expected).abs() / expected < 0.15,
        "overlap {overlap}, independent would be {expected:.0}"
    );
}

#[test]
fn an_explicit_salt_reshuffles_and_the_default_is_the_route_name() {
    let default = route("");
    assert_eq!(default.salt, SaltKey::derive("api"));
    let salted = route("hash_salt = \"reshuffle-2026\"");
    assert_eq!(salted.salt, SaltKey::derive("reshuffle-2026"));
}

#[test]
fn override_header_and_cookie_force_a_side_only_when_enabled_and_from_override_from() {
    // Off by default.
    let mut headers = with_user("someone");
    headers.insert("x-splitgate-variant", HeaderValue::from_static("canary"));
    assert_eq!(
        decide_for(&route(""), 0, &headers).reason,
        Reason::Hash,
        "the override is off by default"
    );
    // Enabled, but from a peer outside override_from (loopback by default).
    let route = route("override_enabled = true");
    let uri = Uri::from_static("/");
    let outsider = RequestView {
        headers: &headers,
        uri: &uri,
        client_ip: "203.0.113.7".parse().unwrap(),
    };
    assert_eq!(decide(&route, 0, false, &outsider).reason, Reason::Hash);
    let listed = self::route("override_enabled = true\noverride_from = [\"203.0.113.0/24\"]");
    assert_eq!(
        decide(&listed, 0, false, &outsider).reason,
        Reason::Override
    );
    assert_eq!(
        decide_for(&listed, 0, &headers).reason,
        Reason::Hash,
        "loopback not listed"
    );

    let mut headers = with_user("someone");
    headers.insert("x-splitgate-variant", HeaderValue::from_static("canary"));
    let forced = decide_for(&route, 0, &headers);
    assert_eq!(
        (forced.variant, forced.reason),
        (Variant::Canary, Reason::Override)
    );

    let mut headers = with_user("someone");
    headers.insert(
        "cookie",
        HeaderValue::from_static("a=1; x-splitgate-variant=stable"),
    );
    assert_eq!(
        decide_for(&route, 10_000, &headers).variant,
        Variant::Stable
    );

    let off = self::route("override_enabled = true\noverride_name = \"\"");
    let mut headers = with_user("someone");
    headers.insert("x-splitgate-variant", HeaderValue::from_static("canary"));
    assert_eq!(decide_for(&off, 0, &headers).variant, Variant::Stable);

    // A tripped route ignores a request to force the canary.
    let uri = Uri::from_static("/");
    let view = RequestView {
        headers: &headers,
        uri: &uri,
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    assert_eq!(decide(&route, 0, true, &view).variant, Variant::Stable);
}

#[test]
fn allow_listed_keys_go_to_the_canary() {
    let route = route("canary_allow_list = [\"tester-1\"]");
    let decision = decide_for(&route, 0, &with_user("tester-1"));
    assert_eq!(
        (decision.variant, decision.reason),
        (Variant::Canary, Reason::AllowList)
    );
    assert_eq!(
        decide_for(&route, 0, &with_user("tester-2")).variant,
        Variant::Stable
    );
}

#[test]
fn key_sources_in_order_then_the_sticky_cookie() {
    let route = route("split_key = [\"header:x-user-id\", \"cookie:session\", \"query:uid\"]");
    let uri: Uri = "/x?a=1&uid=q-user".parse().unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(
        "cookie",
        HeaderValue::from_static("theme=dark; session=c-user"),
    );
    let view = |h: &HeaderMap, u: &Uri| {
        decide(
            &route,
            5_000,
            false,
            &RequestView {
                headers: h,
                uri: u,
                client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            },
        )
    };
    assert_eq!(
        view(&headers, &uri).bucket,
        Some(bucket(&route.salt, b"c-user"))
    );
    assert_eq!(
        view(&HeaderMap::new(), &uri).bucket,
        Some(bucket(&route.salt, b"q-user"))
    );

    // No key at all: a new random key, to be set as the sticky cookie...
    let fresh = view(&HeaderMap::new(), &Uri::from_static("/"));
    assert_eq!(fresh.reason, Reason::NewKey);
    let key = fresh.new_key.expect("a sticky key");
    // ...which then decides the same way on the next request.
    let mut next = HeaderMap::new();
    next.insert(
        "cookie",
        HeaderValue::from_str(&format!("splitgate_uid={key}")).unwrap(),
    );
    let again = view(&next, &Uri::from_static("/"));
    assert_eq!(
        (again.reason, again.variant, again.bucket),
        (Reason::Hash, fresh.variant, fresh.bucket)
    );
}

#[test]
fn client_ip_is_hashed_as_text() {
    let route = route("split_key = [\"client_ip\"]");
    let headers = HeaderMap::new();
    let uri = Uri::from_static("/");
    let ip: IpAddr = "203.0.113.7".parse().unwrap();
    let decision = decide(
        &route,
        5_000,
        false,
        &RequestView {
            headers: &headers,
            uri: &uri,
            client_ip: ip,
        },
    );
    assert_eq!(decision.bucket, Some(bucket(&route.salt, b"203.0.113.7")));
}
