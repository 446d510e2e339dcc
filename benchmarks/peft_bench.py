"""Sparse parameter-efficient fine-tuning vs LoRA: memory, step time and held-out loss (issue 5).

Each row is one real `reciprune finetune --recipe R` command in a subprocess (1 process, CPU
float32 unless a GPU is present), for the four SmolLM2 recipes (recipes/ist/smollm2_lora_asdiv.yaml
and recipes/{row_sparse,spiel,ist}/smollm2_asdiv.yaml) on the packaged ASDiv math word problems
(question/answer, loss on the answer tokens, 32 problems held out):
"lora" (PEFT LoRA r=8 on q/k/v/o/gate/up/down), "rowsparse" (RowSparseFinetuneModifier, ZO-Taylor
rows, q/k/v included), "spiel" (SparseDeltaModifier, SpIEL-AG drop-and-grow) and "ist_lora"
(ISTModifier on the same LoRA). The recipes give them equal trainable-parameter budgets on
SmolLM2-135M (LoRA's 2442240; row-sparse rank 16 = 2396160, the closest; SpIEL exactly 2442240:
see the recipes' headers). On another model the benchmark recomputes the same arithmetic from the
model's decoder Linears (LoRA r · Σ(in + out); the row-sparse rank whose Σ r · in is closest;
SpIEL = LoRA's) and passes `--set` overrides where the recipe's values differ (listed in the
JSON); on SmolLM2 it runs the recipes as written.

Columns:
- trainable params: counted in the files each modifier saves beside the checkpoint
  (lora_adapter.safetensors: every tensor; row_sparse_deltas.safetensors: the `.row_delta`
  tensors; sparse_deltas.safetensors: the `.values`), read from the safetensors headers. The
  recipe arithmetic is in the JSON ("budget_arithmetic") for comparison. IST trains LoRA's
  parameters, a quarter of the layers' per step.
- peak RSS MB: the run's manifest (metrics.peak_rss_mb_per_process). It is the whole process's
  high-water mark, so it includes loading the model and, for rowsparse, the ZO importance passes
  before training.
- Δ MB prepare+train: the memory the method itself costs, measured without changing reciprune:
  the child is this script, which registers a `FinetuneCallback` (reciprune.pipelines.finetune
  .add_callback) and then calls reciprune's CLI in-process (the command is otherwise
  `python -m reciprune finetune ...`). Δ = peak resident size from the callback's `on_prepare`
  (model and data loaded, just before the modifiers' on_prepare adds anything: the same state
  for every method) to its `on_train_end`, minus the resident size at that point. It covers
  adding the adapters/deltas, rowsparse's ZO importance forwards, the AdamW moments, gradients,
  activations and the final held-out evaluation (no gradients), plus what the allocator keeps.
  The peak is the high-water mark (VmHWM) when it rose after on_prepare (exact); otherwise
  VmRSS sampled every 10 ms (a lower bound, marked "(sampled)"). Measuring from the start of
  training (on_train_begin) instead would flatter rowsparse: its ZO forwards leave freed memory
  with the allocator that training then reuses (the JSON also has rss_at_train_start_mb).
  Linux only (/proc/self/status); elsewhere the column is empty.
- step s: median seconds per optimizer step after the first `--warmup` steps (the median leaves
  out IST's importance-update steps, which add 3 forwards every 10 steps); tokens/s is Σ tokens /
  Σ seconds over the same steps, so it includes them.
- eval loss 0 → N: the run's held-out loss (token mean) at step 0 and after N steps
  (metrics.eval_loss_before and metrics.eval_loss); every method starts from the pretrained
  function (LoRA's B, row deltas and sparse deltas all start at zero), so the first is the same.

Goals from issue 5: RowSparse and SpIEL ≤ 0.8× LoRA's peak memory; IST ≤ 0.85× LoRA's step time;
no accuracy (held-out loss) loss beyond noise. What every method holds alike (Python, torch, the
frozen weights) dominates the whole-process peak of a 135M model on CPU, so that ratio stays near
1; "Δ MB prepare+train" is the figure that compares what the methods themselves cost. Rows also go to WORK/peft_bench.json.

    python benchmarks/peft_bench.py                      # SmolLM2-135M, recipes' 40 steps
    python benchmarks/peft_bench.py --quick              # tiny Llama, 12 steps: smoke run
    python benchmarks/peft_bench.py --methods lora ist_lora --steps 20 --threads 2
    python benchmarks/peft_bench.py --models tiny --steps 40    # tiny Llama, full length
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "lora": REPO / "recipes" / "ist" / "smollm2_lora_asdiv.yaml",
    "rowsparse": REPO / "recipes" / "row_sparse" / "smollm2_asdiv.yaml",
    "spiel": REPO / "recipes" / "spiel" / "smollm2_asdiv.yaml",
    "ist_lora": REPO / "recipes" / "ist" / "smollm2_asdiv.yaml",
}
MODELS = ["smollm2", "tiny"]
QUICK_STEPS = 12  # passes SpIEL's first reselection (after step 5) and IST's first update (10)
CHILD_FLAG = "--measured-finetune"  # internal: `peft_bench.py --measured-finetune MEM.json ARGS`
SAMPLE_SECONDS = 0.01
#: What each modifier saves beside the checkpoint, and which of its tensors are trained values.
ADAPTER_FILES = {
    "lora_adapter.safetensors": lambda key: True,
    "row_sparse_deltas.safetensors": lambda key: key.endswith(".row_delta"),
    "sparse_deltas.safetensors": lambda key: key.endswith(".values"),
}


# --- child: training-phase memory around reciprune's own CLI ------------------------------------
def _status_mb(field: str) -> float | None:
    """A field of /proc/self/status (VmRSS, VmHWM) in MB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


class _MemoryWatch:
    """Resident memory from the finetune callbacks' `on_prepare` (model and data loaded, nothing
    added yet) to their `on_train_end`: a sampler thread reads VmRSS, and the high-water mark
    decides whether the peak is exact."""

    def __init__(self) -> None:
        self.record: dict[str, object] = {}
        self._sampled = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self._sampled = max(self._sampled, _status_mb("VmRSS") or 0.0)

    def begin(self) -> None:
        """At on_prepare: the common starting point of every method."""
        self._hwm_before = _status_mb("VmHWM")
        self.record["rss_before_prepare_mb"] = self._sampled = _status_mb("VmRSS") or 0.0
        self._thread.start()

    def training_starts(self) -> None:
        self.record["rss_at_train_start_mb"] = _status_mb("VmRSS")

    def end(self, path: Path) -> None:
        """After training: the peak since begin(), written to `path`."""
        self._stop.set()
        self._thread.join()
        hwm_after = _status_mb("VmHWM")
        if self._hwm_before is not None and hwm_after is not None:
            # A high-water mark that rose after begin() is the peak of this phase, exactly;
            # otherwise the phase stayed below the loading peak and the samples bound it.
            exact = hwm_after > self._hwm_before
            self.record.update(
                peak_before_prepare_mb=self._hwm_before,
                method_peak_mb=hwm_after if exact else self._sampled,
                method_peak_exact=exact,
            )
        path.write_text(json.dumps(self.record) + "\n", encoding="utf-8")


def measured_finetune(memory_json: Path, argv: list[str]) -> int:
    """Run `reciprune <argv>` in this process with a finetune callback measuring the memory
    from prepare to the end of training; nothing else changes."""
    from reciprune.cli import main as cli_main
    from reciprune.pipelines.finetune import FinetuneCallback, add_callback

    if _status_mb("VmRSS") is None:  # no /proc (not Linux): run unmeasured
        return cli_main(argv)
    watch = _MemoryWatch()

    class Watched(FinetuneCallback):
        def on_prepare(self) -> None:
            watch.begin()

        def on_train_begin(self, trainer) -> None:
            watch.training_starts()

        def on_train_end(self, trainer, result) -> None:
            watch.end(memory_json)

    add_callback(Watched())
    return cli_main(argv)


# --- child: the model's Linears -----------------------------------------------------------------
def prepare_tiny(folder: Path) -> None:
    """Save the tiny model with the SmolLM2 tokenizer."""
    from reciprune.models import load_model

    _, tokenizer, _ = load_model(None)
    common.save_prepared(common.tiny_model(), tokenizer, folder, {"model": "tiny"})


def inspect_model(model_spec: str | None, out_json: Path, recipes: list[Path]) -> None:
    """Write the model's decoder Linears ([in, out]), its parameter count and each recipe's
    budget fields."""
    import torch

    from reciprune.core.layers import find_decoder_layers
    from reciprune.models import load_model
    from reciprune.recipe import load_recipe

    model, _, _ = load_model(model_spec)
    _, layers = find_decoder_layers(model)
    linears = [
        [m.in_features, m.out_features] for m in layers.modules() if isinstance(m, torch.nn.Linear)
    ]
    info: dict = {
        "linears": linears,
        "total_params": sum(p.numel() for p in model.parameters()),
        "recipes": {},
    }
    for path in recipes:
        (stage,) = load_recipe(path).stages
        fields = {m.type_name(): m.model_dump() for m in stage.modifiers}
        info["recipes"][str(path)] = {"stage": stage.name, "modifiers": fields}
    out_json.write_text(json.dumps(info, default=str) + "\n", encoding="utf-8")


# --- budget arithmetic (pure) -------------------------------------------------------------------
def lora_budget(linears: list[list[int]], r: int) -> int:
    """LoRA's trainable parameters: r · (in + out) per adapted Linear (A is r × in, B out × r)."""
    return sum(r * (d_in + d_out) for d_in, d_out in linears)


def row_sparse_budget(linears: list[list[int]], rank: int) -> int:
    """Row-sparse trainable parameters: min(rank, out) · in per Linear (clamp_rank)."""
    return sum(min(rank, d_out) * d_in for d_in, d_out in linears)


def closest_rank(linears: list[list[int]], budget: int) -> int:
    """The row-sparse rank whose trainable-parameter count is closest to `budget` (lower wins)."""
    ranks = range(1, max(d_out for _, d_out in linears) + 1)
    return min(ranks, key=lambda k: (abs(row_sparse_budget(linears, k) - budget), k))


def reference_budget(info: dict) -> int:
    """LoRA's budget on the inspected model: the one every method is given."""
    lora = info["recipes"][str(RECIPES["lora"])]["modifiers"]["LoRAModifier"]
    return lora_budget(info["linears"], lora["r"])


def plan_budgets(info: dict, methods: list[str]) -> dict[str, dict]:
    """Per method: the budget arithmetic on this model and the `--set` overrides that give LoRA's
    budget where the recipe's own values do not (they do on SmolLM2-135M)."""
    # The four recipes target every Linear of the decoder layers (rowsparse with q/k/v
    # included), so the inspected `linears` are every method's targets.
    recipes, linears, budget = info["recipes"], info["linears"], reference_budget(info)
    plans = {}
    for method in methods:
        recipe = recipes[str(RECIPES[method])]
        stage, fields = recipe["stage"], recipe["modifiers"]
        overrides: list[str] = []
        if method in ("lora", "ist_lora"):
            arithmetic = lora_budget(linears, fields["LoRAModifier"]["r"])
        elif method == "rowsparse":
            rank = closest_rank(linears, budget)
            if fields["RowSparseFinetuneModifier"]["finetuning_rank"] != rank:
                overrides.append(f"{stage}.RowSparseFinetuneModifier.finetuning_rank={rank}")
            arithmetic = row_sparse_budget(linears, rank)
        else:
            spiel = fields["SparseDeltaModifier"]
            written = spiel["num_tunable_weights"]
            if written is None:
                written = int(spiel["density"] * info["total_params"])  # as split_budget does
            if written != budget:
                overrides += [f"{stage}.SparseDeltaModifier.density=null",
                              f"{stage}.SparseDeltaModifier.num_tunable_weights={budget}"]  # fmt: skip
            arithmetic = budget
        plans[method] = {"budget_arithmetic": arithmetic, "overrides": overrides}
    return plans


# --- runs ---------------------------------------------------------------------------------------
def trainable_from_files(folder: Path) -> tuple[int, list[str]]:
    """Trained values in the adapter/delta files saved beside the checkpoint, and those files."""
    total, found = 0, []
    for name, counts in ADAPTER_FILES.items():
        path = folder / name
        if not path.is_file():
            continue
        found.append(name)
        with path.open("rb") as f:  # safetensors: 8-byte header length, then a JSON header
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for key, entry in header.items():
            if key != "__metadata__" and counts(key):
                size = 1
                for dim in entry["shape"]:
                    size *= dim
                total += size
    return total, found


def run_method(
    work: Path, model_dir: Path | None, method: str, steps: int | None, overrides: list[str],
    env: dict[str, str], warmup: int,
) -> dict:
    """One `reciprune finetune` run of `method`'s recipe; its figures from the manifest."""
    output = work / "runs" / method
    memory_json = work / "runs" / f"{method}.memory.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    memory_json.unlink(missing_ok=True)
    cmd = [
        sys.executable, __file__, CHILD_FLAG, str(memory_json),
        "finetune", "--recipe", str(RECIPES[method]), "--output-dir", str(output),
        "--no-progress", "--no-eval-ppl", "--overwrite",
    ]  # fmt: skip
    if model_dir is not None:
        cmd += ["--model", str(model_dir)]
    if steps is not None:
        cmd += ["--max-steps", str(steps)]
    cmd += [f"--set={o}" for o in overrides]
    common.run_checked(cmd, env)
    manifest = common.read_manifest(output)
    memory = json.loads(memory_json.read_text(encoding="utf-8")) if memory_json.is_file() else {}
    metrics, curve = manifest["metrics"], manifest["loss_curve"]
    kept = common.steady_steps(curve, warmup)
    seconds = [r["seconds"] for r in kept]
    trainable, files = trainable_from_files(output)
    start, peak = memory.get("rss_before_prepare_mb"), memory.get("method_peak_mb")
    return {
        "method": method,
        "recipe": str(RECIPES[method].relative_to(REPO)),
        "overrides": overrides,
        "steps": len(curve),
        "trainable_params_files": trainable,
        "adapter_files": files,
        "peak_rss_mb": metrics["peak_rss_mb_per_process"][0],
        "peak_cuda_mb": (metrics.get("peak_cuda_mb_per_process") or [None])[0],
        "rss_before_prepare_mb": start,
        "rss_at_train_start_mb": memory.get("rss_at_train_start_mb"),
        "method_peak_mb": peak,
        "method_peak_exact": memory.get("method_peak_exact"),
        "method_delta_mb": None if start is None or peak is None else peak - start,
        "warmup_steps_dropped": len(curve) - len(kept),
        "step_seconds_median": statistics.median(seconds) if seconds else None,
        "step_seconds_mean": statistics.fmean(seconds) if seconds else None,
        "tokens_per_second_steady": common.tokens_per_second(kept),
        "tokens_per_second_all": metrics["tokens_per_second"],
        "train_loss_first": metrics.get("train_loss_first"),
        "train_loss_last": metrics.get("train_loss_last"),
        "eval_loss_before": metrics.get("eval_loss_before"),  # the run's eval at step 0
        "eval_loss": metrics.get("eval_loss"),
    }


def _ratio(row: dict, lora: dict | None, key: str) -> str:
    if lora is None or row.get(key) is None or not lora.get(key):
        return "–"
    return f"{row[key] / lora[key]:.2f}"


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def table(rows: list[dict]) -> str:
    """The markdown table; ratios are to the LoRA row (– without one)."""
    lora = next((r for r in rows if r["method"] == "lora"), None)
    lines = [
        "| method | trainable params | peak RSS MB | ×LoRA | Δ MB prepare+train | ×LoRA | step s (median) "
        "| ×LoRA | tokens/s | eval loss 0 → N |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = _num(r["method_delta_mb"], ".0f") + (
            "" if r["method_peak_exact"] in (True, None) else " (sampled)"
        )
        lines.append(
            f"| {r['method']} | {r['trainable_params_files']:,} | {r['peak_rss_mb']:.0f} "
            f"| {_ratio(r, lora, 'peak_rss_mb')} | {delta} | {_ratio(r, lora, 'method_delta_mb')} "
            f"| {_num(r['step_seconds_median'], '.3f')} "
            f"| {_ratio(r, lora, 'step_seconds_median')} | {r['tokens_per_second_steady']:.0f} "
            f"| {_num(r['eval_loss_before'], '.4f')} → {_num(r['eval_loss'], '.4f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == CHILD_FLAG:
        raise SystemExit(measured_finetune(Path(sys.argv[2]), sys.argv[3:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--models", default="smollm2", choices=MODELS,
                        help="smollm2 (the embedded SmolLM2-135M-Instruct, default) or tiny.")
    parser.add_argument("--steps", type=int, default=None,
                        help="Optimizer steps per run (default: the recipes' max_steps, 40).")
    parser.add_argument("--warmup", type=int, default=2,
                        help="First steps left out of step seconds and tokens/s (default 2).")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of the child (default: every core).")
    parser.add_argument("--quick", action="store_true",
                        help=f"Smoke run: tiny model, {QUICK_STEPS} steps.")
    parser.add_argument("--work-dir", type=Path, default=Path("out/peft_bench"))
    parser.add_argument("--prepare-tiny", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--inspect", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare_tiny is not None:
        prepare_tiny(args.prepare_tiny)
        return
    if args.inspect is not None:
        spec, out, *recipes = args.inspect
        inspect_model(None if spec == "-" else spec, Path(out), [Path(r) for r in recipes])
        return

    model = "tiny" if args.quick else args.models
    steps = args.steps or (QUICK_STEPS if args.quick else None)
    env = common.thread_env(args.threads or common.usable_cores())
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = None  # the embedded SmolLM2: reciprune's default model
    if model == "tiny":
        model_dir = work / "models" / "tiny"
        if not common.is_prepared(model_dir):
            print(f"building {model_dir} ...", flush=True)
            common.run_checked([sys.executable, __file__, "--prepare-tiny", str(model_dir)], env)
    # LoRA's recipe is always inspected: it sets the budget of the others.
    methods = args.methods
    inspected = sorted({"lora", *methods}, key=list(RECIPES).index)
    info_json = work / f"{model}_inspect.json"
    inspect = [sys.executable, __file__, "--inspect", str(model_dir or "-"), str(info_json),
               *[str(RECIPES[m]) for m in inspected]]  # fmt: skip
    common.run_checked(inspect, env)
    info = json.loads(info_json.read_text(encoding="utf-8"))
    plans = plan_budgets(info, methods)
    print(f"model {model}, {len(info['linears'])} decoder Linears, {info['total_params']:,} "
          f"parameters; LoRA budget {reference_budget(info):,}"
          f"; steps {steps or 'from the recipes'}, {env['OMP_NUM_THREADS']} thread(s), "
          f"warm-up {args.warmup} step(s) left out", flush=True)  # fmt: skip
    rows = []
    for method in methods:
        print(f"running {method} ...", flush=True)
        row = run_method(work, model_dir, method, steps, plans[method]["overrides"], env,
                         args.warmup)  # fmt: skip
        row.update(
            model=model,
            threads=int(env["OMP_NUM_THREADS"]),
            budget_arithmetic=plans[method]["budget_arithmetic"],
        )
        rows.append(row)
    (work / "peft_bench.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print()
    print(table(rows))
    print(f"\nrows: {work / 'peft_bench.json'}")


if __name__ == "__main__":
    main()
