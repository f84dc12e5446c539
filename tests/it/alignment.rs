//! Permutation alignment on trained zoo models: the aligned model computes
//! the same function on real inputs and sits closer to the reference.

use tch::Device;
use weightgen::tasks::train::train;
use weightgen::tasks::{Family, TaskSpec};
use weightgen::weights::{PermutationSpec, align};

#[test]
fn trained_models_align_without_changing_their_function() {
    tch::set_num_threads(1);
    let family = Family::Digits;
    let task = TaskSpec::Digits {
        classes: vec![0, 1, 2, 3, 4],
    };
    let data = family.data(&task, Device::Cpu).unwrap();
    for net in family.networks() {
        let config = family.train_config();
        let fit = |seed| {
            train(
                &net,
                &net.init(seed, Device::Cpu),
                &data,
                family.objective(),
                &config,
                seed,
            )
            .unwrap()
        };
        let (reference, model) = (fit(1), fit(2));
        let spec = PermutationSpec::new(&net.spec).unwrap();
        let (aligned, report) = align(&spec, &reference.params, &model.params, 20);
        let before = net.forward(&model.params, &data.test_x).unwrap();
        let after = net.forward(&aligned, &data.test_x).unwrap();
        let change = (&before - after).abs().max().double_value(&[]);
        // Permuted sums round differently in f32: compare with the outputs'
        // own size (a wrong permutation changes them by about that much).
        let scale = before.abs().max().double_value(&[]).max(1.0);
        eprintln!(
            "{}: distance to the reference {:.3} → {:.3} in {} sweeps; max output change {change:.2e}",
            net.spec.name, report.distance_before, report.distance_after, report.sweeps
        );
        assert!(
            change < 1e-5 * scale,
            "{}: {change} (outputs up to {scale})",
            net.spec.name
        );
        assert!(
            report.distance_after < 0.95 * report.distance_before,
            "{}: {report:?}",
            net.spec.name
        );
    }
}
