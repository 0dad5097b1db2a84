"""Defaults shared by every run config; each field is documented in docs/config.md.

Configs import this and override what differs. Every field can be set from
the command line: `--config.train.lr=3e-4 --config.sample.group_size=8`.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

# The built-in world's shipped files: generator, reward model, prompt sets.
ASSETS = Path(__file__).resolve().parents[1] / "world" / "assets"


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.plugins = ()  # extra modules to import (they register models / rewards)

    c.model = dict(
        name="tiny_unet",
        init="random",
        prediction_type="flow",
        dtype="float32",
        resolution=32,
        channels=(32, 64, 64),
        attn_levels=(1, 2),
        heads=4,
        vocab_size=4096,
        max_length=24,
        text_width=64,
        text_depth=2,
        patch=1,  # built-in model: > 1 runs the UNet on patch x patch pixel patches
        # Built-in model: rank > 0 trains LoRA factors on every attention
        # projection (targets: regexes, default all) over a frozen UNet.
        lora=dict(rank=0, alpha=0.0, targets=()),
        scheduler=ml_collections.config_dict.placeholder(dict),
        # Attention kernel: auto | xla | blocked | cudnn (GPU) | splash (TPU); models/attention.py.
        attention="auto",
        # Rematerialisation of scanned DiT blocks: none | full | dots | names.
        remat="none",
        # Flow DiTs: T5 tokens per prompt (0: the pipeline's), a
        # launch/embed_prompts.py file read instead of the text encoders (""
        # runs them), and FLUX.1-dev's embedded guidance (not CFG).
        max_sequence_length=0,
        text_cache="",
        guidance=3.5,
        # SD3: CLIP layers skipped from the end (unset: the penultimate layer's states).
        clip_skip=ml_collections.config_dict.placeholder(int),
        # Wan: frames per video (1 + 4k; 81 is WanPipeline's) and videos the VAE
        # decodes at a time (0: the whole batch at once).
        num_frames=81,
        vae_batch_chunk=0,
    )
    # on_too_long: prompts with more tokens than model.max_length are cut;
    # "warn" says how many once, "error" refuses them.
    c.prompts = dict(path="", on_too_long="warn")

    c.sample = dict(
        kind="flow",
        num_steps=10,
        guidance_scale=1.0,
        negative_prompt="",
        eta=1.0,  # DDIM
        # Flow sampler: noise flow_grpo | dance | cps | ode, its level, and the
        # noise levels: "shifted_linear" (linspace(1, 0), then SD3's time shift;
        # FluxPipeline's) or "diffusers" (the scheduler's own, SD3's pipeline);
        # dynamic_shift: FLUX's resolution-dependent shift in place of `shift`.
        noise="flow_grpo",
        noise_level=0.7,
        shift=1.0,
        sigmas="shifted_linear",
        dynamic_shift=False,
        # Steps (start, stop) that draw noise; () = every step. The others are
        # deterministic Euler (ODE) steps, which training may not draw
        # (Flow-GRPO-Fast, MixGRPO).
        sde_window=(),
        # The G samples of a group start from one initial noise (DanceGRPO's
        # shared initial noise): rewards then differ by the step noise only.
        shared_initial_noise=False,
        group_size=8,
        prompts_per_epoch=8,
        batch_size=32,
    )
    c.rewards = ml_collections.ConfigDict()
    # BPGO's forms (bpgo_jax/advantages/forms.py): a preset, "paper" (Eq. 2-4)
    # or "released" (the authors' code), or "custom"; a form field left ""
    # takes the preset's value. alpha, k, lam, crt_coef are Eq. 2-4's; the
    # released forms have their own blocks (bayes, sign_std, binary).
    c.advantage = dict(
        method="bpgo",
        preset="paper",
        ras="",  # paper | bayes | sign_std | none
        crt="",  # paper | binary | none
        crt_mode="",  # auxiliary | replace | append
        ras_on="",  # raw | transformed
        std="group",
        eps=1e-8,
        clip=5.0,
        alpha=0.5,
        k=1.0,
        lam=1.0,
        crt_coef=0.5,
        max_exp=30.0,
        ras_clamp=(0.01, 10.0),
        bayes=dict(alpha=1.0, prior_var=1.0, range=(0.5, 1.5)),
        sign_std=dict(alpha=1.0, magnitude="std", value=0.0),  # magnitude: std | fixed | random
        binary=dict(a=50.0, tau=5.0),
        tracker=dict(buffer_size=32, min_count=16),
    )
    c.prior = dict(
        kind="moving_average",
        decay=0.9,
        init_value=0.5,
        clip=ml_collections.config_dict.placeholder(tuple),
    )
    c.train = dict(
        num_epochs=10,
        inner_epochs=1,
        batch_size=32,
        micro_batch_size=16,
        timestep_fraction=1.0,
        # Steps [start, stop) that training draws from; () = every step. The
        # early, high-noise steps decide composition (docs/status_history.md).
        timestep_window=(),
        clip_range=1e-4,
        kl_beta=0.0,
        # The KL's denominator: "gaussian" (the transition variance std_t^2 |dt|,
        # the exact KL of the two steps) or "flow_grpo" (std_t^2, as Flow-GRPO).
        kl_form="gaussian",
        ema_decay=0.0,
        lr=1e-4,
        warmup_updates=0,  # linear lr ramp over the first N optimizer updates
        b1=0.9,
        b2=0.999,
        adam_eps=1e-8,
        weight_decay=1e-4,
        max_grad_norm=1.0,
        max_consecutive_skips=3,
        # Gradient accumulation loop: "scan" (one jitted update), "host" (a
        # jitted per-item gradient called from Python; much faster on XLA:CPU),
        # or "auto" (host on CPU, scan elsewhere).
        accumulate="auto",
    )
    # extra_prompts: NAME -> prompt file, evaluated like prompts_path; metrics get "_NAME".
    c.eval = dict(
        rewards=ml_collections.ConfigDict(),
        prompts_path="",
        extra_prompts=ml_collections.ConfigDict(),
        num_prompts=64,
        every=5,
        use_ema=True,
        # Flow sampler noise of evaluations; "" = the rollout's. "ode" reads the
        # policy's mean behaviour (deterministic given the initial noise).
        noise="",
    )
    # num_devices=0 uses every device; N uses the first N (debugging, tests).
    # gather_params: all-gather params before each network call (exact on-policy
    # ratios under fsdp); False keeps them sharded for models too large for one
    # device, at the price of ~1e-6 ratio noise.
    c.mesh = dict(
        shape=(-1, 1),
        axes=("data", "fsdp"),
        rules=((".*", "fsdp_auto"),),
        num_devices=0,
        gather_params=True,
    )
    c.checkpoint = dict(every=1, keep=3, use_async=True)
    # progress: tqdm bars for epochs, rollouts and evaluations (process 0 only).
    # wandb: Weights & Biases gets the same scalars and image grids (mode:
    # "online", "offline" = written under WORKDIR/wandb for `wandb sync`).
    c.log = dict(
        tensorboard=True,
        image_every=5,
        num_images=8,
        progress=True,
        wandb=dict(enabled=False, project="bpgo-jax", entity="", run_name="", mode="online"),
    )
    c.distributed = dict(initialize=False, coordinator_address="", num_processes=0, process_id=-1)
    return c
