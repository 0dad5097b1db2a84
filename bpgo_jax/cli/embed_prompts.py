"""Writes a prompt file's text embeddings, so a FLUX / SD3 / Wan run can skip its text encoders.

    python launch/embed_prompts.py --config=configs/flux_hps.py \
        --config.model.init=/path/to/FLUX.1-dev \
        --prompts=prompts.txt --out=prompts.flux-dev.safetensors

Runs the config's text stack (`config.model.name`: flux, sd3 or wan; the
encoders and tokenizers of the diffusers folder `config.model.init`; T5
length `config.model.max_sequence_length`, default the pipeline's: flux 512
(use 256 for schnell), sd3 256, wan 512; compute dtype `config.model.dtype`)
over every distinct prompt of the --prompts files (default: the config's
`prompts.path`, `eval.prompts_path` and `eval.extra_prompts`, so one file
serves a run) and its `sample.negative_prompt`, --batch_size prompts at a
time, and writes one safetensors file (layout:
`bpgo_jax/models/text_cache.py`). Point
`config.model.text_cache` at it; a run whose encoders or length differ from
the file's is refused. Weights are placed tensor by tensor on the config's
mesh rules (`config.mesh`) as they are read, so a T5-XXL is never held twice,
and sharded over the devices when the mesh has an fsdp axis.
"""

from absl import flags
from ml_collections import config_flags

from bpgo_jax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=False)
_PROMPTS = flags.DEFINE_multi_string(
    "prompts", [], "A .txt / .jsonl prompt file (repeatable; default: the config's files)."
)
_OUT = flags.DEFINE_string("out", None, "The .safetensors cache file to write.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Prompts per encoder call.", lower_bound=1)
_DTYPE = flags.DEFINE_enum(
    "dtype", "", ["", "float32", "bfloat16"], "Stored dtype ('' = config.model.dtype)."
)
_CACHE = runtime.define_compile_cache_flag()
_CPU_DEVICES = runtime.define_cpu_devices_flag()
flags.adopt_module_key_flags(runtime)  # list them in --help
flags.mark_flags_as_required(["config", "out"])


def main(argv):
    del argv
    runtime.start(_CPU_DEVICES.value, _CACHE.value)
    import jax

    from bpgo_jax.errors import ConfigError, UserError
    from bpgo_jax.models import text_cache, text_stacks
    from bpgo_jax.parallel import mesh as mesh_lib
    from bpgo_jax.parallel.host import to_host
    from bpgo_jax.prompts import load_prompts

    config = _CONFIG.value
    out = _OUT.value
    if not out.endswith(".safetensors"):
        raise UserError(f"--out={out} must end in .safetensors")
    paths = _PROMPTS.value or config_prompt_files(config)
    if not paths:
        raise UserError("give --prompts (the config names no prompt file)")
    model = config.model
    identity = text_cache.identity_from_config(model)
    compute = model.get("dtype", "float32")
    dtype = text_cache.jnp_dtype(compute)
    stored = text_cache.storage_dtype(_DTYPE.value or compute)
    prompts = list(dict.fromkeys(p for path in paths for p in load_prompts(path).prompts))
    negative = config.sample.get("negative_prompt", None)
    if negative is not None and negative not in prompts:
        prompts.append(negative)

    try:
        mesh = mesh_lib.make_mesh(config.mesh.shape, config.mesh.axes)
    except ValueError as err:
        raise ConfigError(f"mesh: {err}") from None
    rules = tuple(tuple(r) for r in config.mesh.rules)
    stack, params = text_stacks.load_text_stack(
        identity["kind"],
        model.init,
        max_sequence_length=identity["max_sequence_length"],
        dtype=dtype,
        sharding_fn=mesh_lib.param_sharding_fn(mesh, rules),
        variant=model.get("variant", None),
        clip_skip=identity["clip_skip"],
    )
    shards = mesh_lib.num_batch_shards(mesh)
    batch = -(-_BATCH.value // shards) * shards  # every call the same shape: one compile
    encode = jax.jit(mesh_lib.on_mesh(stack.encode, mesh), out_shardings=mesh_lib.replicated(mesh))
    fields = {k: (v.shape, stored) for k, v in stack.output_shapes(params).items()}

    def batches():
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            padded = chunk + [chunk[-1]] * (batch - len(chunk))
            tokens = jax.device_put(stack.tokenizer(padded), mesh_lib.batch_sharding(mesh))
            cond = encode(params, tokens)
            yield {k: v[: len(chunk)] for k, v in to_host(cond).items()}

    text_cache.write_cache(
        out, prompts, batches(), fields=fields, identity=identity, compute_dtype=compute
    )
    shapes = ", ".join(f"{k} {list(v[0])}" for k, v in sorted(fields.items()))
    print(f"wrote embeddings of {len(prompts)} prompts ({shapes}, {stored.name}) to {out}")


def config_prompt_files(config) -> list[str]:
    """The prompt files a run reads: `prompts.path`, `eval.prompts_path`, `eval.extra_prompts`."""
    evaluation = config.get("eval", None) or {}
    paths = [config.prompts.get("path", ""), evaluation.get("prompts_path", "")]
    paths += list(dict(evaluation.get("extra_prompts", None) or {}).values())
    return [p for p in dict.fromkeys(paths) if p]


def run() -> None:
    runtime.run(main, __doc__)


if __name__ == "__main__":
    run()
