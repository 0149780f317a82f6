//! `make bench`: runs scenarios several times and prints each figure's
//! minimum, median and maximum, since single TCG runs are noisy.

use std::collections::BTreeMap;

use anyhow::Result;

use crate::scenarios::Report;

/// Runs `scenario` `runs` times and prints a summary table.
pub fn repeat(title: &str, runs: usize, scenario: fn(bool) -> Result<Report>) -> Result<()> {
    let mut order: Vec<String> = Vec::new();
    let mut values: BTreeMap<String, (Vec<f64>, &'static str)> = BTreeMap::new();
    for run in 1..=runs {
        eprintln!("bench: {title}: run {run}/{runs}");
        for fig in scenario(false)?.figures {
            if !values.contains_key(&fig.what) {
                order.push(fig.what.clone());
            }
            values.entry(fig.what).or_insert_with(|| (Vec::new(), fig.unit)).0.push(fig.value);
        }
    }
    println!("== {title} ({runs} runs)");
    println!("   {:<44} {:>8} {:>8} {:>8}", "", "min", "median", "max");
    for what in order {
        let (mut v, unit) = values.remove(&what).unwrap();
        v.sort_by(f64::total_cmp);
        println!("   {what:<44} {:>8.0} {:>8.0} {:>8.0} {unit}", v[0], v[v.len() / 2], v[v.len() - 1]);
    }
    Ok(())
}
