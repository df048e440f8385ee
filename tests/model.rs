//! The engine against PyTorch: logits and per-reader gradients on every fixture model
//! (`scripts/make_fixtures.py`), and clear errors on malformed models.

use candle_core::{Device, Tensor};
use eap::model::{Batch, ForwardOptions, Model};
use eap::tasks::{metric_gradient, Metric, Target};

use crate::util::*;

fn load(name: &str) -> Model {
    Model::load_dir(&fixture_dir(name), &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn logits_match_pytorch_on_every_fixture() {
    for name in MODEL_FIXTURES {
        let model = load(name);
        let refs = reference(name);
        for (tok_key, logit_key) in [
            ("tokens", "logits"),
            ("corrupted_tokens", "corrupted_logits"),
        ] {
            let batch = Batch::new(&tokens(&refs[tok_key]), &Device::Cpu).unwrap();
            let opts = ForwardOptions {
                logit_positions: (0..batch.seq_len).collect(),
                ..Default::default()
            };
            let out = model.forward(&batch, &opts).unwrap();
            let err = rel_err(&flat(&out.logits), &flat(&refs[logit_key]));
            assert!(err <= 1e-4, "{name} {logit_key}: relative error {err:e}");
        }
    }
}

/// The logit difference at the last position, as the fixture script defines it.
fn logit_diff_grad(
    model: &Model,
    refs: &std::collections::HashMap<String, Tensor>,
    logits: &Tensor,
) -> Tensor {
    let targets: Vec<Target> = ids(&refs["answer"])
        .into_iter()
        .zip(ids(&refs["wrong"]))
        .map(|(a, w)| Target {
            answers: vec![a],
            wrongs: vec![w],
        })
        .collect();
    let v = model.cfg.d_vocab_out;
    let g = metric_gradient(Metric::LogitDiff, &flat(logits), v, &targets, None).unwrap();
    Tensor::from_vec(g, logits.shape().clone(), &Device::Cpu).unwrap()
}

#[test]
fn reader_gradients_match_pytorch_on_every_fixture() {
    for name in MODEL_FIXTURES {
        let model = load(name);
        let refs = reference(name);
        let batch = Batch::new(&tokens(&refs["tokens"]), &Device::Cpu).unwrap();
        let out = model
            .forward(
                &batch,
                &ForwardOptions {
                    keep_cache: true,
                    keep_writers: true,
                    ..Default::default()
                },
            )
            .unwrap();
        let dlogits = logit_diff_grad(&model, &refs, &out.logits);
        let grads = model
            .reader_gradients(out.cache.as_ref().unwrap(), &dlogits)
            .unwrap();
        let graph = model.graph();
        for (r, g) in grads.iter().enumerate() {
            let key = format!("grad.{}", graph.reader_name(r));
            let err = rel_err(&flat(g), &flat(&refs[&key]));
            assert!(err <= 1e-3, "{name} {key}: relative error {err:e}");
        }
        for (w, a) in out.writers.iter().enumerate() {
            let key = format!("act.{}", graph.writer_name(w));
            let err = rel_err(&flat(a), &flat(&refs[&key]));
            assert!(err <= 1e-4, "{name} {key}: relative error {err:e}");
        }
    }
}

/// A patched run that starts from the clean run's cached prefix (the layers below the lowest
/// patched reader) gives the same logits as the same patched run from the embedding.
#[test]
fn patched_forward_from_a_cached_prefix_equals_the_full_forward() {
    use eap::model::{PatchPlan, Prefix};
    let families = FAMILY_FIXTURES.iter().copied();
    for name in ["gpt2_hf", "tl_attn_only_shortformer", "tl_lnpre_gelu_bidir"]
        .into_iter()
        .chain(families)
    {
        let model = load(name);
        let refs = reference(name);
        let clean = Batch::new(&tokens(&refs["tokens"]), &Device::Cpu).unwrap();
        let corrupted = Batch::new(&tokens(&refs["corrupted_tokens"]), &Device::Cpu).unwrap();
        let keep = ForwardOptions {
            keep_writers: true,
            keep_residuals: true,
            ..Default::default()
        };
        let c = model.forward(&clean, &keep).unwrap();
        let baseline = model.forward(&corrupted, &keep).unwrap().writers;
        let g = model.graph();
        let nr = g.n_readers();
        for start in 1..=model.cfg.n_layers {
            // Patch every third edge into readers of layer `start` and above.
            let mut patched = vec![false; g.n_writers() * nr];
            for (i, (w, r)) in g.edges().enumerate() {
                if r / g.readers_per_layer() >= start && i % 3 == 0 {
                    patched[w * nr + r] = true;
                }
            }
            let plan = PatchPlan {
                graph: g,
                patched,
                baseline: baseline.clone(),
            };
            let full = model
                .forward(
                    &clean,
                    &ForwardOptions {
                        intervention: Some(&plan),
                        ..Default::default()
                    },
                )
                .unwrap();
            let prefix = Prefix {
                layer: start,
                x: c.residuals[start].clone(),
                writers: c.writers[..g.n_upstream((start * g.readers_per_layer()).min(nr - 1))]
                    .to_vec(),
            };
            let resumed = model
                .forward(
                    &clean,
                    &ForwardOptions {
                        intervention: Some(&plan),
                        start: Some(&prefix),
                        ..Default::default()
                    },
                )
                .unwrap();
            let err = rel_err(&flat(&resumed.logits), &flat(&full.logits));
            assert!(err < 1e-5, "{name} from layer {start}: {err:e}");
            let unpatched = rel_err(&flat(&full.logits), &flat(&c.logits));
            assert!(
                unpatched > 1e-4,
                "{name} from layer {start}: the patch must change the logits"
            );
        }
    }
}
