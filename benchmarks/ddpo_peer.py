"""The PyTorch peer of benchmarks/vs_pytorch.py: DDPO's RL epoch, eagerly, in PyTorch.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/ddpo_peer.py --folder=SD_FOLDER --epochs=3

Follows ddpo-pytorch's published algorithm (Black et al., `ddpo_pytorch/
diffusers_patch/ddim_with_logprob.py` and `scripts/train.py`): DDIM sampling
with eta that keeps every step's latents and Gaussian log-probability, the
JPEG reward, per-prompt normalised advantages clipped to +-5, then one inner
epoch over shuffled samples, each sample's timesteps shuffled, a forward and
backward of the UNet per (micro-batch, timestep) with the PPO-clipped loss,
gradients accumulated over all of them, global-norm clipping and one AdamW
step. The diffusers UNet, VAE and CLIP text encoder of `--folder` are the
models; PyTorch runs eagerly on the CPU with `--threads` threads.

Prints one JSON line: per-epoch rollout / update seconds, set-up seconds and
the UNet calls and rows of each stage (from a forward hook), so the caller can
check both sides did the same work.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from absl import app, flags
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from bpgo_jax.rewards.jpeg import jpeg_kilobytes

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined when it runs: tests import this module for
    `ddim_step_with_logprob`, and module-level flags would join their process's."""
    flags.DEFINE_string("folder", None, "diffusers SD folder.", required=True)
    flags.DEFINE_string("prompts", None, "Text file, one prompt per line.", required=True)
    flags.DEFINE_integer("epochs", 3, "RL epochs to run.")
    flags.DEFINE_integer("threads", 2, "torch.set_num_threads.")
    flags.DEFINE_integer("num_steps", 10, "DDIM steps (all trained).")
    flags.DEFINE_float("eta", 1.0, "DDIM eta.")
    flags.DEFINE_integer("prompts_per_epoch", 4, "Prompts per epoch.")
    flags.DEFINE_integer("group_size", 4, "Samples per prompt.")
    flags.DEFINE_integer("batch_size", 8, "Rows per UNet call in the rollout.")
    flags.DEFINE_integer("micro_batch_size", 8, "Rows per UNet call in the update.")
    flags.DEFINE_float("lr", 1e-5, "AdamW learning rate.")
    flags.DEFINE_float("weight_decay", 1e-4, "AdamW weight decay.")
    flags.DEFINE_float("clip_range", 1e-4, "PPO ratio clip.")
    flags.DEFINE_float("adv_clip", 5.0, "Advantage clip.")
    flags.DEFINE_float("max_grad_norm", 1.0, "Global gradient-norm clip.")
    flags.DEFINE_integer("seed", 0, "Seed of noise, shuffles and prompts.")


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    eps: torch.Tensor,
    timestep: torch.Tensor,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step from epsilon `eps` at per-row `timestep`: the next latents (drawn
    unless `prev_sample` is given) and their log-probability, a mean over non-batch dims."""
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev_t = timestep - stride
    alphas = scheduler.alphas_cumprod.to(sample.device)
    a_t = alphas.gather(0, timestep.long())
    a_prev = torch.where(prev_t >= 0, alphas.gather(0, prev_t.clamp(min=0).long()), alphas[0])
    a_t, a_prev = (x.view(-1, 1, 1, 1).to(sample.dtype) for x in (a_t, a_prev))
    b_t, b_prev = 1 - a_t, 1 - a_prev
    x0 = (sample - b_t.sqrt() * eps) / a_t.sqrt()
    variance = (b_prev / b_t) * (1 - a_t / a_prev)
    std = eta * variance.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    if prev_sample is None:
        noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype)
        prev_sample = mean + std * noise
    log_prob = (
        -((prev_sample.detach() - mean) ** 2) / (2 * std**2)
        - torch.log(std)
        - math.log(math.sqrt(2 * math.pi))
    )
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


class CallCounter:
    """UNet calls and rows, counted by a forward pre-hook, per stage."""

    def __init__(self, unet: torch.nn.Module):
        self.stage, self.counts = "rollout", {}
        unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        del module
        calls, rows = self.counts.get(self.stage, (0, 0))
        self.counts[self.stage] = (calls + 1, rows + args[0].shape[0])


def main(argv: list[str]) -> None:
    del argv
    torch.set_num_threads(FLAGS.threads)
    torch.manual_seed(FLAGS.seed)
    t0 = time.perf_counter()
    folder = FLAGS.folder
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(FLAGS.num_steps)
    for module in (text_encoder, vae):
        module.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=FLAGS.lr, betas=(0.9, 0.999), weight_decay=FLAGS.weight_decay,
        eps=1e-8,
    )  # fmt: skip
    counter = CallCounter(unet)
    prompts = [p.strip() for p in Path(FLAGS.prompts).read_text().splitlines() if p.strip()]
    rng = np.random.default_rng(FLAGS.seed)
    gen = torch.Generator().manual_seed(FLAGS.seed)
    setup_s = time.perf_counter() - t0

    n, g, steps = FLAGS.prompts_per_epoch, FLAGS.group_size, FLAGS.num_steps
    latent = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    epochs = []
    for _ in range(FLAGS.epochs):
        counter.counts = {}
        t0 = time.perf_counter()
        counter.stage = "rollout"
        chosen = [prompts[i] for i in rng.choice(len(prompts), n, replace=False)]
        rows = [p for p in chosen for _ in range(g)]
        samples = []
        unet.eval()
        with torch.no_grad():
            for start in range(0, len(rows), FLAGS.batch_size):
                batch = rows[start : start + FLAGS.batch_size]
                ids = tokenizer(
                    batch, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt",
                ).input_ids  # fmt: skip
                cond = text_encoder(ids)[0]
                x = torch.randn((len(batch), *latent), generator=gen)
                latents, log_probs, ts = [x], [], []
                for t in scheduler.timesteps:
                    t_rows = torch.full((len(batch),), int(t), dtype=torch.long)
                    eps = unet(x, t_rows, cond).sample
                    x, log_prob = ddim_step_with_logprob(scheduler, eps, t_rows, x, FLAGS.eta,
                                                         generator=gen)  # fmt: skip
                    latents.append(x)
                    log_probs.append(log_prob)
                    ts.append(t_rows)
                images = vae.decode(x / vae.config.scaling_factor).sample
                images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
                samples.append(
                    dict(
                        cond=cond,
                        latents=torch.stack(latents[:-1], 1),
                        next_latents=torch.stack(latents[1:], 1),
                        log_probs=torch.stack(log_probs, 1),
                        timesteps=torch.stack(ts, 1),
                        rewards=torch.from_numpy(-jpeg_kilobytes(images, 95)),
                    )
                )
        batch = {k: torch.cat([s[k] for s in samples]) for k in samples[0]}
        rollout_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        counter.stage = "update"
        r = batch["rewards"].view(n, g)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-8)).view(-1)
        adv = adv.clamp(-FLAGS.adv_clip, FLAGS.adv_clip)
        total = len(rows)
        perm = torch.from_numpy(rng.permutation(total))
        # Each sample's timesteps in its own random order (ddpo-pytorch's shuffle).
        order = torch.stack([torch.from_numpy(rng.permutation(steps)) for _ in range(total)])
        shuffled = {k: v[perm] for k, v in batch.items()}
        for k in ("latents", "next_latents", "log_probs", "timesteps"):
            v = shuffled[k]
            index = order.view(total, steps, *([1] * (v.ndim - 2))).expand_as(v)
            shuffled[k] = v.gather(1, index)
        adv = adv[perm]
        unet.train()
        accumulated = (total // FLAGS.micro_batch_size) * steps
        for start in range(0, total, FLAGS.micro_batch_size):
            mb = {k: v[start : start + FLAGS.micro_batch_size] for k, v in shuffled.items()}
            mb_adv = adv[start : start + FLAGS.micro_batch_size]
            for j in range(steps):
                t = mb["timesteps"][:, j]
                eps = unet(mb["latents"][:, j], t, mb["cond"]).sample
                _, log_prob = ddim_step_with_logprob(
                    scheduler, eps, t, mb["latents"][:, j], FLAGS.eta,
                    prev_sample=mb["next_latents"][:, j],
                )  # fmt: skip
                ratio = torch.exp(log_prob - mb["log_probs"][:, j])
                clipped = torch.clamp(ratio, 1 - FLAGS.clip_range, 1 + FLAGS.clip_range)
                loss = torch.maximum(-mb_adv * ratio, -mb_adv * clipped).mean()
                (loss / accumulated).backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), FLAGS.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_s = time.perf_counter() - t0
        counts = {k: {"calls": c, "rows": m} for k, (c, m) in counter.counts.items()}
        epochs.append(
            {
                "rollout_seconds": rollout_s,
                "train_seconds": update_s,
                "reward_mean": float(batch["rewards"].mean()),
                "unet": counts,
            }
        )
    timesteps = [int(t) for t in scheduler.timesteps]
    print(json.dumps({"setup_seconds": setup_s, "timesteps": timesteps, "epochs": epochs}))


if __name__ == "__main__":
    define_flags()
    app.run(main)
