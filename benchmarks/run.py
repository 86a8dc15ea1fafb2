"""hpedge benchmarks: every number is measured side by side in one run and written with its command.

    python benchmarks/run.py memory            # real-scale memory table (planner) vs the paper
    python benchmarks/run.py latency           # ORT CPU step latency / peak memory, e2e latency
    python benchmarks/run.py quality           # eval of the zoo models and their compressed students
    python benchmarks/run.py ablation --family sd3 --steps 600 --lr 1e-3
                                               # HierarchicalPrune vs baselines and ablations
    python benchmarks/run.py ratio zoo:digits-sd3 out/digits-sd3-hp
                                               # student/teacher eval ratio, 500 prompts, paired interval
    python benchmarks/run.py weights zoo:digits-sd3 DIR/digits-sd3 --name NAME
                                               # relative weight distance per component (a retrain vs the committed)
    python benchmarks/run.py binding           # does the text conditioning say which digit is on which side?
    python benchmarks/run.py runtime-env PKG --python VENV/bin/python
                                               # two-digit prompts from a package in a runtime-only env
    python benchmarks/run.py text-paths        # FLUX: eval with the pooled vector or the T5 sequence emptied
    python benchmarks/run.py engines           # TensorRT-RTX engine bytes vs INT4 ONNX weight bytes (benchmarks/engines.py)
    python benchmarks/run.py pwp-prefix        # PWP's frozen prefix replayed from the teacher vs recomputed
    python benchmarks/run.py distill-memory    # `hpedge plan --distill`'s memory estimate vs a measured peak (CPU)
    python benchmarks/run.py fit [--arch sd3.5-large]
                                               # which device profiles hold the package, per configuration (planner)
    python benchmarks/run.py size --arch sd3.5-medium --layers 7 --work DIR
                                               # a real-width transformer > 2 GB through export, check, ORT: time, peak RSS per stage
    python benchmarks/run.py quant-method MODEL... [--midsize]
                                               # AWQ vs RTN side by side: parity, end-to-end, digits score
    python benchmarks/run.py gates             # parity gates' margins and the INT4-graph bugs each catches, five fixtures
    python benchmarks/run.py sparsity --family sd3 --work DIR
                                               # weight sparsity (arXiv 2411.15113): sweep, magnitude vs Wanda, 2:4, distilled rows
    python benchmarks/run.py vq --family sd3 --work DIR [--export]
                                               # VQ 2/3/4 bits before/after fine-tuning vs INT4 RTN/AWQ and INT3 on a digits student
    python benchmarks/run.py vq-package PKG --name NAME
                                               # a package's vq variant: hpedge check, plain ONNX Runtime, hpedge generate
    python benchmarks/run.py vq-engine         # TensorRT-RTX engine bytes from codebook-lookup graphs vs dense and INT4
    python benchmarks/run.py fp8-probe         # FP8 Q/DQ graphs: ONNX Runtime CPU vs a numpy reference, TensorRT-RTX builds per profile
    python benchmarks/run.py precision --family sd3 --work DIR
                                               # int4 / int8 / fp8 / nvfp4 packages side by side: bytes, engines, gates, digits
    python benchmarks/run.py gpu               # real-scale SD3.5-Large step in PyTorch on a CUDA GPU (bf16, pruned, INT4)
    python benchmarks/run.py curve --family sd3 --jobs 2
                                               # the compression curve: methods x 25/40/50 % of blocks removed, LR sweep, PNG
    python benchmarks/run.py retrain --family sd3 --work DIR [--device cuda]
                                               # replay the zoo model's recorded training commands

Results go to benchmarks/results/*.md (machine, date and the exact command at the top of each file).
"""

from __future__ import annotations

import argparse
import subprocess  # noqa: F401 - the tests replace subprocess.run through this name
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmark modules beside this file

# one module per benchmark; the names below are what the dispatcher (and the tests) use
import curve as curve_benchmark  # noqa: E402
import distill_memory as distill_memory_benchmark  # noqa: E402
import engines as engines_benchmark  # noqa: E402
import fit as fit_benchmark  # noqa: E402
import fp8_probe as fp8_probe_benchmark  # noqa: E402
import gates as gates_benchmark  # noqa: E402
import precision as precision_benchmark  # noqa: E402
import pwp_prefix as pwp_prefix_benchmark  # noqa: E402
import quant_method as quant_method_benchmark  # noqa: E402
import size as size_benchmark  # noqa: E402
import sparsity as sparsity_benchmark  # noqa: E402
import vq as vq_benchmark  # noqa: E402
import vq_engine as vq_engine_benchmark  # noqa: E402
from binding import BINDING_PROMPTS, binding, text_paths  # noqa: E402,F401
from common import RESULTS, ROOT, header, write  # noqa: E402,F401
from gpu import _int4_weight_only, gpu  # noqa: E402,F401
from latency import CHILD, _e2e, _midsize_pipeline, latency, time_onnx  # noqa: E402,F401
from memory import PAPER, REAL_SCALE_CUTS, memory  # noqa: E402,F401
from quality import SCORES_HEAD, ablation, blocks, quality, scores_row  # noqa: E402,F401
from ratio import RETRAIN_TOLERANCE, phrasing_split, ratio, tolerance_rows, weight_distance, weights  # noqa: E402,F401
from retrain import PRETRAINED_TEXT, ZOO, retrain  # noqa: E402,F401
from runtime_env import RUNTIME_CHILD, runtime_env  # noqa: E402,F401


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("memory")
    lat = sub.add_parser("latency")
    lat.add_argument("--families", nargs="*", default=["sd3", "flux"], help="digits models to include")
    q = sub.add_parser("quality")
    q.add_argument("models", nargs="*")
    q.add_argument("--out")
    b = sub.add_parser("blocks")
    b.add_argument("--family", choices=["sd3", "flux"], default="sd3")
    b.add_argument("--per-category", type=int, default=40)
    a = sub.add_parser("ablation")
    a.add_argument("--family", choices=["sd3", "flux"], default="sd3")
    a.add_argument("--steps", type=int, default=600)
    a.add_argument("--lr", type=float, default=3e-4, help="distillation learning rate, the same for every row")
    a.add_argument("--per-category", type=int, default=60)
    sub.add_parser("binding")
    tp = sub.add_parser("text-paths")
    tp.add_argument("models", nargs="*", default=["zoo:digits-flux"], help="FLUX pipeline folders or zoo names")
    tp.add_argument("--per-category", type=int, default=100)
    r = sub.add_parser("ratio")
    r.add_argument("teacher", help="pipeline folder or zoo:NAME")
    r.add_argument("student", help="pipeline folder")
    r.add_argument("--per-category", type=int, default=100, help="prompts per category (100 = the 500-prompt benchmark)")
    r.add_argument("--name", help="results file stem (default: the student folder's name)")
    r.add_argument("--tolerance", action="store_true",
                   help="the student is a retrain of the teacher: check each score against RETRAIN_TOLERANCE")
    w = sub.add_parser("weights")
    w.add_argument("a", help="pipeline folder or zoo:NAME (the reference)")
    w.add_argument("b", help="pipeline folder or zoo:NAME of the same architecture")
    w.add_argument("--name", required=True, help="results file stem: weights-NAME.md")
    e = sub.add_parser("runtime-env")
    e.add_argument("package", type=Path)
    e.add_argument("--python", required=True, help="python of an environment with only the runtime installed")
    e.add_argument("--n", type=int, default=20, help="two_digits prompts (the eval set's first N)")
    e.add_argument("--variant", default="int4_cpu")
    g = sub.add_parser("gpu")
    g.add_argument("--arch", default="sd3.5-large", help="an SD3-family architecture name (see hpedge info)")
    g.add_argument("--cut", help="blocks to remove (default: the memory table's cut for --arch)")
    g.add_argument("--resolution", type=int, default=1024)
    g.add_argument("--text-tokens", type=int, default=333, help="77 CLIP + 256 T5 tokens, as the SD3 pipeline")
    g.add_argument("--batch", type=int, default=2)
    g.add_argument("--reps", type=int, default=10)
    g.add_argument("--results-name", help="results file name (default gpu-ARCH.md)")
    engines_benchmark.add_parser(sub)
    pwp_prefix_benchmark.add_parser(sub)
    distill_memory_benchmark.add_parser(sub)
    fit_benchmark.add_parser(sub)
    size_benchmark.add_parser(sub)
    quant_method_benchmark.add_parser(sub)
    gates_benchmark.add_parser(sub)
    sparsity_benchmark.add_parser(sub)
    vq_benchmark.add_parser(sub)
    vq_benchmark.add_package_parser(sub)
    vq_engine_benchmark.add_parser(sub)
    fp8_probe_benchmark.add_parser(sub)
    precision_benchmark.add_parser(sub)
    curve_benchmark.add_parser(sub)
    t = sub.add_parser("retrain")
    t.add_argument("--family", choices=["sd3", "flux"], required=True)
    t.add_argument("--work", type=Path, required=True, help="folder for the retrained pipeline")
    t.add_argument("--retrain-text", "--retrain-t5", dest="retrain_text", action="store_true",
                   help="replay the text-encoder pre-training stage too (flux-t5, sd3-text; default: start from the "
                        "committed pre-trained encoders, as from the committed VAE; that stage's result depends on the "
                        "CPU kind)")
    t.add_argument("--device", default="cpu", help="torch device of the training stages (cuda on a GPU machine)")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--max-seconds", type=float, default=None, help="start no further stage after this long (resume later)")
    args = ap.parse_args()
    {"gpu": gpu, "retrain": retrain, "text-paths": text_paths, "memory": memory, "latency": latency, "quality": quality, "blocks": blocks, "ablation": ablation,
     "runtime-env": runtime_env, "ratio": ratio, "weights": weights, "binding": binding,
     "engines": engines_benchmark.engines, "pwp-prefix": pwp_prefix_benchmark.pwp_prefix,
     "distill-memory": distill_memory_benchmark.distill_memory, "fit": fit_benchmark.fit,
     "size": size_benchmark.size, "quant-method": quant_method_benchmark.quant_method,
     "gates": gates_benchmark.gates, "sparsity": sparsity_benchmark.sparsity, "curve": curve_benchmark.curve, "curve-row": curve_benchmark.curve_row,
     "vq": vq_benchmark.vq, "vq-package": vq_benchmark.vq_package, "vq-engine": vq_engine_benchmark.vq_engine,
     "fp8-probe": fp8_probe_benchmark.fp8_probe, "precision": precision_benchmark.precision}[args.cmd](args)


if __name__ == "__main__":
    main()
