"""`titan-world generate` on a diffusers Wan pipeline folder gives diffusers' own frames.

Tiny random pipelines are built here (no download): `WanImageToVideoPipeline` with two experts and a
boundary (Wan2.2 I2V-A14B's layout), `WanPipeline` with two experts (T2V-A14B), and a TI2V one
(`expand_timesteps=True`, a Wan2.2-style 2x2-patch VAE), each with a Flow-UniPC scheduler, a tiny
umT5 encoder with a word-level tokenizer and a tiny `AutoencoderKLWan`. The text pathway's weights
are scaled up so that every reference choice (scheduler, boundary, negative prompt, guidance pair)
visibly changes the frames while a tiny change of the noise does not: the parity bound then proves
that each choice is made as the reference makes it. fp32 on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from launch.cli import main
from titan_world.diffusion.unipc import flow_schedule, unipc_sample

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

WORDS = "a red cat walks on the beach at sunset blurry static low quality bright ugly dog runs in snow".split()
PROMPT, NEGATIVE = "a red cat walks on the  beach at sunset", "blurry static low quality"
FRAMES, STEPS, GUIDANCE = 5, 6, (4.0, 2.0)  # timesteps 999 961 909 833 715 501 (shift 5): both experts run


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _pipeline(kind: str):
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanImageToVideoPipeline,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    text = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(WORDS) + 3,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
        )
    ).eval()
    ti2v = kind == "ti2v"
    z = 8 if ti2v else 4
    stats = dict(latents_mean=np.linspace(-0.5, 0.5, z).tolist(), latents_std=np.linspace(0.5, 2.0, z).tolist())
    if ti2v:  # Wan2.2's VAE layout: 2x2 pixel patches, residual blocks, stride 16
        vae = AutoencoderKLWan(
            base_dim=3,
            z_dim=z,
            in_channels=12,
            out_channels=12,
            is_residual=True,
            patch_size=2,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            scale_factor_spatial=16,
            **stats,
        )
    else:
        vae = AutoencoderKLWan(
            base_dim=3,
            z_dim=z,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            **stats,
        )
    with torch.no_grad():  # a decoder whose frames span the whole 0..255 range (a random one stays near grey)
        vae.decoder.conv_out.weight.mul_(DECODER_GAIN)
        vae.decoder.conv_out.bias.mul_(DECODER_GAIN)
    in_ch = 2 * z + 4 if kind == "i2v" else z

    def dit():
        net = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=in_ch,
            out_channels=z,
            text_dim=32,
            freq_dim=256,
            ffn_dim=48,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        ).eval()
        with torch.no_grad():  # a strong text pathway: prompt, negative prompt and guidance all matter
            for name, p in net.named_parameters():
                if "text_embedder" in name or ".attn2.to_v" in name or ".attn2.to_out" in name:
                    p.mul_(4.0)
                if name.startswith("proj_out"):
                    p.normal_(0, 0.3)
        return net

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    parts = dict(tokenizer=_tokenizer(), text_encoder=text, vae=vae.eval(), scheduler=scheduler, transformer=dit())
    if kind == "i2v":
        return WanImageToVideoPipeline(**parts, transformer_2=dit(), boundary_ratio=0.9)
    if kind == "t2v":
        return WanPipeline(**parts, transformer_2=dit(), boundary_ratio=0.9)
    return WanImageToVideoPipeline(**parts, expand_timesteps=True)


SIZE = {"i2v": 32, "t2v": 32, "ti2v": 64}
DECODER_GAIN = 6.0


def _image(size: int):
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def _reference(pipe, kind: str, noise: torch.Tensor, negative=NEGATIVE, guidance=GUIDANCE) -> np.ndarray:
    """diffusers' frames, [F, H, W, 3] in 0..255 (float)."""
    size = SIZE[kind]
    kw = dict(
        prompt=PROMPT,
        negative_prompt=negative,
        height=size,
        width=size,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        guidance_scale=guidance[0],
        latents=noise.clone(),
        output_type="np",
    )
    if kind == "ti2v":
        kw.pop("guidance_scale")
        kw["guidance_scale"] = guidance[0]
    else:
        kw["guidance_scale_2"] = guidance[1]
    if kind != "t2v":
        kw["image"] = _image(size)
    with torch.no_grad():
        return pipe(**kw).frames[0] * 255.0


def _ours(tmp_path, folder, kind: str, noise: torch.Tensor, *extra: str) -> np.ndarray:
    size = SIZE[kind]
    save_file({"latents": noise[0].contiguous()}, str(tmp_path / f"{kind}_noise.safetensors"))
    out = tmp_path / f"{kind}.npy"
    args = [
        "generate",
        "--checkpoint",
        str(folder),
        "--prompt",
        PROMPT,
        "--negative-prompt",
        NEGATIVE,
        "--frames",
        str(FRAMES),
        "--height",
        str(size),
        "--width",
        str(size),
        "--steps",
        str(STEPS),
        "--guidance",
        str(GUIDANCE[0]),
        "--noise",
        str(tmp_path / f"{kind}_noise.safetensors"),
        "--out",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]
    if kind != "t2v":
        _image(size).save(tmp_path / "image.png")
        args += ["--image", str(tmp_path / "image.png")]
    if kind != "ti2v":
        args += ["--guidance-low", str(GUIDANCE[1])]
    assert main(args) == 0
    return np.load(out).astype(np.float64)


def _noise(pipe, kind: str) -> torch.Tensor:
    z, s = pipe.vae.config.z_dim, pipe.vae_scale_factor_spatial
    size = SIZE[kind]
    return torch.randn(1, z, 1 + (FRAMES - 1) // 4, size // s, size // s, generator=torch.Generator().manual_seed(7))


def _diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d.max()), float(d.mean())


@pytest.mark.parametrize("kind", ["i2v", "t2v", "ti2v"])
def test_generate_matches_diffusers_pipeline(kind, tmp_path):
    pipe = _pipeline(kind)
    folder = tmp_path / f"wan-{kind}"
    pipe.save_pretrained(folder)
    noise = _noise(pipe, kind)
    ref = _reference(pipe, kind, noise)
    ours = _ours(tmp_path, folder, kind, noise)
    assert ours.shape == ref.shape == (FRAMES, SIZE[kind], SIZE[kind], 3)
    worst, mean = _diff(ours, np.round(ref))  # ours is uint8: compare with diffusers' frames rounded the same way
    assert worst <= 1.5 and mean <= 0.2, (worst, mean)

    # the test is not vacuous: each reference choice moves the frames far, a 1e-4 change of the noise does not
    nudged = _reference(pipe, kind, noise * (1 + 1e-4))
    assert _diff(nudged, ref)[0] < 0.3
    assert _diff(_reference(pipe, kind, noise, negative="a dog runs in snow"), ref)[0] > 100
    assert (
        _diff(
            _reference(pipe, kind, noise, guidance=(GUIDANCE[1], GUIDANCE[0]) if kind != "ti2v" else (1.5, 1.5)), ref
        )[0]
        > 100
    )
    unipc = pipe.scheduler
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0)
    assert _diff(_reference(pipe, kind, noise), ref)[0] > 100
    pipe.scheduler = unipc
    if kind != "ti2v":
        pipe.register_to_config(boundary_ratio=0.95)  # step t=909 moves to the low-noise expert
        assert _diff(_reference(pipe, kind, noise), ref)[0] > 100
        pipe.register_to_config(boundary_ratio=0.9)


def test_pipeline_folder_loads_both_experts_and_refuses_one(tmp_path):
    from titan_world.model import WanMoE, load_pretrained
    from titan_world.model.io import CheckpointError
    from titan_world.model.pipeline import load_wan_bundle

    pipe = _pipeline("i2v")
    folder = tmp_path / "wan-i2v"
    pipe.save_pretrained(folder)
    bundle = load_wan_bundle(folder)
    assert isinstance(bundle.model, WanMoE) and bundle.boundary == 0.9 and bundle.flow_shift == 5.0
    assert bundle.preset.name == "wan2.2-i2v-a14b" and bundle.model.cfg.conditioning == "reference"
    for name, net in (("high", pipe.transformer), ("low", pipe.transformer_2)):
        ours = bundle.model.expert(name).state_dict()["blocks.0.cross_attn.k.weight"]
        torch.testing.assert_close(ours, net.state_dict()["blocks.0.attn2.to_k.weight"], rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="one expert of the two-expert pipeline"):
        load_pretrained(folder / "transformer")
    assert main(["generate", "--checkpoint", str(folder / "transformer_2"), "--out", str(tmp_path / "x.mp4")]) == 2
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(Exception, match="config.json"):
        load_wan_bundle(folder)


def test_flow_unipc_equals_diffusers_scheduler():
    """Our Flow-UniPC (own implementation) against diffusers' UniPCMultistepScheduler on a nonlinear
    velocity field: the same integer timesteps and sigmas, and the same result to float rounding."""
    from diffusers import UniPCMultistepScheduler

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 8, generator=g) * 0.5

    def velocity(x, t):
        return torch.tanh(x @ w) + (t.float() / 1000.0)[:, None, None] * x

    for steps, shift in [(1, 5.0), (2, 5.0), (3, 1.0), (7, 5.0), (12, 12.0), (40, 5.0)]:
        noise = torch.randn(2, 4, 8, generator=g)
        ref = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
        ref.set_timesteps(steps)
        x = noise.clone()
        for t in ref.timesteps:
            x = ref.step(velocity(x, t.expand(2)), t, x, return_dict=False)[0]
        ours = flow_schedule(steps, shift)
        assert ours.timesteps.tolist() == ref.timesteps.tolist() and torch.equal(ours.sigmas, ref.sigmas)
        torch.testing.assert_close(unipc_sample(velocity, noise, ours), x, rtol=1e-5, atol=2e-6)


def test_official_schedule_starts_at_0999():
    """The official FlowUniPCMultistepScheduler's grid: linspace(0.999, 0) before the shift (diffusers':
    linspace(1, 0.001)); both truncate sigma * 1000 for the model."""
    ours = flow_schedule(4, 1.0, "official")
    assert ours.timesteps.tolist() == [999, 749, 499, 249]
    assert flow_schedule(4, 1.0, "diffusers").timesteps.tolist() == [999, 750, 500, 250]
    with pytest.raises(ValueError, match="at least 1"):
        flow_schedule(0, 5.0)


def test_official_folder_generates_as_the_official_scheduler(tmp_path, monkeypatch):
    """The official repository's layout (high_noise_model/, low_noise_model/, Wan2.1_VAE.pth, the umT5
    .pth + google/umt5-xxl/) written from a tiny diffusers pipeline generates diffusers' frames when
    diffusers samples on the official grid (linspace(0.999, 0) before the shift)."""
    from titan_world.model.diffusers_names import diffusers_to_native
    from titan_world.model.io import save_state_dict
    from titan_world.model.official import (
        T5_FILE,
        T5_TOKENIZER_DIR,
        WAN21_VAE_FILE,
        save_official_t5,
        save_official_vae,
    )

    kind = "i2v"
    pipe = _pipeline(kind)
    z = pipe.vae.config.z_dim
    pipe.vae.register_to_config(
        latents_mean=[0.0] * z, latents_std=[1.0] * z
    )  # a .pth carries no statistics for a 4-channel VAE
    root = tmp_path / "Wan2.2-I2V-A14B"
    for sub, net in (("high_noise_model", pipe.transformer), ("low_noise_model", pipe.transformer_2)):
        c = net.config
        config = {
            "_class_name": "WanModel",
            "model_type": "i2v",
            "dim": c.num_attention_heads * c.attention_head_dim,
            "ffn_dim": c.ffn_dim,
            "num_heads": c.num_attention_heads,
            "num_layers": c.num_layers,
            "in_dim": c.in_channels,
            "out_dim": c.out_channels,
            "text_len": 512,
            "freq_dim": c.freq_dim,
            "eps": c.eps,
            "text_dim": c.text_dim,
        }
        save_state_dict(diffusers_to_native(net.state_dict()), root / sub, config)
    save_official_vae(pipe.vae, root / WAN21_VAE_FILE)
    save_official_t5(pipe.text_encoder, root / T5_FILE)
    pipe.tokenizer.save_pretrained(root / T5_TOKENIZER_DIR)

    set_timesteps = pipe.scheduler.set_timesteps
    official = np.linspace(float(np.float32(0.999)), 0.0, STEPS + 1)[:-1]
    monkeypatch.setattr(
        pipe.scheduler, "set_timesteps", lambda n, device=None: set_timesteps(device=device, sigmas=official.copy())
    )
    noise = _noise(pipe, kind)
    ref = _reference(pipe, kind, noise)
    ours = _ours(tmp_path, root, kind, noise, "--shift", "5")
    worst, mean = _diff(ours, np.round(ref))
    assert worst <= 1.5 and mean <= 0.2, (worst, mean)
    # the DiT folders alone (a titan-world checkpoint of a reference model): VAE and text encoder from the config
    import shutil

    dits = tmp_path / "dits"
    for sub in ("high_noise_model", "low_noise_model"):
        shutil.copytree(root / sub, dits / sub)
    vae_path = f"data.codec.path={root / WAN21_VAE_FILE}"
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(dits),
                "--out",
                str(tmp_path / "no_text.npy"),
                "--image",
                str(tmp_path / "image.png"),
                "data.codec.kind=wan_vae",
                vae_path,
                "data.text_encoder.kind=umt5",
                "--frames",
                "5",
                "--steps",
                "1",
            ]
        )
        == 2
    )  # umT5 asked for, without its files: an error, not a run
    again = _ours(
        tmp_path,
        dits,
        kind,
        noise,
        "data.codec.kind=wan_vae",
        f"data.codec.path={root / WAN21_VAE_FILE}",
        "data.text_encoder.kind=umt5",
        f"data.text_encoder.path={root / T5_FILE}",
    )
    assert _diff(again, ours)[0] == 0

    monkeypatch.setattr(pipe.scheduler, "set_timesteps", set_timesteps)
    assert _diff(_reference(pipe, kind, noise), ref)[0] > 100  # diffusers' own grid would not match: the grid matters


def test_presets_agree_with_the_model_configs():
    """One set of official numbers: the generation presets and configs/model/*.yaml say the same."""
    import yaml

    from titan_world.config import CONFIG_ROOT
    from titan_world.model.presets import PRESETS

    for preset, config in [
        ("wan2.2-i2v-a14b", "wan2.2-i2v-a14b"),
        ("wan2.2-t2v-a14b", "wan2.2-t2v-a14b"),
        ("wan2.2-ti2v-5b", "wan2.2-ti2v-5b"),
        ("wan2.1-t2v", "wan2.1-1.3b"),
    ]:
        p, raw = PRESETS[preset], yaml.safe_load((CONFIG_ROOT / "model" / f"{config}.yaml").read_text())
        assert p.model_type == raw["model_type"] and p.experts == raw.get("num_experts", 1), preset
        if p.experts == 2:
            assert p.boundary == raw["boundary"], preset


def test_reference_training_inputs_are_the_pipelines_inputs(tmp_path):
    """Training a reference-conditioned model (finetuning official weights) builds the inputs the
    reference pipeline builds: for I2V, diffusers' own `prepare_latents` condition y and the noisy
    latents on every frame; the first step's loss then equals the one computed with diffusers'
    transformer on those inputs. TI2V keeps frame 0 clean at t = 0; T2V noises every frame."""
    import dataclasses

    from titan_world.conditioning import masked_mse, training_inputs
    from titan_world.model.codec import WanVAECodec
    from titan_world.model.pipeline import load_wan_bundle

    pipe = _pipeline("i2v")
    pipe.save_pretrained(tmp_path / "wan")
    bundle = load_wan_bundle(tmp_path / "wan")
    codec = WanVAECodec(str(tmp_path / "wan" / "vae"))
    g = torch.Generator().manual_seed(3)
    video = torch.rand(1, 3, FRAMES, 32, 32, generator=g) * 2 - 1
    latents = codec.encode(video)
    sigma, noise = torch.tensor([0.7]), torch.randn(latents.shape, generator=g)
    cfg = bundle.model.cfg
    nb = training_inputs(
        cfg,
        latents,
        torch.ones(1, latents.shape[2], dtype=torch.bool),
        sigma,
        noise,
        first_frames=video[:, :, 0],
        codec=codec,
    )
    with torch.no_grad():
        _, condition = pipe.prepare_latents(
            video[:, :, 0], 1, latents.shape[1], 32, 32, FRAMES, torch.float32, "cpu", None, latents=noise
        )
        torch.testing.assert_close(nb.cond, condition, rtol=1e-5, atol=1e-5)
        x_t = 0.3 * latents + 0.7 * noise
        torch.testing.assert_close(nb.x_t, x_t, rtol=1e-6, atol=1e-6)
        assert bool((nb.t == 700.0).all()) and bool((nb.loss_mask == 1).all())
        context = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=512)[0]
        ours = masked_mse(bundle.model.high(nb.x_t, nb.t, context, cond=nb.cond), nb.target, nb.loss_mask)
        ref = pipe.transformer(torch.cat([x_t, condition], 1), torch.tensor([700.0]), context, return_dict=False)[0]
        ref_loss = (ref - (noise - latents)).pow(2).mean()
    assert abs(ours.item() - ref_loss.item()) <= 1e-4 * ref_loss.item(), (ours.item(), ref_loss.item())
    with pytest.raises(ValueError, match="first frame"):
        training_inputs(cfg, latents, nb.loss_mask.bool(), sigma, noise)

    ti2v = training_inputs(
        dataclasses.replace(cfg, model_type="ti2v", in_dim=cfg.out_dim),
        latents,
        torch.zeros(1, latents.shape[2], dtype=torch.bool),
        sigma,
        noise,
    )
    assert ti2v.cond is None and ti2v.t[0].tolist() == [0.0, 700.0] and ti2v.loss_mask[0].tolist() == [0.0, 1.0]
    torch.testing.assert_close(ti2v.x_t[:, :, 0], latents[:, :, 0])
    t2v = training_inputs(
        dataclasses.replace(cfg, model_type="t2v", in_dim=cfg.out_dim),
        latents,
        torch.ones(1, latents.shape[2], dtype=torch.bool),
        sigma,
        noise,
    )
    assert t2v.cond is None and t2v.t[0].tolist() == [700.0, 700.0] and t2v.loss_mask[0].tolist() == [1.0, 1.0]


def test_first_training_step_from_official_weights_uses_the_reference_inputs(tmp_path):
    """Finetuning an official-layout I2V checkpoint (`model.conditioning=reference`, a Wan-VAE dataset
    with raw frames): the trainer's first loss equals the loss of diffusers' transformer on the inputs
    diffusers' I2V pipeline builds (prepare_latents' y, noise on every frame) at the trainer's sigma and noise."""
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel

    from parallel import destroy
    from titan_world.config import load_config
    from titan_world.data.writer import synthesize
    from titan_world.diffusion.flow import sample_sigma
    from titan_world.job import noise_seed
    from titan_world.model.codec import frames_to_video
    from titan_world.model.diffusers_names import diffusers_to_native
    from titan_world.model.io import save_state_dict
    from titan_world.train.loop import Trainer

    pipe = _pipeline("i2v")
    pipe.vae.save_pretrained(tmp_path / "vae")
    torch.manual_seed(5)
    net = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=12,
        out_channels=4,
        text_dim=64,
        freq_dim=256,
        ffn_dim=48,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    official = {
        "_class_name": "WanModel",
        "model_type": "i2v",
        "dim": 24,
        "ffn_dim": 48,
        "num_heads": 2,
        "num_layers": 2,
        "in_dim": 12,
        "out_dim": 4,
        "text_len": 32,
        "freq_dim": 256,
        "eps": 1e-6,
        "text_dim": 64,
    }
    save_state_dict(diffusers_to_native(net.state_dict()), tmp_path / "wan", official)
    cfg = load_config(
        None,
        [
            "data.height=32",
            "data.width=32",
            "data.codec.kind=wan_vae",
            f"data.codec.path={tmp_path / 'vae'}",
            f"data.path={tmp_path / 'data'}",
            "run.wandb=disabled",
            "run.progress=false",
            f"run.dir={tmp_path / 'run'}",
            "train.global_batch=2",
            "train.warmup_steps=1",
            "train.ckpt_every=0",
            "train.steps=1",
            "train.stages.0.frames=5",
            "train.action_check_episodes=0",
            "model.dim=24",
            "model.ffn_dim=48",
            "model.num_heads=2",
            "model.num_layers=2",
            "model.in_dim=12",
            "model.out_dim=4",
            "model.text_dim=64",
            "model.action.enabled=false",
            "model.conditioning=reference",
            f"train.base_checkpoint={tmp_path / 'wan'}",
        ],
    )
    synthesize(cfg, tmp_path / "data", 2, 1.0, keep_raw=True, progress=False)
    trainer = Trainer(cfg)
    try:
        batches = [next(trainer.batches) for _ in range(trainer.accum)]
        loss = trainer.train_step(0, batches)["loss"]
    finally:
        trainer.loader.close()
        destroy()

    vae = AutoencoderKLWan.from_pretrained(tmp_path / "vae").eval()
    reference = WanImageToVideoPipeline(
        tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, scheduler=pipe.scheduler, vae=vae, transformer=net
    )
    losses = []
    with torch.no_grad():
        for batch in batches:
            for i in range(batch["latents"].shape[0]):
                z = batch["latents"][i : i + 1]
                seed = noise_seed(cfg.train.seed, 0, batch["episode_ids"][i], int(batch["start_frames"][i]))
                g = torch.Generator().manual_seed(seed)
                sigma = sample_sigma((1,), trainer.stage.shift, 0.0, 1.0, generator=g)[0]
                noise = torch.randn(z.shape[1:], generator=g)[None]
                image = frames_to_video(batch["frames"][i : i + 1, :1].numpy())[:, :, 0]
                _, y = reference.prepare_latents(image, 1, 4, 32, 32, 5, torch.float32, "cpu", None, latents=noise)
                x_t = (1 - sigma) * z + sigma * noise
                t = (sigma * 1000).view(1)
                pred = net(torch.cat([x_t, y], 1), t, batch["text"][i : i + 1], return_dict=False)[0]
                losses.append((pred - (noise - z)).pow(2).mean().item())
    assert loss == pytest.approx(float(np.mean(losses)), rel=1e-4), (loss, losses)
