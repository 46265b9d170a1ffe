//! Tied embeddings across pipeline stages: the last stage keeps its own copy of the
//! word embedding for the output layer, with its gradient and optimizer state, as
//! Megatron-LM (`LanguageModule.setup_embeddings_and_output_layer`: the last stage
//! allocates the shared weight; `_allreduce_word_embedding_grads` sums the two copies'
//! gradients before the step) and DeepSpeed's pipeline engine (`TiedLayerSpec`) do.
//! Without pipelining there is one copy.

use apar::cluster::Cluster;
use apar::models::zoo;
use apar::passes::Config;
use apar::{PlanOptions, Session};

/// Per-stage (params, grads, optimizer) bytes of Megatron GPT 1.7B on one DGX A100 at
/// `pp` stages.
fn stages(pp: u32) -> Vec<(u64, u64, u64)> {
    let model = zoo::lookup("megatron-1.7b").unwrap();
    assert!(model.tied_embeddings);
    let cluster = Cluster::resolve("dgx-a100-80g:1").unwrap();
    let mut opts = PlanOptions::new(2048, 16);
    opts.memory_ratio = 1.0;
    let session = Session::for_config(&model, &cluster, &opts).unwrap();
    let dp = 8 / pp;
    let c = Config::new(dp, 1, pp, 1, 16 / dp);
    let plan = session.evaluate(&c).unwrap();
    plan.memory
        .per_stage
        .iter()
        .map(|s| (s.params, s.grads, s.optimizer))
        .collect()
}

#[test]
fn the_last_stage_keeps_a_copy_of_a_tied_embedding() {
    // 1,652,230,656 parameters (Narayanan et al. 2021, Table 1's 1.7B; the zoo's
    // count), of which the 51,200 × 2,304 word embedding; Megatron-LM's bf16 weights
    // and fp32 main parameters: 6 bytes each.
    let (total, embedding) = (1_652_230_656u64, 51_200u64 * 2_304);
    let one = stages(1);
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].0, 6 * total);
    let two = stages(2);
    assert_eq!(two.len(), 2);
    // The two stages together hold the model once plus the head's copy.
    assert_eq!(two[0].0 + two[1].0, 6 * (total + embedding));
    // And the copy's fp32 gradient and Adam moments (4 and 8 bytes per element).
    assert_eq!(two[0].1 + two[1].1, one[0].1 + 4 * embedding);
    assert_eq!(two[0].2 + two[1].2, one[0].2 + 8 * embedding);
}
