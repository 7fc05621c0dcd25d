//! Offer choice: which GPU type, cloud and market (spot or on-demand) the next pod is bought
//! from. Pure: configured offers + market quotes + offers recently found unavailable + now →
//! candidates, cheapest first by effective price (price per GPU-hour ÷ relative throughput).
//!
//! Spot comes first where the offer allows it and it is cheaper; its on-demand twin follows in
//! the list, so a spot capacity error falls back to on-demand in the same tick. A capacity
//! error marks (GPU type, cloud, spot or not) unavailable for a while ([`Unavailable`]) so the
//! next choice moves on at once instead of hammering a sold-out type.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{Cloud, GpuTypeId, Timestamp, Usd};

/// One acceptable way to buy a pod, as configured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OfferSpec {
    /// GPU type id, exactly as RunPod spells it.
    pub gpu_type: GpuTypeId,
    /// GPUs per pod.
    pub gpus_per_pod: u32,
    /// Secure or community cloud.
    pub cloud: Cloud,
    /// Allowed data centers; empty = any.
    pub data_centers: Vec<String>,
    /// Spot allowed, bidding at most this per GPU-hour; `None` = on-demand only.
    pub max_bid_per_gpu: Option<Usd>,
    /// Work per GPU relative to the other offers (1.0 = reference); divides the price.
    pub throughput: f64,
}

/// How much of a GPU type is available now, as far as the market says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Availability {
    /// Some stock.
    InStock,
    /// None now.
    OutOfStock,
    /// Not reported: worth a try.
    Unknown,
}

/// Current prices (per GPU-hour) and stock of one GPU type.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quote {
    /// GPU type id.
    pub gpu_type: GpuTypeId,
    /// On-demand price in the secure cloud, when offered there.
    pub secure: Option<Usd>,
    /// On-demand price in the community cloud, when offered there.
    pub community: Option<Usd>,
    /// Spot price in the secure cloud, when offered.
    pub secure_spot: Option<Usd>,
    /// Spot price in the community cloud, when offered.
    pub community_spot: Option<Usd>,
    /// Lowest accepted spot bid, when known.
    pub minimum_bid: Option<Usd>,
    /// Stock.
    pub availability: Availability,
}

impl Quote {
    fn on_demand(&self, cloud: Cloud) -> Option<Usd> {
        match cloud {
            Cloud::Secure => self.secure,
            Cloud::Community => self.community,
        }
    }

    fn spot(&self, cloud: Cloud) -> Option<Usd> {
        match cloud {
            Cloud::Secure => self.secure_spot,
            Cloud::Community => self.community_spot,
        }
    }
}

/// Which market a pod is bought on: (GPU type, cloud, spot or not).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MarketKey {
    /// GPU type id.
    pub gpu_type: GpuTypeId,
    /// Cloud.
    pub cloud: Cloud,
    /// Spot (interruptible) or on-demand.
    pub spot: bool,
}

/// Markets that recently answered "no capacity", each until a time.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Unavailable {
    until: BTreeMap<MarketKey, Timestamp>,
}

impl Unavailable {
    /// No market marked.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks `key` unavailable from `now` for `ttl` (a later mark extends it).
    pub fn mark(&mut self, key: MarketKey, now: Timestamp, ttl: Duration) {
        let until = now.plus(ttl);
        let entry = self.until.entry(key).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// True while `key` is marked.
    pub fn contains(&self, key: &MarketKey, now: Timestamp) -> bool {
        self.until.get(key).is_some_and(|until| now < *until)
    }

    /// Drops expired marks.
    pub fn expire(&mut self, now: Timestamp) {
        self.until.retain(|_, until| now < *until);
    }

    /// Markets marked at `now`.
    pub fn marked(&self, now: Timestamp) -> impl Iterator<Item = &MarketKey> {
        self.until
            .iter()
            .filter(move |(_, until)| now < **until)
            .map(|(k, _)| k)
    }
}

/// One way to buy the next pod, priced.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    /// Index of the configured offer it comes from.
    pub offer: usize,
    /// The market.
    pub market: MarketKey,
    /// GPUs per pod.
    pub gpus: u32,
    /// Allowed data centers; empty = any.
    pub data_centers: Vec<String>,
    /// The spot bid per GPU-hour (`None` on-demand).
    pub bid_per_gpu: Option<Usd>,
    /// What the pod costs per hour (bid × GPUs for spot): what the budget counts.
    pub usd_per_hour: Usd,
    /// Price per GPU-hour ÷ throughput: the ranking key.
    pub effective_usd_per_gpu_hour: f64,
}

/// Every way to buy the next pod now, cheapest effective price first; ties keep the configured
/// order, spot before on-demand. Out-of-stock types, markets marked [`Unavailable`], offers
/// without a price, and spot above the offer's maximum bid are left out.
pub fn candidates(
    offers: &[OfferSpec],
    quotes: &[Quote],
    unavailable: &Unavailable,
    now: Timestamp,
) -> Vec<Candidate> {
    let mut out = Vec::new();
    for (i, offer) in offers.iter().enumerate() {
        let Some(quote) = quotes.iter().find(|q| q.gpu_type == offer.gpu_type) else {
            continue;
        };
        if quote.availability == Availability::OutOfStock
            || offer.gpus_per_pod == 0
            || !(offer.throughput.is_finite() && offer.throughput > 0.0)
        {
            continue;
        }
        let gpus = offer.gpus_per_pod;
        let mut push = |spot: bool, per_gpu: Usd, bid: Option<Usd>| {
            let market = MarketKey {
                gpu_type: offer.gpu_type.clone(),
                cloud: offer.cloud,
                spot,
            };
            if !valid_price(per_gpu) || unavailable.contains(&market, now) {
                return;
            }
            out.push(Candidate {
                offer: i,
                market,
                gpus,
                data_centers: offer.data_centers.clone(),
                bid_per_gpu: bid,
                usd_per_hour: Usd(per_gpu.dollars() * f64::from(gpus)),
                effective_usd_per_gpu_hour: per_gpu.dollars() / offer.throughput,
            });
        };
        if let (Some(max_bid), Some(spot)) = (offer.max_bid_per_gpu, quote.spot(offer.cloud)) {
            // Bid the going spot price, never under RunPod's floor nor over our maximum.
            let floor = quote.minimum_bid.map_or(0.0, Usd::dollars);
            let bid = spot.dollars().max(floor);
            if bid <= max_bid.dollars() + Usd::EPSILON {
                push(true, Usd(bid), Some(Usd(bid)));
            }
        }
        if let Some(price) = quote.on_demand(offer.cloud) {
            push(false, price, None);
        }
    }
    // Stable sort: equal prices keep the configured order and spot before its twin.
    out.sort_by(|a, b| {
        a.effective_usd_per_gpu_hour
            .total_cmp(&b.effective_usd_per_gpu_hour)
    });
    out
}

fn valid_price(p: Usd) -> bool {
    p.dollars().is_finite() && p.dollars() > 0.0
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const NOW: Timestamp = Timestamp::from_secs(1_000_000);

    fn offer(gpu: &str, cloud: Cloud, max_bid: Option<f64>, throughput: f64) -> OfferSpec {
        OfferSpec {
            gpu_type: GpuTypeId::from(gpu),
            gpus_per_pod: 1,
            cloud,
            data_centers: vec![],
            max_bid_per_gpu: max_bid.map(Usd),
            throughput,
        }
    }

    fn quote(gpu: &str, secure: f64, community: f64, spot: Option<(f64, f64)>) -> Quote {
        Quote {
            gpu_type: GpuTypeId::from(gpu),
            secure: Some(Usd(secure)),
            community: Some(Usd(community)),
            secure_spot: spot.map(|s| Usd(s.0)),
            community_spot: spot.map(|s| Usd(s.1)),
            minimum_bid: spot.map(|s| Usd(s.0.min(s.1))),
            availability: Availability::InStock,
        }
    }

    fn market() -> Vec<Quote> {
        vec![
            quote("NVIDIA RTX A5000", 0.26, 0.16, Some((0.14, 0.11))),
            quote("NVIDIA L40S", 0.86, 0.79, Some((0.43, 0.40))),
            quote("NVIDIA H200", 3.99, 3.59, None),
        ]
    }

    fn names(c: &[Candidate]) -> Vec<String> {
        c.iter()
            .map(|c| {
                format!(
                    "{} {} {}",
                    c.market.gpu_type,
                    c.market.cloud.as_str(),
                    if c.market.spot { "spot" } else { "on-demand" }
                )
            })
            .collect()
    }

    #[test]
    fn cheapest_effective_price_first_spot_before_on_demand() {
        // An L40S does 4× an A5000's work: its on-demand $0.86 is $0.215 effective, cheaper
        // than the A5000's $0.26 but dearer than the L40S spot at $0.43/4.
        let offers = vec![
            offer("NVIDIA RTX A5000", Cloud::Secure, Some(0.20), 1.0),
            offer("NVIDIA L40S", Cloud::Secure, Some(0.50), 4.0),
        ];
        let c = candidates(&offers, &market(), &Unavailable::new(), NOW);
        assert_eq!(
            names(&c),
            [
                "NVIDIA L40S SECURE spot",
                "NVIDIA RTX A5000 SECURE spot",
                "NVIDIA L40S SECURE on-demand",
                "NVIDIA RTX A5000 SECURE on-demand",
            ]
        );
        assert_eq!(c[0].bid_per_gpu, Some(Usd(0.43)));
        assert_eq!(c[0].usd_per_hour, Usd(0.43));
        assert_eq!(c[3].bid_per_gpu, None);
    }

    #[test]
    fn spot_over_the_maximum_bid_or_not_offered_is_left_out() {
        let offers = vec![
            offer("NVIDIA RTX A5000", Cloud::Community, Some(0.10), 1.0),
            offer("NVIDIA H200", Cloud::Secure, Some(5.0), 1.0),
        ];
        let c = candidates(&offers, &market(), &Unavailable::new(), NOW);
        assert_eq!(
            names(&c),
            [
                "NVIDIA RTX A5000 COMMUNITY on-demand",
                "NVIDIA H200 SECURE on-demand"
            ]
        );
    }

    #[test]
    fn unavailable_markets_and_out_of_stock_types_are_skipped_until_the_ttl_ends() {
        let offers = vec![offer("NVIDIA RTX A5000", Cloud::Secure, Some(0.20), 1.0)];
        let mut gone = Unavailable::new();
        let spot = MarketKey {
            gpu_type: GpuTypeId::from("NVIDIA RTX A5000"),
            cloud: Cloud::Secure,
            spot: true,
        };
        gone.mark(spot.clone(), NOW, Duration::from_secs(180));
        let c = candidates(&offers, &market(), &gone, NOW);
        assert_eq!(names(&c), ["NVIDIA RTX A5000 SECURE on-demand"]);
        let later = NOW.plus(Duration::from_secs(180));
        assert_eq!(candidates(&offers, &market(), &gone, later).len(), 2);
        gone.expire(later);
        assert_eq!(gone.marked(later).count(), 0);

        let mut sold_out = market();
        sold_out[0].availability = Availability::OutOfStock;
        assert!(candidates(&offers, &sold_out, &Unavailable::new(), NOW).is_empty());
        // Unknown stock is worth a try.
        sold_out[0].availability = Availability::Unknown;
        assert_eq!(
            candidates(&offers, &sold_out, &Unavailable::new(), NOW).len(),
            2
        );
    }

    #[test]
    fn the_bid_respects_the_floor_and_multi_gpu_pods_cost_per_gpu_times_count() {
        let mut o = offer("NVIDIA L40S", Cloud::Secure, Some(0.60), 1.0);
        o.gpus_per_pod = 4;
        let mut quotes = market();
        quotes[1].minimum_bid = Some(Usd(0.55));
        let c = candidates(&[o], &quotes, &Unavailable::new(), NOW);
        assert_eq!(c[0].bid_per_gpu, Some(Usd(0.55)));
        assert!((c[0].usd_per_hour.dollars() - 2.20).abs() < 1e-9);
        assert!((c[1].usd_per_hour.dollars() - 3.44).abs() < 1e-9);
    }

    #[test]
    fn marks_hold_until_their_end_exactly_and_expire_then() {
        let key = MarketKey {
            gpu_type: GpuTypeId::from("NVIDIA RTX A5000"),
            cloud: Cloud::Secure,
            spot: true,
        };
        let end = NOW.plus(Duration::from_secs(60));
        let before = NOW.plus(Duration::from_secs(59));
        let mut gone = Unavailable::new();
        gone.mark(key.clone(), NOW, Duration::from_secs(60));
        assert_eq!(gone.marked(NOW).collect::<Vec<_>>(), [&key]);
        assert_eq!(gone.marked(before).count(), 1);
        assert_eq!(gone.marked(end).count(), 0);
        // Expiring before the end keeps the mark; at the end it is dropped for good (even
        // when asked about an earlier time afterwards).
        gone.expire(before);
        assert_eq!(gone.marked(NOW).count(), 1);
        gone.expire(end);
        assert_eq!(gone.marked(NOW).count(), 0);
    }

    #[test]
    fn offers_that_cannot_be_priced_or_serve_nothing_are_left_out() {
        let good = offer("NVIDIA RTX A5000", Cloud::Secure, None, 1.0);
        assert_eq!(
            candidates(
                std::slice::from_ref(&good),
                &market(),
                &Unavailable::new(),
                NOW
            )
            .len(),
            1
        );
        let mut no_gpus = good.clone();
        no_gpus.gpus_per_pod = 0;
        for bad in [
            no_gpus,
            offer("NVIDIA RTX A5000", Cloud::Secure, None, 0.0),
            offer("NVIDIA RTX A5000", Cloud::Secure, None, -1.0),
            offer("NVIDIA RTX A5000", Cloud::Secure, None, f64::NAN),
            offer("NVIDIA RTX A5000", Cloud::Secure, None, f64::INFINITY),
        ] {
            assert!(
                candidates(
                    std::slice::from_ref(&bad),
                    &market(),
                    &Unavailable::new(),
                    NOW
                )
                .is_empty(),
                "{bad:?}"
            );
        }
        for price in [0.0, -0.26, f64::NAN, f64::INFINITY] {
            let mut quotes = market();
            quotes[0].secure = Some(Usd(price));
            assert!(
                candidates(
                    std::slice::from_ref(&good),
                    &quotes,
                    &Unavailable::new(),
                    NOW
                )
                .is_empty(),
                "on-demand at {price}"
            );
        }
    }

    #[test]
    fn a_spot_price_exactly_at_the_maximum_bid_is_bid() {
        let offers = vec![offer("NVIDIA RTX A5000", Cloud::Secure, Some(0.14), 1.0)];
        let c = candidates(&offers, &market(), &Unavailable::new(), NOW);
        assert_eq!(
            names(&c),
            [
                "NVIDIA RTX A5000 SECURE spot",
                "NVIDIA RTX A5000 SECURE on-demand"
            ]
        );
    }

    fn arb_offer() -> impl Strategy<Value = OfferSpec> {
        (
            0usize..3,
            proptest::bool::ANY,
            proptest::option::of(0.05f64..1.0),
            0.1f64..5.0,
            1u32..4,
        )
            .prop_map(|(g, secure, bid, throughput, gpus)| OfferSpec {
                gpu_type: GpuTypeId::from(["NVIDIA RTX A5000", "NVIDIA L40S", "NVIDIA H200"][g]),
                gpus_per_pod: gpus,
                cloud: if secure {
                    Cloud::Secure
                } else {
                    Cloud::Community
                },
                data_centers: vec![],
                max_bid_per_gpu: bid.map(Usd),
                throughput,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        #[test]
        fn candidates_are_sorted_within_limits_and_never_unavailable(
            offers in proptest::collection::vec(arb_offer(), 0..6),
            marks in proptest::collection::vec((0usize..3, proptest::bool::ANY, proptest::bool::ANY), 0..4),
        ) {
            let mut gone = Unavailable::new();
            for (g, secure, spot) in marks {
                gone.mark(MarketKey {
                    gpu_type: GpuTypeId::from(["NVIDIA RTX A5000", "NVIDIA L40S", "NVIDIA H200"][g]),
                    cloud: if secure { Cloud::Secure } else { Cloud::Community },
                    spot,
                }, NOW, Duration::from_secs(60));
            }
            let c = candidates(&offers, &market(), &gone, NOW);
            for w in c.windows(2) {
                prop_assert!(w[0].effective_usd_per_gpu_hour <= w[1].effective_usd_per_gpu_hour);
            }
            for cand in &c {
                prop_assert!(!gone.contains(&cand.market, NOW));
                let offer = &offers[cand.offer];
                prop_assert_eq!(cand.gpus, offer.gpus_per_pod);
                if let Some(bid) = cand.bid_per_gpu {
                    prop_assert!(cand.market.spot);
                    prop_assert!(bid.dollars() <= offer.max_bid_per_gpu.unwrap().dollars() + Usd::EPSILON);
                    prop_assert!((cand.usd_per_hour.dollars() - bid.dollars() * f64::from(cand.gpus)).abs() < 1e-9);
                }
            }
        }
    }
}
