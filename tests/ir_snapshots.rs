//! Snapshots of the printed forward and training IR of the two test models. A change
//! to the op set, the builder or autodiff shows up here as a reviewable diff.

use apar::ir::{text, verify};
use apar::models::{build_forward, zoo};
use apar::train::{training_graph, TrainOptions};

fn check(name: &str) {
    let fwd = build_forward(&zoo::lookup(name).unwrap()).unwrap();
    verify(&fwd).unwrap();
    let train = training_graph(&fwd, &TrainOptions::default()).unwrap();
    verify(&train).unwrap();
    // The printed form parses back to the same graph (the printer/parser law).
    assert_eq!(text::parse(&text::print(&train)).unwrap(), train);
    insta::assert_snapshot!(format!("{name}-forward"), text::print(&fwd));
    insta::assert_snapshot!(format!("{name}-train"), text::print(&train));
}

#[test]
fn tiny_gpt() {
    check("tiny-gpt");
}

#[test]
fn tiny_llama() {
    check("tiny-llama");
}
