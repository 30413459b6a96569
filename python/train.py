#!/usr/bin/env python
"""Reference training application for rrd_kernels: train a teacher, then distil a student with
CE only, CE + KD, CE + RRD and CE + KD + RRD (loss = gamma*CE + alpha*KD(T) + beta*RRD), and report
test accuracy as a table, results.json and accuracy.png.

    python python/train.py                      # offline demo on scikit-learn's 8x8 digits, CPU, minutes
    python python/train.py --dataset cifar100 --data-dir DATA   # the paper's CIFAR-100 recipe
    torchrun --nproc_per_node 2 python/train.py ...              # DDP (NCCL on GPUs, gloo on CPU)

See python/README.md for every option.
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
try:
    import rrd_kernels  # noqa: F401  (installed, or on the path)
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from models import MODELS, build_model  # noqa: E402
from rrdtrain import dist as D  # noqa: E402
from rrdtrain.data import DataError, load_dataset  # noqa: E402
from rrdtrain.engine import ResumeError, Stage, StageRunner, StopRequested, TrainConfig, evaluate  # noqa: E402
from rrdtrain.optional import progress_bar  # noqa: E402
from rrdtrain.report import format_table, save_json, save_plot, summarise  # noqa: E402
from rrdtrain.students import WorkerSpec, train_seed, train_seeds_in_workers, usable_cpus  # noqa: E402

# method -> (label, uses KD, uses RRD); CE is always on (weight gamma)
METHODS = {
    "ce": ("student (CE)", False, False),
    "kd": ("KD (CE+KD)", True, False),
    "rrd": ("RRD (CE+RRD)", False, True),
    "kd_rrd": ("RRD+KD (CE+KD+RRD)", True, True),
}

PRESETS = {
    # offline demo: 1437 train / 360 test 8x8 digits, a CNN teacher, an MLP student ~26x smaller
    "digits": dict(
        teacher="digits_cnn", student="digits_mlp", batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
        epochs=30, teacher_epochs=30, lr_decay_epochs=None, lr_decay_rate=0.1, bank_size=1024, feat_dim=128,
        kd_T=4.0, save_every=5, seeds=5, threads=1,  # tiny models: one thread is as fast, and robust to a busy CPU
        workers=2,  # seeds on two processes: the job fits in about a minute and a half on 2 cores
        methods=["ce", "kd", "rrd", "kd_rrd"],  # the four rows of the paper's tables
    ),
    # the paper's CIFAR-100 recipe (authors' scripts)
    "cifar100": dict(
        teacher="resnet32x4", student="resnet8x4", batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
        epochs=240, teacher_epochs=240, lr_decay_epochs=None, lr_decay_rate=0.1, bank_size=16384,
        feat_dim=128, kd_T=4.0, save_every=10, seeds=1, threads=None, workers=1, methods=["ce", "kd", "kd_rrd"],
    ),
}

# RRD temperature / enqueue-order configurations published by the authors
RRD_CONFIGS = {
    "paper": dict(tau_s=0.04, tau_t=0.1, enqueue="after"),  # the paper's tables (2024 code)
    "authors2025": dict(tau_s=0.1, tau_t=0.02, enqueue="before"),  # the authors' 2025 code
}


def scaled_milestones(epochs: int) -> list[int]:
    """The paper's decay points (150, 180, 210 of 240 epochs) scaled to ``epochs``."""
    return sorted({max(1, round(epochs * e / 240)) for e in (150, 180, 210)})


def _epochs_text(epochs: list[int]) -> str:
    return ",".join(map(str, epochs))


def _decay_help() -> str:
    per_preset = ", ".join(f"{_epochs_text(scaled_milestones(pre['epochs']))} on {name} ({pre['epochs']} epochs)"
                           for name, pre in PRESETS.items())
    return ("epochs after which the lr is multiplied by --lr-decay-rate, for the teacher and the students "
            "(default: the paper's 150,180,210 of 240 scaled to --epochs and rounded: " + per_preset +
            "; the job prints the schedule it uses when it starts)")


def _method_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in METHODS]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {bad or text!r}; choose a comma-separated list of {list(METHODS)}"
        )
    return list(dict.fromkeys(names))


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs such as 150,180,210, got {text!r}")
    if any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"epochs must be >= 1, got {text!r}")
    return sorted(vals)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the None/False ones (those come from the dataset's preset or mean 'off')."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a teacher and distil a student with CE, KD and RRD (rrd_kernels.RRDLoss). "
                    "Options left unset take the dataset's preset (see python/README.md).",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("data and models")
    g.add_argument("--dataset", choices=sorted(PRESETS), default="digits",
                   help="digits: scikit-learn's bundled 8x8 digits (offline); cifar100: the paper's setting")
    g.add_argument("--data-dir", default=None, help="folder holding cifar-100-python/{train,test} (cifar100 only)")
    models = ", ".join(sorted(MODELS))
    g.add_argument("--teacher", choices=sorted(MODELS), default=None, metavar="MODEL",
                   help=f"teacher model (preset: digits_cnn on digits, resnet32x4 on cifar100); one of {models}")
    g.add_argument("--student", choices=sorted(MODELS), default=None, metavar="MODEL",
                   help=f"student model (preset: digits_mlp on digits, resnet8x4 on cifar100); one of {models}")
    g.add_argument("--teacher-ckpt", default=None,
                   help="load the teacher from this file (a final.pt written by this app, or a state_dict) "
                        "instead of training it")
    g = p.add_argument_group("what to run")
    g.add_argument("--methods", type=_method_list, default=None,
                   help=f"comma-separated student runs, from {list(METHODS)} (preset: all four on digits, "
                        f"ce,kd,kd_rrd on cifar100)")
    g.add_argument("--seed", type=int, default=0, help="base seed (teacher, and the first student seed)")
    g.add_argument("--seeds", type=int, default=None,
                   help="train every student method with seeds seed .. seed+N-1 (default: 5 on digits, 1 on cifar100)")
    g = p.add_argument_group("optimisation (default: the dataset's preset)")
    g.add_argument("--epochs", type=int, default=None, help="student epochs (preset: 30 digits, 240 cifar100)")
    g.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (preset: as --epochs)")
    g.add_argument("--batch-size", type=int, default=None, help="per-process batch size (preset: 64)")
    g.add_argument("--lr", type=float, default=None, help="SGD learning rate (preset: 0.05)")
    g.add_argument("--momentum", type=float, default=None, help="SGD momentum (preset: 0.9)")
    g.add_argument("--weight-decay", type=float, default=None, help="weight decay (preset: 5e-4)")
    g.add_argument("--lr-decay-epochs", type=_int_list, default=None, metavar="E1,E2,...", help=_decay_help())
    g.add_argument("--lr-decay-rate", type=float, default=None, help="lr factor at each decay epoch (preset: 0.1)")
    g = p.add_argument_group("loss")
    g.add_argument("--gamma", type=float, default=1.0, help="weight of the cross-entropy with the labels")
    g.add_argument("--alpha", type=float, default=1.0, help="weight of KD in the methods that use it")
    g.add_argument("--beta", type=float, default=1.0, help="weight of RRD in the methods that use it")
    g.add_argument("--kd-T", type=float, default=None, help="KD temperature (preset: 4, as the paper)")
    g.add_argument("--rrd-config", choices=sorted(RRD_CONFIGS), default="paper",
                   help="paper: tau_s 0.04, tau_t 0.1, enqueue after; authors2025: tau_s 0.1, tau_t 0.02, "
                        "enqueue before")
    g.add_argument("--tau-s", type=float, default=None, help="override the student temperature")
    g.add_argument("--tau-t", type=float, default=None, help="override the teacher temperature")
    g.add_argument("--enqueue", choices=["after", "before"], default=None, help="override the enqueue order")
    g.add_argument("--bank-size", type=int, default=None, help="RRD memory bank size K (preset: 1024 digits, 16384 cifar100)")
    g.add_argument("--feat-dim", type=int, default=None, help="RRD embedding size (preset: 128)")
    g.add_argument("--memory", choices=["bank", "momentum"], default="bank",
                   help="RRD memory: bank = the FIFO bank of teacher keys (rrd_kernels.RRDLoss, --bank-size rows); "
                        "momentum = the authors' CRD-style per-sample memories (rrd_kernels.RRDMomentumLoss: one "
                        "row per training sample and view, --nce-k negatives drawn per sample, momentum update)")
    g.add_argument("--nce-k", type=int, default=None,
                   help="--memory momentum: negatives drawn per sample (default: --bank-size, the same number "
                        "of negatives as the bank)")
    g.add_argument("--nce-m", type=float, default=0.5, help="--memory momentum: momentum of the memory update, in [0, 1)")
    g.add_argument("--nce-t", type=float, default=0.07,
                   help="--memory momentum: temperature of exp(score / nce_t) in --scores faithful")
    g.add_argument("--scores", choices=["similarity", "faithful"], default="similarity",
                   help="--memory momentum: similarity = scores over tau_s / tau_t (the paper's function); "
                        "faithful = the authors' code, exp(score / nce_t) / Z inside the softmaxes")
    g.add_argument("--no-gather-distributed", dest="gather_distributed", action="store_false",
                   help="under DDP, enqueue only this rank's teacher keys (banks differ per rank) instead of "
                        "all ranks' keys; with --memory momentum, update the memories with this rank's batch only")
    g.add_argument("--shard-bank", action="store_true",
                   help="under DDP, each process stores only its 1/W of the --bank-size rows (RRDLoss("
                        "shard_bank=True)); same loss as the gathered bank")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to train: auto = the GPU when torch sees one (torch.cuda.is_available()), else the "
                        "CPU; cuda fails at once without a GPU")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward passes")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on digits, torch's choice on cifar100)")
    g.add_argument("--workers", type=int, default=None,
                   help="train the student seeds on this many CPU processes, each with --threads threads (preset: "
                        "2 on digits, 1 on cifar100); capped by the seeds and the usable cores; 1 on a GPU, under "
                        "torchrun and with --stop-after. Results are identical for any value")
    g.add_argument("--out-dir", default=None, help="output folder (default: runs/<dataset>-<teacher>-<student>)")
    g.add_argument("--save-every", type=int, default=None, help="write a checkpoint every N epochs, and at the end (preset: 5 digits, 10 cifar100)")
    g.add_argument("--resume", action="store_true",
                   help="continue every unfinished stage from its last checkpoint in --out-dir; finished ones "
                        "are loaded")
    g.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                   help="stop the job after this epoch of the first stage that reaches it (a checkpoint is "
                        "written); for interrupting deliberately and continuing with --resume")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")
    return p


def resolve_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, fill the preset's defaults, and check everything that would otherwise fail deep inside."""
    args = p.parse_args(argv)
    for key, value in PRESETS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key, value in RRD_CONFIGS[args.rrd_config].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("epochs", "teacher_epochs", "batch_size", "seeds", "bank_size", "feat_dim", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    for name in ("tau_s", "tau_t", "kd_T", "lr"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("gamma", "alpha", "beta", "weight_decay", "momentum"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.lr_decay_epochs is None:
        args.lr_decay_epochs = scaled_milestones(args.epochs)
    if args.stop_after is not None and args.stop_after < 1:
        p.error(f"--stop-after must be >= 1, got {args.stop_after}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.shard_bank and not args.gather_distributed:
        p.error("--shard-bank shards the one gathered bank: it cannot be combined with --no-gather-distributed")
    if args.nce_k is None:
        args.nce_k = args.bank_size
    if args.nce_k < 1:
        p.error(f"--nce-k must be >= 1, got {args.nce_k}")
    if not 0.0 <= args.nce_m < 1.0:
        p.error(f"--nce-m must be in [0, 1), got {args.nce_m}")
    if not args.nce_t > 0:
        p.error(f"--nce-t must be > 0, got {args.nce_t}")
    if args.memory == "momentum" and args.shard_bank:
        p.error("--shard-bank shards the FIFO bank: it cannot be combined with --memory momentum")
    if (args.memory == "bank" and any(METHODS[m][2] for m in args.methods)
            and args.batch_size * world > args.bank_size):
        if world > 1:
            p.error(
                f"--batch-size {args.batch_size} x {world} DDP processes is larger than the RRD bank "
                f"(--bank-size {args.bank_size}); each step enqueues every process's batch, so use "
                f"--bank-size >= {args.batch_size * world}"
            )
        p.error(f"--batch-size {args.batch_size} is larger than the RRD bank (--bank-size {args.bank_size}); "
                f"each step enqueues the batch, so use --bank-size >= {args.batch_size}")
    if args.dataset == "cifar100" and args.data_dir is None:
        p.error("--data-dir is required with --dataset cifar100 (the folder holding cifar-100-python/)")
    for role in ("teacher", "student"):
        if getattr(args, role) == "digits_mlp" and args.dataset != "digits":
            p.error(f"--{role} digits_mlp reads 8x8 single-channel images: use it with --dataset digits only")
    if args.dataset == "digits" and args.data_dir is not None:
        p.error("--data-dir is only used with --dataset cifar100 (digits ships with scikit-learn)")
    if args.teacher_ckpt is not None and not os.path.isfile(args.teacher_ckpt):
        p.error(f"--teacher-ckpt: no such file {args.teacher_ckpt!r}")
    if args.out_dir is None:
        args.out_dir = os.path.join(REPO, "runs", f"{args.dataset}-{args.teacher}-{args.student}")
    return args


def load_teacher_ckpt(p, path: str, arch: str, make) -> torch.nn.Module:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        p.error(f"--teacher-ckpt: cannot read {path!r} as a final.pt of this app or a state_dict ({exc})")
    if isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict):
        if ckpt.get("arch") not in (None, arch):
            p.error(f"--teacher-ckpt: {path!r} holds a {ckpt['arch']!r} model but --teacher is {arch!r}")
        state = ckpt["model"]
    else:
        state = ckpt
    model = make(arch)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        p.error(f"--teacher-ckpt: {path!r} does not fit --teacher {arch} ({str(exc).splitlines()[0]})")
    return model


def worker_count(args, ctx: D.DistContext) -> tuple[int, str]:
    """How many worker processes train the student seeds, and why not more."""
    if args.workers == 1:
        return 1, "--workers 1"
    if ctx.distributed:
        return 1, "under torchrun every process is one rank of each stage"
    if ctx.device.type != "cpu":
        return 1, "on a GPU the seeds run one after another"
    if args.stop_after is not None:
        return 1, "--stop-after stops the first stage that reaches it, so stages run in order"
    n = min(args.workers, args.seeds, usable_cpus())
    if n == 1:
        return 1, "one seed" if args.seeds == 1 else "one usable CPU core"
    return n, ""


def main(argv=None) -> int:
    parser = build_parser()
    args = resolve_args(parser, argv)
    t_start = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        data = load_dataset(args.dataset, args.data_dir, split_seed=0)
    except DataError as exc:
        parser.error(str(exc))
    try:
        ctx = D.setup(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    log = print if ctx.is_main else (lambda *a, **k: None)

    cfg = TrainConfig(
        dataset=args.dataset, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, lr_decay_epochs=args.lr_decay_epochs, lr_decay_rate=args.lr_decay_rate,
        kd_T=args.kd_T, bank_size=args.bank_size, feat_dim=args.feat_dim, tau_s=args.tau_s, tau_t=args.tau_t,
        enqueue=args.enqueue, gather_distributed=args.gather_distributed, bf16=args.bf16, shard_bank=args.shard_bank,
        memory=args.memory, nce_k=args.nce_k, nce_m=args.nce_m, nce_t=args.nce_t, scores=args.scores,
        save_every=args.save_every, stop_after=args.stop_after, resume=args.resume, progress=args.progress,
    )

    make = functools.partial(build_model, num_classes=data.num_classes, in_channels=data.in_channels)  # picklable

    if ctx.is_main:
        os.makedirs(args.out_dir, exist_ok=True)
        save_json(os.path.join(args.out_dir, "config.json"), {**vars(args), "world_size": ctx.world})
    if ctx.distributed:
        ranks = (f"{ctx.world} DDP ranks (torchrun processes; each rank trains every stage on its share of each "
                 f"batch)")
    else:
        ranks = "one process (not under torchrun: no DDP)"
    log(f"{args.dataset}: {len(data.train)} train / {len(data.test)} test images; device {ctx.device}, {ranks}; "
        f"output {args.out_dir}")
    log(f"lr schedule (teacher and students): lr {args.lr:g}, x{args.lr_decay_rate:g} after epoch(s) "
        f"{_epochs_text(args.lr_decay_epochs)} (--lr-decay-epochs); teacher {args.teacher_epochs} epochs, "
        f"students {args.epochs}")
    runner = StageRunner(ctx, cfg, data, make, log=log)
    stopped = resume_error = None
    try:
        # ---- teacher
        if args.teacher_ckpt:
            teacher = load_teacher_ckpt(parser, args.teacher_ckpt, args.teacher, make).to(ctx.device)
            teacher_hist = []
            log(f"teacher {args.teacher} loaded from {args.teacher_ckpt}")
        else:
            stage = Stage("teacher", args.teacher, args.teacher_epochs, args.seed, os.path.join(args.out_dir, "teacher"))
            res = runner.run(stage)
            teacher, teacher_hist = res["model"], res["history"]
        teacher.eval()
        for prm in teacher.parameters():
            prm.requires_grad_(False)
        _, teacher_acc = evaluate(teacher, runner.test_set, runner.pre, cfg, ctx.device)
        log(f"teacher {args.teacher}: test accuracy {teacher_acc:.2f}%")

        # ---- students
        methods = {}
        for name in args.methods:
            label, use_kd, use_rrd = METHODS[name]
            weights = (args.gamma, args.alpha if use_kd else 0.0, args.beta if use_rrd else 0.0)
            methods[name] = {"label": label, "weights": weights, "histories": [], "ddp_bank_in_sync": []}
        weights = {name: m["weights"] for name, m in methods.items()}
        seeds = list(range(args.seed, args.seed + args.seeds))
        workers, why_not_more = worker_count(args, ctx)
        if workers > 1:
            log(f"students: {len(seeds)} seeds x {len(methods)} methods on {workers} worker processes "
                f"(started by this process on this machine, each training whole seeds; not DDP ranks)")
            spec = WorkerSpec(
                load_data=functools.partial(load_dataset, args.dataset, args.data_dir, split_seed=0),
                build_model=make,
                threads=args.threads, cfg=cfg, teacher_arch=args.teacher,
                teacher_state={k: v.detach().cpu() for k, v in teacher.state_dict().items()},
                methods=weights, student=args.student, epochs=args.epochs, out_dir=args.out_dir,
            )
            bar = progress_bar(total=len(seeds), desc="seeds", unit="seed") if args.progress else None
            per_seed = train_seeds_in_workers(spec, seeds, workers,
                                              on_done=(lambda seed: bar.update(1)) if bar is not None else None)
            if bar is not None:
                bar.close()
        else:
            if args.workers > 1 and args.seeds > 1:
                log(f"students: seeds one after another ({why_not_more})")
            per_seed = {seed: train_seed(runner, teacher, seed, weights, args.student, args.epochs, args.out_dir,
                                         log=log) for seed in seeds}
        for seed in seeds:
            for name, m in methods.items():
                m["histories"].append(per_seed[seed][name]["history"])
                if per_seed[seed][name]["bank_in_sync"] is not None:
                    m["ddp_bank_in_sync"].append(per_seed[seed][name]["bank_in_sync"])
    except StopRequested as stop:
        stopped = str(stop)
    except ResumeError as exc:
        resume_error = str(exc)
    # (outside the except blocks, so the tracebacks and the stage's DDP wrapper are gone before teardown)
    if stopped is not None or resume_error is not None:
        gc.collect()
        D.teardown(ctx)
        if resume_error is not None:
            parser.error(resume_error)
        log(stopped)
        return 0

    if ctx.is_main:
        summarise(methods)
        teacher_info = {"arch": args.teacher, "test_acc": teacher_acc, "history": teacher_hist,
                        "checkpoint": args.teacher_ckpt or os.path.join(args.out_dir, "teacher", "final.pt")}
        title = (f"{args.dataset} ({len(data.train)} train / {len(data.test)} test images): teacher {args.teacher} "
                 f"-> student {args.student}, {args.epochs} epochs, seeds {seeds}")
        if args.memory == "momentum":
            rrd_line = (f"momentum memory: nce_k {args.nce_k}, nce_m {args.nce_m}, scores {args.scores}"
                        + (f", nce_t {args.nce_t}" if args.scores == "faithful" else ""))
        else:
            rrd_line = f"enqueue {args.enqueue}, K {args.bank_size}"
        loss_line = (f"loss = gamma*CE + alpha*KD(T {args.kd_T:g}) + beta*RRD; RRD {args.rrd_config}: tau_s "
                     f"{args.tau_s}, tau_t {args.tau_t}, {rrd_line}, feat_dim {args.feat_dim}")
        table = format_table(f"{title}\n{loss_line}", teacher_info, methods, args.seeds)
        runtime = time.perf_counter() - t_start
        payload = {
            "config": {**vars(args), "world_size": ctx.world, "device": str(ctx.device)},
            "teacher": teacher_info,
            "methods": {k: {kk: vv for kk, vv in v.items() if kk != "histories"} for k, v in methods.items()},
            "histories": {k: v["histories"] for k, v in methods.items()},
            "seeds": seeds,
            "table": table,
            "runtime_seconds": runtime,
        }
        save_json(os.path.join(args.out_dir, "results.json"), payload)
        plotted = save_plot(os.path.join(args.out_dir, "accuracy.png"), title, teacher_info, methods)
        print()
        print(table)
        also = " and accuracy.png" if plotted else ""
        print(f"\nwrote {os.path.join(args.out_dir, 'results.json')}{also}; runtime {runtime:.1f} s")
    D.teardown(ctx)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: worker processes are already stopped (rrdtrain.students)
        print("\ninterrupted: finished stages and the last checkpoints are in the output folder; run the same "
              "command with --resume to continue", file=sys.stderr)
        sys.exit(130)
