//! The rules file (`decision.rules`): any text parses or is refused with a reason; rules
//! that parse are evaluated and rendered on a transaction with arbitrary feature values.
#![no_main]

use fraudstream::decision::rules::{Inputs, RuleSet};
use fraudstream::decode::Transaction;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(rules) = RuleSet::parse(text) else {
        return;
    };
    let tx = Transaction::default();
    for value in [0.0, -1.0, f32::MAX, f32::NAN, f32::INFINITY] {
        let features = vec![value; rules.features.len()];
        let inputs = Inputs {
            tx: &tx,
            features: &features,
        };
        for rule in rules.fired(&inputs) {
            let _ = rule.render(&inputs, |_| None);
        }
    }
});
