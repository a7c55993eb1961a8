"""Which architectures the pruner handles: every torchvision classifier and a broad timm list.

    python -m benchmarks.coverage [--out benchmarks/results/coverage.json] [--resume]
        [--jobs N] [--only NAME ...] [--timeout 180] [--report-only]

Each model runs in its own process (forked from a server that has imported torch, torchvision
and timm once, so a hang or a segfault stays contained), in eval mode, with random weights (no
download) at a small input (64x64, or the smallest of a few sizes the model accepts; models
with a fixed token grid get ``img_size`` / ``image_size``). The pruner is built at target FLOPs
0.5, its width logits are drawn at random (seeded) and shifted until the hard network has about
half the FLOPs, then:

* export error: max |hard - exported| over the output scale (max |hard|), for the masked
  reference and the sliced hard pass (when the model has one); the soft pass runs too;
* FLOPs and parameter error: the pruner's prediction for the hard network against
  ``count_flops`` / ``count_params`` of the exported model (relative);
* build time and number of groups.

Outcomes: ``exact`` (export error < 1e-4 and both predictions within 1%), ``inexact`` (it ran
but the numbers disagree: a failure), ``refused`` (an ``S2HError``: its message should name the
layer and the remedy), ``timeout`` (no result within ``--timeout`` seconds), ``crash``
(anything else: exception type, message and the last traceback frames, or the signal that
killed the process) and ``skipped`` (the model would not fit in the free memory).

Each finished model is written at once (whole JSON, atomically), so ``--resume`` skips the
models already there. ``benchmarks/RESULTS.md`` gets a ``## Coverage`` section rebuilt from
the JSON (other sections are left alone).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import sys
import time
import traceback
import warnings
from multiprocessing.connection import wait
from pathlib import Path

from s2hpruner.app.files import atomic_write_bytes

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "coverage.json"
MARKDOWN = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Coverage"
EXPORT_TOLERANCE = 1e-4  # of the output scale
COUNT_TOLERANCE = 0.01  # relative, FLOPs and parameters
TARGET = 0.5
SIZES = (64, 96, 128, 160, 224, 256)  # tried in turn until the full model runs
OUTCOMES = ("exact", "inexact", "refused", "timeout", "crash", "skipped")
FAILURES = ("inexact", "timeout", "crash")

# The smallest variant of (nearly) every timm family, and a few more where a family mixes
# very different blocks; random weights, nothing downloaded. Sorted.
TIMM_MODELS = sorted({
    # ResNet and relatives
    "resnet10t", "resnet18", "resnet18d", "resnet26", "resnet50", "resnetaa34d", "resnetblur18",
    "resnetrs50", "seresnet18", "ecaresnet26t", "legacy_seresnet18", "resnext50_32x4d",
    "resnetv2_18", "resnetv2_50x1_bit", "skresnet18", "res2net50_14w_8s", "res2next50",
    "resnest14d", "tresnet_m", "wide_resnet50_2",
    # byobnet / byoanet (RepVGG, MobileOne, GENet, RegNetZ, BoTNet, HaloNet, LambdaNet)
    "repvgg_a0", "mobileone_s0", "gernet_s", "regnetz_005", "resnet32ts", "resnext26ts",
    "eca_resnext26ts", "gcresnext26ts", "botnet26t_256", "halonet26t", "lambda_resnet26t",
    "sebotnet33ts_256",
    # RegNet
    "regnetx_002", "regnety_002",
    # EfficientNet family (efficientnet.py)
    "efficientnet_b0", "efficientnet_lite0", "efficientnet_es", "efficientnet_b0_gn",
    "efficientnetv2_rw_t", "tf_efficientnet_b0", "tf_efficientnetv2_b0", "mixnet_s",
    "tf_mixnet_s", "mnasnet_small", "semnasnet_050", "spnasnet_100", "mobilenetv2_035",
    "mobilenetv2_050", "fbnetc_100", "tinynet_e", "efficientnet_cc_b0_4e",
    # MobileNetV3 / V4 family
    "mobilenetv3_small_050", "mobilenetv3_large_075", "tf_mobilenetv3_small_minimal_100",
    "lcnet_035", "fbnetv3_b", "mobilenetv4_conv_small", "mobilenetv4_hybrid_medium",
    # ghost and other mobile CNNs
    "ghostnet_050", "ghostnetv2_100", "ghostnetv3_050", "repghostnet_050", "hardcorenas_a",
    "rexnet_100", "rexnetr_100", "repvit_m0_9", "fasternet_t0", "starnet_s1", "lcnetv2_small",
    "shvit_s1", "cpubone_b0_bfrobust", "lowformer_b0",
    # DenseNet, DLA, DPN, HRNet, VoVNet, SelecSLS, CSP, DarkNet
    "densenet121", "densenetblur121d", "dla34", "dla46_c", "dla46x_c", "dla60x_c", "dpn48b",
    "dpn68", "hrnet_w18_small", "hrnet_w18_small_v2", "ese_vovnet19b_dw",
    "ese_vovnet19b_slim", "eca_vovnet39b", "selecsls42b", "cspresnet50", "cspresnext50",
    "cspdarknet53", "cs3darknet_s", "cs3darknet_focus_s", "cspnext_tiny", "darknet17",
    "darknet21",
    # Inception, Xception, VGG, HGNet, NFNet, RDNet
    "inception_v3", "inception_v4", "inception_resnet_v2", "legacy_xception", "xception41",
    "vgg11", "vgg11_bn", "hgnet_tiny", "hgnetv2_b0", "nf_resnet26", "nf_regnet_b0",
    "nfnet_l0", "eca_nfnet_l0", "dm_nfnet_f0", "rdnet_tiny",
    # ConvNeXt-like and MetaFormers
    "convnext_atto", "convnext_atto_ols", "convnext_zepto_rms", "convnextv2_atto",
    "convmixer_768_32", "inception_next_atto", "mambaout_femto", "poolformer_s12",
    "poolformerv2_s12", "convformer_s18", "caformer_s18",
    # reparameterisable / efficient hybrids
    "fastvit_t8", "fastvit_mci0", "efficientformer_l1", "efficientformerv2_s0", "levit_128s",
    "levit_conv_128s", "efficientvit_b0", "efficientvit_m0", "efficientvim_m1",
    "swiftformer_xs", "edgenext_xx_small", "mobilevit_xxs", "mobilevitv2_050",
    "tiny_vit_5m_224", "nextvit_small", "iformer_t",
    # vision transformers
    "vit_tiny_patch16_224", "vit_small_patch32_224", "vit_tiny_r_s16_p8_224",
    "vit_small_r26_s32_224", "vit_relpos_small_patch16_224", "vit_srelpos_small_patch16_224",
    "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "deit3_small_patch16_224",
    "cait_xxs24_224", "xcit_nano_12_p16_224", "pit_ti_224", "tnt_s_patch16_224",
    "beit_base_patch16_224", "beitv2_base_patch16_224", "eva02_tiny_patch14_224",
    "flexivit_small", "vitamin_small_224", "convit_tiny", "crossvit_tiny_240", "volo_d1_224",
    "visformer_tiny", "pvt_v2_b0", "twins_pcpvt_small", "twins_svt_small", "nest_tiny",
    "coat_lite_tiny", "coat_tiny", "hiera_tiny_224", "mvitv2_tiny",
    # windowed / hierarchical transformers and conv-attention hybrids
    "swin_tiny_patch4_window7_224", "swin_s3_tiny_224", "swinv2_tiny_window8_256",
    "swinv2_cr_tiny_224", "davit_tiny", "gcvit_xxtiny", "focalnet_tiny_srf",
    "coatnet_nano_rw_224", "coatnet_pico_rw_224", "coatnet_bn_0_rw_224", "maxvit_nano_rw_256",
    "maxvit_pico_rw_256", "maxxvit_rmlp_nano_rw_256",
    # MLPs and recurrent
    "mixer_s32_224", "gmixer_12_224", "gmlp_ti16_224", "resmlp_12_224", "sequencer2d_s",
    # timm's own tiny test models: one per family, all kinds of blocks
    "test_byobnet", "test_coatnet", "test_convnext", "test_convnext2", "test_convnext3",
    "test_efficientnet", "test_efficientnet_evos", "test_efficientnet_gn",
    "test_efficientnet_ln", "test_mambaout", "test_maxvit", "test_nfnet", "test_resnet",
    "test_vit", "test_vit2", "test_vit3", "test_vit4", "test_vit_relpos",
})  # fmt: skip


def torchvision_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def all_models() -> list[tuple[str, str]]:
    """(source, name) of every model, torchvision first, each list sorted."""
    return [("torchvision", n) for n in torchvision_models()] + [("timm", n) for n in TIMM_MODELS]


def key(source: str, name: str) -> str:
    return f"{source}/{name}"


# ------------------------------------------------------------------ in the child process
def _available_memory() -> int:
    """MemAvailable in bytes (or a large number where /proc/meminfo is missing)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


def _create(source: str, name: str, size: int | None):
    """The model with random weights, told its input size where it has a fixed token grid."""
    import torch

    torch.manual_seed(0)
    if source == "torchvision":
        import torchvision

        kwargs = {}
        if size is not None and (name.startswith("vit_") or name.startswith("maxvit")):
            kwargs["image_size"] = size
        if name in ("googlenet", "inception_v3"):  # as the zoo builds them (no aux heads)
            kwargs["aux_logits"] = False
        return torchvision.models.get_model(name, weights=None, **kwargs)
    import timm

    if size is not None:
        try:
            return timm.create_model(name, pretrained=False, img_size=size)
        except TypeError:
            pass
    return timm.create_model(name, pretrained=False)


def _output(y):
    """The logits tensor of a model's output (first tensor of a tuple, ``.logits``)."""
    import torch

    if torch.is_tensor(y):
        return y
    if isinstance(y, list | tuple):
        return _output(y[0])
    if isinstance(y, dict):
        return _output(next(iter(y.values())))
    return _output(y.logits)


def _sizes(source: str, name: str) -> list[int]:
    sizes = list(SIZES)
    if source == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is not None and cfg.input_size:
            sizes.append(int(cfg.input_size[-1]))
    if source == "torchvision" and name.startswith("vit_h_14"):
        sizes = [56, 112, 224]
    return sorted(set(sizes))


def _build(source: str, name: str, report) -> tuple:
    """(model, input, size): the smallest size of :data:`SIZES` the model runs at."""
    import torch

    errors = []
    model_fixed = None
    for size in _sizes(source, name):
        report("create", size=size)
        try:
            model = _create(source, name, size)
        except Exception as exc:  # this size not accepted as img_size
            errors.append(f"{size}: {type(exc).__name__}: {exc}")
            if model_fixed is None:
                model_fixed = _create(source, name, None)
            model = model_fixed
        params = sum(p.numel() for p in model.parameters())
        need = int(2.5 * params * 4) + (1 << 29)  # model, export copy, traces
        if need > _available_memory():
            raise MemoryError(f"needs ~{need / 2**30:.1f} GB ({params / 1e6:.0f}M params)")
        model.eval()
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        try:
            with torch.no_grad():
                _output(model(x))
        except Exception as exc:
            errors.append(f"{size}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        return model, x, size
    raise RuntimeError("the full model runs at none of the sizes tried: " + " | ".join(errors))


def _random_logits(pruner, target: float, seed: int) -> float:
    """Random width logits, shifted by a common slope until the hard FLOPs ratio is about
    ``target`` (or the smallest reachable); returns that ratio."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    logits = pruner.mask_parameters()
    noise = [torch.randn(u.shape, generator=gen) for u in logits]
    slopes = [torch.tensor(g.candidates, dtype=torch.float32) / g.channels for g in pruner.groups]

    def ratio(a: float) -> float:
        with torch.no_grad():
            for u, n, s in zip(logits, noise, slopes, strict=True):
                u.copy_(n + a * s)
        return pruner.ratio("hard", "flops")

    lo, hi = -40.0, 40.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if ratio(mid) > target:
            hi = mid
        else:
            lo = mid
    return ratio(hi)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def run_model(source: str, name: str, report) -> dict:
    """Build, mask, export and check one model; ``report(stage, **info)`` marks progress."""
    import torch

    from s2hpruner.core import S2HPruner
    from s2hpruner.core.errors import BudgetError
    from s2hpruner.core.resources.model import count_flops, count_params

    record: dict = {}
    caught: list[str] = []

    def keep_warning(message, category, filename, lineno, file=None, line=None):
        text = f"{category.__name__}: {message}"
        if text not in caught:
            caught.append(text)

    warnings.showwarning = keep_warning
    warnings.simplefilter("always")
    try:
        model, x, size = _build(source, name, report)
        record["input_size"] = size
        record["model_params"] = sum(p.numel() for p in model.parameters())
        report("build", size=size)
        start = time.perf_counter()
        try:
            pruner = S2HPruner(model, x, target_flops=TARGET)
            record["target"] = TARGET
        except BudgetError as exc:  # too few prunable groups for 0.5: build at the full size
            record["budget_note"] = str(exc)
            pruner = S2HPruner(model, x, target_flops=1.0)
            record["target"] = 1.0
        record["build_seconds"] = round(time.perf_counter() - start, 3)
        record["groups"] = len(pruner.groups)
        record["head_groups"] = sum(g.kind == "heads" for g in pruner.groups)
        record["sliced_hard"] = bool(pruner.sliced_hard)
        report("logits")
        record["hard_flops_ratio"] = round(_random_logits(pruner, TARGET, seed=0), 4)
        with torch.no_grad():
            report("soft")
            with pruner.mode("soft"):
                _output(model(x))
            report("hard")
            with pruner.mode("hard", sliced=False):
                masked = _output(model(x)).clone()
            sliced = None
            if pruner.sliced_hard:
                report("sliced")
                with pruner.mode("hard", sliced=True):
                    sliced = _output(model(x)).clone()
            report("export")
            exported = pruner.export().eval()
            report("exported forward")
            out = _output(exported(x))
            scale = float(masked.abs().max()) or 1.0
            record["export_error"] = float((masked - out).abs().max()) / scale
            if sliced is not None:
                record["sliced_error"] = float((masked - sliced).abs().max()) / scale
            report("count")
            predicted_flops = float(pruner.flops("hard"))
            predicted_params = float(pruner.params("hard"))
            counted_flops = count_flops(exported, x)
            counted_params = count_params(exported)
        record["flops_error"] = _rel(predicted_flops, counted_flops)
        record["params_error"] = _rel(predicted_params, counted_params)
        record["flops_ratio"] = round(counted_flops / count_flops(model, x), 4)
        record["params_ratio"] = round(counted_params / count_params(model), 4)
        errors = [record["export_error"], record.get("sliced_error", 0.0)]
        exact = (
            max(errors) < EXPORT_TOLERANCE
            and record["flops_error"] <= COUNT_TOLERANCE
            and record["params_error"] <= COUNT_TOLERANCE
        )
        record["outcome"] = "exact" if exact else "inexact"
    except MemoryError as exc:
        record.update(outcome="skipped", error={"type": "MemoryError", "message": str(exc)})
    except Exception as exc:
        from s2hpruner.core.errors import S2HError

        frames = traceback.format_exception(type(exc), exc, exc.__traceback__)
        record.update(
            outcome="refused" if isinstance(exc, S2HError) else "crash",
            error={
                "type": type(exc).__name__,
                "message": str(exc)[:2000],
                "traceback": "".join(frames[-4:])[-3000:],
            },
        )
    record["warnings"] = [w[:400] for w in caught[:5]]
    return record


def _child(source: str, name: str, conn) -> None:
    """Entry of one model's process: progress messages, then the record, through ``conn``."""
    stage = {"name": "start", "since": time.perf_counter()}
    timings: dict[str, float] = {}

    def report(name_: str, **info) -> None:
        now = time.perf_counter()
        previous = stage["name"]
        timings[previous] = round(timings.get(previous, 0.0) + now - stage["since"], 2)
        stage.update(name=name_, since=now)
        conn.send(("stage", name_, info))

    try:
        record = run_model(source, name, report)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        record = {"outcome": "crash", "error": {"type": type(exc).__name__, "message": str(exc)}}
    record["stage"] = stage["name"]  # where it failed, or the last stage
    report("done")
    record["stage_seconds"] = timings
    conn.send(("result", record, {}))
    conn.close()


# ------------------------------------------------------------------ in the parent process
def machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": __import__("torchvision").__version__,
        "timm": __import__("timm").__version__,
        "torch_pruning": __import__("torch_pruning").__version__,
        "cpus": os.cpu_count(),
        "threads": os.environ.get("OMP_NUM_THREADS"),
    }


def load(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"models": {}}


def save(path: Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=False) + "\n").encode())


class Running:
    """One model's process, its pipe, deadline and last stage."""

    def __init__(self, ctx, source: str, name: str, timeout: float):
        self.source, self.name = source, name
        receive, send = ctx.Pipe(duplex=False)
        self.conn = receive
        self.process = ctx.Process(target=_child, args=(source, name, send), daemon=True)
        self.start = time.monotonic()
        self.process.start()
        send.close()
        self.deadline = self.start + timeout
        self.stage, self.info = "start", {}
        self.record: dict | None = None

    def poll(self) -> dict | None:
        """The record once the model is done (or has died), else None."""
        try:
            while self.conn.poll():
                kind, payload, info = self.conn.recv()
                if kind == "stage":
                    self.stage, self.info = payload, info
                else:
                    self.record = payload
        except (EOFError, OSError):
            pass
        if self.record is not None:
            self.process.join(timeout=10)
            return self.record
        if not self.process.is_alive():
            self.process.join()
            code = self.process.exitcode
            return {
                "outcome": "crash",
                "stage": self.stage,
                "error": {"type": "ProcessDied", "message": f"exit code {code} in {self.stage}"},
            }
        if time.monotonic() > self.deadline:
            self.process.kill()
            self.process.join()
            return {"outcome": "timeout", "stage": self.stage, "input_size": self.info.get("size")}
        return None


def run(args: argparse.Namespace, data: dict, path: Path) -> None:
    models = all_models()
    if args.only:
        wanted = set(args.only)
        models = [(s, n) for s, n in models if n in wanted or key(s, n) in wanted]
        missing = wanted - {n for _, n in models} - {key(s, n) for s, n in models}
        if missing:
            raise SystemExit(f"unknown models: {sorted(missing)}")
    todo = [(s, n) for s, n in models if not (args.resume and key(s, n) in data["models"])]
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torchvision", "timm", "torch_pruning", "s2hpruner.core"])
    running: list[Running] = []
    done = 0
    while todo or running:
        while todo and len(running) < args.jobs:
            source, name = todo.pop(0)
            running.append(Running(ctx, source, name, args.timeout))
        wait([r.conn for r in running] + [r.process.sentinel for r in running], timeout=1.0)
        for job in list(running):
            record = job.poll()
            if record is None:
                continue
            running.remove(job)
            record = {"source": job.source, "name": job.name, **record}
            record["seconds"] = round(time.monotonic() - job.start, 2)
            data["models"][key(job.source, job.name)] = record
            save(path, data)
            done += 1
            detail = record.get("error", {}).get("type", "")
            total = done + len(todo) + len(running)
            print(f"[{done}/{total}] {key(job.source, job.name)}: {record['outcome']} {detail} "
                  f"({record['seconds']:.0f} s)", flush=True)  # fmt: skip


# --------------------------------------------------------------------------------- report
def counts(data: dict) -> dict[str, dict[str, int]]:
    """Outcome counts per source."""
    table: dict[str, dict[str, int]] = {}
    for record in data["models"].values():
        row = table.setdefault(record["source"], dict.fromkeys(OUTCOMES, 0))
        row[record["outcome"]] = row.get(record["outcome"], 0) + 1
    return table


def _fmt(value, spec: str = ".1e") -> str:
    return "" if value is None else format(value, spec)


def _detail(record: dict) -> str:
    error = record.get("error")
    if error:
        text = f"{error['type']}: {error['message']}"
    elif record["outcome"] == "timeout":
        text = f"no result in time (stage {record.get('stage')})"
    else:
        text = "; ".join(record.get("warnings", [])[:1])
    text = re.sub(r"\s+", " ", text).replace("|", "\\|")
    return text[:160] + ("..." if len(text) > 160 else "")


def markdown(data: dict) -> str:
    """The ``## Coverage`` section."""
    settings = data.get("settings", {})
    lines = [
        SECTION,
        "",
        "Generated by `python -m benchmarks.coverage` from `results/coverage.json`; do not edit "
        "by hand. Every torchvision classifier and a broad timm list (random weights, eval mode, "
        f"small inputs), pruner built at target FLOPs {settings.get('target', TARGET)} with "
        "random width logits. `exact`: the exported model matches the hard network (max error "
        f"< {settings.get('export_tolerance', EXPORT_TOLERANCE):g} of the output scale) and the "
        "pruner's FLOPs and parameter predictions match the independent counters within "
        f"{100 * settings.get('count_tolerance', COUNT_TOLERANCE):g}%. `refused`: an "
        "`S2HError` naming the layer. `inexact`, `timeout` and `crash` are failures.",
        "",
        "| source | models | " + " | ".join(OUTCOMES) + " |",
        "|---|---:|" + "---:|" * len(OUTCOMES),
    ]
    for source, row in sorted(counts(data).items(), key=lambda kv: kv[0] != "torchvision"):
        total = sum(row.values())
        lines.append(f"| {source} | {total} | " + " | ".join(str(row[o]) for o in OUTCOMES) + " |")
    lines += [
        "",
        "| model | outcome | input | groups | build s | export err | FLOPs err | params err "
        "| FLOPs ratio | detail |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for k in sorted(data["models"], key=lambda k: (not k.startswith("torchvision"), k)):
        r = data["models"][k]
        errors = [e for e in (r.get("export_error"), r.get("sliced_error")) if e is not None]
        lines.append(
            f"| {k} | {r['outcome']} | {r.get('input_size') or ''} | {r.get('groups', '')} | "
            f"{_fmt(r.get('build_seconds'), '.1f')} | {_fmt(max(errors) if errors else None)} | "
            f"{_fmt(r.get('flops_error'))} | {_fmt(r.get('params_error'))} | "
            f"{_fmt(r.get('flops_ratio'), '.3f')} | {_detail(r)} |"
        )
    return "\n".join(lines) + "\n"


def write_markdown(data: dict, path: Path = MARKDOWN) -> None:
    """Replace (or append) the ``## Coverage`` section of ``path``, leaving the rest alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = markdown(data)
    start = text.find(f"\n{SECTION}\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION) + 2)
        rest = "" if end < 0 else text[end:]
        text = text[: start + 1] + section + rest
    atomic_write_bytes(path, text.encode())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.coverage", description=__doc__.split(
        "\n")[0])  # fmt: skip
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON to write")
    p.add_argument("--markdown", default=str(MARKDOWN), help="RESULTS.md to update")
    p.add_argument("--resume", action="store_true", help="skip models already in --out")
    p.add_argument("--jobs", type=int, default=1, help="models run in parallel")
    p.add_argument("--only", nargs="+", metavar="NAME", help="these models (name or source/name)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per model")
    p.add_argument("--report-only", action="store_true", help="only rewrite the Markdown")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = Path(args.out)
    data = load(path)
    if not args.report_only:
        if data["models"] and not args.resume and not args.only:
            raise SystemExit(f"{path} exists: pass --resume to go on, or remove it")
        data["settings"] = {
            "target": TARGET,
            "export_tolerance": EXPORT_TOLERANCE,
            "count_tolerance": COUNT_TOLERANCE,
            "timeout": args.timeout,
            "sizes": list(SIZES),
        }
        data["machine"] = machine()
        data["command"] = " ".join(["python -m benchmarks.coverage", *sys.argv[1:]])
        run(args, data, path)
    write_markdown(data, Path(args.markdown))
    for source, row in counts(data).items():
        print(source, ", ".join(f"{o} {n}" for o, n in row.items() if n))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
