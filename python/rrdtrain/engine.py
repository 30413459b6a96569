"""One training stage (the teacher, or one student with one loss mix): the epoch loop, evaluation,
per-epoch logs, and checkpoints that make an interrupted run resume bit-exactly (on CPU).

Determinism: a stage starts by seeding python, numpy and torch from its own seed, so its result does not
depend on what ran before it in the process (a student trained after a freshly trained teacher equals one
trained against the same teacher loaded with --teacher-ckpt). Inside a stage the only randomness is the
model/bank initialisation (global torch RNG), the batch order (DistributedSampler: seed + epoch) and the
augmentation (a dedicated generator), plus, with --memory momentum, the negatives' sampler (a CPU generator
seeded from the global RNG at construction). A checkpoint stores all of them plus the model, optimizer,
scheduler, the RRD criterion's state per rank (RRDLoss: bank and pointer; RRDMomentumLoss: both memories, z
and the sampler state) and the metrics so far.
"""
from __future__ import annotations

import csv
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from rrd_kernels import RRDLoss, RRDMomentumLoss

from . import dist as D
from .data import DatasetSpec, Preprocess, batches, make_sampler
from .optional import progress_bar
from .teacher_memo import TeacherMemo

CKPT_FORMAT = "rrd-train-checkpoint-v1"
METRIC_KEYS = ("epoch", "lr", "train_loss", "train_ce", "train_kd", "train_rrd", "train_acc", "test_loss", "test_acc")


class StopRequested(Exception):
    """Raised after the epoch named by --stop-after (a checkpoint has been written)."""


class ResumeError(ValueError):
    """--resume cannot continue the checkpoint found (other settings, or fewer epochs than already done)."""


@dataclass
class TrainConfig:
    dataset: str
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    lr_decay_epochs: list
    lr_decay_rate: float
    kd_T: float
    bank_size: int
    feat_dim: int
    tau_s: float
    tau_t: float
    enqueue: str
    gather_distributed: bool
    bf16: bool
    shard_bank: bool = False
    memory: str = "bank"  # "bank": RRDLoss (FIFO bank); "momentum": RRDMomentumLoss (per-sample memories)
    nce_k: int = 16384
    nce_m: float = 0.5
    nce_t: float = 0.07
    scores: str = "similarity"
    eval_batch_size: int = 1000
    save_every: int = 10
    stop_after: int | None = None
    resume: bool = False
    progress: bool = True


@dataclass
class Stage:
    name: str  # e.g. "teacher", "seed0/kd_rrd"
    arch: str
    epochs: int
    seed: int
    out_dir: str
    gamma: float = 1.0  # CE weight
    alpha: float = 0.0  # KD weight
    beta: float = 0.0  # RRD weight
    extra: dict = field(default_factory=dict)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state(aug_gen: torch.Generator) -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "augment": aug_gen.get_state(),
    }


def set_rng_state(state: dict, aug_gen: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    aug_gen.set_state(state["augment"])


def kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, T: float) -> torch.Tensor:
    """Hinton et al.'s KD: KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch (in fp32)."""
    log_p_s = F.log_softmax(logits_s.float() / T, dim=1)
    log_p_t = F.log_softmax(logits_t.float() / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (T * T)


def _cpu(v):
    """A state_dict entry on the CPU: tensors, and the tensors inside an extra state (RRDMomentumLoss's
    sampler state)."""
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    if isinstance(v, dict):
        return {k: _cpu(x) for k, x in v.items()}
    return v


def atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def stage_signature(cfg: TrainConfig, stage: Stage, world: int) -> dict:
    """What must match for a checkpoint to be continued (epochs may be extended)."""
    sig = {
        "dataset": cfg.dataset,
        "arch": stage.arch,
        "seed": stage.seed,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "momentum": cfg.momentum,
        "weight_decay": cfg.weight_decay,
        "lr_decay_epochs": list(cfg.lr_decay_epochs),
        "lr_decay_rate": cfg.lr_decay_rate,
        "gamma": stage.gamma,
        "alpha": stage.alpha,
        "beta": stage.beta,
        "bf16": cfg.bf16,
        "world_size": world,
    }
    if stage.alpha:
        sig["kd_T"] = cfg.kd_T
    if stage.beta and cfg.memory == "momentum":  # only then: signatures of bank runs stay as they were
        sig.update(
            memory="momentum", nce_k=cfg.nce_k, nce_m=cfg.nce_m, scores=cfg.scores, feat_dim=cfg.feat_dim,
            tau_s=cfg.tau_s, tau_t=cfg.tau_t, gather_distributed=cfg.gather_distributed,
        )
        if cfg.scores == "faithful":
            sig["nce_t"] = cfg.nce_t
    elif stage.beta:
        sig.update(
            bank_size=cfg.bank_size, feat_dim=cfg.feat_dim, tau_s=cfg.tau_s, tau_t=cfg.tau_t,
            enqueue=cfg.enqueue, gather_distributed=cfg.gather_distributed,
        )
        if cfg.shard_bank:  # only when set: signatures of unsharded runs stay as they were
            sig["shard_bank"] = True
    return sig


@torch.no_grad()
def evaluate(model: nn.Module, data, pre: Preprocess, cfg: TrainConfig, device) -> tuple[float, float]:
    """(mean CE loss, top-1 accuracy in %) on ``data`` (in a fixed order, no randomness)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = len(data)
    for start in range(0, n, cfg.eval_batch_size):
        x = pre.eval(data.images[start : start + cfg.eval_batch_size])
        y = data.labels[start : start + cfg.eval_batch_size]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            _, logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    return float(loss_sum) / n, 100.0 * float(correct) / n


def write_logs(stage_dir: str, history: list, timing: list) -> None:
    with open(os.path.join(stage_dir, "log.json"), "w") as fh:
        json.dump({"history": history, "epoch_seconds": timing}, fh, indent=1)
    with open(os.path.join(stage_dir, "log.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(METRIC_KEYS) + ["epoch_seconds"])
        for row, sec in zip(history, timing):
            w.writerow([row[k] for k in METRIC_KEYS] + [f"{sec:.3f}"])


def load_final(path: str, device) -> dict:
    """A stage's final.pt (tensors and plain values only, so weights_only loading is safe)."""
    return torch.load(path, map_location=device, weights_only=True)


class StageRunner:
    def __init__(self, ctx: D.DistContext, cfg: TrainConfig, data: DatasetSpec, build_model, log=print):
        self.ctx, self.cfg, self.data = ctx, cfg, data
        self.build_model = build_model
        self.log = log
        self.device = ctx.device
        self.pre = Preprocess(data, ctx.device)
        self.train_set = data.train.to(ctx.device)
        self.test_set = data.test.to(ctx.device)

    # ------------------------------------------------------------------ one stage
    def run(self, stage: Stage, teacher: nn.Module | None = None, teacher_memo: TeacherMemo | None = None) -> dict:
        """Train ``stage`` (or resume it, or load it if already finished). Returns
        {"model": the trained module, "history": per-epoch metrics, "criterion": RRDLoss or None}.
        ``teacher_memo``: share one across the methods of a seed to compute the teacher's outputs once (CPU)."""
        ctx, cfg = self.ctx, self.cfg
        stage_dir = stage.out_dir
        os.makedirs(stage_dir, exist_ok=True)
        final_path = os.path.join(stage_dir, "final.pt")
        last_path = os.path.join(stage_dir, "checkpoint.pt")
        signature = stage_signature(cfg, stage, ctx.world)

        seed_all(stage.seed)
        model = self.build_model(stage.arch).to(self.device)
        criterion = None
        if stage.beta:
            if teacher is None:
                raise ValueError(f"stage {stage.name}: RRD (beta > 0) needs a teacher")
            if cfg.memory == "momentum":
                # One memory row per training sample (its index in train_set, which the batches carry); the
                # sampler's seed comes from the stage's seeded global RNG, mixed with the rank under DDP.
                criterion = RRDMomentumLoss(
                    model.feat_dim, teacher.feat_dim, feat_dim=cfg.feat_dim, n_data=len(self.train_set),
                    nce_k=cfg.nce_k, tau_s=cfg.tau_s, tau_t=cfg.tau_t, nce_m=cfg.nce_m, nce_t=cfg.nce_t,
                    scores=cfg.scores, backend="auto", gather_distributed=cfg.gather_distributed,
                ).to(self.device)
            else:
                criterion = RRDLoss(
                    model.feat_dim, teacher.feat_dim, feat_dim=cfg.feat_dim, bank_size=cfg.bank_size,
                    tau_s=cfg.tau_s, tau_t=cfg.tau_t, enqueue=cfg.enqueue, backend="auto",
                    gather_distributed=cfg.gather_distributed, shard_bank=cfg.shard_bank,
                ).to(self.device)
        if stage.alpha and teacher is None:
            raise ValueError(f"stage {stage.name}: KD (alpha > 0) needs a teacher")

        final = load_final(final_path, "cpu") if cfg.resume and os.path.isfile(final_path) else None
        if final is not None and len(final["history"]) > stage.epochs:
            raise ResumeError(
                f"--resume: {final_path} already has {len(final['history'])} epochs, more than --epochs "
                f"{stage.epochs} for stage {stage.name}"
            )
        if final is not None and len(final["history"]) == stage.epochs:
            self._check_signature(final.get("signature"), signature, final_path)
            model.load_state_dict(final["model"])
            if criterion is not None:
                criterion.load_state_dict(final["criterion"])
            if ctx.is_main:
                self.log(f"[{stage.name}] already finished ({final_path}); loaded")
            return {"model": model, "history": final["history"], "criterion": criterion}

        # the RRD projection heads train with the student (as in the authors' code)
        params = list(model.parameters()) + (list(criterion.parameters()) if criterion is not None else [])
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.lr_decay_epochs, gamma=cfg.lr_decay_rate)
        aug_gen = torch.Generator(device=self.device)
        aug_gen.manual_seed(stage.seed * 1000 + 17 + ctx.rank)  # differs per rank
        sampler = make_sampler(len(self.train_set), ctx.world, ctx.rank, seed=stage.seed)
        history: list = []
        timing: list = []
        start_epoch = 1

        if cfg.resume and os.path.isfile(last_path):
            # our own file; loaded on the CPU (RNG states must stay CPU tensors), load_state_dict moves the rest
            ckpt = torch.load(last_path, map_location="cpu", weights_only=False)
            if ckpt.get("format") != CKPT_FORMAT:
                raise ResumeError(f"--resume: {last_path} is not a checkpoint of this app")
            self._check_signature(ckpt["signature"], signature, last_path)
            model.load_state_dict(ckpt["model"])
            if criterion is not None:
                criterion.load_state_dict(ckpt["criterion_per_rank"][ctx.rank])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            set_rng_state(ckpt["rng_per_rank"][ctx.rank], aug_gen)
            sampler.seed = ckpt["sampler"]["seed"]
            history, timing = list(ckpt["history"]), list(ckpt["timing"])
            start_epoch = ckpt["epoch"] + 1
            if ckpt["epoch"] > stage.epochs:
                raise ResumeError(
                    f"--resume: {last_path} is at epoch {ckpt['epoch']}, past --epochs {stage.epochs} "
                    f"for stage {stage.name}"
                )
            if ctx.is_main:
                self.log(f"[{stage.name}] resuming from {last_path} after epoch {ckpt['epoch']}")
        elif ctx.distributed:
            D.broadcast_module_(model, ctx)
            if criterion is not None:  # a sharded bank is one global bank already (one seed on every rank)
                sharded = getattr(criterion, "bank_is_sharded", False)
                D.broadcast_module_(criterion, ctx, skip=("bank",) if sharded else ())

        net = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None) if ctx.distributed else model
        if teacher is not None:
            teacher.eval()

        bar = None
        if ctx.is_main and cfg.progress:
            bar = progress_bar(total=stage.epochs, initial=start_epoch - 1, desc=stage.name, unit="ep",
                               dynamic_ncols=True)
        for epoch in range(start_epoch, stage.epochs + 1):
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            train_metrics = self._train_epoch(stage, net, teacher, criterion, optimizer, sampler, aug_gen, epoch,
                                              teacher_memo)
            scheduler.step()
            if ctx.distributed:
                D.broadcast_module_(model, ctx)  # identical BN statistics on every rank before evaluation
            test_loss, test_acc = evaluate(model, self.test_set, self.pre, cfg, self.device)
            row = {"epoch": epoch, "lr": lr, **train_metrics, "test_loss": test_loss, "test_acc": test_acc}
            history.append(row)
            timing.append(time.perf_counter() - t0)
            stop = cfg.stop_after is not None and epoch == cfg.stop_after and epoch < stage.epochs
            if epoch % cfg.save_every == 0 or epoch == stage.epochs or stop:
                self._save(last_path, stage, signature, epoch, model, criterion, optimizer, scheduler, sampler,
                           aug_gen, history, timing)
            if ctx.is_main:
                write_logs(stage_dir, history, timing)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['train_loss']:.3f}", test_acc=f"{test_acc:.2f}")
                    bar.update(1)
            if stop:
                if bar is not None:
                    bar.close()
                # Drop the DDP wrapper now: the exception's traceback keeps this frame alive, and a DDP reducer
                # that outlives destroy_process_group() can abort the process at exit.
                net = None  # noqa: F841
                raise StopRequested(f"[{stage.name}] stopped after epoch {epoch} (--stop-after); continue with --resume")
        if bar is not None:
            bar.close()

        # final.pt holds the full bank (gathered from the shards: a collective), loadable with any rank count
        crit_final = None
        if criterion is not None:
            crit_final = criterion.full_state_dict() if hasattr(criterion, "full_state_dict") else criterion.state_dict()
        if ctx.is_main:
            atomic_save(
                {
                    "format": CKPT_FORMAT + "-final",
                    "arch": stage.arch,
                    "dataset": cfg.dataset,
                    "num_classes": self.data.num_classes,
                    "in_channels": self.data.in_channels,
                    "model": model.state_dict(),
                    "criterion": crit_final,
                    "history": history,
                    "signature": signature,
                },
                final_path,
            )
        D.barrier(ctx)
        return {"model": model, "history": history, "criterion": criterion}

    # ------------------------------------------------------------------ helpers
    def _check_signature(self, saved: dict | None, now: dict, path: str) -> None:
        if saved is None:
            return
        diff = {k: (saved.get(k), now.get(k)) for k in set(saved) | set(now) if saved.get(k) != now.get(k)}
        if diff:
            parts = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ResumeError(f"--resume: {path} was made with other settings ({parts}); pass the same options")

    def _save(self, path, stage, signature, epoch, model, criterion, optimizer, scheduler, sampler, aug_gen,
              history, timing) -> None:
        ctx = self.ctx
        # every rank's RNG state and RRD state (banks differ per rank when gather_distributed is off)
        rngs = D.gather_objects(rng_state(aug_gen), ctx)
        crit_state = None
        if criterion is not None:
            crit_state = {k: _cpu(v) for k, v in criterion.state_dict().items()}
        crits = D.gather_objects(crit_state, ctx)
        if ctx.is_main:
            atomic_save(
                {
                    "format": CKPT_FORMAT,
                    "stage": stage.name,
                    "signature": signature,
                    "epoch": epoch,
                    "epochs": stage.epochs,
                    "model": model.state_dict(),
                    "criterion_per_rank": crits,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "sampler": {"seed": sampler.seed, "epoch": sampler.epoch},
                    "rng_per_rank": rngs,
                    "history": history,
                    "timing": timing,
                    "world_size": ctx.world,
                },
                path,
            )
        D.barrier(ctx)

    def _train_epoch(self, stage, net, teacher, criterion, optimizer, sampler, aug_gen, epoch, teacher_memo=None) -> dict:
        ctx, cfg, dev = self.ctx, self.cfg, self.device
        net.train()
        sampler.set_epoch(epoch)
        order = list(sampler)
        # sums over samples (on the device, read once per epoch: no per-step sync): loss, ce, kd, rrd, correct
        sums = torch.zeros(5, dtype=torch.float64, device=dev)
        count = 0
        zero = torch.zeros((), device=dev)
        n_batches = (len(order) + cfg.batch_size - 1) // cfg.batch_size
        inner = None
        if ctx.is_main and cfg.progress and n_batches >= 100:
            inner = progress_bar(total=n_batches, desc=f"epoch {epoch}", unit="it", leave=False, dynamic_ncols=True)
        for step, idx in enumerate(batches(order, cfg.batch_size, dev)):
            x = self.pre.train(self.train_set.images[idx], aug_gen)
            y = self.train_set.labels[idx]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                if teacher is not None and (stage.alpha or stage.beta):  # the student alone needs no teacher pass
                    with torch.no_grad():
                        if teacher_memo is not None:
                            f_t, logits_t = teacher_memo((epoch, step), x, teacher)
                        else:
                            f_t, logits_t = teacher(x)
                f_s, logits_s = net(x)
                ce = F.cross_entropy(logits_s.float(), y)
                kd = kd_loss(logits_s, logits_t, cfg.kd_T) if stage.alpha else zero
                if not stage.beta:
                    rrd = zero
                elif cfg.memory == "momentum":
                    rrd = criterion(f_s, f_t, idx)  # idx: the batch's indices into train_set, one per sample
                else:
                    rrd = criterion(f_s, f_t)
                loss = stage.gamma * ce + stage.alpha * kd + stage.beta * rrd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if criterion is not None:
                D.average_grads_(criterion.parameters(), ctx)
            optimizer.step()
            b = y.shape[0]
            count += b
            with torch.no_grad():
                correct = (logits_s.argmax(1) == y).sum()
                sums += torch.stack([loss.detach().double() * b, ce.detach().double() * b, kd.detach().double() * b,
                                     rrd.detach().double() * b, correct.double()])
            if inner is not None:
                inner.update(1)
        if inner is not None:
            inner.close()
        sums = torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64, device=dev)])
        D.all_reduce_sum_(sums, ctx)
        s = sums.tolist()
        n = s[5]
        return {"train_loss": s[0] / n, "train_ce": s[1] / n, "train_kd": s[2] / n, "train_rrd": s[3] / n,
                "train_acc": 100.0 * s[4] / n}
