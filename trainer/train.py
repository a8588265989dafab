"""LoRA training on the SDXL UNet (and optionally the text encoders), from a `TrainingSpec`.

The recipe (`train_lora`) reads like a table of contents:
  1. check inputs (data, paths) before any model loads           trainer.data.check_inputs
  2. load the base model through the renderer's loader            trainer.models
  3. check the LoRA config against the layers, add adapters       trainer.models
  4. optimizer, lr scheduler, optional resume from the last checkpoint
  5. training loop: cached latents/text embeddings (trainer.caches), SDXL time ids, noise-prediction loss
  6. checkpoints (trainer.checkpoint), samples rendered by the renderer (trainer.samples)
  7. final LoRA (diffusers/peft, kohya on request), registry entry (trainer.export), train.html (trainer.report)

Determinism: every random draw of optimizer step `s` comes from a generator seeded by
(seed, s, micro-batch), and the data order of epoch `e` from (seed, e). A resumed run
therefore draws exactly what the uninterrupted run drew; checkpoints still save the
torch RNG states (LoRA dropout uses the global generator). `train_lora` sets torch's
thread count (`train.threads`) and global generator for the run and restores both after.
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from schemas.training import TrainingSpec
from trainer import checkpoint, export, report, samples
from trainer import data as tdata
from trainer.caches import Encoders
from trainer.errors import TrainingError
from trainer.models import (
    adapted_components,
    adapter_config,
    add_adapters,
    load_models,
    lora_state_dicts,
    trainable_state,
)
from trainer.samples import MakeScorer, ScoreImages


@dataclass
class TrainPaths:
    run_dir: Path  # <output.folder>/<name>.train
    checkpoints: Path
    samples: Path
    cache: Path
    lora_file: Path  # <output.folder>/<name>.safetensors
    kohya_file: Path
    report: Path

    @classmethod
    def for_spec(cls, spec: TrainingSpec, root: Path) -> TrainPaths:
        out = root / spec.output.folder
        run = out / f"{spec.output.name}.train"
        cache = root / spec.train.cache_dir if spec.train.cache_dir else out / ".cache" / "train"
        return cls(
            run_dir=run,
            checkpoints=run / "checkpoints",
            samples=run / "samples",
            cache=cache,
            lora_file=out / f"{spec.output.name}.safetensors",
            kohya_file=out / f"{spec.output.name}.kohya.safetensors",
            report=run / "train.html",
        )


@dataclass
class TrainResult:
    steps: int  # optimizer steps completed
    losses: list[float]  # one per optimizer step, from step 1
    lora_file: Path | None  # None when stopped early (stop_after)
    kohya_file: Path | None
    report: Path | None
    checkpoints: list[Path]
    samples: dict[int, list[str]]  # step -> sample image paths (relative to the run dir)
    clip_i: dict[int, float]
    best_step: int | None
    step_seconds: list[float]  # wall time per optimizer step
    spec_hash: str
    dataset_digest: str
    device: str
    mixed_precision: str
    notes: list[str] = field(default_factory=list)


def check_run_folder(paths: TrainPaths, resume: bool) -> None:
    """--resume needs a checkpoint; a fresh run must not overwrite an earlier run's checkpoints."""
    found = checkpoint.list_checkpoints(paths.checkpoints)
    if resume and not found:
        raise TrainingError(f"--resume: no checkpoint in {paths.checkpoints}; run without --resume to start")
    if not resume and found:
        raise TrainingError(
            f"{paths.checkpoints} already holds checkpoints of an earlier run; pass --resume to continue it, "
            f"or delete {paths.run_dir} to start over"
        )


class Trainer:
    """One training run. `train_lora` is the usual entry point.

    The constructor seeds torch's global generator with `train.seed` (peft's gaussian LoRA init
    and LoRA dropout draw from it, as in every training script); `train_lora` restores it after.
    `score_images` scores the samples against `evaluation.references` (see `trainer.samples`).
    """

    def __init__(self, spec: TrainingSpec, root: Path, *, device: str | None = None, progress: bool = True,
                 render: bool = True, score_images: ScoreImages | None = None):
        self.spec = spec
        self.root = Path(root).resolve()
        self.notes: list[str] = []
        self.prep = tdata.check_inputs(spec, self.root)  # 1. before any model loads
        if render and spec.samples is not None and spec.evaluation.select_best == "clip_i" and score_images is None:
            raise TrainingError("evaluation.select_best: clip_i needs a scorer for the samples; pass score_images "
                                "(castbook train builds one from reports.metrics)")
        self.paths = TrainPaths.for_spec(spec, self.root)
        self.models, self.resolved = load_models(spec, self.root, device, self.notes)  # 2.
        import torch

        torch.manual_seed(spec.train.seed)
        self.param_groups = add_adapters(spec, self.models)  # 3.
        self._setup_optimizer()  # 4.
        self.progress = progress
        self.render_samples = render
        self.score_images = score_images
        if render and spec.samples is not None and spec.evaluation.references and score_images is None:
            self.notes.append("CLIP-I not computed: no scorer was given (castbook train passes one)")
        self.encoders = Encoders(self.models, self.resolved.digest, self.paths.cache,
                                 train_text_encoder=spec.lora.train_text_encoder)
        self.step = 0
        self.losses: list[float] = []
        self.step_seconds: list[float] = []
        self.samples: dict[int, list[str]] = {}
        self.clip_i: dict[int, float] = {}
        self._renderer = None
        self._bucketize()

    # -- set-up -------------------------------------------------------------------------
    def _setup_optimizer(self) -> None:
        import torch
        from diffusers.optimization import get_scheduler

        t = self.spec.train
        self.optimizer = torch.optim.AdamW(self.param_groups, betas=(t.adam_beta1, t.adam_beta2),
                                           eps=t.adam_epsilon, weight_decay=t.weight_decay)
        self.lr_scheduler = get_scheduler(t.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=t.lr_warmup_steps, num_training_steps=t.steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.models.mixed_precision == "fp16")
        self.trainable = trainable_state(self.models, self.spec)

    def _bucketize(self) -> None:
        t = self.spec.train
        if t.buckets:
            buckets = tdata.make_buckets(t.resolution, t.bucket_step)
            self.targets = [tdata.nearest_bucket(i.width, i.height, buckets) for i in self.prep.items]
        else:
            self.targets = [(t.resolution, t.resolution)] * len(self.prep.items)
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, target in enumerate(self.targets):
            by_bucket.setdefault(target, []).append(i)
        self.by_bucket = by_bucket
        self.batches_per_epoch = len(tdata.epoch_batches(by_bucket, t.batch_size, t.seed, 0))
        self._epoch_cache: dict[int, list[list[int]]] = {}

    def batch_indices(self, global_batch: int) -> list[int]:
        epoch, pos = divmod(global_batch, self.batches_per_epoch)
        if epoch not in self._epoch_cache:
            t = self.spec.train
            self._epoch_cache = {epoch: tdata.epoch_batches(self.by_bucket, t.batch_size, t.seed, epoch)}
        return self._epoch_cache[epoch][pos]

    # -- one optimizer step ---------------------------------------------------------------
    def micro_batch(self, step: int, micro: int) -> dict:
        """Everything random about one micro-batch, drawn from its own seeded generators."""
        import torch

        t, ds = self.spec.train, self.spec.dataset
        seed = tdata.step_seed(t.seed, step, micro)
        gen = torch.Generator("cpu").manual_seed(seed)
        rng = random.Random(seed)
        global_batch = step * t.gradient_accumulation_steps + micro
        idx = self.batch_indices(global_batch)
        target = self.targets[idx[0]]
        chosen: list[tuple[tdata.DataItem, float]] = []
        pp = self.spec.prior_preservation
        for i in idx:
            use_class = pp is not None and rng.random() < pp.fraction
            if use_class:
                chosen.append((self.prep.class_items[rng.randrange(len(self.prep.class_items))], pp.weight))
            else:
                chosen.append((self.prep.items[i], 1.0))
        latents, time_ids, embeds, pooled = [], [], [], []
        for item, _w in chosen:
            d = self.encoders.latent_dist(item, target)
            latents.append(d["mean"] + d["std"] * torch.randn(d["mean"].shape, generator=gen))
            time_ids.append(d["time_ids"])
            if item.is_class:
                caption = item.caption
            else:
                caption = tdata.augment_caption(item.caption, prefix=ds.caption_prefix, dropout=ds.caption_dropout,
                                                shuffle=ds.shuffle_captions, keep_tokens=ds.keep_tokens, rng=rng)
            e, p = self.encoders.encode_text(caption)
            embeds.append(e)
            pooled.append(p)
        latents = torch.stack(latents) * self.models.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        if t.noise_offset:
            noise = noise + t.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=gen)
        n_train = self.models.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, n_train, (latents.shape[0],), generator=gen)
        return {
            "latents": latents, "noise": noise, "timesteps": timesteps, "time_ids": torch.stack(time_ids),
            "embeds": torch.stack(embeds), "pooled": torch.stack(pooled),
            "weights": torch.tensor([w for _, w in chosen], dtype=torch.float32),
        }

    def loss_of(self, mb: dict):
        import torch
        import torch.nn.functional as F

        m = self.models
        dev = m.device
        latents, noise, timesteps = mb["latents"].to(dev), mb["noise"].to(dev), mb["timesteps"].to(dev)
        noisy = m.noise_scheduler.add_noise(latents, noise, timesteps)
        pred_type = m.noise_scheduler.config.prediction_type
        target = noise if pred_type == "epsilon" else m.noise_scheduler.get_velocity(latents, noise, timesteps)
        with torch.autocast(device_type=dev.split(":")[0], dtype=m.autocast_dtype or torch.float32,
                            enabled=m.autocast_dtype is not None):
            pred = m.unet(
                noisy.to(m.weight_dtype), timesteps, mb["embeds"].to(dev, m.weight_dtype),
                added_cond_kwargs={"text_embeds": mb["pooled"].to(dev, m.weight_dtype),
                                   "time_ids": mb["time_ids"].to(dev, m.weight_dtype)},
                return_dict=False,
            )[0]
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        weights = mb["weights"].to(dev)
        if self.spec.train.snr_gamma is not None:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(m.noise_scheduler, timesteps)
            w = torch.clamp(snr, max=self.spec.train.snr_gamma)
            weights = weights * (w / snr if pred_type == "epsilon" else w / (snr + 1))
        return (per_sample * weights).mean()

    def train_step(self) -> float:
        """One optimizer step (all micro-batches); returns its mean loss."""
        import torch

        t = self.spec.train
        total = 0.0
        for micro in range(t.gradient_accumulation_steps):
            mb = self.micro_batch(self.step, micro)
            loss = self.loss_of(mb) / t.gradient_accumulation_steps
            self.scaler.scale(loss).backward()
            total += float(loss.detach())
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), t.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total

    # -- the loop -----------------------------------------------------------------------
    def run(self, *, resume: bool = False, stop_after: int | None = None) -> TrainResult:
        check_run_folder(self.paths, resume)
        if resume:
            checkpoint.resume_latest(self)
        self.models.unet.train()
        t, ck, sm = self.spec.train, self.spec.checkpoints, self.spec.samples
        end = t.steps if stop_after is None else min(t.steps, stop_after)
        with _progress(self.progress, t.steps, self.step) as bar:
            while self.step < end:
                t0 = time.perf_counter()
                loss = self.train_step()
                self.step_seconds.append(time.perf_counter() - t0)
                self.losses.append(loss)
                bar(self.step, loss)
                last = self.step == t.steps
                if sm is not None and self.render_samples and (self.step % sm.every == 0 or last):
                    self.sample()
                if self.step % ck.every == 0 or last or self.step == end:
                    checkpoint.save(self)
        result = TrainResult(
            steps=self.step, losses=list(self.losses), lora_file=None, kohya_file=None, report=None,
            checkpoints=checkpoint.list_checkpoints(self.paths.checkpoints), samples=dict(self.samples),
            clip_i=dict(self.clip_i), best_step=None, step_seconds=list(self.step_seconds),
            spec_hash=self.prep.spec_hash, dataset_digest=self.prep.dataset_digest, device=self.models.device,
            mixed_precision=self.models.mixed_precision, notes=self.notes,
        )
        if self.step >= t.steps:  # 7. final LoRA (best sample step or last checkpoint), kohya, registry, report
            best = checkpoint.best_step(self.clip_i) if self.spec.evaluation.select_best == "clip_i" else None
            folder = samples.sample_folder(self.paths.samples, best) if best is not None else result.checkpoints[-1]
            export.finish(self, result, folder / "lora.safetensors", best)
            result.report = report.write_report(self, result)
        return result

    # -- what gets written ---------------------------------------------------------------
    def lora_layers(self) -> dict[str, dict]:
        return lora_state_dicts(self.models, self.spec)

    def adapter_configs(self) -> dict[str, dict]:
        """peft LoraConfig of each adapted component (diffusers stores it in the file header)."""
        return {k: adapter_config(m) for k, m in adapted_components(self.models, self.spec).items()}

    def header_metadata(self) -> dict[str, str]:
        """Training metadata stored in the safetensors header (strings only)."""
        from renderer.outputs import castbook_version

        s = self.spec
        return {
            "castbook.version": castbook_version(),
            "castbook.spec_hash": self.prep.spec_hash,
            "castbook.dataset_digest": self.prep.dataset_digest,
            "castbook.steps": str(self.step),
            "castbook.rank": str(s.lora.rank),
            "castbook.alpha": str(s.lora.alpha),
            "castbook.kind": s.kind,
            "castbook.base_model": self.resolved.ref,
            "castbook.base_model_digest": self.resolved.digest,
            "castbook.trigger": s.dataset.trigger or "",
            "castbook.name": s.output.name,
        }

    # -- samples through the renderer ----------------------------------------------------
    def sample(self) -> None:
        self.samples[self.step], score = samples.render_step(self)
        if score is not None:
            self.clip_i[self.step] = score


class _progress:
    """A rich progress bar with loss and it/s; a no-op when disabled."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.enabled, self.total, self.start = enabled, total, start

    def __enter__(self):
        if not self.enabled:
            return lambda step, loss: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.2f} it/s"),
                          TimeRemainingColumn())
        self.p.__enter__()
        self.task = self.p.add_task("train", total=self.total, completed=self.start, loss=float("nan"), rate=0.0)
        self.t0, self.s0 = time.perf_counter(), self.start

        def update(step: int, loss: float) -> None:
            rate = (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)
            self.p.update(self.task, completed=step, loss=loss, rate=rate)

        return update

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)
        return False


@contextmanager
def torch_run_state(threads: int | None):
    """torch's CPU thread count (`threads`; None keeps it) and global generator, as a run sets them,
    restored on exit: a library call leaks neither into its caller."""
    import torch

    before = torch.get_num_threads()
    # The CUDA generators are forked only when CUDA is there (forking them initialises CUDA).
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        if threads:
            torch.set_num_threads(threads)
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        torch.set_num_threads(before)


def train_lora(spec: TrainingSpec, root: Path, *, resume: bool = False, device: str | None = None,
               progress: bool = True, stop_after: int | None = None, render: bool = True,
               score_images: ScoreImages | None = None) -> TrainResult:
    """Train the LoRA a spec describes; see the module docstring for the steps.

    `score_images` (sample images, references -> mean CLIP-I) scores the samples; without it
    no CLIP-I is computed, and `evaluation.select_best: clip_i` is an error."""
    check_run_folder(TrainPaths.for_spec(spec, Path(root).resolve()), resume)  # before any model loads
    with torch_run_state(spec.train.threads):
        trainer = Trainer(spec, root, device=device, progress=progress, render=render, score_images=score_images)
        return trainer.run(resume=resume, stop_after=stop_after)


def load_training_spec(path: Path, root: Path) -> TrainingSpec:
    """Read a training spec YAML with located errors (`schemas.loader.SpecErrors`)."""
    from schemas.loader import load_yaml_model

    return load_yaml_model(Path(path), TrainingSpec, root)


def _train_remote(spec: TrainingSpec, root: Path, kwargs: dict,
                  make_scorer: MakeScorer | None = None) -> tuple[str, object]:
    """Body of the Ray task: the same `train_lora` call, in a worker process; the scorer is built
    here, from `make_scorer`, so no model crosses the process boundary.

    Input errors come back as ("TrainingError", problems): the exception does not survive
    pickling (its __init__ rebuilds the message from `problems`)."""
    try:
        score_images = make_scorer(spec, root) if make_scorer is not None else None
        return "ok", train_lora(spec, root, score_images=score_images, **kwargs)
    except TrainingError as exc:
        return "TrainingError", list(exc.problems)


def train_lora_ray(spec: TrainingSpec, root: Path, *, ray_address: str | None = None, resume: bool = False,
                   device: str | None = None, progress: bool = False, stop_after: int | None = None,
                   render: bool = True, make_scorer: MakeScorer | None = None) -> TrainResult:
    """`train_lora` inside a Ray task (one GPU when the cluster has one, else one CPU).

    Starts a private local Ray like the renderer (`renderer.ray_cluster.start_ray`) unless
    `ray_address` names a cluster; shuts down only a Ray it started. `make_scorer` (a module-level
    function, sent by reference) builds the sample scorer inside the worker. Input errors are
    raised here as TrainingError, like `train_lora` raises them."""
    import ray

    from renderer.ray_cluster import start_ray, worker_env

    we_started = start_ray(ray_address)  # log_to_driver: the worker's prints show on this terminal
    try:
        # A task asking for a GPU on a cluster without one stays PENDING forever (STACK.md).
        opts: dict = {"num_cpus": 1, "max_retries": 0, "runtime_env": {"env_vars": worker_env()}}
        if ray.cluster_resources().get("GPU"):
            opts["num_gpus"] = 1
        task = ray.remote(**opts)(_train_remote)
        kwargs = dict(resume=resume, device=device, progress=progress, stop_after=stop_after, render=render)
        kind, value = ray.get(task.remote(spec, Path(root).resolve(), kwargs, make_scorer))
        if kind == "ok":
            return value
        raise TrainingError(value)
    finally:
        if we_started:
            ray.shutdown()
