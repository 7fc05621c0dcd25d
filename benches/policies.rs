//! The policy comparison as a report, not a timing: every trace in `benches/traces/` replayed
//! with each policy (the simulator's reference policy and world), beside the clairvoyant lower
//! bound, printed as the `simulate` table. `cargo bench --bench policies` (release).

use std::path::Path;

use runpod_autoscaler::decide::PolicyKind;
use runpod_autoscaler::simulate::{
    compare, default_policy, render_table, Extras, SimParams, Trace,
};

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/traces");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "csv"))
        .collect();
    paths.sort();
    let policy = default_policy();
    let params = SimParams::default();
    let mut comparisons = Vec::new();
    for path in &paths {
        let trace = Trace::from_path(path).unwrap_or_else(|e| panic!("{e}"));
        let name = path
            .file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        let started = std::time::Instant::now();
        comparisons.push(compare(
            &name,
            &trace,
            &policy,
            &PolicyKind::ALL,
            &params,
            Extras {
                bound: true,
                timelines: false,
            },
        ));
        eprintln!("{name}: replays and bound in {:.2?}", started.elapsed());
    }
    print!("{}", render_table(&comparisons));
}
