//! Routing: which link a flow to a given site takes.
//!
//! Every site floods an advertisement listing its up links and their costs (see
//! `catalog.rs`). From those, each agent runs Dijkstra from itself. An edge counts only when
//! both ends list each other, so a site whose links all died (and whose own stale
//! advertisement still lists them) is unreachable as soon as its neighbours notice. The
//! result is, per reachable site, the neighbour site to hand the flow to and the path cost.
//! Plain data in, plain data out: tested without any network.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

/// One site's view of its links: neighbour site → cost (the cheapest link to it).
pub type Adjacencies = BTreeMap<String, u32>;

/// The route to one site (and one entry of `routes` in `causeway status -o json`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Route {
    /// The neighbour of ours the flow goes to first.
    pub next_hop: String,
    /// Total cost of the path.
    pub cost: u64,
    /// Number of links on the path.
    pub hops: u32,
}

/// Shortest paths from `me` over the two-way edges of `graph` (site → its adjacencies).
/// Ties are broken by fewer hops, then by neighbour name, so every agent decides alike.
pub fn shortest_paths(me: &str, graph: &BTreeMap<String, Adjacencies>) -> BTreeMap<String, Route> {
    let two_way = |a: &str, b: &str| graph.get(b).is_some_and(|adj| adj.contains_key(a));
    let mut best: BTreeMap<String, Route> = BTreeMap::new();
    let mut heap = BinaryHeap::new();
    // (cost, hops, next_hop, site)
    if let Some(adj) = graph.get(me) {
        for (n, c) in adj {
            if n != me && two_way(me, n) {
                heap.push(Reverse((u64::from(*c), 1u32, n.clone(), n.clone())));
            }
        }
    }
    while let Some(Reverse((cost, hops, next_hop, site))) = heap.pop() {
        if site == me || best.contains_key(&site) {
            continue;
        }
        if let Some(adj) = graph.get(&site) {
            for (n, c) in adj {
                if !best.contains_key(n) && n != me && two_way(&site, n) {
                    heap.push(Reverse((cost + u64::from(*c), hops + 1, next_hop.clone(), n.clone())));
                }
            }
        }
        best.insert(site, Route { next_hop, cost, hops });
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &str, u32)]) -> BTreeMap<String, Adjacencies> {
        let mut g: BTreeMap<String, Adjacencies> = BTreeMap::new();
        for (a, b, c) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string(), *c);
            g.entry(b.to_string()).or_default().insert(a.to_string(), *c);
        }
        g
    }

    #[test]
    fn hub_and_spoke_goes_through_the_hub() {
        let g = graph(&[("paris", "london", 1), ("tokyo", "london", 1)]);
        let r = shortest_paths("paris", &g);
        assert_eq!(
            r["tokyo"],
            Route {
                next_hop: "london".into(),
                cost: 2,
                hops: 2
            }
        );
        assert_eq!(r["london"].next_hop, "london");
        assert!(!r.contains_key("paris"));
    }

    #[test]
    fn cheaper_path_wins_and_failover_takes_the_other() {
        let mut g = graph(&[("paris", "london", 10), ("paris", "tokyo", 1), ("tokyo", "london", 1)]);
        assert_eq!(shortest_paths("paris", &g)["london"].next_hop, "tokyo");
        // tokyo dies: its neighbours stop listing it; its own stale advertisement remains.
        g.get_mut("paris").unwrap().remove("tokyo");
        g.get_mut("london").unwrap().remove("tokyo");
        let r = shortest_paths("paris", &g);
        assert_eq!(
            r["london"],
            Route {
                next_hop: "london".into(),
                cost: 10,
                hops: 1
            }
        );
        assert!(!r.contains_key("tokyo"), "one-way edges do not count");
    }

    #[test]
    fn unreachable_and_empty() {
        let g = graph(&[("a", "b", 1), ("c", "d", 1)]);
        let r = shortest_paths("a", &g);
        assert_eq!(r.keys().collect::<Vec<_>>(), vec!["b"]);
        assert!(shortest_paths("zzz", &g).is_empty());
    }

    #[test]
    fn ties_break_deterministically() {
        let g = graph(&[("a", "b", 1), ("a", "c", 1), ("b", "d", 1), ("c", "d", 1)]);
        assert_eq!(shortest_paths("a", &g)["d"].next_hop, "b");
    }
}
