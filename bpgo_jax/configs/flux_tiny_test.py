"""A CPU-sized FLUX run: configs/flux_hps.py shrunk, with the saturation reward.

    python launch/train.py --config=configs/flux_tiny_test.py --workdir=/tmp/flux_tiny \
        --config.model.init=/path/to/tiny-flux-folder

Used by tests/test_dit_train.py on a tiny random FluxPipeline folder
(tests/flux_folders.py) to train end to end on a data x fsdp mesh (load,
sample, score, update, checkpoint) in seconds; also a smoke test of a FLUX
folder through the launcher before a long run. Everything
except sizes, float32 and the reward (the file-free `saturation`, so no
reward model is loaded) is flux_hps's.
"""

import ml_collections

from bpgo_jax.configs.flux_hps import flux_config


def get_config() -> ml_collections.ConfigDict:
    c = flux_config()
    c.model.update(dtype="float32", resolution=(32, 32), max_sequence_length=8)
    c.sample.update(num_steps=2, group_size=2, prompts_per_epoch=4, batch_size=8)
    c.train.update(num_epochs=2, batch_size=8, micro_batch_size=8, lr=1e-3)
    c.rewards = dict(saturation=dict(weight=1.0))
    c.prior.init_value = 0.0
    c.eval.update(prompts_path="")  # no held-out evaluation
    c.mesh.shape = (2, 4)  # data 2 x fsdp 4: sharded kernels and a split batch
    c.checkpoint.update(every=1, keep=2)
    c.log.update(image_every=1, num_images=2)
    return c
