"""Reads MaxText train_compile runs (bench/maxtext/run.sh) and prints one row per run: memory per chip
(memory_analysis: arguments / temporaries / total = arguments + outputs - aliased + temporaries, GiB), XLA
cost_analysis FLOPs per chip (as train_compile prints it: a scanned layer loop counted once), bytes received per chip
per step (grit_jax.perf.hlo on the compiled HLO that XLA_FLAGS=--xla_dump_to wrote: the same estimate as
`grit-jax aot`'s "received / chip"), the matmul FLOPs per chip read from that HLO with loops multiplied out
(hlo_flops: cost_analysis counts every loop body once, XLA's collective-matmul loops included), the compile's wall
and CPU time and peak host RSS (/usr/bin/time -v).

usage (the project's own Python; needs numpy and grit_jax importable from the repo root):
  python bench/maxtext/analyze.py [--save DIR] /work/mt-runs/RUN [...]
--save DIR writes DIR/RUN.log: the raw log's relevant lines (the settings, versions, the compile's messages,
memory_analysis, cost_analysis, any error), /usr/bin/time's lines, the collectives and FLOPs read from the HLO and
the head of the compiler's memory-usage report.
"""
import ast
import glob
import math
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from grit_jax.perf import hlo  # noqa: E402

GIB = 2**30
_CONST = r"[su](?:32|64)\[\]\S*\s+constant\((\d+)\)"
_orig_trip_count = hlo._trip_count


def _trip_count(cond_lines, body_lines):
  """hlo._trip_count, plus the tuple-element shorthand this XLA prints (`%param#4` for get-tuple-element
  index=4), which the HLO of MaxText's jax 0.12 / libtpu 0.0.50.1 and 0.0.52 uses, and counters
  stepped through a copy (`%copy = copy(%param#4)`, `add(%copy, %step)`); the rule is the same: the condition compares element
  i with constant N (LT), the body adds a constant step to element i, counters start at 0."""
  t = _orig_trip_count(cond_lines, body_lines)
  if t is not None:
    return t
  bounds = [int(c) for line in cond_lines for c in re.findall(_CONST, line)]
  cmp = [re.search(r"compare\(%\S+?#(\d+), %\S+?\), direction=LT", l) for l in cond_lines]
  idx = {m.group(1) for m in cmp if m}
  if len(bounds) != 1 or len(idx) != 1:
    return None
  i = int(idx.pop())
  names = {}
  for line in body_lines:
    m = re.match(r"\s*(?:ROOT\s+)?%(\S+)\s*=", line)
    if m:
      names[m.group(1)] = line
  root = next((l for l in body_lines if l.lstrip().startswith("ROOT") and " tuple(" in l), "")
  operands = re.findall(r"%([^\s,()]+)", root.split(" tuple(", 1)[-1]) if root else []
  nxt = names.get(operands[i], "") if len(operands) > i else ""
  counters = set()  # the counter's values in the body: %param#i and copies of it
  for n, line in names.items():
    if re.search(rf"\scopy\(%\S+#{i}\)", line):
      counters.add(n)
  add = re.search(r"\sadd\(%(\S+?), %(\S+?)\)", nxt)
  if add:
    a, b = add.groups()
    is_counter = lambda x: x.endswith(f"#{i}") or x in counters
    other = b if is_counter(a) else a if is_counter(b) else None
    if other is not None:
      step = re.findall(_CONST, names.get(other, ""))
      if step and int(step[0]) > 0:
        return -(-bounds[0] // int(step[0]))
  return None  # not understood: counted once and reported as an unknown loop


hlo._trip_count = _trip_count


def analyze(run):
  log = open(os.path.join(run, "log.txt"), errors="replace").read()
  timing = open(os.path.join(run, "time.txt"), errors="replace").read()
  row = {"run": os.path.basename(run)}
  m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", timing)
  row["wall"] = m.group(1) if m else "?"
  cpu = [float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", timing)]
  row["cpu_s"] = sum(cpu) if cpu else float("nan")
  m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", timing)
  row["rss_gib"] = int(m.group(1)) / 2**20 if m else float("nan")
  m = re.search(r"rc=(\d+)", timing)
  row["rc"] = int(m.group(1)) if m else None
  mem = re.search(r"Memory analysis: CompiledMemoryStats\((.*)\)", log)
  if not mem:
    errs = [l for l in log.splitlines() if re.search(r"Error|RESOURCE_EXHAUSTED|Exception", l)]
    row["error"] = errs[-1].strip() if errs else log.strip().splitlines()[-1] if log.strip() else "no output"
    return row
  stats = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", mem.group(1))}
  row["args"] = stats["argument_size_in_bytes"] / GIB
  row["temps"] = stats["temp_size_in_bytes"] / GIB
  row["out"] = stats["output_size_in_bytes"] / GIB
  row["alias"] = stats["alias_size_in_bytes"] / GIB
  row["code"] = stats["generated_code_size_in_bytes"] / GIB
  row["total"] = row["args"] + row["out"] - row["alias"] + row["temps"]
  cost = re.search(r"Cost analysis: (\{.*\})", log)
  if cost:
    c = ast.literal_eval(cost.group(1))
    c = c[0] if isinstance(c, (list, tuple)) else c
    row["flops"] = c.get("flops")
  texts = sorted(glob.glob(os.path.join(run, "dump", "*jit_train_step*.after_optimizations.txt")))
  if texts:
    text = open(texts[-1]).read()
    colls, unknown = hlo.collectives(text)
    table = hlo.summarize(colls)
    row["received_gib"] = sum(r["bytes"] for r in table.values()) / GIB
    row["by_kind"] = {k: (r["ops"], r["runs"], r["bytes"] / GIB) for k, r in table.items() if r["ops"]}
    row["unknown_loops"] = unknown
    once, mult, k_once, k_mult, missing, _ = hlo_flops(text)
    row["hlo_flops_once"], row["hlo_flops_all"] = once + k_once, mult + k_mult
    row["kernel_flops_all"], row["flops_missing_ops"] = k_mult, missing
  return row


DEF = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(\S+?\[[0-9,]*\])\S*\s+(\S+)\((.*)$")
PARAM = re.compile(r"(\S+?): (\w+\[[0-9,]*\])")


def dims(type_text):
  m = re.search(r"\w+\[([0-9,]*)\]", type_text)
  return [int(x) for x in m.group(1).split(",") if x]


def _operands(m):
  return re.findall(r"%([^\s,()]+)", m.group(4).split(")")[0])


def conv_flops(line, shapes):
  """2 x batch x output features x input features x (output, kernel) position pairs that land on the unpadded
  input, per spatial dim (XLA's HloCostAnalysis rule). None where not understood (operand shapes not found,
  feature / batch groups: none occur in these programs)."""
  m = DEF.match(line)
  out = dims(m.group(2))
  ops = _operands(m)
  lhs, rhs = shapes.get(ops[0]), shapes.get(ops[1])
  if lhs is None or rhs is None or "group_count=" in line:
    return None
  ll, rl, ol = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", line).groups()
  win = re.search(r"window=\{([^}]*)\}", line)
  w = win.group(1) if win else ""

  def field(key):
    f = re.search(key + r"=(\S+)", w)
    return [x for x in f.group(1).split("x")] if f else None

  pad, stride = field("pad"), field("stride")
  lhs_dil, rhs_dil = field("lhs_dilate"), field("rhs_dilate")
  pairs = 1
  for d in range(sum(c.isdigit() for c in ll)):  # spatial dims are labelled 0, 1, ...
    size_in, size_k, size_out = lhs[ll.index(str(d))], rhs[rl.index(str(d))], out[ol.index(str(d))]
    s = int(stride[d]) if stride else 1
    low = int(pad[d].split("_")[0]) if pad else 0
    ld = int(lhs_dil[d]) if lhs_dil else 1
    rd = int(rhs_dil[d]) if rhs_dil else 1
    span = (size_in - 1) * ld + 1
    pairs *= sum(1 for o in range(size_out) for k in range(size_k)
                 if 0 <= o * s + k * rd - low < span and (o * s + k * rd - low) % ld == 0)
  return 2 * out[ol.index("b")] * out[ol.index("f")] * rhs[rl.index("i")] * pairs


def dot_flops(line, shapes):
  m = DEF.match(line)
  lhs = shapes.get(_operands(m)[0])
  if lhs is None:
    return None
  c = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", line)
  k = math.prod(lhs[int(i)] for i in c.group(1).split(",") if i) if c else 1
  return 2 * math.prod(dims(m.group(2))) * k


def hlo_flops(text):
  """FLOPs per chip of the compiled program's dots and convolutions (the TPU compiler writes most matmuls as
  convolutions), counted as XLA's cost analysis counts them (2 x output elements x input features x the window
  positions that hit the unpadded input), plus the cost estimate Pallas kernels carry (megablox gmm / tgmm; splash
  carries none). Returns (each computation once, loops multiplied out, kernels once, kernels multiplied out,
  ops whose operand shapes were not found, loops of unknown trip count). "Once" is checked against cost_analysis."""
  comps, _ = hlo._computations(text)
  counts, unknown = hlo.run_counts(text)
  heads = {}  # computation -> its parameter list (the shapes of a fused computation's operands)
  for line in text.splitlines():
    m = re.match(r"^(?:ENTRY\s+)?%(\S+)\s+\((.*)\)\s*->", line)
    if m:
      heads[m.group(1)] = m.group(2)
  once = multiplied = kernels_once = kernels_multiplied = 0.0
  missing = 0
  for name, lines in comps.items():
    runs = counts.get(name, 0.0)
    shapes = {p: dims(t) for p, t in PARAM.findall(heads.get(name, ""))}
    for line in lines:
      m = DEF.match(line)
      if m:
        shapes[m.group(1)] = dims(m.group(2))
    for line in lines:
      for f in re.findall(r'"cost_estimate":\{[^}]*?"flops":"(\d+)"', line):  # a Pallas kernel's estimate
        kernels_once += int(f)
        kernels_multiplied += int(f) * runs
      if " convolution(" in line:
        f = conv_flops(line, shapes)
      elif " dot(" in line:
        f = dot_flops(line, shapes)
      else:
        continue
      if f is None:
        missing += 1
        continue
      once += f
      multiplied += f * runs
  return once, multiplied, kernels_once, kernels_multiplied, missing, unknown

KEYS = ("model_name", "compile_topology", "compile_topology_num_slices", "per_device_batch_size",
        "global_batch_size_to_train_on", "max_target_length", "remat_policy", "ici_fsdp_parallelism", "weight_dtype",
        "dtype", "attention", "scan_layers", "opt_type", "decoder_block", "num_decoder_layers", "vocab_size",
        "num_experts", "num_experts_per_tok", "sparse_matmul", "megablox", "capacity_factor", "use_tokamax_gmm",
        "use_tokamax_splash", "num_vocab_tiling", "logits_dot_in_fp32", "dataset_type")


def save(run, row, out_dir):
  log = open(os.path.join(run, "log.txt"), errors="replace").read().splitlines()
  keep = []
  for line in log:
    m = re.search(r"Config param (\w+): (.*)", line)
    if m:
      if m.group(1) in KEYS:
        keep.append(f"{m.group(1)}: {m.group(2)}")
    elif re.search(r"System Information|train_compile|Jitting|Cost analysis|Memory analysis|Error|error:|"
                   r"RESOURCE_EXHAUSTED|Traceback|Exception", line):
      keep.append(line)
  keep.append("--- /usr/bin/time -v (selected) ---")
  for line in open(os.path.join(run, "time.txt"), errors="replace"):
    if re.search(r"Command being timed|Elapsed|Maximum resident|Exit status|rc=|User time|System time", line):
      keep.append(line.rstrip())
  if "by_kind" in row:
    keep.append("--- collectives (grit_jax.perf.hlo on the after_optimizations HLO; per chip per step) ---")
    for k, (ops, runs, gib) in row["by_kind"].items():
      keep.append(f"{k}: {ops} ops, {runs:.0f} runs, {gib:.2f} GiB received")
    keep.append(f"total received: {row['received_gib']:.2f} GiB; loops of unknown trip count: {row['unknown_loops']}")
    keep.append(f"HLO dot/conv + kernel-estimate FLOPs per chip: each computation once {row['hlo_flops_once']:.4g}; "
                f"loops multiplied out {row['hlo_flops_all']:.4g} (kernel estimates {row['kernel_flops_all']:.4g}); "
                f"ops not understood {row['flops_missing_ops']}")
  reports = sorted(glob.glob(os.path.join(run, "dump", "*jit_train_step*memory-usage-report.txt")))
  if reports:  # the compiler's buffer report: the largest temporaries
    keep.append("--- " + os.path.basename(reports[-1]) + " (first 30 lines) ---")
    keep += [line.rstrip()[:300] for line in open(reports[-1]).readlines()[:30]]
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, row["run"] + ".log"), "w") as f:
    f.write("\n".join(keep) + "\n")


if __name__ == "__main__":
  args = sys.argv[1:]
  out_dir = None
  if args[:1] == ["--save"]:
    out_dir, args = args[1], args[2:]
  for run in args:
    r = analyze(run)
    if out_dir:
      save(run, r, out_dir)
    if "error" in r:
      print(f"{r['run']}: FAILED rc={r['rc']} wall {r['wall']}: {r['error']}")
      continue
    print(f"{r['run']}: args/temps/total {r['args']:.2f} / {r['temps']:.2f} / {r['total']:.2f} GiB "
          f"(out {r['out']:.2f}, aliased {r['alias']:.2f}, code {r['code'] * 1024:.1f} MiB); "
          f"cost_analysis flops {r.get('flops', float('nan')):.4g}; received {r.get('received_gib', float('nan')):.1f} GiB "
          f"(unknown loops {r.get('unknown_loops')}); wall {r['wall']} (CPU {r['cpu_s']:.0f} s), peak RSS {r['rss_gib']:.2f} GiB, rc={r['rc']}")
    if "hlo_flops_all" in r:
      print(f"    HLO dot/conv + kernel-estimate FLOPs / chip: each body once {r['hlo_flops_once']:.4g} (vs cost_analysis "
            f"{r.get('flops', float('nan')):.4g}); loops multiplied out {r['hlo_flops_all']:.4g} (of which kernel "
            f"estimates {r['kernel_flops_all']:.3g}); ops not understood: {r['flops_missing_ops']}")
    for k, (ops, runs, gib) in r.get("by_kind", {}).items():
      print(f"    {k}: {ops} ops, {runs:.0f} runs, {gib:.1f} GiB")
