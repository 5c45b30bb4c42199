"""diffusers: self-attention processors wrapped, steps and CFG roles followed, masks cached as the policy says."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (CogVideoXTransformer3DModel, FlowMatchEulerDiscreteScheduler,  # noqa: E402
                       FluxTransformer2DModel, WanPipeline, WanTransformer3DModel)

from sparse_attn.cache import CachePolicy, StepCache  # noqa: E402
from sparse_attn.integrations.diffusers import _SparseProcessor, apply  # noqa: E402
from sparse_attn.integrations.sdpa import SparseConfig  # noqa: E402
from sparse_attn.layout import TokenLayout  # noqa: E402

from _toy_patterns import BandPattern, DensePattern  # noqa: E402


def tiny_wan():
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                 out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                                 rope_max_seq_len=32).eval()


def wan_inputs(batch=1, frames=3, size=16, t=500.0):
    torch.manual_seed(1)
    return dict(hidden_states=torch.randn(batch, 4, frames, size, size), timestep=torch.full((batch,), t),
                encoder_hidden_states=torch.randn(batch, 16, 32), return_dict=False)


def cfg(pattern, policy=None, **kw):
    return SparseConfig(pattern, cache=StepCache(policy or CachePolicy()), min_seq_len=32, **kw)


def test_wan_transformer_dense_pattern_self_attention_only_and_remove():
    model = tiny_wan()
    inputs = wan_inputs()
    with torch.no_grad():
        ref = model(**inputs)[0]
        pat = DensePattern(block=32)
        handle = apply(model, cfg(pat))
        assert handle.layers == {"blocks.0.attn1": 0, "blocks.1.attn1": 1}  # attn2 (cross) untouched
        assert not isinstance(model.blocks[0].attn2.processor, _SparseProcessor)
        out = model(**inputs)[0]
        handle.remove()
        again = model(**inputs)[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert torch.equal(again, ref)  # unpatched: bit-identical
    assert pat.builds == 2 and handle.stats["sparse"] == 2
    assert pat.layouts[0] == TokenLayout.video(3, 8, 8)  # 3 latent frames of 8 x 8 patches
    assert not any(isinstance(p, _SparseProcessor) for p in model.attn_processors.values())
    assert not model._forward_pre_hooks


def test_band_pattern_changes_the_output_and_shape_change_invalidates():
    model = tiny_wan()
    pat = BandPattern(block=32, width=0)
    with torch.no_grad(), apply(model, cfg(pat, CachePolicy(warmup_steps=1))) as handle:
        dense = model(**wan_inputs(t=900.0))[0]  # step 0: warm-up, dense
        sparse = model(**wan_inputs(t=800.0))[0]  # step 1: build
        model(**wan_inputs(t=700.0))  # step 2: reuse
        model(**wan_inputs(size=20, t=600.0))  # step 3: new resolution at a reuse step
    cache = handle.cache
    assert pat.builds == 4 and cache.stats.invalidations == 2 and cache.stats.reuses == 2
    assert [s for _, s, _, _ in cache.build_log] == [1, 1, 3, 3]
    assert not torch.allclose(dense, sparse, atol=1e-4)


def tiny_pipeline():
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tiny_wan(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipe(pipe, steps=50, size=64, seed=0):
    torch.manual_seed(2)
    emb, neg = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    return pipe(prompt_embeds=emb, negative_prompt_embeds=neg, height=size, width=size, num_frames=9,
                num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).frames


def test_wan_pipeline_50_steps_with_cfg_builds_only_at_policy_steps():
    pipe = tiny_pipeline()
    with torch.no_grad():
        ref = run_pipe(pipe)
        pat = DensePattern(block=16)
        policy = CachePolicy(warmup_steps=10, rebuild_steps=(10, 30))  # AdaSpa's schedule
        handle = apply(pipe, cfg(pat, policy))
        out = run_pipe(pipe)
        cache = handle.cache
        first = list(cache.build_log)
        counts1 = (cache.stats.builds, cache.stats.reuses, cache.stats.dense)
        out2 = run_pipe(pipe, size=80, seed=1)  # a second generation, other resolution
        handle.remove()
        again = run_pipe(pipe)
    # builds only at steps 10 and 30, for 2 layers x 2 roles (cond, uncond), each its own entry
    assert sorted(first) == sorted((0, s, layer, role) for s in (10, 30) for layer in (0, 1)
                                   for role in ("call0", "call1"))
    assert counts1 == (8, 40 * 4 - 8, 10 * 4)
    # the second generation starts over: dense warm-up, then its own builds at 10 and 30
    second = cache.build_log[len(first):]
    assert sorted({(g, s) for g, s, _, _ in second}) == [(1, 10), (1, 30)] and len(second) == 8
    assert cache.stats.dense == 2 * 40 and cache.stats.invalidations == 0 and cache.stats.resets == 1
    assert pat.layouts[-1] == TokenLayout.video(3, 5, 5)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)  # dense pattern = unpatched pipeline
    assert out2.shape[-1] == 10
    assert torch.equal(again, ref)


def test_flux_transformer_joint_attention_and_layout():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)).eval()
    h, w = 8, 12
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]
    inputs = dict(hidden_states=torch.randn(1, h * w, 4), encoder_hidden_states=torch.randn(1, 16, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=ids.reshape(-1, 3),
                  txt_ids=torch.zeros(16, 3), return_dict=False)
    with torch.no_grad():
        ref = model(**inputs)[0]
        pat = DensePattern(block=32)
        with apply(model, cfg(pat)) as handle:
            out = model(**inputs)[0]
        assert torch.equal(model(**inputs)[0], ref)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert set(handle.layers) == {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"}
    assert pat.builds == 2 and pat.layouts == [TokenLayout.video(1, h, w, text_len=16)] * 2


def test_cogvideox_transformer_direct_sdpa_and_text_first_layout():
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                        time_embed_dim=16, text_embed_dim=32, num_layers=2, sample_width=8,
                                        sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                        max_text_seq_length=16).eval()
    inputs = dict(hidden_states=torch.randn(2, 3, 4, 8, 8), encoder_hidden_states=torch.randn(2, 16, 32),
                  timestep=torch.tensor([500, 500]), return_dict=False)
    with torch.no_grad():
        ref = model(**inputs)[0]
        pat = DensePattern(block=16)
        with apply(model, cfg(pat)) as handle:
            out = model(**inputs)[0]
        assert torch.equal(model(**inputs)[0], ref)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert handle.stats["sparse"] == 2
    assert pat.layouts[0] == TokenLayout.video(3, 4, 4, text_len=16, text_position="before")


def test_bad_input_and_non_native_backend():
    with pytest.raises(TypeError, match="target must be"):
        apply(object(), DensePattern())
    model = tiny_wan()
    with pytest.raises(TypeError, match="layout must be"):
        apply(model, DensePattern(), layout=3)
    model.blocks[0].attn1.processor._attention_backend = "flash"
    with pytest.raises(ValueError, match="backend must be 'native'"):
        apply(model, DensePattern())
    assert not any(isinstance(p, _SparseProcessor) for p in model.attn_processors.values())
    model.blocks[0].attn1.processor._attention_backend = None
    handle = apply(model, DensePattern())
    with pytest.raises(ValueError, match="already patched"):
        apply(model, DensePattern())
    handle.remove()


def test_adaspa_preset_on_the_wan_pipeline_reuses_the_lse():
    from sparse_attn.integrations.presets import get_preset

    pipe = tiny_pipeline()
    cfg_a = get_preset("adaspa", num_steps=20, block_size=32, min_seq_len=32)
    lse_passes = []
    inner = cfg_a.pattern.build_stateful

    def counting(q, k, *, causal=False, layout=None, state=None):
        lse_passes.append(state is None)
        return inner(q, k, causal=causal, layout=layout, state=state)

    cfg_a.pattern.build_stateful = counting
    with torch.no_grad(), apply(pipe, cfg_a) as handle:
        out = run_pipe(pipe, steps=20, size=128)
    cache = handle.cache
    assert sorted({s for _, s, _, _ in cache.build_log}) == [4, 12]  # 20% and 60% of 20 steps
    assert lse_passes == [True] * 4 + [False] * 4  # step 12 reuses the LSE of step 4 (per layer and role)
    assert cache.state(0, "call0") is not None and torch.isfinite(out).all()


def test_ltx_transformer_layout_and_cross_attention_by_name():
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                       cross_attention_dim=32, num_layers=1, caption_channels=16).eval()
    f, h, w = 2, 8, 8
    inputs = dict(hidden_states=torch.randn(1, f * h * w, 4), encoder_hidden_states=torch.randn(1, 8, 16),
                  timestep=torch.tensor([500]), encoder_attention_mask=torch.ones(1, 8), num_frames=f, height=h,
                  width=w, return_dict=False)
    with torch.no_grad():
        ref = model(**inputs)[0]
        pat = DensePattern(block=32)
        with apply(model, cfg(pat)) as handle:
            out = model(**inputs)[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert handle.layers == {"transformer_blocks.0.attn1": 0}  # attn2 is cross-attention
    assert pat.layouts == [TokenLayout.video(f, h, w)] and handle.stats["sparse"] == 1


def test_hunyuan_video_text_padding_mask_runs_sparse():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                           num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                           patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
                                           rope_axes_dim=(4, 6, 6), guidance_embeds=False).eval()
    text_mask = torch.ones(1, 12, dtype=torch.long)
    text_mask[:, 9:] = 0  # padded prompt: HunyuanVideo passes a [B, 1, 1, N] key-padding mask
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 16, 16), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 12, 16), encoder_attention_mask=text_mask,
                  pooled_projections=torch.randn(1, 8), return_dict=False)
    with torch.no_grad():
        ref = model(**inputs)[0]
        pat = DensePattern(block=32)
        with apply(model, cfg(pat)) as handle:
            out = model(**inputs)[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    # the double- and single-stream blocks run sparse over the unpadded keys; the text refiner's 12 tokens
    # are shorter than min_seq_len, so it runs the original SDPA
    assert handle.stats["sparse"] == 2 and handle.stats["fallback:short"] == 1
