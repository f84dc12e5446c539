//! Training one denoiser on zoos of several architectures: their weights
//! put into one union vector (`weights::ArchUnion`), standardized per
//! coordinate over the models that have it, each row conditioned on its
//! architecture's descriptor and scored on its own coordinates only.

use tch::{Kind, Tensor};

use super::TrainError;
use crate::model::TaskBatch;
use crate::weights::novelty::{DEFAULT_SPREAD_QUANTILE, MAX_REFERENCE_BYTES};
use crate::weights::{ArchUnion, Placement, Stats, StatsMode, ZooReference};
use crate::zoo::ZooDataset;

/// Zoos of several architectures in one weight space.
pub(super) struct UnionZoos {
    /// The union of the zoos' architectures, in zoo order.
    pub union: ArchUnion,
    /// Each zoo's architecture in the union.
    pub placements: Vec<Placement>,
    /// Each zoo's weights in the union [N_k, D_union] (zero off its
    /// coordinates).
    pub weights: Vec<Tensor>,
}

fn input(reason: String) -> TrainError {
    TrainError::Input {
        field: "also_zoos",
        reason,
    }
}

impl UnionZoos {
    /// Checks that the zoos can share a denoiser (one family, one feature
    /// schema, support sets of one shape) and places them.
    pub fn new(datasets: &[ZooDataset]) -> Result<Self, TrainError> {
        let first = &datasets[0];
        for data in &datasets[1..] {
            if data.family != first.family || data.schema != first.schema {
                return Err(input(format!(
                    "zoo of {:?} has another family or feature schema than the zoo of {:?}",
                    data.network.spec.name, first.network.spec.name
                )));
            }
            let shape = |d: &ZooDataset| d.support.as_ref().map(|(x, y)| (x.size(), y.size()[2]));
            let (a, b) = (shape(first), shape(data));
            if a.as_ref().map(|(x, y)| (x[1..].to_vec(), *y))
                != b.as_ref().map(|(x, y)| (x[1..].to_vec(), *y))
            {
                return Err(input(format!(
                    "zoo of {:?} has support sets of another shape",
                    data.network.spec.name
                )));
            }
        }
        let specs: Vec<_> = datasets.iter().map(|d| d.network.spec.clone()).collect();
        let union = ArchUnion::new(&specs).map_err(|e| input(e.to_string()))?;
        let placements = specs
            .iter()
            .map(|s| union.place(s).map_err(|e| input(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let weights = datasets
            .iter()
            .zip(&placements)
            .map(|(data, placement)| {
                let rows = data.weights.size()[0];
                let index = Tensor::from_slice(&placement.indices);
                Tensor::zeros([rows, union.dim() as i64], (Kind::Double, tch::Device::Cpu))
                    .index_copy(1, &index, &data.weights.to_kind(Kind::Double))
            })
            .collect();
        Ok(Self {
            union,
            placements,
            weights,
        })
    }

    /// Zoo k's architecture rows for `rows` models: descriptors [rows, A]
    /// and masks [rows, D_union].
    pub fn architecture_rows(&self, k: usize, rows: i64) -> (Tensor, Tensor) {
        let placement = &self.placements[k];
        let descriptor = Tensor::from_slice(&placement.descriptor)
            .view([1, -1])
            .expand([rows, -1], false)
            .contiguous();
        let mask = Tensor::from_slice(&placement.mask(self.union.dim()))
            .view([1, -1])
            .expand([rows, -1], false)
            .contiguous();
        (descriptor, mask)
    }

    /// Per-coordinate mean and std over the rows `train[k]` of every zoo k
    /// that has the coordinate (0 and 1 where none has it).
    pub fn stats(&self, train: &[Vec<i64>], floor: f64) -> Stats {
        let dim = self.union.dim() as i64;
        let (mut sum, mut square, mut count) = (
            Tensor::zeros([dim], (Kind::Double, tch::Device::Cpu)),
            Tensor::zeros([dim], (Kind::Double, tch::Device::Cpu)),
            Tensor::zeros([dim], (Kind::Double, tch::Device::Cpu)),
        );
        for (k, rows) in train.iter().enumerate() {
            let w = self.weights[k].index_select(0, &Tensor::from_slice(rows));
            let mask =
                Tensor::from_slice(&self.placements[k].mask(dim as usize)).to_kind(Kind::Double);
            sum += w.sum_dim_intlist(0, false, Kind::Double);
            square += w.square().sum_dim_intlist(0, false, Kind::Double);
            count += mask * rows.len() as f64;
        }
        let n = count.clamp_min(1.0);
        let mean = &sum / &n;
        let var = (&square / &n - mean.square()).clamp_min(0.0);
        let unused = count.eq(0.0);
        let std = var.sqrt().clamp_min(floor).masked_fill(&unused, 1.0);
        Stats {
            mean,
            std,
            mode: StatsMode::PerDimension,
            floor,
        }
    }

    /// Zoo k's standardized rows, zero off its coordinates.
    pub fn standardized(&self, k: usize, stats: &Stats) -> Tensor {
        let mask = Tensor::from_slice(&self.placements[k].mask(self.union.dim()));
        (stats.normalize(&self.weights[k]) * mask.to_kind(Kind::Double)).to_kind(Kind::Float)
    }

    /// The memorization guard's reference of each zoo (its training rows).
    pub fn references(datasets: &[ZooDataset], train: &[Vec<i64>]) -> Vec<Option<ZooReference>> {
        datasets
            .iter()
            .zip(train)
            .map(|(data, rows)| {
                let w = data.weights.index_select(0, &Tensor::from_slice(rows));
                ZooReference::fit(&w, MAX_REFERENCE_BYTES, DEFAULT_SPREAD_QUANTILE)
            })
            .collect()
    }
}

/// Concatenates conditions of the same inputs row-wise.
pub(super) fn concat(conditions: Vec<TaskBatch>) -> TaskBatch {
    let cat = |pick: &dyn Fn(&TaskBatch) -> Option<Tensor>| -> Option<Tensor> {
        let parts: Option<Vec<Tensor>> = conditions.iter().map(pick).collect();
        parts.map(|p| Tensor::cat(&p, 0))
    };
    let copy = |t: &Option<Tensor>| t.as_ref().map(Tensor::shallow_clone);
    TaskBatch {
        features: cat(&|c| copy(&c.features)),
        support_x: cat(&|c| copy(&c.support_x)),
        support_y: cat(&|c| copy(&c.support_y)),
        features_dropped: cat(&|c| copy(&c.features_dropped)),
        support_dropped: cat(&|c| copy(&c.support_dropped)),
        arch_descriptor: cat(&|c| copy(&c.arch_descriptor)),
        arch_mask: cat(&|c| copy(&c.arch_mask)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenation_keeps_every_input_in_order() {
        let row = |v: f32| TaskBatch {
            arch_descriptor: Some(Tensor::from_slice(&[v]).view([1, 1])),
            ..TaskBatch::features(Tensor::from_slice(&[v, v]).view([1, 2]))
        };
        let both = concat(vec![row(1.0), row(2.0)]);
        let features = both.features.unwrap();
        assert_eq!(features.size(), vec![2, 2]);
        assert_eq!(features.double_value(&[1, 0]), 2.0);
        assert_eq!(both.arch_descriptor.unwrap().double_value(&[1, 0]), 2.0);
        assert!(both.support_x.is_none());
    }
}
