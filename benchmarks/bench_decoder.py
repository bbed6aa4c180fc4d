"""Streaming decode speed: the Wan VAE's causal decoder vs the light decoder, in one run.

    python -m benchmarks.bench_decoder [--height 480 --width 832] [--chunks 6] [--light-decoder PATH]

Both decode the same latent stream chunk by chunk (`chunk_frames` latents = 4x video frames per
chunk) the way the serving engine does (`codec.stream_decoder()`), in bf16 on a GPU, fp32 on a
CPU. The Wan VAE is diffusers' default `AutoencoderKLWan` (the Wan2.1 VAE's architecture) with
random weights unless `--vae PATH` names real ones: speed does not depend on the weights, and
neither does the light decoder's (`--light-decoder` a distilled one, else `--width/--depth`).
Prints frames/s, ms per frame, peak memory and the speed ratio. The reference numbers in RESULTS.md put the Wan
VAE at ~39 frames/s at 480p on an H100. CPU default: 112x64 and one chunk, so it finishes in about a minute.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import peak_gb, reset_peak, time_fn, write_json


def _stream_fps(make_decoder, latents: torch.Tensor, chunk: int, device: torch.device) -> tuple[float, float | None]:
    """Frames per second decoding `latents` [1, C, F, h, w] chunk by chunk, a fresh stream per
    call (`time_fn`: one warm-up stream, then one timed), and the peak memory."""
    frames = 0

    def stream() -> None:
        nonlocal frames
        dec = make_decoder()
        frames = sum(dec.decode(latents[:, :, s : s + chunk]).shape[2] for s in range(0, latents.shape[2], chunk))

    reset_peak(device)
    seconds = time_fn(stream, device, warmup=1, iters=1)
    return frames / seconds, peak_gb(device)


def main(argv: list[str] | None = None) -> int:
    from titan_world.model.codec import WanVAECodec
    from titan_world.model.light_decoder import (
        LightDecodedCodec,
        LightDecoder,
        LightDecoderConfig,
        LightStreamDecoder,
        load_light_decoder,
    )

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    p.add_argument("--height", type=int, default=480 if cuda else 64)
    p.add_argument("--width", type=int, default=832 if cuda else 112)
    p.add_argument("--chunks", type=int, default=6 if cuda else 1, help="timed chunks after the stream's first latent")
    p.add_argument("--chunk-frames", type=int, default=3, help="latent frames per chunk (serving.chunk_frames)")
    p.add_argument("--vae", default=None, help="a local Wan VAE folder (default: random weights, same architecture)")
    p.add_argument("--light-decoder", default=None, help="a distilled light decoder (default: random, --width/--depth)")
    p.add_argument(
        "--width-channels", dest="channels", type=int, default=64, help="light decoder width (LightDecoderConfig.width)"
    )
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32

    if args.vae:
        vae = WanVAECodec(args.vae, device=device, dtype=dtype)
    else:
        from benchmarks.bench_serving import random_wan_vae

        vae = WanVAECodec(random_wan_vae(), device=device, dtype=dtype)
    s = vae.stride[1]
    if args.height % s or args.width % s:
        raise SystemExit(f"--height/--width must be multiples of the VAE stride {s}")
    if args.light_decoder:
        light = load_light_decoder(args.light_decoder, device, dtype)
        try:
            LightDecodedCodec(vae, light)  # same latent interface, or the comparison is meaningless
        except ValueError as e:
            raise SystemExit(f"--light-decoder {args.light_decoder}: {e}") from None
    else:
        light = (
            LightDecoder(LightDecoderConfig(vae.latent_channels, s, args.channels, args.depth)).to(device, dtype).eval()
        )
    latents = torch.randn(
        1, vae.latent_channels, 1 + args.chunks * args.chunk_frames, args.height // s, args.width // s, device=device
    )

    rows = {}
    with torch.no_grad():
        for name, make in (
            ("Wan VAE (stream decoder)", vae.stream_decoder),
            ("light decoder", lambda: LightStreamDecoder(light)),
        ):
            fps, peak = _stream_fps(make, latents, args.chunk_frames, device)
            rows[name] = {"fps": fps, "ms_per_frame": 1e3 / fps, "peak_gb": peak}
    base = rows["Wan VAE (stream decoder)"]["fps"]
    params = {
        "Wan VAE (stream decoder)": sum(q.numel() for q in vae.vae.decoder.parameters()),
        "light decoder": sum(q.numel() for q in light.parameters()),
    }
    print(
        f"streaming decode on {device} ({str(dtype).replace('torch.', '')}, {torch.get_num_threads()} threads): "
        f"{args.width}x{args.height}, chunks of {args.chunk_frames} latents ({4 * args.chunk_frames} frames), "
        f"{args.chunks} timed chunks after the first latent"
    )
    print(f"{'decoder':<26} {'params':>9} {'frames/s':>9} {'ms/frame':>9} {'peak GB':>8} {'vs VAE':>7}")
    for name, r in rows.items():
        r["params"], r["speedup"] = params[name], r["fps"] / base
        peak = f"{r['peak_gb']:8.2f}" if r["peak_gb"] is not None else "       -"
        print(
            f"{name:<26} {params[name] / 1e6:8.2f}M {r['fps']:9.1f} {r['ms_per_frame']:9.2f} {peak} "
            f"{r['speedup']:6.1f}x"
        )
    write_json(args.json, {"device": str(device), "height": args.height, "width": args.width, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
