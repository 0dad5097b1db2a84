"""Tiny random FLUX / SD3 / Wan pipelines (text encoders and tokenizers only), built offline.

The tokenizers are real transformers tokenizers over a small vocabulary
(CLIP BPE without merges, i.e. one token per character; a T5 unigram model
over a few words and every letter), so prompts go through the same
tokenization on our side and in the diffusers pipelines. Pipelines are made
with `transformer=None, vae=None` (prompt encoding does not touch them)
and written with `save_pretrained`, as a user's folder would be.
"""

from __future__ import annotations

import string
from pathlib import Path

import diffusers
import torch
import transformers

WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "on", "the", "mat", "in", "snow")
CLIP_LEN = 16  # CLIP max_position_embeddings and tokenizer model_max_length


def clip_tokenizer(pad: str = "<|endoftext|>") -> transformers.CLIPTokenizer:
    """Characters (each also as a word end), then BOS and EOS last: EOS has the largest
    id, as in the real CLIP vocabulary (argmax pooling relies on it)."""
    pieces = []
    for c in string.ascii_lowercase + string.digits + "!,.":
        pieces += [c, c + "</w>"]
    pieces += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {p: i for i, p in enumerate(pieces)}
    return transformers.CLIPTokenizer(
        vocab=vocab, merges=[], pad_token=pad, model_max_length=CLIP_LEN
    )


def t5_tokenizer() -> transformers.T5Tokenizer:
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0 - i) for i, w in enumerate(WORDS)]
    vocab += [(c, -20.0) for c in string.ascii_lowercase]
    vocab += [("\u2581", -15.0)]
    return transformers.T5Tokenizer(vocab=vocab, extra_ids=0)


def clip_config(vocab: int, hidden: int, layers: int, eos: int, proj: int):
    return transformers.CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=CLIP_LEN,
        hidden_act="gelu",
        bos_token_id=vocab - 2,
        eos_token_id=eos,
        pad_token_id=vocab - 1,
        projection_dim=proj,
    )


def t5_config(vocab: int, umt5: bool = False):
    cls = transformers.UMT5Config if umt5 else transformers.T5Config
    return cls(
        vocab_size=vocab,
        d_model=96,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu",
    )


def _scheduler():
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)


def _clips(projected: bool, seed: int):
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if projected else transformers.CLIPTextModel
    tok = clip_tokenizer()
    v = len(tok)
    # CLIP-L: legacy eos_token_id=2 (argmax pooling); CLIP-G: the real EOS (first-EOS pooling).
    clip_l = cls(clip_config(v, 32, 3, eos=2, proj=24)).eval()
    clip_g = cls(clip_config(v, 40, 2, eos=v - 1, proj=28)).eval()
    return tok, clip_l, clip_g


def flux_pipeline(folder: Path, seed: int = 0) -> diffusers.FluxPipeline:
    tok, clip_l, _ = _clips(projected=False, seed=seed)
    t5_tok = t5_tokenizer()
    t5 = transformers.T5EncoderModel(t5_config(len(t5_tok))).eval()
    pipe = diffusers.FluxPipeline(
        scheduler=_scheduler(),
        vae=None,
        text_encoder=clip_l,
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=None,
    )
    pipe.save_pretrained(str(folder))
    return pipe


def sd3_pipeline(folder: Path, seed: int = 0, with_t5: bool = True):
    tok, clip_l, clip_g = _clips(projected=True, seed=seed)
    t5_tok = t5_tokenizer()
    t5 = transformers.T5EncoderModel(t5_config(len(t5_tok))).eval() if with_t5 else None
    transformer = None
    if not with_t5:  # diffusers reads the zero states' width from the transformer config
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=96,
            caption_projection_dim=16,
            pooled_projection_dim=52,
            out_channels=4,
            pos_embed_max_size=8,
        ).eval()
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_scheduler(),
        vae=None,
        text_encoder=clip_l,
        tokenizer=tok,
        text_encoder_2=clip_g,
        tokenizer_2=clip_tokenizer(pad="!"),  # SD3's second tokenizer pads with "!"
        text_encoder_3=t5,
        tokenizer_3=t5_tok if with_t5 else None,
    )
    pipe.save_pretrained(str(folder))
    return pipe


def wan_pipeline(folder: Path, seed: int = 0) -> diffusers.WanPipeline:
    torch.manual_seed(seed)
    tok = t5_tokenizer()
    umt5 = transformers.UMT5EncoderModel(t5_config(len(tok), umt5=True)).eval()
    pipe = diffusers.WanPipeline(
        tokenizer=tok, text_encoder=umt5, vae=None, scheduler=_scheduler(), transformer=None
    )
    pipe.save_pretrained(str(folder))
    return pipe
