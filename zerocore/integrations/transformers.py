"""Hugging Face transformers on zerocore: `ZeroTrainer`, a drop-in `transformers.Trainer`, and `from_pretrained`.

A script that fine-tunes with `deepspeed train.py --deepspeed ds_config.json` switches by one change:

    from zerocore.integrations.transformers import ZeroTrainer as Trainer   # was: from transformers import Trainer

and runs with `torchrun --nproc_per_node N train.py --deepspeed ds_config.json` (the deepspeed launcher, where
installed, sets the same environment). TrainingArguments (with `deepspeed=` a path or a dict), the Trainer call,
the ds_config.json and the `checkpoint-N` folder layout stay; what a checkpoint-N holds is zerocore's (DeepSpeed's
own optimizer files cannot be read: a run moved from DeepSpeed starts from its saved model weights).

[Note: one-line switch]
`TrainingArguments(deepspeed=...)` sets DeepSpeed up while it is constructed (its `__post_init__` builds
`HfTrainerDeepSpeedConfig`, which needs the deepspeed package, and an accelerate DeepSpeed state), before any
Trainer exists. So importing this module wraps `TrainingArguments.__post_init__` once: the `deepspeed` value is
hidden while the original runs (the devices and the process group are set up as for plain DDP, nothing imports
deepspeed) and put back afterwards, where ZeroTrainer reads it. This is the only global change this module makes;
TrainingArguments without `deepspeed` are untouched. Arguments built before the import (only possible with
deepspeed installed) carry a DeepSpeed plugin, and ZeroTrainer refuses them, saying so.

[Note: what ZeroTrainer redirects] (transformers 5.x Trainer, accelerate 1.x): Trainer behaviour -> ZeroTrainer
- `args.deepspeed` -> DeepSpeed engine: the same JSON read by zerocore's ds_config.py, its "auto"s filled as HF's
  HfTrainerDeepSpeedConfig fills them (`_hf_fills`).
- the model moved with `.to(device)`: as before, except a model already partitioned (from_pretrained below,
  ZeroInit) stays where its pieces are.
- `_wrap_model` (DataParallel) and `accelerator.prepare` (DDP, autocast, AcceleratedOptimizer): model and optimizer
  come back unchanged; zerocore does data parallelism, precision and loss scaling (`_ZeroAccelerator`).
- `create_optimizer`: ZeroOptimizer with Trainer's two groups (no weight decay for biases and norms,
  `get_decay_parameter_names`).
- `accelerator.backward(loss)`: `opt.backward(loss * k)`, see [Note: accumulation].
- `_clip_grad_norm` / `_get_grad_norm`: no clip of gradients the ranks no longer hold; the step clips the global
  norm (gradient_clipping = max_grad_norm) and the logged grad_norm is `opt.global_grad_norm`, before clipping.
- LR scheduler: the config's `scheduler` section (WarmupLR, ...) if any, else Trainer's; stepped by Trainer once per
  update and not after an fp16 overflow (`optimizer_step_was_skipped`); the ZeroOptimizer gets no scheduler, so it
  steps none.
- `_save_optimizer_and_scheduler` (optimizer.pt, scheduler.pt): `opt.save_checkpoint(checkpoint-N)`, i.e.
  `checkpoint-N/global_stepN/` + `latest` (DeepSpeed's folder layout) with the scheduler's state; rng states and
  trainer_state.json as Trainer writes them.
- resume (`_load_from_checkpoint`, `_load_optimizer_and_scheduler`), load_best_model_at_end:
  `opt.load_checkpoint(checkpoint-N)` at any world size (fp32 masters, Adam state, scheduler).
- `save_model`: safetensors + config.json that `from_pretrained` loads, gathered one unit at a time: fp32 (the
  masters), or the 16-bit weights with `stage3_gather_16bit_weights_on_model_save`.

[Note: accumulation]
Trainer divides each micro-batch's loss by the accumulation steps k (or normalizes it by the tokens of the whole
window, `num_items_in_batch`), so the gradients it sums over the window are already the window's average.
ZeroOptimizer divides the summed gradients by k as well (it averages micro-steps itself), so the loss reaches
backward multiplied by k: the gradient is then Trainer's, exactly once. ZeroOptimizer steps only after k
backward passes, so an epoch whose batches per rank are not a multiple of k (Trainer then steps after a shorter
last window) is refused when the data loader is built.

>>> # from zerocore.integrations.transformers import ZeroTrainer
>>> # args = TrainingArguments("out", deepspeed="ds_config.json", per_device_train_batch_size=4)
>>> # ZeroTrainer(model=model, args=args, train_dataset=ds).train()      # torchrun --nproc_per_node 2 train.py
"""
from __future__ import annotations

import copy
import functools
import os
import socket
import warnings
from typing import Any, Dict, Mapping, Optional, Union

import torch
import torch.distributed as dist
from accelerate import Accelerator
from transformers import Trainer, TrainingArguments

from ..zero import ZeroConfig, ZeroOptimizer
from ..zero.checkpoint import LATEST
from ..zero.ds_config import DeepSpeedSettings, load_deepspeed_json, parse_deepspeed
from ..zero.init import is_partitioned, load_partitioned

__all__ = ["ZeroTrainer", "from_pretrained"]

# The Trainer methods ZeroTrainer overrides exist as such since transformers 5.0 (4.x clipped inline in its loop).
_HOOKS = ("_build_accelerator_args", "_clip_grad_norm", "_get_grad_norm", "_wrap_model", "_move_model_to_device",
          "_save_optimizer_and_scheduler", "_load_optimizer_and_scheduler", "_load_from_checkpoint", "_save")
if any(not hasattr(Trainer, h) for h in _HOOKS):
    import transformers as _transformers
    raise ImportError(f"zerocore.integrations.transformers needs transformers 5.x; {_transformers.__version__} lacks "
                      f"Trainer.{', Trainer.'.join(h for h in _HOOKS if not hasattr(Trainer, h))}")


# --------------------------------------------------------------------------------------- TrainingArguments
def _take_deepspeed_argument() -> None:
    """See [Note: one-line switch]. Idempotent."""
    original = TrainingArguments.__post_init__
    if getattr(original, "_zerocore", False):
        return

    @functools.wraps(original)
    def __post_init__(self):
        value = self.deepspeed
        self.deepspeed = None
        try:
            original(self)
        finally:
            self.deepspeed = value          # Trainer never sees a DeepSpeed plugin; ZeroTrainer reads the value

    __post_init__._zerocore = True
    TrainingArguments.__post_init__ = __post_init__


_take_deepspeed_argument()


# ------------------------------------------------------------------------------------ "auto" resolution
def _hidden_size(model) -> Optional[int]:
    """HF's trainer_config_finalize: config.hidden_size, else max(hidden_sizes), also under text_config."""
    for conf in (getattr(model, "config", None), getattr(getattr(model, "config", None), "text_config", None)):
        if getattr(conf, "hidden_size", None) is not None:
            return int(conf.hidden_size)
        if getattr(conf, "hidden_sizes", None):
            return int(max(conf.hidden_sizes))
    return None


def _hf_fills(config: Mapping, args: TrainingArguments, model, num_training_steps: Optional[int]) -> Dict[str, Any]:
    """The values HfTrainerDeepSpeedConfig writes into a DeepSpeed config (trainer_config_process and
    trainer_config_finalize of transformers/integrations/deepspeed.py), by dotted path, for parse_deepspeed's
    `resolved`. Its fill_match keys are always given (a different value in the file is an error, as in HF);
    its fill_only keys only where the file says "auto". Scheduler step counts need num_training_steps (None:
    not known yet, left out)."""
    match = {
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "train_batch_size": args.world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps,
        "gradient_clipping": args.max_grad_norm,
        "optimizer.params.lr": args.learning_rate,
        "optimizer.params.betas": [args.adam_beta1, args.adam_beta2],
        "optimizer.params.eps": args.adam_epsilon,
        "optimizer.params.weight_decay": args.weight_decay,
        "scheduler.params.warmup_max_lr": args.learning_rate,
        "fp16.enabled": bool(args.fp16 or args.fp16_full_eval),
        "bf16.enabled": bool(args.bf16 or args.bf16_full_eval),
    }
    if num_training_steps is not None:
        match["scheduler.params.total_num_steps"] = num_training_steps
        # HF keeps it positive: deepspeed>=0.19.6 rejects 0 (and zerocore's WarmupLR does too).
        match["scheduler.params.warmup_num_steps"] = max(1, args.get_warmup_steps(num_training_steps))
    only = {"scheduler.params.warmup_min_lr": 0}
    h = _hidden_size(model)
    if h is not None:
        only["zero_optimization.reduce_bucket_size"] = h * h
        if (config.get("zero_optimization") or {}).get("stage") == 3:
            only["zero_optimization.stage3_prefetch_bucket_size"] = int(0.9 * h * h)
            only["zero_optimization.stage3_param_persistence_threshold"] = 10 * h

    def is_auto(path):
        node = config
        for key in path.split("."):
            if not isinstance(node, Mapping) or key not in node:
                return False
            node = node[key]
        return node == "auto"
    return {**match, **{p: v for p, v in only.items() if is_auto(p)}}


def _training_options(args: TrainingArguments) -> Dict[str, Any]:
    """ZeroOptimizer options that TrainingArguments set (as Trainer without DeepSpeed uses them)."""
    out = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
               weight_decay=args.weight_decay, gradient_clipping=args.max_grad_norm,
               gradient_accumulation_steps=args.gradient_accumulation_steps)
    if args.bf16 or args.fp16:
        out["dtype"] = torch.bfloat16 if args.bf16 else torch.float16
    return out


def _is_deepspeed_dict(config: Mapping) -> bool:
    """A dict of ZeroOptimizer keyword options has only ZeroConfig's field names; anything else is DeepSpeed's."""
    return any(k not in ZeroConfig.__dataclass_fields__ for k in config)


# ------------------------------------------------------------------------------------------ accelerator
class _StepWatch:
    """Watches a ZeroOptimizer's step() calls (torch's optimizer step hooks): whether the last accumulation
    window ended in an update skipped for an fp16 overflow, and its global gradient norm."""

    def __init__(self, opt: ZeroOptimizer):
        self.skipped = False
        self.norm = torch.full((), float("nan"))
        self._skips_before = 0
        self.handles = [opt.register_step_pre_hook(self._pre), opt.register_step_post_hook(self._post)]

    def pending_norm(self) -> torch.Tensor:
        """A tensor the next window's global norm is written into once its step() ran (Trainer logs it then)."""
        self.norm = torch.full((), float("nan"))
        return self.norm

    def _pre(self, opt, args, kwargs) -> None:
        self._skips_before = opt.skipped_steps

    def _post(self, opt, args, kwargs) -> None:
        if opt.micro_steps == 0:            # the window ended: updated, or skipped for an overflow
            self.skipped = opt.skipped_steps > self._skips_before
            self.norm.fill_(float("nan") if opt.global_grad_norm is None else opt.global_grad_norm)


class _ZeroAccelerator(Accelerator):
    """The Trainer's own Accelerator (created by Trainer, then given this class: ZeroTrainer.
    create_accelerator_and_postprocess) with zerocore doing what accelerate would do around the model:

    - prepare_model / prepare_optimizer register and return their argument unchanged: no DDP (zerocore reduces
      the gradients), no autocast or `.to()` (zerocore owns the dtype and the parameters' storage), no
      AcceleratedOptimizer (its construction round-trips the optimizer's state dict; its GradScaler would
      unscale gradients the ranks no longer hold). Data loaders are prepared (sharded per rank) as usual.
    - backward(loss) runs `ZeroOptimizer.backward` (fp16 loss scale) with the accumulation factor of
      [Note: accumulation].
    - optimizer_step_was_skipped says whether zerocore skipped the update (fp16 overflow), so Trainer does not
      step the LR scheduler then.
    """
    zero_watch: Optional[_StepWatch] = None

    def prepare_model(self, model, device_placement=None, evaluation_mode=False):
        if model not in self._models:
            self._models.append(model)
        return model

    def prepare_optimizer(self, optimizer, device_placement=None):
        if not isinstance(optimizer, ZeroOptimizer):
            raise TypeError(f"ZeroTrainer trains with a ZeroOptimizer, not {type(optimizer).__name__}")
        if optimizer not in self._optimizers:
            self._optimizers.append(optimizer)
        return optimizer

    def backward(self, loss, **kwargs):
        opt = next((o for o in self._optimizers if isinstance(o, ZeroOptimizer)), None)
        if opt is None:
            raise RuntimeError("ZeroTrainer: backward before the ZeroOptimizer was prepared")
        opt.backward(loss * opt.config.gradient_accumulation_steps)

    @property
    def optimizer_step_was_skipped(self) -> bool:
        return self.zero_watch is not None and self.zero_watch.skipped


# ---------------------------------------------------------------------------------------------- trainer
def _ensure_process_group(device: torch.device) -> None:
    """The process group, if nobody made it yet: torchrun's (its environment), else a group of one for a single
    process (`python train.py`), as DeepSpeed does."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


class ZeroTrainer(Trainer):
    """`transformers.Trainer` that trains with zerocore's ZeroOptimizer (ZeRO stages 1, 2, 3, offload) instead of
    DeepSpeed or DDP. Every Trainer argument keeps its meaning (see [Note: what ZeroTrainer redirects]).

    The ZeRO configuration is `args.deepspeed` (a DeepSpeed JSON path or dict, as with Trainer + DeepSpeed: its
    "auto"s are filled from TrainingArguments and the model the way HF's HfTrainerDeepSpeedConfig fills them, and a
    value that contradicts TrainingArguments is an error), else `zero_config` if it is a DeepSpeed dict or path.
    `zero_config` may instead be ZeroOptimizer keyword options (a dict such as {"stage": 3, "unit_modules":
    {"LlamaDecoderLayer"}}; with a DeepSpeed config they go on top of it) or a ZeroConfig. Learning rate, betas,
    eps, weight decay, clipping (max_grad_norm), accumulation steps and bf16/fp16 are TrainingArguments' unless a
    DeepSpeed config sets them (a keyword option that says otherwise is an error). Without any: stage 2.

    Optimizer: zerocore's AdamW (the config's `optimizer` section, else TrainingArguments: `optim` must be an AdamW
    or Adam variant) with no weight decay for biases and norm weights. Clipping: the global norm over all ranks
    at max_grad_norm (a DeepSpeed config's gradient_clipping, "auto" or equal to it; absent: max_grad_norm);
    the logged grad_norm is the norm before clipping, `opt.global_grad_norm`. Evaluation and prediction work at
    every stage (stage 3 gathers each unit for its module). Launch with torchrun (one process per GPU); a single
    process trains as a group of one.

    >>> # args = TrainingArguments("out", deepspeed="ds_config.json", per_device_train_batch_size=4,
    >>> #                          gradient_accumulation_steps=2, max_grad_norm=1.0, save_steps=100)
    >>> # trainer = ZeroTrainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    >>> # trainer.train(); trainer.evaluate(); trainer.save_model("out/final")   # every rank calls these
    >>> # trainer.train(resume_from_checkpoint="out/checkpoint-100")            # at any world size
    """

    def __init__(self, model=None, args: Optional[TrainingArguments] = None, *more,
                 zero_config: Union[None, str, os.PathLike, Mapping, ZeroConfig] = None, **kwargs):
        if args is not None and getattr(args, "deepspeed_plugin", None) is not None:
            raise ValueError("ZeroTrainer: these TrainingArguments were built for DeepSpeed (they carry an accelerate "
                             "DeepSpeedPlugin): import zerocore.integrations.transformers before constructing "
                             "TrainingArguments, and do not launch with `accelerate launch --use_deepspeed`")
        # The DeepSpeed JSON (read once; a copy, so the caller's dict stays as it was), and engine keyword options
        # or a ZeroConfig.
        ds = args.deepspeed if args is not None and args.deepspeed else None
        self._ds_config: Optional[dict] = None
        self._zero_options: Union[None, dict, ZeroConfig] = None
        if isinstance(zero_config, ZeroConfig) or (isinstance(zero_config, Mapping) and
                                                   not _is_deepspeed_dict(zero_config)):
            self._zero_options = zero_config if isinstance(zero_config, ZeroConfig) else dict(zero_config)
        elif zero_config is not None:
            if ds is not None:
                raise ValueError("ZeroTrainer: two DeepSpeed configs, TrainingArguments(deepspeed=...) and "
                                 "zero_config=...: give one")
            ds = zero_config
        if ds is not None:
            self._ds_config = copy.deepcopy(dict(ds)) if isinstance(ds, Mapping) else load_deepspeed_json(ds)
            if isinstance(self._zero_options, ZeroConfig):
                raise ValueError("ZeroTrainer: with a DeepSpeed config, zero_config may only add ZeroOptimizer "
                                 "keyword options (a dict, e.g. {'unit_modules': {'LlamaDecoderLayer'}}), not a "
                                 "ZeroConfig")
        self._zero_settings: Optional[DeepSpeedSettings] = None
        self._zero_watch: Optional[_StepWatch] = None
        super().__init__(model, args, *more, **kwargs)
        if self.args.auto_find_batch_size:
            raise ValueError("ZeroTrainer does not support auto_find_batch_size: the engine's units and shards are "
                             "built once; set per_device_train_batch_size")
        if self.optimizer is not None and not isinstance(self.optimizer, ZeroOptimizer):
            raise TypeError(f"ZeroTrainer trains with a ZeroOptimizer; optimizers= gave a "
                            f"{type(self.optimizer).__name__} (leave it out and ZeroTrainer builds one)")
        _ensure_process_group(self.args.device)

    # ------------------------------------------------------------------------------------- accelerator
    def _build_accelerator_args(self, **kwargs) -> dict:
        # zerocore casts the model (config fp16/bf16 -> ZeroOptimizer dtype) and scales fp16 losses itself.
        return dict(super()._build_accelerator_args(**kwargs), mixed_precision="no")

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        self.accelerator.__class__ = _ZeroAccelerator       # same object and state; see _ZeroAccelerator

    def _wrap_model(self, model, training=True, dataloader=None):
        return model                                         # no DataParallel / DDP: zerocore is data parallel

    def _move_model_to_device(self, model, device) -> None:
        # A partitioned model's pieces already live where they will be used; `.to()` would copy placeholders.
        if not any(is_partitioned(p) for p in model.parameters()):
            super()._move_model_to_device(model, device)

    # ------------------------------------------------------------------------------------- optimizer
    def _engine_config(self) -> Union[ZeroConfig, DeepSpeedSettings]:
        """ZeroOptimizer's config: the DeepSpeed JSON without its scheduler (built in create_scheduler, stepped
        by Trainer), or keyword options / a ZeroConfig with TrainingArguments' training hyperparameters."""
        if self._ds_config is not None:
            config = {k: v for k, v in self._ds_config.items() if k != "scheduler"}
            self._zero_settings = self._parse_deepspeed(config, None)
            return self._zero_settings
        self._check_optim()
        from_args = _training_options(self.args)
        if isinstance(self._zero_options, ZeroConfig):
            return ZeroConfig.from_kwargs(self._zero_options, **from_args)
        return ZeroConfig.from_kwargs(**{**self._keyword_options(), **from_args})

    def _keyword_options(self) -> dict:
        """zero_config's keyword options; training hyperparameters among them must agree with TrainingArguments."""
        options = dict(self._zero_options) if isinstance(self._zero_options, Mapping) else {}
        from_args = _training_options(self.args)
        clash = [f"{k}={options[k]!r} (TrainingArguments: {v!r})" for k, v in from_args.items()
                 if k in options and ZeroConfig.from_kwargs(**{k: options[k]}) != ZeroConfig.from_kwargs(**{k: v})]
        clash += [f"{k}={options[k]!r}" for k in ("dtype",) if k in options and self._ds_config is not None]
        if clash:
            raise ValueError("ZeroTrainer: zero_config sets training hyperparameters that TrainingArguments (or the "
                             "DeepSpeed config) set differently: " + ", ".join(clash) + "; set them there")
        return options

    def _parse_deepspeed(self, config: dict, num_training_steps: Optional[int]) -> DeepSpeedSettings:
        """The DeepSpeed config with HF's "auto" fills; what it leaves out is the Trainer's, as with Trainer +
        DeepSpeed: without an `optimizer` section Trainer's AdamW hyperparameters (optim must be Adam/AdamW), without
        gradient_clipping max_grad_norm, without accumulation steps Trainer's, without fp16/bf16 sections
        TrainingArguments' bf16/fp16. zero_config's keyword options (unit_modules, ...) go on top."""
        args, defaults = self.args, {}
        from_args = _training_options(args)
        if "optimizer" not in config:
            self._check_optim()
            defaults.update({k: from_args[k] for k in ("lr", "betas", "eps", "weight_decay")})
        for key in ("gradient_clipping", "gradient_accumulation_steps"):
            if key not in config:
                defaults[key] = from_args[key]
        if not {"fp16", "bf16", "bfloat16"} & set(config) and "dtype" in from_args:
            defaults["dtype"] = from_args["dtype"]
        return parse_deepspeed(config, world_size=args.world_size, model=self.model,
                               resolved=_hf_fills(config, args, self.model, num_training_steps),
                               options={**defaults, **self._keyword_options()})

    def _check_optim(self) -> None:
        optim = str(getattr(self.args.optim, "value", self.args.optim))
        if not optim.startswith("adam"):
            raise ValueError(f"ZeroTrainer runs zerocore's Adam/AdamW; TrainingArguments(optim={optim!r}) asks for "
                             "another optimizer (use optim='adamw_torch', or an `optimizer` section in the ZeRO "
                             "config)")

    def create_optimizer(self, model=None):
        """ZeroOptimizer over self.model with Trainer's parameter groups (weight decay off where
        get_decay_parameter_names says so)."""
        if self.optimizer is None:
            model = self.model
            decay = set(self.get_decay_parameter_names(model))
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            groups = [{"params": [n for n in names if n in decay]},
                      {"params": [n for n in names if n not in decay], "weight_decay": 0.0}]
            self.optimizer = ZeroOptimizer(model, param_groups=[g for g in groups if g["params"]],
                                           config=self._engine_config())
        if self.optimizer.config.gradient_accumulation_steps != self.args.gradient_accumulation_steps:
            raise ValueError(f"ZeroTrainer: the ZeroOptimizer accumulates "
                             f"{self.optimizer.config.gradient_accumulation_steps} micro-steps, TrainingArguments "
                             f"{self.args.gradient_accumulation_steps}: they must be equal")
        if self._zero_watch is None:
            self._zero_watch = _StepWatch(self.optimizer)
            self.accelerator.zero_watch = self._zero_watch
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The DeepSpeed config's scheduler section (its "auto" step counts from num_training_steps), else
        Trainer's (lr_scheduler_type, warmup). Trainer steps it after each update."""
        if self.lr_scheduler is None and self._ds_config is not None and self._ds_config.get("scheduler") is not None:
            with warnings.catch_warnings():            # the config's warnings were given by _engine_config
                warnings.simplefilter("ignore")
                settings = self._parse_deepspeed(self._ds_config, num_training_steps)
            self.lr_scheduler = settings.build_lr_scheduler(optimizer or self.optimizer)
            self._created_lr_scheduler = True
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    def _clip_grad_norm(self, model):
        return None            # the step clips the global norm (gradient_clipping); gradients live in shards

    def _get_grad_norm(self, model, grad_norm=None):
        return self._zero_watch.pending_norm()     # filled with opt.global_grad_norm once the step ran

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        k, args = self.args.gradient_accumulation_steps, self.args
        n = len(loader) if hasattr(loader, "__len__") else None
        if n is not None and n % k and (args.max_steps <= 0 or args.max_steps > n // k):
            raise ValueError(f"ZeroTrainer: an epoch has {n} batches per rank, not a multiple of "
                             f"gradient_accumulation_steps={k}: Trainer would step after a shorter last window, "
                             "which ZeroOptimizer does not (it steps after exactly k backward passes). Make the "
                             "dataset size a multiple of per_device_train_batch_size x world size x k, or set "
                             "dataloader_drop_last / max_steps accordingly")
        return loader

    def evaluation_loop(self, *args, **kwargs):
        # A partitioned model (from_pretrained, ZeroInit) is only whole through its engine: build it first, as
        # Trainer builds DeepSpeed's for evaluation without training.
        if self.optimizer is None and any(is_partitioned(p) for p in self.model.parameters()):
            self.create_optimizer()
        return super().evaluation_loop(*args, **kwargs)

    # ------------------------------------------------------------------------------------ checkpoints
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # Instead of optimizer.pt / scheduler.pt: every rank writes its shards (and the scheduler's state) into
        # checkpoint-N/global_stepN (DeepSpeed's folder layout); loadable at any world size.
        self.optimizer.save_checkpoint(output_dir, tag=f"global_step{self.state.global_step}",
                                       lr_scheduler=self.lr_scheduler)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        if checkpoint is None:
            return
        if not os.path.isfile(os.path.join(checkpoint, LATEST)):
            raise FileNotFoundError(f"ZeroTrainer: {checkpoint} holds no zerocore checkpoint (no '{LATEST}' file): "
                                    "resume from a checkpoint-N folder ZeroTrainer saved (with save_only_model=False)")
        self.optimizer.load_checkpoint(checkpoint, lr_scheduler=self.lr_scheduler)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if os.path.isfile(os.path.join(resume_from_checkpoint, LATEST)):
            return      # the weights come back with the optimizer state (fp32 masters): _load_optimizer_and_scheduler
        if self.optimizer is not None or any(is_partitioned(p) for p in self.model.parameters()):
            raise FileNotFoundError(f"ZeroTrainer: {resume_from_checkpoint} holds no zerocore checkpoint: only the "
                                    "model's files, which cannot be loaded into a model zerocore already holds")
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        self.optimizer.load_checkpoint(self.state.best_model_checkpoint, lr_scheduler=self.lr_scheduler)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Write the model where `from_pretrained` loads it: safetensors (gathered one unit at a time on rank 0) and
        config.json, fp32, or the 16-bit training weights when the DeepSpeed config's
        stage3_gather_16bit_weights_on_model_save is true. config.json keeps the training dtype, so
        from_pretrained's default (dtype "auto") loads in that dtype and dtype=torch.float32 gives the fp32 weights.
        Every rank must call it (Trainer does); it returns once the files are written."""
        if self.optimizer is None:
            if not any(is_partitioned(p) for p in self.model.parameters()):
                return super().save_model(output_dir, _internal_call)
            self.create_optimizer()
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self._save(output_dir, state_dict=self._full_state_dict())   # Trainer's: rank 0 writes
        self.accelerator.wait_for_everyone()     # every rank returns once the files are there
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _full_state_dict(self) -> dict:
        """The model's state dict on rank 0 ({} elsewhere), gathered one unit at a time: the parameters as
        trained with gather_16bit_weights_on_model_save, else fp32 (the masters of mixed-precision training)."""
        sixteen = self._zero_settings is not None and self._zero_settings.gather_16bit_weights_on_model_save
        return self.optimizer.full_state_dict(master_weights=not sixteen)


# ---------------------------------------------------------------------------------------------- loading
def _weight_files(folder: str):
    """The safetensors files of a save_pretrained folder: those its index names, else model.safetensors."""
    import json
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(folder, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"zerocore from_pretrained: {folder} has neither model.safetensors nor "
                            "model.safetensors.index.json (only safetensors weights are read)")


def from_pretrained(model_class, pretrained_model_name_or_path: Union[str, os.PathLike], *, config=None,
                    dtype: Union[None, str, torch.dtype] = None, device: Union[None, str, torch.device] = None,
                    **config_kwargs):
    """`model_class.from_pretrained(path)` for ZeRO stage 3 without any rank holding the whole model: the model
    is built with its parameters on the meta device (accelerate's init_empty_weights: no memory, no random
    init; buffers are real) and every rank reads only its 1/N range of each weight from the safetensors files
    (`zerocore.load_partitioned`; sharded checkpoints with model.safetensors.index.json too). ZeroOptimizer (or
    ZeroTrainer) then assembles its units from the pieces. Every rank calls it, inside the process group.

    model_class: an Auto class (AutoModelForCausalLM) or a model class. path: a local folder written by
    save_pretrained (or a Hub id, fetched with huggingface_hub). config / config_kwargs: as from_pretrained's;
    dtype: the parameters' dtype (default: the config's dtype, else float32; "auto" = the config's);
    device: where the pieces live (default: this rank's GPU, LOCAL_RANK, else the CPU). The model is in eval
    mode, as from_pretrained leaves it. Without a process group it starts torchrun's (or, in a single process,
    a group of one).

    >>> # model = from_pretrained(AutoModelForCausalLM, "out/final")          # every rank
    >>> # ZeroTrainer(model=model, args=TrainingArguments(..., deepspeed=ds_config)).train()
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    path = os.fspath(pretrained_model_name_or_path)
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download
        path = snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])
    if config is None:
        config = AutoConfig.from_pretrained(path, **config_kwargs)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None)
    kw = {} if dtype is None else {"dtype": getattr(torch, dtype) if isinstance(dtype, str) else dtype}
    with init_empty_weights():          # parameters on meta, buffers (rotary tables, ...) computed for real
        build = getattr(model_class, "from_config", None) or model_class._from_config
        model = build(config, **kw)
    model.tie_weights()                 # init_empty_weights re-registers parameters, which undoes the ties
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device() if torch.cuda.is_available() else 0))
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    _ensure_process_group(device)
    load_partitioned(model, _weight_files(path), device=device)
    model.eval()
    return model
