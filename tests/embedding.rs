//! An embedding compiler's view: build a graph with a skip connection through the
//! public API, plan it, and from the `Plan` alone reconstruct one rank's local
//! parameter shapes and its ordered schedule; the skip tensor crosses the pipeline cut
//! and is priced.

use apar::cluster::Cluster;
use apar::ir::{Block, DType, Dim, GraphBuilder, Op, Phase, TensorType};
use apar::lower::schedule::Pass;
use apar::passes::Schedule;
use apar::search::SearchOptions;
use apar::{Axis, PlanOptions, Session, TensorKind, TpLayout};

const HIDDEN: u64 = 4096;
const FFN: u64 = 16384;
const VOCAB: u64 = 32768;
const LAYERS: u32 = 4;

fn act(width: u64) -> TensorType {
    TensorType::new(DType::Bf16, [Dim::batch(), Dim::seq(), Dim::lit(width)])
}

fn weight(rows: u64, cols: u64) -> TensorType {
    TensorType::new(DType::Bf16, [Dim::lit(rows), Dim::lit(cols)])
}

fn matmul() -> Op {
    Op::MatMul {
        ta: false,
        tb: false,
    }
}

/// Embedding, four MLP layers with residuals, and a head; the embedding output is
/// also added into the last layer (a skip connection over three layers).
fn skip_graph() -> apar::ir::Graph {
    let mut b = GraphBuilder::new("skip-mlp");
    b.set_phase(Phase::Fwd);
    b.set_block(Block::Embed);
    let tokens = b.input(
        "tokens",
        TensorType::new(DType::I64, [Dim::batch(), Dim::seq()]),
    );
    let table = b.param("embed.weight", weight(VOCAB, HIDDEN));
    let embedded = b.add1(Op::Embedding, &[table, tokens]).unwrap();
    let mut x = embedded;
    for i in 0..LAYERS {
        b.set_block(Block::Layer(i));
        let w1 = b.param(&format!("layers.{i}.fc1.weight"), weight(HIDDEN, FFN));
        let w2 = b.param(&format!("layers.{i}.fc2.weight"), weight(FFN, HIDDEN));
        let h = b.add1(matmul(), &[x, w1]).unwrap();
        let h = b.add1(Op::Gelu, &[h]).unwrap();
        let h = b.add1(matmul(), &[h, w2]).unwrap();
        x = b.add1(Op::Add, &[x, h]).unwrap();
        if i + 1 == LAYERS {
            x = b.add1(Op::Add, &[x, embedded]).unwrap();
        }
    }
    b.set_block(Block::Head);
    let out = b.param("head.weight", weight(HIDDEN, VOCAB));
    let logits = b.add1(matmul(), &[x, out]).unwrap();
    let labels = b.input(
        "labels",
        TensorType::new(DType::I64, [Dim::batch(), Dim::seq()]),
    );
    b.add1(Op::CrossEntropy, &[logits, labels]).unwrap();
    let g = b.finish();
    assert_eq!(act(HIDDEN), g.ty(embedded).clone());
    g
}

fn options(pp: u32, tp: u32) -> PlanOptions {
    let mut o = PlanOptions::new(512, 16);
    o.search = SearchOptions {
        runners_up: 1,
        ..SearchOptions::default()
    };
    o.search.constraints.pp = Some(pp);
    o.search.constraints.tp = Some(tp);
    o.search.constraints.schedule = Some(Schedule::OneFOneB);
    o
}

#[test]
fn a_compiler_reads_one_rank_out_of_the_plan() {
    let g = skip_graph();
    let cluster = Cluster::resolve("dgx-a100-80g:1").unwrap();
    let session = Session::for_graph(&g, &cluster, &options(2, 2)).unwrap();
    let plan = session.plan().unwrap();
    assert_eq!((plan.config.pp, plan.config.tp), (2, 2));
    assert_eq!(plan.mesh.devices(), 8);

    // Rank 5: tensor-parallel fastest, then data, then pipeline.
    let me = plan.mesh.coordinates(5).unwrap();
    assert_eq!((me.tp, me.dp, me.pp), (1, 0, 1));
    assert_eq!(plan.mesh.rank(me.tp, me.dp, me.pp), Some(5));
    assert_eq!(plan.mesh.group(5, Axis::Tp), vec![4, 5]);
    assert_eq!(
        plan.mesh.ranks().map(|c| c.rank).collect::<Vec<_>>(),
        (0..8).collect::<Vec<_>>()
    );

    // Its parameters: those of the blocks its stage runs, each with a local shape
    // that is the global one divided along the split dimension.
    let mine: Vec<_> = plan
        .tensors
        .iter()
        .filter(|t| t.kind == TensorKind::Param)
        .filter(|t| plan.stage_of_block(t.blocks[0]) == Some(me.pp))
        .collect();
    assert!(!mine.is_empty());
    for t in &mine {
        match t.tp_layout {
            TpLayout::Split { dim, groups } => {
                let d = dim as usize;
                assert_eq!(
                    t.local_shape[d] * u64::from(plan.mesh.tp),
                    t.global_shape[d]
                );
                let slices = t.tp_slices(me.tp, plan.mesh.tp);
                assert_eq!(slices.len(), groups as usize);
                let held: u64 = slices.iter().map(|r| r.end - r.start).sum();
                assert_eq!(held, t.local_shape[d]);
            }
            TpLayout::Replicated => assert_eq!(t.local_shape, t.global_shape),
            TpLayout::Partial => panic!("a parameter is never a partial sum"),
        }
    }
    // Megatron's MLP split: fc1 by columns, fc2 by rows.
    let fc1 = plan
        .tensors
        .iter()
        .find(|t| t.name == "layers.3.fc1.weight")
        .unwrap();
    let fc2 = plan
        .tensors
        .iter()
        .find(|t| t.name == "layers.3.fc2.weight")
        .unwrap();
    assert_eq!(fc1.tp_layout, TpLayout::Split { dim: 1, groups: 1 });
    assert_eq!(fc2.tp_layout, TpLayout::Split { dim: 0, groups: 1 });
    assert_eq!(fc1.local_shape, vec![HIDDEN, FFN / 2]);

    // Its ordered schedule: the stage's forward and backward units in time order, one of
    // each per micro-batch, each micro-batch's forward before its backward.
    let units: Vec<_> = plan
        .trace
        .events
        .iter()
        .filter(|e| e.stage == me.pp)
        .collect();
    let m = plan.config.num_micro_batches as usize;
    assert_eq!(units.len(), 2 * m);
    assert!(units.windows(2).all(|w| w[0].end <= w[1].start + 1e-12));
    for mb in 0..plan.config.num_micro_batches {
        let f = units
            .iter()
            .position(|e| e.micro_batch == mb && e.pass == Pass::F);
        let b = units
            .iter()
            .position(|e| e.micro_batch == mb && e.pass == Pass::B);
        assert!(f < b);
    }
    // The op programs of its blocks, with the tensor-parallel collectives marked.
    let blocks = plan
        .stages
        .iter()
        .filter(|s| s.device_stage == me.pp)
        .flat_map(|s| s.blocks[0]..=s.blocks[1])
        .collect::<Vec<_>>();
    let programs: Vec<_> = plan
        .programs
        .iter()
        .filter(|p| blocks.contains(&p.blocks[0]))
        .collect();
    assert!(!programs.is_empty());
    assert!(programs
        .iter()
        .flat_map(|p| &p.ops)
        .any(|op| op.group == Some(Axis::Tp)));
}

#[test]
fn the_skip_tensor_crosses_the_cut_and_is_priced() {
    let g = skip_graph();
    let cluster = Cluster::resolve("dgx-a100-80g:1").unwrap();
    let session = Session::for_graph(&g, &cluster, &options(2, 1)).unwrap();
    let plan = session.plan().unwrap();
    // The skip tensor is listed from the embedding to the last layer.
    let skip = plan
        .tensors
        .iter()
        .find(|t| t.kind == TensorKind::Boundary && t.blocks == [0, LAYERS as usize])
        .expect("the embedding output is read by the last layer");
    assert_eq!(
        skip.global_shape,
        vec![u64::from(plan.config.micro_batch), 512, HIDDEN]
    );
    // The cut falls between the embedding and the last layer, so the send carries the
    // hidden state and the skip tensor: twice the bytes of a plain cut.
    let cut = plan.stages[0].blocks[1];
    assert!(cut < LAYERS as usize, "cut after block {cut}");
    let crossing: u64 = plan
        .tensors
        .iter()
        .filter(|t| t.kind == TensorKind::Boundary && t.blocks[0] <= cut && t.blocks[1] > cut)
        .map(|t| t.bytes_per_device)
        .sum();
    assert_eq!(crossing, 2 * skip.bytes_per_device);

    // Priced: the same cut in the graph without the skip sends half as much.
    let sends = |p: &apar::Plan| -> f64 {
        p.trace
            .comm
            .iter()
            .filter(|c| c.what == apar::lower::CommKind::Send && c.stage == 0)
            .map(|c| c.end - c.start)
            .sum()
    };
    let mut plain = apar::ir::text::parse(&apar::ir::text::print(&g)).unwrap();
    plain = without_skip(&plain);
    let plain_plan = Session::for_graph(&plain, &cluster, &options(2, 1))
        .unwrap()
        .evaluate(&plan.config)
        .unwrap();
    assert_eq!(plain_plan.stages[0].blocks, plan.stages[0].blocks);
    let (with, without) = (sends(&plan), sends(&plain_plan));
    assert!(
        with > 1.5 * without,
        "skip send {with} s vs plain {without} s"
    );
}

/// The same graph with the skip addition dropped.
fn without_skip(g: &apar::ir::Graph) -> apar::ir::Graph {
    let text = apar::ir::text::print(g);
    // The last layer's second `add` reads the embedding output; make it read the
    // residual twice instead, which keeps every shape.
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let i = lines
        .iter()
        .rposition(|l| l.contains("= add("))
        .expect("the skip add");
    let line = lines[i].clone();
    let args = &line[line.find("add(").unwrap() + 4..line.find(')').unwrap()];
    let first = args.split(',').next().unwrap().trim().to_string();
    lines[i] = line.replace(args, &format!("{first}, {first}"));
    apar::ir::text::parse(&lines.join("\n")).unwrap()
}
